"""``torch.library.opcheck`` on every scoring custom op, on both backends: schema (no hidden
mutation or aliasing), autograd registration, the fake (meta) implementation against the real one,
and AOT dispatch with dynamic shapes. (The KV-cache ops, namespace ``appo_kernels_kv``, are
checked in tests/test_kv_cache.py.)"""

import pytest
import torch
from utils import random_mask

import appo_kernels  # noqa: F401  (registers the custom ops)

B, T, V = 3, 7, 11


def _stats_inputs(gen):
    logits = torch.randn(B, T, V, generator=gen)
    tokens = torch.randint(0, V, (B, T), generator=gen)
    tokens[0, 2] = -100
    return logits, tokens


def _cases(gen):
    """(name, op, args) of every scoring custom op."""
    ops = torch.ops.appo_kernels
    logits, tokens = _stats_inputs(gen)
    logprob = -torch.rand(B, T, generator=gen)
    behavior = logprob + 0.1 * torch.randn(B, T, generator=gen)
    mask = random_mask(gen, B, T)
    row_max = logits.amax(dim=-1)
    log_sum = torch.logsumexp(logits - row_max[..., None], dim=-1)
    hidden = torch.randn(B * T, 5, generator=gen)
    head = torch.randn(V, 5, generator=gen)
    bias = torch.randn(V, generator=gen)
    entropy = torch.rand(B, T, generator=gen)
    grads = torch.randn(2, B, T, generator=gen)
    score = torch.randn(B, T, generator=gen)
    groups = torch.tensor([1, 0, 1])
    return [
        (
            "token_stats_fwd",
            ops.token_stats_fwd,
            (logits.requires_grad_(), tokens, 0.8, -100, 0, 0),
        ),
        (
            "token_stats_bwd",
            ops.token_stats_bwd,
            (logits.detach(), tokens, row_max, log_sum, entropy, *grads, 0.8, -100, 0, 0),
        ),
        (
            "token_stats_bwd (entropy gradient only)",
            ops.token_stats_bwd,
            (logits.detach(), tokens, row_max, log_sum, entropy, None, grads[1], 1.0, -100, 0, 0),
        ),
        (
            "linear_token_stats_fwd",
            ops.linear_token_stats_fwd,
            (
                hidden.requires_grad_(),
                head.requires_grad_(),
                bias,
                tokens.view(-1),
                0.8,
                -100,
                4,
                None,
            ),
        ),  # fmt: skip
        (
            "linear_token_stats_fwd (soft-capped)",
            ops.linear_token_stats_fwd,
            (hidden, head, bias, tokens.view(-1), 0.8, -100, 4, 1.5),
        ),
        (
            "linear_token_stats_bwd",
            ops.linear_token_stats_bwd,
            (
                hidden.detach(),
                head.detach(),
                bias,
                tokens.view(-1),
                row_max.view(-1),
                log_sum.view(-1),
                entropy.view(-1),
                *grads.view(2, -1),
                0.8,
                -100,
                4,
                None,
                True,
                True,
            ),
        ),  # fmt: skip
        (
            "linear_token_stats_bwd (soft-capped)",
            ops.linear_token_stats_bwd,
            (
                hidden.detach(),
                head.detach(),
                bias,
                tokens.view(-1),
                row_max.view(-1),
                log_sum.view(-1),
                entropy.view(-1),
                *grads.view(2, -1),
                0.8,
                -100,
                4,
                1.5,
                True,
                True,
            ),
        ),  # fmt: skip
        (
            "linear_token_stats_bwd (no bias, hidden gradient only)",
            ops.linear_token_stats_bwd,
            (
                hidden.detach(),
                head.detach(),
                None,
                tokens.view(-1),
                row_max.view(-1),
                log_sum.view(-1),
                entropy.view(-1),
                grads[0].view(-1),
                None,
                1.0,
                -100,
                3,
                None,
                False,
                False,
            ),
        ),  # fmt: skip
        ("discounted_future_sum", ops.discounted_future_sum, (behavior, mask, 0.9)),
        ("future_value", ops.future_value, (logprob, behavior, mask, 0.95, 0.2)),
        (
            "branching_score_from_stats",
            ops.branching_score_from_stats,
            (entropy, logprob, behavior, mask, 1.0, 0.2),
        ),
        (
            "select_branch_points",
            ops.select_branch_points,
            (score, mask, score > 0, groups, 2, 3),
        ),
        (
            "select_branch_points (no preferred, groups read from group_ids)",
            ops.select_branch_points,
            (score, mask, None, groups, -1, 3),
        ),
    ]


CASE_NAMES = [name for name, _, _ in _cases(torch.Generator().manual_seed(0))]


@pytest.mark.parametrize("case", CASE_NAMES)
def test_opcheck(backend, gen, case):
    _, op, args = next(c for c in _cases(gen) if c[0] == case)
    torch.library.opcheck(op, args)


def test_every_scoring_op_is_checked():
    """A new custom op of the package must join the list above."""
    registered = {
        name.split("::")[1].split(".")[0]
        for name in torch._C._dispatch_get_all_op_names()
        if name.startswith("appo_kernels::")
    }
    assert registered == {name.split(" ")[0] for name in CASE_NAMES}, registered
