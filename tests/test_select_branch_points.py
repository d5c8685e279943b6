"""select_branch_points against a brute-force sort, on both backends."""

import math

import pytest
import torch
from reference import select_ref
from utils import assert_compiles_without_spills, assert_rejects

from appo_kernels._rows import MAX_BLOCK
from appo_kernels.select_branch_points import BranchPoints, select_branch_points


def assert_selection(out: BranchPoints, expected) -> None:
    rows, positions, scores = expected
    assert out.rows.dtype == out.positions.dtype == torch.int64
    assert out.scores.dtype == torch.float32
    torch.testing.assert_close(out.rows.cpu(), rows, rtol=0, atol=0)
    torch.testing.assert_close(out.positions.cpu(), positions, rtol=0, atol=0)
    torch.testing.assert_close(out.scores.cpu(), scores, rtol=0, atol=0)


def test_hand_made_group(backend, device):
    inf = math.inf
    score = torch.tensor(
        [
            [0.5, 2.0, -inf, 2.0, 1.0],
            [9.0, 2.0, 0.1, math.nan, 3.0],
            [7.0, 7.0, 7.0, 7.0, 7.0],
        ]
    )
    candidates = torch.tensor(
        [
            [True, True, True, True, True],
            [False, True, True, True, True],
            [True, True, True, True, True],
        ]
    )
    preferred = torch.zeros(3, 5, dtype=torch.bool)
    preferred[0, 0] = preferred[1, 2] = True
    group_ids = torch.tensor([0, 1, 0])  # rows 0 and 2 share group 0; row 1 is group 1
    args = [x.to(device) for x in (score, candidates, group_ids)]
    out = select_branch_points(*args, 7, preferred=preferred.to(device))
    # Group 0: preferred (0,0) first, then the 7.0 ties in position order, then the 2.0 ties.
    assert out.rows[0].tolist() == [0, 2, 2, 2, 2, 2, 0]
    assert out.positions[0].tolist() == [0, 0, 1, 2, 3, 4, 1]
    # Group 1: preferred (1,2), then 3.0, then 2.0 ((1,0) is no candidate, NaN never chosen);
    # three candidates repeat in rank order.
    assert out.rows[1].tolist() == [1] * 7
    assert out.positions[1].tolist() == [2, 4, 1, 2, 4, 1, 2]
    assert out.scores[1].tolist() == pytest.approx([0.1, 3.0, 2.0, 0.1, 3.0, 2.0, 0.1])


@pytest.mark.parametrize("seed", range(4))
def test_matches_brute_force(backend, device, seed):
    gen = torch.Generator().manual_seed(seed)
    B, T, G = 7, 45, 4
    score = torch.randint(-3, 4, (B, T), generator=gen).float() / 2  # many ties
    score[torch.rand(B, T, generator=gen) < 0.1] = math.nan
    score[torch.rand(B, T, generator=gen) < 0.1] = -math.inf
    score[torch.rand(B, T, generator=gen) < 0.05] = math.inf
    score[score == 0] = torch.tensor([0.0, -0.0])[torch.randint(0, 2, (1,), generator=gen)]
    candidates = torch.rand(B, T, generator=gen) < 0.25
    preferred = (torch.rand(B, T, generator=gen) < 0.4) if seed % 2 else None
    group_ids = torch.randint(0, G - 1, (B,), generator=gen)  # group G-1 stays empty
    budget = [1, 3, 8, 30][seed]
    out = select_branch_points(
        score.to(device),
        candidates.to(device),
        group_ids.to(device),
        budget,
        preferred=None if preferred is None else preferred.to(device),
        num_groups=G,
    )
    assert_selection(out, select_ref(score, candidates, group_ids, budget, preferred, G))
    assert torch.all(out.rows[G - 1] == -1) and torch.all(out.scores[G - 1] == -math.inf)


def test_long_rows_and_low_precision_scores(backend, device, gen):
    B, T = 3, MAX_BLOCK + 300
    score = torch.randn(B, T, generator=gen).bfloat16()
    candidates = torch.rand(B, T, generator=gen) < 0.5
    group_ids = torch.tensor([1, 0, 1])
    out = select_branch_points(score.to(device), candidates.to(device), group_ids.to(device), 4)
    assert_selection(out, select_ref(score.float(), candidates, group_ids, 4))


def test_default_group_count_and_strided_inputs(backend, device, gen):
    score = torch.randn(12, 2, 30, generator=gen)[:, 1, ::3]  # row stride 60, position stride 3
    candidates = (torch.rand(10, 12, generator=gen) < 0.3).t()
    group_ids = torch.tensor([4, 0, 2, 4, 4, 0, 1, 1, 0, 2, 3, 2], dtype=torch.int32)
    out = select_branch_points(score.to(device), candidates.to(device), group_ids.to(device), 5)
    assert out.rows.shape == (5, 5)
    assert_selection(out, select_ref(score, candidates, group_ids, 5))


@pytest.mark.parametrize("B, T", [(0, 6), (3, 0)])
def test_empty_inputs(backend, device, B, T):
    score = torch.empty(B, T, device=device)
    candidates = torch.ones(B, T, dtype=torch.bool, device=device)
    group_ids = torch.zeros(B, dtype=torch.int64, device=device)
    out = select_branch_points(score, candidates, group_ids, 3)
    assert out.rows.shape == out.positions.shape == out.scores.shape == (min(B, 1), 3)
    out = select_branch_points(score, candidates, group_ids, 3, num_groups=min(B, 2))
    assert torch.all(out.rows == -1) and torch.all(out.positions == -1)
    assert torch.all(out.scores == -math.inf) and out.rows.shape == (min(B, 2), 3)


def test_implausible_group_counts_are_rejected_before_allocating(device):
    """num_groups=10**9, or one stray group id of 10**9 with num_groups left out, allocated
    [G, budget] outputs until the process ran out of memory: a prompt group is a set of rows, so
    there are at most B of them; and the outputs hold at most max(B * T, 65536) slots."""
    score = torch.randn(4, 6, device=device)
    candidates = torch.ones(4, 6, dtype=torch.bool, device=device)
    groups = torch.tensor([0, 1, 1, 10**9], device=device)
    f = select_branch_points
    assert_rejects(ValueError, "group_ids", f, score, candidates, groups, 2)
    assert_rejects(ValueError, "num_groups", f, score, candidates, groups % 4, 2, num_groups=10**9)
    assert_rejects(ValueError, "num_groups", f, score, candidates, groups % 4, 2, num_groups=5)
    assert f(score, candidates, groups % 4, 2, num_groups=4).rows.shape == (4, 2)
    assert f(score, candidates, groups % 4, 2**14, num_groups=4).rows.shape == (4, 2**14)
    assert_rejects(ValueError, "budget", f, score, candidates, groups % 4, 2**14 + 1, num_groups=4)
    assert_rejects(ValueError, "budget", f, score, candidates, groups % 2, 2**15 + 1)  # G = 2


def test_bad_input(device):
    score = torch.randn(3, 4, device=device)
    cand = torch.ones(3, 4, dtype=torch.bool, device=device)
    groups = torch.tensor([0, 1, 0], device=device)
    f = select_branch_points
    assert_rejects(TypeError, "score", f, score.long(), cand, groups, 2)
    assert_rejects(ValueError, "score", f, score[0], cand[0], groups, 2)
    assert_rejects(TypeError, "candidates", f, score, cand.float(), groups, 2)
    assert_rejects(ValueError, "candidates", f, score, cand[:2], groups, 2)
    assert_rejects(TypeError, "preferred", f, score, cand, groups, 2, preferred=score)
    assert_rejects(ValueError, "preferred", f, score, cand, groups, 2, preferred=cand[:, :3])
    assert_rejects(TypeError, "group_ids", f, score, cand, groups.float(), 2)
    assert_rejects(ValueError, "group_ids", f, score, cand, groups[:2], 2)
    assert_rejects(ValueError, "group_ids", f, score, cand, groups.to("meta"), 2)
    assert_rejects(ValueError, "group_ids", f, score, cand, groups - 1, 2)
    assert_rejects(ValueError, "group_ids", f, score, cand, groups, 2, num_groups=1)
    assert_rejects(ValueError, "budget", f, score, cand, groups, 0)
    assert_rejects(TypeError, "budget", f, score, cand, groups, 2.0)
    assert_rejects(TypeError, "budget", f, score, cand, groups, True)
    assert_rejects(ValueError, "num_groups", f, score, cand, groups, 2, num_groups=-1)


@pytest.mark.parametrize("num_groups", [3, None])  # None: G read from group_ids (dynamic shape)
def test_torch_compile_fullgraph(backend, device, gen, num_groups):
    score = torch.randn(4, 16, generator=gen).to(device)
    candidates = (torch.rand(4, 16, generator=gen) < 0.5).to(device)
    group_ids = torch.tensor([0, 2, 2, 0], device=device)

    def pick(score, candidates, group_ids):
        out = select_branch_points(
            score, candidates, group_ids, 3, preferred=score > 1.0, num_groups=num_groups
        )
        return out.rows * 100 + out.positions

    compiled = torch.compile(pick, fullgraph=True, backend="aot_eager")
    args = (score, candidates, group_ids)
    torch.testing.assert_close(compiled(*args), pick(*args))


def test_kernel_compiles_for_gpus_without_spills():
    signature = {
        "score_ptr": "*fp32",
        "candidates_ptr": "*i1",
        "preferred_ptr": "*i1",
        "group_ids_ptr": "*i64",
        "rows_ptr": "*i64",
        "positions_ptr": "*i64",
        "scores_ptr": "*fp32",
        "B": "i32",
        "T": "i32",
        "stride_score": "i32",
        "stride_candidates": "i32",
        "stride_preferred": "i32",
        "budget": "i32",
    }
    assert_compiles_without_spills(
        "appo_kernels.select_branch_points",
        "_select_branch_points_kernel",
        signature,
        [{"HAS_PREFERRED": True, "BLOCK": MAX_BLOCK}, {"HAS_PREFERRED": False, "BLOCK": MAX_BLOCK}],
    )
