"""End to end on a tiny random Llama (CPU): training steps of each algorithm, and the CLI's run
folder."""

import json
import math

import pytest
import torch

from appo.model import tiny_model
from appo.tasks import make_tasks
from appo.trainer import TrainConfig, Trainer


def _parity_reward(task, text):
    """A reward that varies across random rollouts, so that advantages are non-zero."""
    return float(len(text) % 2)


@pytest.mark.parametrize("algo", ["appo", "grpo", "entropy"])
def test_training_steps_update_the_policy(algo):
    model, tokenizer = tiny_model(seed=1)
    config = TrainConfig(
        algo=algo,
        prompts_per_step=2,
        n=3,
        b=2,
        max_new_tokens=12,
        lr=1e-3,
        weight_decay=0.0,
        seed=3,
    )
    trainer = Trainer(model, tokenizer, config, reward_fn=_parity_reward, max_concurrent=4)
    before = [p.detach().clone() for p in model.parameters()]
    tasks = make_tasks(0, 4)
    updated = 0
    for step in range(2):
        metrics, record = trainer.step(tasks[2 * step : 2 * step + 2])
        assert math.isfinite(metrics["loss"]) and math.isfinite(metrics["entropy"])
        updated += metrics["updated"]
        initial = [r for r in record.rollouts if not r.is_branch]
        assert len(initial) == 2 * (config.n + config.b if algo == "grpo" else config.n)
        if algo == "grpo":
            assert metrics["branches"] == 0
        else:
            assert metrics["branches"] == 2 * config.b
            assert metrics["fork_reused_tokens"] > 0
            assert all(
                record.rollouts[r.parent].group == r.group for r in record.rollouts if r.is_branch
            )
    assert trainer.lm.cache.num_free_blocks == trainer.lm.cache.num_blocks  # everything released
    assert updated > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_cli_writes_run_folder(tmp_path, capsys):
    from appo.cli import main

    model, tokenizer = tiny_model(seed=2)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    out = tmp_path / "run"
    args = [
        "--model",
        str(tmp_path / "model"),
        "--steps",
        "2",
        "--n",
        "2",
        "--b",
        "1",
        "--prompts-per-step",
        "1",
        "--cold-start-steps",
        "1",
        "--max-new-tokens",
        "6",
        "--eval-prompts",
        "2",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 1]
    assert (out / "reward_entropy.png").read_bytes()[:4] == b"\x89PNG"
    trace = (out / "trace.md").read_text()
    assert "Rollout tree" in trace and "| branch | position | token | H | Ω | score |" in trace
    summary = json.loads((out / "summary.json").read_text())
    assert summary["branches"] == 2 and summary["fork_reused_prefix_tokens"] > 0
    assert "heldout_accuracy_after_rl" in capsys.readouterr().out
