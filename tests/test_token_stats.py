"""token_stats against a float64 reference, on both backends (PyTorch path and Triton kernels,
the latter through the interpreter on CPU), plus ahead-of-time GPU compilation of the kernels.

Shapes are small and the Triton chunk width is forced small (``_block_v=16``) so that the
multi-chunk, rescaling and vocabulary-split paths run at small V under the interpreter.
"""

import sys

import pytest
import torch
from aot import ARCHS, KernelCase, compile_kernels
from reference import token_stats_grad_ref, token_stats_ref

from appo_kernels.token_stats import (
    BACKWARD,
    TokenStats,
    _launch_config,
    _row_view,
    token_stats,
    token_stats_forward,
)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SMALL_BLOCK = 16
# Statistics are float32 from the same (upcast) inputs as the reference: tight for every dtype.
STATS_TOL = dict(atol=2e-5, rtol=2e-5)
# Gradients come back in the logits dtype (the interpreter truncates fp32 -> bf16: 2 ulp).
GRAD_TOL = {
    torch.float32: dict(atol=1e-6, rtol=1e-5),
    torch.float16: dict(atol=1e-5, rtol=2e-3),
    torch.bfloat16: dict(atol=1e-4, rtol=2e-2),
}


def random_case(gen, shape, vocab, dtype, scale=3.0, ignore_every=4):
    logits = (torch.randn(*shape, vocab, generator=gen) * scale).to(dtype)
    tokens = torch.randint(0, vocab, shape, generator=gen)
    if ignore_every:
        tokens.view(-1)[::ignore_every] = -100
    return logits, tokens


def assert_stats_close(out, logits, tokens, **kwargs):
    ref_lp, ref_h = token_stats_ref(logits, tokens, **kwargs)
    assert isinstance(out, TokenStats)
    for got, want in zip(out, (ref_lp, ref_h)):
        assert got.dtype == torch.float32 and got.shape == want.shape
        torch.testing.assert_close(got.double(), want, **STATS_TOL)


# ------------------------------------------------------------------------------------ forward


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", [1, 2, 17, 67])  # 17 = just above a chunk, 67 = odd, 5 chunks
def test_matches_reference(backend, dtype, vocab, gen):
    logits, tokens = random_case(gen, (5,), vocab, dtype)
    out = token_stats(logits, tokens, temperature=0.7, _block_v=SMALL_BLOCK)
    assert_stats_close(out, logits, tokens, temperature=0.7)


def test_default_launch_config(backend, gen):
    logits, tokens = random_case(gen, (3,), 300, torch.bfloat16)
    assert_stats_close(token_stats(logits, tokens), logits, tokens)


def test_peaked_rows_masked_vocab_and_temperature(backend, gen):
    logits, tokens = random_case(gen, (6,), 50, torch.float32)
    logits[0, 7] += 30.0  # peaked row: entropy ~ 1e-11, log-prob of the peak ~ 0
    tokens[0] = 7
    logits[1, 40] = 40.0  # the peak arrives in a late chunk: rescaling of (s, a)
    logits[2, 3] -= 30.0  # a very unlikely sampled token
    tokens[2] = 3
    logits[3:, 45:] = float("-inf")  # vocabulary padding
    logits[4, :20] = float("-inf")  # a whole first chunk masked: running max stays -inf
    for temperature in (1.0, 0.5, 3.0):
        out = token_stats(logits, tokens, temperature=temperature, _block_v=SMALL_BLOCK)
        assert_stats_close(out, logits, tokens, temperature=temperature)
        assert torch.isfinite(out.entropy).all() and torch.isfinite(out.logprob).all()


@pytest.mark.parametrize("id_dtype", [torch.uint8, torch.int16, torch.int32])
def test_narrow_token_dtypes(backend, id_dtype, gen):
    logits, _ = random_case(gen, (4,), 260, torch.float32)
    tokens = torch.tensor([0, 156, 255, 3], dtype=id_dtype)  # 156 == -100 as uint8
    out = token_stats(logits, tokens)
    assert_stats_close(out, logits, tokens.long())
    if id_dtype != torch.uint8:
        tokens[2] = -100
        assert_stats_close(token_stats(logits, tokens), logits, tokens.long())


def test_custom_ignore_index(backend, gen):
    logits, tokens = random_case(gen, (6,), 20, torch.float32, ignore_every=None)
    tokens[1] = -1
    tokens[4] = -1
    out = token_stats(logits, tokens, ignore_index=-1, _block_v=SMALL_BLOCK)
    assert_stats_close(out, logits, tokens, ignore_index=-1)
    assert (out.logprob[[1, 4]] == 0).all() and (out.entropy[[1, 4]] > 0).all()


def test_ignore_index_inside_the_vocabulary(backend, gen):
    """An ignore_index that is also a valid id: its rows get logprob 0 on every path, and an id
    outside the vocabulary (-100 is not the ignore_index here) is still refused."""
    logits, tokens = random_case(gen, (7,), 20, torch.float32, ignore_every=None)
    tokens[[1, 5]] = 3
    out = token_stats(logits, tokens, ignore_index=3, _block_v=SMALL_BLOCK)
    assert_stats_close(out, logits, tokens, ignore_index=3)
    assert (out.logprob[tokens == 3] == 0).all() and (out.logprob[tokens != 3] < 0).all()
    tokens[4] = -100
    with pytest.raises(ValueError, match=r"tokens must hold ids in \[0, 20\) .*=3, got -100"):
        token_stats(logits, tokens, ignore_index=3)


def test_pytorch_path_in_several_chunks(monkeypatch, gen):
    """The PyTorch path with its chunk budget shrunk to 3 rows gives what one chunk gives, for
    two-level strided rows and for [N, V] rows, with -inf, NaN and ignored rows and a
    temperature, forward and backward; a bad id is named whichever chunk it is in."""
    monkeypatch.setenv("APPO_KERNELS_BACKEND", "torch")
    module = sys.modules["appo_kernels.token_stats"]
    base, tokens = random_case(gen, (3, 8), 19, torch.float32)
    base[0, 2, :5] = float("-inf")
    base[1, 4, 7] = float("nan")
    two_levels, rows = (base[:, :-1], tokens[:, 1:]), (base.view(-1, 19), tokens.view(-1))
    for logits, ids in (two_levels, rows):
        results = []
        for budget in (module._TORCH_CHUNK_BYTES, 3 * 19 * 4):
            monkeypatch.setattr(module, "_TORCH_CHUNK_BYTES", budget)
            leaf = logits.detach().clone().requires_grad_()
            out = token_stats(leaf, ids, temperature=0.7)
            (out.logprob.nan_to_num().sum() + 0.3 * out.entropy.nan_to_num().sum()).backward()
            results.append((*out, leaf.grad))
        for got, want in zip(*results, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, equal_nan=True)
        finite = ~logits.isnan().any(-1)
        chunked = TokenStats(results[1][0][finite], results[1][1][finite])
        assert_stats_close(chunked, logits[finite], ids[finite], temperature=0.7)
    bad = tokens[:, 1:].clone()
    bad[2, 4], bad[2, 6] = 40, 50  # in the last two of nine chunks (3 levels of 7 rows)
    with pytest.raises(ValueError, match="got 40"):
        token_stats(base[:, :-1], bad)


def test_strided_views(backend, gen):
    base, tokens = random_case(gen, (2, 5), 30, torch.bfloat16)
    views = {
        "shifted [:, :-1]": (base[:, :-1], tokens[:, 1:]),
        "transposed leading dims": (base.transpose(0, 1), tokens.transpose(0, 1)),
        "row-strided 2-D": (base[0, ::2], tokens[0, ::2]),
        "three strided levels (copied)": (base.view(2, 5, 3, 10)[:, :-1, :, :], None),
        "non-contiguous last dim (copied)": (base[..., ::2], tokens),
    }
    for name, (logits, toks) in views.items():
        if toks is None:
            toks = torch.randint(0, logits.shape[-1], logits.shape[:-1], generator=gen)
        toks = toks.clamp(max=logits.shape[-1] - 1)
        out = token_stats(logits, toks, _block_v=SMALL_BLOCK)
        assert out.logprob.shape == logits.shape[:-1], name
        assert_stats_close(out, logits, toks)


def test_two_level_views_are_read_in_place():
    base = torch.randn(3, 7, 11)
    for view in (base[:, :-1], base[:, 1:], base.transpose(0, 1), base[::2, ::3], base[1]):
        rows = _row_view(view)
        assert rows.data_ptr() == view.data_ptr() and rows.untyped_storage().data_ptr() == (
            base.untyped_storage().data_ptr()
        )
        torch.testing.assert_close(rows.reshape(-1, 11), view.reshape(-1, 11), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_vocab_split_matches_single_pass(backend, dtype, gen):
    logits, tokens = random_case(gen, (4,), 100, dtype)
    logits[1, 90] = 25.0  # the max lives in the last split
    logits[2, :40] = float("-inf")  # first splits entirely masked
    single = token_stats(logits, tokens, _block_v=SMALL_BLOCK)
    for splits in (2, 3, 7):
        split = token_stats(logits, tokens, _block_v=SMALL_BLOCK, _num_splits=splits)
        for a, b in zip(split, single):
            torch.testing.assert_close(a, b, atol=2e-6, rtol=2e-6)
    assert_stats_close(single, logits, tokens)


def test_forward_only_entry_point(backend, gen):
    logits, tokens = random_case(gen, (2, 3), 40, torch.float16)
    logits.requires_grad_()
    out = token_stats_forward(logits, tokens, temperature=1.3, _block_v=SMALL_BLOCK)
    assert not any(t.requires_grad for t in out)
    assert_stats_close(TokenStats(out.logprob, out.entropy), logits, tokens, temperature=1.3)
    lse = torch.logsumexp(logits.detach().double() / 1.3, dim=-1)
    torch.testing.assert_close(out.lse.double(), lse, **STATS_TOL)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on NaN / -inf
def test_nan_stays_in_its_row(backend, gen):
    logits, tokens = random_case(gen, (5,), 40, torch.float32, ignore_every=None)
    logits[1, 33] = float("nan")  # a NaN in a late chunk, after the max is known
    logits[3, 0] = float("nan")  # a NaN as the very first entry
    logits[4] = float("-inf")  # no distribution at all
    out = token_stats(logits, tokens, _block_v=SMALL_BLOCK)
    bad = torch.tensor([False, True, False, True, True])
    for t in out:
        assert t[bad].isnan().all() and torch.isfinite(t[~bad]).all()
    assert_stats_close(TokenStats(out.logprob[~bad], out.entropy[~bad]), logits[~bad], tokens[~bad])
    for splits in (2, 3):
        split = token_stats(logits, tokens, _block_v=SMALL_BLOCK, _num_splits=splits)
        assert split.entropy[bad].isnan().all() and torch.isfinite(split.entropy[~bad]).all()


@pytest.mark.parametrize("shape", [(0, 9), (2, 0, 9)])
def test_empty_inputs(backend, shape):
    logits = torch.zeros(shape, requires_grad=True)
    tokens = torch.zeros(shape[:-1], dtype=torch.long)
    out = token_stats(logits, tokens)
    assert out.logprob.shape == out.entropy.shape == shape[:-1]
    (out.logprob.sum() + out.entropy.sum()).backward()
    assert logits.grad.shape == shape


def test_launch_config():
    cpu = torch.device("cpu")
    bf16 = _launch_config(16384, 151936, torch.bfloat16, cpu)
    assert (bf16.block_v, bf16.num_warps, bf16.num_splits) == (512, 2, 1)  # 16 B per thread
    fp32 = _launch_config(64, 32000, torch.float32, cpu)
    assert (fp32.block_v, fp32.num_warps) == (256, 2)
    backward = _launch_config(64, 32000, torch.bfloat16, cpu, shape=BACKWARD)
    assert (backward.block_v, backward.num_warps) == (4096, 8)  # 2 x 16 B per thread
    assert _launch_config(4, 50, torch.float16, cpu).block_v == 64  # capped by the row
    forced = _launch_config(2, 100, torch.float32, cpu, block_v=16, num_splits=3)
    assert forced.cols_per_split == 48 and forced.num_splits == 3  # 7 chunks -> 3 + 3 + 1
    assert _launch_config(2, 40, torch.float32, cpu, block_v=16, num_splits=9).num_splits == 3


def test_extreme_temperatures_stay_finite(backend, gen):
    """x / tau would overflow float32 at tau = 1e-30 and 1 / tau underflow at 1e30; the kernels
    scale x - max instead, so the limits come out right: argmax at tau -> 0, uniform over the
    finite entries at tau -> inf."""
    logits = torch.randn(3, 40, generator=gen) * 5
    logits[2, 10:] = float("-inf")  # 10 finite entries
    top = logits.argmax(-1)
    other = (top + 1) % 10
    lp, h = token_stats(logits, top, temperature=1e-30, _block_v=SMALL_BLOCK)
    assert (h == 0).all() and (lp == 0).all(), (lp, h)
    lp, _ = token_stats(logits, other, temperature=1e-30, _block_v=SMALL_BLOCK)
    assert (lp < -1e28).all(), lp  # (x_y - max) / tau: finite or -inf, never NaN
    lp, h = token_stats(logits, other, temperature=1e30, _block_v=SMALL_BLOCK)
    log10, log40 = torch.tensor(10.0).log(), torch.tensor(40.0).log()
    torch.testing.assert_close(h, torch.stack([log40, log40, log10]))
    torch.testing.assert_close(lp, -torch.stack([log40, log40, log10]))
    logits.requires_grad_()
    lp, h = token_stats(logits, other, temperature=1e-30, _block_v=SMALL_BLOCK)
    (lp.sum() + h.sum()).backward()
    assert not logits.grad.isnan().any()


# ----------------------------------------------------------------------------------- backward


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gradients_match_float64_autograd(backend, dtype, gen):
    logits, tokens = random_case(gen, (2, 4), 37, dtype)
    logits[0, 1, 30:] = float("-inf")
    tokens[0, 1] = 3
    logits[1, 2, 5] += 20.0
    logits.requires_grad_()
    g_lp, g_h = torch.randn(2, 2, 4, generator=gen)
    lp, h = token_stats(logits, tokens, temperature=0.8, _block_v=SMALL_BLOCK)
    torch.autograd.backward((lp, h), (g_lp, g_h))
    assert logits.grad.dtype == dtype and logits.grad.shape == logits.shape
    want = token_stats_grad_ref(logits, tokens, g_lp, g_h, temperature=0.8).to(dtype)
    torch.testing.assert_close(logits.grad, want, **GRAD_TOL[dtype])
    assert (logits.grad[0, 1, 30:] == 0).all()


def test_gradient_of_one_output_and_of_a_view(backend, gen):
    base, tokens = random_case(gen, (2, 5), 23, torch.float32)
    base.requires_grad_()
    tokens = tokens[:, 1:]
    zeros = torch.zeros(2, 4)
    for pick in ("logprob", "entropy"):
        base.grad = None
        out = token_stats(base[:, :-1], tokens, _block_v=SMALL_BLOCK, _num_splits=2)
        getattr(out, pick).sum().backward()  # the upstream gradient is an expanded tensor
        ones = torch.ones(2, 4)
        g_lp, g_h = (ones, zeros) if pick == "logprob" else (zeros, ones)
        want = torch.zeros(2, 5, 23, dtype=torch.float64)
        want[:, :-1] = token_stats_grad_ref(base[:, :-1], tokens, g_lp, g_h)
        torch.testing.assert_close(base.grad.double(), want, **GRAD_TOL[torch.float32])


def test_torch_compile_fullgraph(backend, gen):
    def loss(logits, tokens):
        lp, h = token_stats(logits, tokens, temperature=0.9, _block_v=SMALL_BLOCK)
        return (lp * 2.0 - h).sum()

    logits, tokens = random_case(gen, (3, 4), 21, torch.float32)
    logits.requires_grad_()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    compiled(logits, tokens).backward()
    got = logits.grad.clone()
    logits.grad = None
    loss(logits, tokens).backward()
    torch.testing.assert_close(got, logits.grad, atol=1e-6, rtol=1e-6)
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------- bad input


def test_bad_inputs(backend):
    x = torch.randn(3, 10)
    y = torch.randint(0, 10, (3,))
    type_errors = {
        "logits": [(x.long(), y), (x.to(torch.complex64), y), (x.double(), y), (x.numpy(), y)],
        "tokens": [(x, y.float()), (x, [1, 2, 3])],
    }
    for name, cases in type_errors.items():
        for logits, tokens in cases:
            with pytest.raises(TypeError, match=name):
                token_stats(logits, tokens)
    value_errors = {
        "tokens": [
            (x, y[:2]),
            (x, y[:, None]),
            (x, torch.tensor([0, 10, 1])),
            (x, torch.tensor([0, -5, 1])),
            (x, y.to("meta")),
        ],
        "logits": [(torch.randn(3, 0), y), (torch.tensor(1.0), torch.tensor(0))],
    }
    for name, cases in value_errors.items():
        for logits, tokens in cases:
            with pytest.raises(ValueError, match=name):
                token_stats(logits, tokens)
    for temperature in (0.0, -1.0, float("nan"), float("inf"), 1e-31, 1e31):
        with pytest.raises(ValueError, match="temperature"):
            token_stats(x, y, temperature=temperature)
    with pytest.raises(TypeError, match="temperature"):
        token_stats(x, y, temperature="1")
    with pytest.raises(TypeError, match="ignore_index"):
        token_stats(x, y, ignore_index=1.5)
    with pytest.raises(ValueError, match="tokens"):  # checked by the forward-only entry too
        token_stats_forward(x, torch.tensor([0, 11, 1]))


# ----------------------------------------------------------------------- GPU compile (no GPU)

MODULE = "appo_kernels.token_stats"
DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
CPU = torch.device("cpu")
ROW_ARGS = {"V": "i32", "T1": "i32", "stride_outer": "i64", "stride_inner": "i64"}
ALIGNED = ("x_ptr", "V", "stride_outer", "stride_inner")


def _cases(dtype, arch):
    """Every kernel, specialised like the JIT does for contiguous aligned rows."""
    # The default launch configurations (see _launch_config): two 16-byte loads per thread.
    forward = _launch_config(16384, 151936, getattr(torch, DTYPE_NAMES[dtype]), CPU)
    backward = _launch_config(
        16384, 151936, getattr(torch, DTYPE_NAMES[dtype]), CPU, shape=BACKWARD
    )
    stats = {
        f"{n}_ptr": "*fp32"
        for n in ("logprob", "entropy", "row_max", "log_sum", "part_m", "part_s", "part_a")
    }
    fwd = {
        "x_ptr": f"*{dtype}",
        "tokens_ptr": "*i64",
        **stats,
        **ROW_ARGS,
        "cols_per_split": "i32",
        "inv_temp": "fp32",
        "ignore_index": "i32",
        "softcap": "fp32",
    }
    merge = dict(fwd)
    del merge["cols_per_split"]
    merge = {**merge, "num_splits": "i32", "inv_temp": "fp32", "ignore_index": "i32",
             "softcap": "fp32"}  # fmt: skip
    bwd = {
        "x_ptr": f"*{dtype}",
        "tokens_ptr": "*i64",
        "row_max_ptr": "*fp32",
        "log_sum_ptr": "*fp32",
        "entropy_ptr": "*fp32",
        "grad_logprob_ptr": "*fp32",
        "grad_entropy_ptr": "*fp32",
        "dx_ptr": f"*{dtype}",
        **ROW_ARGS,
        "cols_per_split": "i32",
        "inv_temp": "fp32",
        "ignore_index": "i32",
        "softcap": "fp32",
    }
    split_aligned = (*ALIGNED, "cols_per_split")
    cases = []
    for softcap in (False, True):  # plain logits, and soft-capped (linear_token_stats)
        bwd_constexprs = {"HAS_GRAD_LOGPROB": True, "HAS_GRAD_ENTROPY": True,
                          "BLOCK_V": backward.block_v, "SOFTCAP": softcap}  # fmt: skip
        cases += [
            KernelCase(
                MODULE,
                "_token_stats_fwd_kernel",
                fwd,
                {"BLOCK_V": forward.block_v, "SPLIT": split, "SOFTCAP": softcap},
                split_aligned,
                num_warps=forward.num_warps,
                arch=arch,
            )
            for split in (False, True)
        ]
        cases += [
            KernelCase(
                MODULE,
                "_token_stats_merge_kernel",
                merge,
                {"SPLITS_POW2": 128, "SOFTCAP": softcap},
                ALIGNED,
                num_warps=1,
                arch=arch,
            ),
            KernelCase(
                MODULE,
                "_token_stats_bwd_kernel",
                bwd,
                bwd_constexprs,
                (*split_aligned, "dx_ptr"),
                num_warps=backward.num_warps,
                arch=arch,
            ),
        ]
    return cases


def test_kernels_compile_for_gpus_without_spills():
    cases = [c for dtype in ("fp32", "fp16", "bf16") for arch in ARCHS for c in _cases(dtype, arch)]
    results = compile_kernels(cases)
    for case, result in zip(cases, results):
        what = f"{case.kernel} {case.signature['x_ptr']} sm_{case.arch} {case.constexprs}"
        assert result.local == 0, f"{what} spills {result.local} bytes"
        if case.kernel != "_token_stats_merge_kernel":
            # streaming over contiguous aligned rows: 16-byte vector loads of the logits
            assert "ld.global.v4.b32" in result.loads, f"{what}: {result.loads}"
