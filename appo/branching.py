"""Branch-point selection rules, shared by every trainer that branches (``appo.trainer``, the TRL
and verl integrations): which tokens may be branched at, and how each rule ranks them.

Every rule works on ``[R, T]`` response statistics of a batch of initial rollouts, where ``mask``
marks the tokens the policy sampled (never prompt, tool output or padding), and returns the same
:class:`BranchPlan`: ``budget`` points per prompt group from ``select_branch_points`` (a group
without candidates gives none). The rules (docs/design.md, section 7):

- ``"appo"``: the Branching Score ``z(H) · z(Ω)``; preferred tier ``z(H) > 0`` and ``z(Ω) > 0``.
- ``"entropy"``: ``z(H)`` alone, one tier (the entropy-only ablation).
- ``"arpo"``: ARPO's rule (Dong et al., arXiv 2507.19849) at a fixed budget: the candidates are
  the first candidate token after each tool result (``observation_mask``), ranked by the rise of
  the mean entropy of the first ``arpo_window`` policy tokens after that result over the mean of
  the rollout's first ``arpo_window`` (so every rise > 0, where ARPO forks most, ranks first).
- ``"random"``: ``budget`` points drawn uniformly without replacement from the group's candidates
  (a control), reproducible with ``generator``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from appo_kernels import branching_score_from_stats, select_branch_points
from appo_kernels.validation import check_bool, check_count, check_shape

RULES = ("appo", "entropy", "arpo", "random")
# ARPO's entropy window: its code averages the first 20 tokens of each generation turn.
ARPO_WINDOW = 20


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
    blank). Without ``keep_selected_token`` the response's first token is excluded: a branch
    there re-samples the whole response, so it shares no prefix with its parent (it is one more
    independent rollout of the prompt, and its advantage has no prefix to be credited to). With
    ``keep_selected_token`` a row's last sampled token is excluded instead: keeping it would leave
    nothing to re-sample.
    """
    candidates = mask.bool().clone()
    if not keep_selected_token and candidates.shape[1]:
        candidates[:, 0] = False
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
    observation_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    arpo_window: int = ARPO_WINDOW,
) -> BranchPlan:
    """``budget`` branch points per prompt group by ``rule`` (one of :data:`RULES`).

    ``entropy``, ``logprob`` (the trainer's, ``π_old``) and ``behavior_logprob`` (the sampler's)
    are ``[R, T]``; ``mask`` the sampled tokens; ``candidates`` from :func:`branch_candidates`;
    ``group_ids`` ``[R]`` in ``[0, num_groups)``; ``gamma`` and ``clip`` are Ω's (section 5).
    ``observation_mask`` ``[R, T]`` bool marks tool-output tokens inside the responses (required
    by ``"arpo"``); ``generator`` draws the ``"random"`` rule's points; ``arpo_window`` is the
    ``"arpo"`` rule's entropy window (module docstring). Other rules ignore them.
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    bs = branching_score_from_stats(
        entropy, logprob, behavior_logprob, mask, gamma=gamma, clip=clip
    )
    valid = mask.bool()
    if rule == "appo":
        score, preferred = bs.score, (bs.z_entropy > 0) & (bs.z_future > 0)
    elif rule == "entropy":
        score, preferred = torch.where(valid, bs.z_entropy, float("-inf")), None
    elif rule == "arpo":
        if observation_mask is None:
            raise ValueError(
                'observation_mask ([R, T] bool, the tool-output tokens) is required by rule "arpo"'
            )
        check_bool("observation_mask", observation_mask)
        check_shape("observation_mask", observation_mask, valid.shape, "mask")
        check_shape("candidates", check_bool("candidates", candidates), valid.shape, "mask")
        check_count("arpo_window", arpo_window, 1)
        score = entropy_rise_after_tool_results(
            bs.entropy, valid, observation_mask, candidates, arpo_window
        )
        preferred = None
    else:  # "random"
        device = generator.device if generator is not None else valid.device
        draws = torch.rand(valid.shape, generator=generator, device=device).to(valid.device)
        score, preferred = torch.where(valid, draws, float("-inf")), None
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


def entropy_rise_after_tool_results(
    entropy: torch.Tensor,
    mask: torch.Tensor,
    observation_mask: torch.Tensor,
    candidates: torch.Tensor,
    window: int,
) -> torch.Tensor:
    """``[R, T]`` float32: ARPO's score, ``-inf`` except at the first candidate after each tool
    result, where it is ``H_after - H_initial``: the mean entropy of the first ``window`` sampled
    tokens (``mask``) after that tool result (up to the next one) minus the mean of the row's
    first ``window`` sampled tokens (before its first tool result)."""
    rows, length = mask.shape
    observation = observation_mask.bool()
    starts = observation.clone()
    starts[:, 1:] &= ~observation[:, :-1]
    turn = starts.long().cumsum(1)  # 0 before the first tool result, j after the j-th
    turns = int(turn.max()) + 1 if length else 1
    sampled_so_far = mask.long().cumsum(1)
    turn_offset = torch.zeros(rows, turns, dtype=torch.long, device=mask.device)
    turn_offset.scatter_(1, torch.where(starts, turn, 0), torch.where(starts, sampled_so_far, 0))
    rank = sampled_so_far - turn_offset.gather(1, turn)  # 1-based within the turn
    in_window = mask & (rank <= window)
    totals = torch.zeros(rows, turns, dtype=torch.float64, device=mask.device)
    counts = torch.zeros_like(totals)
    totals.scatter_add_(1, turn, torch.where(in_window, entropy.double(), 0.0))
    counts.scatter_add_(1, turn, in_window.double())
    mean = totals / counts.clamp_min(1)
    rise = (mean - mean[:, :1]).float()
    positions = torch.arange(length, device=mask.device).expand(rows, length)
    after_result = candidates & (turn > 0) & (counts[:, :1] > 0).expand(rows, length)
    first = torch.full((rows, turns), length, dtype=torch.long, device=mask.device)
    first.scatter_reduce_(1, turn, torch.where(after_result, positions, length), "amin")
    chosen = after_result & (positions == first.gather(1, turn))
    return torch.where(chosen, rise.gather(1, turn), float("-inf"))
