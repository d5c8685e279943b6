"""The rollout engine on a tiny random Llama with a character tokenizer (no downloads):
cache-forked branches reproduce re-prefilled generation, and tool output never reaches the loss
mask or the branch candidates."""

import pytest
import torch

from appo.model import prompt_ids, tiny_model
from appo.rollout import IGNORE_INDEX, RolloutBatch, RolloutConfig, RolloutEngine
from appo.tasks import Task, reward
from appo.trainer import TrainConfig, Trainer
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

    candidates = trainer.branch_candidates(batch, [rollout, short])
    whitespace = torch.tensor([not tokenizer.decode([t]).strip() for t in rollout.tokens])
    assert torch.equal(candidates[0, :n], ~obs & ~whitespace)
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
