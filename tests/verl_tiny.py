"""A tiny, offline verl setup for APPO's verl trainer tests and the GPU smoke run
(bench/verl_appo_smoke.py): a character-level tokenizer with a ChatML chat template that renders
tools and Hermes tool calls, a Qwen2 config (so verl picks its Qwen token builder), a function tool
file, a reward function file, and a scripted rollout server.

Nothing is downloaded; nothing here imitates verl: verl's own agent loop workers, token builder,
tool parser, tool loading and reward manager run on these inputs.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

SPECIAL_TOKENS = ("<pad>", "<unk>", "<|im_start|>", "<|im_end|>")
TOOL_TAGS = ("<tool_call>", "</tool_call>")  # added tokens, not special: decode keeps them
CHARACTERS = tuple(chr(code) for code in range(32, 127)) + ("\n",)

# (transformers renders chat templates with trim_blocks: no block tag is followed by a newline)
CHAT_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n"
    "{% if messages[0].role == 'system' %}{{ messages[0].content }}\n{% endif %}"
    "Tools: {{ tools | tojson }}<|im_end|>\n"
    "{% elif messages[0].role == 'system' %}<|im_start|>system\n"
    "{{ messages[0].content }}<|im_end|>\n"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if message.role == 'assistant' %}<|im_start|>assistant\n{{ message.content }}"
    "{% for call in message.tool_calls or [] %}<tool_call>"
    '{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}'
    "</tool_call>{% endfor %}<|im_end|>\n"
    "{% elif message.role != 'system' %}<|im_start|>{{ message.role }}\n"
    "{{ message.content }}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TOOLS_SOURCE = '''"""Function tools of APPO's verl tests (loaded by verl's function_tool_path)."""

from verl.tools.function_tool import function_tool

CALLS = []


@function_tool
def add(a: int, b: int) -> str:
    """Adds two integers.

    Args:
        a: The first integer.
        b: The second integer.
    """
    CALLS.append((a, b))
    return str(a + b)
'''

REWARD_SOURCE = '''"""Reward of APPO's verl tests: 1 when the last word is the ground truth."""


def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    words = solution_str.replace("<|im_end|>", " ").split()
    return float(bool(words) and words[-1].strip(".") == str(ground_truth))
'''


def tiny_tokenizer():
    """A character-level ``PreTrainedTokenizerFast`` with :data:`CHAT_TEMPLATE`."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + TOOL_TAGS + CHARACTERS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    backend.add_tokens([AddedToken(tag, special=False, normalized=False) for tag in TOOL_TAGS])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="<|im_end|>",
        chat_template=CHAT_TEMPLATE,
    )


def write_model_dir(path: Path) -> tuple[Path, Path]:
    """(model folder, tokenizer folder) for verl's ``HFModelConfig`` (``model.path`` and
    ``model.tokenizer_path``): a tiny Qwen2 config, and the tokenizer on its own (next to a Qwen2
    config, transformers would rebuild it as a Qwen2 byte-level tokenizer)."""
    from transformers import Qwen2Config

    tokenizer = tiny_tokenizer()
    model, tokenizer_dir = path / "model", path / "tokenizer"
    tokenizer.save_pretrained(tokenizer_dir)
    Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        architectures=["Qwen2ForCausalLM"],
    ).save_pretrained(model)
    return model, tokenizer_dir


def write_sources(folder: Path) -> tuple[Path, Path]:
    """(tools file, reward file) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    tools, reward = folder / "appo_verl_tools.py", folder / "appo_verl_reward.py"
    tools.write_text(TOOLS_SOURCE)
    reward.write_text(REWARD_SOURCE)
    return tools, reward


class ScriptedServer:
    """Stands in for verl's ``LLMServerClient`` (``generate(request_id, *, prompt_ids,
    sampling_params, ...)``): each call decodes the context and answers with the reply of the
    first rule whose pattern matches the end of it. A rule's reply is a string, or a callable
    taking the call's index among that rule's calls (it may raise, to fail a rollout). Log-probs
    depend on each token's position in the context, so that alignment is checkable."""

    def __init__(self, tokenizer, rules: list[tuple[str, str | Callable[[int], str]]]):
        self.tokenizer = tokenizer
        self.rules = [(re.compile(f"(?:{pattern})$", re.DOTALL), reply) for pattern, reply in rules]
        self.counts = [0] * len(rules)
        self.calls: list[dict] = []

    @staticmethod
    def log_prob(position: int) -> float:
        return -0.001 * (position + 1)

    async def generate(self, request_id, *, prompt_ids, sampling_params, **kwargs):
        from verl.workers.rollout.replica import TokenOutput

        context = self.tokenizer.decode(prompt_ids)
        self.calls.append({"request_id": request_id, "prompt_ids": list(prompt_ids)})
        for index, (pattern, reply) in enumerate(self.rules):
            if pattern.search(context):
                count, self.counts[index] = self.counts[index], self.counts[index] + 1
                text = reply(count) if callable(reply) else reply
                break
        else:
            raise AssertionError(f"no scripted reply for a context ending {context[-80:]!r}")
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        start = len(prompt_ids)
        return TokenOutput(
            token_ids=ids,
            log_probs=[self.log_prob(start + i) for i in range(len(ids))],
            extra_fields={"global_steps": 0, "min_global_steps": 0, "max_global_steps": 0},
        )
