"""appo.integrations.trl against the real trl 1.16 (no mocks): two GRPO steps of
KernelGRPOTrainer and of trl.GRPOTrainer from the same seed (examples/trl/grpo_tiny.py, each in
its own process so that its peak resident memory is its own)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "trl" / "grpo_tiny.py"


def run_example(trainer: str, *options: str) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run(
        [sys.executable, str(EXAMPLE), "--trainer", trainer, "--steps", "2", *options],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_two_grpo_steps_equal_stock_with_less_memory():
    ours, stock = run_example("kernel"), run_example("stock")
    assert len(ours["loss"]) == len(stock["loss"]) == 2
    for key in ("loss", "reward", "entropy"):
        torch.testing.assert_close(
            torch.tensor(ours[key]), torch.tensor(stock[key]), rtol=0, atol=1e-4, msg=key
        )
    assert ours["loss"][0] != 0 and ours["reward"][0] != ours["reward"][1]  # not a trivial run
    print(f"peak extra RSS: KernelGRPOTrainer {ours['peak_extra_rss_mb']:.0f} MB, "
          f"trl.GRPOTrainer {stock['peak_extra_rss_mb']:.0f} MB")  # fmt: skip
    assert ours["peak_extra_rss_mb"] < stock["peak_extra_rss_mb"]


@pytest.mark.slow
def test_soft_capped_gemma2_equals_stock():
    """A Gemma 2 model with final_logit_softcapping=1.0 (a real cap, not the identity): two GRPO
    steps of KernelGRPOTrainer and trl.GRPOTrainer log the same loss, reward, entropy and
    gradient norm. (Trained on the uncapped logits, the entropy was 0.06 against TRL's 2.99.)"""
    options = ("--family", "gemma2", "--softcap", "1.0", "--words", "64")
    ours, stock = run_example("kernel", *options), run_example("stock", *options)
    for key in ("loss", "reward", "entropy", "grad_norm"):
        torch.testing.assert_close(
            torch.tensor(ours[key]), torch.tensor(stock[key]), rtol=1e-4, atol=1e-4, msg=key
        )
    assert min(ours["entropy"]) > 3.0  # logits within [-1, 1]: close to log(66) = 4.19
    assert ours["loss"][0] != 0 and ours["grad_norm"][0] > 0


def tiny_trainer(tmp_path, model, tokenizer):
    from datasets import Dataset
    from trl import GRPOConfig

    from appo.integrations.trl import KernelGRPOTrainer

    args = GRPOConfig(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", num_generations=2,
        per_device_train_batch_size=2,
    )  # fmt: skip
    return KernelGRPOTrainer(
        model=model,
        reward_funcs=grpo_tiny().even_words,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": ["w1 w2"] * 2}),
        processing_class=tokenizer,
    )


def grpo_tiny():
    sys.path.insert(0, str(EXAMPLE.parent))
    import grpo_tiny

    return grpo_tiny


@pytest.mark.parametrize(
    "key, value",
    [
        ("logit_scale", 0.5),
        ("logits_scaling", 8.0),
        ("logit_softcapping", 30.0),
        ("final_logit_softcapping", 0.0),
        ("final_logit_softcapping", "30"),
    ],
)
def test_a_logit_transform_it_does_not_apply_is_refused(tmp_path, key, value):
    """Scales other than 1.0, soft caps it does not know, and a soft cap that is not a positive
    number are refused at construction, naming the config key."""
    tokenizer = grpo_tiny().build_tokenizer(16)
    model = grpo_tiny().build_model(tokenizer, seed=0)
    setattr(model.config, key, value)
    with pytest.raises(ValueError, match=f"{key}={value!r}"):
        tiny_trainer(tmp_path, model, tokenizer)


def test_soft_capped_scores_and_bad_batches(tmp_path):
    """The trainer's per-token statistics of a soft-capped Gemma 2 (cap 1.0) equal those of the
    model's own (capped) logits at TRL's temperature; a malformed batch is refused by name."""
    from appo_kernels import token_stats

    tokenizer = grpo_tiny().build_tokenizer(40)
    model = grpo_tiny().build_model(tokenizer, seed=0, family="gemma2", softcap=1.0)
    trainer = tiny_trainer(tmp_path, model, tokenizer)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(2, len(tokenizer), (3, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0  # completion padding
    keep = 5
    logps, entropy, _ = trainer._get_per_token_logps_and_entropies(
        trainer.model, ids, mask, keep, compute_entropy=True
    )
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, -keep - 1 : -1]
    assert logits.abs().max() <= 1.0  # the model caps its logits at 1
    labels = ids[:, -keep:].masked_fill(mask[:, -keep:] == 0, -100)
    want = token_stats(logits / trainer.temperature, labels)
    real = labels != -100
    torch.testing.assert_close(logps[real], want.logprob[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy[real], want.entropy[real], rtol=1e-5, atol=1e-5)
    assert (logps[~real] == 0).all() and (entropy[~real] == 0).all()
    for args, error, name in [
        ((ids.float(), mask, keep), TypeError, "input_ids"),
        ((ids, mask[:, 1:], keep), ValueError, "attention_mask"),
        ((ids, mask, ids.shape[1]), ValueError, "logits_to_keep"),
        ((ids, mask, 0), ValueError, "logits_to_keep"),
    ]:
        with pytest.raises(error, match=name):
            trainer._get_per_token_logps_and_entropies(trainer.model, *args)
