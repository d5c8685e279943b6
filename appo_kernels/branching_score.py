"""Branching Score of every token: uncertainty times continuation gain (APPO's branching rule).

Per row, over its valid positions (mask nonzero)::

    z(v)_t = (v_t - mean(v)) / (std(v) + 1e-6)      population std; z = 0 at invalid positions
    BS_t   = z(H)_t * z(Omega)_t                     at valid positions, -inf elsewhere

with H the token entropy and Omega the future value (``appo_kernels.future_value``): a token
scores high where the policy is uncertain and the continuation it led to has become more likely.
The mean and variance are corrected two-pass: a first mean m0, then sums of d = v - m0 and d^2 give
mean = m0 + sum(d)/n and var = sum(d^2)/n - (sum(d)/n)^2. That stays accurate when the spread is
small next to the mean, and a constant row gets exactly z = 0 (e.g. every Omega clipped). A row
with one valid position has std 0, so z = 0 and BS = 0 there; a row with none is all -inf. NaN at
a valid position makes that row's scores NaN. docs/design.md, "Branching Score", has the sources.

``branching_score`` = the token-statistics forward pass on the logits + one row kernel for the
rest (two launches on the Triton path). Each public function checks its arguments once, then runs
the unchecked path (``_scores``; ``token_stats.unchecked_forward``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from appo_kernels._backend import HAS_TRITON, use_triton
from appo_kernels._ops import custom_op, detached
from appo_kernels._rows import (
    check_log_ratio_inputs,
    launch_row_kernel,
    torch_reverse_scan,
    valid_mask,
)
from appo_kernels.token_stats import check_token_args, unchecked_forward
from appo_kernels.validation import check_float, check_same_device, check_shape

STD_EPS = 1e-6  # added to the population std of a row


class BranchingScore(NamedTuple):
    """Per-token outputs, each float32 [B, T]."""

    score: torch.Tensor  # z(H) * z(Omega) at valid positions, -inf elsewhere
    entropy: torch.Tensor  # H
    logprob: torch.Tensor  # log-prob of the sampled token under the current policy
    future_value: torch.Tensor  # Omega
    z_entropy: torch.Tensor  # z(H), 0 at invalid positions
    z_future: torch.Tensor  # z(Omega), 0 at invalid positions


# --------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------

if HAS_TRITON:  # CUDA tensors, or CPU tensors through Triton's interpreter
    import triton
    import triton.language as tl

    from appo_kernels._rows import reverse_scan_row

    _STD_EPS = tl.constexpr(STD_EPS)

    @triton.jit
    def _load_scored(mask_ptr, entropy_ptr, omega_ptr, offs, T):
        """(validity, H, Omega) at positions ``offs`` of one row (Omega as stored by the scan)."""
        in_row = offs < T
        valid = tl.load(mask_ptr + offs, mask=in_row, other=0) != 0
        entropy = tl.load(entropy_ptr + offs, mask=in_row, other=0).to(tl.float32)
        return valid, entropy, tl.load(omega_ptr + offs, mask=in_row, other=0)

    @triton.jit
    def _row_sums(mask_ptr, entropy_ptr, omega_ptr, T, shift_entropy, shift_omega, BLOCK):
        """Sums over the row's valid positions of d = H - shift_entropy and e = Omega -
        shift_omega, of d^2 and e^2, and the valid count: (sum d, sum e, sum d^2, sum e^2, n)."""
        sum_entropy = tl.zeros((BLOCK,), tl.float32)
        sum_omega = tl.zeros((BLOCK,), tl.float32)
        sq_entropy = tl.zeros((BLOCK,), tl.float32)
        sq_omega = tl.zeros((BLOCK,), tl.float32)
        count = tl.zeros((BLOCK,), tl.int32)
        for start in range(0, T, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            valid, entropy, omega = _load_scored(mask_ptr, entropy_ptr, omega_ptr, offs, T)
            d_entropy = tl.where(valid, entropy - shift_entropy, 0.0)
            d_omega = tl.where(valid, omega - shift_omega, 0.0)
            sum_entropy += d_entropy
            sum_omega += d_omega
            sq_entropy += d_entropy * d_entropy
            sq_omega += d_omega * d_omega
            count += valid.to(tl.int32)
        return (
            tl.sum(sum_entropy, axis=0),
            tl.sum(sum_omega, axis=0),
            tl.sum(sq_entropy, axis=0),
            tl.sum(sq_omega, axis=0),
            tl.sum(count, axis=0),
        )

    @triton.jit
    def _corrected_moments(rough_mean, sum_deviation, sum_squared_deviation, n):
        """Corrected two-pass moments from the sums of the deviations d = v - rough_mean of the
        valid values: mean = rough_mean + sum(d)/n, var = sum(d^2)/n - (sum(d)/n)^2.
        Returns (mean, std + 1e-6)."""
        correction = sum_deviation / n
        variance = sum_squared_deviation / n - correction * correction
        variance = tl.maximum(variance, 0.0, propagate_nan=tl.PropagateNan.ALL)
        return rough_mean + correction, tl.sqrt(variance) + _STD_EPS

    @triton.jit
    def _branching_score_kernel(
        entropy_ptr,  # [B, T] float16/bfloat16/float32 H, row stride stride_entropy
        logprob_ptr,  # [B, T] float16/bfloat16/float32, row stride stride_logprob
        behavior_ptr,  # [B, T] float16/bfloat16/float32, row stride stride_behavior
        mask_ptr,  # [B, T] bool, nonzero = valid, row stride stride_mask
        score_ptr,  # [B, T] float32 out: z(H) z(Omega), -inf off the mask
        omega_ptr,  # [B, T] float32 out: Omega
        z_entropy_ptr,  # [B, T] float32 out: z(H)
        z_omega_ptr,  # [B, T] float32 out: z(Omega); the four outputs share stride_out
        T,
        stride_entropy,
        stride_logprob,
        stride_behavior,
        stride_mask,
        stride_out,
        gamma,  # float32 discount in (0, 1]
        clip,  # float32 clip epsilon in [0, 1)
        BLOCK: tl.constexpr,  # positions per block
    ):
        """One program per row, four passes over the row (see the module doc):

        1. Omega by the reverse scan (``reverse_scan_row``), stored;
        2. sums of H and Omega over the valid positions and their count: rough means;
        3. sums of the deviations from the rough means and of their squares (corrected two-pass);
        4. z-scores and the score.
        """
        row = tl.program_id(0).to(tl.int64)
        entropy_ptr += row * stride_entropy
        mask_ptr += row * stride_mask
        score_ptr += row * stride_out
        omega_ptr += row * stride_out
        z_entropy_ptr += row * stride_out
        z_omega_ptr += row * stride_out
        reverse_scan_row(
            logprob_ptr + row * stride_logprob,
            behavior_ptr + row * stride_behavior,
            mask_ptr,
            omega_ptr,
            T,
            gamma,
            clip,
            True,
            BLOCK,
        )
        tl.debug_barrier()  # the passes below read Omega that other threads of this program stored

        sum_entropy, sum_omega, _, _, count = _row_sums(
            mask_ptr, entropy_ptr, omega_ptr, T, 0.0, 0.0, BLOCK
        )
        n = tl.maximum(count, 1).to(tl.float32)
        rough_mean_entropy = sum_entropy / n
        rough_mean_omega = sum_omega / n
        dev_entropy, dev_omega, sq_entropy, sq_omega, _ = _row_sums(
            mask_ptr, entropy_ptr, omega_ptr, T, rough_mean_entropy, rough_mean_omega, BLOCK
        )
        mean_entropy, scale_entropy = _corrected_moments(
            rough_mean_entropy, dev_entropy, sq_entropy, n
        )
        mean_omega, scale_omega = _corrected_moments(rough_mean_omega, dev_omega, sq_omega, n)

        for start in range(0, T, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            valid, entropy, omega = _load_scored(mask_ptr, entropy_ptr, omega_ptr, offs, T)
            z_entropy = tl.where(valid, (entropy - mean_entropy) / scale_entropy, 0.0)
            z_omega = tl.where(valid, (omega - mean_omega) / scale_omega, 0.0)
            score = tl.where(valid, z_entropy * z_omega, float("-inf"))
            tl.store(z_entropy_ptr + offs, z_entropy, mask=offs < T)
            tl.store(z_omega_ptr + offs, z_omega, mask=offs < T)
            tl.store(score_ptr + offs, score, mask=offs < T)


# --------------------------------------------------------------------------------------------
# Launcher and PyTorch path
# --------------------------------------------------------------------------------------------


def _triton_branching_score(entropy, logprob, behavior_logprob, mask, gamma, clip):
    inputs = (entropy, logprob, behavior_logprob, mask)
    return launch_row_kernel(_branching_score_kernel, inputs, 4, gamma, clip)


def _torch_z_score(values: torch.Tensor, mask: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """z(v) over each row's valid positions (the last dimension), by the same corrected two-pass
    moments; ``values`` may stack several [B, T] tensors in front."""
    rough_mean = torch.where(mask, values, 0.0).sum(dim=-1, keepdim=True) / count
    deviation = torch.where(mask, values - rough_mean, 0.0)
    correction = deviation.sum(dim=-1, keepdim=True) / count
    variance = torch.linalg.vecdot(deviation, deviation).unsqueeze(-1) / count
    scale = (variance - correction.square()).clamp_(min=0).sqrt_().add_(STD_EPS)
    return torch.where(mask, (values - rough_mean - correction) / scale, 0.0)


def _torch_branching_score(entropy, logprob, behavior_logprob, mask, gamma, clip):
    omega = torch_reverse_scan(logprob, mask, gamma, behavior_logprob, clip)
    count = mask.sum(dim=-1, keepdim=True).clamp_(min=1)
    # Both z-scores in one pass over the stacked [2, B, T] values; z(Omega) is copied out, as
    # custom-op outputs must not share storage.
    z_entropy, z_omega = _torch_z_score(torch.stack([entropy.float(), omega]), mask, count)
    score = torch.where(mask, z_entropy * z_omega, float("-inf"))
    return score, omega, z_entropy, z_omega.clone()


# --------------------------------------------------------------------------------------------
# Custom op and public functions
# --------------------------------------------------------------------------------------------


@custom_op("appo_kernels::branching_score_from_stats")
def _branching_score_op(
    entropy: torch.Tensor,
    logprob: torch.Tensor,
    behavior_logprob: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    clip: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B, T] float statistics and bool mask, checked by the public functions. Returns
    (score, future_value, z_entropy, z_future)."""
    if use_triton(entropy.device):
        return _triton_branching_score(entropy, logprob, behavior_logprob, mask, gamma, clip)
    return _torch_branching_score(entropy, logprob, behavior_logprob, mask, gamma, clip)


@_branching_score_op.register_fake
def _(entropy, logprob, behavior_logprob, mask, gamma, clip):
    return tuple(entropy.new_empty(entropy.shape, dtype=torch.float32) for _ in range(4))


def _scores(entropy, logprob, behavior_logprob, mask, gamma, clip) -> BranchingScore:
    """The scores of checked [B, T] arguments (the body of both public functions); nothing is
    recorded for autograd."""
    entropy, logprob = detached(entropy), detached(logprob)
    score, omega, z_entropy, z_omega = _branching_score_op(
        entropy, logprob, detached(behavior_logprob), valid_mask(mask), gamma, clip
    )
    return BranchingScore(score, entropy.float(), logprob.float(), omega, z_entropy, z_omega)


def branching_score_from_stats(
    entropy: torch.Tensor,
    logprob: torch.Tensor,
    behavior_logprob: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    clip: float = 0.2,
) -> BranchingScore:
    """Branching Score from per-token statistics already at hand (e.g. from ``token_stats``).

    Parameters
    ----------
    entropy : torch.Tensor
        ``[B, T]`` float16, bfloat16 or float32 entropy H of the current policy at each
        position. Any row stride.
    logprob : torch.Tensor
        ``[B, T]`` float log-prob of the sampled token under the current policy.
    behavior_logprob : torch.Tensor
        ``[B, T]`` float log-prob of the same token under the policy that sampled the rollout.
    mask : torch.Tensor
        ``[B, T]`` bool, integer or floating; nonzero marks a valid (response) position.
    gamma : float
        Discount in ``(0, 1]`` of the future value.
    clip : float
        Clip epsilon in ``[0, 1)`` of the future value.

    Returns
    -------
    BranchingScore
        ``(score, entropy, logprob, future_value, z_entropy, z_future)``, each ``[B, T]``
        float32: ``score = z(H) z(Omega)`` at valid positions and ``-inf`` elsewhere; ``entropy``
        and ``logprob`` are the inputs as float32; ``z_*`` are 0 at invalid positions.

    Notes
    -----
    Not differentiable: scores rank positions, they are computed from detached inputs. z-scores
    are per row (population std + 1e-6); a row with fewer than two valid positions scores 0 at
    its valid position (if any). A NaN at a valid position makes its row's scores NaN; the
    other rows are untouched. All tensors on one device.

    Example
    -------
    >>> import torch
    >>> import appo_kernels as ak
    >>> entropy = torch.tensor([[0.5, 2.0, 1.0, 0.1]])
    >>> logprob = torch.tensor([[-0.1, -1.0, -0.2, -0.3]])
    >>> behavior = torch.tensor([[-0.1, -1.2, -0.2, -0.3]])
    >>> out = ak.branching_score_from_stats(entropy, logprob, behavior, torch.ones(1, 4))
    >>> out.future_value
    tensor([[1.2000, 1.2000, 1.0000, 1.0000]])
    >>> out.score
    tensor([[-0.5629,  1.5479, -0.1407,  1.1257]])
    """
    gamma, clip = check_log_ratio_inputs(
        "logprob", logprob, "[B, T]", behavior_logprob, mask, gamma, clip
    )
    check_float("entropy", entropy)
    check_shape("entropy", entropy, logprob.shape, "logprob")
    check_same_device({"entropy": entropy, "logprob": logprob})
    return _scores(entropy, logprob, behavior_logprob, mask, gamma, clip)


def branching_score(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    behavior_logprob: torch.Tensor,
    mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    gamma: float = 1.0,
    clip: float = 0.2,
    ignore_index: int = -100,
) -> BranchingScore:
    """Branching Score straight from logits: exact full-vocabulary entropy and log-probs by the
    token-statistics forward pass (one streaming pass over the vocabulary), then the per-row
    score kernel.

    Parameters
    ----------
    logits : torch.Tensor
        ``[B, T, V]`` float16, bfloat16 or float32 logits; ``logits[:, t]`` produced the token
        ``tokens[:, t]``. The last dimension must be contiguous for a copy-free read (a shifted
        view such as ``logits[:, :-1]`` is read in place).
    tokens : torch.Tensor
        ``[B, T]`` integer sampled tokens in ``[0, V)``, or ``ignore_index`` (logprob 0 there,
        e.g. at padding).
    behavior_logprob : torch.Tensor
        ``[B, T]`` float log-probs of ``tokens`` under the policy that sampled them.
    mask : torch.Tensor
        ``[B, T]`` bool, integer or floating; nonzero marks a valid (response) position.
    temperature : float
        Sampling temperature ``> 0``: statistics of ``softmax(logits / temperature)``.
    gamma : float
        Discount in ``(0, 1]`` of the future value.
    clip : float
        Clip epsilon in ``[0, 1)`` of the future value.
    ignore_index : int
        Token id that marks positions without a token.

    Returns
    -------
    BranchingScore
        As :func:`branching_score_from_stats`, with ``entropy`` and ``logprob`` computed from
        ``logits``.

    Notes
    -----
    Same as :func:`branching_score_from_stats`; nothing is recorded for autograd. Token ids
    outside ``[0, V)`` other than ``ignore_index`` raise ``ValueError``.

    Example
    -------
    >>> import torch
    >>> import appo_kernels as ak
    >>> logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 0.0, 0.0], [5.0, 0.0, 0.0]]])
    >>> tokens = torch.tensor([[0, 1, 0]])
    >>> behavior = torch.tensor([[-0.3, -1.0, -0.1]])
    >>> out = ak.branching_score(logits, tokens, behavior, torch.ones(1, 3))
    >>> out.entropy
    tensor([[0.6656, 1.0986, 0.0799]])
    >>> out.score
    tensor([[ 0.0200, -1.5054, -1.4531]])
    """
    gamma, clip = check_log_ratio_inputs(
        "logits", logits, "[B, T, V]", behavior_logprob, mask, gamma, clip
    )
    tokens, temperature = check_token_args(logits, tokens, temperature, ignore_index)
    logprob, entropy, _, _ = unchecked_forward(logits, tokens, temperature, ignore_index)
    return _scores(entropy, logprob, behavior_logprob, mask, gamma, clip)
