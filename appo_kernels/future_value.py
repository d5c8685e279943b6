"""Future value of each token (SPEC section 2.3): the clipped likelihood gain of its continuation.

    l_t     = logprob_t - behavior_logprob_t                       (valid positions; 0 elsewhere)
    G_t     = sum_{k>=t} gamma^(k-t) w_k l_k                       (discounted_future_sum of l)
    Omega_t = clip(exp(clamp(G_t, -20, 20)), 1 - clip, 1 + clip)

NaN propagates: a NaN log-ratio at a valid position k makes Omega_t NaN for t <= k of its row.
"""

from __future__ import annotations

import torch

from appo_kernels._backend import HAS_TRITON, use_triton
from appo_kernels._rows import (
    check_log_ratio_inputs,
    launch_row_kernel,
    torch_reverse_scan,
    valid_mask,
)

if HAS_TRITON:  # the Triton kernel (CUDA tensors, or CPU through the interpreter)
    import triton
    import triton.language as tl

    from appo_kernels._rows import reverse_scan_row

    @triton.jit
    def _future_value_kernel(
        logprob_ptr,  # [B, T] float16/bfloat16/float32, row stride stride_logprob
        behavior_ptr,  # [B, T] float16/bfloat16/float32, row stride stride_behavior
        mask_ptr,  # [B, T] bool, nonzero = valid, row stride stride_mask
        out_ptr,  # [B, T] float32 Omega, row stride stride_out
        T,
        stride_logprob,
        stride_behavior,
        stride_mask,
        stride_out,
        gamma,  # float32 discount in (0, 1]
        clip,  # float32 clip epsilon in [0, 1)
        BLOCK: tl.constexpr,  # positions per scan block
    ):
        """One program per row: Omega of the row by ``reverse_scan_row``."""
        row = tl.program_id(0).to(tl.int64)
        reverse_scan_row(
            logprob_ptr + row * stride_logprob,
            behavior_ptr + row * stride_behavior,
            mask_ptr + row * stride_mask,
            out_ptr + row * stride_out,
            T,
            gamma,
            clip,
            True,
            BLOCK,
        )


@torch.library.custom_op("appo_kernels::future_value", mutates_args=())
def _future_value_op(
    logprob: torch.Tensor,
    behavior_logprob: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    clip: float,
) -> torch.Tensor:
    if use_triton(logprob.device):
        inputs = (logprob, behavior_logprob, mask)
        (out,) = launch_row_kernel(_future_value_kernel, inputs, 1, gamma, clip)
        return out
    return torch_reverse_scan(logprob, mask, gamma, behavior_logprob, clip)


@_future_value_op.register_fake
def _(logprob, behavior_logprob, mask, gamma, clip):
    return logprob.new_empty(logprob.shape, dtype=torch.float32)


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
    gamma, clip = check_log_ratio_inputs(
        "logprob", logprob, "[B, T]", behavior_logprob, mask, gamma, clip
    )
    return _future_value_op(
        logprob.detach(), behavior_logprob.detach(), valid_mask(mask.detach()), gamma, clip
    )
