"""Future-likelihood advantage scaling and the dual-clip PPO loss (docs/design.md §9) against
plain float64 loop references; gradients against float64 autograd of the reference; masked
(tool-output, padding) tokens contribute exactly nothing."""

import math

import pytest
import torch

from appo.advantages import procedure_advantages
from appo.loss import future_likelihood_scale, policy_loss


def reference_scale(
    adv,
    logprob,
    old,
    mask,
    *,
    c=3.0,
    half_life=64,
    clip=0.2,
    clip_high_only=True,
    neg_ratio_cap=6.0,
    bonus=1.0,
):
    rows, length = adv.shape
    gamma = 2.0 ** (-1.0 / half_life)
    out = torch.zeros(rows, length, dtype=torch.float64)
    for b in range(rows):
        delta = [
            min(max(float(logprob[b, k] - old[b, k]), -20.0), 20.0) if mask[b, k] else 0.0
            for k in range(length)
        ]
        for t in range(length):
            if not mask[b, t]:
                continue
            future = sum(
                gamma ** (k - t) * delta[k]
                for k in range(t, length)
                if mask[b, k] and delta[k] <= math.log(c)
            )
            low = 1.0 if clip_high_only else 1.0 - clip
            f = min(max(math.exp(future), low), 1.0 + clip)
            if adv[b, t] < 0 and math.exp(delta[t]) > neg_ratio_cap:
                f = min(max(f, 1.0 - clip), 1.0)
            out[b, t] = float(adv[b, t]) * (1.0 + bonus * f)
    return out


def reference_loss(
    logprob,
    old,
    adv,
    mask,
    *,
    clip_low=0.2,
    clip_high=0.28,
    dual_clip=3.0,
    ref=None,
    kl_coef=0.001,
    entropy=None,
    entropy_coef=0.0,
    kl_clamp=None,
    max_dual_clipped_per_row=None,
):
    """The loss token by token on float64 scalars (autograd flows to ``logprob``); also returns
    the token counts of each clipping regime. With ``max_dual_clipped_per_row``, rows with more
    dual-clipped tokens are skipped; with ``kl_clamp``, each k3 is clamped."""
    pg, kl, ent, tokens = 0.0, 0.0, 0.0, 0
    regimes = {"high": 0, "low": 0, "dual": 0}
    rows, length = logprob.shape
    for b in range(rows):
        dual_clipped = sum(
            1
            for t in range(length)
            if mask[b, t]
            and dual_clip is not None
            and float(adv[b, t]) < 0
            and math.exp(float(logprob[b, t].detach() - old[b, t])) > dual_clip
        )
        if max_dual_clipped_per_row is not None and dual_clipped > max_dual_clipped_per_row:
            continue
        for t in range(length):
            if not mask[b, t]:
                continue
            tokens += 1
            a = float(adv[b, t])
            ratio = torch.exp(logprob[b, t] - old[b, t])
            token = torch.maximum(-a * ratio, -a * ratio.clamp(1 - clip_low, 1 + clip_high))
            if a < 0 and dual_clip is not None:
                token = torch.minimum(token, torch.tensor(-dual_clip * a, dtype=torch.float64))
            regimes["high"] += int(a > 0 and ratio > 1 + clip_high)
            regimes["low"] += int(a < 0 and ratio < 1 - clip_low)
            regimes["dual"] += int(a < 0 and dual_clip is not None and ratio > dual_clip)
            pg = pg + token
            if ref is not None:
                d = ref[b, t] - logprob[b, t]
                k3 = torch.exp(d) - d - 1
                kl = kl + (k3 if kl_clamp is None else k3.clamp(-kl_clamp, kl_clamp))
            if entropy is not None:
                ent = ent + entropy[b, t]
    n = max(tokens, 1)
    return pg / n + kl_coef * kl / n - entropy_coef * ent / n, regimes, tokens


def random_batch(seed, rows=3, length=17, spread=0.8):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(rows, length, generator=g, dtype=torch.float64) * 3
    logprob = old + spread * torch.randn(rows, length, generator=g, dtype=torch.float64)
    adv = torch.randn(rows, length, generator=g, dtype=torch.float64)
    mask = (torch.rand(rows, length, generator=g) < 0.8).float()
    ref = old + 0.3 * torch.randn(rows, length, generator=g, dtype=torch.float64)
    entropy = torch.rand(rows, length, generator=g, dtype=torch.float64) * 2
    return logprob, old, adv, mask, ref, entropy


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"half_life": 3},
        {"clip_high_only": False, "half_life": 5},
        {"c": 1.5, "bonus": 0.5, "clip": 0.1},
        {"neg_ratio_cap": 2.0, "half_life": 8},
    ],
    ids=["default", "short-half-life", "two-sided", "c-bonus-clip", "tight-cap"],
)
def test_future_likelihood_scale_matches_reference(backend, options):
    logprob, old, adv, mask, _, _ = random_batch(1)
    got = future_likelihood_scale(adv, logprob, old, mask, **options)
    want = reference_scale(adv, logprob, old, mask, **options)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    ratio = (got / adv)[mask.bool()]  # 1 + bonus * f, f within the clip range
    bonus, clip = options.get("bonus", 1.0), options.get("clip", 0.2)
    assert torch.all(ratio >= 1 + bonus * (1 - clip) - 1e-6)
    assert torch.all(ratio <= 1 + bonus * (1 + clip) + 1e-6)


def test_future_likelihood_scale_exercises_every_branch():
    """The default case's inputs hit every clause (else the comparison above is weak)."""
    logprob, old, adv, mask, _, _ = random_batch(1)
    factor = (future_likelihood_scale(adv, logprob, old, mask) / adv - 1)[mask.bool()]
    at_low, at_high = (factor - 1.0).abs() < 1e-6, (factor - 1.2).abs() < 1e-6
    assert at_low.any() and at_high.any() and (~at_low & ~at_high).any()
    delta = (logprob - old)[mask.bool()]
    assert (delta > math.log(3.0)).any()  # dropped by m_k
    assert ((delta.exp() > 6.0) & (adv[mask.bool()] < 0)).any()  # capped negative advantages


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("with_extras", [False, True])
def test_policy_loss_and_gradient_match_float64_reference(seed, with_extras):
    logprob, old, adv, mask, ref, entropy = random_batch(seed + 10)
    extras = {"kl_coef": 0.05, "entropy": entropy, "entropy_coef": 0.01} if with_extras else {}
    lp = logprob.clone().requires_grad_()
    loss, metrics = policy_loss(
        lp, old, adv, mask, ref_logprob=ref if with_extras else None, **extras
    )
    loss.backward()

    lp_ref = logprob.clone().requires_grad_()
    want, regimes, tokens = reference_loss(
        lp_ref, old, adv, mask, ref=ref if with_extras else None, **extras
    )
    want.backward()

    torch.testing.assert_close(loss.detach(), want.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lp.grad, lp_ref.grad, rtol=1e-10, atol=1e-12)
    assert all(regimes.values()), regimes  # the batch exercises clip-high, clip-low and dual-clip
    assert metrics["tokens"] == tokens
    assert metrics["clip_frac_high"] == pytest.approx(regimes["high"] / tokens)
    assert metrics["clip_frac_low"] == pytest.approx(regimes["low"] / tokens)
    assert metrics["dual_clip_frac"] == pytest.approx(regimes["dual"] / tokens)
    assert ("kl" in metrics) == ("entropy" in metrics) == with_extras


def test_policy_loss_float32_inputs_agree_with_float64_reference():
    logprob, old, adv, mask, ref, _ = random_batch(5)
    lp32 = logprob.float().requires_grad_()
    loss, _ = policy_loss(lp32, old.float(), adv.float(), mask, ref_logprob=ref.float())
    loss.backward()
    lp64 = logprob.clone().requires_grad_()
    want, _, _ = reference_loss(lp64, old, adv, mask, ref=ref)
    want.backward()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lp32.grad.double(), lp64.grad, rtol=1e-4, atol=1e-6)


def test_masked_tokens_contribute_exactly_nothing():
    """Tool-output and padding tokens: any values there (NaN, -inf, huge) change neither the loss
    nor the gradient, and their gradient is exactly 0."""
    logprob, old, adv, mask, ref, entropy = random_batch(7)
    kwargs = dict(ref_logprob=ref, entropy=entropy, entropy_coef=0.01)
    lp = logprob.clone().requires_grad_()
    clean, _ = policy_loss(lp, old, adv, mask, **kwargs)
    clean.backward()

    off = mask == 0
    junk = lambda x, v: torch.where(off, torch.full_like(x, v), x)  # noqa: E731
    lp_junk = junk(logprob, float("nan")).requires_grad_()
    dirty, _ = policy_loss(
        lp_junk,
        junk(old, float("-inf")),
        junk(adv, 1e30),
        mask,
        ref_logprob=junk(ref, float("inf")),
        entropy=junk(entropy, float("nan")),
        entropy_coef=0.01,
    )
    dirty.backward()
    assert dirty.item() == clean.item()
    assert torch.all(lp_junk.grad[off] == 0)
    assert torch.equal(lp_junk.grad[~off], lp.grad[~off])


def test_tool_output_tokens_get_zero_advantage_and_zero_gradient():
    """End to end: advantages -> scaling -> loss with a response mask that excludes observations."""
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0])
    group_ids = torch.tensor([0, 0, 0, 0])
    is_branch = torch.tensor([False, False, True, True])
    parent = torch.tensor([-1, -1, 0, 1])
    split = torch.tensor([0, 0, 6, 3])
    response_mask = torch.ones(4, 10)
    response_mask[:, 4:7] = 0  # the observation <out>..</out> of a tool call
    response_mask[1, 9] = 0  # padding
    adv = procedure_advantages(rewards, group_ids, is_branch, parent, split, response_mask)
    logprob, old, _, _, _, _ = random_batch(3, rows=4, length=10, spread=0.05)
    scaled = future_likelihood_scale(adv, logprob, old, response_mask)
    lp = logprob.clone().requires_grad_()
    loss, _ = policy_loss(lp, old, scaled, response_mask)
    loss.backward()
    off = response_mask == 0
    assert torch.all(adv[off] == 0) and torch.all(scaled[off] == 0) and torch.all(lp.grad[off] == 0)
    assert torch.all(lp.grad[:2][~off[:2]] != 0)  # initial rows learn on their own tokens
    assert torch.all(lp.grad[2:] == 0)  # branch rows are not trained on


def test_num_tokens_and_empty_mask():
    logprob, old, adv, mask, _, _ = random_batch(2)
    loss, metrics = policy_loss(logprob, old, adv, mask)
    scaled, _ = policy_loss(logprob, old, adv, mask, num_tokens=4 * metrics["tokens"])
    assert scaled.item() == pytest.approx(loss.item() / 4)
    lp = logprob.clone().requires_grad_()
    empty, metrics = policy_loss(lp, old, adv, torch.zeros_like(mask))
    empty.backward()
    assert empty.item() == 0.0 and torch.all(lp.grad == 0) and metrics["tokens"] == 0


@pytest.mark.parametrize("num_tokens", [None, 0, 0.0, 7])
def test_empty_mini_batch_is_zero_whatever_the_count(num_tokens):
    """The one rule for every loss (module docstring): no valid token gives loss 0 and a zero
    gradient, a token count of 0 included (the global count of an all-padding batch); a count
    of 0 with valid tokens is an error naming it."""
    logprob, old, adv, mask, _, _ = random_batch(3)
    lp = logprob.clone().requires_grad_()
    entropy = torch.full_like(logprob, float("nan"))  # masked out: must not leak
    loss, metrics = policy_loss(
        lp, old, adv, torch.zeros_like(mask), num_tokens=num_tokens, entropy=entropy,
        entropy_coef=0.1, ref_logprob=old,
    )  # fmt: skip
    loss.backward()
    assert loss.item() == 0.0 and torch.all(lp.grad == 0)
    assert all(value == value for value in metrics.values())  # no NaN diagnostics
    if num_tokens == 0:
        with pytest.raises(ValueError, match="num_tokens"):
            policy_loss(logprob, old, adv, mask, num_tokens=num_tokens)


def test_dual_clip_can_be_turned_off():
    logprob, old, adv, mask, _, _ = random_batch(11)
    lp = logprob.clone().requires_grad_()
    loss, metrics = policy_loss(lp, old, adv, mask, dual_clip=None)
    want, _, _ = reference_loss(logprob, old, adv, mask, dual_clip=None)
    torch.testing.assert_close(loss.detach(), want, rtol=1e-10, atol=1e-12)
    assert metrics["dual_clip_frac"] == 0.0


@pytest.mark.parametrize(
    "change, error, match",
    [
        ({"logprob": torch.zeros(3, 5, dtype=torch.long)}, TypeError, "logprob"),
        ({"logprob": torch.zeros(15)}, ValueError, "logprob"),
        ({"old_logprob": torch.zeros(3, 4)}, ValueError, "old_logprob"),
        ({"old_logprob": None}, TypeError, "old_logprob"),
        ({"advantages": torch.zeros(3, 5, dtype=torch.complex64)}, TypeError, "advantages"),
        ({"mask": torch.ones(5, 3)}, ValueError, "mask"),
        ({"mask": [[1] * 5] * 3}, TypeError, "mask"),
        ({"ref_logprob": torch.zeros(2, 5)}, ValueError, "ref_logprob"),
        ({"entropy": torch.zeros(3, 5, dtype=torch.int32)}, TypeError, "entropy"),
        ({"clip_low": 1.0}, ValueError, "clip_low"),
        ({"clip_high": -0.1}, ValueError, "clip_high"),
        ({"dual_clip": 1.0}, ValueError, "dual_clip"),
        ({"kl_coef": float("nan")}, ValueError, "kl_coef"),
        ({"entropy_coef": 0.1}, ValueError, "entropy"),
        ({"num_tokens": 0}, ValueError, "num_tokens"),
    ],
)
def test_policy_loss_bad_input(change, error, match):
    kwargs = dict(
        logprob=torch.zeros(3, 5),
        old_logprob=torch.zeros(3, 5),
        advantages=torch.zeros(3, 5),
        mask=torch.ones(3, 5),
    )
    kwargs.update(change)
    with pytest.raises(error, match=match):
        policy_loss(**kwargs)


@pytest.mark.parametrize(
    "change, error, match",
    [
        ({"advantages": torch.zeros(3, 5, dtype=torch.long)}, TypeError, "advantages"),
        ({"logprob": torch.zeros(3, 6)}, ValueError, "logprob"),
        ({"mask": torch.ones(3)}, ValueError, "mask"),
        ({"c": 0.0}, ValueError, "c"),
        ({"half_life": -1}, ValueError, "half_life"),
        ({"clip": 1.0}, ValueError, "clip"),
        ({"neg_ratio_cap": "6"}, TypeError, "neg_ratio_cap"),
        ({"bonus": -1.0}, ValueError, "bonus"),
    ],
)
def test_future_likelihood_scale_bad_input(change, error, match):
    kwargs = dict(
        advantages=torch.zeros(3, 5),
        logprob=torch.zeros(3, 5),
        old_logprob=torch.zeros(3, 5),
        mask=torch.ones(3, 5),
    )
    kwargs.update(change)
    with pytest.raises(error, match=match):
        future_likelihood_scale(**kwargs)


def _hand_worked_rows():
    """Three rows of three tokens: (advantage, ratio) per token."""
    adv = torch.tensor([[-1.0, -1.0, 1.0], [-1.0, 1.0, -1.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    ratio = torch.tensor([[4.0, 5.0, 1.0], [4.0, 1.0, 0.5], [1.0, 2.0, 1.0]], dtype=torch.float64)
    old = torch.full((3, 3), -1.0, dtype=torch.float64)
    return (old + ratio.log()).requires_grad_(True), old, adv, torch.ones(3, 3)


@pytest.mark.parametrize(
    "limit, want, dropped",
    [
        # row 0 has two dual-clipped tokens (A < 0, r > 3): dropped. Token losses: row 1
        # 3 (dual bound −3·A), −1, 0.8 (−A·clip(0.5) = 0.8); row 2 −1, −1.28 (clip 1 + 0.28), −1.
        (1, (3 - 1 + 0.8 - 1 - 1.28 - 1) / 6, 1),
        (None, (3 + 3 - 1 + 3 - 1 + 0.8 - 1 - 1.28 - 1) / 9, 0),  # nothing dropped
        (0, (-1 - 1.28 - 1) / 3, 2),  # row 1's one dual-clipped token drops it too
    ],
)
def test_dual_clipped_row_filter_hand_worked(limit, want, dropped):
    logprob, old, adv, mask = _hand_worked_rows()
    loss, metrics = policy_loss(logprob, old, adv, mask, max_dual_clipped_per_row=limit)
    assert loss.item() == pytest.approx(want, abs=1e-12)
    assert metrics["rows_dropped"] == dropped
    loss.backward()
    if limit is not None:
        assert torch.all(logprob.grad[0] == 0)  # a dropped row passes no gradient
    with pytest.raises(ValueError, match="max_dual_clipped_per_row"):
        policy_loss(logprob, old, adv, mask, max_dual_clipped_per_row=-1)


@pytest.mark.parametrize("kl_clamp", [None, 10.0])
def test_k3_clamp_hand_worked(kl_clamp):
    """ref − logπ = 3, 0.5, −2: k3 = e^d − d − 1 = 16.0855, 0.1487, 1.1353; clamped to 10 (verl's
    low_var_kl), the first token's KL passes no gradient (d k3 / d logπ = 1 − e^d otherwise)."""
    logprob = torch.tensor([[-1.0, -1.0, -1.0]], dtype=torch.float64, requires_grad=True)
    ref = logprob.detach() + torch.tensor([[3.0, 0.5, -2.0]], dtype=torch.float64)
    zeros, mask = torch.zeros(1, 3, dtype=torch.float64), torch.ones(1, 3)
    k3 = [math.exp(d) - d - 1 for d in (3.0, 0.5, -2.0)]
    if kl_clamp is not None:
        k3[0] = 10.0
    loss, metrics = policy_loss(
        logprob, logprob.detach(), zeros, mask, ref_logprob=ref, kl_coef=1.0, kl_clamp=kl_clamp
    )
    assert metrics["kl"] == pytest.approx(sum(k3) / 3, abs=1e-12)
    loss.backward()
    grads = [(1 - math.exp(d)) / 3 for d in (3.0, 0.5, -2.0)]
    if kl_clamp is not None:
        grads[0] = 0.0
    torch.testing.assert_close(logprob.grad[0], torch.tensor(grads, dtype=torch.float64))
