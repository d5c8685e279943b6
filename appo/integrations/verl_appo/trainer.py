"""verl trainer mode ``appo`` (``trainer.v1.trainer_mode=appo``): verl 0.9.1's synchronous v1
trainer with APPO's branching step (docs/design.md section 18.4).

After verl's ``_compute_old_log_prob`` (log-probs and entropies of the initial rows, in
TransferQueue), the trainer reads the initial rows (not verl's synthetic padding rows), picks the
branch points with ``select_branches``, and runs the branch rows of ``build_branch_rows`` through
verl's agent loop manager: rollout replicas woken with the weights that sampled the initial rows,
generation, replicas put to sleep again. Branches that failed, and any whose prefix differs from
its parent's, are dropped; the rest get their rewards (colocated reward model: verl's
``_compute_reward_colocate``), verl's padding and balancing, and verl's old log-probs (rollout
correction reads them). ``_compute_advantage`` then runs verl's own step with the ``appo``
estimator over initial and branch rows, and only the initial rows go on to the update (unless
``algorithm.appo_train_branches``). No branch key is left in TransferQueue.

Options, under ``trainer.v1.appo`` (``+trainer.v1.appo.budget=4``): ``budget`` (branch points
per prompt, required, 0 <= budget <= ``rollout.n``; 0 is verl's sync trainer), ``rule`` (a name in
``appo.branching.RULES``), ``gamma``, ``clip`` (the future value's), ``exclude_token_ids`` (never
branch at these tokens), ``timeout_s`` (for the branch rollouts). Every check runs when the
trainer is constructed, before any worker starts.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import hydra
import torch
import transfer_queue as tq
import verl
from omegaconf import DictConfig, OmegaConf
from packaging.version import Version
from tensordict import NonTensorStack, TensorDict
from transfer_queue import KVBatchMeta
from verl import DataProto
from verl.experimental.agent_loop.agent_loop import _agent_loop_registry
from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
from verl.utils import tensordict_utils as tu
from verl.utils.debug import marked_timer
from verl.utils.import_utils import resolve_config_path

from appo.branching import RULES
from appo.integrations.verl import UID_TAG, select_branches
from appo.integrations.verl_appo.agent_loops import TOOL_AGENT, APPOToolAgentLoop
from appo.integrations.verl_appo.branch_rows import (
    ROLLOUT_N_FIELD,
    build_branch_rows,
    object_column,
    resume_records,
)
from appo_kernels.validation import check_count, check_fraction, check_gamma, check_positive

TRAINER_NAME = "appo"
VERL_RELEASE = (0, 9, 1)  # the trainer overrides methods of this verl release
POLL_S = 0.5  # how often the trainer looks at the branch requests' status
_TERMINAL = ("finished", "failure")
_PER_TOKEN_FIELDS = ("responses", "response_mask", "rollout_log_probs", "old_log_probs", "entropy")
_ROW_FIELDS = ("uid", "prompts", *_PER_TOKEN_FIELDS, "extra_fields")
_PREFIX_FIELDS = ("prompts", "responses", "response_mask", "rollout_log_probs")


@dataclass(frozen=True)
class APPOTrainerOptions:
    """The trainer's options (module docstring), checked by :func:`check_config`."""

    budget: int
    rule: str = "appo"
    gamma: float = 1.0
    clip: float = 0.2
    exclude_token_ids: tuple[int, ...] | None = None
    timeout_s: float = 1800.0
    train_branches: bool = False  # algorithm.appo_train_branches, read by the estimator too


_OPTION_NAMES = ("budget", "rule", "gamma", "clip", "exclude_token_ids", "timeout_s")


def _records_resume_state(config: DictConfig) -> None:
    """The default agent loop must be ``appo_tool_agent`` or a subclass: branches resume from
    what it records."""
    agent = config.actor_rollout_ref.rollout.agent
    name = agent.default_agent_loop
    entry = _agent_loop_registry.get(name)
    if entry is None and agent.get("agent_loop_config_path"):
        listed = OmegaConf.load(resolve_config_path(agent.agent_loop_config_path))
        entry = next((item for item in listed if item.get("name") == name), None)
    target = entry.get("_target_") if entry is not None else None
    loop = hydra.utils.get_class(target) if target else None
    if not (isinstance(loop, type) and issubclass(loop, APPOToolAgentLoop)):
        raise ValueError(
            "actor_rollout_ref.rollout.agent.default_agent_loop must record what branches need "
            f"({TOOL_AGENT!r} or a subclass of {APPOToolAgentLoop.__name__}) with trainer.v1."
            f"trainer_mode={TRAINER_NAME}, got {name!r} ({target or 'not registered'})"
        )


def check_config(config: DictConfig) -> APPOTrainerOptions:
    """The trainer's options from verl's trainer config; ``ValueError`` / ``TypeError`` naming
    the option for anything the trainer cannot honour."""
    release = Version(verl.__version__).release[:3]
    if release != VERL_RELEASE:
        raise RuntimeError(
            f"trainer_mode={TRAINER_NAME} overrides methods of verl "
            f"{'.'.join(map(str, VERL_RELEASE))} and runs on that release only, found verl "
            f"{verl.__version__}"
        )
    section = config.trainer.v1.get(TRAINER_NAME)
    options: dict[str, Any] = OmegaConf.to_container(section, resolve=True) if section else {}
    if not isinstance(options, dict):
        raise TypeError(f"trainer.v1.{TRAINER_NAME} must be a mapping, got {options!r}")
    unknown = sorted(set(options) - set(_OPTION_NAMES))
    if unknown:
        raise ValueError(
            f"trainer.v1.{TRAINER_NAME} has unknown options {unknown}; it takes {_OPTION_NAMES}"
        )
    prefix = f"trainer.v1.{TRAINER_NAME}"
    if "budget" not in options:
        raise ValueError(f"{prefix}.budget is required (e.g. +{prefix}.budget=4)")
    budget = check_count(f"{prefix}.budget", options["budget"])
    rollout = config.actor_rollout_ref.rollout
    if budget > rollout.n:
        raise ValueError(
            f"{prefix}.budget must be at most actor_rollout_ref.rollout.n ({rollout.n}): a "
            f"prompt's branches re-sample its {rollout.n} initial rollouts, got {budget}"
        )
    rule = options.get("rule", APPOTrainerOptions.rule)
    if rule not in RULES:
        raise ValueError(f"{prefix}.rule must be one of {RULES}, got {rule!r}")
    excluded = options.get("exclude_token_ids")
    if excluded is not None:
        if not isinstance(excluded, Sequence) or isinstance(excluded, str):
            raise TypeError(f"{prefix}.exclude_token_ids must be a list of token ids or null")
        excluded = tuple(check_count(f"{prefix}.exclude_token_ids[]", i) for i in excluded)
    train_branches = config.algorithm.get("appo_train_branches", False)
    if not isinstance(train_branches, bool):
        raise TypeError(
            f"algorithm.appo_train_branches must be a bool, got {type(train_branches).__name__}"
        )

    if config.algorithm.adv_estimator != "appo":
        raise ValueError(
            f"trainer.v1.trainer_mode={TRAINER_NAME} needs algorithm.adv_estimator=appo (the "
            f"branch credit), got {config.algorithm.adv_estimator!r}"
        )
    if not rollout.calculate_log_probs:
        raise ValueError(
            "actor_rollout_ref.rollout.calculate_log_probs must be true: the Branching Score "
            "compares the trainer's log-probs with the rollout engine's"
        )
    correction = config.algorithm.get("rollout_correction")
    if correction is not None and correction.get("bypass_mode", False):
        raise ValueError(
            "algorithm.rollout_correction.bypass_mode must be false with trainer_mode="
            f"{TRAINER_NAME}: bypass mode computes no entropies to branch on"
        )
    if config.algorithm.use_kl_in_reward:
        raise ValueError(
            f"algorithm.use_kl_in_reward must be false with trainer_mode={TRAINER_NAME}: branch "
            "rows have no reference log-probs (use actor.use_kl_loss for a KL term)"
        )
    _records_resume_state(config)
    return APPOTrainerOptions(
        budget=budget,
        rule=rule,
        gamma=check_gamma(f"{prefix}.gamma", options.get("gamma", APPOTrainerOptions.gamma)),
        clip=check_fraction(f"{prefix}.clip", options.get("clip", APPOTrainerOptions.clip)),
        exclude_token_ids=excluded,
        timeout_s=check_positive(
            f"{prefix}.timeout_s", options.get("timeout_s", APPOTrainerOptions.timeout_s)
        ),
        train_branches=train_branches,
    )


def _concat(first: KVBatchMeta, second: KVBatchMeta) -> KVBatchMeta:
    return KVBatchMeta(
        keys=first.keys + second.keys,
        tags=first.tags + second.tags,
        partition_id=first.partition_id,
        extra_info=first.extra_info,
    )


def _require(rows: TensorDict, fields: Sequence[str], what: str) -> None:
    """TransferQueue leaves out a field that one of the selected rows lacks: say which."""
    missing = sorted(set(fields) - set(rows.keys()))
    if missing:
        raise ValueError(f"{what} lack {missing} in TransferQueue (some row has no such field)")


def _jagged(rows: torch.Tensor) -> torch.Tensor:
    """Per-row tensors as TransferQueue's SimpleStorage returns them (jagged), whatever the
    storage backend handed back."""
    if rows.is_nested:
        return rows
    return torch.nested.as_nested_tensor(list(rows), layout=torch.jagged)


def _left_padded(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) ``[B, P]``: the jagged rows right-aligned, 0 before them."""
    rows = _jagged(rows)
    lengths = rows.offsets().diff()
    width = int(lengths.max())
    ids = torch.zeros(len(lengths), width, dtype=rows.dtype)
    mask = torch.arange(width) >= (width - lengths)[:, None]
    ids[mask] = rows.values()
    return ids, mask.long()


def _postprocessed(rows: TensorDict) -> DataProto:
    """TransferQueue rows laid out as verl's agent loop post-processing builds a batch
    (left-padded prompts, right-padded responses and per-token fields, attention mask)."""
    prompts, prompt_mask = _left_padded(rows["prompts"])
    response_lengths = _jagged(rows["responses"]).offsets().diff()
    width = int(response_lengths.max())
    response_attention = (torch.arange(width) < response_lengths[:, None]).long()
    tensors = {
        "prompts": prompts,
        "attention_mask": torch.cat([prompt_mask, response_attention], dim=1),
        **{key: _jagged(rows[key]).to_padded_tensor(0) for key in _PER_TOKEN_FIELDS},
    }
    columns = {key: object_column(list(rows[key])) for key in ("uid", "extra_fields")}
    return DataProto(batch=TensorDict(tensors, batch_size=[len(prompts)]), non_tensor_batch=columns)


def _add_fields(data: DataProto, fields: TensorDict) -> None:
    """The rows' prompt fields, as the columns or tensors ``build_branch_rows`` reads
    (TransferQueue hands back per-row tensors as jagged ones)."""
    for key in fields.keys():
        value = fields[key]
        if not isinstance(value, torch.Tensor):
            data.non_tensor_batch[key] = object_column(list(value))
            continue
        parts = value.unbind() if value.is_nested else list(value)
        if any(part.shape != parts[0].shape for part in parts):
            raise ValueError(
                f"prompt field {key!r} holds tensors of different shapes per row; branch rows "
                "carry prompt tensors of one shape only"
            )
        data.batch[key] = torch.stack(parts)


@register_trainer(TRAINER_NAME)
class APPOTrainer(PPOTrainerSync):
    """``PPOTrainerSync`` with APPO's branching step (module docstring)."""

    def __init__(self, config: DictConfig):
        self.appo = check_config(config)
        super().__init__(config)
        self._branch_rows: KVBatchMeta | None = None

    # verl's base trainer picks its replay buffer, dataloader refill and TransferQueue
    # checkpointing by `trainer_mode == "sync"`; APPO's step is synchronous, so verl's code reads
    # "sync" here, and the configured name ("appo") is kept in `mode`.
    @property
    def trainer_mode(self) -> str:
        return "sync"

    @trainer_mode.setter
    def trainer_mode(self, name: str) -> None:
        self.mode = name

    def _compute_old_log_prob(self, batch: KVBatchMeta, metrics: dict) -> KVBatchMeta:
        batch = super()._compute_old_log_prob(batch, metrics)
        if self.appo.budget == 0:
            return batch
        with marked_timer("appo_branch", self.timing_raw, color="purple"):
            branch = self._branch(batch, metrics)
        if branch is None:
            return batch
        if self.appo.train_branches:  # reference log-probs, values and the update see them too
            return self._balance_batch(_concat(batch, branch), metrics)
        self._branch_rows = branch
        return batch

    def _compute_advantage(self, batch: KVBatchMeta, metrics: dict) -> KVBatchMeta:
        branch, self._branch_rows = self._branch_rows, None
        if branch is None:
            return super()._compute_advantage(batch, metrics)
        super()._compute_advantage(_concat(batch, branch), metrics)
        tq.kv_clear(keys=branch.keys, partition_id=branch.partition_id)
        # the initial rows, every field they hold (advantages included)
        return KVBatchMeta(
            keys=batch.keys,
            tags=batch.tags,
            partition_id=batch.partition_id,
            extra_info=batch.extra_info,
        )

    # ------------------------------------------------------------------------------------------

    def _branch(self, batch: KVBatchMeta, metrics: dict) -> KVBatchMeta | None:
        """The branch rows of ``batch`` in TransferQueue, rewarded and with old log-probs (module
        docstring); None when there are none. Gives the initial rows their ``#appo:<k>`` uids."""
        partition, options = batch.partition_id, self.appo
        keys = [key for key, tag in zip(batch.keys, batch.tags) if not tag.get("is_padding")]
        data = self._initial_rows(keys, partition)
        branches = select_branches(
            data,
            options.budget,
            rule=options.rule,
            gamma=options.gamma,
            clip=options.clip,
            exclude_token_ids=options.exclude_token_ids,
        )
        uids = TensorDict({"uid": NonTensorStack(*branches.batch_uid)}, batch_size=[len(keys)])
        tq.kv_batch_put(keys=keys, partition_id=partition, fields=uids)
        metrics["appo/branch/points"] = len(branches.parent)
        if len(branches.parent) == 0:
            return None
        metrics["appo/branch/score/mean"] = float(branches.score.mean())
        metrics["appo/branch/split/mean"] = float(branches.split.float().mean())
        requests = build_branch_rows(data, branches)
        rows = self._generate(requests, partition)
        rollouts = int(sum(requests.non_tensor_batch[ROLLOUT_N_FIELD]))
        metrics["appo/branch/rollouts"] = rollouts
        metrics["appo/branch/failed"] = rollouts - len(rows)
        rows = self._keep_matching_prefixes(rows, data, metrics)
        if len(rows) == 0:
            return None
        if self.reward_loop_manager.reward_loop_worker_handles is None:
            rows = self._compute_reward_colocate(rows, metrics=metrics)
        scores = tq.kv_batch_get(keys=rows.keys, partition_id=partition, select_fields="rm_scores")
        _require(scores, ["rm_scores"], "branch rows")
        metrics["appo/branch/reward/mean"] = float(
            torch.stack([row.sum() for row in scores["rm_scores"].unbind()]).mean()
        )
        rows = self._balance_batch(rows, metrics, logging_prefix="appo/branch/seqlen")
        branch_metrics: dict = {}
        rows = super()._compute_old_log_prob(rows, branch_metrics)
        metrics.update({f"appo/branch/{key}": value for key, value in branch_metrics.items()})
        return rows

    def _initial_rows(self, keys: list[str], partition: str) -> DataProto:
        rows = tq.kv_batch_get(keys=keys, partition_id=partition, select_fields=list(_ROW_FIELDS))
        _require(rows, _ROW_FIELDS, "initial rows")
        data = _postprocessed(rows)
        names = set()
        for record in resume_records(data):
            if isinstance(record, Mapping):
                names.update(record.get("prompt_fields", ()))
        names = sorted(names - {"uid"})
        if names:
            fields = tq.kv_batch_get(keys=keys, partition_id=partition, select_fields=names)
            _require(fields, names, "initial rows")
            _add_fields(data, fields)
        return data

    def _generate(self, requests: DataProto, partition: str) -> KVBatchMeta:
        """Runs ``requests`` through the agent loop manager (replicas woken with the weights that
        sampled the initial rows, asleep again after); returns the rows that came back."""
        uids = list(requests.non_tensor_batch["uid"])
        tensors = dict(requests.batch.items()) if requests.batch is not None else {}
        prompts = tu.get_tensordict({**tensors, **requests.non_tensor_batch})
        tu.assign_non_tensor_data(prompts, "global_steps", self.global_steps)
        step = {"is_prompt": True, "status": "pending", "global_steps": self.global_steps}
        tq.kv_batch_put(keys=uids, partition_id=partition, tags=[dict(step) for _ in uids])
        # verl syncs the weights after each step (on_step_end), so the ones that sampled this
        # step's rollouts are version global_steps - 1
        self.checkpoint_manager.update_weights(self.global_steps - 1)
        try:
            self.agent_loop_manager.generate_sequences(prompts)
            self._wait_for(uids, partition)
        finally:
            self.checkpoint_manager.sleep_replicas()
        listing = tq.kv_list(partition) or {}
        listing = listing.get(partition, {})
        wanted = set(uids)
        keys = [
            key
            for key, tag in listing.items()
            if not tag.get("is_prompt") and key.rsplit("_", 2)[0] in wanted
        ]
        tq.kv_clear(keys=uids, partition_id=partition)
        return KVBatchMeta(keys=keys, tags=[listing[key] for key in keys], partition_id=partition)

    def _wait_for(self, uids: list[str], partition: str) -> None:
        deadline = time.monotonic() + self.appo.timeout_s
        while True:
            listing = (tq.kv_list(partition) or {}).get(partition, {})
            pending = [uid for uid in uids if listing.get(uid, {}).get("status") not in _TERMINAL]
            if not pending:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{len(pending)} of {len(uids)} branch requests did not finish within "
                    f"trainer.v1.{TRAINER_NAME}.timeout_s={self.appo.timeout_s}"
                )
            time.sleep(POLL_S)

    def _keep_matching_prefixes(
        self, rows: KVBatchMeta, data: DataProto, metrics: dict
    ) -> KVBatchMeta:
        """Drops (and clears) branch rows whose prompt or response prefix differs from their
        parent's: token ids, response mask and rollout log-probs of ``[0, split)``."""
        if len(rows) == 0:
            metrics["appo/branch/prefix_mismatch"] = 0
            return rows
        got = tq.kv_batch_get(
            keys=rows.keys, partition_id=rows.partition_id, select_fields=["uid", *_PREFIX_FIELDS]
        )
        _require(got, _PREFIX_FIELDS, "branch rows")
        prompt_width = data.batch["prompts"].shape[1]
        kept = []
        for i, (key, uid) in enumerate(zip(rows.keys, got["uid"])):
            parent, split = (int(x) for x in str(uid).partition(UID_TAG)[2].split(":"))
            prompt_mask = data.batch["attention_mask"][parent, :prompt_width].bool()
            same = torch.equal(got["prompts"][i], data.batch["prompts"][parent][prompt_mask])
            for field in _PREFIX_FIELDS[1:]:
                same = same and torch.equal(
                    got[field][i][:split], data.batch[field][parent, :split].to(got[field].dtype)
                )
            if same:
                kept.append(key)
        dropped = [key for key in rows.keys if key not in set(kept)]
        if dropped:
            tq.kv_clear(keys=dropped, partition_id=rows.partition_id)
        metrics["appo/branch/prefix_mismatch"] = len(dropped)
        return rows.select_keys(kept)
