"""What a new user sees: ``appo-train`` with its defaults, over several seeds.

Runs ``python -m appo --seed S`` for seeds 0 .. N-1 (each its own process; ``--parallel P`` runs
P at once with one torch thread each, otherwise one at a time with every core) plus any extra
``appo-train`` flags after ``--``, and tabulates each run's held-out accuracy before and after RL
(from its ``summary.json``), the change, its wall time and the KL to the start of RL at the last
step. Writes ``default_run_<name>.md`` and ``.json``:

    python bench/default_run.py --seeds 5 --parallel 2 --name cpu
    python bench/default_run.py --seeds 2 --name lr5e-6 -- --algo grpo --lr 5e-6
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from learning import interval

ROOT = Path(__file__).resolve().parents[1]


def run_seed(seed: int, out: Path, extra: list[str], threads: int | None, log):
    """Starts ``appo-train`` for ``seed`` into the new folder ``out``, its output into ``log``."""
    command = [sys.executable, "-m", "appo", "--seed", str(seed), "--out", str(out), *extra]
    if threads:
        command += ["--threads", str(threads)]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def read_run(seed: int, out: Path) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    before, after = summary["heldout_accuracy_before_rl"], summary["heldout_accuracy_after_rl"]
    return {
        "seed": seed,
        "before": before,
        "after": after,
        "change": after - before,
        "questions": summary["heldout_questions"],
        "wall_s": summary["wall_s"],
        "kl_to_start_last": metrics[-1].get("kl_to_start"),
        "reward_mean_all_steps": summary["reward_mean_all_steps"],
        "branches": summary["branches"],
    }


def markdown(name: str, runs: list[dict], header: str) -> str:
    changes = [r["change"] for r in runs]
    mean, half = interval(changes)
    improved = sum(c > 0 for c in changes)
    lines = [
        f"# Default `appo-train` over {len(runs)} seeds ({name})",
        "",
        header,
        "",
        "| seed | held-out before RL | after RL | change | questions | wall (s) | KL to start |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        kl = "n/a" if r["kl_to_start_last"] is None else f"{r['kl_to_start_last']:.3f}"
        lines.append(
            f"| {r['seed']} | {r['before']:.3f} | {r['after']:.3f} | {r['change']:+.3f} | "
            f"{r['questions']} | {r['wall_s']:.0f} | {kl} |"
        )
    before = interval([r["before"] for r in runs])
    after = interval([r["after"] for r in runs])
    lines += [
        "",
        f"Mean before {before[0]:.3f} ± {before[1]:.3f}, after {after[0]:.3f} ± {after[1]:.3f}, "
        f"change {mean:+.3f} ± {half:.3f} (95% t-interval); improved in {improved} of "
        f"{len(runs)} seeds.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0 .. N-1")
    parser.add_argument("--parallel", type=int, default=1, help="runs at once (1 thread each)")
    parser.add_argument("--name", default="cpu", help="results are default_run_<name>.md/.json")
    parser.add_argument("--runs", default="runs/default_run", help="folder of the run folders")
    parser.add_argument("--out", default="bench/results", help="folder for the .md and .json")
    args = parser.parse_args(own)
    if args.seeds < 1 or args.parallel < 1:
        parser.error("--seeds and --parallel must be >= 1")
    runs_dir = Path(args.runs) / args.name
    runs_dir.mkdir(parents=True, exist_ok=True)
    threads = 1 if args.parallel > 1 else None
    started = time.perf_counter()
    waiting, running = list(range(args.seeds)), []
    while waiting or running:
        while waiting and len(running) < args.parallel:
            seed = waiting.pop(0)
            out = runs_dir / f"seed{seed}"
            if out.exists():
                raise SystemExit(f"{out} exists: choose another --name or remove it")
            log = open(out.with_suffix(".log"), "w")  # noqa: SIM115 - closed once it ends
            running.append((seed, run_seed(seed, out, extra, threads, log), log))
        seed, process, log = running.pop(0)
        code = process.wait()
        log.close()
        if code:
            raise SystemExit(f"seed {seed} failed ({code}): see {runs_dir / f'seed{seed}.log'}")
        print(f"seed {seed} done after {time.perf_counter() - started:.0f} s", flush=True)
    runs = [read_run(seed, runs_dir / f"seed{seed}") for seed in range(args.seeds)]
    import torch

    flags = " ".join(own + (["--", *extra] if extra else []))
    header = (
        f"`python bench/default_run.py {flags}`: {time.perf_counter() - started:.0f} s, "
        f"{args.parallel} run(s) at once ({'1 thread each' if threads else 'all cores'}) on "
        f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores), "
        f"torch {torch.__version__}. Extra flags: `{' '.join(extra) or 'none'}`."
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"default_run_{args.name}"
    stem.with_suffix(".md").write_text(markdown(args.name, runs, header))
    stem.with_suffix(".json").write_text(json.dumps({"extra": extra, "runs": runs}, indent=1))
    print(stem.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
