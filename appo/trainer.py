"""The APPO training loop (docs/design.md, section 12), the GRPO and entropy-branching
baselines in the same code, a cold-start fine-tune on demonstrations, and greedy held-out
evaluation.

One step over ``P`` prompts (``algo="appo"``):

1. ``N`` initial rollouts per prompt with the tool loop on the paged KV cache (behaviour
   log-probs recorded);
2. one no-grad forward of the current policy over them; ``token_stats`` (exact full-vocabulary
   entropy, log-probs) and ``branching_score_from_stats`` score every token;
3. ``select_branch_points`` picks ``B`` points per prompt among sampled, non-whitespace tokens
   (preferred: ``z(H) > 0`` and ``z(Ω) > 0``); each branch forks its rollout's cache and
   continues the tool loop; then every cache block is released;
4. verifiable rewards, dual-group procedure-level advantages, future-likelihood scaling, the
   dual-clip PPO loss on log-probs from ``token_stats`` (backward through the kernel), AdamW.

``algo="grpo"`` samples ``N + B`` rollouts per prompt and does not branch (same budget);
``algo="entropy"`` branches at the top ``z(H)`` tokens (no future value, no preferred tier).
``π_old`` is the behaviour policy (the log-probs recorded while sampling): one optimizer step per
batch of rollouts, so the ratio measures sampler/trainer mismatch (e.g. a bf16 cache).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from appo.advantages import procedure_advantages
from appo.loss import future_likelihood_scale, policy_loss
from appo.model import prompt_ids
from appo.rollout import Rollout, RolloutBatch, RolloutConfig, RolloutEngine
from appo.tasks import Task, demonstration, reward, system_prompt
from appo.tools import observation_spans
from appo_kernels import branching_score_from_stats, select_branch_points, token_stats
from appo_kernels.kv.hf import PagedCausalLM

ALGOS = ("appo", "grpo", "entropy")


@dataclass
class TrainConfig:
    algo: str = "appo"
    prompts_per_step: int = 2
    n: int = 4  # initial rollouts per prompt
    b: int = 2  # branches per prompt (GRPO: extra rollouts, same budget)
    lr: float = 1e-5
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    max_new_tokens: int = 64
    max_tool_calls: int = 4
    keep_selected_token: bool = False
    train_branches: bool = False
    kl_coef: float = 0.0  # > 0 keeps a frozen reference copy and adds its k3 KL
    cold_start_lr: float = 1e-4
    cold_start_batch: int = 4
    seed: int = 0
    block_size: int = 16

    def __post_init__(self):
        if self.algo not in ALGOS:
            raise ValueError(f"algo must be one of {ALGOS}, got {self.algo!r}")
        for name in ("prompts_per_step", "n", "b", "max_new_tokens", "cold_start_batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if (
            isinstance(self.max_tool_calls, bool)
            or not isinstance(self.max_tool_calls, int)
            or self.max_tool_calls < 0
        ):
            raise ValueError(f"max_tool_calls must be an int >= 0, got {self.max_tool_calls!r}")
        if not self.lr > 0 or not self.cold_start_lr > 0:
            raise ValueError(
                f"lr and cold_start_lr must be > 0, got {self.lr}, {self.cold_start_lr}"
            )


@dataclass
class StepRecord:
    """What one step produced, for the report's rollout-tree trace."""

    tasks: list[Task]
    rollouts: list[Rollout]
    rewards: list[float]
    branch_points: list[tuple[int, int]] = field(default_factory=list)
    entropy: torch.Tensor | None = None  # [N·P, T] of the initial rollouts (branching algos)
    future_value: torch.Tensor | None = None
    score: torch.Tensor | None = None


class Trainer:
    """Owns the policy, its optimizer, the paged-cache LM and the rollout engines."""

    def __init__(
        self,
        model,
        tokenizer,
        config: TrainConfig,
        *,
        reward_fn: Callable[[Task, str], float] = reward,
        max_concurrent: int = 16,
    ):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.reward_fn = reward_fn
        self.device = next(model.parameters()).device
        self.system = system_prompt()
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
        self.reference = copy.deepcopy(model).requires_grad_(False) if config.kl_coef > 0 else None

        per_step = config.prompts_per_step * (config.n + config.b)
        prompt_budget = len(prompt_ids(tokenizer, self.system, "")) + 128
        seq_tokens = prompt_budget + config.max_new_tokens + 24 * config.max_tool_calls
        blocks_per_seq = -(-seq_tokens // config.block_size) + 1
        self.lm = PagedCausalLM(
            model,
            num_blocks=max(per_step, max_concurrent) * blocks_per_seq,
            block_size=config.block_size,
        )
        rollout_config = RolloutConfig(
            max_new_tokens=config.max_new_tokens, max_tool_calls=config.max_tool_calls
        )
        self.engine = RolloutEngine(self.lm, tokenizer, rollout_config)
        self.greedy_engine = RolloutEngine(
            self.lm,
            tokenizer,
            RolloutConfig(config.max_new_tokens, config.max_tool_calls, greedy=True),
        )
        self.generator = torch.Generator(self.device).manual_seed(config.seed)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        vocab = model.config.vocab_size
        texts = tokenizer.batch_decode([[i] for i in range(min(vocab, len(tokenizer)))])
        blank = [not text.strip() for text in texts] + [True] * (vocab - len(texts))
        self.whitespace = torch.tensor(blank, device=self.device)

    # ------------------------------------------------------------------------------------------
    def prompts(self, tasks: Sequence[Task]) -> list[list[int]]:
        return [prompt_ids(self.tokenizer, self.system, task.prompt) for task in tasks]

    def demonstration_rollout(self, task: Task, prompt: list[int]) -> Rollout:
        """The ideal response as a rollout: text segments the policy would write, and
        observation segments tokenised on their own, as the tool loop appends them."""
        text = demonstration(task)
        rollout, cursor = Rollout(group=0, prompt=prompt), 0
        for start, end in observation_spans(text) + [(len(text), len(text))]:
            for segment, observation in ((text[cursor:start], False), (text[start:end], True)):
                if segment:
                    rollout.append(
                        self.tokenizer.encode(segment, add_special_tokens=False), observation
                    )
            cursor = end
        return rollout

    def cold_start(self, tasks: Sequence[Task], steps: int, progress=None) -> list[float]:
        """Supervised fine-tune on demonstrations (loss on the policy's tokens only; observation
        tokens excluded, as in RL). Returns the loss of each step."""
        optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=self.config.cold_start_lr, weight_decay=0.0
        )
        size, losses = self.config.cold_start_batch, []
        for step in range(steps):
            chunk = [tasks[(step * size + i) % len(tasks)] for i in range(size)]
            rollouts = [
                self.demonstration_rollout(t, p) for t, p in zip(chunk, self.prompts(chunk))
            ]
            batch = RolloutBatch.from_rollouts(rollouts, self.pad_id, self.device)
            stats = token_stats(batch.response_logits(self.model), batch.tokens)
            mask = batch.policy_mask
            loss = -torch.where(mask, stats.logprob, 0.0).sum() / mask.sum().clamp_min(1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
            optimizer.step()
            losses.append(float(loss.detach()))
            if progress is not None:
                progress.set_postfix(loss=f"{losses[-1]:.3f}")
                progress.update(1)
        optimizer.zero_grad(set_to_none=True)
        return losses

    @torch.no_grad()
    def evaluate(self, tasks: Sequence[Task], batch_size: int = 16) -> dict[str, float]:
        """Greedy decoding with the tool loop: accuracy (mean reward), tool calls and tokens per
        rollout."""
        rewards, calls, tokens = [], [], []
        for start in range(0, len(tasks), batch_size):
            chunk = list(tasks[start : start + batch_size])
            rollouts = self.greedy_engine.sample(self.prompts(chunk), range(len(chunk)))
            self.greedy_engine.release(rollouts)
            for task, r in zip(chunk, rollouts):
                rewards.append(self.reward_fn(task, self.tokenizer.decode(r.tokens)))
                calls.append(r.tool_calls)
                tokens.append(r.generated)
        count = max(len(rewards), 1)
        return {
            "accuracy": sum(rewards) / count,
            "tool_calls": sum(calls) / count,
            "tokens": sum(tokens) / count,
        }

    # ------------------------------------------------------------------------------------------
    def step(self, tasks: Sequence[Task]) -> tuple[dict[str, float], StepRecord]:
        """One training step on ``tasks`` (one prompt group each). Returns metrics and a record."""
        cfg, started = self.config, time.perf_counter()
        prompts = self.prompts(tasks)
        per_prompt = cfg.n + cfg.b if cfg.algo == "grpo" else cfg.n
        initial = self.engine.sample(
            [p for p in prompts for _ in range(per_prompt)],
            [g for g in range(len(prompts)) for _ in range(per_prompt)],
            self.generator,
        )
        record = StepRecord(list(tasks), initial, [])
        branches: list[Rollout] = []
        try:
            if cfg.algo != "grpo":
                branches = self._branch(initial, len(prompts), record)
        finally:
            self.engine.release(initial + branches)
        rollouts = initial + branches
        record.rollouts = rollouts
        record.rewards = [
            self.reward_fn(tasks[r.group], self.tokenizer.decode(r.tokens)) for r in rollouts
        ]
        generated_at = time.perf_counter()

        metrics = self._update(rollouts, record.rewards)
        n_init = len(initial)
        metrics.update(
            reward=sum(record.rewards[:n_init]) / n_init,
            reward_branches=sum(record.rewards[n_init:]) / len(branches) if branches else None,
            tool_calls=sum(r.tool_calls for r in rollouts) / len(rollouts),
            branches=len(branches),
            tokens_generated=sum(r.new_tokens for r in rollouts),
            fork_reused_tokens=sum(r.reused_prefix for r in branches),
            response_length=sum(len(r.tokens) for r in rollouts) / len(rollouts),
            generate_s=generated_at - started,
            update_s=time.perf_counter() - generated_at,
        )
        return metrics, record

    def branch_candidates(self, batch: RolloutBatch, rollouts: Sequence[Rollout]) -> torch.Tensor:
        """[R, T] bool: sampled tokens that are not whitespace-only (never prompt, observation or
        padding); with ``keep_selected_token``, not a rollout's last token either (keeping it
        would leave nothing to re-sample)."""
        candidates = batch.policy_mask & ~self.whitespace[batch.tokens.clamp_min(0)]
        if self.config.keep_selected_token:
            last = torch.tensor([len(r.tokens) - 1 for r in rollouts], device=self.device)
            candidates[torch.arange(len(rollouts), device=self.device), last.clamp_min(0)] = False
        return candidates

    def _branch(self, initial: list[Rollout], groups: int, record: StepRecord) -> list[Rollout]:
        cfg = self.config
        batch = RolloutBatch.from_rollouts(initial, self.pad_id, self.device)
        with torch.no_grad():
            stats = token_stats(batch.response_logits(self.model), batch.tokens)
        bs = branching_score_from_stats(
            stats.entropy, stats.logprob, batch.behavior_logprob, batch.policy_mask
        )
        candidates = self.branch_candidates(batch, initial)
        if cfg.algo == "appo":
            score, preferred = bs.score, (bs.z_entropy > 0) & (bs.z_future > 0)
        else:  # entropy-only branching: rank by z(H) alone
            score = torch.where(batch.policy_mask, bs.z_entropy, float("-inf"))
            preferred = None
        group_ids = torch.tensor([r.group for r in initial], device=self.device)
        points = select_branch_points(
            score, candidates, group_ids, cfg.b, preferred=preferred, num_groups=groups
        )
        pairs = [
            (r, t)
            for r, t in zip(points.rows.flatten().tolist(), points.positions.flatten().tolist())
            if r >= 0
        ]
        record.branch_points = pairs
        record.entropy, record.future_value, record.score = (
            bs.entropy.cpu(),
            bs.future_value.cpu(),
            score.cpu(),
        )
        return self.engine.branch(
            initial, pairs, self.generator, keep_selected_token=cfg.keep_selected_token
        )

    def _update(self, rollouts: list[Rollout], rewards: list[float]) -> dict[str, float]:
        """Advantages, loss and one optimizer step on the trained rows."""
        cfg, device = self.config, self.device
        full = RolloutBatch.from_rollouts(rollouts, self.pad_id, device)
        advantages = procedure_advantages(
            torch.tensor(rewards, device=device),
            torch.tensor([r.group for r in rollouts], device=device),
            torch.tensor([r.is_branch for r in rollouts], device=device),
            torch.tensor([r.parent for r in rollouts], device=device),
            torch.tensor([r.split for r in rollouts], device=device),
            full.policy_mask,
            train_branches=cfg.train_branches,
        )
        rows = [i for i, r in enumerate(rollouts) if cfg.train_branches or not r.is_branch]
        if len(rows) == len(rollouts):  # every row is trained on: that batch is ``full``
            batch = full
        else:  # without the branch rows (narrower padding)
            batch = RolloutBatch.from_rollouts([rollouts[i] for i in rows], self.pad_id, device)
        advantages = advantages[rows][:, : batch.tokens.shape[1]]
        mask = batch.policy_mask
        learns = bool(advantages.abs().max() > 0) or self.reference is not None

        with torch.set_grad_enabled(learns):
            stats = token_stats(batch.response_logits(self.model), batch.tokens)
        entropy = float(
            torch.where(mask, stats.entropy.detach(), 0.0).sum() / mask.sum().clamp_min(1)
        )
        if not learns:  # every group has equal rewards: the loss and its gradient are exactly 0
            return {"loss": 0.0, "entropy": entropy, "grad_norm": 0.0, "updated": 0.0}
        ref_logprob = None
        if self.reference is not None:
            with torch.no_grad():
                ref_logprob = token_stats(
                    batch.response_logits(self.reference), batch.tokens
                ).logprob
        scaled = future_likelihood_scale(advantages, stats.logprob, batch.behavior_logprob, mask)
        loss, loss_metrics = policy_loss(
            stats.logprob,
            batch.behavior_logprob,
            scaled,
            mask,
            ref_logprob=ref_logprob,
            kl_coef=cfg.kl_coef,
        )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {
            "loss": float(loss.detach()),
            "entropy": entropy,
            "grad_norm": grad_norm,
            "updated": 1.0,
            **{
                k: v for k, v in loss_metrics.items() if k in ("clip_frac_high", "ratio_mean", "kl")
            },
        }
