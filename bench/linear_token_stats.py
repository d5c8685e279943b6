"""Benchmark: token statistics from hidden states and the LM head, forward + backward.

Compares, on one device and in one run, the time of forward + backward of
``sum(logprob) + 0.1 * sum(entropy)`` and the peak memory each adds beyond its inputs and the
gradients it returns:

- ``appo_kernels.linear_token_stats`` (row chunks, logits never materialised),
- model-style full logits ``h @ W.T`` then ``appo_kernels.token_stats`` (the unfused path),
- full logits then eager ``log_softmax`` + ``gather`` + entropy,
- where installed: verl's ``FusedLinearForPPO`` (its torch backend, and its Liger backend when
  Liger is installed), TRL's ``ChunkedLogProbFunction`` (log-prob + entropy), Liger's fused
  linear cross-entropy (log-prob only: ``sum(logprob)``), and Liger's fused linear scaled
  cross-entropy with entropy (``LigerFusedLinearScaledCrossEntropyFunction``; on sm_90 it is a
  CuTe DSL kernel that needs ``nvidia-cutlass-dsl``, and the row is left out, with the reason
  printed, where that does not run).

The table gives each one's time and peak extra memory against the unfused path (full logits +
``token_stats``) on the same shape; the target for ``linear_token_stats`` is at most 1.35x its
time with at most 1/8 of its extra memory.

verl and TRL are loaded from their installed files without importing the packages' top level
(which pulls Ray / datasets), so only the module holding the function needs to import.

    python bench/linear_token_stats.py                              # CPU: SmolLM2 shape, N 4096
    python bench/linear_token_stats.py --device cuda --out bench/results/linear_h200.md
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import os
import sys
import types
from collections.abc import Callable

import torch
from common import (
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

SHAPES = {  # (H, V) of the LM head
    "smollm2": (576, 49152),
    "qwen2.5-7b": (3584, 152064),
    "llama3-8b": (4096, 128256),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ENTROPY_WEIGHT = 0.1
UNFUSED = "full logits + appo_kernels.token_stats"  # the baseline of the ratios


def load_trl_chunked_logprob():
    """TRL's chunked log-prob module. Its backward imports ``trl.trainer.utils`` (for a DeepSpeed
    ZeRO-3 gather of the LM head); where that import fails (no ``datasets`` on the GPU image), the
    kernel file is loaded on its own with that gather as a no-op, which is what it does in a
    single process anyway."""
    try:
        import trl.trainer.utils  # noqa: F401
        from trl.kernels import chunked_logprob

        return chunked_logprob
    except ImportError:
        pass
    spec = importlib.util.find_spec("trl")
    if spec is None:
        return None
    package = types.ModuleType("_bench_trl")
    package.__path__ = []
    trainer_utils = types.ModuleType("_bench_trl.trainer.utils")
    trainer_utils.maybe_gather_lm_head_ctx = lambda *args, **kwargs: contextlib.nullcontext()
    sys.modules.update({"_bench_trl": package, "_bench_trl.trainer": types.ModuleType("t"),
                        "_bench_trl.trainer.utils": trainer_utils})  # fmt: skip
    sys.modules["_bench_trl.trainer"].utils = trainer_utils
    path = os.path.join(spec.submodule_search_locations[0], "kernels", "chunked_logprob.py")
    module_spec = importlib.util.spec_from_file_location("_bench_trl.kernels.chunked_logprob", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def unfused(stats_fn: Callable) -> Callable:
    def run(h, w, y):
        return stats_fn(h @ w.t(), y)

    return run


def eager_stats(logits: torch.Tensor, tokens: torch.Tensor):
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)


def implementations(device: torch.device) -> dict[str, tuple[Callable, bool]]:
    """name -> (fn(hidden, weight, tokens) -> (logprob, entropy or None), has entropy)."""
    impls = {
        "appo_kernels.linear_token_stats": (ak.linear_token_stats, True),
        UNFUSED: (unfused(ak.token_stats), True),
        "full logits + eager": (unfused(eager_stats), True),
    }
    verl = load_file_module("verl", "utils/experimental/torch_functional.py")
    if verl is not None:
        impls["verl FusedLinearForPPO (torch)"] = (verl.FusedLinearForPPO(), True)
        if getattr(verl, "_LIGER_FUSED_LINEAR_SCALED_CROSS_ENTROPY", None) is not None:
            impls["verl FusedLinearForPPO (liger)"] = (
                verl.FusedLinearForPPO(impl_backend="liger"),
                True,
            )
    trl = load_trl_chunked_logprob()
    if trl is not None:
        # TRL's GRPO trainer calls it with a 32768-column vocabulary chunk.
        def trl_chunked(h, w, y):
            lp, entropy, *_ = trl.ChunkedLogProbFunction.apply(
                h, w, None, y, 1.0, 32768, None, 1.0, ("entropy",)
            )
            return lp, entropy

        impls["TRL ChunkedLogProbFunction"] = (trl_chunked, True)
    if device.type == "cuda" and importlib.util.find_spec("liger_kernel") is not None:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        def liger(h, w, y):  # a summed loss: no per-token log-probs to compare
            return -liger_fused_linear_cross_entropy(h, w, y, reduction="sum"), None

        impls["Liger fused linear CE (logprob only)"] = (liger, False)
        scaled = liger_scaled_cross_entropy(device)
        if scaled is not None:
            impls["Liger fused linear scaled CE (logprob + entropy)"] = (scaled, True)
    return impls


def liger_scaled_cross_entropy(device: torch.device) -> Callable | None:
    """Liger's per-token NLL + entropy from hidden states, if it runs here (tried once on a tiny
    input: on sm_90 it needs the CuTe DSL)."""
    from liger_kernel.ops import LigerFusedLinearScaledCrossEntropyFunction as Scaled

    def scaled(h, w, y):
        nll, entropy = Scaled.apply(h, w, y, 1.0, -100, 1, True)
        return -nll, entropy

    h = torch.randn(64, 128, device=device, dtype=torch.bfloat16)
    w = torch.randn(512, 128, device=device, dtype=torch.bfloat16)
    try:
        scaled(h, w, torch.randint(0, 512, (64,), device=device))
    except Exception as exc:  # ImportError without cutlass, or an unsupported shape
        print(f"  (Liger fused linear scaled CE left out: {type(exc).__name__}: {exc})")
        return None
    return scaled


def make_call(fn: Callable, hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor):
    """Forward + backward of ``sum(logprob) + 0.1 * sum(entropy)``; returns the log-probs."""
    h = hidden.detach().requires_grad_()
    w = weight.detach().requires_grad_()

    def clear():
        h.grad = w.grad = None

    def call():
        clear()
        logprob, entropy = fn(h, w, tokens)
        loss = logprob.sum()
        if entropy is not None:
            loss = loss + ENTROPY_WEIGHT * entropy.sum()
        loss.backward()
        return logprob.detach()

    call.clear = clear  # the gradients of the last call are freed before a memory reading
    return call


def make_inputs(hidden_size, vocab, rows, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, hidden_size, generator=gen).to(device=device, dtype=dtype)
    weight = (torch.randn(vocab, hidden_size, generator=gen) / hidden_size**0.5 * 2).to(
        device=device, dtype=dtype
    )
    tokens = torch.randint(0, vocab, (rows,), generator=gen).to(device)
    return hidden, weight, tokens


def child_memory(args: argparse.Namespace) -> None:
    """Subprocess side of the CPU memory reading: prints the bytes one call adds beyond its
    inputs and the gradients it returns."""
    hidden_size, vocab = SHAPES[args.shapes[0]]
    rows = args.rows[0]
    hidden, weight, tokens = make_inputs(hidden_size, vocab, rows, DTYPES[args.dtype], "cpu")
    fn, _ = implementations(torch.device("cpu"))[args.child_memory]
    make_call(fn, hidden[:64], weight, tokens[:64])()  # first-call costs before the baseline
    call = make_call(fn, hidden, weight, tokens)
    gc.collect()
    base = reset_high_water_kib()
    call()
    grads = (hidden.numel() + weight.numel()) * hidden.element_size()
    print((high_water_kib() - base) * 1024 - grads)


def run(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    print(json.dumps(versions(device)))
    impls = implementations(device)
    if args.impls:
        impls = {k: v for k, v in impls.items() if any(s in k for s in args.impls)}
    results = []
    for shape in args.shapes:
        hidden_size, vocab = SHAPES[shape]
        for rows in args.rows:
            hidden, weight, tokens = make_inputs(hidden_size, vocab, rows, dtype, device)
            logits_bytes = rows * vocab * dtype.itemsize
            grads_bytes = (hidden.numel() + weight.numel()) * dtype.itemsize
            reference = None
            for name, (fn, has_entropy) in impls.items():
                call = make_call(fn, hidden, weight, tokens)
                try:
                    seconds = median_time(call, device, args.repeats, args.warmup)
                    logprob = call().float()
                    call.clear()
                    if device.type == "cuda":
                        extra = peak_extra_cuda(call, device) - grads_bytes
                    elif args.memory:
                        argv = ["--child-memory", name, "--shapes", shape, "--rows", str(rows),
                                "--dtype", args.dtype]  # fmt: skip
                        extra = int(run_child(os.path.abspath(__file__), argv))
                    else:
                        extra = None
                except Exception as exc:  # a baseline that fails (e.g. OOM) is reported
                    print(f"  {name:<40} {shape} N={rows}: {type(exc).__name__}: {exc}")
                    gc.collect()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    continue
                if reference is None:
                    reference = logprob
                same_shape = logprob.shape == reference.shape
                row = {
                    "impl": name,
                    "shape": shape,
                    "H": hidden_size,
                    "V": vocab,
                    "N": rows,
                    "dtype": args.dtype,
                    "entropy": has_entropy,
                    "ms": seconds * 1e3,
                    "peak_extra_mb": None if extra is None else extra / 2**20,
                    "logits_mb": logits_bytes / 2**20,
                    "max_abs_diff_logprob": (
                        (logprob - reference).abs().max().item() if same_shape else None
                    ),
                }
                results.append(row)
                mem = "-" if extra is None else f"{extra / 2**20:.0f}"
                print(f"  {name:<40} {shape:<11} N={rows:<6} {row['ms']:9.2f} ms  extra {mem} MB")
            del hidden, weight, tokens
            gc.collect()
    return results


def markdown(results: list[dict], info: dict[str, str], command: str) -> str:
    lines = [
        "# linear_token_stats benchmark (forward + backward)",
        "",
        "Measured by `bench/linear_token_stats.py` in one run: "
        + ", ".join(f"{k} {v}" for k, v in info.items())
        + f". Command: `{command}`.",
        "",
        "Loss `sum(logprob) + 0.1 * sum(entropy)` (log-prob only where marked), backward to the "
        "hidden states and the LM head. *peak extra* is the memory one forward + backward adds "
        "beyond its inputs and the gradients it returns; *vs unfused* compares with full logits "
        "+ `token_stats` on the same shape (targets for `linear_token_stats`: time <= 1.35x, "
        "extra memory <= 0.125x).",
        "",
        "| impl | shape (H, V) | N | dtype | time (ms) | x time vs unfused | peak extra MB "
        "| x extra vs unfused | extra / full logits | max abs diff logprob |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    unfused = {(r["shape"], r["N"]): r for r in results if r["impl"] == UNFUSED}
    for r in results:
        base = unfused.get((r["shape"], r["N"]))
        ratio = "-" if base is None else f"{r['ms'] / base['ms']:.2f}"
        if r["peak_extra_mb"] is None:
            mem = frac = vs = "-"
        else:
            mem, frac = f"{r['peak_extra_mb']:.0f}", f"{r['peak_extra_mb'] / r['logits_mb']:.3f}"
            base_mb = None if base is None else base["peak_extra_mb"]
            vs = "-" if not base_mb else f"{r['peak_extra_mb'] / base_mb:.3f}"
        diff = r["max_abs_diff_logprob"]
        diff = "-" if diff is None else f"{diff:.2e}"
        lines.append(
            f"| {r['impl']} | {r['shape']} ({r['H']}, {r['V']}) | {r['N']} | {r['dtype']} "
            f"| {r['ms']:.1f} | {ratio} | {mem} | {vs} | {frac} | {diff} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    p.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=None)
    p.add_argument("--rows", type=int, nargs="+", default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--impls", nargs="*", help="substrings selecting implementations")
    p.add_argument("--memory", action="store_true", help="on CPU, measure peak memory")
    p.add_argument("--out", help="write the markdown table here")
    p.add_argument("--child-memory", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    on_gpu = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bf16" if on_gpu else "fp32")
    args.shapes = args.shapes or (list(SHAPES) if on_gpu else ["smollm2"])
    args.rows = args.rows or ([4096, 16384] if on_gpu else [4096])
    args.repeats = args.repeats or (10 if on_gpu else 3)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child_memory:
        child_memory(args)
        return
    results = run(args)
    command = " ".join(["python bench/linear_token_stats.py", *(argv or sys.argv[1:])])
    table = markdown(results, versions(torch.device(args.device)), command.strip())
    emit_table(table, args.out)


if __name__ == "__main__":
    main()
