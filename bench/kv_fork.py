"""Benchmark: forking a cached prefix into n branches.

Forks a P-token prefix into ``--branches`` sequences (default shape: Qwen2.5-7B's KV cache, 28
layers x 4 KV heads x head_dim 128) three ways, side by side in one run on one device:

- ``PagedKVCache.fork``: full blocks are shared by reference; only a partial tail block (``at %
  block_size`` slots) is copied per branch, all layers in one launch;
- transformers' ``DynamicCache.batch_repeat_interleave(n)`` on a DynamicCache of the same size
  (what ``generate`` does for ``num_return_sequences``): copies the whole prefix n times;
- re-prefilling the prefix for every branch with a small random Llama (``--prefill-*``; its size is
  printed): the cost of not caching at all, a lower bound for a real 7B model.

Each prefix is forked at ``P`` (block-aligned for P % block_size == 0: nothing to copy) and at
``P - 1`` (a ``block_size - 1``-slot tail: the most our fork ever copies).

Reported per row: median time over ``--repeats``, bytes copied, extra memory, and the ratios. Extra
memory is ``torch.cuda.max_memory_allocated`` above the starting point on CUDA; on CPU (where torch
has no allocator statistics) it is the bytes of the new state: pool blocks taken for ours, the new
K/V tensors for the others.

    python bench/kv_fork.py --device cpu --prefix-lens 512 2048
    python bench/kv_fork.py --device cuda --out bench/results/h100.md
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from common import cpu_name

from appo_kernels.kv import PagedKVCache

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--prefix-lens", type=int, nargs="+", default=[512, 2048, 8192])
    p.add_argument("--branches", type=int, default=8)
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--prefill-layers", type=int, default=2)
    p.add_argument("--prefill-hidden", type=int, default=256)
    p.add_argument("--no-prefill", action="store_true", help="skip the re-prefill baseline")
    p.add_argument("--out", help="also write the markdown to this file")
    return p.parse_args()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    device: torch.device,
    run: Callable[[], object],
    reset: Callable[[object], None],
    repeats: int,
    state_bytes: Callable[[object], int],
) -> tuple[float, int]:
    """Median seconds of ``run()`` and its extra memory; ``reset(result)`` undoes it (untimed)."""
    times, extra = [], 0
    for i in range(repeats + 1):  # the first call warms up
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            start_mem = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        result = run()
        sync(device)
        elapsed = time.perf_counter() - start
        if i > 0:
            times.append(elapsed)
        if device.type == "cuda":
            extra = torch.cuda.max_memory_allocated(device) - start_mem
        else:
            extra = state_bytes(result)
        reset(result)
        del result
    return statistics.median(times), extra


def bench_ours(args, device, dtype, prefix: torch.Tensor, at: int):
    """prefix: [layers, 2, P, heads, dim]. Returns (seconds, bytes copied, extra bytes)."""
    layers, _, length, heads, dim = prefix.shape
    blocks = -(-length // args.block_size) + args.branches
    cache = PagedKVCache(
        layers, heads, dim, blocks, block_size=args.block_size, dtype=dtype, device=device
    )
    sid = cache.new_sequence()
    slots = cache.reserve(sid, length)
    for layer in range(layers):
        cache.write(layer, prefix[layer, 0], prefix[layer, 1], slots)
    block_bytes = cache.kv[:, :, 0].numel() * cache.kv.element_size()
    free_before = cache.num_free_blocks
    copied_before = cache.stats.bytes_copied

    def pool_bytes(children):
        return (free_before - cache.num_free_blocks) * block_bytes

    def free(children):
        for child in children:
            cache.free(child)

    seconds, extra = measure(
        device, lambda: cache.fork(sid, args.branches, at=at), free, args.repeats, pool_bytes
    )
    copied = (cache.stats.bytes_copied - copied_before) // (args.repeats + 1)
    # check the result once: every branch holds the prefix
    children = cache.fork(sid, args.branches, at=at)
    keys, values, _ = cache.gather(layers - 1, children)
    want_k = prefix[layers - 1, 0, :at].transpose(0, 1)
    want_v = prefix[layers - 1, 1, :at].transpose(0, 1)
    assert torch.equal(keys, want_k.expand_as(keys)) and torch.equal(
        values, want_v.expand_as(values)
    )
    return seconds, copied, extra


def bench_repeat_interleave(args, device, prefix: torch.Tensor, at: int):
    from transformers import DynamicCache

    def build():
        cache = DynamicCache()
        for layer in range(prefix.shape[0]):
            k = prefix[layer, 0, :at].transpose(0, 1).unsqueeze(0)  # [1, H, at, D]
            v = prefix[layer, 1, :at].transpose(0, 1).unsqueeze(0)
            cache.update(k, v, layer)
        return cache

    pending = [build()]  # built outside the timed call: only batch_repeat_interleave is timed

    def timed():
        cache = pending.pop()
        cache.batch_repeat_interleave(args.branches)
        return cache

    def new_bytes(cache):
        return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)

    seconds, extra = measure(
        device, timed, lambda cache: pending.append(build()), args.repeats, new_bytes
    )
    copied = args.branches * at * prefix[:, :, 0].numel() * prefix.element_size()
    return seconds, copied, extra


def prefill_model(args, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = max(1, args.prefill_hidden // 64)
    config = LlamaConfig(
        vocab_size=1024,
        hidden_size=args.prefill_hidden,
        intermediate_size=2 * args.prefill_hidden,
        num_hidden_layers=args.prefill_layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=16384,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    return model, sum(p.numel() for p in model.parameters())


def bench_reprefill(args, device, model, at: int):
    ids = torch.randint(0, model.config.vocab_size, (args.branches, max(at, 1)), device=device)

    def run():
        with torch.no_grad():
            return model(input_ids=ids, use_cache=True).past_key_values

    def new_bytes(cache):
        return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)

    seconds, extra = measure(device, run, lambda cache: None, max(1, args.repeats // 2), new_bytes)
    return seconds, extra


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({torch.get_num_threads()} threads)"


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def ratio(a: float, b: float) -> str:
    return "inf (0 B)" if b == 0 else f"{a / b:,.0f}x"


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    import transformers

    lines = [
        f"# KV-cache fork: {args.branches} branches, {args.layers} layers x "
        f"{args.kv_heads} KV heads"
        f" x head_dim {args.head_dim}, {args.dtype}, block_size {args.block_size}",
        "",
        f"Device: {device_name(device)}; torch {torch.__version__}; transformers "
        f"{transformers.__version__}"
        + (f"; CUDA {torch.version.cuda}" if device.type == "cuda" else "")
        + f". Median of {args.repeats} repeats (re-prefill: {max(1, args.repeats // 2)}).",
        "",
    ]
    model = None
    if not args.no_prefill:
        model, params = prefill_model(args, device, dtype)
        lines += [
            f"Re-prefill model: random Llama, {args.prefill_layers} layers, hidden "
            f"{args.prefill_hidden}, {params / 1e6:.1f}M parameters (far smaller than 7B: "
            "a lower bound on re-prefill cost).",
            "",
        ]
    extra_how = (
        "torch.cuda.max_memory_allocated above the start"
        if device.type == "cuda"
        else "bytes of the new state: pool blocks taken / new K/V tensors"
    )
    lines += [
        f"Extra memory: {extra_how}. Full copy = branches x prefix bytes (what "
        "batch_repeat_interleave writes).",
        "",
    ]
    header = (
        "| prefix P | fork at | ours | batch_repeat_interleave | re-prefill | speedup vs repeat"
        " | speedup vs re-prefill | bytes copied (ours) | full copy | copy reduction"
        " | extra mem (ours) | extra mem (repeat) |"
    )
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    gen = torch.Generator().manual_seed(0)
    for length in args.prefix_lens:
        prefix = torch.randn(
            (args.layers, 2, length, args.kv_heads, args.head_dim), generator=gen
        ).to(device=device, dtype=dtype)
        for at in sorted({length, length - 1}, reverse=True):
            ours_s, ours_copied, ours_extra = bench_ours(args, device, dtype, prefix, at)
            rep_s, full_copy, rep_extra = bench_repeat_interleave(args, device, prefix, at)
            if model is not None:
                pre_s, _ = bench_reprefill(args, device, model, at)
                pre_cell, pre_ratio = f"{pre_s * 1e3:.2f} ms", f"{pre_s / ours_s:,.0f}x"
            else:
                pre_cell = pre_ratio = "-"
            lines.append(
                f"| {length} | {at} | {ours_s * 1e3:.3f} ms | {rep_s * 1e3:.2f} ms | {pre_cell} | "
                f"{rep_s / ours_s:,.0f}x | {pre_ratio} | {fmt_bytes(ours_copied)} | "
                f"{fmt_bytes(full_copy)} | {ratio(full_copy, ours_copied)} | "
                f"{fmt_bytes(ours_extra)} | {fmt_bytes(rep_extra)} |"
            )
            print(lines[-1], flush=True)
        del prefix
    text = "\n".join(lines) + "\n"
    print()
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
