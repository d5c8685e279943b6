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

from appo_kernels._backend import HAS_TRITON, launch_device, use_triton
from appo_kernels.validation import (
    check_float,
    check_gamma,
    check_mask,
    check_ndim,
    check_same_device,
    check_shape,
)

MAX_BLOCK = 1024  # positions per scan block; longer rows loop over blocks from the end


if HAS_TRITON:  # the Triton kernels (CUDA tensors, or CPU through the interpreter)
    import triton
    import triton.language as tl

    @triton.jit
    def _affine_combine(decay_later, sum_later, decay_here, value_here):
        """Composes two steps of ``G <- value + decay * G`` (the later segment is applied first)."""
        return decay_later * decay_here, sum_later * decay_here + value_here

    @triton.jit
    def reverse_discounted_block(values, gamma, carry):
        """Reverse discounted scan of one block given ``carry`` = G at the first position after it.

        Scanning the pairs (gamma, v_t) from the end with ``_affine_combine`` gives, per position,
        ``local_t = sum_{k >= t in block} gamma^(k-t) v_k`` and ``decay_t = gamma^(end - t)``, so
        ``G_t = local_t + decay_t * carry``. Returns (G, G at the block's first position).
        """
        decay = tl.full(values.shape, gamma, tl.float32)
        decay_to_end, local = tl.associative_scan((decay, values), 0, _affine_combine, reverse=True)
        discounted = local + decay_to_end * carry
        first = tl.arange(0, values.shape[0]) == 0
        return discounted, tl.sum(tl.where(first, discounted, 0.0), axis=0)

    @triton.jit
    def _discounted_future_sum_kernel(
        values_ptr,
        mask_ptr,
        out_ptr,
        T,
        stride_values,
        stride_mask,
        stride_out,
        gamma,
        BLOCK: tl.constexpr,
    ):
        """One program per row: blocks from the end of the row, carrying G between blocks."""
        row = tl.program_id(0).to(tl.int64)
        values_ptr += row * stride_values
        mask_ptr += row * stride_mask
        out_ptr += row * stride_out
        num_blocks = tl.cdiv(T, BLOCK)
        carry = tl.zeros((), tl.float32)
        for i in range(num_blocks):
            offs = (num_blocks - 1 - i) * BLOCK + tl.arange(0, BLOCK)
            in_row = offs < T
            valid = tl.load(mask_ptr + offs, mask=in_row, other=0) != 0
            value = tl.load(values_ptr + offs, mask=in_row, other=0).to(tl.float32)
            discounted, carry = reverse_discounted_block(tl.where(valid, value, 0.0), gamma, carry)
            tl.store(out_ptr + offs, discounted, mask=in_row)


def block_size(T: int) -> int:
    """Scan block for rows of length T: the whole row when short, else ``MAX_BLOCK``."""
    return min(max(triton.next_power_of_2(T), 16), MAX_BLOCK)


def reverse_discounted_sum_torch(values: torch.Tensor, gamma: float) -> torch.Tensor:
    """PyTorch path of the scan on already-masked float32 [B, T] values.

    Log-depth doubling: after the step with shift s, G_t holds the discounted sum of
    v_t .. v_{t+2s-1}. Each step only adds later positions into earlier ones, so a NaN moves
    towards the start of its row exactly as in the sequential recurrence.
    """
    out = values.clone()
    T = values.shape[-1]
    shift = 1
    while shift < T:
        decay = gamma**shift
        if decay == 0.0:  # every further term underflows to zero
            break
        out[..., : T - shift] = out[..., : T - shift] + decay * out[..., shift:]
        shift *= 2
    return out


def rows_last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    """The kernels index [B, T] tensors as ``row * stride(0) + t``: last dim must be unit-stride."""
    return x if x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous()


def valid_mask(mask: torch.Tensor) -> torch.Tensor:
    """A {0, 1} mask of any dtype as bool (nonzero = valid)."""
    return mask if mask.dtype == torch.bool else mask != 0


@torch.library.custom_op("appo_kernels::discounted_future_sum", mutates_args=())
def _discounted_future_sum_op(
    values: torch.Tensor, mask: torch.Tensor, gamma: float
) -> torch.Tensor:
    B, T = values.shape
    if not use_triton(values.device):
        masked = torch.where(mask, values.float(), 0.0)
        return reverse_discounted_sum_torch(masked, gamma)
    out = torch.empty((B, T), dtype=torch.float32, device=values.device)
    if B == 0 or T == 0:
        return out
    values, mask = rows_last_dim_contiguous(values), rows_last_dim_contiguous(mask)
    with launch_device(out):
        _discounted_future_sum_kernel[(B,)](
            values,
            mask,
            out,
            T,
            values.stride(0),
            mask.stride(0),
            out.stride(0),
            gamma,
            BLOCK=block_size(T),
        )
    return out


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
