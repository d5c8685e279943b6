"""End to end on a tiny random Llama (CPU): training steps of each algorithm."""

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
