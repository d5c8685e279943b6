"""Does the Branching Score pick the decisions that matter? Each branch-point rule on the same
initial rollouts of the same checkpoint, with K branches from every point.

One checkpoint (the setting's cold start); for each seed, ``prompts`` training questions with
``n`` initial rollouts each, scored once by the policy (π_old, entropies) against the bf16
behaviour policy that sampled them. Every rule of ``appo.branching.RULES`` then picks ``budget``
points per prompt from those same rollouts and statistics (the trainer's candidates: sampled,
non-blank tokens past the response's first), and ``K`` branches are sampled from each point.
Per rule:

* **reward changed**: the share of branches whose reward differs from their parent's;
* **informative points**: the share of points whose K branches do not all get the same reward
  (a branch group with reward variance is one that carries a gradient);
* **branch − parent reward**: mean branch reward minus the mean reward of the parents of the
  points (negative: the points sit on rollouts that were right, and re-sampling breaks them);
* where points land: mean position in the response (in tokens, and as a fraction of the
  parent's length), the share on tool-call tokens (inside ``<lookup>…</lookup>`` or
  ``<calc>…</calc>``), the share on the first candidate after a tool result (where ARPO forks),
  and the share the rule would put on the response's first token if it were a candidate (it is
  not: a branch there shares no prefix with its parent).

Numbers are means over seeds with 95% t-intervals. Settings: ``cpu`` (the task Llama of
``bench/learning.py``, cold-started to 30% validation accuracy), ``smollm2`` (SmolLM2-135M after
``appo-train``'s default cold start of seed 0), ``tiny`` (the tests').
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from learning import SETTINGS as LEARNING_SETTINGS
from learning import build_model, cold_started, interval

from appo.branching import RULES, plan_branches
from appo.config import TrainConfig
from appo.tasks import make_tasks
from appo.tools import TOOL_NAMES
from appo.trainer import Trainer

CHECKPOINT_SEED = 0  # the one checkpoint every seed's rollouts come from
CALL = re.compile("|".join(f"<{tool}>.*?</{tool}>" for tool in TOOL_NAMES), re.DOTALL)


@dataclass(frozen=True)
class Setting:
    learning: str  # the bench/learning.py setting whose model and cold start this uses
    cold_start_steps: int | None  # None: that setting's cold start (to its validation target)
    prompts: int
    n: int
    budget: int  # points per prompt
    k: int  # branches per point
    max_new_tokens: int


SETTINGS = {
    "cpu": Setting("cpu", None, prompts=16, n=4, budget=2, k=4, max_new_tokens=48),
    "smollm2": Setting("gpu", 8, prompts=8, n=4, budget=2, k=4, max_new_tokens=64),
    "tiny": Setting("tiny", None, prompts=2, n=2, budget=1, k=2, max_new_tokens=12),
}


def call_token_flags(tokenizer, tokens: list[int]) -> list[bool]:
    """Per response token: does its text overlap a tool call's text (tags included)?"""
    ends = [len(tokenizer.decode(tokens[: i + 1])) for i in range(len(tokens))]
    spans = [m.span() for m in CALL.finditer(tokenizer.decode(tokens))]
    flags, start = [], 0
    for end in ends:
        flags.append(any(s < end and start < e for s, e in spans))
        start = end
    return flags


def checkpoint(setting: Setting, seed: int, device, cache=None):
    """``(trainer, cold-start steps)``: the setting's model after its cold start for ``seed``:
    ``bench/learning.py``'s (kept in and reused from ``cache`` when given), or ``appo-train``'s
    (``cold_start_steps`` on the demonstrations of ``seed``, the trainer's defaults)."""
    learning = LEARNING_SETTINGS[setting.learning]
    config = TrainConfig(
        seed=seed,
        n=setting.n,
        b=setting.budget,
        prompts_per_step=setting.prompts,
        max_new_tokens=setting.max_new_tokens,
        sampler_dtype=learning.train.get("sampler_dtype", TrainConfig.sampler_dtype),
    )
    concurrent = setting.prompts * setting.n * (1 + setting.budget * setting.k)
    if setting.cold_start_steps is None:
        model, tokenizer, steps = cold_started(learning, seed, device, cache)
        return Trainer(model, tokenizer, config, max_concurrent=concurrent), steps
    model, tokenizer = build_model(learning, seed, device)
    trainer = Trainer(model, tokenizer, config, max_concurrent=concurrent)
    steps = setting.cold_start_steps
    trainer.cold_start(make_tasks(seed + 1, steps * config.cold_start_batch, "train"), steps)
    return trainer, steps


def measure_seed(setting: Setting, trainer: Trainer, seed: int) -> dict:
    """Every rule on one draw of questions and initial rollouts (``seed``) of the checkpoint."""
    tokenizer = trainer.tokenizer
    trainer.generator.manual_seed(seed)
    tasks = make_tasks(seed + 3, setting.prompts, "train")
    prompts = trainer.prompts(tasks)
    groups = [g for g in range(len(prompts)) for _ in range(setting.n)]
    trainer.sampler.use_behaviour()
    initial = trainer.engine.sample([prompts[g] for g in groups], groups, trainer.generator)
    result = {"seed": seed, "rules": {}}
    try:
        scored = trainer.score(initial)
        batch = scored.batch
        rewards = [
            trainer.reward_fn(tasks[g], tokenizer.decode(r.tokens)) for g, r in zip(groups, initial)
        ]
        result["initial_reward"] = statistics.fmean(rewards)
        on_call = [call_token_flags(tokenizer, r.tokens) for r in initial]
        candidates = trainer.branch_candidates(batch)
        first_after_result = first_candidates_after_results(initial, candidates)
        with_first = candidates.clone()
        with_first[:, 0] = batch.policy_mask[:, 0] & ~trainer.whitespace[batch.tokens[:, 0]]
        group_ids = torch.tensor(groups, device=trainer.device)
        for rule in RULES:

            def plan(allowed, rule=rule):
                return plan_branches(
                    rule,
                    entropy=scored.entropy,
                    logprob=scored.logprob,
                    behavior_logprob=batch.behavior_logprob,
                    mask=batch.policy_mask,
                    candidates=allowed,
                    group_ids=group_ids,
                    budget=setting.budget,
                    num_groups=len(prompts),
                    observation_mask=batch.observation_mask,
                    generator=torch.Generator(trainer.device).manual_seed(seed),
                ).points()

            points, first_allowed = plan(candidates), plan(with_first)
            repeated = [point for point in points for _ in range(setting.k)]
            branches = trainer.engine.branch(initial, repeated, trainer.generator)
            trainer.engine.release(branches)
            branch_rewards = [
                trainer.reward_fn(tasks[b.group], tokenizer.decode(b.tokens)) for b in branches
            ]
            result["rules"][rule] = summarise_rule(
                setting,
                initial,
                rewards,
                points,
                branch_rewards,
                on_call,
                first_allowed,
                first_after_result,
            )
    finally:
        trainer.engine.release(initial)
    return result


def _mean(values) -> float:
    values = list(values)
    return statistics.fmean(values) if values else math.nan


def first_candidates_after_results(rollouts, candidates: torch.Tensor) -> list[set[int]]:
    """Per rollout: the positions of the first candidate after each tool result."""
    firsts = []
    for row, rollout in enumerate(rollouts):
        allowed, found, waiting = candidates[row].tolist(), set(), False
        for position, observed in enumerate(rollout.is_observation):
            if observed:
                waiting = True
            elif waiting and allowed[position]:
                found.add(position)
                waiting = False
        firsts.append(found)
    return firsts


def summarise_rule(
    setting, initial, rewards, points, branch_rewards, on_call, first_allowed, first_after_result
):
    k = setting.k
    parents = [rewards[row] for row, _ in points]
    per_point = [branch_rewards[i * k : (i + 1) * k] for i in range(len(points))]
    return {
        "points": len(points),
        "reward_changed": _mean(b != p for p, group in zip(parents, per_point) for b in group),
        "informative_points": _mean(len(set(group)) > 1 for group in per_point),
        "branch_reward": _mean(branch_rewards),
        "parent_reward": _mean(parents),
        "position": _mean(p for _, p in points),
        "relative_position": _mean(p / len(initial[r].tokens) for r, p in points),
        "on_tool_call": _mean(on_call[r][p] for r, p in points),
        "after_tool_result": _mean(p in first_after_result[r] for r, p in points),
        "at_first_token_if_allowed": _mean(p == 0 for _, p in first_allowed),
        "positions": [p for _, p in points],
    }


COLUMNS = (
    ("reward_changed", "reward changed"),
    ("informative_points", "informative points"),
    ("branch_minus_parent", "branch − parent reward"),
    ("position", "position (tokens)"),
    ("relative_position", "position / length"),
    ("on_tool_call", "on a tool call"),
    ("after_tool_result", "first candidate after a tool result"),
    ("at_first_token_if_allowed", "at token 0 if allowed"),
)


def table(seeds: list[dict]) -> dict[str, dict[str, tuple[float, float]]]:
    """Per rule and column: mean over seeds and the 95% interval's half-width."""
    out = {}
    for rule in RULES:
        rows = [s["rules"][rule] for s in seeds]
        for row in rows:
            row["branch_minus_parent"] = row["branch_reward"] - row["parent_reward"]
        out[rule] = {
            key: interval([row[key] for row in rows if not math.isnan(row[key])] or [math.nan])
            for key, _ in COLUMNS
        }
    return out


def markdown(name, setting, seeds, summary, header, cold_start_steps) -> str:
    lines = [
        f"# Branch points ({name})",
        "",
        header,
        f"Setting: {json.dumps(asdict(setting))}; one checkpoint ({cold_start_steps} cold-start "
        f"steps, seed {CHECKPOINT_SEED}); seeds {[s['seed'] for s in seeds]} draw the questions "
        f"and rollouts (initial-rollout reward {[round(s['initial_reward'], 3) for s in seeds]}).",
        "Mean over seeds ± the 95% t-interval's half-width.",
        "",
        "| rule | " + " | ".join(title for _, title in COLUMNS) + " |",
        "|---|" + "---|" * len(COLUMNS),
    ]
    for rule, row in summary.items():
        cells = [f"{row[key][0]:.3f} ± {row[key][1]:.3f}" for key, _ in COLUMNS]
        cells[3] = f"{row['position'][0]:.1f} ± {row['position'][1]:.1f}"
        lines.append(f"| {rule} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, seeds: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    keys = ("reward_changed", "informative_points", "on_tool_call", "after_tool_result")
    width = 0.8 / len(keys)
    for i, key in enumerate(keys):
        x = [j + i * width for j in range(len(summary))]
        means = [row[key][0] for row in summary.values()]
        errors = [row[key][1] for row in summary.values()]
        left.bar(x, means, width, yerr=errors, capsize=3, label=dict(COLUMNS)[key])
    left.set_xticks([j + 0.4 - width / 2 for j in range(len(summary))], list(summary))
    left.set_ylim(0, 1.05)
    left.set_ylabel("share (mean over seeds, 95% interval)")
    left.legend(fontsize=7)
    for rule in summary:
        positions = [p for s in seeds for p in s["rules"][rule]["positions"]]
        right.hist(positions, bins=20, histtype="step", label=rule)
    right.set_xlabel("branch position in the response (tokens)")
    right.set_ylabel("points")
    right.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", choices=tuple(SETTINGS), default="cpu")
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0 .. N-1")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", default="bench/results", help="folder for the PNG, .md, .json")
    parser.add_argument(
        "--checkpoints",
        default=None,
        help="bench/learning.py's folder of cold-started checkpoints, to reuse (default: none)",
    )
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    setting, device = SETTINGS[args.setting], torch.device(args.device)
    started = time.perf_counter()
    cache = None if args.checkpoints is None else Path(args.checkpoints)
    trainer, cold_start_steps = checkpoint(setting, CHECKPOINT_SEED, device, cache)
    seeds = []
    for seed in range(args.seeds):
        seeds.append(measure_seed(setting, trainer, seed))
        print(f"seed {seed}: {time.perf_counter() - started:.0f} s", flush=True)
    summary = table(seeds)
    import transformers

    header = (
        f"`python bench/branch_points.py {' '.join(argv if argv is not None else sys.argv[1:])}`"
        f": {time.perf_counter() - started:.0f} s on {device} "
        f"({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), "
        f"torch {torch.__version__}, transformers {transformers.__version__}."
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"branch_points_{args.setting}"
    stem.with_suffix(".md").write_text(
        markdown(args.setting, setting, seeds, summary, header, cold_start_steps)
    )
    stem.with_suffix(".json").write_text(
        json.dumps(
            {"setting": asdict(setting), "cold_start_steps": cold_start_steps, "seeds": seeds}
        )
    )
    plot(summary, seeds, stem.with_suffix(".png"), f"{args.setting}: where each rule branches")
    print(stem.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
