"""branching_score(_from_stats) against float64 references, on both backends."""

import math

import pytest
import torch
from reference import branching_score_ref, token_stats_ref
from utils import assert_close_to_ref, assert_compiles_without_spills, assert_rejects, random_mask

from appo_kernels._rows import MAX_BLOCK
from appo_kernels.branching_score import (
    BranchingScore,
    branching_score,
    branching_score_from_stats,
)
from appo_kernels.token_stats import token_stats_forward

FIELDS = ("score", "future_value", "z_entropy", "z_future")


def random_stats(gen, B, T):
    """(entropy, logprob, behavior_logprob) with Omega spread inside and across the clip range."""
    entropy = torch.rand(B, T, generator=gen) * 4
    logprob = -torch.rand(B, T, generator=gen) * 3
    return entropy, logprob, logprob + 0.05 * torch.randn(B, T, generator=gen)


def assert_matches_ref(out: BranchingScore, entropy, logprob, behavior, mask, gamma, clip):
    expected = dict(zip(FIELDS, branching_score_ref(entropy, logprob, behavior, mask, gamma, clip)))
    # z-scores are relative to the row's spread: tolerances scale with |z| (and |z|^2 for score).
    for name in FIELDS:
        scale = expected[name].abs().nan_to_num(posinf=0.0, neginf=0.0)
        assert_close_to_ref(getattr(out, name).cpu(), expected[name], scale, tol=5e-5)
    torch.testing.assert_close(out.entropy.cpu(), entropy.float(), equal_nan=True)
    torch.testing.assert_close(out.logprob.cpu(), logprob.float(), equal_nan=True)


@pytest.mark.parametrize("B, T", [(3, 1), (5, 37), (3, MAX_BLOCK + 77)])
@pytest.mark.parametrize("gamma, clip", [(1.0, 0.2), (0.9, 0.1)])
def test_from_stats_matches_float64_reference(backend, device, gen, B, T, gamma, clip):
    entropy, logprob, behavior = random_stats(gen, B, T)
    mask = random_mask(gen, B, T)
    args = [x.to(device) for x in (entropy, logprob, behavior, mask)]
    out = branching_score_from_stats(*args, gamma=gamma, clip=clip)
    assert_matches_ref(out, entropy, logprob, behavior, mask, gamma, clip)
    assert torch.all(out.score[0] == -math.inf) and torch.all(out.z_entropy[0] == 0)
    if T > 1:  # one valid position: std 0, so z = 0 and the score is 0 there
        assert out.score[1].isfinite().sum() == 1 and out.score[1].max() == 0


def test_low_precision_stats_and_float_mask(backend, device, gen):
    entropy, logprob, behavior = random_stats(gen, 4, 33)
    entropy, logprob = entropy.bfloat16(), logprob.half()
    mask = random_mask(gen, 4, 33).float()
    args = [x.to(device) for x in (entropy, logprob, behavior, mask)]
    out = branching_score_from_stats(*args, gamma=0.95)
    assert_matches_ref(out, entropy.float(), logprob.float(), behavior, mask, 0.95, 0.2)


def test_constant_future_value_gives_zero_scores(backend, device, gen):
    entropy, logprob, _ = random_stats(gen, 2, 12)
    behavior = logprob - 5.0  # every Omega clipped to 1 + clip
    mask = torch.ones(2, 12, dtype=torch.bool)
    out = branching_score_from_stats(*(x.to(device) for x in (entropy, logprob, behavior, mask)))
    assert torch.all(out.future_value == 1.2) and torch.all(out.z_future == 0)
    assert torch.all(out.score == 0)


def test_nan_stays_in_its_row(backend, device, gen):
    B, T = 4, 20
    entropy, logprob, behavior = random_stats(gen, B, T)
    mask = random_mask(gen, B, T)
    mask[2:] = True
    entropy[2, 7] = math.nan  # valid position: the row's z(H) and scores are NaN
    entropy[3, 4] = logprob[3, 9] = math.nan  # masked positions: ignored
    mask[3, 4] = mask[3, 9] = False
    out = branching_score_from_stats(*(x.to(device) for x in (entropy, logprob, behavior, mask)))
    assert out.score[2].isnan().all() and out.z_entropy[2].isnan().all()
    keep = torch.tensor([0, 1, 3])
    sub = [x[keep] for x in (entropy, logprob, behavior, mask)]
    assert_matches_ref(BranchingScore(*(x[keep] for x in out)), *sub, 1.0, 0.2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_from_logits_is_token_stats_then_from_stats(backend, device, gen, dtype):
    B, T, V = 3, 9, 50
    logits = (2 * torch.randn(B, T, V, generator=gen)).to(dtype)
    tokens = torch.randint(0, V, (B, T), generator=gen)
    tokens[2, -2:] = -100  # padding tokens (masked)
    mask = random_mask(gen, B, T)
    mask[2, -2:] = False
    behavior = torch.randn(B, T, generator=gen) * 0.1 - 3
    args = [x.to(device) for x in (logits, tokens, behavior, mask)]
    out = branching_score(*args, temperature=0.7, gamma=0.9, clip=0.3)

    stats = token_stats_forward(args[0], args[1], temperature=0.7)
    two_step = branching_score_from_stats(
        stats.entropy, stats.logprob, args[2], args[3], gamma=0.9, clip=0.3
    )
    for a, b in zip(out, two_step):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    logprob, entropy = token_stats_ref(logits, tokens, temperature=0.7)
    assert_matches_ref(out, entropy, logprob, behavior, mask, 0.9, 0.3)


@pytest.mark.parametrize("shape", [(0, 5), (3, 0)])
def test_empty_inputs(backend, device, shape):
    x = torch.empty(shape, device=device)
    out = branching_score_from_stats(x, x, x, torch.ones(shape, device=device))
    assert all(t.shape == shape and t.dtype == torch.float32 for t in out)
    logits = torch.empty(*shape, 7, device=device)
    tokens = torch.empty(shape, dtype=torch.int64, device=device)
    out = branching_score(logits, tokens, x, torch.ones(shape, device=device))
    assert all(t.shape == shape and t.dtype == torch.float32 for t in out)


def test_outputs_are_not_differentiable(backend, device, gen):
    logits = torch.randn(2, 4, 9, generator=gen).to(device).requires_grad_()
    tokens = torch.randint(0, 9, (2, 4), generator=gen).to(device)
    behavior, mask = torch.zeros(2, 4, device=device), torch.ones(2, 4, device=device)
    out = branching_score(logits, tokens, behavior, mask)
    assert not any(t.requires_grad for t in out)


def test_bad_input(device):
    x = torch.randn(2, 5, device=device)
    mask = torch.ones(2, 5, dtype=torch.bool, device=device)
    f = branching_score_from_stats
    assert_rejects(TypeError, "entropy", f, x.long(), x, x, mask)
    assert_rejects(ValueError, "entropy", f, x[:1], x, x, mask)
    assert_rejects(ValueError, "entropy", f, x.to("meta"), x, x, mask)
    assert_rejects(TypeError, "logprob", f, x, None, x, mask)
    assert_rejects(ValueError, "behavior_logprob", f, x, x, x[:, 1:], mask)
    assert_rejects(ValueError, "mask", f, x, x, x, mask[None])
    assert_rejects(ValueError, "gamma", f, x, x, x, mask, gamma=0.0)
    assert_rejects(ValueError, "clip", f, x, x, x, mask, clip=1.0)

    logits = torch.randn(2, 5, 7, device=device)
    tokens = torch.randint(0, 7, (2, 5), device=device)
    g = branching_score
    assert_rejects(TypeError, "logits", g, logits.int(), tokens, x, mask)
    assert_rejects(ValueError, "logits", g, logits[0], tokens, x, mask)
    assert_rejects(ValueError, "behavior_logprob", g, logits, tokens, x[:, :4], mask)
    assert_rejects(ValueError, "mask", g, logits, tokens, x, mask[:1])
    assert_rejects(ValueError, "gamma", g, logits, tokens, x, mask, gamma=2.0)
    assert_rejects(ValueError, "temperature", g, logits, tokens, x, mask, temperature=0.0)
    assert_rejects(ValueError, "tokens", g, logits, tokens + 7, x, mask)
    assert_rejects(TypeError, "tokens", g, logits, tokens.float(), x, mask)


def test_torch_compile_fullgraph(backend, device, gen):
    B, T, V = 2, 10, 16
    logits = torch.randn(B, T, V, generator=gen).to(device)
    tokens = torch.randint(0, V, (B, T), generator=gen).to(device)
    behavior = (torch.randn(B, T, generator=gen) * 0.1 - 2).to(device)
    mask = random_mask(gen, B, T).to(device)

    def scores(logits, tokens, behavior, mask):
        out = branching_score(logits, tokens, behavior, mask, gamma=0.9)
        return out.score, out.z_entropy > 0

    compiled = torch.compile(scores, fullgraph=True, backend="aot_eager")
    args = (logits, tokens, behavior, mask)
    for a, b in zip(compiled(*args), scores(*args)):
        torch.testing.assert_close(a, b)


def test_kernel_compiles_for_gpus_without_spills():
    pointers = [
        "entropy_ptr",
        "logprob_ptr",
        "behavior_ptr",
        "mask_ptr",
        "score_ptr",
        "omega_ptr",
        "z_entropy_ptr",
        "z_omega_ptr",
    ]
    signature = {name: "*fp32" for name in pointers}
    signature.update(
        entropy_ptr="*bf16",
        mask_ptr="*i1",
        T="i32",
        stride_entropy="i32",
        stride_logprob="i32",
        stride_behavior="i32",
        stride_mask="i32",
        stride_out="i32",
        gamma="fp32",
        clip="fp32",
    )
    assert_compiles_without_spills(
        "appo_kernels.branching_score", "_branching_score_kernel", signature, [{"BLOCK": MAX_BLOCK}]
    )
