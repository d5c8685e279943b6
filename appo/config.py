"""The trainer's settings: one dataclass whose defaults and checks the trainer, ``appo-train`` and
the benches share (the CLI takes its defaults from here and checks each flag with
:meth:`TrainConfig.check`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

from appo.advantages import STD_CONVENTIONS
from appo.branching import RULES
from appo.sampler import SAMPLER_DTYPES
from appo_kernels.validation import check_count, check_nonneg, check_positive

# APPO, GRPO (no branching: N + B rollouts per prompt) and the other branch-point rules
ALGOS = ("appo", "grpo", *(rule for rule in RULES if rule != "appo"))
SEED_LIMIT = 2**63  # torch.Generator.manual_seed takes seeds below this


@dataclass
class TrainConfig:
    """One run's algorithm settings (each field is checked on construction).

    ``n`` initial rollouts per prompt and ``b`` branches per prompt (GRPO: ``b`` more rollouts,
    the same rollout budget), ``max_new_tokens`` policy tokens per rollout (tool output not
    counted), ``kl_coef`` > 0 keeps a frozen reference copy and adds its k3 KL (the paper's
    optional 0.001; off by default, as the copy doubles the policy's memory and forward cost).
    """

    algo: str = "appo"
    prompts_per_step: int = 2
    n: int = 4
    b: int = 2
    lr: float = 5e-6
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    max_new_tokens: int = 64
    max_tool_calls: int = 4
    keep_selected_token: bool = False
    train_branches: bool = False
    kl_coef: float = 0.0
    cold_start_lr: float = 5e-5
    cold_start_batch: int = 4
    seed: int = 0
    block_size: int = 16
    # PPO as the paper's code runs it: pi_old recomputed by the trainer, several optimizer steps
    # (mini-batches of the trained rows) per rollout batch.
    ppo_minibatches: int = 4
    # The behaviour policy (appo/sampler.py): its weights' dtype and lag (in training steps).
    sampler_dtype: str = "bfloat16-weights"
    sampler_lag: int = 0
    # Where the APPO paper's code differs from the design's formulas (docs/design.md, 15).
    clamp_kl: bool = True  # k3 KL per token clamped to [-10, 10] (verl, the paper's code)
    drop_dual_clipped_rows: bool = True  # drop rows with > 1 dual-clipped token (paper's code)
    advantage_std: str = "population"  # group std: "population", "sample" (n - 1, verl's) or "none"

    def __post_init__(self):
        for spec in fields(self):
            self.check(spec.name, getattr(self, spec.name))

    @staticmethod
    def check(name: str, value: object) -> object:
        """Checks one field's value (``ValueError`` / ``TypeError`` naming it); returns it."""
        _CHECKS[name](name, value)
        return value


def _at_least(minimum: int) -> Callable[[str, object], object]:
    return lambda name, value: check_count(name, value, minimum)


def _one_of(choices: tuple[str, ...]) -> Callable[[str, object], None]:
    def check(name: str, value: object) -> None:
        if value not in choices:
            raise ValueError(f"{name} must be one of {choices}, got {value!r}")

    return check


def _flag(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def _seed(name: str, value: object) -> None:
    if check_count(name, value) >= SEED_LIMIT:
        raise ValueError(f"{name} must be an int in [0, 2**63), got {value}")


_CHECKS: dict[str, Callable[[str, object], object]] = {
    "algo": _one_of(ALGOS),
    "prompts_per_step": _at_least(1),
    "n": _at_least(1),
    "b": _at_least(1),
    "lr": check_positive,
    "weight_decay": check_nonneg,
    "grad_clip": check_positive,
    "max_new_tokens": _at_least(1),
    "max_tool_calls": _at_least(0),
    "keep_selected_token": _flag,
    "train_branches": _flag,
    "kl_coef": check_nonneg,
    "cold_start_lr": check_positive,
    "cold_start_batch": _at_least(1),
    "seed": _seed,
    "block_size": _at_least(1),
    "ppo_minibatches": _at_least(1),
    "sampler_dtype": _one_of(tuple(SAMPLER_DTYPES)),
    "sampler_lag": _at_least(0),
    "clamp_kl": _flag,
    "drop_dual_clipped_rows": _flag,
    "advantage_std": _one_of(STD_CONVENTIONS),
}
