"""Benchmark: token log-prob + full-vocabulary entropy, and the branching score.

Compares, on one device and in one run (so the numbers are ratios measured side by side):

- ``appo_kernels.token_stats`` forward (Triton on CUDA, the chunked PyTorch path on CPU), its
  backward alone (one read of the logits, one write of the gradient) and forward + backward,
- ``appo_kernels.branching_score`` (token statistics + score kernel),
- eager PyTorch: ``log_softmax`` + ``gather`` + ``-(p * logp).sum`` (materialises [N, V] in fp32),
  forward and forward + backward,
- ``torch.compile`` of the same eager function, forward and forward + backward,
- the eager function applied to row chunks (bounded memory, the usual hand-written workaround),
- TRL's Triton log-prob + entropy kernel (``trl/kernels/logprob_entropy.py``,
  ``selective_log_softmax_and_entropy``), forward and forward + backward (CUDA, where TRL is
  installed; the file is loaded on its own, so TRL's other dependencies need not be there),
- Liger-Kernel's cross-entropy forward for the log-prob alone (CUDA, where it is installed).

For each it prints the median time, the bytes moved per second (the logits read once by a
forward, read and written by a backward, read twice and written once by forward + backward), that
rate as a percentage of the device copy bandwidth measured in the same run (a copy moves 2 bytes per
byte copied, so the bandwidth is ``2 * size / time``), and the peak extra memory on top of the
inputs.

    python bench/token_stats.py                       # CPU defaults, small shapes
    python bench/token_stats.py --device cuda --out bench/results/h100.md
"""

from __future__ import annotations

import argparse
import gc
import json
import os
from collections.abc import Callable

import torch
from common import (
    copy_bandwidth,
    emit_table,
    high_water_kib,
    load_file_module,
    median_time,
    peak_extra_cuda,
    reset_high_water_kib,
    run_child,
    versions,
)

import appo_kernels as ak

GPU_ROWS = (1024, 4096, 16384)
CPU_ROWS = (512, 2048)
VOCABS = (32000, 128256, 151936, 256000)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def eager_token_stats(logits: torch.Tensor, tokens: torch.Tensor):
    logp = torch.log_softmax(logits.float(), dim=-1)
    logprob = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return logprob, entropy


def chunked_eager_token_stats(logits: torch.Tensor, tokens: torch.Tensor, chunk_rows: int = 256):
    outs = [
        eager_token_stats(logits[i : i + chunk_rows], tokens[i : i + chunk_rows])
        for i in range(0, logits.shape[0], chunk_rows)
    ]
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


def liger_logprob(logits: torch.Tensor, tokens: torch.Tensor):
    from liger_kernel.transformers.functional import liger_cross_entropy

    return -liger_cross_entropy(logits, tokens, reduction="none")


def trl_logprob_entropy() -> Callable | None:
    """TRL's Triton ``selective_log_softmax_and_entropy(logits, index)``, or None without TRL."""
    module = load_file_module("trl", "kernels/logprob_entropy.py")
    return None if module is None else module.selective_log_softmax_and_entropy


def has_liger() -> bool:
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        return False
    return True


def forward_only(fn: Callable) -> Callable:
    """``make(x, y)`` returning a call of ``fn(x, y)``."""
    return lambda x, y: lambda: fn(x, y)


def forward_backward(fn: Callable) -> Callable:
    """``make(x, y)`` returning forward + backward of ``sum(logprob) + sum(entropy)``."""

    def make(x, y):
        leaf = x.detach().requires_grad_()

        def call():
            leaf.grad = None
            logprob, entropy = fn(leaf, y)
            (logprob.sum() + entropy.sum()).backward()
            return logprob

        return call

    return make


def backward_only(x: torch.Tensor, y: torch.Tensor) -> Callable:
    """The token_stats backward kernel alone, from saved forward statistics."""
    lp, entropy, row_max, log_sum = torch.ops.appo_kernels.token_stats_fwd(x, y, 1.0, -100, 0, 0)
    g = torch.ones_like(lp)
    op = torch.ops.appo_kernels.token_stats_bwd
    return lambda: (op(x, y, row_max, log_sum, entropy, g, g, 1.0, -100, 0, 0), lp)[1]


def branching_score_call(x: torch.Tensor, y: torch.Tensor):
    """The score for the same rows viewed as 8 rollouts of N/8 tokens (mask all ones)."""
    rows, vocab = x.shape
    b = 8 if rows % 8 == 0 else 1
    x3, y3 = x.view(b, rows // b, vocab), y.view(b, rows // b)
    behavior = torch.zeros(y3.shape, device=x.device)
    mask = torch.ones(y3.shape, dtype=torch.bool, device=x.device)
    return ak.branching_score(x3, y3, behavior, mask)


# name -> (make(x, y) -> call, logits passes: bytes moved = passes * logits bytes)
def implementations(device: torch.device) -> dict[str, tuple[Callable, int]]:
    compiled = torch.compile(eager_token_stats)
    impls = {
        "appo_kernels.token_stats": (forward_only(ak.token_stats), 1),
        "appo_kernels.branching_score": (forward_only(branching_score_call), 1),
        "eager": (forward_only(eager_token_stats), 1),
        "eager, row-chunked": (forward_only(chunked_eager_token_stats), 1),
        "torch.compile(eager)": (forward_only(compiled), 1),
        "appo_kernels.token_stats backward": (backward_only, 2),
        "appo_kernels.token_stats fwd+bwd": (forward_backward(ak.token_stats), 3),
        "eager fwd+bwd": (forward_backward(eager_token_stats), 3),
        "torch.compile(eager) fwd+bwd": (forward_backward(compiled), 3),
    }
    trl = trl_logprob_entropy() if device.type == "cuda" else None
    if trl is not None:
        impls["TRL Triton logprob+entropy"] = (forward_only(trl), 1)
        impls["TRL Triton logprob+entropy fwd+bwd"] = (forward_backward(trl), 3)
    if device.type == "cuda" and has_liger():
        impls["liger cross_entropy (logprob only)"] = (forward_only(liger_logprob), 1)
    return impls


def cpu_peak_extra_bytes(impl: str, rows: int, vocab: int, dtype: str) -> int:
    """Peak resident memory added by one call, measured in a fresh subprocess."""
    argv = ["--child-memory", impl, "--rows", str(rows), "--vocabs", str(vocab), "--dtype", dtype]
    return int(run_child(os.path.abspath(__file__), argv))


def child_memory(args: argparse.Namespace) -> None:
    """The subprocess side of ``cpu_peak_extra_bytes``: prints the bytes one call adds."""
    torch.manual_seed(0)
    rows, vocab = args.rows[0], args.vocabs[0]
    x = torch.randn(rows, vocab).to(DTYPES[args.dtype])
    y = torch.randint(0, vocab, (rows,))
    make, _ = implementations(torch.device("cpu"))[args.child_memory]
    make(x[:8], y[:8])()  # import / first-call costs before the baseline
    call = make(x, y)
    base = reset_high_water_kib()
    call()
    print((high_water_kib() - base) * 1024)


def run(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    copy_bytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    bandwidth = copy_bandwidth(device, copy_bytes, args.repeats)
    print(f"device copy bandwidth: {bandwidth / 1e9:.1f} GB/s  ({json.dumps(versions(device))})")
    impls = implementations(device)
    if args.impls:
        impls = {k: v for k, v in impls.items() if any(s in k for s in args.impls)}
    results = []
    gen = torch.Generator(device="cpu").manual_seed(0)
    for vocab in args.vocabs:
        for rows in args.rows:
            x = torch.randn(rows, vocab, generator=gen).to(device=device, dtype=dtype)
            y = torch.randint(0, vocab, (rows,), generator=gen).to(device)
            logits_bytes = x.numel() * x.element_size()
            reference = None
            for name, (make, passes) in impls.items():
                try:
                    call = make(x, y)
                    seconds = median_time(call, device, args.repeats, args.warmup)
                    out = call()
                except Exception as exc:  # a baseline that fails (e.g. OOM) is reported, not fatal
                    print(
                        f"  {name:<36} V={vocab:<7} N={rows:<6} failed: {type(exc).__name__}: {exc}"
                    )
                    gc.collect()
                    continue
                logprob = (
                    out.logprob
                    if hasattr(out, "logprob")
                    else out[0]
                    if isinstance(out, tuple)
                    else out
                )
                if reference is None:
                    reference = logprob.float()
                max_err = (logprob.float().reshape(-1) - reference.reshape(-1)).abs().max().item()
                if device.type == "cuda":
                    extra = peak_extra_cuda(call, device)
                elif args.memory:
                    extra = cpu_peak_extra_bytes(name, rows, vocab, args.dtype)
                else:
                    extra = None
                row = {
                    "impl": name,
                    "vocab": vocab,
                    "rows": rows,
                    "dtype": args.dtype,
                    "ms": seconds * 1e3,
                    "gbps": passes * logits_bytes / seconds / 1e9,
                    "pct_copy_bw": 100 * passes * logits_bytes / seconds / bandwidth,
                    "peak_extra_mb": None if extra is None else extra / 2**20,
                    "logits_mb": logits_bytes / 2**20,
                    "max_abs_diff_logprob": max_err,
                }
                results.append(row)
                print(format_row(row))
            del x, y
            gc.collect()
    return results, bandwidth


def format_row(r: dict) -> str:
    mem = "-" if r["peak_extra_mb"] is None else f"{r['peak_extra_mb']:.1f}"
    return (
        f"  {r['impl']:<36} V={r['vocab']:<7} N={r['rows']:<6} {r['ms']:9.2f} ms "
        f"{r['gbps']:8.1f} GB/s {r['pct_copy_bw']:6.1f}% copy-bw  extra {mem} MB"
    )


def markdown(results: list[dict], bandwidth: float, info: dict[str, str]) -> str:
    lines = [
        "# token_stats benchmark",
        "",
        "Measured by `bench/token_stats.py` in one run: "
        + ", ".join(f"{k} {v}" for k, v in info.items())
        + f"; device copy bandwidth {bandwidth / 1e9:.1f} GB/s (2 x bytes / time of a copy).",
        "",
        "| impl | V | N | dtype | time (ms) | GB/s (logits moved) | % of copy bw | x vs eager "
        "(same passes) "
        "| peak extra MB | logits MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    eager = {
        (r["impl"], r["vocab"], r["rows"]): r["ms"] for r in results if "eager" == r["impl"][:5]
    }
    for r in results:
        baseline = "eager fwd+bwd" if r["impl"].endswith("fwd+bwd") else "eager"
        speedup = (
            None if r["impl"].endswith("backward") else eager.get((baseline, r["vocab"], r["rows"]))
        )
        speedup = "-" if speedup is None else f"{speedup / r['ms']:.2f}"
        mem = "-" if r["peak_extra_mb"] is None else f"{r['peak_extra_mb']:.1f}"
        lines.append(
            f"| {r['impl']} | {r['vocab']} | {r['rows']} | {r['dtype']} | {r['ms']:.2f} "
            f"| {r['gbps']:.1f} | {r['pct_copy_bw']:.1f} | {speedup} | {mem} "
            f"| {r['logits_mb']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16" if cuda else "fp32")
    p.add_argument("--vocabs", type=int, nargs="+", default=None)
    p.add_argument("--rows", type=int, nargs="+", default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--impls", nargs="*", help="substrings selecting implementations")
    p.add_argument(
        "--memory",
        action="store_true",
        help="on CPU, measure peak extra memory per call in a subprocess",
    )
    p.add_argument("--out", help="write the markdown table here")
    p.add_argument("--child-memory", help=argparse.SUPPRESS)  # the memory subprocess
    args = p.parse_args(argv)
    on_gpu = args.device.startswith("cuda")
    args.vocabs = args.vocabs or (list(VOCABS) if on_gpu else [32000, 151936])
    args.rows = args.rows or (list(GPU_ROWS) if on_gpu else list(CPU_ROWS))
    args.repeats = args.repeats or (20 if on_gpu else 5)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child_memory:
        child_memory(args)
        return
    results, bandwidth = run(args)
    table = markdown(results, bandwidth, versions(torch.device(args.device)))
    emit_table(table, args.out)


if __name__ == "__main__":
    main()
