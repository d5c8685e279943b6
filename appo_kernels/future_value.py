"""Future value of each token: the clipped likelihood gain of the continuation that follows it.

With ``w`` the mask (1 = valid), ``gamma`` in (0, 1] and ``clip`` = epsilon in [0, 1)::

    l_t     = logprob_t - behavior_logprob_t                       (valid positions; 0 elsewhere)
    G_t     = sum_{k>=t} gamma^(k-t) w_k l_k                       (discounted_future_sum of l)
    Omega_t = clip(exp(clamp(G_t, -20, 20)), 1 - clip, 1 + clip)

``l`` is the log-ratio between the current policy and the one that sampled the rollout, so
``exp(G_t)`` is how much more likely the current policy makes the continuation after t (APPO,
arXiv 2606.12384; docs/design.md, "Future value"). NaN propagates: a NaN log-ratio at a valid
position k makes Omega_t NaN for t <= k of its row. The scan is ``appo_kernels._rows``'.
"""

from __future__ import annotations

import torch

from appo_kernels._backend import HAS_TRITON, use_triton
from appo_kernels._ops import custom_op, detached
from appo_kernels._rows import (
    check_log_ratio_inputs,
    launch_row_kernel,
    torch_reverse_scan,
    valid_mask,
)

# --------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------

if HAS_TRITON:  # CUDA tensors, or CPU tensors through Triton's interpreter
    import triton
    import triton.language as tl

    from appo_kernels._rows import reverse_scan_row

    @triton.jit
    def _future_value_kernel(
        logprob_ptr,  # [B, T] float16/bfloat16/float32, row stride stride_logprob
        behavior_ptr,  # [B, T] float16/bfloat16/float32, row stride stride_behavior
        mask_ptr,  # [B, T] bool w, row stride stride_mask
        out_ptr,  # [B, T] float32 Omega, row stride stride_out
        T,  # positions per row
        stride_logprob,
        stride_behavior,
        stride_mask,
        stride_out,
        gamma,  # float32 discount in (0, 1]
        clip,  # float32 clip epsilon in [0, 1)
        BLOCK: tl.constexpr,  # positions per scan block, a power of two
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
            True,  # Omega of the log-ratios
            BLOCK,
        )


# --------------------------------------------------------------------------------------------
# Launcher and PyTorch path
# --------------------------------------------------------------------------------------------


def _triton_future_value(logprob, behavior_logprob, mask, gamma, clip):
    inputs = (logprob, behavior_logprob, mask)
    (out,) = launch_row_kernel(_future_value_kernel, inputs, 1, gamma, clip)
    return out


def _torch_future_value(logprob, behavior_logprob, mask, gamma, clip):
    return torch_reverse_scan(logprob, mask, gamma, behavior_logprob, clip)


# --------------------------------------------------------------------------------------------
# Custom op and public function
# --------------------------------------------------------------------------------------------


@custom_op("appo_kernels::future_value")
def _future_value_op(
    logprob: torch.Tensor,
    behavior_logprob: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    clip: float,
) -> torch.Tensor:
    """[B, T] float log-probs and bool mask, checked by the public function."""
    if use_triton(logprob.device):
        return _triton_future_value(logprob, behavior_logprob, mask, gamma, clip)
    return _torch_future_value(logprob, behavior_logprob, mask, gamma, clip)


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
    """Clipped future likelihood gain ``Omega`` of every token.

    Parameters
    ----------
    logprob : torch.Tensor
        ``[B, T]`` float16, bfloat16 or float32 log-probs of the sampled tokens under the current
        policy (e.g. ``token_stats(...).logprob``). Any row stride.
    behavior_logprob : torch.Tensor
        ``[B, T]`` float log-probs of the same tokens under the policy that sampled them (e.g.
        recorded by the inference engine).
    mask : torch.Tensor
        ``[B, T]`` bool, integer or floating; nonzero marks a valid (response) position.
    gamma : float
        Discount in ``(0, 1]`` over raw positions.
    clip : float
        Epsilon in ``[0, 1)``; Omega lies in ``[1 - clip, 1 + clip]``.

    Returns
    -------
    torch.Tensor
        ``[B, T]`` float32 Omega, defined at every position (1 where no valid position follows
        with a nonzero log-ratio, up to the clip).

    Notes
    -----
    Not differentiable: Omega is a weight, computed from detached inputs. ``G`` is clamped to
    ``[-20, 20]`` before ``exp``, so Omega is finite for any finite input; a ``-inf`` log-ratio
    gives ``1 - clip`` at and before it, a NaN gives NaN there. All tensors on one device.

    Example
    -------
    >>> import torch
    >>> import appo_kernels as ak
    >>> logprob = torch.tensor([[-1.0, -0.5, -2.0]])
    >>> behavior = torch.tensor([[-1.1, -0.5, -1.9]])
    >>> ak.future_value(logprob, behavior, torch.ones(1, 3), clip=0.2)
    tensor([[1.0000, 0.9048, 0.9048]])
    """
    gamma, clip = check_log_ratio_inputs(
        "logprob", logprob, "[B, T]", behavior_logprob, mask, gamma, clip
    )
    return _future_value_op(
        detached(logprob), detached(behavior_logprob), valid_mask(mask), gamma, clip
    )
