"""Branch-point selection rules, shared by every trainer that branches (``appo.trainer``, the TRL
and verl integrations): which tokens may be branched at, and how each rule ranks them.

Every rule works on ``[R, T]`` response statistics of a batch of initial rollouts, where ``mask``
marks the tokens the policy sampled (never prompt, tool output or padding), and returns the same
:class:`BranchPlan`: ``budget`` points per prompt group from ``select_branch_points`` (a group
without candidates gives none). The rules (docs/design.md, section 7):

- ``"appo"``: the Branching Score ``z(H) · z(Ω)``; preferred tier ``z(H) > 0`` and ``z(Ω) > 0``.
- ``"entropy"``: ``z(H)`` alone, one tier (the entropy-only ablation).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from appo_kernels import branching_score_from_stats, select_branch_points

RULES = ("appo", "entropy")


class BranchPlan(NamedTuple):
    """Where to branch, and the per-token statistics that chose it.

    ``rows``, ``positions``, ``scores``: ``[N]`` (int64, int64, float32), the chosen (row,
    position) pairs in group order, each group's picks in rank order. ``score`` is the rule's
    ``[R, T]`` ranking score (``-inf`` off ``mask``); ``entropy`` and ``future_value`` are
    ``[R, T]`` float32 (Ω is computed for every rule, for the diagnostics).
    """

    rows: torch.Tensor
    positions: torch.Tensor
    scores: torch.Tensor
    score: torch.Tensor
    entropy: torch.Tensor
    future_value: torch.Tensor

    def points(self) -> list[tuple[int, int]]:
        """The chosen (row, position) pairs as Python ints."""
        return list(zip(self.rows.tolist(), self.positions.tolist()))


def branch_candidates(
    mask: torch.Tensor,
    tokens: torch.Tensor,
    *,
    blank_tokens: torch.Tensor | None = None,
    keep_selected_token: bool = False,
) -> torch.Tensor:
    """``[R, T]`` bool: the positions a branch may start at.

    Sampled tokens (``mask``) that are not blank (``blank_tokens``: a bool table indexed by token
    id, True for ids never to branch at, e.g. whitespace-only ones; ids past its end are not
    blank). With ``keep_selected_token`` a row's last sampled token is excluded too: keeping it
    would leave nothing to re-sample.
    """
    candidates = mask.bool().clone()
    if blank_tokens is not None:
        in_table = (tokens >= 0) & (tokens < blank_tokens.shape[0])
        candidates &= ~(in_table & blank_tokens[torch.where(in_table, tokens, 0).long()])
    if keep_selected_token:
        positions = torch.arange(mask.shape[1], device=mask.device)
        last = torch.where(mask.bool(), positions, -1).amax(dim=1)
        rows = torch.arange(mask.shape[0], device=mask.device)
        candidates[rows, last.clamp_min(0)] &= last < 0
    return candidates


def plan_branches(
    rule: str,
    *,
    entropy: torch.Tensor,
    logprob: torch.Tensor,
    behavior_logprob: torch.Tensor,
    mask: torch.Tensor,
    candidates: torch.Tensor,
    group_ids: torch.Tensor,
    budget: int,
    num_groups: int | None = None,
    gamma: float = 1.0,
    clip: float = 0.2,
) -> BranchPlan:
    """``budget`` branch points per prompt group by ``rule`` (one of :data:`RULES`).

    ``entropy``, ``logprob`` (the trainer's, ``π_old``) and ``behavior_logprob`` (the sampler's)
    are ``[R, T]``; ``mask`` the sampled tokens; ``candidates`` from :func:`branch_candidates`;
    ``group_ids`` ``[R]`` in ``[0, num_groups)``; ``gamma`` and ``clip`` are Ω's (section 5).
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    bs = branching_score_from_stats(
        entropy, logprob, behavior_logprob, mask, gamma=gamma, clip=clip
    )
    if rule == "appo":
        score, preferred = bs.score, (bs.z_entropy > 0) & (bs.z_future > 0)
    else:  # "entropy"
        score, preferred = torch.where(mask.bool(), bs.z_entropy, float("-inf")), None
    points = select_branch_points(
        score, candidates, group_ids, budget, preferred=preferred, num_groups=num_groups
    )
    chosen = points.rows.flatten() >= 0
    return BranchPlan(
        rows=points.rows.flatten()[chosen],
        positions=points.positions.flatten()[chosen],
        scores=points.scores.flatten()[chosen],
        score=score,
        entropy=bs.entropy,
        future_value=bs.future_value,
    )
