"""linear_token_stats against a float64 reference (matmul in float64, then the formula), on both
backends (PyTorch path; Triton kernels through the interpreter on CPU)."""

import pytest
import torch
from reference import linear_token_stats_ref as reference_linear
from utils import assert_close_scaled

import appo_kernels as ak
from appo_kernels.linear_token_stats import default_chunk_size

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Statistics are float32, but the logits chunk is rounded to the inputs' dtype (as a model's LM
# head rounds its logits): the tolerance follows that rounding.
STATS_TOL = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=2e-2, rtol=1e-2),
    torch.bfloat16: dict(atol=1.5e-1, rtol=5e-2),
}
# max |got - want| <= GRAD_REL * max |want| (gradients of very different scales in one tensor)
GRAD_REL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 4e-2}


def make_case(gen, n, hidden_size, vocab, dtype, ignore_every=3, bias=True):
    hidden = torch.randn(n, hidden_size, generator=gen).to(dtype)
    weight = (torch.randn(vocab, hidden_size, generator=gen) / hidden_size**0.5 * 3).to(dtype)
    b = torch.randn(vocab, generator=gen).to(dtype) if bias else None
    tokens = torch.randint(0, vocab, (n,), generator=gen)
    if ignore_every:
        tokens[::ignore_every] = -100
    return hidden, weight, b, tokens


def grads_of(fn, inputs, g_lp, g_h):
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    lp, h = fn(*leaves)
    torch.autograd.backward((lp, h), (g_lp.to(lp.dtype), g_h.to(h.dtype)))
    return (lp, h), [None if t is None else t.grad for t in leaves]


@pytest.mark.parametrize("softcap", [None, 2.0], ids=["uncapped", "softcap"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", [1, 37])
def test_values_and_gradients_match_float64(backend, dtype, vocab, softcap, gen):
    hidden, weight, bias, tokens = make_case(gen, 11, 8, vocab, dtype)
    g_lp, g_h = torch.randn(2, 11, generator=gen)

    def ours(h, w, b):
        return ak.linear_token_stats(
            h, w, tokens, bias=b, temperature=0.8, chunk_size=4, softcap=softcap
        )

    def ref(h, w, b):
        return reference_linear(h, w, tokens, b, temperature=0.8, softcap=softcap)

    (lp, h), got = grads_of(ours, (hidden, weight, bias), g_lp, g_h)
    (ref_lp, ref_h), want = grads_of(ref, (hidden, weight, bias), g_lp, g_h)
    assert lp.dtype == h.dtype == torch.float32 and lp.shape == h.shape == (11,)
    torch.testing.assert_close(lp.double(), ref_lp, **STATS_TOL[dtype])
    torch.testing.assert_close(h.double(), ref_h, **STATS_TOL[dtype])
    for name, g, w in zip(("hidden", "weight", "bias"), got, want):
        assert g.dtype == dtype, name
        assert_close_scaled(g, w, GRAD_REL[dtype])
    ignored = tokens == -100
    assert (lp[ignored] == 0).all() and (h[ignored] == 0).all()
    assert (got[0][ignored] == 0).all()


def test_equals_unfused_token_stats(backend, gen):
    """Same values as token_stats on the model-style logits (rows not ignored)."""
    hidden, weight, bias, tokens = make_case(gen, 9, 12, 50, torch.float32, ignore_every=0)
    lp, h = ak.linear_token_stats(hidden, weight, tokens, bias=bias, chunk_size=2)
    want_lp, want_h = ak.token_stats(hidden @ weight.t() + bias, tokens)
    torch.testing.assert_close(lp, want_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h, want_h, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("ignored", ["none", "all"])
def test_no_rows_or_all_rows_ignored(backend, ignored, gen):
    hidden, weight, _, tokens = make_case(gen, 6, 8, 20, torch.float32, ignore_every=0)
    if ignored == "all":
        tokens[:] = -100
    g = torch.randn(2, 6, generator=gen)
    (lp, h), got = grads_of(
        lambda hd, w: ak.linear_token_stats(hd, w, tokens, chunk_size=4), (hidden, weight), *g
    )
    (ref_lp, ref_h), want = grads_of(
        lambda hd, w: reference_linear(hd, w, tokens), (hidden, weight), *g
    )
    torch.testing.assert_close(lp.double(), ref_lp, **STATS_TOL[torch.float32])
    torch.testing.assert_close(h.double(), ref_h, **STATS_TOL[torch.float32])
    for g_got, g_want in zip(got, want):
        torch.testing.assert_close(g_got.double(), g_want.double(), atol=1e-5, rtol=1e-5)
    if ignored == "all":
        assert (lp == 0).all() and (h == 0).all() and (got[0] == 0).all() and (got[1] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_soft_cap_saturated_and_masked_logits_match_float64(backend, dtype, gen):
    """Logits far past the cap (tanh saturated, 1 - tanh^2 ~ 1e-8) and -inf bias entries (a
    masked vocabulary entry becomes -c, as in the model): values and every gradient against
    float64, an odd vocabulary, ignored rows, a chunk that does not divide N."""
    n, dim, vocab, cap = 13, 8, 53, 1.0
    hidden, weight, bias, tokens = make_case(gen, n, dim, vocab, dtype)
    weight = (weight.float() * 6).to(dtype)  # logits of scale ~20 against a cap of 1
    bias[::7] = float("-inf")
    tokens[1] = 0  # a row whose token sits at a -inf (capped to -1) logit
    g_lp, g_h = torch.randn(2, n, generator=gen)

    def ours(h, w, b):
        return ak.linear_token_stats(h, w, tokens, bias=b, chunk_size=5, softcap=cap)

    def ref(h, w, b):
        return reference_linear(h, w, tokens, b, softcap=cap)

    (lp, h), got = grads_of(ours, (hidden, weight, bias), g_lp, g_h)
    (ref_lp, ref_h), want = grads_of(ref, (hidden, weight, bias), g_lp, g_h)
    assert torch.isfinite(lp).all() and torch.isfinite(h).all()
    torch.testing.assert_close(lp.double(), ref_lp, **STATS_TOL[dtype])
    torch.testing.assert_close(h.double(), ref_h, **STATS_TOL[dtype])
    for name, g, w in zip(("hidden", "weight", "bias"), got, want):
        assert g.dtype == dtype and torch.isfinite(g).all(), name
        assert_close_scaled(g, w, GRAD_REL[dtype])
    assert (got[2][::7] == 0).all()  # the cap is flat at -inf: no gradient reaches those entries


def test_soft_cap_equals_token_stats_of_capped_logits(backend, gen):
    """softcap=c gives token_stats(c tanh(logits / c) ) with the temperature after the cap (Gemma
    2's order); a cap of 1.0 is a real cap, not the identity."""
    hidden, weight, bias, tokens = make_case(gen, 9, 12, 50, torch.float32, ignore_every=0)
    logits = hidden @ weight.t() + bias
    for cap in (30.0, 1.0):
        lp, h = ak.linear_token_stats(
            hidden, weight, tokens, bias=bias, temperature=0.7, chunk_size=4, softcap=cap
        )
        want_lp, want_h = ak.token_stats(cap * torch.tanh(logits / cap), tokens, temperature=0.7)
        torch.testing.assert_close(lp, want_lp, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(h, want_h, atol=1e-5, rtol=1e-5)
    uncapped, _ = ak.linear_token_stats(hidden, weight, tokens, bias=bias, temperature=0.7)
    assert (uncapped - lp).abs().max() > 0.5


@pytest.mark.parametrize("backward_inside", [True, False], ids=["bwd-in", "bwd-out"])
def test_autocast_casts_inputs_like_linear(backend, gen, backward_inside):
    """Under CPU bf16 autocast, float32 inputs with ignored rows: the op runs on the inputs cast
    to bf16, exactly as an explicit cast would (as linear does), and each gradient has its
    input's dtype, whether backward runs inside the autocast region or after it."""
    hidden, weight, bias, tokens = make_case(gen, 11, 8, 37, torch.float32)
    g_lp, g_h = torch.randn(2, 11, generator=gen)

    def ours(h, w, b):
        return ak.linear_token_stats(h, w, tokens, bias=b, temperature=0.8, chunk_size=4)

    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    with torch.autocast("cpu", torch.bfloat16):
        lp, h = ours(*leaves)
        if backward_inside:
            torch.autograd.backward((lp, h), (g_lp, g_h))
    if not backward_inside:
        torch.autograd.backward((lp, h), (g_lp, g_h))
    cast = [t.to(torch.bfloat16).requires_grad_() for t in (hidden, weight, bias)]
    want_lp, want_h = ours(*cast)
    torch.autograd.backward((want_lp, want_h), (g_lp, g_h))
    assert torch.equal(lp, want_lp) and torch.equal(h, want_h)
    for leaf, want in zip(leaves, cast):
        assert leaf.grad.dtype == torch.float32
        assert torch.equal(leaf.grad, want.grad.float())
    # what the unfused path gives under the same autocast: linear (bf16) + token_stats
    with torch.autocast("cpu", torch.bfloat16):
        unfused = ak.token_stats(torch.nn.functional.linear(hidden, weight, bias), tokens,
                                 temperature=0.8)  # fmt: skip
    kept = tokens != -100
    torch.testing.assert_close(lp[kept], unfused.logprob[kept], **STATS_TOL[torch.bfloat16])
    # mixed dtypes are cast together, as linear casts them
    with torch.autocast("cpu", torch.bfloat16):
        mixed = ak.linear_token_stats(hidden.bfloat16(), weight, tokens, bias=bias)
    explicit = ak.linear_token_stats(*cast[:2], tokens, bias=cast[2])
    assert torch.equal(mixed.logprob, explicit.logprob)


def test_tied_weight_gets_both_gradients(backend, gen):
    """An LM head tied to the input embedding: its gradient is the embedding's plus the head's."""
    vocab, dim = 30, 8
    embedding = torch.randn(vocab, dim, generator=gen)
    inputs = torch.randint(0, vocab, (2, 5), generator=gen)
    targets = torch.randint(0, vocab, (2, 5), generator=gen)
    mix = torch.randn(dim, dim, generator=gen)

    def loss(table, stats_fn):
        hidden = torch.tanh(table[inputs] @ mix)  # a stand-in for the model's layers
        lp, h = stats_fn(hidden, table)
        return (lp + 0.1 * h).sum()

    ours = embedding.clone().requires_grad_()
    loss(ours, lambda hd, w: ak.linear_token_stats(hd, w, targets, chunk_size=3)).backward()
    ref = embedding.double().requires_grad_()
    mix = mix.double()
    loss(ref, lambda hd, w: reference_linear(hd, w, targets)).backward()
    torch.testing.assert_close(ours.grad.double(), ref.grad, atol=1e-5, rtol=1e-5)


def test_strided_hidden_and_temperature(backend, gen):
    base = torch.randn(3, 8, 16, generator=gen)
    hidden = base[:, 1:, ::2]  # non-contiguous in every dimension
    weight = torch.randn(41, 8, generator=gen)
    tokens = torch.randint(0, 41, (3, 7), generator=gen)
    lp, h = ak.linear_token_stats(hidden, weight, tokens, temperature=1.7, chunk_size=5)
    ref_lp, ref_h = reference_linear(hidden, weight, tokens, temperature=1.7)
    assert lp.shape == (3, 7)
    torch.testing.assert_close(lp.double(), ref_lp, **STATS_TOL[torch.float32])
    torch.testing.assert_close(h.double(), ref_h, **STATS_TOL[torch.float32])


def test_at_most_one_chunk_of_logits_is_allocated(gen, monkeypatch):
    """No allocation of forward + backward comes near the [N, V] logits: the largest is about
    one chunk (the PyTorch path's per-chunk softmax buffers included)."""
    monkeypatch.setenv("APPO_KERNELS_BACKEND", "torch")
    n, vocab, dim, chunk = 64, 1000, 8, 8
    hidden = torch.randn(n, dim, generator=gen, requires_grad=True)
    weight = torch.randn(vocab, dim, generator=gen, requires_grad=True)
    tokens = torch.randint(0, vocab, (n,), generator=gen)
    with torch.profiler.profile(profile_memory=True) as prof:
        lp, h = ak.linear_token_stats(hidden, weight, tokens, chunk_size=chunk)
        (lp.sum() + h.sum()).backward()
    largest = max(e.cpu_memory_usage for e in prof.events())
    full_logits = n * vocab * 4
    assert chunk * vocab * 4 <= largest <= full_logits // 4, (largest, full_logits)


def test_torch_compile_fullgraph(backend, gen):
    hidden, weight, bias, tokens = make_case(gen, 7, 8, 19, torch.float32)

    def loss(h, w, b):
        lp, ent = ak.linear_token_stats(h, w, tokens, bias=b, temperature=0.9, chunk_size=3)
        return (lp * 2.0 - ent).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    compiled(*leaves).backward()
    got = [t.grad for t in leaves]
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    loss(*leaves).backward()
    for g, want in zip(got, (t.grad for t in leaves)):
        torch.testing.assert_close(g, want, atol=1e-6, rtol=1e-6)
    torch._dynamo.reset()


def test_default_chunk_size():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    rows = default_chunk_size(16384, 152064, torch.bfloat16, cuda)
    assert rows % 64 == 0 and rows * 152064 * 2 <= 256 << 20 < (rows + 64) * 152064 * 2
    assert default_chunk_size(10, 152064, torch.bfloat16, cuda) == 10  # capped by N
    assert default_chunk_size(4096, 49152, torch.float32, cpu) * 49152 * 4 <= 96 << 20
    assert default_chunk_size(3, 10**9, torch.float32, cpu) == 1


def test_empty_input():
    hidden = torch.randn(0, 4, requires_grad=True)
    weight = torch.randn(7, 4, requires_grad=True)
    lp, h = ak.linear_token_stats(hidden, weight, torch.zeros(0, dtype=torch.long))
    assert lp.shape == h.shape == (0,)
    (lp.sum() + h.sum()).backward()
    assert hidden.grad.shape == (0, 4) and (weight.grad == 0).all()


def test_bad_inputs():
    h, w, y = torch.randn(3, 4), torch.randn(10, 4), torch.randint(0, 10, (3,))
    type_errors = {
        "hidden": dict(hidden=h.long()),
        "weight": dict(weight=w.double()),
        "tokens": dict(tokens=y.float()),
        "bias": dict(bias=torch.randn(10).half()),
    }
    for name, kwargs in type_errors.items():
        args = dict(hidden=h, weight=w, tokens=y) | kwargs
        with pytest.raises(TypeError, match=name):
            ak.linear_token_stats(
                args.pop("hidden"), args.pop("weight"), args.pop("tokens"), **args
            )
    with pytest.raises(TypeError, match="dtype"):
        ak.linear_token_stats(h, w.half(), y)
    for softcap in ("30", True, torch.tensor(30.0)):
        with pytest.raises(TypeError, match="softcap"):
            ak.linear_token_stats(h, w, y, softcap=softcap)
    value_errors = {
        "weight": [dict(weight=torch.randn(10, 5)), dict(weight=torch.randn(10)),
                   dict(weight=torch.randn(0, 4))],
        "tokens": [dict(tokens=y[:2]), dict(tokens=torch.tensor([0, 10, 1])),
                   dict(tokens=torch.tensor([0, -3, 1]))],
        "bias": [dict(bias=torch.randn(9))],
        "temperature": [dict(temperature=0.0), dict(temperature=1e31), dict(temperature=2**2000)],
        "softcap": [dict(softcap=0.0), dict(softcap=-30.0), dict(softcap=float("nan")),
                    dict(softcap=float("inf")), dict(softcap=1e-31)],
        "chunk_size": [dict(chunk_size=0), dict(chunk_size=2**40)],
        "hidden": [dict(hidden=torch.randn(3, 0))],
    }  # fmt: skip
    for name, cases in value_errors.items():
        for kwargs in cases:
            args = dict(hidden=h, weight=w, tokens=y) | kwargs
            with pytest.raises(ValueError, match=name):
                ak.linear_token_stats(
                    args.pop("hidden"), args.pop("weight"), args.pop("tokens"), **args
                )
    with pytest.raises(ValueError, match="device"):
        ak.linear_token_stats(h, w.to("meta"), y)
