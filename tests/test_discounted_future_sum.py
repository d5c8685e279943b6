"""discounted_future_sum against a float64 loop, on both backends."""

import math

import pytest
import torch
from reference import discounted_sum_ref
from utils import assert_close_to_ref, assert_compiles_without_spills, assert_rejects, random_mask

from appo_kernels._rows import MAX_BLOCK
from appo_kernels.discounted_future_sum import discounted_future_sum

# (B, T): one position; one short block; several blocks with T not a multiple of MAX_BLOCK.
SHAPES = [(3, 1), (5, 37), (3, 2 * MAX_BLOCK + 77)]


@pytest.mark.parametrize("B, T", SHAPES)
@pytest.mark.parametrize("gamma", [1.0, 0.93])
def test_matches_float64_reference(backend, device, gen, B, T, gamma):
    values = torch.randn(B, T, generator=gen)
    mask = random_mask(gen, B, T)
    out = discounted_future_sum(values.to(device), mask.to(device), gamma=gamma)
    expected, scale = discounted_sum_ref(values, mask, gamma)
    assert_close_to_ref(out.cpu(), expected, scale)
    assert torch.all(out[0] == 0)  # the all-masked row


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mask_dtype", [torch.int64, torch.float32])
def test_low_precision_values_and_numeric_masks(backend, device, gen, dtype, mask_dtype):
    values = torch.randn(4, 50, generator=gen).to(dtype)
    mask = random_mask(gen, 4, 50)
    out = discounted_future_sum(values.to(device), mask.to(mask_dtype).to(device), gamma=0.8)
    expected, scale = discounted_sum_ref(values.float(), mask, 0.8)
    assert_close_to_ref(out.cpu(), expected, scale)


def test_masked_positions_add_zero_but_count_distance(backend, device):
    values = torch.tensor([[1.0, math.nan, math.inf, 4.0]], device=device)
    mask = torch.tensor([[True, False, False, True]], device=device)
    out = discounted_future_sum(values, mask, gamma=0.5)
    expected = torch.tensor([[1.0 + 0.125 * 4.0, 0.25 * 4.0, 0.5 * 4.0, 4.0]])
    torch.testing.assert_close(out.cpu(), expected, rtol=0, atol=0)


def test_nan_reaches_only_earlier_positions_of_its_row(backend, device, gen):
    B, T, k = 3, 40, 25
    values = torch.randn(B, T, generator=gen)
    mask = torch.ones(B, T, dtype=torch.bool)
    values[1, k] = math.nan
    out = discounted_future_sum(values.to(device), mask.to(device), gamma=0.9).cpu()
    assert out[1, : k + 1].isnan().all()
    assert out[1, k + 1 :].isfinite().all() and out[[0, 2]].isfinite().all()
    expected, scale = discounted_sum_ref(values, mask, 0.9)
    rows = torch.tensor([0, 2])
    assert_close_to_ref(out[rows], expected[rows], scale[rows])


@pytest.mark.parametrize("T, k", [(400, 300), (MAX_BLOCK + 77, MAX_BLOCK + 70)])
def test_infinity_reaches_every_earlier_position_after_the_decay_underflows(backend, device, T, k):
    """gamma^(k-t) underflows to 0 in float32 far before an infinite value, but the weight is
    positive: -inf must reach every earlier position (0 * -inf gave NaN), within a block and
    across blocks; a finite value there adds 0, and +inf meeting -inf gives NaN."""
    values = torch.zeros(3, T)
    values[:, k] = -math.inf
    values[1, 5] = 1.0
    values[2, 5] = math.inf
    mask = torch.ones(3, T, dtype=torch.bool)
    out = discounted_future_sum(values.to(device), mask.to(device), gamma=0.5).cpu()
    assert torch.all(out[:2, : k + 1] == -math.inf) and torch.all(out[:, k + 1 :] == 0)
    assert out[2, :6].isnan().all() and torch.all(out[2, 6 : k + 1] == -math.inf)


def test_strided_inputs(backend, device, gen):
    base = torch.randn(4, 2, 60, generator=gen)
    values = base[:, 1, ::2]  # row stride 120, position stride 2
    mask = (torch.rand(60, 4, generator=gen) < 0.6).t()[:, :30]
    out = discounted_future_sum(values.to(device), mask.to(device), gamma=0.7)
    expected, scale = discounted_sum_ref(values, mask, 0.7)
    assert_close_to_ref(out.cpu(), expected, scale)


@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (0, 0)])
def test_empty_inputs(backend, device, shape):
    out = discounted_future_sum(torch.empty(shape, device=device), torch.ones(shape, device=device))
    assert out.shape == shape and out.dtype == torch.float32


def test_output_is_not_differentiable(backend, device):
    values = torch.randn(2, 6, device=device, requires_grad=True)
    out = discounted_future_sum(values, torch.ones(2, 6, device=device))
    assert not out.requires_grad


def test_bad_input(device):
    values = torch.randn(2, 5, device=device)
    mask = torch.ones(2, 5, dtype=torch.bool, device=device)
    assert_rejects(TypeError, "values", discounted_future_sum, [[1.0]], mask)
    assert_rejects(TypeError, "values", discounted_future_sum, values.long(), mask)
    assert_rejects(TypeError, "values", discounted_future_sum, values.double(), mask)
    assert_rejects(ValueError, "values", discounted_future_sum, values[0], mask[0])
    assert_rejects(TypeError, "mask", discounted_future_sum, values, None)
    assert_rejects(TypeError, "mask", discounted_future_sum, values, mask.to(torch.complex64))
    assert_rejects(ValueError, "mask", discounted_future_sum, values, mask[:, :4])
    assert_rejects(ValueError, "mask", discounted_future_sum, values, mask.to("meta"))
    for gamma in (0.0, -0.5, 1.5, math.nan):
        assert_rejects(ValueError, "gamma", discounted_future_sum, values, mask, gamma=gamma)
    assert_rejects(TypeError, "gamma", discounted_future_sum, values, mask, gamma="0.9")


def test_torch_compile_fullgraph(backend, device, gen):
    values, mask = torch.randn(3, 20, generator=gen), random_mask(gen, 3, 20)

    def weights(values, mask):
        return discounted_future_sum(values, mask, gamma=0.9) * 2.0

    compiled = torch.compile(weights, fullgraph=True, backend="aot_eager")
    out = compiled(values.to(device), mask.to(device))
    torch.testing.assert_close(out, weights(values.to(device), mask.to(device)))


def test_kernel_compiles_for_gpus_without_spills():
    signature = {
        "values_ptr": "*bf16",
        "mask_ptr": "*i1",
        "out_ptr": "*fp32",
        "T": "i32",
        "stride_values": "i32",
        "stride_mask": "i32",
        "stride_out": "i32",
        "gamma": "fp32",
    }
    assert_compiles_without_spills(
        "appo_kernels.discounted_future_sum",
        "_discounted_future_sum_kernel",
        signature,
        [{"BLOCK": MAX_BLOCK}],
    )
