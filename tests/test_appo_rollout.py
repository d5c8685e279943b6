"""The rollout engine on a tiny random Llama with a character tokenizer (no downloads):
cache-forked branches reproduce re-prefilled generation, and tool output never reaches the loss
mask or the branch candidates."""

import copy
import importlib
from pathlib import Path

import pytest
import torch

from appo.model import prompt_ids, tiny_model
from appo.rollout import (
    _TAG_WINDOW,
    IGNORE_INDEX,
    Rollout,
    RolloutBatch,
    RolloutConfig,
    RolloutEngine,
    sample_categorical,
)
from appo.tasks import Task, reward
from appo.trainer import TrainConfig, Trainer
from appo_kernels.kv import KVCacheFull
from appo_kernels.kv.hf import PagedCausalLM

MAX_NEW = 24


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(seed=0)


def _engine(model, tokenizer, max_new_tokens=MAX_NEW, **kwargs):
    lm = PagedCausalLM(model, num_blocks=64, block_size=8)
    return RolloutEngine(lm, tokenizer, RolloutConfig(max_new_tokens=max_new_tokens, **kwargs))


def _forcing(tokenizer, script: str):
    """A logits processor that makes each rollout write ``script`` (one character per policy
    token), whatever the random model prefers."""
    ids = tokenizer.encode(script, add_special_tokens=False)

    def force(logits, rollouts):
        forced = torch.full_like(logits, float("-inf"))
        for row, rollout in enumerate(rollouts):
            forced[row, ids[min(rollout.generated, len(ids) - 1)]] = 0.0
        return forced

    return force


@pytest.mark.parametrize("keep_selected_token", [False, True])
def test_forked_branch_matches_reprefilled_prefix(tiny, keep_selected_token):
    model, tokenizer = tiny
    engine = _engine(model, tokenizer)
    prompt = prompt_ids(tokenizer, "Be brief.", "What is 2+2?")
    parents = engine.sample([prompt] * 2, [0, 0], torch.Generator().manual_seed(1))
    row = max(range(2), key=lambda i: len(parents[i].tokens))
    position = len(parents[row].tokens) // 2
    assert position > 0

    branch = engine.branch(
        parents,
        [(row, position)],
        torch.Generator().manual_seed(7),
        keep_selected_token=keep_selected_token,
    )[0]
    split = position + 1 if keep_selected_token else position
    assert branch.split == split and branch.point == position and branch.parent == row
    assert branch.tokens[:split] == parents[row].tokens[:split]
    assert (
        branch.reused_prefix == len(prompt) + split - 1
    )  # only the last prefix token is recomputed
    engine.release(parents + [branch])
    assert engine.lm.cache.num_free_blocks == 64

    # The same continuation from a fresh prefill of prompt + prefix, same seed.
    fresh_engine = _engine(model, tokenizer, max_new_tokens=MAX_NEW - split)
    fresh = fresh_engine.sample(
        [prompt + parents[row].tokens[:split]], [0], torch.Generator().manual_seed(7)
    )[0]
    fresh_engine.release([fresh])
    assert branch.tokens[split:] == fresh.tokens
    torch.testing.assert_close(
        torch.tensor(branch.behavior_logprob[split:]),
        torch.tensor(fresh.behavior_logprob),
        atol=1e-4,
        rtol=1e-4,
    )
    assert branch.stop == fresh.stop


def test_tool_output_is_masked_from_loss_and_candidates(tiny):
    model, tokenizer = tiny
    trainer = Trainer(model, tokenizer, TrainConfig(n=1, b=1, max_new_tokens=40), max_concurrent=2)
    trainer.engine.logits_processor = _forcing(tokenizer, "<calc>2+3</calc>\n<answer>5</answer>")
    rollout = trainer.engine.sample([prompt_ids(tokenizer, "sys", "q")], [0])[0]
    trainer.engine.release([rollout])

    text = tokenizer.decode(rollout.tokens)
    assert text == "<calc>2+3</calc><out>5</out>\n<answer>5</answer>"
    assert rollout.tool_calls == 1 and rollout.stop == "answer"
    observed = "".join(
        tokenizer.decode([t]) for t, o in zip(rollout.tokens, rollout.is_observation) if o
    )
    assert observed == "<out>5</out>"
    assert reward(Task("q", "5", (), "one_item", ()), text) == 1.0

    # A second, shorter rollout pads the batch: padding must be out of every mask as well.
    short = trainer.engine.sample([prompt_ids(tokenizer, "sys", "q")], [0])[0]
    trainer.engine.release([short])
    batch = RolloutBatch.from_rollouts([rollout, short], trainer.pad_id, "cpu")
    obs = torch.tensor(rollout.is_observation)
    n = len(rollout.tokens)
    assert torch.equal(batch.observation_mask[0, :n], obs)
    assert torch.equal(batch.policy_mask[0, :n], ~obs)
    assert not batch.policy_mask[1, len(short.tokens) :].any()
    assert (batch.tokens[1, len(short.tokens) :] == IGNORE_INDEX).all()
    assert torch.equal(batch.behavior_logprob[0, :n][obs], torch.zeros(int(obs.sum())))

    candidates = trainer.branch_candidates(batch)
    whitespace = torch.tensor([not tokenizer.decode([t]).strip() for t in rollout.tokens])
    first = torch.arange(n) == 0  # a branch there would share no prefix with its parent
    assert torch.equal(candidates[0, :n], ~obs & ~whitespace & ~first)
    assert not candidates[1, len(short.tokens) :].any()

    # The loss's gradient never reaches an observation token's logits.
    logits = batch.response_logits(model).detach().requires_grad_(True)
    from appo.loss import policy_loss
    from appo_kernels import token_stats

    logprob = token_stats(logits, batch.tokens).logprob
    advantages = torch.ones_like(logprob)
    loss, _ = policy_loss(logprob, batch.behavior_logprob, advantages, batch.policy_mask)
    loss.backward()
    assert logits.grad[0, :n][obs].abs().max() == 0
    assert logits.grad[0, :n][~obs].abs().max() > 0


def test_tag_scan_decodes_a_bounded_window_per_token(tiny):
    """After each sampled token the engine looks for a closing tag in the turn's last few tokens
    only (linear in the turn's length), and still finds a tag and the whole call it closes."""
    model, tokenizer = tiny
    decoded = []

    class CountingTokenizer:
        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def decode(self, ids, **kwargs):
            decoded.append(len(ids))
            return tokenizer.decode(ids, **kwargs)

    engine = _engine(model, CountingTokenizer(), max_new_tokens=10_000)
    rollout = Rollout(group=0, prompt=[])
    text = "x" * 3000 + "<calc>2+3</calc>"
    for token in tokenizer.encode(text, add_special_tokens=False):
        rollout.append([token], False)
        feed = engine._after_token(rollout)
    assert rollout.tool_calls == 1 and tokenizer.decode(feed[1:]) == "<out>5</out>"
    # one window per token, plus the whole turn once when the call closed
    assert max(decoded[:-1]) <= _TAG_WINDOW and decoded[-1] == len(text)


def test_branch_after_observation_carries_tool_count_and_rejects_observation_points(tiny):
    model, tokenizer = tiny
    engine = _engine(model, tokenizer, max_new_tokens=40, max_tool_calls=1)
    engine.logits_processor = _forcing(tokenizer, "<calc>1+1</calc>\n<calc>2+2</calc>x")
    parent = engine.sample([prompt_ids(tokenizer, "sys", "q")], [0])[0]
    assert (
        parent.tool_calls == 1 and parent.stop == "tool_limit"
    )  # the second call is over the limit
    first_obs = parent.is_observation.index(True)
    with pytest.raises(ValueError, match="not a sampled token"):
        engine.branch([parent], [(0, first_obs)])
    after = len(parent.tokens) - 3
    engine.logits_processor = None
    branch = engine.branch([parent], [(0, after)], torch.Generator().manual_seed(0))[0]
    engine.release([parent, branch])
    assert branch.tool_calls == 1
    assert branch.is_observation[:after] == parent.is_observation[:after]
    assert not any(branch.is_observation[after:])  # the random model writes no further call


# ----------------------------------------------------------------------------------------------
# prefix-shared prefill
# ----------------------------------------------------------------------------------------------
SYSTEM = "You are a careful assistant. Think, then answer."
QUESTIONS = ("What is 2+2?", "Name a fruit.", "What is 2+3?")


def _recording(tokenizer, script: str, seen: list[torch.Tensor]):
    """A forcing logits processor (see ``_forcing``) that also keeps every logits row it gets."""
    force = _forcing(tokenizer, script)

    def record(logits, rollouts):
        seen.append(logits.clone())
        return force(logits, rollouts)

    return record


def _counting_steps(lm: PagedCausalLM) -> list[int]:
    """Records the number of tokens each model forward of ``lm`` computes."""
    counts, step = [], lm._step
    lm._step = lambda sids, tokens: counts.append(sum(map(len, tokens))) or step(sids, tokens)
    return counts


def test_prefix_shared_prefill_gives_the_logits_of_separate_prefills(tiny):
    """Issue 11: ``sample`` prefills the prompts' common start (the system turn) once and each
    distinct prompt once, then forks; every sampling step sees the logits of rollouts prefilled
    one by one, and the first step those of a float64 full forward."""
    model, tokenizer = tiny
    distinct = [prompt_ids(tokenizer, SYSTEM, q) for q in QUESTIONS]
    prompts = [distinct[0]] * 3 + [distinct[1]] * 2 + [distinct[2]]
    groups = [0, 0, 0, 1, 1, 2]
    common = next(i for i in range(len(distinct[0])) if len({p[i] for p in distinct}) > 1)
    assert common > len(SYSTEM)

    runs = {}
    for share in (True, False):
        seen: list[torch.Tensor] = []
        engine = _engine(model, tokenizer, max_new_tokens=6, use_tools=False, share_prefixes=share)
        engine.logits_processor = _recording(tokenizer, "fruit!", seen)
        computed = _counting_steps(engine.lm)
        rollouts = engine.sample(prompts, groups)
        engine.release(rollouts)
        assert engine.lm.cache.num_free_blocks == 64 and engine.lm.cache.sequences == []
        assert [tokenizer.decode(r.tokens) for r in rollouts] == ["fruit!"] * 6
        runs[share] = seen, computed

    (shared, shared_computed), (separate, separate_computed) = runs[True], runs[False]
    assert shared_computed[:2] == [common, sum(len(p) - common for p in distinct)]
    assert separate_computed[0] == sum(map(len, prompts))
    assert shared_computed[2:] == separate_computed[1:] == [6] * 5  # then one token per step
    assert len(shared) == len(separate) == 6
    for got, want in zip(shared, separate):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)

    reference = copy.deepcopy(model).double()
    with torch.no_grad():
        first = torch.stack([reference(input_ids=torch.tensor([p])).logits[0, -1] for p in prompts])
    torch.testing.assert_close(shared[0].double(), first, atol=1e-5, rtol=0)


@pytest.mark.parametrize("prompts", [[[5, 6, 7]] * 3, [[5, 6, 7], [5, 6, 7, 8], [9, 6]]])
def test_prefix_shared_prefill_without_a_shared_prefix(tiny, prompts):
    """One distinct prompt (nothing to share but the prompt), a prompt that is another's prefix
    (each keeps a token of its own), no common prefix at all: same logits as one-by-one."""
    model, tokenizer = tiny
    logits = {}
    for share in (True, False):
        engine = _engine(model, tokenizer, max_new_tokens=1, share_prefixes=share)
        seen: list[torch.Tensor] = []
        engine.logits_processor = _recording(tokenizer, "x", seen)
        engine.release(engine.sample(prompts, range(len(prompts))))
        logits[share] = seen[0]
    torch.testing.assert_close(logits[True], logits[False], atol=1e-5, rtol=0)


def test_prefix_shared_prefill_out_of_blocks_leaves_no_sequence_behind(tiny):
    """A pool too small at any stage (root prefill, fork tails, prompt extension, rollout forks)
    raises KVCacheFull and frees everything the call made."""
    model, tokenizer = tiny
    prompts = [prompt_ids(tokenizer, SYSTEM, q) for q in QUESTIONS for _ in range(2)]
    outcomes = []
    for num_blocks in range(1, 40, 3):
        lm = PagedCausalLM(model, num_blocks=num_blocks, block_size=8)
        engine = RolloutEngine(lm, tokenizer, RolloutConfig(max_new_tokens=1))
        try:
            engine.release(engine.sample(prompts, range(len(prompts))))
            outcomes.append("ok")
        except KVCacheFull:
            outcomes.append("full")
        assert lm.cache.sequences == [] and lm.cache.num_free_blocks == num_blocks
    assert "ok" in outcomes and "full" in outcomes


def test_without_tools_tags_are_plain_text(tiny):
    model, tokenizer = tiny
    engine = _engine(model, tokenizer, max_new_tokens=12, use_tools=False)
    engine.logits_processor = _forcing(tokenizer, "<calc>1+1</calc><answer>2</answer>")
    rollout = engine.sample([prompt_ids(tokenizer, "sys", "q")], [0])[0]
    engine.release([rollout])
    assert tokenizer.decode(rollout.tokens) == "<calc>1+1</c"
    assert rollout.tool_calls == 0 and not any(rollout.is_observation)
    assert rollout.stop == "length"


# ----------------------------------------------------------------------------------------------
# sampling
# ----------------------------------------------------------------------------------------------
def test_sample_categorical_draws_from_the_distribution():
    weights = torch.tensor([0.1, 0.0, 0.4, 0.2, 0.3, 0.0]) * 3.7  # any positive total
    draws = 40000
    tokens = sample_categorical(weights.expand(draws, 6), torch.Generator().manual_seed(0))
    assert tokens.dtype == torch.int64 and tokens.shape == (draws,)
    counts = torch.bincount(tokens, minlength=6).double()
    p = (weights / weights.sum()).double()
    sigma = (draws * p * (1 - p)).sqrt()
    assert counts[1] == 0 and counts[5] == 0  # zero-probability tokens never come up
    assert ((counts - draws * p).abs() <= 5 * sigma + 1e-9).all(), counts


def test_sample_categorical_edges(monkeypatch):
    probs = torch.tensor([[0.0, 0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0]])
    # u = 1 stands for u * total rounding up to the total: still the last possible token
    for u, want in ((0.0, [1, 0]), (0.5, [2, 0]), (0.49, [1, 0]), (1.0, [2, 0])):
        monkeypatch.setattr(
            torch, "rand", lambda shape, u=u, generator=None, **kw: torch.full(shape, u, **kw)
        )
        assert sample_categorical(probs, None).tolist() == want
    monkeypatch.undo()
    for bad in (float("nan"), 0.0):
        rows = probs.clone()
        rows[1] = bad
        with pytest.raises(ValueError, match=r"rows \[1\]"):
            sample_categorical(rows, None)


def test_rollout_bench_runs(tmp_path, monkeypatch):
    """bench/rollout.py end to end on the tiny model: every row, every batch, fixed lengths."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "bench"))
    bench = importlib.import_module("rollout")
    out = tmp_path / "rollout.md"
    bench.main(["--model", "tiny", "--batches", "1", "4", "--new-tokens", "3", "--repeats", "1",
                "--out", str(out)])  # fmt: skip
    rows = [
        line.split(" | ") for line in out.read_text().splitlines() if line[:4] in ("| 1 ", "| 4 ")
    ]
    names = ["generate", "engine", "engine, separate prefills", "tool-loop engine"]
    assert [r[1] for r in rows] == names * 2
    assert [r[5] for r in rows if r[1] != "tool-loop engine"] == ["3"] * 3 + ["12"] * 3


def test_resume_forks_the_shared_prefix_and_equals_a_fresh_prefill(tiny):
    """resume: a prompt that extends part of a cached rollout with new tokens (a tool turn's
    continuation) forks the shared part and feeds the rest; its samples equal those of a fresh
    prefill of the whole prompt with the same generator; budgets are per rollout; with one
    generator each, a rollout's samples do not depend on its batch."""
    model, tokenizer = tiny
    engine = _engine(model, tokenizer)
    prompt = prompt_ids(tokenizer, "Be brief.", "What is 2+2?")
    parents = engine.sample([prompt] * 2, [0, 0], torch.Generator().manual_seed(3))
    extra = tokenizer.encode("<out>4</out>\n", add_special_tokens=False)
    keep = len(parents[0].tokens) // 2
    prompts = [prompt + parents[0].tokens[:keep] + extra, prompt + parents[1].tokens]
    streams = [torch.Generator().manual_seed(11), torch.Generator().manual_seed(12)]
    resumed = engine.resume(parents, prompts, streams, max_new_tokens=[5, 0])
    assert resumed[0].reused_prefix == len(prompt) + keep  # the cached part, nothing after
    assert resumed[0].prompt == prompts[0] and 0 < resumed[0].generated <= 5
    assert resumed[1].tokens == [] and resumed[1].stop == "length" and resumed[1].sid is None
    engine.release(parents + resumed)
    assert engine.lm.cache.num_free_blocks == 64

    fresh_engine = _engine(model, tokenizer, max_new_tokens=5)
    alone = fresh_engine.sample([prompts[0]], [0], [torch.Generator().manual_seed(11)])[0]
    together = fresh_engine.sample(
        [prompts[0], prompt], [0, 0], [torch.Generator().manual_seed(11), streams[1]]
    )[0]
    fresh_engine.release([alone, together])
    assert resumed[0].tokens == alone.tokens == together.tokens
    torch.testing.assert_close(
        torch.tensor(resumed[0].behavior_logprob),
        torch.tensor(alone.behavior_logprob),
        atol=1e-4,
        rtol=1e-4,
    )
    with pytest.raises(ValueError, match="generator"):
        engine.sample([prompt] * 2, [0, 0], [torch.Generator()])
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.resume(parents[:1], prompts[:1], max_new_tokens=[1, 2])
    with pytest.raises(ValueError, match="cache sequence"):
        engine.resume(parents[:1], prompts[:1])  # released
