"""Discounted future sum along each row (SPEC section 2.2): a reverse scan.

    G_t = sum_{k=t}^{T-1} gamma^(k-t) * w_k * r_k,   i.e.   G_t = w_t r_t + gamma * G_{t+1}

The distance ``k - t`` counts raw positions (masked positions still decay the sum), masked
positions contribute exactly 0 (whatever their value, so NaN padding is harmless), and a NaN at a
valid position k reaches only G_t for t <= k of its own row.

``reverse_discounted_block`` is the one scan used by every kernel of the package that needs
``G``: future value, the branching score and this op.
"""

from __future__ import annotations

import torch

from appo_kernels._backend import HAS_TRITON, use_triton
from appo_kernels._rows import launch_row_kernel, torch_reverse_scan, valid_mask
from appo_kernels.validation import (
    check_float,
    check_gamma,
    check_mask,
    check_ndim,
    check_same_device,
    check_shape,
)

if HAS_TRITON:  # the Triton kernel (CUDA tensors, or CPU through the interpreter)
    import triton
    import triton.language as tl

    from appo_kernels._rows import reverse_scan_row

    @triton.jit
    def _discounted_future_sum_kernel(
        values_ptr,  # [B, T] float16/bfloat16/float32, row stride stride_values
        mask_ptr,  # [B, T] bool, nonzero = valid, row stride stride_mask
        out_ptr,  # [B, T] float32 G, row stride stride_out
        T,
        stride_values,
        stride_mask,
        stride_out,
        gamma,  # float32 discount in (0, 1]
        BLOCK: tl.constexpr,  # positions per scan block
    ):
        """One program per row: G of the row by ``reverse_scan_row``."""
        row = tl.program_id(0).to(tl.int64)
        reverse_scan_row(
            values_ptr + row * stride_values,
            values_ptr,  # no behaviour log-probs
            mask_ptr + row * stride_mask,
            out_ptr + row * stride_out,
            T,
            gamma,
            0.0,
            False,
            BLOCK,
        )


@torch.library.custom_op("appo_kernels::discounted_future_sum", mutates_args=())
def _discounted_future_sum_op(
    values: torch.Tensor, mask: torch.Tensor, gamma: float
) -> torch.Tensor:
    if use_triton(values.device):
        (out,) = launch_row_kernel(_discounted_future_sum_kernel, (values, mask), 1, gamma)
        return out
    return torch_reverse_scan(values, mask, gamma)


@_discounted_future_sum_op.register_fake
def _(values, mask, gamma):
    return values.new_empty(values.shape, dtype=torch.float32)


def discounted_future_sum(
    values: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0
) -> torch.Tensor:
    """Discounted sum of each row's future valid values: ``G_t = w_t r_t + gamma G_{t+1}``.

    Args:
        values: [B, T] float16/bfloat16/float32.
        mask: [B, T] bool, integer or floating; nonzero marks a valid position. Masked positions
            add 0 but still count towards the discount distance.
        gamma: discount in (0, 1].

    Returns:
        [B, T] float32 ``G`` (also defined at masked positions). Not differentiable: the result
        is a weight, computed from detached inputs.
    """
    check_float("values", values)
    check_ndim("values", values, 2, "[B, T]")
    check_mask("mask", mask)
    check_shape("mask", mask, values.shape, "values")
    check_same_device({"values": values, "mask": mask})
    gamma = check_gamma("gamma", gamma)
    return _discounted_future_sum_op(values.detach(), valid_mask(mask.detach()), gamma)
