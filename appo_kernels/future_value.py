"""Future value of each token (SPEC section 2.3): the clipped likelihood gain of its continuation.

    l_t     = logprob_t - behavior_logprob_t                       (valid positions; 0 elsewhere)
    G_t     = sum_{k>=t} gamma^(k-t) w_k l_k                       (discounted_future_sum of l)
    Omega_t = clip(exp(clamp(G_t, -20, 20)), 1 - clip, 1 + clip)

NaN propagates: a NaN log-ratio at a valid position k makes Omega_t NaN for t <= k of its row.
"""

from __future__ import annotations

import torch

from appo_kernels._backend import HAS_TRITON, launch_device, use_triton
from appo_kernels.discounted_future_sum import (
    block_size,
    reverse_discounted_sum_torch,
    rows_last_dim_contiguous,
    valid_mask,
)
from appo_kernels.validation import (
    check_float,
    check_fraction,
    check_gamma,
    check_mask,
    check_ndim,
    check_same_device,
    check_shape,
)

LOG_GAIN_LIMIT = 20.0  # |G| is clamped to this before exp

if HAS_TRITON:  # the Triton kernels (CUDA tensors, or CPU through the interpreter)
    import triton
    import triton.language as tl

    from appo_kernels.discounted_future_sum import reverse_discounted_block

    _LOG_GAIN_LIMIT = tl.constexpr(LOG_GAIN_LIMIT)

    @triton.jit
    def future_value_block(log_ratio, gamma, clip, carry):
        """Omega over one block of masked log-ratios, given G after the block (see the module doc).

        Returns (Omega, G at the block's first position) so that callers chain blocks from the
        end.
        """
        gain, carry = reverse_discounted_block(log_ratio, gamma, carry)
        gain = tl.clamp(gain, -_LOG_GAIN_LIMIT, _LOG_GAIN_LIMIT, propagate_nan=tl.PropagateNan.ALL)
        omega = tl.clamp(tl.exp(gain), 1.0 - clip, 1.0 + clip, propagate_nan=tl.PropagateNan.ALL)
        return omega, carry

    @triton.jit
    def load_log_ratio(logprob_ptr, behavior_ptr, mask_ptr, offs, in_row):
        """(l_t with 0 at invalid positions, validity) for the positions ``offs`` of one row."""
        valid = tl.load(mask_ptr + offs, mask=in_row, other=0) != 0
        logprob = tl.load(logprob_ptr + offs, mask=in_row, other=0).to(tl.float32)
        behavior = tl.load(behavior_ptr + offs, mask=in_row, other=0).to(tl.float32)
        return tl.where(valid, logprob - behavior, 0.0), valid

    @triton.jit
    def _future_value_kernel(
        logprob_ptr,
        behavior_ptr,
        mask_ptr,
        out_ptr,
        T,
        stride_logprob,
        stride_behavior,
        stride_mask,
        stride_out,
        gamma,
        clip,
        BLOCK: tl.constexpr,
    ):
        """One program per row: blocks from the end of the row, carrying G between blocks."""
        row = tl.program_id(0).to(tl.int64)
        logprob_ptr += row * stride_logprob
        behavior_ptr += row * stride_behavior
        mask_ptr += row * stride_mask
        out_ptr += row * stride_out
        num_blocks = tl.cdiv(T, BLOCK)
        carry = tl.zeros((), tl.float32)
        for i in range(num_blocks):
            offs = (num_blocks - 1 - i) * BLOCK + tl.arange(0, BLOCK)
            in_row = offs < T
            log_ratio, _ = load_log_ratio(logprob_ptr, behavior_ptr, mask_ptr, offs, in_row)
            omega, carry = future_value_block(log_ratio, gamma, clip, carry)
            tl.store(out_ptr + offs, omega, mask=in_row)


def future_value_torch(
    logprob: torch.Tensor,
    behavior_logprob: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    clip: float,
) -> torch.Tensor:
    """PyTorch path: the same math on [B, T] tensors (``mask`` bool)."""
    log_ratio = torch.where(mask, logprob.float() - behavior_logprob.float(), 0.0)
    limit = LOG_GAIN_LIMIT
    gain = reverse_discounted_sum_torch(log_ratio, gamma).clamp(-limit, limit)
    return gain.exp().clamp(1.0 - clip, 1.0 + clip)


@torch.library.custom_op("appo_kernels::future_value", mutates_args=())
def _future_value_op(
    logprob: torch.Tensor,
    behavior_logprob: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    clip: float,
) -> torch.Tensor:
    if not use_triton(logprob.device):
        return future_value_torch(logprob, behavior_logprob, mask, gamma, clip)
    B, T = logprob.shape
    out = torch.empty((B, T), dtype=torch.float32, device=logprob.device)
    if B == 0 or T == 0:
        return out
    inputs = map(rows_last_dim_contiguous, (logprob, behavior_logprob, mask))
    logprob, behavior_logprob, mask = inputs
    with launch_device(out):
        _future_value_kernel[(B,)](
            logprob,
            behavior_logprob,
            mask,
            out,
            T,
            logprob.stride(0),
            behavior_logprob.stride(0),
            mask.stride(0),
            out.stride(0),
            gamma,
            clip,
            BLOCK=block_size(T),
        )
    return out


@_future_value_op.register_fake
def _(logprob, behavior_logprob, mask, gamma, clip):
    return logprob.new_empty(logprob.shape, dtype=torch.float32)


def check_log_ratio_inputs(logprob, behavior_logprob, mask, gamma, clip):
    """Argument checks shared by ``future_value`` and ``branching_score_from_stats``; returns
    (gamma, clip)."""
    check_float("logprob", logprob)
    check_ndim("logprob", logprob, 2, "[B, T]")
    check_float("behavior_logprob", behavior_logprob)
    check_shape("behavior_logprob", behavior_logprob, logprob.shape, "logprob")
    check_mask("mask", mask)
    check_shape("mask", mask, logprob.shape, "logprob")
    return check_gamma("gamma", gamma), check_fraction("clip", clip)


def future_value(
    logprob: torch.Tensor,
    behavior_logprob: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    clip: float = 0.2,
) -> torch.Tensor:
    """Clipped future likelihood gain ``Omega`` of every token (SPEC section 2.3).

    Args:
        logprob: [B, T] float, log-probs of the sampled tokens under the current policy.
        behavior_logprob: [B, T] float, log-probs recorded by the policy that sampled them.
        mask: [B, T] bool/integer/floating; nonzero marks a valid (response) position.
        gamma: discount in (0, 1] over raw positions.
        clip: epsilon in [0, 1); Omega lies in [1 - clip, 1 + clip].

    Returns:
        [B, T] float32 Omega (defined at every position). Not differentiable: a weight computed
        from detached inputs.
    """
    gamma, clip = check_log_ratio_inputs(logprob, behavior_logprob, mask, gamma, clip)
    check_same_device({"logprob": logprob, "behavior_logprob": behavior_logprob, "mask": mask})
    return _future_value_op(
        logprob.detach(), behavior_logprob.detach(), valid_mask(mask.detach()), gamma, clip
    )
