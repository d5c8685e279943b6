"""Does branching help? APPO against GRPO, ARPO's branch rule, entropy-only and random branch
points, at the same rollout-token budget.

For each seed the model is first taught the task's format by a cold start (supervised steps on
demonstrations), once; then each algorithm trains its own copy of that checkpoint on the same
stream of training questions until it has generated ``budget`` policy tokens (a branch counts
only the tokens it samples itself: its shared prefix is free, which is APPO's point), and the
greedy held-out accuracy is measured at ``evals`` evenly spaced token counts. Writes a PNG
(accuracy against policy tokens: mean over seeds with its 95% t-interval as a band), a markdown
table (mean ± the interval's half-width) and the raw numbers as JSON.

Settings:

* ``cpu``: a 0.47M-parameter Llama over a word-level vocabulary of the task (tags, words,
  digits; 193 tokens), cold-started in rounds of 50 supervised steps until it answers 30%
  of 64 validation questions (600-950 steps for seeds 0-2), then 64k policy tokens of RL per
  algorithm (about 150 steps of 4 prompts x (4 + 2) rollouts). A pretrained LM is out of reach
  here: SmolLM2 takes tens of seconds per RL step on 2 cores, so 9 runs in 20 minutes would be a
  few steps each, i.e. noise. The test is fair for the question asked (which credit assignment
  and branching makes better use of the same sampled tokens): every algorithm starts from the
  same checkpoint, sees the same questions in the same order, spends the same token budget and
  is scored on the same 96 held-out questions; the cold-started model has the format but only
  partial accuracy (20-35% held-out), which leaves RL room in both directions. What it cannot
  show is behaviour that needs a pretrained LM's prior (e.g. long reasoning). About 12 minutes
  on an idle 2-core CPU: ``python bench/learning.py --setting cpu``.
* ``cpu-wide``: the same with room to branch: 4 prompts x (8 + 4) rollouts per step (the
  paper's N = 8 initial rollouts), the same token budget.
* ``gpu``: SmolLM2-135M-Instruct (the default model of ``appo-train``), 32 cold-start steps,
  4 prompts x (8 + 4) rollouts per step, 128 new tokens: ``python bench/learning.py --setting gpu``
  on a GPU machine.
* ``tiny``: the test suite's end-to-end run (seconds).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import re
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from appo.config import ALGOS, TrainConfig
from appo.tasks import all_tasks, demonstration, make_tasks, system_prompt, task_stream
from appo.tools import run_tool_call
from appo.trainer import Trainer

# One vocabulary entry per tag, word (with its leading space), digit, whitespace or other char.
TASK_PIECE = r"</?[a-z]+>| ?[A-Za-z]+| ?\d|\s|."
HELDOUT_SEED = 1234  # the held-out questions are the same for every seed and algorithm
VALIDATION_PROMPTS = 64  # training-split questions that decide when the cold start stops
COLD_START_ROUND = 50  # supervised steps between validation checks (one AdamW per round)


@dataclass(frozen=True)
class Setting:
    """One configuration of the comparison."""

    model: str  # "task-llama" (hidden_size / num_layers below) or "smollm2"
    cold_start_steps: int  # at most this many supervised steps, in rounds of COLD_START_ROUND
    cold_start_lr: float
    cold_start_batch: int
    cold_start_target: float  # stop the cold start once validation accuracy reaches this
    budget: int  # policy tokens each run generates
    evals: int  # held-out evaluations after the start, evenly spaced in tokens
    eval_prompts: int
    train: dict = field(default_factory=dict)  # TrainConfig fields (algo and seed come per run)
    hidden_size: int = 128
    num_layers: int = 3


CPU = Setting(
    model="task-llama",
    cold_start_steps=1000,
    cold_start_lr=2e-3,
    cold_start_batch=8,
    cold_start_target=0.3,
    budget=32_000,
    evals=4,
    eval_prompts=96,
    train=dict(prompts_per_step=4, n=4, b=2, lr=1e-4, max_new_tokens=48, sampler_dtype="bfloat16"),
)
SETTINGS = {
    "cpu": CPU,
    # the same model, cold start and budget with room to branch: N = 8, B = 4
    "cpu-wide": replace(CPU, train={**CPU.train, "n": 8, "b": 4}),
    "gpu": Setting(
        model="smollm2",
        cold_start_steps=64,
        cold_start_lr=1e-4,
        cold_start_batch=8,
        cold_start_target=0.3,
        budget=400_000,
        evals=8,
        eval_prompts=128,
        train=dict(prompts_per_step=4, n=8, b=4, lr=1e-5, max_new_tokens=128),
    ),
    "tiny": Setting(
        model="task-llama",
        cold_start_steps=4,
        cold_start_lr=1e-3,
        cold_start_batch=2,
        cold_start_target=1.0,
        budget=150,
        evals=2,
        eval_prompts=4,
        train=dict(prompts_per_step=2, n=2, b=1, max_new_tokens=12, ppo_minibatches=2),
        hidden_size=16,
        num_layers=1,
    ),
}


def task_tokenizer():
    """A word-level tokenizer of the task's text (system prompt, questions, demonstrations and
    the tools' error messages), plus ``<pad>``, ``<eos>``, ``<unk>``; decoding concatenates."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    errors = ("<calc></calc>", "<calc>1/0</calc>", "<calc>x</calc>", "<lookup>x</lookup>", "x")
    texts = [system_prompt(), *(run_tool_call(call) for call in errors)]
    for task in all_tasks():
        texts += [task.prompt, demonstration(task)]
    pieces = sorted({piece for text in texts for piece in re.findall(TASK_PIECE, text)})
    specials = ["<pad>", "<eos>", "<unk>"]
    backend = Tokenizer(
        models.WordLevel({p: i for i, p in enumerate(specials + pieces)}, unk_token="<unk>")
    )
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(TASK_PIECE), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def build_model(setting: Setting, seed: int, device: torch.device):
    """``(model, tokenizer)`` of a setting, fresh for ``seed`` (the pretrained model is loaded)."""
    if setting.model == "smollm2":
        from appo.model import load_model

        return load_model(None, device=device)
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = task_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=setting.hidden_size,
        intermediate_size=2 * setting.hidden_size,
        num_hidden_layers=setting.num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(device).eval(), tokenizer


def train_config(setting: Setting, algo: str, seed: int) -> TrainConfig:
    return TrainConfig(
        algo=algo,
        seed=seed,
        cold_start_lr=setting.cold_start_lr,
        cold_start_batch=setting.cold_start_batch,
        **setting.train,
    )


def cold_start(setting: Setting, trainer: Trainer, seed: int) -> int:
    """Supervised rounds of ``COLD_START_ROUND`` steps on demonstrations until the greedy accuracy
    on validation questions (training split, not the held-out ones) reaches the setting's target,
    or ``cold_start_steps`` have run. Returns the steps taken. (Small models learn the copying
    this task needs suddenly and at a seed-dependent step; the target gives every seed a start
    with the format learnt and room to improve.)"""
    validation = make_tasks(seed + 2, VALIDATION_PROMPTS, "train")
    demos = task_stream(seed + 1, "train")
    steps = 0
    while steps < setting.cold_start_steps:
        rounds = min(COLD_START_ROUND, setting.cold_start_steps - steps)
        batch = [next(demos) for _ in range(rounds * setting.cold_start_batch)]
        trainer.cold_start(batch, rounds)
        steps += rounds
        if trainer.evaluate(validation)["accuracy"] >= setting.cold_start_target:
            break
    return steps


def evaluation_point(trainer: Trainer, heldout, tokens: int) -> dict:
    """Greedy held-out accuracy and tool calls per rollout after ``tokens`` policy tokens."""
    result = trainer.evaluate(heldout)
    return {"tokens": tokens, "accuracy": result["accuracy"], "tool_calls": result["tool_calls"]}


def run_algorithm(setting, algo, seed, model, tokenizer, heldout, start) -> dict:
    """One algorithm from the cold-started weights until the token budget is spent."""
    trainer = Trainer(model, tokenizer, train_config(setting, algo, seed), max_concurrent=16)
    checkpoints = [setting.budget * (i + 1) // setting.evals for i in range(setting.evals)]
    curve, tool_calls, steps, updates = [start], [], 0, 0
    tokens, stream, began = 0, task_stream(seed, "train"), time.perf_counter()
    while tokens < setting.budget:
        metrics, _ = trainer.step([next(stream) for _ in range(trainer.config.prompts_per_step)])
        tokens += metrics["tokens_generated"]
        tool_calls.append(metrics["tool_calls"])
        steps, updates = steps + 1, updates + int(metrics["updated"])
        while checkpoints and tokens >= checkpoints[0]:
            checkpoints.pop(0)
            curve.append(evaluation_point(trainer, heldout, tokens))
    return {
        "algo": algo,
        "seed": seed,
        "curve": curve,
        "train_tool_calls": sum(tool_calls) / len(tool_calls),
        "rl_steps": steps,
        "optimizer_steps": updates,
        "wall_s": time.perf_counter() - began,
    }


def cold_started(setting: Setting, seed: int, device, cache: Path | None):
    """``(model, tokenizer, cold-start steps)`` of ``seed``; with ``cache``, the checkpoint is
    kept there and reused by any setting with the same model and cold start (``cpu`` and
    ``cpu-wide`` share theirs)."""
    model, tokenizer = build_model(setting, seed, device)
    fields = ("model", "hidden_size", "num_layers", "cold_start_steps", "cold_start_lr")
    fields += ("cold_start_batch", "cold_start_target")
    key = "-".join(str(getattr(setting, name)) for name in fields)
    path = None if cache is None else cache / f"{key}-seed{seed}.pt"
    if path is not None and path.exists():
        saved = torch.load(path, map_location=device)
        model.load_state_dict(saved["weights"])
        return model, tokenizer, saved["steps"]
    teacher = Trainer(model, tokenizer, train_config(setting, ALGOS[0], seed))
    steps = cold_start(setting, teacher, seed)
    del teacher
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"weights": model.state_dict(), "steps": steps}, path)
    return model, tokenizer, steps


def compare(setting: Setting, seeds, algos, device, progress=print, cache=None) -> list[dict]:
    heldout = make_tasks(HELDOUT_SEED, setting.eval_prompts, "heldout")
    runs = []
    for seed in seeds:
        model, tokenizer, steps = cold_started(setting, seed, device, cache)
        start = evaluation_point(
            Trainer(model, tokenizer, train_config(setting, ALGOS[0], seed)), heldout, 0
        )
        weights = copy.deepcopy(model.state_dict())
        progress(
            f"seed {seed}: held-out accuracy {start['accuracy']:.3f} after {steps} cold-start steps"
        )
        for algo in algos:
            model.load_state_dict(weights)
            run = run_algorithm(setting, algo, seed, model, tokenizer, heldout, start)
            progress(
                f"seed {seed} {algo}: accuracy {run['curve'][-1]['accuracy']:.3f} after "
                f"{run['curve'][-1]['tokens']} tokens, {run['rl_steps']} steps, "
                f"{run['wall_s']:.0f} s"
            )
            runs.append(run)
    return runs


T_95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def interval(values: list[float]) -> tuple[float, float]:
    """Mean of ``values`` and the half-width of its 95% t-interval (0 for a single value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    sample_var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, T_95.get(len(values) - 1, 1.96) * math.sqrt(sample_var / len(values))


def summarise(runs: list[dict]) -> dict[str, dict]:
    """Per algorithm: accuracy mean and 95% half-width (over seeds) at each evaluation point, and
    the run-level numbers of the table."""
    table = {}
    for algo in dict.fromkeys(run["algo"] for run in runs):
        mine = [run for run in runs if run["algo"] == algo]
        points = min(len(run["curve"]) for run in mine)
        curve = [
            {
                "tokens": interval([run["curve"][i]["tokens"] for run in mine])[0],
                "accuracy": interval([run["curve"][i]["accuracy"] for run in mine]),
            }
            for i in range(points)
        ]
        final = [run["curve"][points - 1]["accuracy"] for run in mine]
        table[algo] = {
            "seeds": len(mine),
            "curve": curve,
            "final": interval(final),
            "gain": interval([f - run["curve"][0]["accuracy"] for f, run in zip(final, mine)]),
            "train_tool_calls": interval([run["train_tool_calls"] for run in mine]),
            "eval_tool_calls": interval([run["curve"][points - 1]["tool_calls"] for run in mine]),
            "rl_steps": interval([run["rl_steps"] for run in mine])[0],
            "wall_s": interval([run["wall_s"] for run in mine])[0],
        }
    return table


def markdown(setting_name: str, setting: Setting, table: dict, header: list[str]) -> str:
    def pm(pair, digits=3):
        return f"{pair[0]:.{digits}f} ± {pair[1]:.{digits}f}"

    lines = [
        f"# Learning comparison ({setting_name})",
        "",
        *header,
        "",
        "Mean over seeds ± the half-width of the 95% t-interval.",
        "",
        "| algorithm | seeds | held-out accuracy at 0 tokens | at the budget | gain | tool calls "
        "per training rollout | held-out tool calls | RL steps | wall s per run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for algo, row in table.items():
        lines.append(
            f"| {algo} | {row['seeds']} | {pm(row['curve'][0]['accuracy'])} | {pm(row['final'])} "
            f"| {pm(row['gain'])} | {pm(row['train_tool_calls'], 2)} "
            f"| {pm(row['eval_tool_calls'], 2)} | {row['rl_steps']:.1f} | {row['wall_s']:.0f} |"
        )
    lines += ["", "Accuracy (mean ± 95% half-width over seeds) at each evaluation point:", ""]
    points = max(len(row["curve"]) for row in table.values())
    lines.append("| algorithm | " + " | ".join(f"eval {i}" for i in range(points)) + " |")
    lines.append("|---|" + "---|" * points)
    for algo, row in table.items():
        cells = [f"{pm(p['accuracy'], 2)} @ {p['tokens']:.0f}" for p in row["curve"]]
        lines.append(f"| {algo} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(table: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(7, 4.5))
    for algo, row in table.items():
        x = [p["tokens"] for p in row["curve"]]
        mean = [p["accuracy"][0] for p in row["curve"]]
        half = [p["accuracy"][1] for p in row["curve"]]
        axis.plot(x, mean, marker="o", label=f"{algo} ({row['seeds']} seeds)")
        axis.fill_between(
            x, [m - h for m, h in zip(mean, half)], [m + h for m, h in zip(mean, half)], alpha=0.15
        )
    axis.set_xlabel("policy tokens generated")
    axis.set_ylabel("held-out accuracy (greedy; band: 95% interval over seeds)")
    axis.set_title(title)
    axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", choices=tuple(SETTINGS), default="cpu")
    parser.add_argument("--seeds", type=int, default=5, help="how many seeds")
    parser.add_argument("--first-seed", type=int, default=0, help="the seeds are K .. K+N-1")
    parser.add_argument("--algos", default=",".join(ALGOS), help="comma-separated")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", default="bench/results", help="folder for the PNG, .md, .json")
    parser.add_argument(
        "--checkpoints",
        default=None,
        help="folder that keeps each seed's cold-started checkpoint for reuse (default: none)",
    )
    parser.add_argument(
        "--combine",
        nargs="+",
        metavar="JSON",
        help="train nothing: tabulate the runs of these learning_<setting>.json files (of the "
        "same setting, e.g. seeds run in separate processes) together",
    )
    args = parser.parse_args(argv)
    algos = args.algos.split(",")
    if args.seeds < 1 or args.first_seed < 0 or not set(algos) <= set(ALGOS):
        parser.error(f"--seeds must be >= 1, --first-seed >= 0, --algos a subset of {ALGOS}")
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    if args.threads:
        torch.set_num_threads(args.threads)
    setting, device = SETTINGS[args.setting], torch.device(args.device)
    threads = {torch.get_num_threads()}
    if args.combine:
        runs, threads = [], set()
        for path in args.combine:
            saved = json.loads(Path(path).read_text())
            if saved["setting"] != asdict(setting):
                parser.error(f"{path} is not of setting {args.setting!r}")
            runs += saved["runs"]
            threads.add(saved["threads"])
        runs.sort(key=lambda run: (run["seed"], ALGOS.index(run["algo"])))
    else:
        cache = None if args.checkpoints is None else Path(args.checkpoints)
        runs = compare(setting, seeds, algos, device, cache=cache)
    table = summarise(runs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"learning_{args.setting}"
    import transformers

    run_seeds = sorted({run["seed"] for run in runs})
    header = [
        f"`python bench/learning.py {' '.join(argv if argv is not None else sys.argv[1:])}`: "
        f"{len(runs)} runs (seeds {run_seeds}), "
        f"{sum(run['wall_s'] for run in runs):.0f} s of RL in all, on {device} "
        f"({platform.processor() or platform.machine()}, {'/'.join(map(str, sorted(threads)))} "
        "threads per process), "
        f"torch {torch.__version__}, transformers {transformers.__version__}.",
        f"Setting: {json.dumps(asdict(setting))}.",
        "Every algorithm starts from the same cold-started checkpoint per seed and trains on the "
        "same question stream until it has generated the budget of policy tokens (a branch "
        "counts only the tokens it samples itself).",
    ]
    stem.with_suffix(".md").write_text(markdown(args.setting, setting, table, header))
    stem.with_suffix(".json").write_text(
        json.dumps({"setting": asdict(setting), "threads": max(threads), "runs": runs})
    )
    plot(table, stem.with_suffix(".png"), f"{args.setting}: held-out accuracy vs policy tokens")
    print(stem.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
