"""The trainer on tiny random models (CPU): training steps of each algorithm, mini-batch PPO
against a float64 loop reference, the behaviour policy's Ω signal, and token statistics from
hidden states."""

import copy
import math

import pytest
import torch
from test_appo_loss import reference_loss, reference_scale

from appo.config import ALGOS, TrainConfig
from appo.model import char_tokenizer, prompt_ids, tiny_model
from appo.rollout import Rollout, RolloutBatch
from appo.sampler import SamplerPolicy
from appo.tasks import make_tasks
from appo.trainer import Trainer, check_policy_model, policy_token_stats, split_evenly
from appo_kernels import token_stats


def _text_reward(task, text):
    """A reward that varies across random rollouts of equal length too."""
    return float(sum(map(ord, text)) % 5)


FORCED_CALL = "<calc>2</calc>"  # every rollout opens with this call; the rest is sampled


def force_first_call(tokenizer):
    """A logits processor that makes each rollout write ``FORCED_CALL`` first (character
    tokenizer: one token per character), so that every rollout has a tool result to branch
    after."""
    forced = tokenizer.encode(FORCED_CALL, add_special_tokens=False)

    def processor(logits, rollouts):
        for row, rollout in enumerate(rollouts):
            if rollout.tool_calls == 0 and len(rollout.tokens) < len(forced):
                logits[row] = float("-inf")
                logits[row, forced[len(rollout.tokens)]] = 0.0
        return logits

    return processor


@pytest.mark.parametrize("algo", ALGOS)
def test_training_steps_update_the_policy(algo):
    model, tokenizer = tiny_model(seed=1)
    config = TrainConfig(
        algo=algo,
        prompts_per_step=2,
        n=3,
        b=2,
        max_new_tokens=24,
        lr=1e-3,
        weight_decay=0.0,
        seed=3,
    )
    trainer = Trainer(
        model, tokenizer, config, reward_fn=_text_reward, max_concurrent=4, track_kl=True
    )
    trainer.engine.logits_processor = force_first_call(tokenizer)
    before = [p.detach().clone() for p in model.parameters()]
    tasks = make_tasks(0, 4)
    updated, kl = 0, []
    for step in range(2):
        metrics, record = trainer.step(tasks[2 * step : 2 * step + 2])
        assert math.isfinite(metrics["loss"]) and math.isfinite(metrics["entropy"])
        updated += metrics["updated"]
        kl.append(metrics["kl_to_start"])
        initial = [r for r in record.rollouts if not r.is_branch]
        assert len(initial) == 2 * (config.n + config.b if algo == "grpo" else config.n)
        assert all(r.tool_calls >= 1 for r in initial)
        if algo == "grpo":
            assert metrics["branches"] == 0
            continue
        assert metrics["branches"] == 2 * config.b
        assert metrics["fork_reused_tokens"] > 0
        branches = [r for r in record.rollouts if r.is_branch]
        assert all(record.rollouts[r.parent].group == r.group for r in branches)
        assert all(r.point > 0 for r in branches)  # never the response's first token
        if algo == "arpo":  # the first non-blank sampled token after the call's result
            for r in branches:
                parent, before_point = record.rollouts[r.parent], r.point - 1
                while not parent.is_observation[before_point]:
                    assert not tokenizer.decode([parent.tokens[before_point]]).strip()
                    before_point -= 1
                assert not parent.is_observation[r.point]
    assert trainer.lm.cache.num_free_blocks == trainer.lm.cache.num_blocks  # everything released
    assert updated > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert kl[0] == pytest.approx(0.0, abs=1e-6) and kl[1] > 0  # the policy moved from its start


def test_split_evenly():
    assert split_evenly(list(range(7)), 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert split_evenly([0, 1], 4) == [[0], [1]]
    assert split_evenly([], 2) == []


def _response_logprob64(model, batch):
    logits = batch.response_logits(model).double()
    logp = torch.log_softmax(logits, dim=-1)
    return logp.gather(-1, batch.tokens.clamp_min(0)[..., None]).squeeze(-1)


def test_minibatch_ppo_matches_float64_loop_reference():
    """``ppo_update`` (3 mini-batches, π_old recomputed before the update) against a float64 copy
    of the model trained by a loop over the same mini-batches with the token-by-token reference
    loss (SGD, so every parameter difference is the gradient's, not Adam's normalisation)."""
    model, tokenizer = tiny_model(seed=4)
    config = TrainConfig(
        n=3, b=1, ppo_minibatches=3, max_new_tokens=10, grad_clip=0.5, sampler_dtype="float32"
    )
    trainer = Trainer(model, tokenizer, config, max_concurrent=4)
    reference = copy.deepcopy(model).double()
    lr = 3.0
    trainer.optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    prompts = trainer.prompts(make_tasks(0, 2))
    rollouts = trainer.engine.sample(
        [p for p in prompts for _ in range(3)], [0, 0, 0, 1, 1, 1], trainer.generator
    )
    trainer.engine.release(rollouts)
    advantages = trainer.advantages(rollouts, [1.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    old = trainer.score(rollouts).logprob
    metrics = trainer.ppo_update(rollouts, advantages, old)
    assert metrics["updated"] == 3

    optimizer = torch.optim.SGD(reference.parameters(), lr=lr)
    old64 = _response_logprob64(reference, trainer.batch(rollouts)).detach()
    losses, drift = [], 0.0
    for chunk in ([0, 1], [2, 3], [4, 5]):
        batch = trainer.batch([rollouts[i] for i in chunk])
        length = batch.tokens.shape[1]
        logprob = _response_logprob64(reference, batch)
        adv, old_chunk = advantages[chunk, :length].double(), old64[chunk, :length]
        mask = batch.policy_mask
        scaled = reference_scale(adv, logprob.detach(), old_chunk, mask)
        loss, _, _ = reference_loss(
            logprob, old_chunk, scaled, mask, kl_coef=0.0, max_dual_clipped_per_row=1
        )
        drift = max(drift, float((logprob.detach() - old_chunk)[mask].abs().max()))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), config.grad_clip)
        optimizer.step()
        losses.append(float(loss.detach()))
    assert drift > 0.05  # later mini-batches see a policy that has moved: the ratio is not 1
    assert metrics["loss"] == pytest.approx(sum(losses) / 3, rel=1e-4, abs=1e-6)
    for got, want in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "dtype, lag",
    [("float32", 0), ("bfloat16", 0), ("bfloat16-weights", 0), ("float32", 1)],
)
def test_behaviour_policy_precision_or_lag_gives_omega_signal(dtype, lag):
    """Ω compares the trainer's log-probs with the sampler's: 1 everywhere when they share fp32
    weights; not 1 with bf16 (or bf16-rounded) sampler weights, or from the second step on with a
    sampler one update behind."""
    model, tokenizer = tiny_model(seed=1)
    config = TrainConfig(
        n=3, b=1, max_new_tokens=12, lr=1e-2, sampler_dtype=dtype, sampler_lag=lag, seed=3
    )
    trainer = Trainer(model, tokenizer, config, reward_fn=_text_reward, max_concurrent=4)
    tasks = make_tasks(0, 4)
    signal = []
    for step in range(2):
        metrics, record = trainer.step(tasks[2 * step : 2 * step + 2])
        assert metrics["updated"] > 0
        initial = [r for r in record.rollouts if not r.is_branch]
        mask = RolloutBatch.from_rollouts(initial, trainer.pad_id, "cpu").policy_mask
        omega = record.future_value[mask]
        signal.append(metrics["logratio_abs_mean"])
        assert (omega != 1).any() == (signal[-1] > 0)
    expected = {
        ("float32", 0): [False, False],
        ("bfloat16", 0): [True, True],
        ("bfloat16-weights", 0): [True, True],
        ("float32", 1): [False, True],
    }[(dtype, lag)]
    assert [value > 1e-4 for value in signal] == expected, signal
    if not any(expected):
        assert max(signal) < 1e-6


def test_sampler_policy_casts_parameters_and_lags_by_versions():
    model, _ = tiny_model(seed=0)
    assert SamplerPolicy(model, torch.float32, 0).model is model
    sampler = SamplerPolicy(model, torch.bfloat16, 2)
    assert all(p.dtype == torch.bfloat16 for p in sampler.model.parameters())
    assert all(b.dtype == torch.float32 for b in sampler.model.buffers())  # rotary frequencies
    head = model.get_output_embeddings().weight
    seen = []
    for version in range(5):  # step s samples with version max(s - 2, 0)
        with torch.no_grad():
            head.fill_(version)
        sampler.use_behaviour()
        seen.append(float(sampler.model.get_output_embeddings().weight[0, 0]))
        sampler.before_update()
    assert seen == [0.0, 0.0, 0.0, 1.0, 2.0]
    sampler.use_current()
    assert float(sampler.model.get_output_embeddings().weight[0, 0]) == 4.0


def test_bf16_weight_rounding_keeps_float32_compute_and_evaluates_unrounded():
    model, _ = tiny_model(seed=0)
    sampler = SamplerPolicy(model, torch.float32, 0, rounding=torch.bfloat16)
    assert sampler.model is not model
    assert all(p.dtype == torch.float32 for p in sampler.model.parameters())
    sampler.use_behaviour()
    for behaviour, policy in zip(sampler.model.parameters(), model.parameters()):
        assert torch.equal(behaviour, policy.to(torch.bfloat16).float())
    assert any(
        not torch.equal(b, p) for b, p in zip(sampler.model.parameters(), model.parameters())
    )
    sampler.use_current()
    assert all(torch.equal(b, p) for b, p in zip(sampler.model.parameters(), model.parameters()))


def _qwen2_tiny():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = char_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).eval(), tokenizer


def _gemma2_tiny(softcap=1.0):
    """A tiny Gemma 2 whose model soft-caps its logits (cap 1.0: a real cap, logits in [-1, 1])."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    tokenizer = char_tokenizer()
    config = Gemma2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        layer_types=["full_attention"] * 2,
        final_logit_softcapping=softcap,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.5,
    )
    torch.manual_seed(0)
    return Gemma2ForCausalLM(config).eval(), tokenizer


FAMILIES = {
    "llama-tied-head": lambda: tiny_model(seed=3),
    "qwen2-untied-head": _qwen2_tiny,
    "gemma2-soft-capped-head": _gemma2_tiny,
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_policy_token_stats_from_hidden_states_match_full_logits(family):
    model, tokenizer = FAMILIES[family]()
    check_policy_model(model)
    rollouts = []
    for i, text in enumerate(["<calc>1+2</calc>", "ab", "<answer>3</answer> and more"]):
        rollout = Rollout(group=0, prompt=prompt_ids(tokenizer, "sys", "q" * (i + 1)))
        rollout.append(tokenizer.encode(text, add_special_tokens=False), observation=i == 0)
        rollout.append(tokenizer.encode("x y", add_special_tokens=False), observation=False)
        rollouts.append(rollout)
    batch = RolloutBatch.from_rollouts(rollouts, tokenizer.pad_token_id, "cpu")
    weights = torch.randn(2, *batch.tokens.shape, generator=torch.Generator().manual_seed(0))

    def loss_and_grads(stats):
        mask = batch.policy_mask
        loss = (torch.where(mask, stats.logprob * weights[0] + stats.entropy * weights[1], 0)).sum()
        grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
        return stats, grads

    head = model.get_output_embeddings()
    refuse = head.register_forward_hook(lambda *args: pytest.fail("the LM head module ran"))
    got, got_grads = loss_and_grads(policy_token_stats(model, batch))
    refuse.remove()
    logits = batch.response_logits(model)
    if family.startswith("gemma2"):
        assert logits.abs().max() <= 1.0  # the model caps its own logits
    want, want_grads = loss_and_grads(token_stats(logits, batch.tokens))
    mask = batch.policy_mask
    torch.testing.assert_close(got.logprob[mask], want.logprob[mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.entropy[mask], want.entropy[mask], rtol=1e-5, atol=1e-5)
    for a, b in zip(got_grads, want_grads):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "key, value", [("logit_scale", 0.0625), ("logits_scaling", 4.0), ("logit_softcapping", 1.0)]
)
def test_check_policy_model_refuses_logit_transforms_it_does_not_apply(key, value):
    model, _ = tiny_model(seed=0)
    setattr(model.config, key, value)
    with pytest.raises(ValueError, match=f"{key}={value!r}"):
        check_policy_model(model)
    setattr(model.config, key, 1.0 if key != "logit_softcapping" else None)  # the identity
    check_policy_model(model)


def test_cold_start_refuses_no_tasks_and_bad_step_counts():
    model, tokenizer = tiny_model(seed=0)
    trainer = Trainer(model, tokenizer, TrainConfig(max_new_tokens=4), max_concurrent=2)
    with pytest.raises(ValueError, match="tasks"):
        trainer.cold_start([], 3)
    with pytest.raises(ValueError, match="steps"):
        trainer.cold_start(make_tasks(0, 2), -1)
    assert trainer.cold_start([], 0) == []


def test_trained_branches_get_their_own_pi_old():
    """With ``train_branches`` the branch rows join the update; their π_old comes from a pass of
    their own, aligned with the initial rows' (the same weights score both)."""
    model, tokenizer = tiny_model(seed=5)
    config = TrainConfig(n=3, b=2, max_new_tokens=10, train_branches=True, lr=1e-3, seed=1)
    trainer = Trainer(model, tokenizer, config, reward_fn=_text_reward, max_concurrent=4)
    rollouts = trainer.engine.sample(
        [trainer.prompts(make_tasks(0, 1))[0]] * 3, [0, 0, 0], trainer.generator
    )
    scored = trainer.score(rollouts)
    branches = trainer.engine.branch(rollouts, [(0, 2), (1, 3)], trainer.generator)
    trainer.engine.release(rollouts + branches)
    old = trainer.old_logprob(scored, branches)
    alone = trainer.score(rollouts + branches).logprob
    mask = trainer.batch(rollouts + branches).policy_mask
    assert old.shape == alone.shape
    torch.testing.assert_close(old[mask], alone[mask], rtol=1e-5, atol=1e-5)
    metrics, record = trainer.step(make_tasks(1, 2))
    assert metrics["branches"] == 4 and metrics["updated"] > 0
