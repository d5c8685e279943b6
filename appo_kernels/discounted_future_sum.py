"""Discounted future sum along each row: a reverse scan.

For a row of values ``r``, mask ``w`` (1 = valid) and discount ``gamma`` in (0, 1]::

    G_t = sum_{k=t}^{T-1} gamma^(k-t) * w_k * r_k,   i.e.   G_t = w_t r_t + gamma * G_{t+1}

The distance ``k - t`` counts raw positions (masked positions still decay the sum), masked
positions contribute exactly 0 (whatever their value, so NaN padding is harmless), and a NaN or
infinite value at a valid position k reaches only G_t for t <= k of its own row. The scan itself
(Triton row helper and PyTorch twin) lives in ``appo_kernels._rows``, shared with
``future_value`` and ``branching_score``; docs/design.md, "Reverse scans", has the derivation.
"""

from __future__ import annotations

import torch

from appo_kernels._backend import HAS_TRITON, use_triton
from appo_kernels._ops import custom_op, detached
from appo_kernels._rows import launch_row_kernel, torch_reverse_scan, valid_mask
from appo_kernels.validation import (
    check_float,
    check_gamma,
    check_mask,
    check_ndim,
    check_same_device,
    check_shape,
)

# --------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------

if HAS_TRITON:  # CUDA tensors, or CPU tensors through Triton's interpreter
    import triton
    import triton.language as tl

    from appo_kernels._rows import reverse_scan_row

    @triton.jit
    def _discounted_future_sum_kernel(
        values_ptr,  # [B, T] float16/bfloat16/float32 r, row stride stride_values
        mask_ptr,  # [B, T] bool w, row stride stride_mask
        out_ptr,  # [B, T] float32 G, row stride stride_out
        T,  # positions per row
        stride_values,
        stride_mask,
        stride_out,
        gamma,  # float32 discount in (0, 1]
        BLOCK: tl.constexpr,  # positions per scan block, a power of two
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
            0.0,  # no clip
            False,  # G, not Omega
            BLOCK,
        )


# --------------------------------------------------------------------------------------------
# Launcher and PyTorch path
# --------------------------------------------------------------------------------------------


def _triton_discounted_future_sum(values, mask, gamma):
    (out,) = launch_row_kernel(_discounted_future_sum_kernel, (values, mask), 1, gamma)
    return out


def _torch_discounted_future_sum(values, mask, gamma):
    return torch_reverse_scan(values, mask, gamma)


# --------------------------------------------------------------------------------------------
# Custom op and public function
# --------------------------------------------------------------------------------------------


@custom_op("appo_kernels::discounted_future_sum")
def _discounted_future_sum_op(
    values: torch.Tensor, mask: torch.Tensor, gamma: float
) -> torch.Tensor:
    """``values`` [B, T] float, ``mask`` [B, T] bool, checked by the public function."""
    if use_triton(values.device):
        return _triton_discounted_future_sum(values, mask, gamma)
    return _torch_discounted_future_sum(values, mask, gamma)


@_discounted_future_sum_op.register_fake
def _(values, mask, gamma):
    return values.new_empty(values.shape, dtype=torch.float32)


def discounted_future_sum(
    values: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0
) -> torch.Tensor:
    """Discounted sum of each row's future valid values, ``G_t = w_t r_t + gamma G_{t+1}``.

    Parameters
    ----------
    values : torch.Tensor
        ``[B, T]`` float16, bfloat16 or float32 values ``r``. Any row stride; a last dimension
        that is not unit-stride is copied.
    mask : torch.Tensor
        ``[B, T]`` bool, integer or floating, on the device of ``values``; nonzero marks a valid
        position ``w_t = 1``. Masked positions add 0 but still count towards the discount
        distance.
    gamma : float
        Discount in ``(0, 1]``.

    Returns
    -------
    torch.Tensor
        ``[B, T]`` float32 ``G`` (defined at masked positions too), contiguous.

    Notes
    -----
    Not differentiable: the result is a weight, computed from detached inputs. Accumulates in
    float32 whatever the input dtype. A NaN or infinity at a valid position ``k`` reaches every
    ``G_t`` with ``t <= k`` of its row, even where ``gamma^(k-t)`` underflows to 0 (``+inf`` and
    ``-inf`` together give NaN). Empty inputs give an empty result.

    Example
    -------
    >>> import torch
    >>> import appo_kernels as ak
    >>> values = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    >>> mask = torch.tensor([[True, True, False, True]])
    >>> ak.discounted_future_sum(values, mask, gamma=0.5)
    tensor([[2.5000, 3.0000, 2.0000, 4.0000]])
    """
    check_float("values", values)
    check_ndim("values", values, 2, "[B, T]")
    check_mask("mask", mask)
    check_shape("mask", mask, values.shape, "values")
    check_same_device({"values": values, "mask": mask})
    gamma = check_gamma("gamma", gamma)
    return _discounted_future_sum_op(detached(values), valid_mask(mask), gamma)
