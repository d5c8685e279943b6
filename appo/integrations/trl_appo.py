"""APPO inside TRL: ``APPOConfig(trl.GRPOConfig)`` and ``APPOTrainer(trl.GRPOTrainer)`` (trl 1.16),
on one process or many (docs/design.md, section 17).

One training step with ``branch_budget`` = B > 0 runs inside TRL's own
``_generate_and_score_completions``:

1. **initial rollouts**: TRL generates ``num_generations`` = N rollouts per prompt, with its
   multi-turn tool loop (``tools``, ``environment_factory``), and scores them with the user's
   reward functions. vLLM (colocate or server mode) samples with its own log-probs; without vLLM,
   TRL's ``_generate_single_turn`` runs on the paged KV cache (``appo_kernels.kv``) with a bf16
   copy of the policy (``appo.sampler.SamplerPolicy``) that records its sampling log-probs, and
   every sequence's cache is kept until the step's branches are done;
2. **branch points**: one no-grad pass of the policy through ``linear_token_stats``
   (``KernelGRPOTrainer``'s) gives π_old and exact entropies; the per-row statistics of every
   process are gathered, and ``appo.branching.plan_branches`` picks B points per prompt group of
   the global batch (the same points on every process, as a one-process run would pick);
3. **branch rollouts**: each process continues its share of the points (at its parents' process
   where it can) from prompt + prefix tokens through TRL's ``_generate_single_turn``, and through
   TRL's ``_tool_call_loop`` when the continued turn calls a tool (a call that straddles the split
   runs: the whole turn is parsed); on the transformers path the prefix is forked from the
   parent's cache (nothing is prefilled but the token before the split), vLLM gets token-id
   prompts for its prefix cache; an environment is reset and its calls before the split replayed;
4. **credit**: branch rewards through TRL's ``_calculate_rewards``, then
   ``appo.advantages.procedure_advantages`` on the gathered rewards of the global tree; branch rows
   are trained on only with ``train_branches``;
5. **loss**: TRL's ``_compute_loss`` (its ``loss_type`` aggregation, ``beta``, ``num_iterations``,
   ``steps_per_generation``) on APPO's future-likelihood-scaled advantages, with TRL's ``delta`` as
   the dual clip, rows with more than one dual-clipped token dropped and the k3 KL clamped.

``branch_budget=0`` is ``trl.GRPOTrainer``: every method defers to it, the model's log-probs
included. The APPO step reads TRL 1.16's internals (``_generate``, ``_tool_call_loop``,
``_calculate_rewards``, ``_logs``), hence the pinned minor version.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import inspect
import math
import sys
import time
import warnings
from collections import defaultdict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

try:
    from accelerate.utils import gather_object
    from transformers import ProcessorMixin
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )
    from trl import GRPOConfig, GRPOTrainer
    from trl.chat_template_utils import parse_response
    from trl.data_utils import is_conversational
    from trl.models import unwrap_model_for_generation
    from trl.models.utils import disable_gradient_checkpointing
    from trl.trainer.utils import pad, use_adapter
except ImportError as error:  # pragma: no cover - exercised in an environment without trl
    raise ImportError(
        "appo.integrations.trl_appo needs trl 1.16: pip install 'appo-kernels[trl]'"
    ) from error

import torch

from appo.advantages import STD_CONVENTIONS, procedure_advantages
from appo.branching import RULES, branch_candidates, plan_branches
from appo.integrations.trl import KernelGRPOTrainer
from appo.loss import KL_CLAMP, LOG_RATIO_BOUND, future_likelihood_scale
from appo.model import blank_token_table, lm_head_softcap
from appo.rollout import RolloutConfig, RolloutEngine
from appo.sampler import SAMPLER_DTYPES, SamplerPolicy
from appo.trainer import omega_diagnostics
from appo_kernels.kv.hf import PagedCausalLM
from appo_kernels.validation import (
    check_count,
    check_fraction,
    check_gamma,
    check_nonneg,
    check_positive,
)

# TRL loss types whose per-token loss is the clipped ratio surrogate that APPO's dual clip bounds
PPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
KV_BLOCK_SIZE = 16


def _kl_clamp_bounds() -> tuple[float, float]:
    """The two differences ``d`` at which the k3 KL ``exp(d) - d - 1`` equals ``KL_CLAMP``."""
    bounds = []
    for d in (3.0, -KL_CLAMP - 1.0):  # Newton from either side of the minimum at d = 0
        for _ in range(60):
            d -= (math.exp(d) - d - 1.0 - KL_CLAMP) / (math.exp(d) - 1.0)
        bounds.append(d)
    return bounds[1], bounds[0]


KL_LOW, KL_HIGH = _kl_clamp_bounds()


@dataclass
class APPOConfig(GRPOConfig):
    """``trl.GRPOConfig`` with APPO's options (docs/design.md, sections 5-9 and 17).

    ``num_generations`` is N, the initial rollouts per prompt; ``branch_budget`` is B, the branch
    points per prompt group (0: ``trl.GRPOTrainer``). GRPOConfig fields that mean the same keep
    their TRL names: ``epsilon`` / ``epsilon_high`` are the clip range (APPO's 0.2 / 0.28 by
    default), ``delta`` the dual clip (APPO's 3), ``scale_rewards`` ``"group"`` or ``"none"``,
    ``beta`` the KL coefficient, ``temperature`` and ``top_*`` the sampling.
    """

    branch_budget: int = field(
        default=2,
        metadata={"help": "Branch points per prompt group (B); 0 trains with trl.GRPOTrainer."},
    )
    branching: str = field(
        default="appo",
        metadata={"help": f"Branch-point rule, one of appo.branching.RULES {RULES}."},
    )
    gamma: float = field(default=1.0, metadata={"help": "Discount of the future value Ω."})
    omega_clip: float = field(default=0.2, metadata={"help": "Clip ε of the future value Ω."})
    keep_selected_token: bool = field(
        default=False,
        metadata={"help": "Branches keep the selected token and re-sample from the next one."},
    )
    train_branches: bool = field(
        default=False, metadata={"help": "Train on branch rows (their own advantage)."}
    )
    scale_c: float = field(default=3.0, metadata={"help": "Future-likelihood scaling: c."})
    scale_half_life: float = field(
        default=64.0, metadata={"help": "Future-likelihood scaling: half-life in tokens."}
    )
    scale_clip: float = field(default=0.2, metadata={"help": "Future-likelihood scaling: clip."})
    scale_clip_high_only: bool = field(
        default=True, metadata={"help": "Future-likelihood scaling: clip to [1, 1 + clip]."}
    )
    scale_neg_ratio_cap: float = field(
        default=6.0, metadata={"help": "Future-likelihood scaling: negative-advantage ratio cap."}
    )
    scale_bonus: float = field(
        default=1.0, metadata={"help": "Future-likelihood scaling: bonus b in A (1 + b f)."}
    )
    drop_dual_clipped_rows: bool = field(
        default=True,
        metadata={"help": "Drop rows with more than one dual-clipped token from the loss."},
    )
    clamp_kl: bool = field(
        default=True, metadata={"help": "Clamp each token's k3 KL to [-10, 10] (with beta > 0)."}
    )
    advantage_std: str = field(
        default="population",
        metadata={"help": "Group std of the advantages: population or sample (n - 1)."},
    )
    sampler_dtype: str = field(
        default="bfloat16",
        metadata={
            "help": "Behaviour policy copy that samples without vLLM, one of "
            "appo.sampler.SAMPLER_DTYPES ('bfloat16-weights': bf16-rounded weights, float32 math)."
        },
    )
    epsilon_high: float | None = field(
        default=0.28, metadata={"help": "Upper clip range (clip-higher)."}
    )
    delta: float | None = field(
        default=3.0, metadata={"help": "Dual clip: bound of the loss of negative advantages."}
    )

    def __post_init__(self):
        # before GRPOConfig's checks, so that each message names its argument
        check_count("num_generations", self.num_generations, minimum=2)
        check_count("branch_budget", self.branch_budget)
        if self.branching not in RULES:
            raise ValueError(f"branching must be one of {RULES}, got {self.branching!r}")
        check_gamma("gamma", self.gamma)
        check_fraction("omega_clip", self.omega_clip)
        for name in ("scale_c", "scale_half_life", "scale_neg_ratio_cap"):
            check_positive(name, getattr(self, name))
        check_fraction("scale_clip", self.scale_clip)
        check_nonneg("scale_bonus", self.scale_bonus)
        flags = ("keep_selected_token", "train_branches", "scale_clip_high_only")
        for name in flags + ("drop_dual_clipped_rows", "clamp_kl"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {type(getattr(self, name)).__name__}")
        conventions = tuple(c for c in STD_CONVENTIONS if c != "none")  # "none": scale_rewards
        if self.advantage_std not in conventions:
            raise ValueError(
                f"advantage_std must be one of {conventions}, got {self.advantage_std!r}"
            )
        if self.sampler_dtype not in SAMPLER_DTYPES:
            raise ValueError(
                f"sampler_dtype must be one of {tuple(SAMPLER_DTYPES)}, got {self.sampler_dtype!r}"
            )
        super().__post_init__()
        if self.branch_budget:
            self._check_branching_setup()

    def _check_branching_setup(self) -> None:
        """What APPO needs of the rest of the config when it branches (B > 0)."""
        if self.delta is not None and check_positive("delta", self.delta) <= 1.0:
            raise ValueError(f"delta (the dual clip) must be > 1 or None, got {self.delta}")
        if self.loss_type not in PPO_LOSS_TYPES:
            raise ValueError(
                f"loss_type must be one of {PPO_LOSS_TYPES} with branch_budget > 0 (APPO's dual "
                f"clip bounds the clipped-ratio loss), got {self.loss_type!r}"
            )
        if self.scale_rewards not in ("group", "none"):
            raise ValueError(
                "scale_rewards must be 'group' or 'none' with branch_budget > 0 (advantages are "
                f"normalised per prompt group and rollout kind), got {self.scale_rewards!r}"
            )
        if self.multi_objective_aggregation != "sum_then_normalize":
            raise ValueError(
                "multi_objective_aggregation must be 'sum_then_normalize' with branch_budget > 0, "
                f"got {self.multi_objective_aggregation!r}"
            )
        if self.use_transformers_continuous_batching:
            raise ValueError(
                "use_transformers_continuous_batching must be False with branch_budget > 0: "
                "without vLLM the rollouts are sampled on APPO's paged KV cache"
            )
        if not self.use_vllm and self.generation_kwargs:
            raise ValueError(
                "generation_kwargs must be empty with branch_budget > 0 and use_vllm=False (the "
                "paged-cache sampler applies temperature, top_k, top_p, min_p and "
                f"repetition_penalty only), got keys {sorted(self.generation_kwargs)}"
            )
        rows = self.per_device_train_batch_size * self.steps_per_generation
        if rows * self.branch_budget % self.num_generations:
            raise ValueError(
                f"branch_budget ({self.branch_budget}) times the rows of a process's generation "
                f"batch ({rows}) must be divisible by num_generations ({self.num_generations}), "
                "so that every process continues the same number of branches"
            )
        if self.train_branches:
            if self.per_device_train_batch_size * self.branch_budget % self.num_generations:
                raise ValueError(
                    f"with train_branches, branch_budget ({self.branch_budget}) times "
                    f"per_device_train_batch_size ({self.per_device_train_batch_size}) must be "
                    f"divisible by num_generations ({self.num_generations}), so that the branch "
                    "rows split evenly over steps_per_generation"
                )
            if self.use_vllm and self.vllm_importance_sampling_correction:
                raise ValueError(
                    "train_branches needs vllm_importance_sampling_correction=False (branch rows "
                    "carry no importance-sampling ratio)"
                )


def _stream(*key: object) -> torch.Generator:
    """A CPU generator seeded by a stable hash of ``key`` (the same on every process and run)."""
    digest = hashlib.sha256(":".join(map(str, key)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def assign_branches(owners: Sequence[int], num_processes: int, capacity: int) -> list[int]:
    """The process that continues each branch: its parent's (``owners[b]``) while that process
    has room for fewer than ``capacity`` branches, else the first process with room, in order.
    The same on every process; no process gets more than ``capacity``."""
    if len(owners) > num_processes * capacity:
        raise ValueError(f"{len(owners)} branches do not fit {num_processes} x {capacity}")
    load = [0] * num_processes
    assigned = [-1] * len(owners)
    for b, owner in enumerate(owners):
        if load[owner] < capacity:
            assigned[b] = owner
            load[owner] += 1
    for b in range(len(owners)):
        if assigned[b] < 0:
            process = next(p for p in range(num_processes) if load[p] < capacity)
            assigned[b] = process
            load[process] += 1
    return assigned


def _processors(trainer: GRPOTrainer) -> LogitsProcessorList:
    """transformers' own logits processors for TRL's sampling settings, in generate's order."""
    processors = LogitsProcessorList()
    if trainer.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(trainer.repetition_penalty))
    if trainer.temperature != 1.0:
        processors.append(TemperatureLogitsWarper(trainer.temperature))
    if trainer.top_k:
        processors.append(TopKLogitsWarper(trainer.top_k))
    if trainer.top_p < 1.0:
        processors.append(TopPLogitsWarper(trainer.top_p))
    if trainer.min_p:
        processors.append(MinPLogitsWarper(trainer.min_p))
    return processors


class PagedSampler:
    """The behaviour policy of the transformers path: a copy of the policy in ``sampler_dtype``
    (``SamplerPolicy``) on a ``PagedCausalLM``, driven by ``RolloutEngine`` without its own tool
    loop (TRL renders tool turns). Within a step every sequence stays cached; a request whose
    tokens start with part of a cached one (a tool turn's continuation, a branch's prefix) forks
    that part and feeds only the rest (``RolloutEngine.resume``). ``release`` frees the step.

    Each request's budget is TRL's: ``max_completion_length`` minus the completion tokens its
    prompt already holds (counted from the step's first request it descends from)."""

    def __init__(self, trainer: APPOTrainer):
        self.trainer = trainer
        self.policy: SamplerPolicy | None = None
        self.engine: RolloutEngine | None = None
        self.live: list = []  # rollouts of this step that hold a cache sequence
        self.origin: dict[int, int] = {}  # id(rollout) -> length of the first prompt it extends
        self.reused: list[int] = []  # per request of the last call: forked prompt tokens

    @contextlib.contextmanager
    def _policy_weights(self):
        """The policy's full weights, as TRL's generate sees them (DeepSpeed, FSDP)."""
        trainer = self.trainer
        with (
            unwrap_model_for_generation(
                trainer.model_wrapped,
                trainer.accelerator,
                gather_deepspeed3_params=trainer.args.ds3_gather_for_generation,
                gradient_checkpointing_kwargs=trainer.args.gradient_checkpointing_kwargs,
            ) as unwrapped,
            torch.no_grad(),
            trainer._dist.summon_full_params(trainer.model_wrapped, recurse=False),
        ):
            yield unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped

    def refresh(self) -> None:
        """Loads the policy's present weights into the sampler (at the start of a step)."""
        with self._policy_weights() as policy:
            if self.policy is None:
                self.policy = SamplerPolicy.named(policy, self.trainer.args.sampler_dtype)
                if not self.policy.shares_weights:
                    # TRL patched the policy's forward with its fused LM head, a closure over
                    # the policy itself: the copy takes its class's forward back
                    self.policy.model.__dict__.pop("forward", None)
                    self.policy.model.eval()
                    if getattr(self.policy.model, "is_gradient_checkpointing", False):
                        self.policy.model.gradient_checkpointing_disable()
                self._build_engine()
            self.policy.use_behaviour()

    def _build_engine(self) -> None:
        trainer = self.trainer
        lm = PagedCausalLM(self.policy.model, num_blocks=1, block_size=KV_BLOCK_SIZE)
        config = RolloutConfig(
            max_new_tokens=trainer.max_completion_length, temperature=1.0, use_tools=False
        )
        processors = _processors(trainer)

        def process(logits, rollouts):
            if not processors:
                return logits
            contexts = [torch.tensor(r.prompt + r.tokens) for r in rollouts]
            ids = torch.nn.utils.rnn.pad_sequence(contexts, batch_first=True, padding_value=-1)
            ids = torch.where(ids < 0, ids[:, :1], ids).to(logits.device)  # pad: a seen token
            return processors(ids, logits)

        self.engine = RolloutEngine(lm, trainer._tokenizer, config, logits_processor=process)
        self.engine.stop_ids = set(trainer.eos_token_ids)

    def _match(self, prompt: list[int]):
        """``(parent, owner)``: the live rollout that shares the longest cached prefix with
        ``prompt`` (its cache is forked; None if none shares a token), and the one with the
        longest among those whose random stream no request took yet (the request continues that
        stream). Rollouts with equal tokens are equal parents, but each keeps its own stream for
        the one request that continues it, so samples do not depend on which rollouts share a
        process."""
        parent = owner = None
        parent_length = owner_length = 0
        for rollout in self.live:
            cached = rollout.prompt + rollout.tokens
            limit = min(len(prompt) - 1, self.engine.lm.seq_len(rollout.sid))
            length = 0
            while length < limit and cached[length] == prompt[length]:
                length += 1
            if length > parent_length:
                parent, parent_length = rollout, length
            if rollout.generator is not None and length > owner_length:
                owner, owner_length = rollout, length
        return parent, owner

    def _reserve(self, prompts: list[list[int]]) -> None:
        """Grows the KV pool (between steps of the loop, never inside) so that the requests fit
        even if nothing were shared: each prompt and a full budget, plus a fork's tail block."""
        cache = self.engine.lm.cache
        budget = self.trainer.max_completion_length
        needed = sum(-(-(len(p) + budget) // cache.block_size) + 2 for p in prompts)
        if cache.num_free_blocks < needed:
            cache.grow(cache.num_blocks + needed - cache.num_free_blocks)

    def generate(
        self, prompts: list[list[int]], generators: Sequence[torch.Generator] | None = None
    ) -> tuple[list[list[int]], list[list[float]]]:
        """Completions and their behaviour log-probs for token prompts (TRL's
        ``_generate_single_turn`` contract); ``generators``: one random stream per request (a
        continued rollout defaults to its parent's). ``reused`` then holds each request's
        forked (not computed) prompt tokens."""
        prompts = [list(p) for p in prompts]
        self._reserve(prompts)
        parents, streams = [], []
        for i, prompt in enumerate(prompts):
            parent, owner = self._match(prompt)
            stream = None if generators is None else generators[i]
            if stream is None and owner is not None:  # a rollout's next turn: its own stream
                stream, owner.generator = owner.generator, None
            parents.append(parent)
            streams.append(stream)
        fresh = [i for i, parent in enumerate(parents) if parent is None]
        resumed = [i for i, parent in enumerate(parents) if parent is not None]
        results: list = [None] * len(prompts)
        weights = self._policy_weights() if self.policy.shares_weights else contextlib.nullcontext()
        with weights, torch.no_grad():
            if fresh:
                own = [streams[i] for i in fresh]
                new = self.engine.sample(
                    [prompts[i] for i in fresh], [0] * len(fresh), own if all(own) else None
                )
                for i, rollout in zip(fresh, new):
                    self.origin[id(rollout)] = len(prompts[i])
                    results[i] = rollout
            if resumed:
                origins = [self.origin[id(parents[i])] for i in resumed]
                budgets = [
                    max(self.trainer.max_completion_length - (len(prompts[i]) - origin), 0)
                    for i, origin in zip(resumed, origins)
                ]
                own = [streams[i] for i in resumed]
                new = self.engine.resume(
                    [parents[i] for i in resumed],
                    [prompts[i] for i in resumed],
                    own if all(own) else None,
                    max_new_tokens=budgets,
                )
                for i, rollout, origin in zip(resumed, new, origins):
                    self.origin[id(rollout)] = origin
                    results[i] = rollout
        self.reused = [r.reused_prefix for r in results]
        self.live.extend(r for r in results if r.sid is not None)
        return [r.tokens for r in results], [r.behavior_logprob for r in results]

    def release(self) -> None:
        """Frees every sequence of the step."""
        if self.engine is not None:
            self.engine.release(self.live)
        self.live, self.origin = [], {}


@dataclass
class _Rows:
    """Rollouts of one process as TRL's ``_generate`` returns them, one entry per row."""

    prompts: list  # chat messages (or text) after environment resets
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    tool_mask: list[list[int]]  # 1: sampled by the policy, 0: tool output
    completions: list  # messages (or text)
    logprobs: list[list[float]]


@dataclass
class _Branch:
    """One branch row of this process: where it branches and what it inherits, then its own
    completion (ids, tool mask, log-probs, messages or text)."""

    index: int  # in the global plan
    parent: int  # global row of the parent
    point: int  # the selected completion position
    split: int  # first re-sampled position
    prompt: Any
    prompt_ids: list[int]
    inputs: dict
    environment: str | None
    parent_completion: Any  # the parent's messages (or text)
    completion_ids: list[int] = field(default_factory=list)
    tool_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    completion: Any = None
    reused_prefix: int = 0
    tool_calls: int = 0


@dataclass
class _Round:
    """The state of one APPO generation step on this process."""

    inputs: list[dict]  # this process's examples (one per initial row)
    row_offset: int  # global row of this process's first row
    seed: tuple  # (seed, global step): every random stream of the step derives from it
    started: bool = False  # the step's first generate call (the initial rollouts) happened
    initial: _Rows | None = None
    initial_rewards: torch.Tensor | None = None  # [global rows, reward funcs], gathered
    capture: bool = False  # the next policy pass is TRL's π_old pass: keep its entropies too
    scored: tuple[torch.Tensor, torch.Tensor] | None = None
    environments: list = field(default_factory=list)  # one per branch row (None without)
    pool_cursor: dict = field(default_factory=dict)  # environment instances taken per name
    branch_extras: dict = field(default_factory=dict)  # user log_extra columns of branch rows
    credit: dict = field(default_factory=dict)  # the global tree and its advantages
    plan: dict = field(default_factory=dict)  # the global branch points
    branches: list = field(default_factory=list)  # this process's branch rows
    assigned: list = field(default_factory=list)  # the process of each branch point
    times: dict[str, float] = field(default_factory=dict)


class APPOTrainer(KernelGRPOTrainer):
    """``trl.GRPOTrainer`` running APPO (module docstring), with the same constructor arguments;
    ``args`` is an :class:`APPOConfig`. ``branch_budget=0`` trains exactly as
    ``trl.GRPOTrainer``."""

    def __init__(self, model, reward_funcs=None, args: APPOConfig | None = None, *a, **kw):
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = APPOConfig(f"{str(name).split('/')[-1] or 'model'}-APPO")
        if not isinstance(args, APPOConfig):
            raise TypeError(f"args must be an APPOConfig, got {type(args).__name__}")
        super().__init__(model, reward_funcs, args, *a, **kw)
        self._round: _Round | None = None
        self.last_round: _Round | None = None
        self._loss_stats: tuple | None = None
        if not args.branch_budget:
            return
        if self.rollout_func is not None:
            raise ValueError("rollout_func must be None with branch_budget > 0 (APPO generates)")
        if self._is_vlm or isinstance(self.processing_class, ProcessorMixin):
            raise ValueError(
                "processing_class must be a tokenizer with branch_budget > 0 (vision inputs are "
                "not branched)"
            )
        text_config = self.model.config.get_text_config()
        self._blank = blank_token_table(self._tokenizer, text_config.vocab_size).to(
            self.accelerator.device
        )
        self._sampler = None if self.use_vllm else PagedSampler(self)
        if self._sampler is not None:
            _check_paged_sampler_model(text_config)
        weight_dtype = next(self.model.parameters()).dtype
        if self._sampler is not None and SAMPLER_DTYPES[args.sampler_dtype] == (weight_dtype, None):
            warnings.warn(
                f"sampler_dtype={args.sampler_dtype!r} is the policy's dtype: the behaviour "
                "policy is the policy itself, Ω is 1 up to rounding and the 'appo' rule ranks by "
                "noise (docs/design.md, 17.2); use 'bfloat16', vLLM, or branching='entropy'",
                stacklevel=2,
            )
        # the completions table holds each step's branch rows too
        rows = args.generation_batch_size * (1 + args.branch_budget / self.num_generations)
        size = int(math.ceil(rows))
        self._logs = {
            "images": deque(maxlen=size),
            "prompt": deque(maxlen=size),
            "completion": deque(maxlen=size),
            "rewards": defaultdict(lambda: deque(maxlen=size)),
            "advantages": deque(maxlen=size),
            "extra": defaultdict(lambda: deque(maxlen=size)),
        }

    # ------------------------------------------------------------------------------------------
    # TRL hooks
    # ------------------------------------------------------------------------------------------
    def _get_per_token_logps_and_entropies(
        self,
        model,
        input_ids,
        attention_mask,
        logits_to_keep,
        batch_size=None,
        compute_entropy=False,
        compute_aux_loss=False,
        **vision_inputs,
    ):
        arguments = (model, input_ids, attention_mask, logits_to_keep, batch_size)
        if not self.args.branch_budget:
            return GRPOTrainer._get_per_token_logps_and_entropies(
                self,
                *arguments,
                compute_entropy=compute_entropy,
                compute_aux_loss=compute_aux_loss,
                **vision_inputs,
            )
        if self._loss_stats is not None:  # the pass _compute_loss already ran
            stats, self._loss_stats = self._loss_stats, None
            return stats
        round_ = self._round
        capture = round_ is not None and round_.capture and model is self.model
        logps, entropy, aux = super()._get_per_token_logps_and_entropies(
            *arguments,
            compute_entropy=compute_entropy or capture,
            compute_aux_loss=compute_aux_loss,
            **vision_inputs,
        )
        if capture:
            round_.capture, round_.scored = False, (logps, entropy)
            entropy = entropy if compute_entropy else None
        return logps, entropy, aux

    def _generate_single_turn(
        self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False
    ):
        round_ = self._round
        if round_ is None or self._sampler is None:
            return super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, has_tool_images
            )
        generators = None
        if not round_.started:  # the initial rollouts: one stream per global row
            round_.started = True
            generators = [
                _stream(*round_.seed, "row", round_.row_offset + i) for i in range(len(prompt_ids))
            ]
        return self._sampler.generate(prompt_ids, generators)

    def _generate(self, prompts: list):
        round_ = self._round
        if round_ is None or round_.initial is not None:
            return super()._generate(prompts)
        started = time.perf_counter()
        result = super()._generate(prompts)
        round_.times["generation"] = time.perf_counter() - started
        prompt_ids, completion_ids, tool_mask, completions, logprobs = result[:5]
        if logprobs is None:  # only a custom generation path could drop them
            raise ValueError("APPO needs the sampling log-probs of the initial rollouts")
        round_.initial = _Rows(
            prompts=prompts,
            prompt_ids=[list(p) for p in prompt_ids],
            completion_ids=[list(c) for c in completion_ids],
            tool_mask=tool_mask or [[1] * len(c) for c in completion_ids],
            completions=completions,
            logprobs=[list(lp) for lp in logprobs],
        )
        # TRL's next policy pass (π_old, when it computes one) gives the entropies as well
        generate_every = self.args.steps_per_generation * self.num_iterations
        round_.capture = self.args.gradient_accumulation_steps % generate_every != 0 or (
            self.use_vllm and self.vllm_importance_sampling_correction
        )
        return result

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        if self._round is not None and self._round.initial_rewards is None:
            self._round.initial_rewards = rewards
        return rewards

    # ------------------------------------------------------------------------------------------
    # the APPO step
    # ------------------------------------------------------------------------------------------
    def _generate_and_score_completions(self, inputs):
        if not self.args.branch_budget or not self.model.training:
            output = super()._generate_and_score_completions(inputs)
            if self.args.branch_budget:  # keep the branch columns aligned with eval rows
                self._log_branch_columns([-1] * len(inputs) * self.accelerator.num_processes)
            return output
        rows = len(inputs)
        self._round = _Round(
            inputs=inputs,
            row_offset=self.accelerator.process_index * rows,
            seed=(self.args.seed, self.state.global_step),
        )
        try:
            if self._sampler is not None:
                self._sampler.refresh()
            started = time.perf_counter()
            output = super()._generate_and_score_completions(inputs)
            times = self._round.times
            times["initial_scoring"] = time.perf_counter() - started - times["generation"]
            return self._branch_step(inputs, output)
        finally:
            self._round = None
            if self._sampler is not None:
                self._sampler.release()

    def _branch_step(self, inputs: list[dict], output: dict) -> dict:
        round_, args = self._round, self.args
        times, started = round_.times, time.perf_counter()
        plan = self._branch_points(output)
        times["branching"] = time.perf_counter() - started

        started = time.perf_counter()
        processes, rows = self.accelerator.num_processes, len(inputs)
        capacity = rows * args.branch_budget // self.num_generations
        owners = [row // rows for row in plan["rows"]]
        assigned = assign_branches(owners, processes, capacity)
        mine = [b for b, p in enumerate(assigned) if p == self.accelerator.process_index]
        branches = self._branch_rows(plan, mine, assigned, inputs)
        times["branch_generation"] = time.perf_counter() - started

        started = time.perf_counter()
        slots = max(assigned.count(p) for p in range(processes)) if assigned else 0
        branch_rewards = self._branch_rewards(branches, slots, assigned) if slots else None
        output = self._credit(output, plan, branches, branch_rewards, assigned, slots)
        times["branch_scoring"] = time.perf_counter() - started
        self._log_step(plan, branches, branch_rewards, assigned, slots)
        round_.plan, round_.branches, round_.assigned = plan, branches, assigned
        self.last_round = round_  # the step's record: rollouts, plan, branches, tree
        return output

    # -- branch points -------------------------------------------------------------------------
    def _loss_mask(self, output: dict) -> torch.Tensor:
        mask = output["completion_mask"]
        return mask * output["tool_mask"] if "tool_mask" in output else mask

    def _gather_rows(self, x: torch.Tensor, fill: float = 0) -> torch.Tensor:
        """``[rows, T]`` of every process, in process order, padded to the longest ``T``."""
        x = self.accelerator.pad_across_processes(x, dim=1, pad_index=fill)
        return self.accelerator.gather(x)

    def _branch_points(self, output: dict) -> dict:
        """π_old and entropies of this process's initial rows (TRL's π_old pass when it ran one,
        else one pass now), gathered with what selection needs, and the global plan."""
        round_, args = self._round, self.args
        ids, mask = output["completion_ids"], self._loss_mask(output)
        if round_.scored is None:
            attention = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
            with (
                torch.no_grad(),
                disable_gradient_checkpointing(self.model, args.gradient_checkpointing_kwargs),
            ):
                logps, entropy, _ = self._get_per_token_logps_and_entropies(
                    self.model,
                    torch.cat([output["prompt_ids"], ids], dim=1),
                    attention,
                    ids.size(1),
                    batch_size=args.per_device_train_batch_size,
                    compute_entropy=True,
                )
            round_.scored = (logps, entropy)
        logps, entropy = round_.scored
        behavior = output["sampling_per_token_logps"].float()
        behavior = torch.where(torch.isnan(behavior), logps, behavior)  # unscored: log-ratio 0
        candidates = branch_candidates(
            mask, ids, blank_tokens=self._blank, keep_selected_token=args.keep_selected_token
        )
        observation = output["completion_mask"].bool() & ~mask.bool()
        gathered = {
            "entropy": self._gather_rows(entropy.float()),
            "logprob": self._gather_rows(logps.float()),
            "behavior_logprob": self._gather_rows(behavior),
            "mask": self._gather_rows(mask.to(torch.uint8)).bool(),
            "candidates": self._gather_rows(candidates.to(torch.uint8)).bool(),
            "observation_mask": self._gather_rows(observation.to(torch.uint8)).bool(),
        }
        total = gathered["mask"].shape[0]
        plan = plan_branches(
            args.branching,
            entropy=gathered["entropy"],
            logprob=gathered["logprob"],
            behavior_logprob=gathered["behavior_logprob"],
            mask=gathered["mask"],
            candidates=gathered["candidates"],
            group_ids=torch.arange(total, device=ids.device) // self.num_generations,
            budget=args.branch_budget,
            num_groups=total // self.num_generations,
            gamma=args.gamma,
            clip=args.omega_clip,
            observation_mask=gathered["observation_mask"],
            generator=_stream(*round_.seed, "plan"),
        )
        split_shift = 1 if args.keep_selected_token else 0
        return {
            "rows": plan.rows.tolist(),
            "points": plan.positions.tolist(),
            "splits": (plan.positions + split_shift).tolist(),
            "scores": plan.scores.tolist(),
            "mask": gathered["mask"],
            "omega": omega_diagnostics(
                gathered["logprob"],
                gathered["behavior_logprob"],
                gathered["mask"],
                gamma=args.gamma,
                clip=args.omega_clip,
            ),
        }

    # -- branch rollouts -----------------------------------------------------------------------
    def _parent_records(self, plan: dict, mine: list[int], assigned: list[int], inputs) -> dict:
        """``global row -> (prompt, prompt_ids, completion_ids, tool_mask, logprobs,
        completions, inputs, environment)`` for the parents of this process's branches; a
        parent on another process is sent by it (one ``gather_object``, only when some branch
        runs away from its parent)."""
        initial, rows = self._round.initial, len(inputs)
        me = self.accelerator.process_index
        names = getattr(self, "_batch_environments", None) or [None] * rows

        def record(local: int) -> tuple:
            return (
                initial.prompts[local],
                initial.prompt_ids[local],
                initial.completion_ids[local],
                initial.tool_mask[local],
                initial.logprobs[local],
                initial.completions[local],
                inputs[local],
                names[local],
            )

        records = {}
        for b in mine:
            row = plan["rows"][b]
            if row // rows == me:
                records[row] = record(row - me * rows)
        away = sorted(
            {plan["rows"][b] for b, p in enumerate(assigned) if p != plan["rows"][b] // rows}
        )
        if away:
            sent = [(row, record(row - me * rows)) for row in away if row // rows == me]
            records.update(dict(gather_object(sent)))
        return records

    def _branch_rows(self, plan: dict, mine: list[int], assigned: list[int], inputs) -> list:
        """This process's branch rows: the prefix of each parent, one continuation through TRL's
        ``_generate_single_turn`` (the paged sampler's fork on the transformers path) and TRL's
        tool loop for turns that call a tool."""
        records = self._parent_records(plan, mine, assigned, inputs)
        branches = []
        for b in mine:
            row, split = plan["rows"][b], plan["splits"][b]
            prompt, prompt_ids, completion_ids, tool_mask, logprobs, messages, x, env = records[row]
            branch = _Branch(
                index=b,
                parent=row,
                point=plan["points"][b],
                split=split,
                prompt=prompt,
                prompt_ids=prompt_ids,
                inputs=x,
                environment=env,
                parent_completion=messages,
                completion_ids=completion_ids[:split],
                tool_mask=tool_mask[:split],
                logprobs=logprobs[:split],
            )
            branches.append(branch)
        # a kept token that ends its turn (keep_selected_token at an end-of-turn token) leaves
        # nothing to sample in the turn: the tool loop takes the turn as it is
        ends = set(self.eos_token_ids)
        open_turns = [
            br for br in branches if not br.completion_ids or br.completion_ids[-1] not in ends
        ]
        requests = [br.prompt_ids + br.completion_ids for br in open_turns]
        if self._sampler is not None:
            streams = [_stream(*self._round.seed, "branch", br.index) for br in open_turns]
            ids, logps = self._sampler.generate(requests, streams) if requests else ([], [])
            for br, reused in zip(open_turns, self._sampler.reused if requests else []):
                br.reused_prefix = reused
        else:  # vLLM: token-id prompts (its prefix cache holds the parents' blocks); in server
            # mode every process takes part in the call, with or without requests of its own
            ids, logps = self._generate_single_turn(requests, None, {}, num_generations=1)
        for br, new_ids, new_logps in zip(open_turns, ids, logps):
            budget = self.max_completion_length - br.split
            br.completion_ids = br.completion_ids + list(new_ids)[:budget]
            br.logprobs = br.logprobs + list(new_logps or [0.0] * len(new_ids))[:budget]
            br.tool_mask = br.tool_mask + [1] * (len(br.completion_ids) - len(br.tool_mask))
        if not branches:
            return branches
        self._continue_turns(branches)
        return branches

    def _turn(self, branch: _Branch) -> tuple[int, int]:
        """``(start, rounds)``: where the turn the split falls in begins (after the last tool
        output before it) and how many tool rounds came before it."""
        start, rounds = 0, 0
        for i in range(branch.split):
            if not branch.tool_mask[i] and (i == 0 or branch.tool_mask[i - 1]):
                rounds += 1
            if not branch.tool_mask[i]:
                start = i + 1
        return start, rounds

    def _tools_of(self, environment: str | None) -> list:
        if self.environment_factories is not None:
            return self._env_tools[environment]
        return self.tools

    def _parse_turn(self, branch: _Branch, start: int) -> Any:
        """The continued turn as TRL's ``_generate`` decodes a completion."""
        turn = branch.completion_ids[start:]
        if not is_conversational({"prompt": branch.prompt}):
            return self.processing_class.decode(branch.completion_ids, skip_special_tokens=True)
        tokenizer = self._tokenizer
        if getattr(tokenizer, "response_template", None) is not None or (
            getattr(tokenizer, "response_schema", None) is not None
        ):
            context = branch.prompt_ids + branch.completion_ids[:start]
            return parse_response(
                tokenizer, turn, prefix=context, tools=self._tools_of(branch.environment)
            )
        return {
            "role": "assistant",
            "content": self.processing_class.decode(turn, skip_special_tokens=True),
        }

    def _continue_turns(self, branches: list[_Branch]) -> None:
        """Parses each branch's continued turn, replays its environment up to the turn and runs
        TRL's tool loop on the turns that call tools (grouped by the tool rounds already spent
        when ``max_tool_calling_iterations`` is set)."""
        turns = {}
        for branch in branches:
            start, rounds = self._turn(branch)
            parent_messages = branch.parent_completion
            branch.completion = self._parse_turn(branch, start)
            if not isinstance(branch.completion, dict):
                continue  # plain text: no tool loop
            # messages of the turns before the split's: up to the parent's rounds-th assistant turn
            assistant = [i for i, m in enumerate(parent_messages) if m["role"] == "assistant"]
            before = parent_messages[: assistant[rounds]] if rounds < len(assistant) else []
            turns[id(branch)] = (before, rounds)
        if not self.tools or not turns:
            for branch in branches:
                if id(branch) in turns:
                    branch.completion = turns[id(branch)][0] + [branch.completion]
            return
        environments = [self._branch_environment(b, turns[id(b)][0]) for b in branches]
        self._round.environments = environments
        limited = self.max_tool_calling_iterations != sys.maxsize
        groups = defaultdict(list)
        for i, branch in enumerate(branches):
            groups[turns[id(branch)][1] if limited else 0].append(i)
        saved = (self._sync_tool_dicts, self._async_tool_dicts, self.max_tool_calling_iterations)
        try:
            for rounds, members in sorted(groups.items()):
                self._sync_tool_dicts, self._async_tool_dicts = zip(
                    *[self._tool_dicts(environments[i]) for i in members]
                )
                self.max_tool_calling_iterations = saved[2] - rounds if limited else saved[2]
                sub = [branches[i] for i in members]
                prompts = [copy.deepcopy(b.prompt) + copy.deepcopy(turns[id(b)][0]) for b in sub]
                completions = [[b.completion] for b in sub]
                mask, completions, ids, logps, calls, _, _ = self._tool_call_loop(
                    prompts,
                    [b.prompt_ids for b in sub],
                    [b.completion_ids for b in sub],
                    completions,
                    [b.logprobs for b in sub],
                    None,
                    {},
                )
                for b, b_mask, b_completion, b_ids, b_logps in zip(
                    sub, mask, completions, ids, logps
                ):
                    b_mask[: len(b.tool_mask)] = b.tool_mask  # the prefix keeps its tool output
                    b.tool_mask, b.completion_ids, b.logprobs = b_mask, b_ids, b_logps
                    b.completion = turns[id(b)][0] + b_completion
                    b.tool_calls = sum(
                        len(m.get("tool_calls") or [])
                        for m in b_completion
                        if m["role"] == "assistant"
                    )
        finally:
            self._sync_tool_dicts, self._async_tool_dicts, self.max_tool_calling_iterations = saved

    def _tool_dicts(self, environment) -> tuple[dict, dict]:
        """Name -> callable of the standalone tools and the environment's methods, as TRL's
        ``_generate_and_score_completions`` builds them per rollout."""
        methods = []
        if environment is not None:
            methods = [
                getattr(environment, name)
                for name, _ in inspect.getmembers(type(environment), predicate=inspect.isfunction)
                if name not in ("reset", "get_reward") and not name.startswith("_")
            ]
        sync, asynchronous = {}, {}
        for tool in self._standalone_tools + methods:
            target = asynchronous if inspect.iscoroutinefunction(tool) else sync
            target[tool.__name__] = tool
        return sync, asynchronous

    def _branch_environment(self, branch: _Branch, before: list):
        """A fresh environment instance from TRL's pool, reset with the parent's example and with
        the parent's tool calls before the split's turn replayed (None without environments)."""
        if self.environment_factories is None:
            return None
        name = branch.environment
        pool = self._environment_pool[name]
        cursor = self._round.pool_cursor
        taken = cursor.get(name, sum(e == name for e in self._batch_environments))
        if taken == len(pool):
            pool.append(self.environment_factories[name]())
        cursor[name] = taken + 1
        environment = pool[taken]
        x = branch.inputs
        environment.reset(
            **({k: v for k, v in x.items() if k != "environment"} if self._multi_environment else x)
        )
        sync, asynchronous = self._tool_dicts(environment)
        for message in before:
            for call in message.get("tool_calls") or [] if message["role"] == "assistant" else []:
                function = call.get("function", {})
                tool_name, arguments = function.get("name"), function.get("arguments") or {}
                with contextlib.suppress(Exception):  # a failing call failed for the parent too
                    if tool_name in sync:
                        sync[tool_name](**arguments)
                    elif tool_name in asynchronous:
                        asyncio.run_coroutine_threadsafe(
                            asynchronous[tool_name](**arguments), self.async_loop
                        ).result()
        return environment

    # -- credit --------------------------------------------------------------------------------
    def _plan_order(self, assigned: list[int], slots: int) -> list[int]:
        """For each branch of the plan, its row in a gather of ``slots`` rows per process (each
        process's branches in plan order, first)."""
        seen = defaultdict(int)
        positions = []
        for process in assigned:
            positions.append(process * slots + seen[process])
            seen[process] += 1
        return positions

    def _branch_rewards(self, branches: list[_Branch], slots: int, assigned: list[int]):
        """``[branches, reward funcs]`` in plan order, through TRL's ``_calculate_rewards`` (every
        process scores ``slots`` rows: its branches, then copies of one of its rows whose
        rewards and logged extras are dropped)."""
        round_ = self._round
        real = len(branches)
        if real:
            rows = branches + [branches[-1]] * (slots - real)
            environments = round_.environments or [None] * real
            environments = list(environments) + [environments[-1]] * (slots - real)
        else:  # a process without a branch scores its first rollout, dropped
            initial = round_.initial
            filler = _Branch(
                index=-1,
                parent=-1,
                point=-1,
                split=-1,
                prompt=initial.prompts[0],
                prompt_ids=initial.prompt_ids[0],
                inputs=round_.inputs[0],
                environment=None,
                parent_completion=None,
                completion_ids=initial.completion_ids[0],
                completion=initial.completions[0],
            )
            rows = [filler] * slots
            environments = [self.environments[0] if self.environments else None] * slots
        saved = self.environments
        self.environments = environments if self.environment_factories is not None else saved
        try:
            rewards = self._calculate_rewards(
                [b.inputs for b in rows],
                [b.prompt for b in rows],
                [b.completion for b in rows],
                [b.completion_ids for b in rows],
            )
        finally:
            self.environments = saved
        columns = sorted(set(gather_object(list(self._pending_extra_logs))))
        extras = {}
        for column in columns:
            values = self._pending_extra_logs.get(column, [None] * slots)[:real]
            extras[column] = gather_object(values)
        self._pending_extra_logs.clear()
        device = self.accelerator.device
        for name in sorted(set(gather_object(list(self._pending_metrics)))):
            values = self._pending_metrics.get(name, [])
            local = torch.tensor([sum(values), len(values)], dtype=torch.float32, device=device)
            total, count = self.accelerator.gather(local).view(-1, 2).sum(dim=0).tolist()
            self._metrics["train"][name].append(total / count)
        self._pending_metrics.clear()
        order = self._plan_order(assigned, slots)
        round_.branch_extras = {
            column: self._reorder_gathered(values, assigned) for column, values in extras.items()
        }
        return rewards[torch.tensor(order, device=rewards.device)]

    def _reorder_gathered(self, values: list, assigned: list[int]) -> list:
        """Values gathered from each process's real branch rows (process order), in plan order."""
        counts = [assigned.count(p) for p in range(self.accelerator.num_processes)]
        starts = [sum(counts[:p]) for p in range(len(counts))]
        seen = defaultdict(int)
        ordered = []
        for process in assigned:
            ordered.append(values[starts[process] + seen[process]])
            seen[process] += 1
        return ordered

    def _credit(self, output, plan, branches, branch_rewards, assigned, slots) -> dict:
        """Procedure-level advantages of the global tree; this process's rows of them replace
        TRL's advantages (and, with ``train_branches``, its branch rows join the batch)."""
        args, round_ = self.args, self._round
        device = self.accelerator.device
        weights = self.reward_weights.to(device)
        initial = round_.initial_rewards
        rows_total = initial.shape[0]
        per_func = initial if branch_rewards is None else torch.cat([initial, branch_rewards])
        rewards = (per_func * weights).nansum(dim=1)
        scorable = ~torch.isnan(per_func).all(dim=1)
        parents = torch.tensor(plan["rows"], dtype=torch.long, device=device)
        splits = torch.tensor(plan["splits"], dtype=torch.long, device=device)
        masks = [plan["mask"]]
        if branches or slots:
            local = [torch.tensor(b.tool_mask, device=device) for b in branches]
            width = max([len(b.tool_mask) for b in branches] + [1])
            local = torch.stack(
                [torch.nn.functional.pad(m, (0, width - m.numel())) for m in local]
                + [torch.zeros(width, dtype=torch.long, device=device)] * (slots - len(branches))
            )
            gathered = self._gather_rows(local)
            masks.append(gathered[torch.tensor(self._plan_order(assigned, slots), device=device)])
        width = max(m.shape[1] for m in masks)
        response_mask = torch.cat(
            [torch.nn.functional.pad(m.long(), (0, width - m.shape[1])) for m in masks]
        )
        count = rewards.shape[0]
        group_ids = (
            torch.cat([torch.arange(rows_total, device=device), parents]) // self.num_generations
        )
        is_branch = torch.arange(count, device=device) >= rows_total
        parent = torch.cat([torch.full((rows_total,), -1, device=device), parents])
        split = torch.cat([torch.full((rows_total,), -1, device=device), splits])
        # unscorable rows (every reward function returned None) get 0, as in TRL; so do branches
        # of an unscorable parent, whose credit has nowhere to go
        keep = scorable.clone()
        keep[rows_total:] &= scorable[parents]
        index = torch.nonzero(keep).squeeze(1)
        renumber = torch.full((count,), -1, dtype=torch.long, device=device)
        renumber[index] = torch.arange(index.numel(), device=device)
        sub_parent = torch.where(parent[index] >= 0, renumber[parent[index].clamp_min(0)], -1)
        advantages = torch.zeros(count, width, device=device)
        advantages[index] = procedure_advantages(
            rewards[index],
            group_ids[index],
            is_branch[index],
            sub_parent,
            split[index],
            response_mask[index],
            train_branches=args.train_branches,
            std="none" if args.scale_rewards == "none" else args.advantage_std,
        )
        me, rows = self.accelerator.process_index, output["completion_ids"].shape[0]
        output["advantages"] = advantages[
            me * rows : (me + 1) * rows, : output["completion_ids"].shape[1]
        ]
        round_.credit = {
            "rewards": rewards,
            "group_ids": group_ids,
            "is_branch": is_branch,
            "parent": parent,
            "split": split,
            "response_mask": response_mask,
            "advantages": advantages,
            "keep": keep,
        }
        if args.train_branches:
            mine = [rows_total + b.index for b in branches]
            output = self._with_branch_rows(
                output, branches, advantages[mine] if mine else advantages[:0]
            )
        return output

    def _with_branch_rows(self, output: dict, branches: list[_Branch], advantages) -> dict:
        """``output`` with this process's branch rows appended (``train_branches``), padded to
        the per-process branch count with inert rows (no mask) so that every process's batch
        splits the same way; π_old and reference log-probs of the rows as TRL computes them."""
        args, device = self.args, self.accelerator.device
        rows = output["completion_ids"].shape[0]
        capacity = rows * args.branch_budget // self.num_generations
        pad_id = self._tokenizer.pad_token_id
        initial = self._round.initial
        items = [(b.prompt_ids, b.completion_ids, b.tool_mask, b.logprobs, 1) for b in branches]
        inert = (
            initial.prompt_ids[0],
            initial.completion_ids[0],
            initial.tool_mask[0],
            initial.logprobs[0],
            0,
        )
        items += [inert] * (capacity - len(branches))

        def padded(values, value, side, dtype=None):
            tensors = [torch.tensor(v, dtype=dtype) for v in values]
            return pad(tensors, padding_value=value, padding_side=side).to(device)

        completion_ids = padded([i[1] for i in items], pad_id, "right")
        live = torch.tensor([i[4] for i in items], device=device)
        completion_mask = padded([[1] * len(i[1]) for i in items], 0, "right") * live[:, None]
        if self.mask_truncated_completions:
            ends = [*self.eos_token_ids, pad_id]
            finished = torch.tensor([bool(i[1]) and i[1][-1] in ends for i in items], device=device)
            completion_mask = completion_mask * finished[:, None].int()
        batch = {
            "prompt_ids": padded([i[0] for i in items], pad_id, "left"),
            "prompt_mask": padded([[1] * len(i[0]) for i in items], 0, "left"),
            "completion_ids": completion_ids,
            "completion_mask": completion_mask,
            "tool_mask": padded([i[2] for i in items], 1, "right"),
            "sampling_per_token_logps": padded([i[3] for i in items], 0.0, "right", torch.float32),
            "advantages": torch.nn.functional.pad(
                advantages, (0, 0, 0, capacity - advantages.shape[0])
            ),
        }
        ids = torch.cat([batch["prompt_ids"], completion_ids], dim=1)
        attention = torch.cat([batch["prompt_mask"], completion_mask], dim=1)
        keep, size = completion_ids.shape[1], args.per_device_train_batch_size
        with (
            torch.no_grad(),
            disable_gradient_checkpointing(self.model, args.gradient_checkpointing_kwargs),
        ):
            if "old_per_token_logps" in output:
                batch["old_per_token_logps"] = self._get_per_token_logps_and_entropies(
                    self.model, ids, attention, keep, batch_size=size
                )[0]
            if "ref_per_token_logps" in output:
                if self.ref_model is not None:
                    reference = self._get_per_token_logps_and_entropies(
                        self.ref_model, ids, attention, keep, batch_size=size
                    )[0]
                else:  # PEFT: the adapter off (or its frozen "ref" copy), as TRL does
                    unwrapped = self.accelerator.unwrap_model(self.model)
                    name = "ref" if "ref" in unwrapped.peft_config else None
                    with use_adapter(unwrapped, adapter_name=name):
                        reference = self._get_per_token_logps_and_entropies(
                            self.model, ids, attention, keep, batch_size=size
                        )[0]
                batch["ref_per_token_logps"] = reference
        merged = dict(output)
        for key, value in batch.items():
            if key not in output and key != "advantages":
                continue
            side = "left" if key.startswith("prompt") else "right"
            fill = (
                pad_id
                if key in ("prompt_ids", "completion_ids")
                else (1 if key == "tool_mask" else 0)
            )
            merged[key] = _cat_rows(output.get(key), value, fill, side)
        if "tool_mask" not in output:
            merged["tool_mask"] = _cat_rows(
                torch.ones_like(output["completion_mask"]), batch["tool_mask"], 1, "right"
            )
        merged["num_items_in_batch"] = self.accelerator.gather(self._loss_mask(merged).sum()).sum()
        return merged

    # -- metrics and the completions table -----------------------------------------------------
    def _log_branch_columns(self, parents: list[int], splits: list[int] | None = None) -> None:
        """The completions table's branch columns for rows just logged: ``appo_parent`` (the
        parent's row in the step's global batch, -1 for an initial row) and ``appo_split`` (the
        first re-sampled completion token, -1)."""
        extra = self._logs["extra"]
        extra["appo_parent"].extend(parents)
        extra["appo_split"].extend(splits if splits is not None else [-1] * len(parents))

    def _log_step(self, plan, branches, branch_rewards, assigned, slots) -> None:
        round_, credit = self._round, self._round.credit
        metrics = self._metrics["train"]
        rows_total = round_.initial_rewards.shape[0]
        count = len(plan["rows"])
        rewards = credit["rewards"]
        metrics["appo/branches"].append(float(count))
        if count:
            metrics["appo/reward_branches"].append(float(rewards[rows_total:].nanmean()))
            parents = torch.tensor(plan["rows"], device=rewards.device)
            metrics["appo/reward_parents"].append(float(rewards[parents].nanmean()))
        for name, value in plan["omega"].items():
            metrics[f"appo/{name}"].append(value)
        times = round_.times
        # a branch's prompt + prefix is what re-prefilling it computes; the fork reuses all of it
        # but the token before the split (transformers path; vLLM's cache hits are its own)
        totals = torch.tensor(
            [
                float(sum(len(b.prompt_ids) + b.split for b in branches)),
                float(sum(b.reused_prefix for b in branches)),
                float(sum(sum(b.tool_mask[b.split :]) for b in branches)),
                float(sum(b.tool_calls for b in branches)),
            ],
            device=self.accelerator.device,
        )
        prefix, reused, new_tokens, calls = self.accelerator.reduce(totals, "sum").tolist()
        metrics["appo/branch_prefix_tokens"].append(prefix)
        if self._sampler is not None:
            metrics["appo/fork_reused_tokens"].append(reused)
            metrics["appo/branch_prefilled_tokens"].append(prefix - reused)
        metrics["appo/branch_new_tokens"].append(new_tokens)
        if self.tools and count:
            metrics["appo/branch_tool_calls"].append(calls / count)
        metrics["appo/time_generation"].append(times["generation"])
        metrics["appo/time_branching"].append(times["branching"])
        metrics["appo/time_branch_generation"].append(times["branch_generation"])
        metrics["appo/time_scoring"].append(times["initial_scoring"] + times["branch_scoring"])

        # the completions table: replace TRL's GRPO advantages of the initial rows, add branches
        advantages, mask = credit["advantages"], credit["response_mask"]
        row_advantage = ((advantages * mask).sum(1) / mask.sum(1).clamp_min(1)).tolist()
        logged = self._logs["advantages"]
        for _ in range(min(rows_total, len(logged))):
            logged.pop()
        logged.extend(row_advantage[:rows_total])
        self._log_branch_columns([-1] * rows_total)
        if not count:
            return
        self._logs["prompt"].extend(
            self._reorder_gathered(gather_object([b.prompt for b in branches]), assigned)
        )
        self._logs["completion"].extend(
            self._reorder_gathered(gather_object([b.completion for b in branches]), assigned)
        )
        for i, name in enumerate(self.reward_func_names):
            self._logs["rewards"][name].extend(branch_rewards[:, i].tolist())
        logged.extend(row_advantage[rows_total:])
        self._log_branch_columns(plan["rows"], plan["splits"])
        for column, values in round_.branch_extras.items():
            self._logs["extra"][column].extend(values)
        length = len(self._logs["prompt"])
        for column in list(self._logs["extra"].values()) + list(self._logs["rewards"].values()):
            while len(column) < length:  # a column that earlier rows lack: None on the left
                column.appendleft(None)

    # ------------------------------------------------------------------------------------------
    # the loss
    # ------------------------------------------------------------------------------------------
    def _compute_loss(self, model, inputs):
        """TRL's loss on APPO's terms: the advantages scaled by the future-likelihood weight
        (``appo.loss.future_likelihood_scale``), TRL's ``delta`` as the dual clip, rows with more
        than one dual-clipped token masked out (``drop_dual_clipped_rows``) and the k3 KL clamped
        (``clamp_kl``); the policy pass runs once, before TRL's ``_compute_loss`` reuses it."""
        args = self.args
        if not args.branch_budget:
            return super()._compute_loss(model, inputs)
        completion_mask = inputs["completion_mask"]
        mask = self._loss_mask(inputs)
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        stats = self._get_per_token_logps_and_entropies(
            model,
            ids,
            attention,
            inputs["completion_ids"].size(1),
            compute_entropy=True,
            compute_aux_loss=self.aux_loss_enabled,
        )
        logps = stats[0]
        old = inputs.get("old_per_token_logps")
        old = logps.detach() if old is None else old
        advantages = inputs["advantages"]
        if advantages.dim() == 1:  # TRL's evaluation batches carry one advantage per row
            advantages = advantages[:, None].expand_as(logps)
        scaled = future_likelihood_scale(
            advantages,
            logps,
            old,
            mask,
            c=args.scale_c,
            half_life=args.scale_half_life,
            clip=args.scale_clip,
            clip_high_only=args.scale_clip_high_only,
            neg_ratio_cap=args.scale_neg_ratio_cap,
            bonus=args.scale_bonus,
        )
        adjusted = {**inputs, "advantages": scaled}
        mode = "train" if self.model.training else "eval"
        if args.drop_dual_clipped_rows and args.delta is not None:
            log_ratio = (logps.detach() - old).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
            dual_clipped = (scaled < 0) & (log_ratio.exp() > args.delta) & mask.bool()
            dropped = dual_clipped.sum(dim=1) > 1
            adjusted["completion_mask"] = completion_mask * ~dropped[:, None]
            total = self.accelerator.gather(dropped.sum()).sum()
            self._metrics[mode]["appo/rows_dropped"].append(float(total))
        if self.beta != 0.0 and args.clamp_kl:
            adjusted["ref_per_token_logps"] = _clamped_reference(
                inputs["ref_per_token_logps"], logps
            )
        self._loss_stats = stats
        try:
            return super()._compute_loss(model, adjusted)
        finally:
            self._loss_stats = None


def _check_paged_sampler_model(config) -> None:
    """The paged sampler runs Llama / Qwen2-family models: full attention in every layer and no
    logit soft-cap (a ``ValueError`` naming the config field otherwise; vLLM samples any)."""
    layer_types = getattr(config, "layer_types", None) or ()
    if any(kind != "full_attention" for kind in layer_types):
        raise ValueError(
            "branch_budget > 0 without vLLM samples on the paged KV cache, which needs full "
            f"attention in every layer; the model config sets layer_types "
            f"{sorted(set(layer_types))}: use vLLM (use_vllm=True)"
        )
    if lm_head_softcap(config) is not None:
        raise ValueError(
            "branch_budget > 0 without vLLM samples on the paged KV cache, which runs Llama / "
            f"Qwen2-family models; the model config sets final_logit_softcapping="
            f"{config.final_logit_softcapping!r}: use vLLM (use_vllm=True)"
        )


def _clamped_reference(reference: torch.Tensor, logps: torch.Tensor) -> torch.Tensor:
    """Reference log-probs whose k3 KL against ``logps`` in TRL's ``_compute_loss`` is clamped to
    ``KL_CLAMP`` as ``appo.loss`` clamps it: where ``k3(d) > KL_CLAMP`` (``d = ref − logπ``) the
    reference becomes ``logπ + d*`` with ``d*`` the bound on ``d``'s side, so TRL's
    ``ref − logπ`` is the constant ``d*``: k3 equals the clamp and passes no gradient."""
    d = reference - logps.detach()
    over = torch.expm1(d) - d > KL_CLAMP
    bound = torch.where(d > 0, d.new_tensor(KL_HIGH), d.new_tensor(KL_LOW))
    return torch.where(over, logps + bound, reference)


def _cat_rows(a: torch.Tensor | None, b: torch.Tensor, fill: float, side: str) -> torch.Tensor:
    """Rows of ``a`` then ``b``, padded on ``side`` of dim 1 to a common width."""
    if a is None:
        return b
    if a.dim() == 1:
        return torch.cat([a, b])
    width = max(a.shape[1], b.shape[1])

    def widen(x):
        extra = width - x.shape[1]
        return torch.nn.functional.pad(x, (extra, 0) if side == "left" else (0, extra), value=fill)

    return torch.cat([widen(a), widen(b)])
