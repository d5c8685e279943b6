"""The behaviour policy: the weights the rollout engine samples with.

APPO's future value Ω compares the trainer's log-probs with the behaviour log-probs of the policy
that sampled (docs/design.md, section 5). If both are the same fp32 weights, Ω is 1 up to
rounding and the branching score is z(H) times noise. Production samplers differ from the
trainer in two ways, and both are available here:

* **reduced precision** (``dtype``): the sampler holds a bfloat16 copy of the weights, as an
  inference engine does while the trainer keeps fp32 (SmolLM2: logits differ by up to ~0.3);
* **lag** (``lag = k``): rollouts of training step ``s`` are sampled with the weights of step
  ``max(s - k, 0)``, as in asynchronous (off-policy by ``k``) rollouts.

With ``dtype`` equal to the policy's and ``lag = 0`` the sampler *is* the policy (no copy).
"""

from __future__ import annotations

import copy
from collections import deque

import torch

SAMPLER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class SamplerPolicy:
    """A copy of ``policy`` in ``dtype`` whose weights trail the policy's by ``lag`` versions.

    A version is the policy's weights at the start of a training step. The trainer calls
    :meth:`before_update` once per step before its first optimizer step, and
    :meth:`use_behaviour` before sampling a step's rollouts; :meth:`use_current` loads the
    policy's present weights (greedy evaluation), :meth:`reset` forgets older versions (after a
    cold start). Only floating parameters are cast: buffers (rotary frequencies) keep their dtype.
    """

    def __init__(self, policy: torch.nn.Module, dtype: torch.dtype, lag: int):
        self.policy, self.lag = policy, lag
        self.shares_weights = lag == 0 and all(p.dtype == dtype for p in policy.parameters())
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

    @torch.no_grad()
    def before_update(self) -> None:
        """Keeps the policy's present weights as a version (nothing when ``lag == 0``)."""
        if self.lag:
            self._versions.append(
                [p.detach().to(self.dtype, copy=True) for p in self.policy.parameters()]
            )

    def use_behaviour(self) -> None:
        """Loads the weights rollouts sample with: ``lag`` versions back (or the oldest kept)."""
        self._load(self._versions[0] if self._versions else list(self.policy.parameters()))

    def use_current(self) -> None:
        self._load(list(self.policy.parameters()))

    @torch.no_grad()
    def _load(self, weights: list[torch.Tensor]) -> None:
        if self.shares_weights:
            return
        for target, source in zip(self.model.parameters(), weights, strict=True):
            target.copy_(source)
