"""The Triton kernels compiled for a real GPU, against the PyTorch path on CPU.

The rest of the suite checks both backends against float64 references on CPU (the kernels through
Triton's interpreter). This file closes the gap the interpreter leaves: the same kernels compiled
by Triton for the GPU at hand, on realistic vocabulary sizes, through CUDA-graph capture and
``torch.compile`` with Inductor. It runs only where CUDA is present and the interpreter is off
(``bench/gpu_session.sh`` runs it); on CPU machines there is nothing for it to test.
"""

import math

import pytest
import torch
from reference import linear_token_stats_ref as reference_linear
from utils import CustomOpCalls, assert_close_scaled

import appo_kernels as ak
from appo_kernels._backend import interpreter_enabled

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or interpreter_enabled(),
    reason="needs a CUDA GPU and compiled (not interpreted) Triton kernels; "
    "bench/gpu_session.sh runs this file on the GPU machines",
)

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def default_backends(monkeypatch):
    """CUDA tensors take the Triton kernels and CPU tensors the PyTorch path (no forcing)."""
    monkeypatch.delenv("APPO_KERNELS_BACKEND", raising=False)


def random_logits(rows, vocab, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=gen) * 4).to(dtype)
    tokens = torch.randint(0, vocab, (rows,), generator=gen)
    tokens[::5] = -100
    return logits, tokens


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize(
    "rows, vocab",
    [(512, 32000), (1000, 50257), (3, 151936)],  # the last one takes the vocabulary split
)
def test_token_stats_forward_backward_match_cpu(rows, vocab, dtype):
    logits, tokens = random_logits(rows, vocab, dtype)
    logits[1, : vocab // 3] = float("-inf")
    grads = torch.randn(2, rows, generator=torch.Generator().manual_seed(1))

    results = {}
    for device in ("cpu", "cuda"):
        x = logits.to(device, copy=True).requires_grad_()
        out = ak.token_stats(x, tokens.to(device))
        torch.autograd.backward(tuple(out), tuple(g.to(device) for g in grads))
        results[device] = (out.logprob, out.entropy, x.grad)
    for got, want in zip(results["cuda"][:2], results["cpu"][:2]):
        torch.testing.assert_close(got.cpu(), want, atol=2e-4, rtol=2e-5)
    assert_close_scaled(
        results["cuda"][2], results["cpu"][2], rel=1e-2 if dtype != torch.float32 else 3e-5
    )


def test_shifted_view_is_read_in_place():
    B, T, V = 4, 257, 32000
    logits = torch.randn(B, T, V, device=CUDA, dtype=torch.bfloat16)
    tokens = torch.randint(0, V, (B, T), device=CUDA)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = ak.token_stats(logits[:, :-1], tokens[:, 1:])
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < logits.numel() * logits.element_size() / 100, f"{extra} bytes extra"
    want = ak.token_stats(logits[:, :-1].contiguous(), tokens[:, 1:].contiguous())
    for got, ref in zip(out, want):
        torch.testing.assert_close(got, ref, atol=0, rtol=0)


def test_branching_score_matches_cpu():
    gen = torch.Generator().manual_seed(2)
    B, T, V = 8, 300, 32000
    logits = (torch.randn(B, T, V, generator=gen) * 3).to(torch.bfloat16)
    tokens = torch.randint(0, V, (B, T), generator=gen)
    behavior = -torch.rand(B, T, generator=gen) * 5
    mask = torch.rand(B, T, generator=gen) < 0.8
    cpu = ak.branching_score(logits, tokens, behavior, mask, gamma=0.99)
    gpu = ak.branching_score(*(x.to(CUDA) for x in (logits, tokens, behavior, mask)), gamma=0.99)
    for name in ("entropy", "logprob", "future_value"):
        torch.testing.assert_close(
            getattr(gpu, name).cpu(), getattr(cpu, name), atol=2e-4, rtol=1e-4
        )
    for name in ("z_entropy", "z_future", "score"):
        torch.testing.assert_close(
            getattr(gpu, name).cpu(), getattr(cpu, name), atol=5e-3, rtol=1e-3
        )


@pytest.mark.parametrize("gamma", [1.0, 0.99])
def test_scans_match_cpu(gamma):
    gen = torch.Generator().manual_seed(3)
    B, T = 16, 5000
    values = torch.randn(B, T, generator=gen) * 0.01
    behavior = torch.randn(B, T, generator=gen) * 0.01
    mask = torch.rand(B, T, generator=gen) < 0.9
    cpu = ak.discounted_future_sum(values, mask, gamma=gamma)
    gpu = ak.discounted_future_sum(values.to(CUDA), mask.to(CUDA), gamma=gamma)
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=1e-4)
    cpu = ak.future_value(values, behavior, mask, gamma=gamma)
    gpu = ak.future_value(values.to(CUDA), behavior.to(CUDA), mask.to(CUDA), gamma=gamma)
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=1e-4)


def test_scans_keep_infinities_where_the_decay_underflows():
    """gamma = 0.5 underflows gamma^(k-t) within a block (the GPU's tree scan combines long
    segments) and across blocks: -inf must still reach every earlier position (0 * -inf = NaN),
    +inf with -inf gives NaN, and the rest matches the CPU path."""
    gen = torch.Generator().manual_seed(8)
    B, T = 6, 3000
    values = torch.randn(B, T, generator=gen)
    mask = torch.ones(B, T, dtype=torch.bool)
    values[0, 2900] = values[1, 700] = values[2, 200] = -math.inf
    values[2, 2500] = math.inf
    values[3, 1500] = math.nan
    behavior = torch.zeros(B, T)
    for gamma in (0.5, 0.9):
        cpu = ak.discounted_future_sum(values, mask, gamma=gamma)
        gpu = ak.discounted_future_sum(values.to(CUDA), mask.to(CUDA), gamma=gamma).cpu()
        assert torch.all(gpu[0, :2901] == -math.inf) and torch.all(gpu[1, :701] == -math.inf)
        assert gpu[2, :201].isnan().all() and torch.all(gpu[2, 201:2501] == math.inf)
        torch.testing.assert_close(gpu, cpu, atol=1e-4, rtol=1e-4, equal_nan=True)
        omega = ak.future_value(values.to(CUDA), behavior.to(CUDA), mask.to(CUDA), gamma=gamma)
        assert torch.all(omega[0, :2901] == torch.tensor(0.8, device=CUDA))


def test_select_branch_points_matches_cpu_exactly():
    gen = torch.Generator().manual_seed(4)
    B, T, G = 32, 700, 5
    score = torch.randint(-4, 5, (B, T), generator=gen).float() / 4  # exact values, many ties
    candidates = torch.rand(B, T, generator=gen) < 0.3
    preferred = torch.rand(B, T, generator=gen) < 0.4
    group_ids = torch.randint(0, G - 1, (B,), generator=gen)  # the last group stays empty
    cpu = ak.select_branch_points(
        score, candidates, group_ids, 6, preferred=preferred, num_groups=G
    )
    gpu = ak.select_branch_points(
        *(x.to(CUDA) for x in (score, candidates, group_ids)),
        6,
        preferred=preferred.to(CUDA),
        num_groups=G,
    )
    assert (gpu.rows[G - 1] == -1).all()
    for got, want in zip(gpu, cpu):
        assert torch.equal(got.cpu(), want)


def test_cuda_graph_captures_score_and_selection():
    gen = torch.Generator().manual_seed(5)
    B, T, V, G = 4, 128, 32000, 2
    logits = torch.randn(B, T, V, generator=gen).to(CUDA, torch.bfloat16)
    tokens = torch.randint(0, V, (B, T), generator=gen).to(CUDA)
    behavior = (-torch.rand(B, T, generator=gen) * 5).to(CUDA)
    mask = torch.ones(B, T, dtype=torch.bool, device=CUDA)
    group_ids = torch.tensor([0, 0, 1, 1], device=CUDA)

    def run():
        bs = ak.branching_score(logits, tokens, behavior, mask)
        return bs, ak.select_branch_points(bs.score, mask, group_ids, 3, num_groups=G)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()  # warm-up: compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured_bs, captured_points = run()
    logits.copy_(
        torch.randn(B, T, V, generator=gen).to(CUDA, torch.bfloat16)
    )  # new data, same buffers
    graph.replay()
    torch.cuda.synchronize()
    eager_bs, eager_points = run()
    torch.testing.assert_close(captured_bs.score, eager_bs.score, atol=0, rtol=0)
    for got, want in zip(captured_points, eager_points):
        assert torch.equal(got, want)


def test_direct_path_equals_the_custom_ops_on_cuda():
    """The direct eager path and the custom ops (forced by a dispatch mode) launch the same
    kernels: values and gradients agree bit for bit on CUDA tensors."""
    gen = torch.Generator().manual_seed(8)
    B, T, V, H = 4, 64, 32000, 256
    logits = torch.randn(B, T, V, generator=gen).to(CUDA, torch.bfloat16)
    tokens = torch.randint(0, V, (B, T), generator=gen).to(CUDA)
    tokens[:, ::9] = -100
    hidden = torch.randn(B * T, H, generator=gen).to(CUDA, torch.bfloat16)
    head = (torch.randn(V, H, generator=gen) / H**0.5).to(CUDA, torch.bfloat16)
    behavior = (-torch.rand(B, T, generator=gen) * 5).to(CUDA)
    mask = (torch.rand(B, T, generator=gen) < 0.8).to(CUDA)
    group_ids = torch.tensor([0, 1, 0, 1], device=CUDA)

    def run():
        x = logits.clone().requires_grad_()
        h, w = hidden.clone().requires_grad_(), head.clone().requires_grad_()
        stats = ak.token_stats(x, tokens, temperature=0.8)
        linear = ak.linear_token_stats(h, w, tokens.view(-1))
        (stats.logprob.sum() + stats.entropy.sum() + linear.logprob.sum()).backward()
        bs = ak.branching_score(logits, tokens, behavior, mask, gamma=0.99)
        points = ak.select_branch_points(bs.score, mask, group_ids, 3, num_groups=2)
        return [*stats, *linear, x.grad, h.grad, w.grad, *bs, *points]

    with CustomOpCalls() as calls:
        through_ops = run()
    # (the backward ops run on autograd's device thread, which may not see the dispatch mode)
    forward_ops = {"token_stats_fwd", "linear_token_stats_fwd", "branching_score_from_stats"}
    assert forward_ops | {"select_branch_points"} <= set(calls.names)
    for got, want in zip(run(), through_ops, strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0, equal_nan=True)


def test_token_id_checks_off_means_no_host_sync():
    """The token-id range check is the only host sync of token_stats and branching_score on
    CUDA: with it off, a training-style forward + backward runs under
    ``torch.cuda.set_sync_debug_mode("error")``; with it on, the check is what raises there."""
    logits, tokens = random_logits(256, 32000, torch.bfloat16, seed=9)
    logits, tokens = logits.to(CUDA).view(4, 64, -1), tokens.to(CUDA).view(4, 64)
    behavior = torch.zeros(4, 64, device=CUDA)
    mask = torch.ones(4, 64, dtype=torch.bool, device=CUDA)
    x = logits.clone().requires_grad_()
    ak.token_stats(x, tokens)  # compiles the kernels before the sync checks
    ak.branching_score(logits, tokens, behavior, mask)
    torch.cuda.synchronize()
    try:
        torch.cuda.set_sync_debug_mode("error")
        with ak.token_id_checks(False):
            stats = ak.token_stats(x, tokens)
            (stats.logprob.sum() + 0.1 * stats.entropy.sum()).backward()
            ak.branching_score(logits, tokens, behavior, mask)
        with pytest.raises(RuntimeError, match="synchroniz"):
            ak.token_stats(x, tokens)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    bad = tokens.clone()
    bad[0, 3] = 32000
    with pytest.raises(ValueError, match="tokens"):
        ak.token_stats(logits, bad)
    with ak.token_id_checks(False):
        assert ak.token_stats(logits, bad).logprob[0, 3].isnan()


def test_torch_compile_inductor_forward_backward():
    logits, tokens = random_logits(64, 32000, torch.bfloat16, seed=6)
    logits, tokens = logits.to(CUDA).requires_grad_(), tokens.to(CUDA)

    def loss(x, y):
        lp, h = ak.token_stats(x, y, temperature=0.9)
        return (lp * 2.0 - 0.1 * h).sum()

    compiled = torch.compile(loss, fullgraph=True)
    compiled(logits, tokens).backward()
    got = logits.grad.clone()
    logits.grad = None
    loss(logits, tokens).backward()
    torch.testing.assert_close(got, logits.grad, atol=0, rtol=0)
    torch._dynamo.reset()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_kernels_launch_on_the_tensors_device():
    """Triton launches on the *current* device; the ops make their tensors' device current, so
    tensors on cuda:1 work while cuda:0 is current (and give cuda:0's results bit for bit)."""
    gen = torch.Generator().manual_seed(7)
    B, T, V = 4, 96, 32000
    logits = torch.randn(B, T, V, generator=gen).to(torch.bfloat16)
    tokens = torch.randint(0, V, (B, T), generator=gen)
    behavior = -torch.rand(B, T, generator=gen) * 5
    mask = torch.rand(B, T, generator=gen) < 0.8
    group_ids = torch.tensor([0, 0, 1, 1])
    results = {}
    for index in (0, 1):
        dev = torch.device("cuda", index)
        with torch.cuda.device(0):
            x = logits.to(dev).requires_grad_()
            stats = ak.token_stats(x, tokens.to(dev))
            (stats.logprob.sum() + stats.entropy.sum()).backward()
            bs = ak.branching_score(
                logits.to(dev), tokens.to(dev), behavior.to(dev), mask.to(dev), gamma=0.99
            )
            points = ak.select_branch_points(
                bs.score, mask.to(dev), group_ids.to(dev), 3, num_groups=2
            )
            scan = ak.discounted_future_sum(behavior.to(dev), mask.to(dev), gamma=0.99)
            torch.cuda.synchronize(dev)
        results[index] = [t.cpu() for t in (*stats, x.grad, *bs, *points, scan)]
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, atol=0, rtol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("chunk_size", [None, 96])
def test_linear_token_stats_matches_float64(dtype, chunk_size):
    """cuBLAS chunks + the compiled kernels (in-place backward) against float64 on the CPU."""
    gen = torch.Generator().manual_seed(2)
    rows, dim, vocab = 1000, 256, 32007
    hidden = torch.randn(rows, dim, generator=gen)
    weight = torch.randn(vocab, dim, generator=gen) / dim**0.5 * 3
    bias = torch.randn(vocab, generator=gen)
    tokens = torch.randint(0, vocab, (rows,), generator=gen)
    tokens[::7] = -100
    g_lp, g_h = torch.randn(2, rows, generator=gen)

    def run(device, dt, fn):
        leaves = [t.to(device, dt).requires_grad_() for t in (hidden, weight, bias)]
        lp, h = fn(*leaves, tokens.to(device))
        torch.autograd.backward((lp, h), (g_lp.to(device), g_h.to(device)))
        return (lp, h, *(t.grad for t in leaves))

    def reference(h, w, b, y):
        return reference_linear(h, w, y, b)

    got = run(CUDA, dtype, lambda h, w, b, y: ak.linear_token_stats(
        h, w, y, bias=b, chunk_size=chunk_size))  # fmt: skip
    want = run("cpu", torch.float64, reference)
    stats_tol = 2e-4 if dtype == torch.float32 else 0.3
    for g, w in zip(got[:2], want[:2]):
        assert (g.cpu().double() - w).abs().max() <= stats_tol
    for g, w in zip(got[2:], want[2:]):
        assert g.dtype == dtype
        assert_close_scaled(g, w, rel=1e-4 if dtype == torch.float32 else 5e-2)


def test_linear_token_stats_soft_cap_matches_float64():
    """The compiled kernels' in-register soft cap (forward and in-place backward), bf16 chunks of
    a real vocabulary size, against float64 on the CPU."""
    gen = torch.Generator().manual_seed(4)
    rows, dim, vocab, cap = 700, 128, 32007, 8.0
    hidden = torch.randn(rows, dim, generator=gen)
    weight = torch.randn(vocab, dim, generator=gen) / dim**0.5 * 12  # logits past the cap
    tokens = torch.randint(0, vocab, (rows,), generator=gen)
    tokens[::7] = -100
    g_lp, g_h = torch.randn(2, rows, generator=gen)

    def run(device, dtype, fn):
        leaves = [t.to(device, dtype).requires_grad_() for t in (hidden, weight)]
        lp, h = fn(*leaves, tokens.to(device))
        torch.autograd.backward((lp, h), (g_lp.to(device), g_h.to(device)))
        return (lp, h, *(t.grad for t in leaves))

    got = run(CUDA, torch.bfloat16, lambda h, w, y: ak.linear_token_stats(
        h, w, y, chunk_size=256, softcap=cap))  # fmt: skip
    want = run("cpu", torch.float64, lambda h, w, y: reference_linear(h, w, y, softcap=cap))
    for g, w in zip(got[:2], want[:2]):
        assert (g.cpu().double() - w).abs().max() <= 0.3
    for g, w in zip(got[2:], want[2:]):
        assert g.dtype == torch.bfloat16
        assert_close_scaled(g, w, rel=5e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_linear_token_stats_under_cuda_autocast(dtype):
    """Inside torch.autocast("cuda", dtype) with float32 inputs and ignored rows: forward and
    backward run on the inputs cast to the autocast dtype (as linear does), float32 gradients."""
    gen = torch.Generator().manual_seed(5)
    rows, dim, vocab = 300, 64, 5003
    hidden = torch.randn(rows, dim, generator=gen).to(CUDA)
    weight = (torch.randn(vocab, dim, generator=gen) / dim**0.5 * 3).to(CUDA)
    tokens = torch.randint(0, vocab, (rows,), generator=gen).to(CUDA)
    tokens[::4] = -100
    g_lp, g_h = torch.randn(2, rows, generator=gen).to(CUDA)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight)]
    with torch.autocast("cuda", dtype):
        lp, h = ak.linear_token_stats(*leaves, tokens, chunk_size=128)
        torch.autograd.backward((lp, h), (g_lp, g_h))
    cast = [t.to(dtype).requires_grad_() for t in (hidden, weight)]
    want = ak.linear_token_stats(*cast, tokens, chunk_size=128)
    torch.autograd.backward(tuple(want), (g_lp, g_h))
    assert torch.equal(lp, want.logprob) and torch.equal(h, want.entropy)
    for leaf, ref in zip(leaves, cast):
        assert leaf.grad.dtype == torch.float32
        assert_close_scaled(leaf.grad, ref.grad.float(), rel=1e-6)


def test_linear_token_stats_torch_compile_inductor():
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(300, 64, generator=gen).to(CUDA, torch.bfloat16)
    weight = torch.randn(5000, 64, generator=gen).to(CUDA, torch.bfloat16)
    tokens = torch.randint(0, 5000, (300,), generator=gen).to(CUDA)

    def loss(h, w):
        lp, ent = ak.linear_token_stats(h, w, tokens, temperature=0.9, chunk_size=128)
        return (lp - 0.1 * ent).sum()

    grads = []
    for fn in (loss, torch.compile(loss, fullgraph=True)):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        fn(h, w).backward()
        grads.append((h.grad, w.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
