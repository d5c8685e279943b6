"""Helpers shared by the per-row ops on ``[B, T]`` tensors (``discounted_future_sum``,
``future_value``, ``branching_score``, ``select_branch_points``): their layout, mask and argument
conventions, and the one reverse discounted scan behind the first three, with its host launcher
and its PyTorch twin.

Layout: a ``[B, T]`` input is read as ``ptr + b * stride(0) + t``, so its last dimension must have
unit stride (``rows_last_dim_contiguous`` copies only when it has not); the row stride is free.
Masks are ``{0, 1}`` tensors of any real dtype, nonzero = valid; the custom ops take them as bool.

The scan, per row of values ``r``, mask ``w`` and discount ``gamma`` in (0, 1]::

    G_t = sum_{k=t}^{T-1} gamma^(k-t) w_k r_k,      i.e.   G_t = w_t r_t + gamma G_{t+1}

The distance ``k - t`` counts raw positions; masked positions add exactly 0 (whatever they hold).
A NaN or infinite value at a valid position ``k`` reaches every ``G_t`` with ``t <= k`` of its row,
even where ``gamma^(k-t)`` underflows to 0 in float32 (the weight is positive, so ``-inf`` stays
``-inf`` instead of becoming ``0 * -inf = NaN``); finite values whose weight underflows add 0.

Triton: one program per row walks the row in blocks of ``BLOCK`` positions from its end. Each
block is one ``tl.associative_scan`` of the affine steps ``G <- r_t + gamma G`` (pairs
``(gamma, r_t)``), which gives per position the block-local sum and ``gamma^(end - t)``; adding
``gamma^(end - t) * carry`` (``carry`` = G at the first position after the block) completes G,
and G at the block's first position is the carry of the block before it. See docs/design.md,
"Reverse scans".
"""

from __future__ import annotations

import torch

from appo_kernels._backend import HAS_TRITON, launch_device
from appo_kernels.validation import (
    check_float,
    check_fraction,
    check_gamma,
    check_mask,
    check_ndim,
    check_same_device,
    check_shape,
)

MAX_BLOCK = 1024  # positions per scan block; longer rows loop over blocks
LOG_GAIN_LIMIT = 20.0  # future value: |G| is clamped to this before exp

if HAS_TRITON:  # the Triton helpers (CUDA tensors, or CPU through the interpreter)
    import triton
    import triton.language as tl

    _LOG_GAIN_LIMIT = tl.constexpr(LOG_GAIN_LIMIT)

    @triton.jit
    def _decayed(total, decay):
        """``total * decay`` for a decay in (0, 1] that may have underflowed to 0: an infinite or
        NaN total keeps its value (``0 * inf`` would be NaN), a finite one is scaled."""
        return tl.where(tl.abs(total) < float("inf"), total * decay, total)

    @triton.jit
    def _affine_combine(decay_later, sum_later, decay_here, value_here):
        """Composes two steps of ``G <- value + decay * G`` (the later segment is applied first)."""
        return decay_later * decay_here, sum_later * decay_here + value_here

    @triton.jit
    def _reverse_discounted_block(values, gamma, carry):
        """G over one block of masked values ``[BLOCK] float32`` given ``carry`` = G at the first
        position after the block. Returns (G ``[BLOCK]``, G at the block's first position).

        Scanning the pairs (gamma, v_t) from the end with ``_affine_combine`` gives, per position,
        ``local_t = sum_{k >= t in block} gamma^(k-t) v_k`` and ``decay_t = gamma^(end - t)``, so
        ``G_t = local_t + decay_t * carry``. Infinite and NaN values stay out of that scan (a
        segment's decay can underflow to 0, and 0 * inf is NaN): a reverse cumulative sum of them
        alone puts +inf, -inf or NaN (both signs, or a NaN) at every position at or before them.
        """
        finite = tl.abs(values) < float("inf")
        decay = tl.full(values.shape, gamma, tl.float32)
        decay_to_end, local = tl.associative_scan(
            (decay, tl.where(finite, values, 0.0)), 0, _affine_combine, reverse=True
        )
        local += tl.cumsum(tl.where(finite, 0.0, values), 0, reverse=True)
        discounted = local + _decayed(carry, decay_to_end)
        first = tl.arange(0, values.shape[0]) == 0
        return discounted, tl.sum(tl.where(first, discounted, 0.0), axis=0)

    @triton.jit
    def reverse_scan_row(
        values_ptr,  # [T] float16/bfloat16/float32: r (FUTURE_VALUE: the current log-probs)
        behavior_ptr,  # [T] float16/bfloat16/float32: behaviour log-probs (FUTURE_VALUE only)
        mask_ptr,  # [T] bool/integer/floating, nonzero = valid
        out_ptr,  # [T] float32: G, or Omega with FUTURE_VALUE
        T,  # positions in the row
        gamma,  # float32 discount in (0, 1]
        clip,  # float32 clip epsilon in [0, 1) (FUTURE_VALUE only)
        FUTURE_VALUE: tl.constexpr,
        BLOCK: tl.constexpr,  # positions per block, a power of two
    ):
        """Scans one row (pointers at its first position, unit position stride) from its end and
        stores at every position, masked ones included:

        - ``FUTURE_VALUE=False``: ``G`` of ``r = values``;
        - ``FUTURE_VALUE=True``: ``Omega = clip(exp(clamp(G, -20, 20)), 1 - clip, 1 + clip)`` of
          the log-ratios ``l = values - behavior`` (NaN propagates through clamp and clip).
        """
        num_blocks = tl.cdiv(T, BLOCK)
        carry = tl.zeros((), tl.float32)
        for i in range(num_blocks):
            offs = (num_blocks - 1 - i) * BLOCK + tl.arange(0, BLOCK)
            in_row = offs < T
            valid = tl.load(mask_ptr + offs, mask=in_row, other=0) != 0
            value = tl.load(values_ptr + offs, mask=in_row, other=0).to(tl.float32)
            if FUTURE_VALUE:
                value -= tl.load(behavior_ptr + offs, mask=in_row, other=0).to(tl.float32)
            out, carry = _reverse_discounted_block(tl.where(valid, value, 0.0), gamma, carry)
            if FUTURE_VALUE:
                out = tl.clamp(
                    out, -_LOG_GAIN_LIMIT, _LOG_GAIN_LIMIT, propagate_nan=tl.PropagateNan.ALL
                )
                out = tl.clamp(
                    tl.exp(out), 1.0 - clip, 1.0 + clip, propagate_nan=tl.PropagateNan.ALL
                )
            tl.store(out_ptr + offs, out, mask=in_row)


def block_size(T: int) -> int:
    """Block of a row kernel for rows of length T: the whole row when short, else ``MAX_BLOCK``."""
    return min(max(triton.next_power_of_2(T), 16), MAX_BLOCK)


def rows_last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    """The kernels index [B, T] tensors as ``row * stride(0) + t``: last dim must be unit-stride."""
    return x if x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous()


def valid_mask(mask: torch.Tensor) -> torch.Tensor:
    """A {0, 1} mask of any dtype as bool (nonzero = valid)."""
    return mask if mask.dtype == torch.bool else mask != 0


def check_log_ratio_inputs(
    lead_name: str, lead, layout: str, behavior_logprob, mask, gamma, clip
) -> tuple[float, float]:
    """Argument checks of the ops built on the log-ratio ``logprob - behavior_logprob``:
    ``lead`` (``logprob`` [B, T] or ``logits`` [B, T, V], as ``layout`` says) a float tensor,
    ``behavior_logprob`` a float tensor and ``mask`` a {0, 1} tensor of shape [B, T], all on one
    device, gamma in (0, 1] and clip in [0, 1). Returns (gamma, clip) as floats."""
    check_float(lead_name, lead)
    check_ndim(lead_name, lead, layout.count(",") + 1, layout)
    rows, ref = lead.shape[:2], lead_name if lead.dim() == 2 else f"{lead_name}.shape[:2]"
    check_float("behavior_logprob", behavior_logprob)
    check_shape("behavior_logprob", behavior_logprob, rows, ref)
    check_mask("mask", mask)
    check_shape("mask", mask, rows, ref)
    check_same_device({lead_name: lead, "behavior_logprob": behavior_logprob, "mask": mask})
    return check_gamma("gamma", gamma), check_fraction("clip", clip)


def launch_row_kernel(kernel, inputs: tuple[torch.Tensor, ...], num_outputs: int, *scalars):
    """Runs a row kernel with one program per row of the [B, T] ``inputs`` and returns its
    ``num_outputs`` new float32 [B, T] outputs.

    The kernel's arguments are, in order: the input pointers, the output pointers, ``T``, the
    inputs' row strides, the outputs' (shared) row stride, ``scalars``, and ``BLOCK``.
    """
    B, T = inputs[0].shape
    device = inputs[0].device
    outputs = tuple(
        torch.empty((B, T), dtype=torch.float32, device=device) for _ in range(num_outputs)
    )
    if B == 0 or T == 0:
        return outputs
    inputs = tuple(rows_last_dim_contiguous(x) for x in inputs)
    with launch_device(outputs[0]):
        kernel[(B,)](
            *inputs,
            *outputs,
            T,
            *(x.stride(0) for x in inputs),
            outputs[0].stride(0),
            *scalars,
            BLOCK=block_size(T),
        )
    return outputs


_FLOAT32_UNDERFLOW = 2.0**-150  # reals at or below this round to 0 in float32 (ties to even)


def _torch_decayed(later: torch.Tensor, decay: float) -> torch.Tensor:
    """``later * decay`` in float32 for a decay in (0, 1]; where the decay underflows to 0 in
    float32, infinite and NaN entries keep their value (as ``_decayed`` on the Triton side)."""
    if decay > _FLOAT32_UNDERFLOW:
        return later * decay
    return torch.where(later.isfinite(), 0.0, later)


def torch_reverse_scan(
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    behavior: torch.Tensor | None = None,
    clip: float = 0.0,
) -> torch.Tensor:
    """PyTorch twin of ``reverse_scan_row`` on whole [B, T] tensors (``mask`` bool): G of
    ``values``, or, given ``behavior``, Omega of the log-ratios ``values - behavior``.

    Log-depth doubling: after the step with shift s, G_t holds the discounted sum of
    v_t .. v_{t+2s-1}. Each step only adds later positions into earlier ones, so a NaN or an
    infinity moves towards the start of its row exactly as in the sequential recurrence.
    """
    values = values.float()
    if behavior is not None:
        values = values - behavior.float()
    out = torch.where(mask, values, 0.0)
    T = out.shape[-1]
    shift = 1
    while shift < T:
        out[..., : T - shift].add_(_torch_decayed(out[..., shift:], gamma**shift))
        shift *= 2
    if behavior is None:
        return out
    gain = out.clamp(-LOG_GAIN_LIMIT, LOG_GAIN_LIMIT)
    return gain.exp().clamp(1.0 - clip, 1.0 + clip)
