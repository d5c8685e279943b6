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


def test_candidates_skip_blank_tokens_and_with_keep_the_last_sampled_token():
    tokens = torch.tensor([[5, 1, 7, 2, -100], [3, 3, 9, -100, -100]])
    mask = tokens >= 0
    mask[0, 2] = False  # tool output
    blank = torch.zeros(4, dtype=torch.bool)
    blank[1] = True  # ids past the table (5, 7, 9) are not blank
    got = branch_candidates(mask, tokens, blank_tokens=blank)
    assert got.tolist() == [[True, False, False, True, False], [True, True, True, False, False]]
    kept = branch_candidates(mask, tokens, blank_tokens=blank, keep_selected_token=True)
    assert kept.tolist() == [[True, False, False, False, False], [True, True, False, False, False]]
    empty = torch.zeros(1, 3, dtype=torch.bool)
    assert not branch_candidates(empty, torch.zeros(1, 3), keep_selected_token=True).any()


def test_an_unknown_rule_is_refused():
    entropy, logprob, behavior, mask, group_ids = _batch(0)
    with pytest.raises(ValueError, match=r"rule must be one of .*'appo'"):
        plan_branches(
            "best", entropy=entropy, logprob=logprob, behavior_logprob=behavior, mask=mask,
            candidates=mask, group_ids=group_ids, budget=1,
        )  # fmt: skip
    assert "appo" in RULES and "entropy" in RULES
