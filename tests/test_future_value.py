"""future_value against a float64 loop, on both backends."""

import math

import pytest
import torch
from reference import future_value_ref
from utils import assert_close_to_ref, assert_compiles_without_spills, assert_rejects, random_mask

from appo_kernels._rows import MAX_BLOCK
from appo_kernels.future_value import future_value


def random_log_probs(gen, B, T, spread=0.05):
    """Current and behaviour log-probs whose ratios are small, as between nearby policies, so
    that Omega falls both inside and outside the clip range."""
    logprob = -torch.rand(B, T, generator=gen) * 3
    return logprob, logprob + spread * torch.randn(B, T, generator=gen)


@pytest.mark.parametrize("B, T", [(3, 1), (5, 37), (3, MAX_BLOCK + 77)])
@pytest.mark.parametrize("gamma, clip", [(1.0, 0.2), (0.9, 0.2), (0.97, 0.05)])
def test_matches_float64_reference(backend, device, gen, B, T, gamma, clip):
    logprob, behavior = random_log_probs(gen, B, T)
    mask = random_mask(gen, B, T)
    args = [x.to(device) for x in (logprob, behavior, mask)]
    out = future_value(*args, gamma=gamma, clip=clip)
    expected = future_value_ref(logprob, behavior, mask, gamma, clip)
    assert_close_to_ref(out.cpu(), expected)
    assert torch.all(out[0] == 1.0)  # all-masked row: G = 0, exp(0) = 1
    assert out.min() >= 1 - clip and out.max() <= 1 + clip


def test_huge_log_ratios_hit_the_clamp_and_the_clip(backend, device, gen):
    B, T = 4, 30
    logprob = torch.zeros(B, T)
    behavior = 200.0 * torch.randn(B, T, generator=gen)  # |G| far beyond 20
    behavior[:, -3:] = 0.0  # small gains at the end of each row
    mask = torch.ones(B, T, dtype=torch.bool)
    args = (logprob.to(device), behavior.to(device), mask.to(device))
    clipped = future_value(*args, clip=0.2).cpu()
    assert_close_to_ref(clipped, future_value_ref(logprob, behavior, mask, 1.0, 0.2))
    assert ((clipped == 0.8) | (clipped == 1.2)).float().mean() > 0.5
    # With 1 - clip below e^-20 the lower clamp of G is what bounds Omega.
    unclipped = future_value(*args, clip=1.0 - 1e-12).cpu()
    expected = future_value_ref(logprob, behavior, mask, 1.0, 1.0 - 1e-12)
    assert_close_to_ref(unclipped, expected, scale=expected)
    assert torch.isclose(unclipped, torch.tensor(math.exp(-20.0))).any()


def test_nan_reaches_only_earlier_positions_of_its_row(backend, device, gen):
    B, T, k = 3, 40, 25
    logprob, behavior = random_log_probs(gen, B, T)
    mask = torch.ones(B, T, dtype=torch.bool)
    logprob[2, k] = math.nan
    logprob[0, 5] = math.nan  # masked: ignored
    mask[0, 5] = False
    out = future_value(logprob.to(device), behavior.to(device), mask.to(device), gamma=0.9).cpu()
    assert out[2, : k + 1].isnan().all() and out[2, k + 1 :].isfinite().all()
    expected = future_value_ref(logprob, behavior, mask, 0.9, 0.2)
    assert_close_to_ref(out[:2], expected[:2])


def test_infinite_log_ratio_after_the_decay_underflows_gives_the_clip_bound(backend, device):
    """A -inf log-ratio 300 positions after t with gamma = 0.5: G_t = -inf, Omega_t = 1 - clip
    (the PyTorch path gave NaN once gamma^(k-t) underflowed in float32)."""
    logprob, behavior = torch.zeros(2, 400), torch.zeros(2, 400)
    logprob[:, 300] = -math.inf
    mask = torch.ones(2, 400, dtype=torch.bool)
    out = future_value(logprob.to(device), behavior.to(device), mask.to(device), gamma=0.5).cpu()
    assert torch.all(out[:, :301] == torch.tensor(0.8)) and torch.all(out[:, 301:] == 1.0)


def test_mixed_dtypes_and_strided_inputs(backend, device, gen):
    logprob, behavior = random_log_probs(gen, 6, 64)
    logprob, behavior = logprob.bfloat16()[:, ::2], behavior.t().contiguous().t()[:, ::2]
    mask = random_mask(gen, 6, 32).to(torch.uint8)
    out = future_value(logprob.to(device), behavior.to(device), mask.to(device), gamma=0.95)
    assert_close_to_ref(out.cpu(), future_value_ref(logprob.float(), behavior, mask, 0.95, 0.2))


@pytest.mark.parametrize("shape", [(0, 5), (3, 0)])
def test_empty_inputs(backend, device, shape):
    x = torch.empty(shape, device=device)
    out = future_value(x, x, torch.ones(shape, device=device))
    assert out.shape == shape and out.dtype == torch.float32


def test_bad_input(device):
    lp = torch.randn(2, 5, device=device)
    mask = torch.ones(2, 5, device=device)
    assert_rejects(TypeError, "logprob", future_value, lp.int(), lp, mask)
    assert_rejects(ValueError, "logprob", future_value, lp[0], lp[0], mask[0])
    assert_rejects(TypeError, "behavior_logprob", future_value, lp, "x", mask)
    assert_rejects(ValueError, "behavior_logprob", future_value, lp, lp[:, :3], mask)
    assert_rejects(ValueError, "behavior_logprob", future_value, lp, lp.to("meta"), mask)
    assert_rejects(ValueError, "mask", future_value, lp, lp, mask.t())
    for gamma in (0.0, 1.01):
        assert_rejects(ValueError, "gamma", future_value, lp, lp, mask, gamma=gamma)
    for clip in (-0.1, 1.0, math.inf):
        assert_rejects(ValueError, "clip", future_value, lp, lp, mask, clip=clip)
    assert_rejects(TypeError, "clip", future_value, lp, lp, mask, clip=None)


def test_torch_compile_fullgraph(backend, device, gen):
    logprob, behavior = random_log_probs(gen, 3, 20)
    mask = random_mask(gen, 3, 20)
    args = (logprob.to(device), behavior.to(device), mask.to(device))

    def weights(logprob, behavior, mask):
        return future_value(logprob, behavior, mask, gamma=0.9, clip=0.1) - 1.0

    compiled = torch.compile(weights, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*args), weights(*args))


def test_kernel_compiles_for_gpus_without_spills():
    signature = {
        "logprob_ptr": "*fp32",
        "behavior_ptr": "*fp32",
        "mask_ptr": "*i1",
        "out_ptr": "*fp32",
        "T": "i32",
        "stride_logprob": "i32",
        "stride_behavior": "i32",
        "stride_mask": "i32",
        "stride_out": "i32",
        "gamma": "fp32",
        "clip": "fp32",
    }
    assert_compiles_without_spills(
        "appo_kernels.future_value", "_future_value_kernel", signature, [{"BLOCK": MAX_BLOCK}]
    )
