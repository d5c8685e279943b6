"""A scripted tool-calling policy for ``APPOTrainer``'s tests, and a runner that trains it and
writes what each step did as JSON (run it under ``torchrun`` for the multi-process test).

The policy is a real ``LlamaForCausalLM`` whose weights make it a bigram model over a word-level
vocabulary: the residual stream carries the current token's one-hot embedding (attention and MLP
outputs are zero), so the next token's distribution is a table row. After ``Answer:`` it opens a
lookup (1/2), a calculation (1/4) or an answer (1/4); a lookup names one of four items uniformly
(the highest-entropy choice, inside the call), then closes the call and the turn::

    Answer: <lookup> {"item": "pear"} </lookup> <eos>
    <out>7</out>
    Answer: <answer> 7 </answer> <eos>

so rollouts make tool calls that TRL parses and runs, and branch points fall inside calls and
between turns. Nothing is trained beforehand or downloaded.

    torchrun --nproc_per_node 2 tests/trl_appo_run.py OUT.json --per-device 2 --steps 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "trl"))

import appo_tools  # noqa: E402  (the example's tools and response template)

ITEMS = {"pear": "7", "kiwi": "3", "apple": "4", "plum": "2"}
WORDS = (
    ["<pad>", "<eos>", "<unk>", "Answer:", "Question:", "<lookup>", "</lookup>", '{"item":']
    + [f'"{item}"}}' for item in ITEMS]
    + ["<calc>", "</calc>", '{"expression":', '"2*3"}', '"4+4"}', "<answer>", "</answer>", "7", "9"]
    + [f"<out>{value}</out>" for value in ("7", "3", "4", "2", "6", "8")]  # the tools' outputs
)
# next-word probabilities of the script; every other next word gets e^-12 before normalising
SCRIPT = {
    "Answer:": {"<lookup>": 0.5, "<calc>": 0.25, "<answer>": 0.25},
    "<lookup>": {'{"item":': 1.0},
    '{"item":': {f'"{item}"}}': 0.25 for item in ITEMS},
    **{f'"{item}"}}': {"</lookup>": 1.0} for item in ITEMS},
    "</lookup>": {"<eos>": 1.0},
    "<calc>": {'{"expression":': 1.0},
    '{"expression":': {'"2*3"}': 0.5, '"4+4"}': 0.5},
    '"2*3"}': {"</calc>": 1.0},
    '"4+4"}': {"</calc>": 1.0},
    "</calc>": {"<eos>": 1.0},
    "<answer>": {"7": 0.5, "9": 0.5},
    "7": {"</answer>": 1.0},
    "9": {"</answer>": 1.0},
    "</answer>": {"<eos>": 1.0},
}
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message.role == 'system' %}{{ message.content + '\\n' }}"
    "{%- elif message.role == 'user' %}{{ 'Question: ' + message.content + '\\n' }}"
    "{%- elif message.role == 'assistant' %}{{ 'Answer: ' }}"
    "{%- if message.content %}{{ message.content + ' ' }}{% endif %}"
    "{%- for call in message.tool_calls or [] %}"
    "{{ '<' + call.function.name + '> ' + (call.function.arguments | tojson)"
    " + ' </' + call.function.name + '> ' }}"
    "{%- endfor %}{{ eos_token + '\\n' }}"
    "{%- elif message.role == 'tool' %}{{ '<out>' + message.content + '</out>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ 'Answer: ' }}{% endif %}"
)


def scripted_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        padding_side="left",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.response_template = appo_tools.response_template("<eos>", anchor="Answer:")
    return tokenizer


def scripted_policy(hidden_size: int = 32):
    """``(model, tokenizer)``: the bigram Llama of the module docstring, in float32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = scripted_tokenizer()
    vocab = len(WORDS)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    table = torch.full((vocab, vocab), -12.0)  # [next, current] log-probabilities
    for current, following in SCRIPT.items():
        for word, p in following.items():
            table[WORDS.index(word), WORDS.index(current)] = math.log(p)
    table = table.log_softmax(dim=0)
    with torch.no_grad():
        model.model.embed_tokens.weight.zero_()
        model.model.embed_tokens.weight[:, :vocab] = torch.eye(vocab)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(1.0)
        head = torch.zeros(vocab, hidden_size)
        head[:, :vocab] = table / math.sqrt(hidden_size)  # the final norm scales by sqrt(H)
        model.lm_head.weight.copy_(head)
    return model, tokenizer


def dataset(size: int = 32):
    from datasets import Dataset

    questions = [f"q{i}" for i in range(size)]
    return Dataset.from_dict(
        {"prompt": [[{"role": "user", "content": q}] for q in questions], "target": ["7"] * size}
    )


def _text(completion) -> str:
    if isinstance(completion, str):
        return completion
    parts = []
    for message in completion:
        if message["role"] == "assistant":
            parts.append(message.get("content") or "")
            for call in message.get("tool_calls") or []:
                parts.append(json.dumps(call["function"]))
    return " ".join(parts)


def answered(completions, target, **_) -> list[float]:
    """1 for an answer equal to the example's target."""
    return [float(f"<answer> {t} </answer>" in _text(c)) for c, t in zip(completions, target)]


def looked_up_pear(completions, **_) -> list[float]:
    """0.25 per lookup of a pear (a second reward function, with weight)."""
    return [0.25 * _text(c).count('"pear"') for c in completions]


REWARDS = [answered, looked_up_pear]


# the runs' TRL settings (GRPOConfig fields)
SETTINGS = dict(
    use_cpu=True,
    bf16=False,
    seed=0,
    max_steps=2,
    per_device_train_batch_size=4,
    num_generations=4,
    max_completion_length=48,
    max_tool_calling_iterations=3,
    learning_rate=1e-2,
    logging_steps=1,
    report_to="none",
    save_strategy="no",
    disable_dropout=True,
    gradient_checkpointing=False,
)


def config(output_dir: str, **overrides):
    from appo.integrations.trl_appo import APPOConfig

    return APPOConfig(**{**SETTINGS, "output_dir": output_dir, "branch_budget": 2, **overrides})


def recording_trainer_class():
    """``APPOTrainer`` that keeps each step's record (``last_round``) in ``rounds``."""
    from appo.integrations.trl_appo import APPOTrainer

    class Recording(APPOTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.rounds = []

        def _branch_step(self, inputs, output):
            output = super()._branch_step(inputs, output)
            self.rounds.append(self.last_round)
            return output

    return Recording


def trainer(output_dir: str, model=None, **overrides):
    model, tokenizer = scripted_policy() if model is None else (model, scripted_tokenizer())
    return recording_trainer_class()(
        model=model,
        reward_funcs=REWARDS,
        args=config(output_dir, **overrides),
        train_dataset=dataset(),
        processing_class=tokenizer,
        tools=appo_tools.TOOLS,
    )


def summary(run) -> dict:
    """What the multi-process test compares: per step, the global branch points, the logged
    loss and rewards, and this process's advantages of its initial rows."""
    logs = [entry for entry in run.state.log_history if "loss" in entry]
    return {
        "rank": run.accelerator.process_index,
        "points": [list(zip(r.plan["rows"], r.plan["points"])) for r in run.rounds],
        "scores": [r.plan["scores"] for r in run.rounds],
        "rewards": [r.credit["rewards"].tolist() for r in run.rounds],
        "advantages": [r.credit["advantages"].tolist() for r in run.rounds],
        "completions": [r.initial.completion_ids for r in run.rounds],
        "logprobs": [r.initial.logprobs for r in run.rounds],
        "loss": [entry["loss"] for entry in logs],
        "reward": [entry["reward"] for entry in logs],
        "branch_reward": [entry["appo/reward_branches"] for entry in logs],
        "grad_norm": [entry["grad_norm"] for entry in logs],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", help="JSON file (rank r writes OUT.r.json under torchrun)")
    parser.add_argument("--per-device", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as output_dir:
        # plain SGD: Adam's first step is sign(gradient) * lr, which turns the rounding
        # differences between a two-process gradient average and a one-process gradient on
        # near-zero gradients into lr-sized weight differences (and so into different bf16
        # samples); with SGD the runs' weights differ by rounding only. The sampler computes in
        # float32 on bf16-rounded weights: a bf16 forward's logits depend on the batch it runs in
        # (its reductions round differently), and one process's branch batch is not two's
        run = trainer(
            output_dir,
            per_device_train_batch_size=args.per_device,
            max_steps=args.steps,
            optim="sgd",
            learning_rate=0.1,
            sampler_dtype="bfloat16-weights",
        )
        run.train()
    rank = int(os.environ.get("RANK", "0"))
    out = Path(args.out)
    if "RANK" in os.environ:
        out = out.with_suffix(f".{rank}.json")
    out.write_text(json.dumps(summary(run)))


if __name__ == "__main__":
    main()
