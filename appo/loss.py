"""APPO's policy loss: future-likelihood advantage scaling and dual-clip PPO with clip-higher
(docs/design.md, section 9).

Future-likelihood scaling, per token ``t`` of a row (``w`` = response mask)::

    Δ_k = clamp(logπ_θ,k − logπ_old,k, −20, 20)        (detached)
    m_k = 1[Δ_k ≤ log c]                               (drop tokens the policy already boosted > c×)
    F_t = Σ_{k≥t} γ_f^(k−t) m_k w_k Δ_k,  γ_f = 2^(−1/half_life)
    f_t = clip(exp(F_t), 1, 1 + clip)                  ([1 − clip, 1 + clip] if not clip_high_only)
    f_t ← clip(f_t, 1 − clip, 1)   where A_t < 0 and exp(Δ_t) > neg_ratio_cap
    Ã_t = A_t · (1 + bonus · f_t)

A token whose continuation became more likely under the current policy gets a larger weight; the
cap stops a negative advantage from being amplified on a token whose ratio has already run away.

Policy loss, with ``r = exp(logπ_θ − logπ_old)``::

    L_t = max(−Ã_t r_t, −Ã_t clip(r_t, 1 − clip_low, 1 + clip_high))
    L_t = min(L_t, −dual_clip · Ã_t)                   where Ã_t < 0
    loss = Σ_t w_t L_t / Σ_t w_t  + kl_coef · KL  − entropy_coef · H

with the low-variance KL estimator ``k3 = exp(ref − logπ) − (ref − logπ) − 1`` and ``H`` the
token-mean entropy, both over the mask. Positions outside the mask contribute exactly 0 to the
loss and its gradient, whatever their values (NaN included).

Empty mini-batches, one rule for every loss of the project (this module's ``policy_loss`` and the
verl losses of ``appo.integrations.verl``): a mini-batch without a valid token has loss exactly 0
and a zero gradient, still attached to the graph (backward and data-parallel hooks run as
usual), whatever token count is given, 0 included. A token count must be > 0 when the mini-batch
has valid tokens (``ValueError`` naming it): dividing them by 0 is a bug, never a NaN loss.

Two options reproduce the APPO paper's code (verl) where it goes beyond the formula above, both
off by default here (the trainer's ``TrainConfig`` turns them on):

* ``kl_clamp``: each token's k3 is clamped to ``[−kl_clamp, kl_clamp]`` (verl's ``low_var_kl``
  uses 10, ``KL_CLAMP``); a clamped token passes no KL gradient.
* ``max_dual_clipped_per_row``: a row with more than this many *dual-clipped* tokens
  (``Ã < 0`` and ``r > dual_clip``, where the bound ``−dual_clip · Ã`` is active) is dropped: it
  leaves the loss and the token count, as if masked (the paper's code drops rows with more
  than 1).
"""

from __future__ import annotations

import math

import torch

from appo_kernels.discounted_future_sum import discounted_future_sum
from appo_kernels.validation import (
    FLOAT_DTYPES,
    check_count,
    check_float,
    check_fraction,
    check_mask,
    check_ndim,
    check_nonneg,
    check_positive,
    check_same_device,
    check_shape,
)

LOG_RATIO_BOUND = 20.0
KL_CLAMP = 10.0  # verl's low_var_kl clamp of each token's k3
_REAL_DTYPES = FLOAT_DTYPES + (torch.float64,)


def check_loss_inputs(
    tensors: dict[str, torch.Tensor | None],
    mask: object,
    optional: tuple[str, ...] = (),
    mask_name: str = "mask",
) -> torch.Tensor:
    """Float [B, T] tensors of one shape (the first one's) and a {0, 1} mask of that shape, on one
    device; names in ``optional`` may be None. Errors name each tensor by its key (``mask_name``
    for the mask), so trainer adapters pass their host's argument names. Returns the mask as
    bool."""
    reference, first = next(iter(tensors.items()))
    check_ndim(reference, check_float(reference, first, _REAL_DTYPES), 2, "[B, T]")
    present = {}
    for name, x in tensors.items():
        if x is None and name in optional:
            continue
        present[name] = check_float(name, x, _REAL_DTYPES)
        check_shape(name, x, first.shape, reference)
    present[mask_name] = check_mask(mask_name, mask)
    check_shape(mask_name, mask, first.shape, reference)
    check_same_device(present)
    return mask != 0


def check_token_count(name: str, count: object, valid_tokens: int) -> float:
    """A token count to divide a mini-batch's token sums by: a real >= 0, and > 0 when the
    mini-batch has ``valid_tokens`` > 0 (module docstring, empty mini-batches)."""
    count = check_nonneg(name, count)
    if count == 0 and valid_tokens > 0:
        raise ValueError(
            f"{name} must be > 0 when the mini-batch has valid tokens ({valid_tokens}), got 0"
        )
    return count


def _masked_mean(x: torch.Tensor, valid: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    return torch.where(valid, x, 0.0).sum() / count


def future_likelihood_scale(
    advantages: torch.Tensor,
    logprob: torch.Tensor,
    old_logprob: torch.Tensor,
    mask: torch.Tensor,
    *,
    c: float = 3.0,
    half_life: float = 64,
    clip: float = 0.2,
    clip_high_only: bool = True,
    neg_ratio_cap: float = 6.0,
    bonus: float = 1.0,
) -> torch.Tensor:
    """Scaled advantages ``Ã = A · (1 + bonus · f)`` ``[B, T]`` (module docstring).

    ``logprob`` is detached here: the scale is a weight, not a path for gradients. Zero outside
    ``mask``. Computed in float32 (float64 inputs keep float64 outside the scan).
    """
    tensors = {"advantages": advantages, "logprob": logprob, "old_logprob": old_logprob}
    valid = check_loss_inputs(tensors, mask)
    c = check_positive("c", c)
    half_life = check_positive("half_life", half_life)
    clip = check_fraction("clip", clip)
    neg_ratio_cap = check_positive("neg_ratio_cap", neg_ratio_cap)
    bonus = check_nonneg("bonus", bonus)

    dtype = torch.promote_types(advantages.dtype, torch.float32)
    delta = torch.where(valid, logprob.detach().to(dtype) - old_logprob.detach().to(dtype), 0.0)
    delta = delta.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    kept = torch.where(delta <= math.log(c), delta, 0.0)
    future = discounted_future_sum(kept.float(), valid, gamma=2.0 ** (-1.0 / half_life)).to(dtype)
    scale = future.exp().clamp(1.0 if clip_high_only else 1.0 - clip, 1.0 + clip)
    advantages = advantages.to(dtype)
    runaway = (advantages < 0) & (delta.exp() > neg_ratio_cap)
    scale = torch.where(runaway, scale.clamp(1.0 - clip, 1.0), scale)
    return torch.where(valid, advantages * (1.0 + bonus * scale), 0.0)


def ppo_token_loss(
    logprob: torch.Tensor,
    old_logprob: torch.Tensor,
    advantages: torch.Tensor,
    valid: torch.Tensor,
    *,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token dual-clip PPO loss ``L_t`` (module docstring), 0 outside the bool ``valid``, and
    the clamped log-ratio ``logπ_θ − logπ_old`` it used (also 0 outside ``valid``). Unchecked:
    ``policy_loss`` and trainer adapters (``appo.integrations``) validate first."""
    # Mask before any arithmetic, so padding values (even NaN / -inf) reach neither loss nor grad.
    log_ratio = torch.where(valid, logprob - old_logprob.detach(), 0.0)
    log_ratio = log_ratio.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    adv = torch.where(valid, advantages.detach(), 0.0)
    ratio = log_ratio.exp()
    token_loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high))
    if dual_clip is not None:
        token_loss = torch.where(adv < 0, torch.minimum(token_loss, -dual_clip * adv), token_loss)
    return token_loss, log_ratio


def policy_loss(
    logprob: torch.Tensor,
    old_logprob: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    dual_clip: float | None = 3.0,
    ref_logprob: torch.Tensor | None = None,
    kl_coef: float = 0.001,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    num_tokens: float | None = None,
    kl_clamp: float | None = None,
    max_dual_clipped_per_row: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Dual-clip PPO loss with clip-higher, token-mean over the mask (module docstring).

    Args:
        logprob: ``[B, T]`` log-probs of the taken tokens under the current policy (differentiable).
        old_logprob: ``[B, T]`` log-probs under the policy that sampled the rollouts (detached).
        advantages: ``[B, T]`` token advantages, e.g. ``future_likelihood_scale(...)`` (detached).
        mask: ``[B, T]`` {0, 1}: tokens the policy generated (no prompt, tool output or padding).
        clip_low, clip_high: the ratio is clipped to ``[1 − clip_low, 1 + clip_high]``.
        dual_clip: bound ``−dual_clip · Ã`` on the loss of negative-advantage tokens (> 1);
            None turns it off.
        ref_logprob: ``[B, T]`` reference-policy log-probs; adds ``kl_coef`` × the k3 KL.
        entropy: ``[B, T]`` token entropies (may be differentiable); subtracts
            ``entropy_coef`` × their masked mean.
        num_tokens: divide token sums by this count instead of this batch's mask count (the
            token count of the whole batch when gradients are accumulated over micro-batches);
            0 only for a mini-batch without valid tokens (module docstring).
        kl_clamp: clamp each token's k3 to ``[−kl_clamp, kl_clamp]`` (None: no clamp).
        max_dual_clipped_per_row: drop rows with more dual-clipped tokens than this (None: keep
            every row).

    Returns:
        ``(loss, metrics)``: the scalar loss and a dict of float diagnostics (``pg_loss``,
        ``clip_frac_high``, ``clip_frac_low``, ``dual_clip_frac``, ``ratio_mean``, ``ratio_max``,
        ``approx_kl``, ``tokens``, ``rows_dropped``, and ``kl`` / ``entropy`` when given).
    """
    tensors = {
        "logprob": logprob,
        "old_logprob": old_logprob,
        "advantages": advantages,
        "ref_logprob": ref_logprob,
        "entropy": entropy,
    }
    valid = check_loss_inputs(tensors, mask, optional=("ref_logprob", "entropy"))
    clip_low = check_fraction("clip_low", clip_low)
    clip_high = check_nonneg("clip_high", clip_high)
    if dual_clip is not None and check_positive("dual_clip", dual_clip) <= 1.0:
        raise ValueError(f"dual_clip must be > 1 or None, got {dual_clip}")
    kl_coef = check_nonneg("kl_coef", kl_coef)
    entropy_coef = check_nonneg("entropy_coef", entropy_coef)
    if entropy_coef > 0 and entropy is None:
        raise ValueError("entropy must be given when entropy_coef > 0")
    if kl_clamp is not None:
        kl_clamp = check_positive("kl_clamp", kl_clamp)
    if max_dual_clipped_per_row is not None:
        check_count("max_dual_clipped_per_row", max_dual_clipped_per_row)

    token_loss, log_ratio = ppo_token_loss(
        logprob,
        old_logprob,
        advantages,
        valid,
        clip_low=clip_low,
        clip_high=clip_high,
        dual_clip=dual_clip,
    )
    adv = torch.where(valid, advantages.detach(), 0.0)
    ratio = log_ratio.exp()
    dual_clipped = (adv < 0) & (ratio.detach() > (dual_clip or math.inf)) & valid
    rows_dropped = torch.zeros((), dtype=torch.long, device=valid.device)
    if max_dual_clipped_per_row is not None:
        dropped = dual_clipped.sum(dim=1) > max_dual_clipped_per_row
        valid = valid & ~dropped[:, None]
        rows_dropped = dropped.sum()
    valid_count = valid.sum()
    count = valid_count.clamp_min(1)  # an empty mini-batch: 0 / 1 = 0 (module docstring)
    if num_tokens is not None:
        count = check_token_count("num_tokens", num_tokens, int(valid_count)) or 1.0
    pg_loss = _masked_mean(token_loss, valid, count)
    loss = pg_loss

    metrics: dict[str, torch.Tensor] = {"pg_loss": pg_loss}
    if ref_logprob is not None:
        ref_diff = torch.where(valid, ref_logprob.detach() - logprob, 0.0)
        ref_diff = ref_diff.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
        k3 = ref_diff.exp() - ref_diff - 1.0
        if kl_clamp is not None:
            k3 = k3.clamp(-kl_clamp, kl_clamp)
        kl = _masked_mean(k3, valid, count)
        loss = loss + kl_coef * kl
        metrics["kl"] = kl
    if entropy is not None:
        mean_entropy = _masked_mean(entropy, valid, count)
        loss = loss - entropy_coef * mean_entropy
        metrics["entropy"] = mean_entropy

    with torch.no_grad():
        ratio = ratio.detach()
        tokens = valid_count.clamp_min(1)
        metrics.update(
            clip_frac_high=_masked_mean(
                ((adv > 0) & (ratio > 1.0 + clip_high)).float(), valid, tokens
            ),
            clip_frac_low=_masked_mean(
                ((adv < 0) & (ratio < 1.0 - clip_low)).float(), valid, tokens
            ),
            dual_clip_frac=_masked_mean(dual_clipped.float(), valid, tokens),
            ratio_mean=_masked_mean(ratio, valid, tokens),
            ratio_max=torch.where(valid, ratio, 0.0).max() if valid.any() else ratio.new_zeros(()),
            approx_kl=_masked_mean(ratio - 1.0 - log_ratio.detach(), valid, tokens),
            tokens=valid_count,
            rows_dropped=rows_dropped,
        )
    return loss, {name: float(value.detach()) for name, value in metrics.items()}
