"""The behaviour policy: the weights the rollout engine samples with.

APPO's future value Ω compares the trainer's log-probs with the behaviour log-probs of the policy
that sampled (docs/design.md, section 5). If both are the same fp32 weights, Ω is 1 up to
rounding and the branching score is z(H) times noise. Production samplers differ from the
trainer in two ways, and both are available here:

* **reduced precision**: the sampler holds a copy of the weights rounded to bfloat16, as an
  inference engine does while the trainer keeps fp32 (SmolLM2: logits differ by up to ~0.3).
  ``"bfloat16"`` also computes in bf16 (weights, activations and KV cache); ``"bfloat16-weights"``
  rounds the weights to bf16 but keeps them, and the compute, in float32: the weights' rounding at
  float32 speed, for CPUs without native bf16 matrix units (where bf16 matmuls run several times
  slower than fp32; docs/design.md, section 16);
* **lag** (``lag = k``): rollouts of training step ``s`` are sampled with the weights of step
  ``max(s - k, 0)``, as in asynchronous (off-policy by ``k``) rollouts.

With float32 and ``lag = 0`` the sampler *is* the policy (no copy).
"""

from __future__ import annotations

import copy
from collections import deque

import torch

# name -> (dtype the sampler's weights are stored and computed in, dtype they are rounded to)
SAMPLER_DTYPES: dict[str, tuple[torch.dtype, torch.dtype | None]] = {
    "float32": (torch.float32, None),
    "bfloat16": (torch.bfloat16, None),
    "bfloat16-weights": (torch.float32, torch.bfloat16),
}


class SamplerPolicy:
    """A copy of ``policy`` in ``dtype`` (its behaviour weights rounded through ``rounding``
    when given) whose weights trail the policy's by ``lag`` versions.

    A version is the policy's weights at the start of a training step. The trainer calls
    :meth:`before_update` once per step before its first optimizer step, and
    :meth:`use_behaviour` before sampling a step's rollouts; :meth:`use_current` loads the
    policy's present weights, unrounded (greedy evaluation; in ``dtype``), :meth:`reset` forgets
    older versions (after a cold start). Only floating parameters are cast: buffers (rotary
    frequencies) keep their dtype.
    """

    def __init__(
        self,
        policy: torch.nn.Module,
        dtype: torch.dtype,
        lag: int,
        *,
        rounding: torch.dtype | None = None,
    ):
        self.policy, self.lag, self.rounding = policy, lag, rounding
        self.shares_weights = (
            lag == 0 and rounding is None and all(p.dtype == dtype for p in policy.parameters())
        )
        if self.shares_weights:
            self.model = policy
        else:
            self.model = copy.deepcopy(policy).requires_grad_(False)
            for parameter in self.model.parameters():
                parameter.data = parameter.data.to(dtype)
        self.dtype = dtype
        self._versions: deque[list[torch.Tensor]] = deque(maxlen=lag)  # oldest first

    def reset(self) -> None:
        self._versions.clear()

    @classmethod
    def named(cls, policy: torch.nn.Module, sampler_dtype: str, lag: int = 0) -> SamplerPolicy:
        """The sampler of ``sampler_dtype``, one of :data:`SAMPLER_DTYPES`'s names."""
        dtype, rounding = SAMPLER_DTYPES[sampler_dtype]
        return cls(policy, dtype, lag, rounding=rounding)

    @torch.no_grad()
    def before_update(self) -> None:
        """Keeps the policy's present weights as a version (nothing when ``lag == 0``)."""
        if self.lag:
            self._versions.append(
                [
                    p.detach().to(self.rounding or self.dtype, copy=True)
                    for p in self.policy.parameters()
                ]
            )

    def use_behaviour(self) -> None:
        """Loads the weights rollouts sample with: ``lag`` versions back (or the oldest kept),
        rounded through ``rounding``."""
        self._load(
            self._versions[0] if self._versions else list(self.policy.parameters()),
            self.rounding,
        )

    def use_current(self) -> None:
        self._load(list(self.policy.parameters()), None)

    @torch.no_grad()
    def _load(self, weights: list[torch.Tensor], rounding: torch.dtype | None) -> None:
        if self.shares_weights:
            return
        for target, source in zip(self.model.parameters(), weights, strict=True):
            target.copy_(source if rounding is None else source.to(rounding))
