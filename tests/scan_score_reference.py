"""Plain float64 references and shared helpers for the scan, score and selection op tests.

The references follow SPEC sections 2.2-2.4 literally (Python loops over positions and rows) so
that they are easy to check by eye; they are slow, so the tests keep shapes small.
"""

from __future__ import annotations

import math

import pytest
import torch
from aot import ARCHS, KernelCase, compile_kernels


def random_mask(gen: torch.Generator, B: int, T: int, keep: float = 0.7) -> torch.Tensor:
    """A random bool [B, T] mask whose first row is all invalid and second row has one valid
    position (when B allows), the edge cases every row op must handle."""
    mask = torch.rand(B, T, generator=gen) < keep
    if B >= 2:
        mask[0] = False
    if B >= 3 and T >= 1:
        mask[1] = False
        mask[1, T // 2] = True
    return mask


def discounted_sum_ref(values: torch.Tensor, mask: torch.Tensor, gamma: float):
    """(G, bound) in float64: G_t = w_t r_t + gamma G_{t+1}; ``bound`` is the same recurrence on
    |w r|, the scale that float32 rounding errors are relative to."""
    values = torch.where(mask.bool(), values.double(), 0.0)
    out, bound = torch.zeros_like(values), torch.zeros_like(values)
    carry = torch.zeros(values.shape[0], dtype=torch.float64)
    carry_abs = torch.zeros_like(carry)
    for t in reversed(range(values.shape[1])):
        carry = values[:, t] + gamma * carry
        carry_abs = values[:, t].abs() + gamma * carry_abs
        out[:, t], bound[:, t] = carry, carry_abs
    return out, bound


def future_value_ref(logprob, behavior_logprob, mask, gamma: float, clip: float) -> torch.Tensor:
    gain, _ = discounted_sum_ref(logprob.double() - behavior_logprob.double(), mask, gamma)
    return gain.clamp(-20.0, 20.0).exp().clamp(1.0 - clip, 1.0 + clip)


def z_score_ref(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(values.shape, dtype=torch.float64)
    for b in range(values.shape[0]):
        v = values[b].double()[mask[b].bool()]
        if v.numel():
            mean = v.sum() / v.numel()
            std = math.sqrt(float(((v - mean) ** 2).sum() / v.numel()))
            out[b][mask[b].bool()] = (v - mean) / (std + 1e-6)
    return out


def branching_score_ref(entropy, logprob, behavior_logprob, mask, gamma: float, clip: float):
    """(score, future_value, z_entropy, z_future) in float64 (SPEC section 2.3)."""
    omega = future_value_ref(logprob, behavior_logprob, mask, gamma, clip)
    z_entropy, z_future = z_score_ref(entropy, mask), z_score_ref(omega, mask)
    score = torch.where(mask.bool(), z_entropy * z_future, -math.inf)
    return score, omega, z_entropy, z_future


def select_ref(score, candidates, group_ids, budget: int, preferred=None, num_groups=None):
    """Brute force: per group, sort candidate tuples (-tier, -score, row, position)."""
    G = int(group_ids.max()) + 1 if num_groups is None else num_groups
    rows = torch.full((G, budget), -1, dtype=torch.int64)
    positions = torch.full((G, budget), -1, dtype=torch.int64)
    scores = torch.full((G, budget), -math.inf, dtype=torch.float32)
    for g in range(G):
        ranked = []
        for b in range(score.shape[0]):
            for t in range(score.shape[1]):
                s = float(score[b, t])
                if group_ids[b] == g and candidates[b, t] and s > -math.inf:  # NaN fails too
                    tier = int(preferred[b, t]) if preferred is not None else 0
                    ranked.append((-tier, -s, b, t))
        ranked.sort()
        for j in range(budget if ranked else 0):
            _, neg_score, rows[g, j], positions[g, j] = ranked[j % len(ranked)]
            scores[g, j] = -neg_score
    return rows, positions, scores


def assert_close_to_ref(actual: torch.Tensor, expected: torch.Tensor, scale=1.0, tol=1e-5):
    """|actual - expected| <= tol * (scale + 1) elementwise, with equal non-finite patterns."""
    assert actual.dtype == torch.float32
    assert actual.shape == expected.shape
    actual = actual.double()
    assert torch.equal(actual.isnan(), expected.isnan())
    finite = expected.isfinite()
    assert torch.equal(actual[~finite & ~expected.isnan()], expected[~finite & ~expected.isnan()])
    error = (actual - expected).abs()[finite]
    limit = (tol * (torch.as_tensor(scale, dtype=torch.float64).expand(expected.shape) + 1))[finite]
    assert bool((error <= limit).all()), f"max error {error.max():.3g}"


def assert_rejects(exc: type, arg_name: str, fn, *args, **kwargs) -> None:
    """``fn`` raises ``exc`` with a message that names ``arg_name``."""
    with pytest.raises(exc, match=arg_name):
        fn(*args, **kwargs)


def assert_compiles_without_spills(module: str, kernel: str, signature: dict, constexpr_sets):
    """AOT-compiles ``kernel`` for every arch in ``aot.ARCHS`` and every constexpr set; asserts
    no LOCAL (spill) memory."""
    cases = [
        KernelCase(module, kernel, signature, constexprs, arch=arch)
        for arch in ARCHS
        for constexprs in constexpr_sets
    ]
    for case, result in zip(cases, compile_kernels(cases)):
        assert result.local == 0, f"{kernel} sm_{case.arch} {case.constexprs}: {result}"
