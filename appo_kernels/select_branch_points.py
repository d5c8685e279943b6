"""Branch-point selection per prompt group: the top ``budget`` positions of each group.

A position (b, t) is a candidate when ``candidates[b, t]`` is set and ``score[b, t]`` is neither
-inf nor NaN. Within group g (the rows b with ``group_ids[b] == g``, e.g. all initial rollouts of
one prompt, pooled), candidates are ranked by

    (tier desc, score desc, b asc, t asc),   tier = 1 if ``preferred[b, t]`` else 0

(``preferred=None``: one tier). The group takes the first ``budget`` of that ranking; a group with
fewer candidates repeats its ranking from the top until ``budget`` slots are filled (rank order);
a group with none gets row = position = -1 and score = -inf in every slot. -0.0 ranks as +0.0.

The Triton kernel packs the ranking into one sortable int64 per position,

    key = tier << 62 | (ordered score bits + 2^31) << 30 | (2^30 - 1 - (b * T + t))

(``ordered score bits`` = the float32's bit pattern made monotone as a signed int32: negative
floats have their 31 low bits flipped), so each of the ``budget`` rounds of a group is one arg-max
over the keys below the previous pick. That needs ``B * T <= 2^30`` positions. docs/design.md,
"Branch-point selection", has the details.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from appo_kernels._backend import HAS_TRITON, launch_device, use_triton
from appo_kernels._ops import custom_op, detached
from appo_kernels._rows import block_size, rows_last_dim_contiguous
from appo_kernels.validation import (
    capturing_cuda_graph,
    check_bool,
    check_count,
    check_float,
    check_int,
    check_ndim,
    check_same_device,
    check_shape,
    min_max,
    shown,
)

INDEX_BITS = 30
INDEX_MASK = (1 << INDEX_BITS) - 1  # also the largest flat index b * T + t
TIER_BIT = 1 << 62
MIN_SLOT_LIMIT = 1 << 16  # output slots (num_groups * budget) allowed whatever the batch size


class BranchPoints(NamedTuple):
    """Chosen branch points, each [G, budget]: slot j of group g is its j-th pick."""

    rows: torch.Tensor  # int64 row of ``score``; -1 when the group has no candidate
    positions: torch.Tensor  # int64 position in that row; -1 when the group has no candidate
    scores: torch.Tensor  # float32 score at the pick; -inf when the group has no candidate


# --------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------

if HAS_TRITON:  # CUDA tensors, or CPU tensors through Triton's interpreter
    import triton
    import triton.language as tl

    _INDEX_BITS = tl.constexpr(INDEX_BITS)
    _INDEX_MASK = tl.constexpr(INDEX_MASK)
    _TIER_BIT = tl.constexpr(TIER_BIT)

    @triton.jit
    def _rank_keys(
        score_ptr,  # [T] float16/bfloat16/float32 scores of row ``row``
        candidates_ptr,  # [T] bool
        preferred_ptr,  # [T] bool, read only if HAS_PREFERRED
        row,  # int64 row index b
        T,
        offs,  # [BLOCK] positions t
        HAS_PREFERRED: tl.constexpr,
    ):
        """Packed ranking key (int64, module doc) of positions ``offs`` of ``row``; -1 for
        non-candidates."""
        in_row = offs < T
        score = tl.load(score_ptr + offs, mask=in_row, other=float("-inf")).to(tl.float32)
        allowed = tl.load(candidates_ptr + offs, mask=in_row, other=0) != 0
        is_candidate = allowed & (score > float("-inf"))  # NaN compares false
        score = tl.where(score == 0.0, 0.0, score)  # -0.0 ranks as +0.0
        bits = score.to(tl.int32, bitcast=True)
        ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64) + 2147483648
        reversed_index = _INDEX_MASK - (row * T + offs)
        key = (ordered << _INDEX_BITS) | reversed_index
        if HAS_PREFERRED:
            preferred = tl.load(preferred_ptr + offs, mask=in_row, other=0) != 0
            key = tl.where(preferred, key | _TIER_BIT, key)
        return tl.where(is_candidate, key, -1)

    @triton.jit
    def _select_branch_points_kernel(
        score_ptr,  # [B, T] float16/bfloat16/float32, row stride stride_score
        candidates_ptr,  # [B, T] bool, row stride stride_candidates
        preferred_ptr,  # [B, T] bool, row stride stride_preferred (read only if HAS_PREFERRED)
        group_ids_ptr,  # [B] int64 prompt group of each row
        rows_ptr,  # [G, budget] int64 out: row of each pick, -1 for none
        positions_ptr,  # [G, budget] int64 out: position of each pick, -1 for none
        scores_ptr,  # [G, budget] float32 out: score of each pick, -inf for none
        B,
        T,
        stride_score,
        stride_candidates,
        stride_preferred,
        budget,  # picks per group
        HAS_PREFERRED: tl.constexpr,
        BLOCK: tl.constexpr,  # positions per block, a power of two
    ):
        """One program per group, ``budget`` rounds. Round j takes the largest key below the
        previous pick over the group's rows; when none is left it wraps to the group's first
        pick, so short groups repeat their ranking in order."""
        group = tl.program_id(0)
        out = group.to(tl.int64) * budget
        previous = tl.full((), 0x7FFFFFFFFFFFFFFF, tl.int64)
        first = tl.full((), -1, tl.int64)
        for slot in range(budget):
            best = tl.full((), -1, tl.int64)
            for row in range(B):
                if tl.load(group_ids_ptr + row) == group:
                    r = tl.cast(row, tl.int64)
                    for start in range(0, T, BLOCK):
                        keys = _rank_keys(
                            score_ptr + r * stride_score,
                            candidates_ptr + r * stride_candidates,
                            preferred_ptr + r * stride_preferred,
                            r,
                            T,
                            start + tl.arange(0, BLOCK),
                            HAS_PREFERRED,
                        )
                        best = tl.maximum(best, tl.max(tl.where(keys < previous, keys, -1), axis=0))
            if best < 0:
                best = first
            if slot == 0:
                first = best
            previous = best
            flat = _INDEX_MASK - (best & _INDEX_MASK)
            pick_row = tl.where(best < 0, -1, flat // T)
            pick_position = tl.where(best < 0, -1, flat % T)
            pick_score = tl.load(
                score_ptr + pick_row * stride_score + pick_position,
                mask=best >= 0,
                other=float("-inf"),
            ).to(tl.float32)
            tl.store(rows_ptr + out + slot, pick_row)
            tl.store(positions_ptr + out + slot, pick_position)
            tl.store(scores_ptr + out + slot, pick_score)


# --------------------------------------------------------------------------------------------
# Launcher and PyTorch path
# --------------------------------------------------------------------------------------------


def _triton_select_branch_points(score, candidates, preferred, group_ids, num_groups, budget):
    """One program per group; ``group_ids`` int64 in [0, num_groups), B * T > 0."""
    B, T = score.shape
    rows = torch.empty((num_groups, budget), dtype=torch.int64, device=score.device)
    positions = torch.empty_like(rows)
    scores = torch.empty((num_groups, budget), dtype=torch.float32, device=score.device)
    has_preferred = preferred is not None
    score, candidates = rows_last_dim_contiguous(score), rows_last_dim_contiguous(candidates)
    # Without a preferred mask the kernel never reads its pointer; pass candidates in its place.
    preferred = rows_last_dim_contiguous(preferred) if has_preferred else candidates
    with launch_device(rows):
        _select_branch_points_kernel[(num_groups,)](
            score,
            candidates,
            preferred,
            group_ids,
            rows,
            positions,
            scores,
            B,
            T,
            score.stride(0),
            candidates.stride(0),
            preferred.stride(0),
            budget,
            HAS_PREFERRED=has_preferred,
            BLOCK=block_size(T),
        )
    return rows, positions, scores


def _torch_select_branch_points(score, candidates, preferred, group_ids, num_groups, budget):
    """Stable sorts from the last ranking key to the first, then per-group slots."""
    is_candidate = candidates & (score > float("-inf"))
    rows, positions = is_candidate.nonzero(as_tuple=True)  # (row, position) ascending
    values = score[rows, positions].float()
    order = torch.arange(rows.numel(), device=score.device)
    keys = [(values, True)]
    if preferred is not None:
        keys.append((preferred[rows, positions].to(torch.int8), True))
    keys.append((group_ids[rows], False))
    for key, descending in keys:
        order = order[torch.sort(key[order], stable=True, descending=descending).indices]
    rows, positions, values = rows[order], positions[order], values[order]
    groups = group_ids[rows]

    # Slot j of a group with n candidates takes its pick j % n; an empty group takes a sentinel
    # appended after the ranking.
    counts = torch.bincount(groups, minlength=num_groups)
    starts = counts.cumsum(0) - counts
    slots = torch.arange(budget, device=score.device)
    picks = starts[:, None] + slots[None, :] % counts.clamp(min=1)[:, None]
    picks = torch.where(counts[:, None] > 0, picks, rows.numel())
    no_index = torch.tensor([-1], device=score.device)
    no_score = torch.tensor([float("-inf")], device=score.device)
    return (
        torch.cat([rows, no_index])[picks],
        torch.cat([positions, no_index])[picks],
        torch.cat([values, no_score])[picks],
    )


def _check_output_size(num_groups: int, budget: int, B: int, T: int) -> None:
    """The outputs hold ``num_groups * budget`` slots: at most ``max(B * T, MIN_SLOT_LIMIT)``,
    since more slots than positions could only repeat picks. A stray budget cannot allocate an
    absurd output (nor overflow the op's int64 arguments)."""
    limit, groups = max(B * T, MIN_SLOT_LIMIT), max(num_groups, 1)
    if groups * budget > limit:
        raise ValueError(
            f"budget must be <= {limit // groups} for {groups} group(s): the outputs hold "
            f"num_groups * budget slots, at most max(B * T, {MIN_SLOT_LIMIT}) = {limit} (more "
            f"slots than positions could only repeat picks), got {shown(budget)}"
        )


# --------------------------------------------------------------------------------------------
# Custom op and public function
# --------------------------------------------------------------------------------------------


@custom_op("appo_kernels::select_branch_points")
def _select_branch_points_op(
    score: torch.Tensor,
    candidates: torch.Tensor,
    preferred: torch.Tensor | None,
    group_ids: torch.Tensor,
    num_groups: int,
    budget: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tensors checked by the public function; ``num_groups = -1``: ``group_ids.max() + 1``
    (0 for an empty batch)."""
    B, T = score.shape
    # The range check reads group_ids on the host; under CUDA-graph capture (num_groups given)
    # it is skipped: the kernel only compares ids, so an out-of-range id selects nothing.
    if B > 0 and not (num_groups >= 0 and capturing_cuda_graph(group_ids)):
        low, high = min_max(group_ids)
        if num_groups < 0:
            if high >= B:
                raise ValueError(
                    f"group_ids must lie in [0, B={B}) (a prompt group is a set of rows of "
                    f"score) when num_groups is not given, got values up to {high}"
                )
            num_groups = high + 1
            _check_output_size(num_groups, budget, B, T)
        if low < 0 or high >= num_groups:
            raise ValueError(
                f"group_ids must lie in [0, num_groups={num_groups}), got values in [{low}, {high}]"
            )
    num_groups = max(num_groups, 0)
    if B == 0 or T == 0:  # no candidate anywhere
        rows = torch.full((num_groups, budget), -1, dtype=torch.int64, device=score.device)
        scores = torch.full((num_groups, budget), float("-inf"), device=score.device)
        return rows, rows.clone(), scores
    group_ids = group_ids.long()
    if use_triton(score.device):
        select = _triton_select_branch_points
    else:
        select = _torch_select_branch_points
    return select(score, candidates, preferred, group_ids, num_groups, budget)


@_select_branch_points_op.register_fake
def _(score, candidates, preferred, group_ids, num_groups, budget):
    if num_groups < 0:
        num_groups = torch.library.get_ctx().new_dynamic_size()
    rows = score.new_empty((num_groups, budget), dtype=torch.int64)
    return rows, torch.empty_like(rows), score.new_empty((num_groups, budget), dtype=torch.float32)


def select_branch_points(
    score: torch.Tensor,
    candidates: torch.Tensor,
    group_ids: torch.Tensor,
    budget: int,
    *,
    preferred: torch.Tensor | None = None,
    num_groups: int | None = None,
) -> BranchPoints:
    """Top-``budget`` branch points of each prompt group (the module doc has the exact ranking).

    Parameters
    ----------
    score : torch.Tensor
        ``[B, T]`` float16, bfloat16 or float32 branching scores (e.g.
        ``BranchingScore.score``); ``-inf`` and NaN positions are never chosen. Any row stride.
    candidates : torch.Tensor
        ``[B, T]`` bool: positions the caller allows (response tokens that are not tool output,
        padding or whitespace).
    group_ids : torch.Tensor
        ``[B]`` integer prompt group of each row, in ``[0, num_groups)``. Rows of a group need not
        be contiguous.
    budget : int
        Branch points per group, ``>= 1``.
    preferred : torch.Tensor or None
        ``[B, T]`` bool; preferred candidates (e.g. ``z_entropy > 0`` and ``z_future > 0``) rank
        before all others. None: a single tier.
    num_groups : int or None
        G; default ``group_ids.max() + 1`` (reads ``group_ids`` on the host; pass it to avoid
        that sync and to give ``torch.compile`` a static shape).

    Returns
    -------
    BranchPoints
        ``(rows, positions, scores)``, each ``[G, budget]`` (int64, int64, float32): slot ``j``
        of group ``g`` is its ``j``-th pick; ``-1, -1, -inf`` for a group without candidates.

    Notes
    -----
    Deterministic: ties break by (row, position) ascending. A group with fewer candidates than
    ``budget`` repeats its picks in rank order. Bounds that keep a stray value from allocating
    absurd outputs: ``B * T <= 2^30``, ``num_groups <= B`` (a prompt group is a set of rows; so
    are the group ids when ``num_groups`` is left out), and ``num_groups * budget <= max(B * T,
    65536)`` output slots. All tensors on one device.

    Example
    -------
    >>> import torch
    >>> import appo_kernels as ak
    >>> score = torch.tensor([[0.5, 2.0, -1.0], [3.0, float("-inf"), 1.0]])
    >>> candidates = torch.ones(2, 3, dtype=torch.bool)
    >>> points = ak.select_branch_points(score, candidates, torch.tensor([0, 0]), budget=2)
    >>> points.rows, points.positions
    (tensor([[1, 0]]), tensor([[0, 1]]))
    """
    check_float("score", score)
    check_ndim("score", score, 2, "[B, T]")
    check_bool("candidates", candidates)
    check_shape("candidates", candidates, score.shape, "score")
    if preferred is not None:
        check_bool("preferred", preferred, "a bool tensor or None")
        check_shape("preferred", preferred, score.shape, "score")
    check_int("group_ids", group_ids)
    check_shape("group_ids", group_ids, score.shape[:1], "score.shape[:1]")
    check_same_device(
        {"score": score, "candidates": candidates, "preferred": preferred, "group_ids": group_ids}
    )
    B, T = score.shape
    if B * T > INDEX_MASK + 1:
        raise ValueError(f"score must have at most 2^30 positions, got {B * T}")
    budget = check_count("budget", budget, minimum=1)
    if num_groups is None:
        if score.device.type == "meta":
            raise ValueError("num_groups must be given for meta tensors (group_ids hold no values)")
        num_groups = -1  # the op reads group_ids.max() + 1
    elif check_count("num_groups", num_groups) > B:
        raise ValueError(
            f"num_groups must be <= B={B}, the number of rows of score (a prompt group is a set "
            f"of rows), got {shown(num_groups)}"
        )
    _check_output_size(num_groups, budget, B, T)
    rows, positions, scores = _select_branch_points_op(
        detached(score), candidates, preferred, group_ids, num_groups, budget
    )
    return BranchPoints(rows, positions, scores)
