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


def run_example(trainer: str) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run(
        [sys.executable, str(EXAMPLE), "--trainer", trainer, "--steps", "2"],
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


def test_a_logit_transform_is_refused(tmp_path):
    from datasets import Dataset
    from trl import GRPOConfig

    from appo.integrations.trl import KernelGRPOTrainer

    sys.path.insert(0, str(EXAMPLE.parent))
    import grpo_tiny

    tokenizer = grpo_tiny.build_tokenizer(16)
    model = grpo_tiny.build_model(tokenizer, seed=0)
    model.config.final_logit_softcapping = 30.0
    args = GRPOConfig(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", num_generations=2,
        per_device_train_batch_size=2,
    )  # fmt: skip
    with pytest.raises(ValueError, match="final_logit_softcapping=30.0"):
        KernelGRPOTrainer(
            model=model,
            reward_funcs=grpo_tiny.even_words,
            args=args,
            train_dataset=Dataset.from_dict({"prompt": ["w1 w2"] * 2}),
            processing_class=tokenizer,
        )
