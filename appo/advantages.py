"""Procedure-level advantages (docs/design.md, section 8).

Rollouts of one prompt form a group with two kinds: initial rollouts, and branch rollouts that
re-sampled an initial rollout from a token position ``split`` on (they share its prefix
``[0, split)``). Rewards are normalised within each (group, kind)::

    Â_i = (R_i - mean) / (std_population + 1e-6)          (a set of one gets 0)

(``std="sample"`` uses the n − 1 standard deviation instead, as verl's GRPO estimator and the
APPO paper's code do; a set of one still gets 0. ``std="none"`` keeps ``R_i − mean`` unscaled, as
Dr. GRPO and TRL's ``scale_rewards="none"`` do.)

A branch's advantage is credited to the procedure that led to its branch point, the shared prefix of
the rollout it came from. For an initial row ``i`` and token ``t``::

    A_{i,t} = Â_i + mean{ Â_b : b branched from i and t < split_b }

(just ``Â_i`` where no branch of ``i`` covers ``t``). Branch rows get 0 (they are not trained on)
unless ``train_branches=True``, which gives them their own ``Â_b``. Everything outside
``response_mask`` is exactly 0.
"""

from __future__ import annotations

import torch

from appo_kernels.validation import (
    FLOAT_DTYPES,
    check_bool,
    check_float,
    check_int,
    check_mask,
    check_ndim,
    check_same_device,
    check_shape,
)

NORM_EPS = 1e-6


def _validate(rewards, group_ids, is_branch, parent, split, response_mask) -> None:
    check_float("rewards", rewards, FLOAT_DTYPES + (torch.float64,))
    check_ndim("rewards", rewards, 1, "[R]")
    check_bool("is_branch", is_branch)
    named = {"group_ids": group_ids, "is_branch": is_branch, "parent": parent, "split": split}
    for name, x in named.items():
        if name != "is_branch":
            check_int(name, x)
        check_shape(name, x, rewards.shape, "rewards, [R]")
    check_mask("response_mask", response_mask)
    check_ndim("response_mask", response_mask, 2, "[R, T]")
    if response_mask.shape[0] != rewards.shape[0]:
        raise ValueError(
            f"response_mask must have {rewards.shape[0]} rows (as rewards, [R]), "
            f"got shape {tuple(response_mask.shape)}"
        )
    check_same_device({"rewards": rewards, **named, "response_mask": response_mask})

    if not torch.isfinite(rewards).all():
        raise ValueError("rewards must be finite, got NaN or inf")
    rows, length = rewards.shape[0], response_mask.shape[1]
    parent = parent.long()
    if (parent[~is_branch] != -1).any():
        bad = int(torch.nonzero((parent != -1) & ~is_branch)[0])
        raise ValueError(
            f"parent of an initial row must be -1, got parent[{bad}] = {int(parent[bad])}"
        )
    branch_rows = torch.nonzero(is_branch).squeeze(1)
    branch_parent = parent[branch_rows]
    in_range = (branch_parent >= 0) & (branch_parent < rows)
    safe_parent = branch_parent.clamp(0, max(rows - 1, 0))
    valid = in_range & ~is_branch[safe_parent] & (group_ids[safe_parent] == group_ids[branch_rows])
    if not valid.all():
        bad = int(branch_rows[~valid][0])
        raise ValueError(
            f"parent of branch row {bad} must be an initial row of the same group in [0, {rows}), "
            f"got parent[{bad}] = {int(parent[bad])}"
        )
    branch_split = split[branch_rows].long()
    split_ok = (branch_split >= 0) & (branch_split <= length)
    if not split_ok.all():
        bad = int(branch_rows[~split_ok][0])
        raise ValueError(
            f"split of branch row {bad} must be in [0, {length}], got {int(split[bad])}"
        )


STD_CONVENTIONS = ("population", "sample", "none")


def group_normalized_rewards(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    is_branch: torch.Tensor,
    std: str = "population",
) -> torch.Tensor:
    """``Â_i`` per (group, kind), in float64: ``(R - mean) / (std + 1e-6)``, with the population
    (divide by n) or ``"sample"`` (n − 1) standard deviation; ``"none"``: ``R - mean``."""
    keys = torch.stack([group_ids.long(), is_branch.long()], dim=1)
    _, set_of = torch.unique(keys, dim=0, return_inverse=True)
    num_sets = int(set_of.max()) + 1 if set_of.numel() else 0
    r = rewards.double()
    count = torch.zeros(num_sets, dtype=torch.float64, device=r.device)
    count.index_add_(0, set_of, torch.ones_like(r))
    mean = torch.zeros_like(count).index_add_(0, set_of, r) / count
    deviation = r - mean[set_of]
    if std == "none":
        return deviation
    squares = torch.zeros_like(count).index_add_(0, set_of, deviation * deviation)
    variance = squares / (count if std == "population" else (count - 1).clamp_min(1))
    return deviation / (variance.sqrt()[set_of] + NORM_EPS)


def procedure_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    is_branch: torch.Tensor,
    parent: torch.Tensor,
    split: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    train_branches: bool = False,
    std: str = "population",
) -> torch.Tensor:
    """Token advantages ``[R, T]`` float32 (see the module docstring).

    Args:
        rewards: ``[R]`` float, one reward per rollout.
        group_ids: ``[R]`` integer prompt-group id.
        is_branch: ``[R]`` bool, True for branch rollouts.
        parent: ``[R]`` integer, the row of the initial rollout a branch came from; -1 for
            initial rows.
        split: ``[R]`` integer, a branch's first re-sampled position, in ``[0, T]`` (ignored for
            initial rows), in the token coordinates of ``response_mask``.
        response_mask: ``[R, T]`` {0, 1}: the tokens the policy generated (not prompt, tool
            output or padding).
        train_branches: give branch rows their own ``Â_b`` instead of 0.
        std: ``"population"`` (the default) or ``"sample"`` (n − 1, verl's) standard deviation,
            or ``"none"`` (no scaling).
    """
    _validate(rewards, group_ids, is_branch, parent, split, response_mask)
    if std not in STD_CONVENTIONS:
        raise ValueError(f"std must be one of {STD_CONVENTIONS}, got {std!r}")
    rows, length = response_mask.shape
    device = rewards.device
    if rows == 0:
        return torch.zeros(0, length, dtype=torch.float32, device=device)

    a_hat = group_normalized_rewards(rewards, group_ids, is_branch, std)

    # Credit each branch's Â_b to the prefix [0, split_b) of its parent, then average per token.
    branch_rows = torch.nonzero(is_branch).squeeze(1)
    covers = torch.arange(length, device=device) < split[branch_rows].long().unsqueeze(1)  # [Nb, T]
    covers = covers.double()
    target = parent[branch_rows].long()
    credit = torch.zeros(rows, length, dtype=torch.float64, device=device)
    credit.index_add_(0, target, covers * a_hat[branch_rows].unsqueeze(1))
    count = torch.zeros_like(credit).index_add_(0, target, covers)
    branch_mean = credit / count.clamp_min(1.0)  # 0 where no branch covers the token

    own = a_hat.unsqueeze(1).expand(rows, length)
    branch_value = own if train_branches else torch.zeros_like(own)
    advantages = torch.where(is_branch.unsqueeze(1), branch_value, own + branch_mean)
    return torch.where(response_mask != 0, advantages, 0.0).float()
