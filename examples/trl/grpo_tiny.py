"""GRPO with ``KernelGRPOTrainer`` on a tiny random Llama, on the CPU, in about a minute.

Nothing is downloaded: the tokenizer is a word-level one built here (words ``w0`` ... ``wN``), the
model a randomly initialised ``LlamaForCausalLM``. The reward asks for even-numbered words. The
same run with ``--trainer stock`` uses ``trl.GRPOTrainer``; with the same seed both sample the same
completions, so their losses and rewards agree, and the peak memory of the two can be compared::

    python examples/trl/grpo_tiny.py                  # KernelGRPOTrainer
    python examples/trl/grpo_tiny.py --trainer stock  # trl.GRPOTrainer

``--family gemma2 --softcap 1.0`` trains a tiny random ``Gemma2ForCausalLM`` instead, whose logits
the model soft-caps (``final_logit_softcapping``): KernelGRPOTrainer applies the same cap.

It prints one JSON line: per-step losses, rewards, entropies and gradient norms and the peak
resident memory of training.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)
from trl import GRPOConfig, GRPOTrainer

from appo.integrations.trl import KernelGRPOTrainer

SPECIAL = ["<pad>", "<eos>"]


def build_tokenizer(words: int) -> PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate(SPECIAL + [f"w{i}" for i in range(words)])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>", padding_side="left"
    )


def build_model(
    tokenizer: PreTrainedTokenizerFast,
    seed: int,
    family: str = "llama",
    softcap: float | None = None,
) -> LlamaForCausalLM | Gemma2ForCausalLM:
    """A random tiny causal LM: Llama, or Gemma 2 with ``final_logit_softcapping=softcap``."""
    sizes = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        initializer_range=0.5,
    )
    if family == "gemma2":
        config = Gemma2Config(**sizes, head_dim=16, final_logit_softcapping=softcap)
        model_class = Gemma2ForCausalLM
    else:
        config, model_class = LlamaConfig(**sizes), LlamaForCausalLM
    torch.manual_seed(seed)
    return model_class(config)


def even_words(completions: list[str], **_) -> list[float]:
    """Fraction of the completion's words that are even-numbered (w0, w2, ...)."""
    rewards = []
    for text in completions:
        numbers = [int(n) for n in re.findall(r"w(\d+)", text)]
        rewards.append(sum(n % 2 == 0 for n in numbers) / max(len(numbers), 1))
    return rewards


def peak_rss_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024


def train(
    trainer_name: str,
    steps: int,
    words: int,
    seed: int,
    family: str = "llama",
    softcap: float | None = None,
) -> dict:
    tokenizer = build_tokenizer(words)
    prompts = [" ".join(f"w{(7 * i + j) % words}" for j in range(6)) for i in range(16)]
    with tempfile.TemporaryDirectory() as output_dir:
        args = GRPOConfig(
            output_dir=output_dir,
            use_cpu=True,
            bf16=False,  # fp32 throughout: the two trainers then agree to rounding
            seed=seed,
            max_steps=steps,
            per_device_train_batch_size=8,
            num_generations=8,
            max_completion_length=24,
            temperature=0.9,
            beta=0.04,
            top_entropy_quantile=0.5,
            learning_rate=1e-3,
            logging_steps=1,
            report_to="none",
            save_strategy="no",
            model_init_kwargs={"dtype": torch.float32},
        )
        trainer_class = KernelGRPOTrainer if trainer_name == "kernel" else GRPOTrainer
        # a local directory: with beta > 0, TRL loads the reference model from the same path
        build_model(tokenizer, seed, family, softcap).save_pretrained(f"{output_dir}/model")
        trainer = trainer_class(
            model=f"{output_dir}/model",
            reward_funcs=even_words,
            args=args,
            train_dataset=Dataset.from_dict({"prompt": prompts}),
            processing_class=tokenizer,
        )
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # resets VmHWM to the current resident size
        before = peak_rss_mb()
        trainer.train()
        peak = peak_rss_mb()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    return {
        "trainer": trainer_name,
        "loss": [entry["loss"] for entry in logs],
        "reward": [entry["reward"] for entry in logs],
        "entropy": [entry["entropy"] for entry in logs],
        "grad_norm": [entry["grad_norm"] for entry in logs],
        "peak_extra_rss_mb": peak - before,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trainer", choices=["kernel", "stock"], default="kernel")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--words", type=int, default=32000, help="vocabulary size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--family", choices=["llama", "gemma2"], default="llama")
    parser.add_argument(
        "--softcap", type=float, default=None, help="gemma2's final_logit_softcapping"
    )
    args = parser.parse_args(argv)
    result = train(args.trainer, args.steps, args.words, args.seed, args.family, args.softcap)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
