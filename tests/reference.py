"""Plain float64 references of every scoring op of ``appo_kernels``, written from the math in
docs/design.md (Python loops over positions and rows where that is clearer than vector code), so
that they are easy to check by eye. They are slow: the tests keep shapes small.
"""

from __future__ import annotations

import math

import torch


def token_stats_ref(logits, tokens, temperature=1.0, ignore_index=-100):
    """(logprob, entropy) in float64 from ``log_softmax(logits / temperature)``; -inf entries
    contribute 0 to the entropy; ``ignore_index`` rows get logprob 0."""
    logp = torch.log_softmax(logits.double() / temperature, dim=-1)
    p = logp.exp()
    entropy = -(p * logp.masked_fill(p == 0, 0.0)).sum(-1)
    ignored = tokens == ignore_index
    picked = logp.gather(-1, tokens.masked_fill(ignored, 0).long().unsqueeze(-1)).squeeze(-1)
    return picked.masked_fill(ignored, 0.0), entropy


def token_stats_grad_ref(logits, tokens, grad_logprob, grad_entropy, **kwargs):
    """d(grad_logprob . logprob + grad_entropy . entropy) / d logits in float64 (autograd of
    ``token_stats_ref``)."""
    x = logits.detach().double().requires_grad_()
    logprob, entropy = token_stats_ref(x, tokens, **kwargs)
    torch.autograd.backward((logprob, entropy), (grad_logprob.double(), grad_entropy.double()))
    return x.grad


def linear_token_stats_ref(
    hidden, weight, tokens, bias=None, temperature=1.0, ignore_index=-100, softcap=None
):
    """float64 logits ``hidden @ weight.T + bias`` (then ``softcap * tanh(logits / softcap)``
    when given, as Gemma 2 caps them), then ``token_stats_ref``; rows whose token is
    ``ignore_index`` give (0, 0)."""
    logits = hidden.double() @ weight.double().t()
    if bias is not None:
        logits = logits + bias.double()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logprob, entropy = token_stats_ref(logits, tokens, temperature, ignore_index)
    return logprob, entropy.masked_fill(tokens == ignore_index, 0.0)


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
    """Omega_t = clip(exp(clamp(G_t(logprob - behavior_logprob), -20, 20)), 1 - clip, 1 + clip)."""
    gain, _ = discounted_sum_ref(logprob.double() - behavior_logprob.double(), mask, gamma)
    return gain.clamp(-20.0, 20.0).exp().clamp(1.0 - clip, 1.0 + clip)


def z_score_ref(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(v - mean) / (population std + 1e-6) over each row's valid positions; 0 elsewhere."""
    out = torch.zeros(values.shape, dtype=torch.float64)
    for b in range(values.shape[0]):
        v = values[b].double()[mask[b].bool()]
        if v.numel():
            mean = v.sum() / v.numel()
            std = math.sqrt(float(((v - mean) ** 2).sum() / v.numel()))
            out[b][mask[b].bool()] = (v - mean) / (std + 1e-6)
    return out


def branching_score_ref(entropy, logprob, behavior_logprob, mask, gamma: float, clip: float):
    """(score, future_value, z_entropy, z_future) in float64: score = z(H) z(Omega) at valid
    positions, -inf elsewhere."""
    omega = future_value_ref(logprob, behavior_logprob, mask, gamma, clip)
    z_entropy, z_future = z_score_ref(entropy, mask), z_score_ref(omega, mask)
    score = torch.where(mask.bool(), z_entropy * z_future, -math.inf)
    return score, omega, z_entropy, z_future


def select_ref(score, candidates, group_ids, budget: int, preferred=None, num_groups=None):
    """Brute force: per group, sort candidate tuples (-tier, -score, row, position); repeat the
    ranking to fill ``budget`` slots; (-1, -1, -inf) for a group without candidates."""
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
