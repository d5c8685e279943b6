"""appo.integrations.verl against the real verl 0.9.1 (no mocks).

verl pins transformers < 5.11, so it lives in its own environment: .ci/run builds it and runs this
file there with APPO_REQUIRE_VERL=1, which turns the skip below into a failure.
"""

import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

try:
    import verl  # noqa: F401
except ImportError:
    if os.environ.get("APPO_REQUIRE_VERL") == "1":
        raise
    pytest.skip(
        "verl is not installed in this environment (it pins transformers < 5.11); .ci/run runs "
        "this file in its own verl environment",
        allow_module_level=True,
    )

from reference import branching_score_ref
from tensordict import TensorDict
from test_appo_advantages import random_tree, reference_advantages
from transformers import LlamaConfig, LlamaForCausalLM
from verl import DataProto
from verl.trainer.config import AlgoConfig
from verl.trainer.ppo import core_algos
from verl.trainer.ppo.ray_trainer import compute_advantage
from verl.utils import tensordict_utils as tu
from verl.workers.config import FSDPActorConfig, FSDPEngineConfig

from appo.integrations import verl as appo_verl
from appo.loss import future_likelihood_scale, policy_loss

ROOT = Path(__file__).resolve().parents[1]


def test_import_verl_alone_registers_appo():
    """A fresh interpreter that only imports verl finds APPO in both registries (entry point)."""
    code = (
        "import sys, verl\n"
        "from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY, POLICY_LOSS_REGISTRY\n"
        "from verl.workers.engine.fsdp import transformer_impl\n"
        "print(POLICY_LOSS_REGISTRY['appo'].__module__, POLICY_LOSS_REGISTRY['appo_dual_clip']"
        ".__name__, ADV_ESTIMATOR_REGISTRY['appo'].__name__, "
        "transformer_impl.logprobs_from_logits.__module__)\n"
    )
    # APPO_VERL_KERNELS=1: the kernels are on in a process that never called use_kernels
    env = {**os.environ, "VERL_USE_EXTERNAL_PLUGINS": "auto", "APPO_VERL_KERNELS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd="/"
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [
        "appo.integrations.verl",
        "appo_dual_clip_loss",
        "appo_advantage",
        "appo.integrations.verl",
    ]


def test_register_is_idempotent():
    appo_verl.register()
    appo_verl.register()
    assert core_algos.get_policy_loss_fn("appo") is appo_verl.appo_policy_loss
    assert core_algos.get_adv_estimator_fn("appo") is appo_verl.appo_advantage


# ---------------------------------------------------------------------------------------------
# policy losses


def actor_config(**policy_loss):
    return FSDPActorConfig(
        strategy="fsdp",
        rollout_n=1,
        ppo_micro_batch_size_per_gpu=1,
        clip_ratio_low=0.2,
        clip_ratio_high=0.28,
        clip_ratio_c=3.0,
        policy_loss=appo_verl.APPOPolicyLossConfig(**policy_loss),
    )


def random_batch(gen, rows=6, length=20):
    old = -torch.rand(rows, length, generator=gen, dtype=torch.float64).float() * 3
    logprob = (old + 0.4 * torch.randn(rows, length, generator=gen)).requires_grad_()
    advantages = torch.randn(rows, length, generator=gen)
    mask = torch.rand(rows, length, generator=gen) < 0.8
    mask[0] = False  # a row with no response token
    return old, logprob, advantages, mask


def loss_on_ranks(loss_fn, config, old, logprob, advantages, mask, dp_size, mode="token-mean"):
    """Each data-parallel rank's loss on its shard, verl-style (global token / sequence counts)."""
    losses = []
    for shard in torch.arange(old.shape[0]).chunk(dp_size):
        config.global_batch_info.update(
            dp_size=dp_size,
            batch_num_tokens=int(mask.sum()),
            global_batch_size=int(mask.any(dim=1).sum()),
        )
        loss, _ = loss_fn(
            old[shard], logprob[shard], advantages[shard], mask[shard], mode, config, None
        )
        losses.append(loss)
    return losses


@pytest.mark.parametrize("dp_size", [1, 2])
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "token-sum"])
def test_dual_clip_and_unscaled_appo_equal_verl_vanilla(dp_size, mode, gen):
    old, logprob, advantages, mask = random_batch(gen)
    vanilla = core_algos.get_policy_loss_fn("vanilla")
    for name, options in (("appo_dual_clip", {}), ("appo", {"scale_bonus": 0.0})):
        ours = core_algos.get_policy_loss_fn(name)
        config = actor_config(**options)
        got = loss_on_ranks(ours, config, old, logprob, advantages, mask, dp_size, mode)
        want = loss_on_ranks(vanilla, config, old, logprob, advantages, mask, dp_size, mode)
        for g, w in zip(got, want):
            assert torch.equal(g, w), (name, g, w)
            (grad_g,) = torch.autograd.grad(g, logprob, retain_graph=True)
            (grad_w,) = torch.autograd.grad(w, logprob, retain_graph=True)
            assert torch.equal(grad_g, grad_w)


@pytest.mark.parametrize("dp_size", [1, 2])
def test_appo_loss_equals_the_projects_functions(dp_size, gen):
    """'appo' with scaling, summed over ranks as DDP does, = appo.loss on the whole batch."""
    old, logprob, advantages, mask = random_batch(gen)
    options = {"scale_half_life": 4.0, "scale_clip_high_only": False, "scale_bonus": 0.5}
    config = actor_config(**options)
    ranks = loss_on_ranks(
        appo_verl.appo_policy_loss, config, old, logprob, advantages, mask, dp_size
    )
    got = torch.stack(ranks).mean()  # DDP averages the ranks' gradients
    scaled = future_likelihood_scale(
        advantages, logprob, old, mask, half_life=4.0, clip_high_only=False, bonus=0.5
    )
    want, _ = policy_loss(logprob, old, scaled, mask, clip_low=0.2, clip_high=0.28, kl_coef=0.0)
    assert abs(scaled[mask] - advantages[mask]).max() > 0.1  # the scaling did something
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    (grad_got,) = torch.autograd.grad(got, logprob)
    (grad_want,) = torch.autograd.grad(want, logprob)
    torch.testing.assert_close(grad_got, grad_want, rtol=1e-6, atol=1e-8)


def test_the_recipe_overrides_reach_the_loss():
    """The overrides of examples/verl/overrides.txt, composed with verl's own ppo_trainer config and
    instantiated as verl's workers do, select the APPO loss, estimator and scaling options."""
    from hydra import compose, initialize_config_module
    from verl.utils.config import omega_conf_to_dataclass

    lines = (ROOT / "examples/verl/overrides.txt").read_text().splitlines()
    overrides = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    # sizes that run_appo.sh sets next to the APPO overrides
    overrides += [
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
        "actor_rollout_ref.rollout.n=4",
    ]
    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        config = compose(config_name="ppo_trainer", overrides=overrides)
    actor = omega_conf_to_dataclass(config.actor_rollout_ref.actor)
    assert isinstance(actor.policy_loss, appo_verl.APPOPolicyLossConfig)
    loss_fn = core_algos.get_policy_loss_fn(actor.policy_loss.loss_mode)
    assert loss_fn is appo_verl.appo_policy_loss
    assert core_algos.get_adv_estimator_fn(config.algorithm.adv_estimator) is (
        appo_verl.appo_advantage
    )
    assert (actor.clip_ratio_low, actor.clip_ratio_high, actor.clip_ratio_c) == (0.2, 0.28, 3.0)
    assert actor.policy_loss.scale_half_life == 64.0 and actor.policy_loss.scale_c == 3.0


# ---------------------------------------------------------------------------------------------
# advantage estimator through verl's compute_advantage


def tree_batch(args):
    """A verl DataProto for a rollout tree of test_appo_advantages.random_tree, uids encoded as
    select_branches writes them; the reward sits on each row's last response token."""
    rewards, group_ids, is_branch, parent, split, mask = args
    mask = torch.tensor(mask, dtype=torch.float32)
    mask[:, 0] = 1  # every row has a response token to carry its reward
    scores = torch.zeros_like(mask)
    last = torch.arange(mask.shape[1]) * mask
    scores[torch.arange(len(rewards)), last.argmax(dim=1)] = torch.tensor(rewards)
    uid = [
        f"prompt{g}#appo:{p}:{s}" if b else f"prompt{g}#appo:{row}"
        for row, (g, b, p, s) in enumerate(zip(group_ids, is_branch, parent, split))
    ]
    batch = DataProto.from_dict(
        tensors={"token_level_rewards": scores, "response_mask": mask},
        non_tensors={"uid": np.array(uid, dtype=object)},
    )
    return batch, [rewards, group_ids, is_branch, parent, split, mask.tolist()]


@pytest.mark.parametrize("seed", range(3))
def test_advantage_estimator_with_branch_rows(seed):
    args = random_tree(random.Random(seed))
    batch, args = tree_batch(args)
    assert any(args[2]), "the tree has branch rows"
    out = compute_advantage(batch, adv_estimator="appo", config=AlgoConfig())
    want = reference_advantages(*args)
    torch.testing.assert_close(out.batch["advantages"].double(), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(out.batch["returns"], out.batch["advantages"])
    # rows reordered (verl balances batches): each row keeps its advantage
    order = torch.randperm(len(batch), generator=torch.Generator().manual_seed(seed))
    shuffled = compute_advantage(
        batch.select_idxs(order), adv_estimator="appo", config=AlgoConfig()
    )
    torch.testing.assert_close(shuffled.batch["advantages"], out.batch["advantages"][order])
    assert (appo_verl.is_branch_row(batch.non_tensor_batch["uid"]) == np.array(args[2])).all()


def test_advantage_estimator_without_branch_rows(gen):
    rows, length = 9, 7
    rewards = torch.randint(0, 3, (rows,), generator=gen).float()
    mask = (torch.rand(rows, length, generator=gen) < 0.8).float()
    scores = torch.zeros(rows, length)
    scores[:, -1] = rewards
    groups = [0, 1, 0, 2, 1, 0, 1, 2, 2]
    batch = DataProto.from_dict(
        tensors={"token_level_rewards": scores, "response_mask": mask},
        non_tensors={"uid": np.array([f"u{g}" for g in groups], dtype=object)},
    )
    out = compute_advantage(batch, adv_estimator="appo", config=AlgoConfig())
    want = reference_advantages(
        rewards.tolist(), groups, [False] * rows, [-1] * rows, [0] * rows, mask.tolist()
    )
    torch.testing.assert_close(out.batch["advantages"].double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "uids, match",
    [
        (["a#appo:0", "a#appo:1:x"], "index\\[1\\]"),
        (["a#appo:0", "a#appo:3:2"], "initial rollout 3"),
        (["a#appo:0", "a#appo:0"], "appears twice"),
    ],
)
def test_advantage_estimator_bad_uids(uids, match):
    batch = DataProto.from_dict(
        tensors={"token_level_rewards": torch.ones(2, 3), "response_mask": torch.ones(2, 3)},
        non_tensors={"uid": np.array(uids, dtype=object)},
    )
    with pytest.raises(ValueError, match=match):
        compute_advantage(batch, adv_estimator="appo", config=AlgoConfig())


# ---------------------------------------------------------------------------------------------
# use_kernels through verl's FSDP engine code (prepare_model_inputs -> model ->
# prepare_model_outputs; FSDP wrapping and device placement need CUDA)


class TinyLlama(LlamaForCausalLM):
    """Its own class: verl's fused-kernel patch replaces the model class's forward."""


def tiny_model(seed=0):
    config = LlamaConfig(
        vocab_size=211,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    return TinyLlama(config).float()


def engine_stats(model, fused: bool, seed=1):
    """(log_probs, entropy, grads) of verl's engine on a packed micro-batch of 3 sequences."""
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    gen = torch.Generator().manual_seed(seed)
    lengths = [7, 4, 9]
    ids = [torch.randint(0, model.config.vocab_size, (n,), generator=gen) for n in lengths]
    micro_batch = TensorDict(
        {
            "input_ids": torch.nested.nested_tensor(ids, layout=torch.jagged),
            "position_ids": torch.nested.nested_tensor(
                [torch.arange(n) for n in lengths], layout=torch.jagged
            ),
        },
        batch_size=len(lengths),
    )
    tu.assign_non_tensor(
        micro_batch, temperature=0.7, calculate_entropy=True, use_fused_kernels=fused
    )
    engine = object.__new__(FSDPEngineWithLMHead)
    engine.module = model
    engine.engine_config = FSDPEngineConfig(use_torch_compile=False)
    engine.pad_to_length, engine.use_ulysses_sp = False, False
    # what FSDPEngine.__init__ binds (verl_F.entropy_from_logits, read when the engine is built)
    import verl.utils.torch_functional as verl_F

    engine.compute_entropy_from_logits = verl_F.entropy_from_logits
    inputs, output_args = engine.prepare_model_inputs(micro_batch)
    output = engine.prepare_model_outputs(
        model(**inputs, use_cache=False), output_args, micro_batch, None
    )
    log_probs, entropy = output["log_probs"].values(), output["entropy"].values()
    weights = torch.randn(log_probs.shape[0], generator=gen)
    loss = (log_probs * weights).sum() + (entropy * weights.flip(0)).sum()
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return log_probs.detach(), entropy.detach(), grads


def assert_same_stats(got, want):
    torch.testing.assert_close(got[0], want[0].float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want[1].float(), rtol=1e-5, atol=1e-5)
    for g, w in zip(got[2], want[2]):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_use_kernels_plain_path_matches_verl():
    import verl.utils.torch_functional as verl_F
    from verl.workers.engine.fsdp import transformer_impl

    original = (verl_F.logprobs_from_logits, verl_F.entropy_from_logits)
    model = tiny_model()
    want = engine_stats(model, fused=False)
    with appo_verl.use_kernels():
        assert transformer_impl.logprobs_from_logits is appo_verl.logprobs_from_logits
        assert verl_F.entropy_from_logits is appo_verl.entropy_from_logits
        with appo_verl.use_kernels():  # nested: still swapped after the inner block
            pass
        assert verl_F.logprobs_from_logits is appo_verl.logprobs_from_logits
        got = engine_stats(model, fused=False)
    assert (verl_F.logprobs_from_logits, verl_F.entropy_from_logits) == original
    assert transformer_impl.logprobs_from_logits is original[0]
    assert want[1].abs().min() > 0.1  # entropies are real, not zeros
    assert_same_stats(got, want)


def test_use_kernels_fused_path_matches_verl():
    """use_fused_kernels=True: verl's FusedLinearForPPO (torch backend) against
    linear_token_stats, and the triton backend's entry point on linear_token_stats too."""
    import verl.utils.experimental.torch_functional as fused
    import verl.utils.kernel.linear_cross_entropy as lce
    from verl.models.transformers.monkey_patch import patch_forward_with_backends

    model = tiny_model()
    plain = engine_stats(model, fused=False)
    patch_forward_with_backends(model, use_fused_kernels=True, fused_kernels_backend="torch")
    want = engine_stats(model, fused=True)
    assert_same_stats(want, plain)  # verl's own fused path agrees with its plain path
    original = (fused.FusedLinearForPPO, lce.linear_cross_entropy)
    with appo_verl.use_kernels():
        assert fused.FusedLinearForPPO is appo_verl.FusedLinearForPPO
        got = engine_stats(model, fused=True)
        patch_forward_with_backends(model, use_fused_kernels=True, fused_kernels_backend="triton")
        assert lce.linear_cross_entropy is not original[1]
        got_triton_entry = engine_stats(model, fused=True)
    assert (fused.FusedLinearForPPO, lce.linear_cross_entropy) == original
    assert_same_stats(got, want)
    assert_same_stats(got_triton_entry, want)


# ---------------------------------------------------------------------------------------------
# select_branches on a multi-turn batch


def multi_turn_batch(gen, groups=2, per_group=3, prompt_width=5, length=16, tool=(6, 9)):
    """Initial rollouts laid out as verl's agent loop records them: response = model tokens, a
    tool output at positions [6, 9) (response_mask 0, rollout log-prob 0), more model tokens,
    right padding. Prompts are left-padded."""
    rows = groups * per_group
    vocab = 50
    responses = torch.randint(3, vocab, (rows, length), generator=gen)
    response_mask = torch.ones(rows, length, dtype=torch.int64)
    response_mask[:, tool[0] : tool[1]] = 0
    ends = torch.randint(tool[1] + 2, length + 1, (rows,), generator=gen)
    for row, end in enumerate(ends.tolist()):
        response_mask[row, end:] = 0
        responses[row, end:] = 0
    prompt_lengths = torch.randint(2, prompt_width + 1, (rows,), generator=gen)
    prompts = torch.randint(3, vocab, (rows, prompt_width), generator=gen)
    prompt_mask = torch.arange(prompt_width) >= (prompt_width - prompt_lengths)[:, None]
    prompts[~prompt_mask] = 0
    rollout_log_probs = torch.where(
        response_mask.bool(), -torch.rand(rows, length, generator=gen) * 2, 0.0
    )
    old_log_probs = rollout_log_probs + 0.3 * torch.randn(rows, length, generator=gen)
    entropy = torch.rand(rows, length, generator=gen) * 2
    batch = DataProto.from_dict(
        tensors={
            "prompts": prompts,
            "responses": responses,
            "attention_mask": torch.cat([prompt_mask.long(), response_mask.bool().long()], dim=1),
            "response_mask": response_mask,
            "rollout_log_probs": rollout_log_probs,
            "old_log_probs": old_log_probs,
            "entropy": entropy,
        },
        non_tensors={"uid": np.array([f"p{r // per_group}" for r in range(rows)], dtype=object)},
    )
    return batch


@pytest.mark.parametrize("keep_selected_token", [False, True])
def test_select_branches_multi_turn(keep_selected_token, gen):
    batch = multi_turn_batch(gen)
    b = batch.batch
    branches = appo_verl.select_branches(
        batch, 3, keep_selected_token=keep_selected_token, exclude_token_ids=[3, 4]
    )
    assert len(branches.parent) == 2 * 3
    score, _, z_h, z_f = branching_score_ref(
        b["entropy"], b["old_log_probs"], b["rollout_log_probs"], b["response_mask"], 1.0, 0.2
    )
    generated = b["response_mask"].bool()
    last = torch.where(generated, torch.arange(generated.shape[1]), -1).amax(dim=1)
    after_tool = 0
    for i, (row, pos, cut) in enumerate(
        zip(branches.parent.tolist(), branches.position.tolist(), branches.split.tolist())
    ):
        assert generated[row, pos] and int(b["responses"][row, pos]) not in (3, 4)
        assert cut == pos + int(keep_selected_token)
        assert not (keep_selected_token and pos == last[row])
        assert abs(float(branches.score[i]) - float(score[row, pos])) < 1e-4
        # the prefix: unpadded prompt + response[:split], tool tokens included and aligned
        prompt = b["prompts"][row][b["attention_mask"][row, : b["prompts"].shape[1]].bool()]
        assert branches.prefix_ids[i] == prompt.tolist() + b["responses"][row, :cut].tolist()
        assert torch.equal(branches.prefix_response_mask[i], b["response_mask"][row, :cut])
        assert torch.equal(branches.prefix_rollout_log_probs[i], b["rollout_log_probs"][row, :cut])
        after_tool += cut > 9
        assert branches.uid[i] == f"p{row // 3}#appo:{row}:{cut}"
    assert after_tool > 0, "some branch points lie after the tool call"
    # each group's best point is its top preferred candidate under the float64 reference
    preferred = (z_h > 0) & (z_f > 0) & generated
    for g in range(2):
        rows = slice(3 * g, 3 * g + 3)
        candidates = preferred[rows] & ~torch.isin(b["responses"][rows], torch.tensor([3, 4]))
        if keep_selected_token:
            candidates[torch.arange(3), last[rows]] = False
        best = torch.where(candidates, score[rows], -torch.inf).max()
        assert abs(float(branches.score[3 * g]) - float(best)) < 1e-4
    assert list(branches.batch_uid) == [f"p{r // 3}#appo:{r}" for r in range(6)]


def test_select_branches_then_compute_advantage(gen):
    """Branch rows built from the prefixes, concatenated with the initial rows: verl's
    compute_advantage credits each branch to its parent's prefix."""
    batch = multi_turn_batch(gen)
    branches = appo_verl.select_branches(batch, 2)
    length = batch.batch["responses"].shape[1]
    rows = len(batch) + len(branches.parent)
    mask = torch.zeros(rows, length)
    mask[: len(batch)] = batch.batch["response_mask"].float()
    for i, prefix in enumerate(branches.prefix_response_mask):
        mask[len(batch) + i, : len(prefix)] = prefix.float()
        mask[len(batch) + i, len(prefix) :] = 1  # the continuation
    rewards = torch.rand(rows, generator=gen).round()
    scores = torch.zeros(rows, length)
    scores[:, -1] = rewards
    uids = np.concatenate([branches.batch_uid, branches.uid])
    data = DataProto.from_dict(
        tensors={"token_level_rewards": scores, "response_mask": mask},
        non_tensors={"uid": uids},
    )
    out = compute_advantage(data, adv_estimator="appo", config=AlgoConfig())
    is_branch = [False] * len(batch) + [True] * len(branches.parent)
    parent = [-1] * len(batch) + branches.parent.tolist()
    split = [0] * len(batch) + branches.split.tolist()
    groups = [r // 3 for r in range(len(batch))] + [p // 3 for p in branches.parent.tolist()]
    want = reference_advantages(rewards.tolist(), groups, is_branch, parent, split, mask.tolist())
    torch.testing.assert_close(out.batch["advantages"].double(), want, rtol=1e-5, atol=1e-5)


def test_select_branches_bad_input(gen):
    batch = multi_turn_batch(gen)
    with pytest.raises(ValueError, match="budget"):
        appo_verl.select_branches(batch, 0)
    with pytest.raises(ValueError, match="calculate_log_probs"):
        appo_verl.select_branches(batch, 2, rollout_log_prob_key="missing")


# ---------------------------------------------------------------------------------------------
# careless and hostile input (issue 18): each argument checked by name before use


def _with(batch, **tensors):
    """A copy of ``batch`` with some tensors replaced (widths may differ from the others')."""
    out = DataProto.from_dict(
        tensors={key: batch.batch[key] for key in batch.batch.keys()},
        non_tensors=dict(batch.non_tensor_batch),
    )
    for key, value in tensors.items():
        out.batch[key] = value
    return out


P = 5  # multi_turn_batch's prompt width
LAYOUT_CASES = {
    # responses narrower than response_mask: prefixes would pair wrong ids with masks
    "responses-narrower": (lambda b: dict(responses=b["responses"][:, :-2]), ValueError),
    # the response-only attention mask: prompt padding would enter the prefixes
    "attention_mask-response-only": (
        lambda b: dict(attention_mask=b["attention_mask"][:, P:]),
        ValueError,
    ),
    # narrower than the prompts: was an IndexError naming nothing
    "attention_mask-narrower-than-prompts": (
        lambda b: dict(attention_mask=b["attention_mask"][:, :3]),
        ValueError,
    ),
    "responses-float": (lambda b: dict(responses=b["responses"].float()), TypeError),
    "prompts-float": (lambda b: dict(prompts=b["prompts"].float()), TypeError),
    "response_mask-narrower": (lambda b: dict(response_mask=b["response_mask"][:, 1:]), ValueError),
    "old_log_probs-narrower": (
        lambda b: dict(old_log_probs=b["old_log_probs"][:, :-1]),
        ValueError,
    ),
    "rollout_log_probs-int": (
        lambda b: dict(rollout_log_probs=b["rollout_log_probs"].long()),
        TypeError,
    ),
    "entropy-3d": (lambda b: dict(entropy=b["entropy"][:, :, None]), ValueError),
}


@pytest.mark.parametrize("case", list(LAYOUT_CASES))
def test_select_branches_checks_the_batch_layout(case, gen):
    batch = multi_turn_batch(gen, prompt_width=P)
    change, error = LAYOUT_CASES[case]
    change = change(batch.batch)
    with pytest.raises(error, match=f"batch.batch\\['{next(iter(change))}'\\]"):
        appo_verl.select_branches(_with(batch, **change), 2)


@pytest.mark.parametrize(
    "ids, error",
    [
        ([" ", "\n"], TypeError),  # token strings: map them with the tokenizer first
        ("abc", TypeError),
        ([3, 4.0], TypeError),  # a float id would have been truncated
        ([True], TypeError),
        (torch.tensor([3.0]), TypeError),
        ([3, -1], ValueError),
    ],
    ids=["strings", "a-string", "float", "bool", "float-tensor", "negative"],
)
def test_select_branches_checks_exclude_token_ids(ids, error, gen):
    batch = multi_turn_batch(gen)
    with pytest.raises(error, match="exclude_token_ids"):
        appo_verl.select_branches(batch, 2, exclude_token_ids=ids)


def test_select_branches_exclude_token_ids_forms(gen):
    batch = multi_turn_batch(gen)
    want = appo_verl.select_branches(batch, 2, exclude_token_ids=[3, 4])
    for ids in ({3, 4}, torch.tensor([[3], [4]]), np.array([4, 3, 10**12])):  # a huge id: no table
        got = appo_verl.select_branches(batch, 2, exclude_token_ids=ids)
        assert got.parent.tolist() == want.parent.tolist()
        assert got.position.tolist() == want.position.tolist()


def test_select_branches_refuses_a_batch_with_branch_rows(gen):
    """After a first round the batch holds '<uid>#appo:<k>:<split>' rows: re-tagging them as
    initial rollouts would lose parent and split, so the call is refused; a batch whose initial
    rows are already tagged (no branch rows) branches as if untagged."""
    batch = multi_turn_batch(gen)
    first = appo_verl.select_branches(batch, 2)
    tagged = _with(batch)
    tagged.non_tensor_batch["uid"] = first.batch_uid
    again = appo_verl.select_branches(tagged, 2)
    assert again.uid.tolist() == first.uid.tolist()
    assert list(again.batch_uid) == list(first.batch_uid)
    with_branch = _with(batch)
    uids = first.batch_uid.copy()
    row = next(r for r in range(len(uids)) if r not in first.parent.tolist())
    branch = next(u for u, p in zip(first.uid, first.parent.tolist()) if p // 3 == row // 3)
    uids[row] = branch  # a branch row of the same group, its parent an initial row of the batch
    with_branch.non_tensor_batch["uid"] = uids
    assert appo_verl.is_branch_row(uids)[row]
    with pytest.raises(ValueError, match="branch row"):
        appo_verl.select_branches(with_branch, 2)
    with_branch.non_tensor_batch["uid"] = np.array(["p0"] * 5, dtype=object)
    with pytest.raises(ValueError, match="one uid per row"):
        appo_verl.select_branches(with_branch, 2)


@pytest.mark.parametrize("name", ["appo", "appo_dual_clip"])
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("counts", ["direct call", "zero global counts"])
def test_fully_masked_mini_batch_loss_is_zero(name, mode, counts, gen):
    """One rule for every loss of the project (docs/design.md section 9): a mini-batch without a
    response token gives loss 0 with a zero gradient (verl's agg_loss gave NaN), whatever count is
    given; appo.loss.policy_loss does the same. A count of 0 for a mini-batch with tokens is an
    error naming it."""
    old, logprob, advantages, mask = random_batch(gen)
    config = actor_config()
    if counts == "zero global counts":
        config.global_batch_info.update(dp_size=1, batch_num_tokens=0, global_batch_size=0)
    empty = torch.zeros_like(mask)
    loss_fn = core_algos.get_policy_loss_fn(name)
    loss, metrics = loss_fn(old, logprob, advantages, empty, mode, config, None)
    assert loss.item() == 0.0 and metrics["actor/ppo_kl"] == 0.0
    (grad,) = torch.autograd.grad(loss, logprob)
    assert (grad == 0).all()
    if counts == "zero global counts":
        key = "batch_num_tokens" if mode == "token-mean" else "global_batch_size"
        with pytest.raises(ValueError, match=key):
            loss_fn(old, logprob, advantages, mask, mode, config, None)
    want, _ = policy_loss(logprob, old, advantages, empty, num_tokens=0)
    assert want.item() == 0.0


@pytest.mark.parametrize(
    "key, change, error",
    [
        ("response_mask", lambda t: t[:, :-1], ValueError),
        ("advantages", lambda t: t[:, :-1], ValueError),
        ("old_log_prob", lambda t: t[:, :-1], ValueError),
        ("log_prob", lambda t: t.long(), TypeError),
        ("rollout_is_weights", lambda t: torch.ones(6, 19), ValueError),
        ("response_mask", lambda t: t.tolist(), TypeError),
    ],
    ids=["mask-short", "adv-short", "old-short", "logprob-int", "weights-short", "mask-list"],
)
@pytest.mark.parametrize("name", ["appo", "appo_dual_clip"])
def test_policy_losses_check_their_inputs(name, key, change, error, gen):
    old, logprob, advantages, mask = random_batch(gen)
    args = dict(old_log_prob=old, log_prob=logprob, advantages=advantages, response_mask=mask,
                rollout_is_weights=torch.ones_like(old))  # fmt: skip
    args[key] = change(args[key])
    loss_fn = core_algos.get_policy_loss_fn(name)
    with pytest.raises(error, match=key):
        loss_fn(**args, loss_agg_mode="token-mean", config=actor_config())


def test_estimator_and_helpers_check_their_inputs(gen):
    rewards, mask = torch.rand(3, 5, generator=gen), torch.ones(3, 5)
    uids = ["a", "a", "b"]
    estimator = appo_verl.appo_advantage
    cases = [
        (dict(token_level_rewards=rewards[:, :-1]), ValueError, "response_mask"),
        (dict(token_level_rewards=rewards.long()), TypeError, "token_level_rewards"),
        (dict(token_level_rewards=rewards.sum(-1)), ValueError, "token_level_rewards"),
        (dict(response_mask=mask[:2]), ValueError, "response_mask"),
        (dict(index="aab"), TypeError, "index"),
        (dict(index=uids[:2]), ValueError, "index"),
    ]
    for change, error, match in cases:
        args = dict(token_level_rewards=rewards, response_mask=mask, index=uids) | change
        with pytest.raises(error, match=match):
            estimator(**args)
    with pytest.raises(TypeError, match="uids"):
        appo_verl.is_branch_row("a#appo:0:1")  # a string, not a list of uids
    assert appo_verl.is_branch_row(np.array(["a#appo:0:1", "a#appo:0"])).tolist() == [True, False]


def test_kernel_replacements_check_their_inputs_by_verl_names(gen):
    logits = torch.randn(2, 4, 11, generator=gen)
    labels = torch.randint(0, 11, (2, 4), generator=gen)
    with pytest.raises(TypeError, match="labels"):
        appo_verl.logprobs_from_logits(logits, labels.float())
    with pytest.raises(ValueError, match="labels"):
        appo_verl.logprobs_from_logits(logits, labels[:, 1:])
    hidden, head = torch.randn(2, 4, 8, generator=gen), torch.randn(11, 8, generator=gen)
    fused = appo_verl.FusedLinearForPPO()
    with pytest.raises(TypeError, match="input_ids"):
        fused(hidden, head, labels.float())  # was truncated to ids by .long()
    with pytest.raises(TypeError, match="vocab_weights"):
        fused(hidden, head.long(), labels)
    with pytest.raises(ValueError, match="input_ids"):
        fused(hidden, head, labels[:, :3])
    import verl.utils.kernel.linear_cross_entropy as lce

    replacement = appo_verl._linear_cross_entropy(lce.linear_cross_entropy)
    with pytest.raises(TypeError, match="labels"):
        replacement(hidden, head, labels.float())
    got = replacement(hidden, head, labels)[0]
    torch.testing.assert_close(got.view(2, 4), fused(hidden, head, labels)[0])
