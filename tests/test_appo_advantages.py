"""Procedure-level advantages (docs/design.md §8) against a float64 loop reference, on hand-made
rollout trees and random ones."""

import math
import random

import pytest
import torch

from appo.advantages import procedure_advantages


def reference_advantages(rewards, group_ids, is_branch, parent, split, mask, train_branches=False):
    """The definition written directly, one row and token at a time, in float64."""
    rows, length = len(rewards), len(mask[0]) if len(mask) else 0
    a_hat = []
    for i in range(rows):
        peers = [
            float(rewards[j])
            for j in range(rows)
            if group_ids[j] == group_ids[i] and is_branch[j] == is_branch[i]
        ]
        mean = sum(peers) / len(peers)
        std = math.sqrt(sum((v - mean) ** 2 for v in peers) / len(peers))
        a_hat.append((float(rewards[i]) - mean) / (std + 1e-6))
    out = torch.zeros(rows, length, dtype=torch.float64)
    for i in range(rows):
        for t in range(length):
            if not mask[i][t]:
                continue
            if is_branch[i]:
                out[i, t] = a_hat[i] if train_branches else 0.0
                continue
            covering = [
                a_hat[b] for b in range(rows) if is_branch[b] and parent[b] == i and t < split[b]
            ]
            out[i, t] = a_hat[i] + (sum(covering) / len(covering) if covering else 0.0)
    return out


def as_tensors(rewards, group_ids, is_branch, parent, split, mask):
    return (
        torch.tensor(rewards, dtype=torch.float32),
        torch.tensor(group_ids, dtype=torch.int64),
        torch.tensor(is_branch, dtype=torch.bool),
        torch.tensor(parent, dtype=torch.int64),
        torch.tensor(split, dtype=torch.int64),
        torch.tensor(mask, dtype=torch.float32),
    )


def hand_made_tree(length=8):
    """Group 0: three initial rollouts; row 0 has two overlapping branches (splits 2 and 5), row 1
    one (split 3). Group 1: a set of one initial rollout and a set of one branch. Group 2: initial
    rollouts and branches with identical rewards. Rows of different kinds are interleaved."""
    rows = [  # (reward, group, is_branch, parent, split)
        (1.0, 0, False, -1, -1),
        (0.0, 0, True, 0, 2),
        (0.0, 0, False, -1, -1),
        (1.0, 0, True, 0, 5),
        (1.0, 0, False, -1, -1),
        (1.0, 0, True, 2, 3),
        (1.0, 1, False, -1, -1),
        (0.0, 1, True, 6, 4),
        (0.5, 2, False, -1, -1),
        (0.5, 2, False, -1, -1),
        (1.0, 2, True, 8, 1),
        (1.0, 2, True, 8, 6),
    ]
    mask = [[1] * length for _ in rows]
    mask[2][length - 2 :] = [0, 0]  # padding
    mask[0][3] = mask[0][4] = 0  # tool-output tokens
    return [list(column) for column in zip(*rows)] + [mask]


@pytest.mark.parametrize("train_branches", [False, True])
def test_hand_made_tree_matches_reference(train_branches):
    args = hand_made_tree()
    got = procedure_advantages(*as_tensors(*args), train_branches=train_branches)
    want = reference_advantages(*args, train_branches=train_branches)
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


def test_hand_made_tree_structure():
    """Properties that follow from the definition without the reference."""
    args = hand_made_tree()
    got = procedure_advantages(*as_tensors(*args))
    trained = procedure_advantages(*as_tensors(*args), train_branches=True)
    # branches of group 0 (rows 1, 3, 5) have rewards 0, 1, 1
    std = math.sqrt(2 / 9)
    hat = {
        1: (0 - 2 / 3) / (std + 1e-6),
        3: (1 - 2 / 3) / (std + 1e-6),
        5: (1 - 2 / 3) / (std + 1e-6),
    }
    for row, value in hat.items():
        assert torch.allclose(trained[row], torch.full((8,), value))
    # row 0: both branches cover t < 2, only the split-5 one covers 2 <= t < 5, none beyond
    own = got[0, 7].item()
    assert got[0, 0].item() == pytest.approx(own + (hat[1] + hat[3]) / 2, abs=1e-5)
    assert got[0, 2].item() == pytest.approx(own + hat[3], abs=1e-5)
    assert got[0, 5].item() == pytest.approx(own, abs=1e-6)
    # row 2: its one branch covers t < 3
    assert got[2, 2].item() == pytest.approx(got[2, 3].item() + hat[5], abs=1e-5)
    # a set of one (group 1) and identical rewards (group 2) give 0, even with trained branches
    assert torch.all(got[6:] == 0) and torch.all(trained[6:] == 0)
    # branch rows are not trained on by default; masked tokens are exactly zero
    assert torch.all(got[[1, 3, 5, 7, 10, 11]] == 0)
    assert got[0, 3] == 0 and got[0, 4] == 0 and torch.all(got[2, -2:] == 0)


def random_tree(rng, groups=3, max_initial=4, max_branches=5, length=12):
    rewards, group_ids, is_branch, parent, split = [], [], [], [], []
    for g in range(groups):
        initial = []
        for _ in range(rng.randint(1, max_initial)):
            initial.append(len(rewards))
            rewards.append(rng.choice([0.0, 1.0, rng.random()]))
            group_ids.append(g), is_branch.append(False), parent.append(-1), split.append(-1)
        for _ in range(rng.randint(0, max_branches)):
            rewards.append(rng.choice([0.0, 1.0, rng.random()]))
            group_ids.append(g), is_branch.append(True)
            parent.append(rng.choice(initial)), split.append(rng.randint(0, length))
    # shuffle rows (parents follow their rows)
    order = list(range(len(rewards)))
    rng.shuffle(order)
    where = {old: new for new, old in enumerate(order)}
    pick = lambda xs: [xs[i] for i in order]  # noqa: E731
    parent = [where[p] if p >= 0 else -1 for p in pick(parent)]
    mask = [[int(rng.random() < 0.8) for _ in range(length)] for _ in order]
    return [pick(rewards), pick(group_ids), pick(is_branch), parent, pick(split), mask]


@pytest.mark.parametrize("seed", range(6))
def test_random_trees_match_reference(seed):
    rng = random.Random(seed)
    args = random_tree(rng)
    train_branches = seed % 2 == 1
    got = procedure_advantages(*as_tensors(*args), train_branches=train_branches)
    want = reference_advantages(*args, train_branches=train_branches)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert torch.all(got[torch.tensor(args[-1]) == 0] == 0)


def test_inputs_in_other_dtypes_and_empty_batch():
    args = hand_made_tree()
    rewards, group_ids, is_branch, parent, split, mask = as_tensors(*args)
    got = procedure_advantages(
        rewards.double(), group_ids.int(), is_branch, parent.int(), split.short(), mask.bool()
    )
    torch.testing.assert_close(got.double(), reference_advantages(*args), rtol=1e-6, atol=1e-6)
    empty = procedure_advantages(
        torch.zeros(0),
        torch.zeros(0, dtype=torch.long),
        torch.zeros(0, dtype=torch.bool),
        torch.zeros(0, dtype=torch.long),
        torch.zeros(0, dtype=torch.long),
        torch.zeros(0, 5),
    )
    assert empty.shape == (0, 5) and empty.dtype == torch.float32


def _with(index, value):
    rewards, group_ids, is_branch, parent, split, mask = as_tensors(*hand_made_tree())
    tensors = {
        "rewards": rewards,
        "group_ids": group_ids,
        "is_branch": is_branch,
        "parent": parent,
        "split": split,
        "response_mask": mask,
    }
    name, row = index
    if row is None:
        tensors[name] = value
    else:
        tensors[name] = tensors[name].clone()
        tensors[name][row] = value
    return tensors


@pytest.mark.parametrize(
    "index, value, error, match",
    [
        (("parent", 1), 3, ValueError, "parent of branch row 1"),  # parent is a branch
        (("parent", 1), 6, ValueError, "same group"),  # parent in another group
        (("parent", 1), 40, ValueError, "parent of branch row 1"),  # out of range
        (("parent", 1), -1, ValueError, "parent of branch row 1"),
        (("parent", 0), 2, ValueError, "parent of an initial row"),
        (("split", 1), 9, ValueError, "split of branch row 1"),
        (("split", 1), -1, ValueError, "split of branch row 1"),
        (("rewards", 0), float("nan"), ValueError, "rewards"),
        (("rewards", None), torch.zeros(12, dtype=torch.long), TypeError, "rewards"),
        (("rewards", None), torch.zeros(11), ValueError, "group_ids"),
        (("is_branch", None), torch.zeros(12, dtype=torch.long), TypeError, "is_branch"),
        (("group_ids", None), torch.zeros(12), TypeError, "group_ids"),
        (("parent", None), [0] * 12, TypeError, "parent"),
        (("response_mask", None), torch.ones(11, 8), ValueError, "response_mask"),
        (("response_mask", None), torch.ones(12), ValueError, "response_mask"),
    ],
)
def test_bad_input_names_the_argument(index, value, error, match):
    with pytest.raises(error, match=match):
        procedure_advantages(**_with(index, value))


@pytest.mark.parametrize(
    "std, one, zero",
    [
        ("population", 0.4 / math.sqrt(0.24), -0.6 / math.sqrt(0.24)),
        ("sample", 0.4 / math.sqrt(0.3), -0.6 / math.sqrt(0.3)),
        ("none", 0.4, -0.6),
    ],
)
def test_std_convention_hand_worked(std, one, zero):
    """Rewards [1, 0, 0, 1, 1]: mean 0.6, squared deviations sum to 1.2, so the variance is 0.24
    (population, the default) or 0.3 (n − 1, verl's GRPO); "none" keeps R − mean. A set of one
    gets 0 either way."""
    rewards = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    args = as_tensors(rewards, [0] * 5 + [1], [False] * 6, [-1] * 6, [-1] * 6, [[1] * 3] * 6)
    got = procedure_advantages(*args, std=std)[:, 0].double()
    want = torch.tensor([one, zero, zero, one, one, 0.0], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="std"):
        procedure_advantages(*args, std="unbiased")


@pytest.mark.parametrize("keep_selected_token", [False, True])
def test_credit_span_of_the_selected_token_hand_worked(keep_selected_token):
    """Initial rows 0 and 1 (rewards 1, 0: Â = ±1); branches from row 0 at positions 2 and 4
    (rewards 1, 0: Â = ±1). Re-sampling the selected token (split = position) credits [0, t);
    keeping it (split = position + 1, the paper's code) credits [0, t]. The selected token of the
    first branch (position 2) gets 1 + mean(+1, −1) = 1 only when the branch kept it; else only
    the second branch covers it: 1 − 1 = 0."""
    keep = int(keep_selected_token)
    split = [-1, -1, 2 + keep, 4 + keep]
    args = as_tensors(
        [1.0, 0.0, 1.0, 0.0], [0] * 4, [0, 0, 1, 1], [-1, -1, 0, 0], split, [[1] * 6] * 4
    )
    row = procedure_advantages(*args)[0].double()
    if keep_selected_token:  # t < 3: both branches; 3 <= t < 5: the second; t = 5: none
        want = [1.0, 1.0, 1.0, 0.0, 0.0, 1.0]
    else:  # t < 2: both; 2 <= t < 4: the second; t >= 4: none
        want = [1.0, 1.0, 0.0, 0.0, 1.0, 1.0]
    torch.testing.assert_close(row, torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-5)
