"""Benchmark: per-call host overhead of the public ops on tiny inputs, against the eager formula.

On inputs this small the arithmetic costs next to nothing, so the time of a call is what the
Python around it costs: argument checks, the path to the implementation, allocations, host
syncs. Each row times one public call and the plain eager PyTorch formula of the same result on
the same input (``eager_*`` below; the script first checks that both give the same numbers),
with one CPU thread (``torch.set_num_threads(1)``): per call, the median over ``--repeats``
interleaved batches of ``--calls`` back-to-back calls (op batch, eager batch, op batch, ...; on
CUDA each batch ends with a synchronisation and is timed by the wall clock, on CPU by the
thread's CPU time), and the ratio op / eager. The target is a ratio
of at most 4 (docs/design.md, section 13).

A second table (``--step``) measures what the token-id range check costs in a training step:
LM head matmul + ``token_stats`` (or ``linear_token_stats``) + a policy-gradient style loss +
backward, with the check on and off (``appo_kernels.token_id_checks(False)``). The check is a
host sync: on CUDA it stalls the host until the GPU has caught up, so the kernels queued after it
start late; on CPU it is only a small reduction.

    python bench/overhead.py                              # CPU
    python bench/overhead.py --device cuda --step --out bench/results/overhead_<device>.md
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import NamedTuple

import torch
from common import emit_table, synchronize, versions
from token_stats import eager_token_stats

import appo_kernels as ak

# --------------------------------------------------------------------------------------------
# Eager formulas: what one would write in plain PyTorch for the same result
# --------------------------------------------------------------------------------------------


def eager_linear_token_stats(hidden, weight, tokens):
    return eager_token_stats(hidden @ weight.t(), tokens)


def eager_z_score(values, mask, count):
    mean = torch.where(mask, values, 0.0).sum(-1, keepdim=True) / count
    var = torch.where(mask, (values - mean).square(), 0.0).sum(-1, keepdim=True) / count
    return torch.where(mask, (values - mean) / (var.sqrt() + 1e-6), 0.0)


def eager_branching_score(logits, tokens, behavior_logprob, mask, gamma=1.0, clip=0.2):
    """Token statistics, the discounted future sum as one matmul with the [T, T] discount matrix
    (gamma^(k - t) for k >= t), the clipped exponential, masked z-scores and their product."""
    logprob, entropy = eager_token_stats(logits, tokens)
    steps = torch.arange(logits.shape[1], device=logits.device)
    ahead = steps[:, None] - steps[None, :]  # k - t at [k, t]
    discount = torch.where(ahead >= 0, gamma ** ahead.clamp(min=0).float(), 0.0)
    gain = (torch.where(mask, logprob - behavior_logprob, 0.0) @ discount).clamp(-20.0, 20.0)
    omega = gain.exp().clamp(1.0 - clip, 1.0 + clip)
    count = mask.sum(-1, keepdim=True).clamp(min=1)
    z_entropy, z_future = eager_z_score(entropy, mask, count), eager_z_score(omega, mask, count)
    return torch.where(mask, z_entropy * z_future, float("-inf")), entropy, logprob, omega


def eager_select_branch_points(score, candidates, group_ids, budget, num_groups):
    """Each group's top ``budget`` candidates (every group has at least that many here): sort
    the positions by score (ties by position), then stably by group, and take each group's
    first ``budget``."""
    B, T = score.shape
    flat = torch.where(candidates, score, float("-inf")).reshape(-1)
    order = torch.sort(flat, descending=True, stable=True).indices
    order = order[torch.sort(group_ids.repeat_interleave(T)[order], stable=True).indices]
    counts = torch.bincount(group_ids, minlength=num_groups) * T
    starts = counts.cumsum(0) - counts
    picks = order[starts[:, None] + torch.arange(budget, device=score.device)]
    return picks // T, picks % T, flat[picks]


# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------


class Case(NamedTuple):
    name: str
    shape: str
    op: Callable[[], object]
    eager: Callable[[], object]
    same: Callable[[object, object], None]  # asserts that op and eager agree


def _close(*pairs):
    for a, b in pairs:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _backward(fn, leaves):
    def call():
        for leaf in leaves:
            leaf.grad = None
        logprob, entropy = fn()[:2]
        (logprob.sum() + 0.1 * entropy.sum()).backward()
        return [leaf.grad for leaf in leaves]

    return call


def cases(device: torch.device) -> list[Case]:
    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device)

    def randint(high, *shape):
        return torch.randint(0, high, shape, generator=gen).to(device)

    V, H = 64, 32
    x, y = randn(16, V), randint(V, 16)
    x3, y3 = randn(2, 8, V), randint(V, 2, 8)
    # behaviour log-probs near the current ones, so that few future values hit the clip
    behavior = eager_token_stats(x3, y3)[0] + 0.02 * randn(2, 8)
    mask = torch.ones(2, 8, dtype=torch.bool, device=device)
    mask[1, 6:] = False
    hidden, weight = randn(16, H), randn(V, H) / H**0.5
    score = randn(4, 16)
    candidates = torch.ones(4, 16, dtype=torch.bool, device=device)
    groups = torch.tensor([0, 1, 0, 1], device=device)
    x_leaf, h_leaf, w_leaf = (t.clone().requires_grad_() for t in (x, hidden, weight))

    def branching():
        out = ak.branching_score(x3, y3, behavior, mask)
        return out.score, out.entropy, out.logprob, out.future_value

    def select():
        return tuple(ak.select_branch_points(score, candidates, groups, 2, num_groups=2))

    def select_inferred():
        return tuple(ak.select_branch_points(score, candidates, groups, 2))

    def eager_select():
        return eager_select_branch_points(score, candidates, groups, 2, 2)

    def same_selection(op, eager):
        for a, b in zip(op, eager):
            assert torch.equal(a, b), (op, eager)

    def same_grads(op, eager):
        _close(*zip(op, eager))

    return [
        Case("token_stats", f"[16, {V}]", lambda: ak.token_stats(x, y),
             lambda: eager_token_stats(x, y), lambda a, b: _close(*zip(a, b))),
        Case("token_stats fwd+bwd", f"[16, {V}]",
             _backward(lambda: ak.token_stats(x_leaf, y), [x_leaf]),
             _backward(lambda: eager_token_stats(x_leaf, y), [x_leaf]), same_grads),
        Case("branching_score", f"[2, 8, {V}]", branching,
             lambda: eager_branching_score(x3, y3, behavior, mask),
             lambda a, b: _close(*zip(a, b))),
        Case("linear_token_stats", f"[16, {H}] x [{V}, {H}]",
             lambda: ak.linear_token_stats(hidden, weight, y),
             lambda: eager_linear_token_stats(hidden, weight, y),
             lambda a, b: _close(*zip(a, b))),
        Case("linear_token_stats fwd+bwd", f"[16, {H}] x [{V}, {H}]",
             _backward(lambda: ak.linear_token_stats(h_leaf, w_leaf, y), [h_leaf, w_leaf]),
             _backward(lambda: eager_linear_token_stats(h_leaf, w_leaf, y), [h_leaf, w_leaf]),
             same_grads),
        Case("select_branch_points", "[4, 16], 2 groups, budget 2", select, eager_select,
             same_selection),
        Case("select_branch_points (num_groups inferred)", "[4, 16], 2 groups, budget 2",
             select_inferred, eager_select, same_selection),
    ]  # fmt: skip


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def clock(device: torch.device) -> Callable[[], float]:
    """Wall time on CUDA (a call's cost includes its waits for the GPU); on CPU this thread's CPU
    time, which other processes on a shared machine do not inflate (nothing here blocks)."""
    return time.perf_counter if device.type == "cuda" else time.thread_time


def per_call_us(fn: Callable[[], object], device: torch.device, calls: int) -> float:
    now = clock(device)
    synchronize(device)
    start = now()
    for _ in range(calls):
        fn()
    synchronize(device)
    return (now() - start) / calls * 1e6


def measure(case_list: list[Case], device, repeats: int, calls: int) -> list[dict]:
    """Median per-call µs of op and eager for each case, over interleaved batches."""
    for case in case_list:
        case.same(case.op(), case.eager())
        for fn in (case.op, case.eager):  # warm-up: first-call costs stay out
            per_call_us(fn, device, max(1, calls // 4))
    times = {case.name: ([], []) for case in case_list}
    for _ in range(repeats):
        for case in case_list:
            op_times, eager_times = times[case.name]
            op_times.append(per_call_us(case.op, device, calls))
            eager_times.append(per_call_us(case.eager, device, calls))
    rows = []
    for case in case_list:
        op_us, eager_us = (statistics.median(t) for t in times[case.name])
        rows.append(
            {"op": case.name, "shape": case.shape, "op_us": op_us, "eager_us": eager_us,
             "ratio": op_us / eager_us}
        )  # fmt: skip
    return rows


# --------------------------------------------------------------------------------------------
# The token-id range check in a training step
# --------------------------------------------------------------------------------------------


def step_cases(device: torch.device, rows: int, hidden_size: int, vocab: int, dtype):
    """(name, step) pairs: one training step each, LM head + token statistics + loss +
    backward."""
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(rows, hidden_size, generator=gen).to(device, dtype).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, generator=gen) / hidden_size**0.5).to(device, dtype)
    weight.requires_grad_()
    tokens = torch.randint(0, vocab, (rows,), generator=gen).to(device)
    tokens[::7] = -100  # prompt / padding positions
    advantages = torch.randn(rows, generator=gen).to(device)

    def loss(logprob, entropy):
        return -(logprob * advantages).mean() - 0.01 * entropy.mean()

    def unfused():
        logprob, entropy = ak.token_stats(hidden @ weight.t(), tokens)
        loss(logprob, entropy).backward()

    def fused():
        logprob, entropy = ak.linear_token_stats(hidden, weight, tokens)
        loss(logprob, entropy).backward()

    return [("LM head + token_stats", unfused), ("linear_token_stats", fused)]


def measure_steps(device, repeats: int, rows: int, hidden_size: int, vocab: int, dtype):
    out = []
    for name, step in step_cases(device, rows, hidden_size, vocab, dtype):
        timings = {True: [], False: []}
        for checks in (True, False):  # warm-up
            with ak.token_id_checks(checks):
                per_call_us(step, device, 2)
        for _ in range(repeats):
            for checks in (True, False):
                with ak.token_id_checks(checks):
                    timings[checks].append(per_call_us(step, device, 1))
        on, off = (statistics.median(timings[c]) for c in (True, False))
        out.append({"step": name, "on_us": on, "off_us": off})
    return out


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def markdown(rows, steps, info, args) -> str:
    lines = [
        "# Per-call host overhead on tiny inputs",
        "",
        "Measured by `bench/overhead.py` in one run: "
        + ", ".join(f"{k} {v}" for k, v in info.items())
        + f"; one CPU thread; per call, the median of {args.repeats} interleaved batches of "
        f"{args.calls} calls ({CLOCKS[args.device.startswith('cuda')]}). `eager` is the plain "
        "PyTorch formula of the same result on the same input (checked equal first). "
        "Target: ratio <= 4.",
        "",
        "| op | input | op (µs/call) | eager (µs/call) | ratio |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['op']} | {r['shape']} | {r['op_us']:.1f} | {r['eager_us']:.1f} "
            f"| {r['ratio']:.2f} |"
        )
    if steps:
        lines += [
            "",
            f"## Token-id range check in a training step (N {args.step_rows}, H "
            f"{args.step_hidden}, V {args.step_vocab}, {args.step_dtype}; median of "
            f"{args.repeats} interleaved steps)",
            "",
            "| step | check on (ms) | check off (ms) | cost of the check (ms) | % of the step |",
            "|---|---|---|---|---|",
        ]
        for s in steps:
            cost = s["on_us"] - s["off_us"]
            lines.append(
                f"| {s['step']} | {s['on_us'] / 1e3:.3f} | {s['off_us'] / 1e3:.3f} "
                f"| {cost / 1e3:.3f} | {100 * cost / s['on_us']:.1f} |"
            )
    return "\n".join(lines) + "\n"


CLOCKS = {True: "wall time", False: "the thread's CPU time"}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=31, help="interleaved batches per case")
    p.add_argument("--calls", type=int, default=200, help="calls per batch")
    p.add_argument("--step", action="store_true", help="also time the range check in a step")
    p.add_argument("--step-rows", type=int, default=None)
    p.add_argument("--step-hidden", type=int, default=None)
    p.add_argument("--step-vocab", type=int, default=None)
    p.add_argument("--step-dtype", choices=sorted(DTYPES), default=None)
    p.add_argument("--out", help="write the markdown table here")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.step_rows = args.step_rows or (4096 if cuda else 256)
    args.step_hidden = args.step_hidden or (3584 if cuda else 64)
    args.step_vocab = args.step_vocab or (152064 if cuda else 2048)
    args.step_dtype = args.step_dtype or ("bf16" if cuda else "fp32")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        device = torch.device(args.device)
        rows = measure(cases(device), device, args.repeats, args.calls)
        steps = None
        if args.step:
            dtype = DTYPES[args.step_dtype]
            steps = measure_steps(
                device, args.repeats, args.step_rows, args.step_hidden, args.step_vocab, dtype
            )
        emit_table(markdown(rows, steps, versions(device), args), args.out)
    finally:
        torch.set_num_threads(threads)
    return rows


if __name__ == "__main__":
    main()
