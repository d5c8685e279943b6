"""appo.branching: the branch-point rules every trainer shares."""

import pytest
import torch

from appo.branching import RULES, branch_candidates, plan_branches
from appo_kernels import branching_score_from_stats, select_branch_points


def _batch(seed: int, rows: int = 6, length: int = 9):
    g = torch.Generator().manual_seed(seed)
    entropy = torch.rand(rows, length, generator=g) * 3
    logprob = -torch.rand(rows, length, generator=g)
    behavior = logprob + 0.3 * torch.randn(rows, length, generator=g)
    mask = torch.rand(rows, length, generator=g) > 0.25
    group_ids = torch.arange(rows) % 2
    return entropy, logprob, behavior, mask, group_ids


@pytest.mark.parametrize("seed", range(3))
def test_appo_rule_is_the_branching_score_with_its_preferred_tier(seed):
    entropy, logprob, behavior, mask, group_ids = _batch(seed)
    plan = plan_branches(
        "appo", entropy=entropy, logprob=logprob, behavior_logprob=behavior, mask=mask,
        candidates=mask, group_ids=group_ids, budget=3, num_groups=2, gamma=0.9, clip=0.1,
    )  # fmt: skip
    bs = branching_score_from_stats(entropy, logprob, behavior, mask, gamma=0.9, clip=0.1)
    want = select_branch_points(
        bs.score, mask, group_ids, 3, preferred=(bs.z_entropy > 0) & (bs.z_future > 0)
    )
    assert torch.equal(plan.rows, want.rows.flatten())
    assert torch.equal(plan.positions, want.positions.flatten())
    assert torch.equal(plan.score, bs.score)
    pairs = zip(want.rows.flatten().tolist(), want.positions.flatten().tolist())
    assert plan.points() == list(pairs)


def test_entropy_rule_takes_the_highest_row_normalised_entropy_candidates():
    entropy, logprob, behavior, mask, group_ids = _batch(7)
    plan = plan_branches(
        "entropy", entropy=entropy, logprob=logprob, behavior_logprob=behavior, mask=mask,
        candidates=mask, group_ids=group_ids, budget=2, num_groups=2,
    )  # fmt: skip
    h = entropy.double()
    count = mask.sum(1, keepdim=True)
    mean = torch.where(mask, h, 0).sum(1, keepdim=True) / count
    std = (torch.where(mask, (h - mean) ** 2, 0).sum(1, keepdim=True) / count).sqrt()
    z = (h - mean) / (std + 1e-6)
    for group in range(2):
        masked = torch.where(mask & (group_ids == group)[:, None], z, -1e9)
        top = masked.flatten().topk(2).indices
        got = plan.rows[plan.rows % 2 == group] * entropy.shape[1]
        got = got + plan.positions[plan.rows % 2 == group]
        assert got.tolist() == top.tolist()


def test_a_group_without_candidates_gives_no_points():
    entropy, logprob, behavior, mask, group_ids = _batch(1)
    candidates = mask & (group_ids == 0)[:, None]
    plan = plan_branches(
        "appo", entropy=entropy, logprob=logprob, behavior_logprob=behavior, mask=mask,
        candidates=candidates, group_ids=group_ids, budget=2, num_groups=2,
    )  # fmt: skip
    assert len(plan.rows) == 2 and (plan.rows % 2 == 0).all()


def test_candidates_skip_blank_tokens_the_first_token_and_with_keep_the_last_sampled_one():
    tokens = torch.tensor([[5, 1, 7, 2, -100], [3, 3, 9, -100, -100]])
    mask = tokens >= 0
    mask[0, 2] = False  # tool output
    blank = torch.zeros(4, dtype=torch.bool)
    blank[1] = True  # ids past the table (5, 7, 9) are not blank
    got = branch_candidates(mask, tokens, blank_tokens=blank)  # never the response's first token
    assert got.tolist() == [[False, False, False, True, False], [False, True, True, False, False]]
    kept = branch_candidates(mask, tokens, blank_tokens=blank, keep_selected_token=True)
    assert kept.tolist() == [[True, False, False, False, False], [True, True, False, False, False]]
    empty = torch.zeros(1, 3, dtype=torch.bool)
    assert not branch_candidates(empty, torch.zeros(1, 3), keep_selected_token=True).any()
    assert branch_candidates(torch.ones(2, 0, dtype=torch.bool), torch.zeros(2, 0)).shape == (2, 0)


def test_an_unknown_rule_is_refused():
    entropy, logprob, behavior, mask, group_ids = _batch(0)
    with pytest.raises(ValueError, match=r"rule must be one of .*'appo'"):
        plan_branches(
            "best", entropy=entropy, logprob=logprob, behavior_logprob=behavior, mask=mask,
            candidates=mask, group_ids=group_ids, budget=1,
        )  # fmt: skip
    assert "appo" in RULES and "entropy" in RULES


def _plan(rule, entropy, mask, group_ids, budget, **kwargs):
    logprob = torch.zeros_like(entropy)
    return plan_branches(
        rule, entropy=entropy, logprob=logprob, behavior_logprob=logprob, mask=mask,
        group_ids=group_ids, budget=budget, **kwargs,
    )  # fmt: skip


def test_arpo_rule_branches_after_the_tool_results_whose_entropy_rises_most():
    # row 0: first turn H (1, 2) -> initial 1.5; after tool result 1: (3, 5) -> rise 2.5;
    # after tool result 2: (0.5, 0.5) -> rise -1. row 1: initial 1.0, after its result 1.5 -> 0.5.
    # row 2 (group 1): no tool result, so no candidate.
    entropy = torch.tensor(
        [
            [1.0, 2.0, 0.0, 0.0, 3.0, 5.0, 0.0, 0.0, 0.5, 0.5],
            [1.0, 1.0, 0.0, 1.5, 1.5, 9.0, 0.0, 0.0, 0.0, 0.0],
            [4.0, 0.0, 8.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        ]
    )
    observation = torch.zeros(3, 10, dtype=torch.bool)
    observation[0, [2, 3, 6, 7]] = True
    observation[1, 2] = True
    mask = ~observation
    mask[1, 6:] = False
    mask[2, 3:] = False
    group_ids = torch.tensor([0, 0, 1])
    plan = _plan("arpo", entropy, mask, group_ids, 3, candidates=mask,
                 observation_mask=observation, arpo_window=2)  # fmt: skip
    assert plan.points() == [(0, 4), (1, 3), (0, 8)]
    assert plan.scores.tolist() == pytest.approx([2.5, 0.5, -1.0])
    finite = torch.isfinite(plan.score).nonzero().tolist()
    assert finite == [[0, 4], [0, 8], [1, 3]]
    # a window of 1: row 1's turn after its result is (1.5) against 1.0; the rest as before
    wide = _plan("arpo", entropy, mask, group_ids, 1, candidates=mask,
                 observation_mask=observation, arpo_window=1)  # fmt: skip
    assert wide.points() == [(0, 4)] and float(wide.scores[0]) == pytest.approx(2.0)
    # a blank first token after a result moves the branch to the next candidate of that turn
    candidates = mask.clone()
    candidates[0, 4] = False
    moved = _plan("arpo", entropy, mask, group_ids, 1, candidates=candidates,
                  observation_mask=observation, arpo_window=2)  # fmt: skip
    assert moved.points() == [(0, 5)]


def test_arpo_rule_needs_the_observation_mask():
    entropy, logprob, behavior, mask, group_ids = _batch(0)
    with pytest.raises(ValueError, match="observation_mask"):
        _plan("arpo", entropy, mask, group_ids, 1, candidates=mask)
    with pytest.raises(ValueError, match="observation_mask must have shape"):
        _plan("arpo", entropy, mask, group_ids, 1, candidates=mask,
              observation_mask=torch.zeros(2, 2, dtype=torch.bool))  # fmt: skip
    with pytest.raises(ValueError, match="arpo_window"):
        _plan("arpo", entropy, mask, group_ids, 1, candidates=mask,
              observation_mask=~mask, arpo_window=0)  # fmt: skip


def test_random_rule_draws_distinct_candidates_uniformly_and_reproducibly():
    entropy, logprob, behavior, mask, _ = _batch(3, rows=2, length=6)
    candidates = mask.clone()
    candidates[:, 0] = False
    trials = 600  # one group per trial: the same two rows, repeated
    group_ids = torch.arange(trials).repeat_interleave(2)

    def draw(seed, budget=3):
        return _plan("random", entropy.repeat(trials, 1), mask.repeat(trials, 1), group_ids,
                     budget, candidates=candidates.repeat(trials, 1), num_groups=trials,
                     generator=torch.Generator().manual_seed(seed))  # fmt: skip

    plan = draw(5)
    assert plan.points() == draw(5).points()
    assert plan.points() != draw(6).points()
    picks = [(r % 2, p) for r, p in plan.points()]
    for trial in range(trials):  # three distinct candidates per group
        assert len(set(picks[3 * trial : 3 * trial + 3])) == 3
    counts = torch.zeros_like(entropy)
    for row, position in picks:
        counts[row, position] += 1
    assert not counts[~candidates].any()
    expected = trials * 3 / int(candidates.sum())
    assert torch.allclose(counts[candidates], torch.tensor(expected), rtol=0.2)
