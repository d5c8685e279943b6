"""The APPO training loop (docs/design.md, section 12), the GRPO and entropy-branching
baselines in the same code, a cold-start fine-tune on demonstrations, and greedy held-out
evaluation.

One step over ``P`` prompts (``algo="appo"``), as :meth:`Trainer.step` reads:

1. **sample**: ``N`` initial rollouts per prompt with the tool loop on the paged KV cache, by the
   behaviour policy (``appo/sampler.py``: a bf16 and/or lagging copy of the weights), which
   records its log-probs;
2. **score**: one no-grad pass of the trainer's policy over them (hidden states and the LM head
   through ``linear_token_stats``: exact full-vocabulary entropy and log-probs, no ``[R, T, V]``
   logits). These log-probs are ``π_old`` of the PPO update (the policy has not moved yet), and
   against the behaviour log-probs they give the future value Ω;
3. **branch**: ``branching_score_from_stats`` and ``select_branch_points`` pick ``B`` points per
   prompt among sampled, non-whitespace tokens (preferred: ``z(H) > 0`` and ``z(Ω) > 0``); each
   branch forks its rollout's cache and continues the tool loop; every cache block is released;
4. **credit**: verifiable rewards and dual-group procedure-level advantages;
5. **update**: the trained rows in ``ppo_minibatches`` mini-batches, one AdamW step each, on the
   dual-clip PPO loss with future-likelihood scaling against ``π_old``.

``algo="grpo"`` samples ``N + B`` rollouts per prompt and does not branch (same budget);
``algo="entropy"`` branches at the top ``z(H)`` tokens (no future value, no preferred tier).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from appo.advantages import procedure_advantages
from appo.branching import BranchPlan, branch_candidates, plan_branches
from appo.config import TrainConfig
from appo.loss import KL_CLAMP, future_likelihood_scale, policy_loss
from appo.model import blank_token_table, lm_head_softcap, prompt_ids
from appo.rollout import Rollout, RolloutBatch, RolloutConfig, RolloutEngine
from appo.sampler import SamplerPolicy
from appo.tasks import Task, demonstration, reward, system_prompt
from appo.tools import observation_spans
from appo_kernels import TokenStats, discounted_future_sum, future_value, linear_token_stats
from appo_kernels.kv.hf import PagedCausalLM
from appo_kernels.validation import check_count

# KV-pool sizing: every sequence of a step (or of an evaluation batch) may hold the system turn,
# a question of up to QUESTION_TOKENS, the policy's tokens and each tool call's observation
# (up to OBSERVATION_TOKENS_PER_CALL), plus FORK_SPARE_BLOCKS for a fork's copy-on-write block.
QUESTION_TOKENS = 128
OBSERVATION_TOKENS_PER_CALL = 24
FORK_SPARE_BLOCKS = 1
OMEGA_CLIP = 0.2  # Ω's clip ε (future_value's default), for the per-step Ω diagnostics


def policy_token_stats(model: torch.nn.Module, batch: RolloutBatch) -> TokenStats:
    """Log-probs and entropies ``[R, T]`` of ``batch.tokens`` under ``model`` (differentiable),
    from the base model's final hidden states and the LM head through ``linear_token_stats``:
    the ``[R, T, V]`` logits are never built. Any causal LM that :func:`check_policy_model`
    accepts (a base model with ``last_hidden_state`` and a linear head); a soft-capped one
    (``final_logit_softcapping``, Gemma 2) is scored on its capped logits, as it samples."""
    width, length = batch.prompt_width, batch.tokens.shape[1]
    hidden = model.base_model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
    ).last_hidden_state[:, width - 1 : width - 1 + length]
    head = model.get_output_embeddings()
    return linear_token_stats(
        hidden, head.weight, batch.tokens, bias=head.bias, softcap=lm_head_softcap(model.config)
    )


def check_policy_model(model: torch.nn.Module) -> None:
    """A causal LM whose token statistics :func:`policy_token_stats` can take from hidden
    states: a base model and a linear output head; a logit soft cap is fine (it is applied),
    other logit transforms (``logit_scale`` and the like, where not 1.0) are refused
    (``appo.model.lm_head_softcap``)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear) or getattr(model, "base_model", model) is model:
        raise TypeError(
            f"model must be a transformers causal LM with a base model and a linear LM head "
            f"(Llama / Qwen2 families), got {type(model).__name__}"
        )
    lm_head_softcap(model.config)


@dataclass
class Scored:
    """The trainer policy's no-grad pass over a batch of rollouts: ``logprob`` is ``π_old``."""

    batch: RolloutBatch
    logprob: torch.Tensor  # [R, T]
    entropy: torch.Tensor  # [R, T]
    kl_to_start: float | None = None  # mean k3 KL(π_old ‖ reference) over the sampled tokens


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
    omega: dict[str, float] = field(default_factory=dict)  # omega_diagnostics of the step


def split_evenly(items: list, parts: int) -> list[list]:
    """``items`` in order, cut into at most ``parts`` non-empty runs whose sizes differ by <= 1."""
    size, extra = divmod(len(items), parts)
    runs, start = [], 0
    for part in range(parts):
        end = start + size + (part < extra)
        if end > start:
            runs.append(items[start:end])
        start = end
    return runs


def omega_diagnostics(
    logprob: torch.Tensor,
    behavior_logprob: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    clip: float = OMEGA_CLIP,
) -> dict[str, float]:
    """How much signal Ω carries over a batch's sampled tokens: the spread (std) of the summed
    future log-ratio ``G_t = Σ_{k≥t} γ^(k−t) (logπ − logπ_behaviour)_k``, the mean
    ``|log-ratio|`` per token, and the fractions of Ω at its lower and upper clip bounds."""
    valid = mask.bool()
    if not valid.any():
        return {}
    log_ratio = torch.where(valid, logprob - behavior_logprob, 0.0)
    summed = discounted_future_sum(log_ratio, valid, gamma=gamma)[valid]
    omega = future_value(logprob, behavior_logprob, valid, gamma=gamma, clip=clip)[valid]
    return {
        "omega_logratio_sum_std": float(summed.std(correction=0)),
        "logratio_abs_mean": float(log_ratio[valid].abs().mean()),
        "omega_at_low": float((omega <= 1.0 - clip).float().mean()),
        "omega_at_high": float((omega >= 1.0 + clip).float().mean()),
    }


class Trainer:
    """Owns the policy, its optimizer, the behaviour policy with its paged-cache LM, and the
    rollout engines. ``max_concurrent``: rollouts greedy evaluation runs at once (the KV pool
    holds that many, or one step's rollouts if more). ``track_kl``: keep a frozen copy of the
    policy as it starts RL (after :meth:`cold_start`) and log each step's KL to it
    (``kl_to_start``); ``kl_coef > 0`` keeps that copy anyway, as the KL penalty's reference."""

    def __init__(
        self,
        model,
        tokenizer,
        config: TrainConfig,
        *,
        reward_fn: Callable[[Task, str], float] = reward,
        max_concurrent: int = 16,
        track_kl: bool = False,
    ):
        check_policy_model(model)
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.max_concurrent = check_count("max_concurrent", max_concurrent, 1)
        self.reward_fn = reward_fn
        self.device = next(model.parameters()).device
        self.system = system_prompt()
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
        keep_reference = config.kl_coef > 0 or track_kl
        self.reference = copy.deepcopy(model).requires_grad_(False) if keep_reference else None
        self.sampler = SamplerPolicy.named(model, config.sampler_dtype, config.sampler_lag)

        per_step = config.prompts_per_step * (config.n + config.b)
        sequence_tokens = (
            len(prompt_ids(tokenizer, self.system, ""))
            + QUESTION_TOKENS
            + config.max_new_tokens
            + OBSERVATION_TOKENS_PER_CALL * config.max_tool_calls
        )
        blocks_per_sequence = -(-sequence_tokens // config.block_size) + FORK_SPARE_BLOCKS
        self.lm = PagedCausalLM(
            self.sampler.model,
            num_blocks=max(per_step, max_concurrent) * blocks_per_sequence,
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
        self.whitespace = blank_token_table(tokenizer, model.config.vocab_size).to(self.device)

    # ------------------------------------------------------------------------------------------
    def prompts(self, tasks: Sequence[Task]) -> list[list[int]]:
        return [prompt_ids(self.tokenizer, self.system, task.prompt) for task in tasks]

    def batch(self, rollouts: Sequence[Rollout]) -> RolloutBatch:
        return RolloutBatch.from_rollouts(rollouts, self.pad_id, self.device)

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
        tokens excluded, as in RL). Returns the loss of each step. The sampler starts from the
        fine-tuned weights, and so does the KL reference (if the trainer keeps one)."""
        check_count("steps", steps)
        if steps and not tasks:
            raise ValueError("tasks must hold at least one task for a cold start, got none")
        optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=self.config.cold_start_lr, weight_decay=0.0
        )
        size, losses = self.config.cold_start_batch, []
        for step in range(steps):
            chunk = [tasks[(step * size + i) % len(tasks)] for i in range(size)]
            rollouts = [
                self.demonstration_rollout(t, p) for t, p in zip(chunk, self.prompts(chunk))
            ]
            batch = self.batch(rollouts)
            logprob = policy_token_stats(self.model, batch).logprob
            mask = batch.policy_mask
            loss = -torch.where(mask, logprob, 0.0).sum() / mask.sum().clamp_min(1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
            optimizer.step()
            losses.append(float(loss.detach()))
            if progress is not None:
                progress.set_postfix(loss=f"{losses[-1]:.3f}")
                progress.update(1)
        optimizer.zero_grad(set_to_none=True)
        self.sampler.reset()
        if self.reference is not None:  # RL's reference is the fine-tuned policy
            self.reference.load_state_dict(self.model.state_dict())
        return losses

    @torch.no_grad()
    def evaluate(self, tasks: Sequence[Task]) -> dict[str, float]:
        """Greedy decoding with the tool loop (the policy's present weights, at the sampler's
        precision), ``max_concurrent`` rollouts at a time: accuracy (mean reward), tool calls
        and tokens per rollout, and the number of questions."""
        self.sampler.use_current()
        rewards, calls, tokens, batch_size = [], [], [], self.max_concurrent
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
            "questions": len(rewards),
        }

    # ------------------------------------------------------------------------------------------
    def step(self, tasks: Sequence[Task]) -> tuple[dict[str, float], StepRecord]:
        """One training step on ``tasks`` (one prompt group each). Returns metrics and a record."""
        cfg, started = self.config, time.perf_counter()
        prompts = self.prompts(tasks)
        per_prompt = cfg.n + cfg.b if cfg.algo == "grpo" else cfg.n
        self.sampler.use_behaviour()
        initial = self.engine.sample(
            [p for p in prompts for _ in range(per_prompt)],
            [g for g in range(len(prompts)) for _ in range(per_prompt)],
            self.generator,
        )
        branches, plan = [], None
        try:
            scored = self.score(initial)
            if cfg.algo != "grpo":
                plan = self.plan_branches(initial, scored, len(prompts))
                branches = self.engine.branch(
                    initial,
                    plan.points(),
                    self.generator,
                    keep_selected_token=cfg.keep_selected_token,
                )
        finally:
            self.engine.release(initial + branches)
        rollouts = initial + branches
        rewards = [
            self.reward_fn(tasks[r.group], self.tokenizer.decode(r.tokens)) for r in rollouts
        ]
        generated_at = time.perf_counter()

        advantages = self.advantages(rollouts, rewards)
        rows = [i for i, r in enumerate(rollouts) if cfg.train_branches or not r.is_branch]
        old_logprob = self.old_logprob(scored, [rollouts[i] for i in rows[len(initial) :]])
        self.sampler.before_update()
        metrics = self.ppo_update([rollouts[i] for i in rows], advantages[rows], old_logprob)

        omega = omega_diagnostics(
            scored.logprob, scored.batch.behavior_logprob, scored.batch.policy_mask
        )
        mask = scored.batch.policy_mask
        n_init = len(initial)
        if scored.kl_to_start is not None:
            metrics["kl_to_start"] = scored.kl_to_start
        metrics.update(
            entropy=float(torch.where(mask, scored.entropy, 0.0).sum() / mask.sum().clamp_min(1)),
            **omega,
            reward=sum(rewards[:n_init]) / n_init,
            reward_branches=sum(rewards[n_init:]) / len(branches) if branches else None,
            tool_calls=sum(r.tool_calls for r in rollouts) / len(rollouts),
            branches=len(branches),
            tokens_generated=sum(r.new_tokens for r in rollouts),
            fork_reused_tokens=sum(r.reused_prefix for r in branches),
            response_length=sum(len(r.tokens) for r in rollouts) / len(rollouts),
            generate_s=generated_at - started,
            update_s=time.perf_counter() - generated_at,
        )
        record = StepRecord(list(tasks), rollouts, rewards, omega=omega)
        if plan is not None:
            record.branch_points = plan.points()
            record.entropy, record.future_value = plan.entropy.cpu(), plan.future_value.cpu()
            record.score = plan.score.cpu()
        return metrics, record

    @torch.no_grad()
    def score(self, rollouts: Sequence[Rollout], *, with_kl: bool = True) -> Scored:
        """The trainer policy's log-probs (``π_old``) and entropies over ``rollouts``; with a
        reference copy (and ``with_kl``), also the mean k3 estimate of KL(π_old ‖ reference)
        over the sampled tokens (the rollouts come from the behaviour policy, ≈ π_old)."""
        batch = self.batch(rollouts)
        stats = policy_token_stats(self.model, batch)
        kl = None
        if with_kl and self.reference is not None:
            log_ratio = policy_token_stats(self.reference, batch).logprob - stats.logprob
            k3 = log_ratio.exp() - log_ratio - 1
            mask = batch.policy_mask
            kl = float(torch.where(mask, k3, 0.0).sum() / mask.sum().clamp_min(1))
        return Scored(batch, stats.logprob, stats.entropy, kl)

    def branch_candidates(self, batch: RolloutBatch) -> torch.Tensor:
        """[R, T] bool: sampled tokens that are not whitespace-only (never prompt, observation or
        padding); with ``keep_selected_token``, not a rollout's last sampled token either."""
        return branch_candidates(
            batch.policy_mask,
            batch.tokens,
            blank_tokens=self.whitespace,
            keep_selected_token=self.config.keep_selected_token,
        )

    def plan_branches(self, initial: list[Rollout], scored: Scored, groups: int) -> BranchPlan:
        """``b`` branch points per prompt group by the algorithm's rule (``appo.branching``):
        APPO ranks by ``z(H) · z(Ω)`` (preferred: both > 0), entropy-only by ``z(H)``."""
        batch = scored.batch
        return plan_branches(
            self.config.algo,
            entropy=scored.entropy,
            logprob=scored.logprob,
            behavior_logprob=batch.behavior_logprob,
            mask=batch.policy_mask,
            candidates=self.branch_candidates(batch),
            group_ids=torch.tensor([r.group for r in initial], device=self.device),
            budget=self.config.b,
            num_groups=groups,
            observation_mask=batch.observation_mask,
            generator=self.generator,
        )

    def advantages(self, rollouts: list[Rollout], rewards: list[float]) -> torch.Tensor:
        """Procedure-level token advantages ``[R, T]`` of every rollout (docs/design.md, 8)."""
        device = self.device
        return procedure_advantages(
            torch.tensor(rewards, device=device),
            torch.tensor([r.group for r in rollouts], device=device),
            torch.tensor([r.is_branch for r in rollouts], device=device),
            torch.tensor([r.parent for r in rollouts], device=device),
            torch.tensor([r.split for r in rollouts], device=device),
            self.batch(rollouts).policy_mask,
            train_branches=self.config.train_branches,
            std=self.config.advantage_std,
        )

    def old_logprob(self, scored: Scored, trained_branches: list[Rollout]) -> torch.Tensor:
        """``π_old`` ``[R, T]`` of the trained rows: the initial rollouts' from the scoring pass
        (the same weights), then the trained branches', scored now."""
        if not trained_branches:
            return scored.logprob
        extra = self.score(trained_branches, with_kl=False).logprob
        width = max(scored.logprob.shape[1], extra.shape[1])
        pad = torch.nn.functional.pad
        return torch.cat(
            [pad(lp, (0, width - lp.shape[1])) for lp in (scored.logprob, extra)], dim=0
        )

    def ppo_update(
        self, rollouts: list[Rollout], advantages: torch.Tensor, old_logprob: torch.Tensor
    ) -> dict[str, float]:
        """The PPO update on one rollout batch: its rows in ``ppo_minibatches`` mini-batches (in
        order), one optimizer step each. ``advantages`` and ``old_logprob`` are ``[R, >= T]``
        rows of ``rollouts``. A mini-batch whose loss is exactly 0 (every advantage 0, no KL)
        takes no step. Returns the mean of each step's metrics and ``updated``, the step count."""
        steps = []
        rows = list(range(len(rollouts)))
        for chunk in split_evenly(rows, self.config.ppo_minibatches):
            if not advantages[chunk].any() and self.config.kl_coef == 0:
                continue
            batch = self.batch([rollouts[i] for i in chunk])
            length = batch.tokens.shape[1]
            steps.append(
                self.optimizer_step(batch, advantages[chunk, :length], old_logprob[chunk, :length])
            )
        if not steps:
            return {"loss": 0.0, "grad_norm": 0.0, "updated": 0.0}
        metrics = {name: sum(s[name] for s in steps) / len(steps) for name in steps[0]}
        return {**metrics, "updated": float(len(steps))}

    def optimizer_step(
        self, batch: RolloutBatch, advantages: torch.Tensor, old_logprob: torch.Tensor
    ) -> dict[str, float]:
        """One AdamW step on the loss of one mini-batch."""
        cfg = self.config
        mask = batch.policy_mask
        logprob = policy_token_stats(self.model, batch).logprob
        ref_logprob = None
        if cfg.kl_coef > 0:
            with torch.no_grad():
                ref_logprob = policy_token_stats(self.reference, batch).logprob
        scaled = future_likelihood_scale(advantages, logprob, old_logprob, mask)
        loss, loss_metrics = policy_loss(
            logprob,
            old_logprob,
            scaled,
            mask,
            ref_logprob=ref_logprob,
            kl_coef=cfg.kl_coef,
            kl_clamp=KL_CLAMP if cfg.clamp_kl else None,
            max_dual_clipped_per_row=1 if cfg.drop_dual_clipped_rows else None,
        )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        kept = ("clip_frac_high", "clip_frac_low", "dual_clip_frac", "ratio_mean", "ratio_max")
        return {
            "loss": float(loss.detach()),
            "grad_norm": grad_norm,
            "rows_dropped": loss_metrics["rows_dropped"],
            **{name: loss_metrics[name] for name in kept},
            **({"kl": loss_metrics["kl"]} if "kl" in loss_metrics else {}),
        }
