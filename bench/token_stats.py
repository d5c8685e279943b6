"""Benchmark: token log-prob + full-vocabulary entropy, and the branching score.

Compares, on one device and in one run (so the numbers are ratios measured side by side):

- ``appo_kernels.token_stats`` (Triton on CUDA, the chunked PyTorch path on CPU),
- ``appo_kernels.branching_score`` (token statistics + score kernel),
- eager PyTorch: ``log_softmax`` + ``gather`` + ``-(p * logp).sum`` (materialises [N, V] in fp32),
- ``torch.compile`` of the same eager function,
- the eager function applied to row chunks (bounded memory, the usual hand-written workaround),
- Liger-Kernel's fused cross-entropy for the log-prob alone (only where it is installed; CUDA).

For each it prints the median time, the logits read rate in GB/s, that rate as a percentage of
the device copy bandwidth measured in the same run (a copy moves 2 bytes per byte copied, so the
bandwidth is ``2 * size / time``), and the peak extra memory on top of the inputs.

    python bench/token_stats.py                       # CPU defaults, small shapes
    python bench/token_stats.py --device cuda --out bench/results/h100.md
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

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


def has_liger() -> bool:
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        return False
    return True


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> float:
    """Median wall time of ``fn`` in seconds (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int) -> float:
    """Device copy bandwidth in bytes/s: ``2 * nbytes / t`` for a ``nbytes`` copy."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = median_time(functools.partial(dst.copy_, src), device, repeats, warmup=2)
    return 2 * nbytes / t


def cpu_peak_extra_bytes(impl: str, rows: int, vocab: int, dtype: str) -> int:
    """Peak resident memory added by one call, measured in a fresh subprocess from the high-water
    mark ``VmHWM`` of /proc/self/status (``ru_maxrss`` would inherit the parent's peak across
    fork + exec)."""
    code = f"""
import sys, torch
sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
import token_stats as b
torch.manual_seed(0)
x = torch.randn({rows}, {vocab}).to(b.DTYPES[{dtype!r}])
y = torch.randint(0, {vocab}, ({rows},))
fn = b.implementations(torch.device("cpu"))[{impl!r}]
fn(x[:8], y[:8])  # import / first-call costs before the baseline
def high_water_kib():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:"))
base = high_water_kib()
fn(x, y)
print((high_water_kib() - base) * 1024)
"""
    # A fixed mmap threshold makes glibc return every large freed buffer to the OS at once, so the
    # high-water mark measures live memory, not what the allocator kept cached.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    return int(out.stdout.strip().splitlines()[-1])


def implementations(device: torch.device) -> dict[str, Callable]:
    impls: dict[str, Callable] = {
        "appo_kernels.token_stats": lambda x, y: ak.token_stats(x, y),
        "appo_kernels.branching_score": branching_score_call,
        "eager": eager_token_stats,
        "eager, row-chunked": chunked_eager_token_stats,
        "torch.compile(eager)": torch.compile(eager_token_stats, dynamic=False),
    }
    if device.type == "cuda" and has_liger():
        impls["liger cross_entropy (logprob only)"] = liger_logprob
    return impls


def branching_score_call(x: torch.Tensor, y: torch.Tensor):
    """The score for the same rows viewed as 8 rollouts of N/8 tokens (mask all ones)."""
    rows, vocab = x.shape
    b = 8 if rows % 8 == 0 else 1
    x3, y3 = x.view(b, rows // b, vocab), y.view(b, rows // b)
    behavior = torch.zeros(y3.shape, device=x.device)
    mask = torch.ones(y3.shape, dtype=torch.bool, device=x.device)
    return ak.branching_score(x3, y3, behavior, mask)


def versions(device: torch.device) -> dict[str, str]:
    info = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "not installed"
    if device.type == "cuda":
        info["device"] = torch.cuda.get_device_name(device)
        info["cuda"] = str(torch.version.cuda)
    else:
        info["device"] = cpu_name()
        info["threads"] = str(torch.get_num_threads())
    return info


def cpu_name() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def peak_extra_cuda(fn: Callable[[], object], device: torch.device) -> int:
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


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
            for name, fn in impls.items():
                call = functools.partial(fn, x, y)
                try:
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
                    "gbps": logits_bytes / seconds / 1e9,
                    "pct_copy_bw": 100 * logits_bytes / seconds / bandwidth,
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
        "| impl | V | N | dtype | time (ms) | GB/s (logits read) | % of copy bw | x vs eager "
        "| peak extra MB | logits MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    eager = {(r["vocab"], r["rows"]): r["ms"] for r in results if r["impl"] == "eager"}
    for r in results:
        speedup = eager.get((r["vocab"], r["rows"]))
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
    args = p.parse_args(argv)
    on_gpu = args.device.startswith("cuda")
    args.vocabs = args.vocabs or (list(VOCABS) if on_gpu else [32000, 151936])
    args.rows = args.rows or (list(GPU_ROWS) if on_gpu else list(CPU_ROWS))
    args.repeats = args.repeats or (20 if on_gpu else 5)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    results, bandwidth = run(args)
    table = markdown(results, bandwidth, versions(torch.device(args.device)))
    print()
    print(table)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(table)


if __name__ == "__main__":
    main()
