"""APPO inside verl (tested with verl 0.9.1): policy losses, the advantage estimator, the kernels
and the branching step.

verl loads this module on ``import verl`` through the ``verl.plugins`` entry point of this package,
in the driver and in every Ray worker, and the import calls ``register()``:

- policy losses ``"appo"`` (future-likelihood scaling, then dual-clip PPO with clip-higher:
  docs/design.md section 9) and ``"appo_dual_clip"`` (the dual-clip loss only):
  ``actor.policy_loss.loss_mode=appo``.
  They read verl's own keys (``clip_ratio_low/high``, ``clip_ratio_c``, ``loss_agg_mode``, the
  global token count in ``global_batch_info``) and the scaling options of
  ``APPOPolicyLossConfig`` (set ``actor.policy_loss._target_`` to
  ``appo.integrations.verl.APPOPolicyLossConfig``; without it, the defaults of docs/design.md
  section 9);
- advantage estimator ``"appo"`` (``algorithm.adv_estimator=appo``): the dual-group procedure-level
  advantage of docs/design.md section 8 (``appo.advantages.procedure_advantages``). verl's
  ``compute_advantage`` hands an estimator the rewards, the response mask and the ``uid`` of each
  row, nothing else, so the branch tree travels in the uid: ``select_branches`` gives the
  initial rows uids ``"<uid>#appo:<k>"`` and the branch rows ``"<uid>#appo:<k>:<split>"``
  (parent ``k``, first re-sampled response position ``split``). Rows with a plain uid get plain
  group-normalised advantages, ``(R − mean) / (std_population + 1e-6)`` per uid.

``use_kernels()`` swaps verl's log-prob / entropy functions for ``appo_kernels.token_stats`` and
its fused LM head (``actor.use_fused_kernels=True``) for ``appo_kernels.linear_token_stats``.
With ``APPO_VERL_KERNELS=1`` in the environment, the import (so every verl process) turns them on
for the life of the process.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

try:
    from verl import DataProto
    from verl.trainer.ppo import core_algos
    from verl.workers.config import PolicyLossConfig
except ImportError as error:  # pragma: no cover - exercised in an environment without verl
    raise ImportError(
        "appo.integrations.verl needs verl (tested with 0.9.1), which pins transformers < 5.11: "
        "install it in its own environment with pip install 'appo-kernels[verl]'"
    ) from error

import numpy as np
import torch

import appo_kernels
from appo.advantages import procedure_advantages
from appo.branching import branch_candidates, plan_branches
from appo.loss import (
    check_loss_inputs,
    check_token_count,
    future_likelihood_scale,
    ppo_token_loss,
)
from appo_kernels import token_stats, validation

UID_TAG = "#appo:"


@dataclass
class APPOPolicyLossConfig(PolicyLossConfig):
    """verl's ``PolicyLossConfig`` plus the future-likelihood scaling options of docs/design.md
    section 9 (``appo.loss.future_likelihood_scale``'s keyword arguments, prefixed ``scale_``)."""

    loss_mode: str = "appo"
    scale_c: float = 3.0
    scale_half_life: float = 64.0
    scale_clip: float = 0.2
    scale_clip_high_only: bool = True
    scale_neg_ratio_cap: float = 6.0
    scale_bonus: float = 1.0


_SCALE_DEFAULTS = APPOPolicyLossConfig()
_SCALE_OPTIONS = ("c", "half_life", "clip", "clip_high_only", "neg_ratio_cap", "bonus")


def _policy_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str,
    config: Any,
    rollout_is_weights: torch.Tensor | None,
    *,
    scale: bool,
) -> tuple[torch.Tensor, dict[str, float]]:
    if config is None:
        raise ValueError("config (verl's ActorConfig) is required by the APPO policy losses")
    valid = check_loss_inputs(
        {
            "log_prob": log_prob,
            "old_log_prob": old_log_prob,
            "advantages": advantages,
            "rollout_is_weights": rollout_is_weights,
        },
        response_mask,
        optional=("rollout_is_weights",),
        mask_name="response_mask",
    )
    if scale:
        options = config.policy_loss
        kwargs = {
            name: options.get(f"scale_{name}", getattr(_SCALE_DEFAULTS, f"scale_{name}"))
            for name in _SCALE_OPTIONS
        }
        advantages = future_likelihood_scale(advantages, log_prob, old_log_prob, valid, **kwargs)
    clip_ratio = config.clip_ratio
    clip_low = config.clip_ratio_low if config.clip_ratio_low is not None else clip_ratio
    clip_high = config.clip_ratio_high if config.clip_ratio_high is not None else clip_ratio
    token_loss, log_ratio = ppo_token_loss(
        log_prob,
        old_log_prob,
        advantages,
        valid,
        clip_low=clip_low,
        clip_high=clip_high,
        dual_clip=config.get("clip_ratio_c", 3.0),
    )
    if rollout_is_weights is not None:
        token_loss = torch.where(valid, token_loss * rollout_is_weights, 0.0)
    valid_tokens = int(valid.sum())
    if valid_tokens == 0:
        # appo.loss's rule for an empty mini-batch: 0 with a zero gradient, on the graph (verl's
        # agg_loss divides by a count of 0 here, a NaN loss when no positive global count is set)
        loss = token_loss.sum()
    else:
        loss = core_algos.agg_loss(
            loss_mat=token_loss,
            loss_mask=response_mask,
            loss_agg_mode=loss_agg_mode,
            **_checked_counts(config.global_batch_info, loss_agg_mode, valid_tokens),
        )
    with torch.no_grad():
        count = valid.sum().clamp_min(1)
        metrics = {
            "actor/ppo_kl": float(-log_ratio.sum() / count),
            "actor/advantage_abs_mean": float(
                torch.where(valid, advantages, 0.0).abs().sum() / count
            ),
        }
    return loss, metrics


def _checked_counts(info: Any, loss_agg_mode: str, valid_tokens: int) -> dict[str, Any]:
    """verl's ``global_batch_info`` (the global counts ``agg_loss`` divides by), with the count
    that ``loss_agg_mode`` divides by checked: > 0 for a mini-batch with ``valid_tokens``."""
    info = dict(info or {})
    key = "batch_num_tokens" if loss_agg_mode == "token-mean" else "global_batch_size"
    value = info.get(key)
    if value is not None and loss_agg_mode != "token-sum":
        if isinstance(value, (torch.Tensor, np.number)):
            value = value.item()
        check_token_count(f"config.global_batch_info[{key!r}]", value, valid_tokens)
    return info


def appo_policy_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """verl policy loss ``"appo"``: future-likelihood scaled advantages in the dual-clip PPO loss
    with clip-higher (docs/design.md section 9), aggregated by verl's ``agg_loss``."""
    return _policy_loss(
        old_log_prob,
        log_prob,
        advantages,
        response_mask,
        loss_agg_mode,
        config,
        rollout_is_weights,
        scale=True,
    )


def appo_dual_clip_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """verl policy loss ``"appo_dual_clip"``: the dual-clip PPO loss (docs/design.md section 9) on
    the advantages as given (no scaling); equals verl's ``"vanilla"`` loss."""
    return _policy_loss(
        old_log_prob,
        log_prob,
        advantages,
        response_mask,
        loss_agg_mode,
        config,
        rollout_is_weights,
        scale=False,
    )


def _check_uids(name: str, uids: object, rows: int | None = None) -> Sequence[object]:
    """A sequence of uids, ``rows`` of them when given (a list, tuple or array: not a string,
    whose characters would pass for uids)."""
    if isinstance(uids, (str, bytes)) or not isinstance(uids, (Sequence, np.ndarray)):
        raise TypeError(
            f"{name} must be a sequence of uids (verl's non_tensor_batch['uid']), got "
            f"{type(uids).__name__}"
        )
    if rows is not None and len(uids) != rows:
        raise ValueError(f"{name} must have one uid per row ({rows}), got {len(uids)}")
    return uids


def _parse_uids(
    index: Sequence[object], length: int, name: str = "index"
) -> tuple[torch.Tensor, ...]:
    """(group_ids, is_branch, parent, split) [R] from uids (module docstring); errors name the
    uids ``name``."""
    groups: dict[str, int] = {}
    initial_rows: dict[tuple[int, str], int] = {}
    rows = []
    for row, uid in enumerate(index):
        group, tagged, tail = str(uid).partition(UID_TAG)
        fields = tail.split(":") if tagged else []
        if len(fields) > 2 or not all(field.isdigit() for field in fields):
            raise ValueError(
                f"{name}[{row}] must be a uid, '<uid>{UID_TAG}<k>' or "
                f"'<uid>{UID_TAG}<k>:<split>', got {uid!r}"
            )
        group_id = groups.setdefault(group, len(groups))
        if len(fields) == 1:
            if (group_id, fields[0]) in initial_rows:
                raise ValueError(f"{name}[{row}]: initial rollout {uid!r} appears twice")
            initial_rows[group_id, fields[0]] = row
        rows.append((group_id, fields))
    group_ids, is_branch, parent, split = [], [], [], []
    for row, (group_id, fields) in enumerate(rows):
        group_ids.append(group_id)
        is_branch.append(len(fields) == 2)
        if len(fields) == 2:
            if (group_id, fields[0]) not in initial_rows:
                raise ValueError(
                    f"{name}[{row}] = {index[row]!r} is a branch of initial rollout {fields[0]}, "
                    "which is not in the batch"
                )
            parent.append(initial_rows[group_id, fields[0]])
            split.append(min(int(fields[1]), length))
        else:
            parent.append(-1)
            split.append(0)
    return (
        torch.tensor(group_ids, dtype=torch.int64),
        torch.tensor(is_branch, dtype=torch.bool),
        torch.tensor(parent, dtype=torch.int64),
        torch.tensor(split, dtype=torch.int64),
    )


def appo_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Sequence[object] | None = None,
    config: Any = None,
    **unused: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl advantage estimator ``"appo"``: (advantages, returns), both the token advantages of
    docs/design.md section 8, ``[R, T]`` float32. ``index`` is verl's ``uid`` column (module
    docstring). Branch rows get 0 (drop them before the update with ``is_branch_row``) unless
    ``config`` (``algorithm``) sets ``appo_train_branches``, which gives them their own ``Â_b``."""
    check_loss_inputs(
        {"token_level_rewards": token_level_rewards}, response_mask, mask_name="response_mask"
    )
    if index is None:
        raise ValueError("index (verl's uid column) is required by the 'appo' estimator")
    _check_uids("index", index, token_level_rewards.shape[0])
    device = token_level_rewards.device
    group_ids, is_branch, parent, split = (
        x.to(device) for x in _parse_uids(index, response_mask.shape[-1])
    )
    train_branches = config is not None and bool(config.get("appo_train_branches", False))
    advantages = procedure_advantages(
        token_level_rewards.sum(dim=-1),
        group_ids,
        is_branch,
        parent,
        split,
        response_mask,
        train_branches=train_branches,
    )
    return advantages, advantages


def is_branch_row(uids: Sequence[object]) -> np.ndarray:
    """[R] bool: rows whose uid marks a branch rollout (``select_branches``'s ``uid``)."""
    _check_uids("uids", uids)
    return np.array([str(uid).partition(UID_TAG)[2].count(":") == 1 for uid in uids], dtype=bool)


def register() -> None:
    """Registers the policy losses ``"appo"``, ``"appo_dual_clip"`` and the advantage estimator
    ``"appo"`` in verl's registries; idempotent."""
    core_algos.register_policy_loss("appo")(appo_policy_loss)
    core_algos.register_policy_loss("appo_dual_clip")(appo_dual_clip_loss)
    core_algos.register_adv_est("appo")(appo_advantage)


# ---------------------------------------------------------------------------------------------
# use_kernels: verl's log-prob / entropy functions on appo_kernels


def _check_rows_and_ids(rows_name: str, rows: object, ids_name: str, ids: object) -> None:
    """verl's names for what token_stats / linear_token_stats read: float ``[..., X]`` rows and
    integer ids of shape ``rows.shape[:-1]`` (checked before an id tensor is cast, so float ids
    are an error rather than silently truncated)."""
    rows = validation.check_float(rows_name, rows)
    ids = validation.check_int(ids_name, ids)
    validation.check_shape(ids_name, ids, rows.shape[:-1], f"{rows_name}.shape[:-1]")


def logprobs_from_logits(
    logits: torch.Tensor, labels: torch.Tensor, inplace_backward: bool = True
) -> torch.Tensor:
    """``verl.utils.torch_functional.logprobs_from_logits`` on ``token_stats`` (float32)."""
    _check_rows_and_ids("logits", logits, "labels", labels)
    return token_stats(logits, labels).logprob


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """``verl.utils.torch_functional.entropy_from_logits`` on ``token_stats``: every row's token
    is ``ignore_index``, so only the entropy is computed (float32)."""
    ignored = torch.full(logits.shape[:-1], -100, dtype=torch.int64, device=logits.device)
    return token_stats(logits, ignored).entropy


def entropy_from_logits_with_chunking(logits: torch.Tensor, chunk_size: int = 2048) -> torch.Tensor:
    """``verl.utils.torch_functional.entropy_from_logits_with_chunking``: ``token_stats`` already
    streams the vocabulary with a few MB of working space, so there is nothing to chunk."""
    return entropy_from_logits(logits)


class FusedLinearForPPO(torch.nn.Module):
    """``verl.utils.experimental.torch_functional.FusedLinearForPPO`` (verl's fused LM head,
    ``use_fused_kernels=True`` with the torch backend) on ``linear_token_stats``."""

    def __init__(self, chunk_size: int = 512, impl_backend: str = "torch"):
        super().__init__()
        self.impl_backend = impl_backend

    def forward(
        self,
        hidden_states: torch.Tensor,
        vocab_weights: torch.Tensor,
        input_ids: torch.Tensor,
        temperature: float = 1.0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        _check_rows_and_ids("hidden_states", hidden_states, "input_ids", input_ids)
        validation.check_float("vocab_weights", vocab_weights)
        stats = appo_kernels.linear_token_stats(
            hidden_states, vocab_weights, input_ids.long(), temperature=temperature
        )
        return stats.logprob, stats.entropy


def _linear_cross_entropy(original):
    """``verl.utils.kernel.linear_cross_entropy.linear_cross_entropy`` (the triton backend of
    ``use_fused_kernels``) on ``linear_token_stats``; a vocabulary split across a process group
    or a reduction other than ``"none"`` stays on verl's kernel."""

    def linear_cross_entropy(
        hidden, weight, labels, temperature=1.0, reduction="none", dist_process_group=None
    ):
        if dist_process_group is not None or reduction != "none":
            return original(hidden, weight, labels, temperature, reduction, dist_process_group)
        _check_rows_and_ids("hidden", hidden, "labels", labels)
        stats = appo_kernels.linear_token_stats(
            hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1).long(),
            temperature=float(temperature),
        )  # fmt: skip
        return stats.logprob, stats.entropy

    return linear_cross_entropy


def _swaps() -> dict[object, object]:
    """{verl's function or class: its replacement}."""
    import verl.utils.experimental.torch_functional as fused
    import verl.utils.torch_functional as verl_F

    swaps = {
        verl_F.logprobs_from_logits: logprobs_from_logits,
        verl_F.entropy_from_logits: entropy_from_logits,
        verl_F.entropy_from_logits_with_chunking: entropy_from_logits_with_chunking,
        fused.FusedLinearForPPO: FusedLinearForPPO,
    }
    try:  # needs triton
        import verl.utils.kernel.linear_cross_entropy as lce
    except ImportError:  # pragma: no cover
        return swaps
    swaps[lce.linear_cross_entropy] = _linear_cross_entropy(lce.linear_cross_entropy)
    return swaps


def _rebind(mapping: dict[int, object], modules_prefix: str = "verl") -> None:
    """Replaces, in every loaded verl module, each attribute whose id is a key of ``mapping``."""
    for name, module in list(sys.modules.items()):
        if module is None or not (name == modules_prefix or name.startswith(modules_prefix + ".")):
            continue
        for attribute, value in list(vars(module).items()):
            if id(value) in mapping:
                setattr(module, attribute, mapping[id(value)])


_active: list[dict[object, object]] = []


@contextlib.contextmanager
def use_kernels() -> Iterator[None]:
    """Within the block, verl computes log-probs and entropies with ``appo_kernels``:
    ``logprobs_from_logits`` / ``entropy_from_logits`` (and ``_with_chunking``) run on
    ``token_stats``, the fused LM head (``use_fused_kernels``, torch and triton backends) on
    ``linear_token_stats``. Every verl module that imported those names sees the swap; all are
    restored on exit (nesting is fine). Build verl's engines inside the block: an engine keeps the
    entropy function it found when it was built."""
    if not _active:
        swaps = _swaps()
        _rebind({id(old): new for old, new in swaps.items()})
        _active.append(swaps)
    else:
        _active.append(_active[-1])
    try:
        yield
    finally:
        swaps = _active.pop()
        if not _active:
            _rebind({id(new): old for old, new in swaps.items()})


# ---------------------------------------------------------------------------------------------
# select_branches: APPO's branching step on a verl batch


class Branches(NamedTuple):
    """Where to branch a verl batch and what to send back to the rollout engine.

    ``N`` branches (``budget`` per prompt group that has a candidate). Response coordinates are
    those of ``batch.batch["responses"]``: in a multi-turn batch they include tool-output tokens,
    so the prefixes carry them, with their ``response_mask`` 0 and ``rollout_log_probs`` as
    recorded, aligned token for token.
    """

    parent: torch.Tensor  # [N] int64: the batch row each branch continues
    position: torch.Tensor  # [N] int64: the chosen response position
    split: torch.Tensor  # [N] int64: the first re-sampled response position
    score: torch.Tensor  # [N] float32: the Branching Score of the chosen position
    prefix_ids: list[list[int]]  # prompt (no padding) + responses[parent, :split]
    prefix_response_mask: list[torch.Tensor]  # responses' mask over [0, split)
    prefix_rollout_log_probs: list[torch.Tensor]  # behaviour log-probs over [0, split)
    uid: np.ndarray  # [N] object: the branch rows' uids, '<uid>#appo:<k>:<split>'
    batch_uid: np.ndarray  # [B] object: new uids for the batch's rows, '<uid>#appo:<k>'


def _tensor(batch: DataProto, key: str, hint: str = "") -> tuple[str, torch.Tensor]:
    """(the name errors give it, ``batch.batch[key]``)."""
    if key not in batch.batch.keys():
        raise ValueError(
            f"batch.batch must hold {key!r}{hint}; it has {sorted(batch.batch.keys())}"
        )
    return f"batch.batch[{key!r}]", batch.batch[key]


def _blank_table(exclude_token_ids: object, responses: torch.Tensor) -> torch.Tensor | None:
    """``branch_candidates``' bool table of the excluded ids, as long as the largest response id
    needs (an id past every response token can exclude nothing, so a huge id costs nothing)."""
    if exclude_token_ids is None:
        return None
    name = "exclude_token_ids"
    if isinstance(exclude_token_ids, torch.Tensor):
        ids = validation.check_int(name, exclude_token_ids).flatten().to(torch.int64)
    else:
        if isinstance(exclude_token_ids, (str, bytes)) or not isinstance(
            exclude_token_ids, Iterable
        ):
            raise TypeError(
                f"{name} must be a collection of integer token ids or an integer tensor, got "
                f"{type(exclude_token_ids).__name__}"
            )
        for i, token in enumerate(exclude_token_ids):
            if isinstance(token, (bool, np.bool_)) or not isinstance(token, (int, np.integer)):
                raise TypeError(
                    f"{name} must hold integer token ids, got {token!r} "
                    f"({type(token).__name__}) at position {i}; map token strings to ids with "
                    "the tokenizer first (tokenizer.convert_tokens_to_ids)"
                )
        ids = torch.tensor([int(token) for token in exclude_token_ids], dtype=torch.int64)
    if ids.numel() and int(ids.min()) < 0:
        raise ValueError(f"{name} must hold token ids >= 0, got {int(ids.min())}")
    size = int(responses.max()) + 1 if responses.numel() else 0
    ids = ids[ids < size].to(responses.device)
    table = torch.zeros(size, dtype=torch.bool, device=responses.device)
    return table.index_fill_(0, ids, True)


def _checked_batch(batch: DataProto, entropy_key: str, log_prob_key: str,
                   rollout_log_prob_key: str):  # fmt: skip
    """What ``select_branches`` reads, validated by name: integer ``responses`` [B, T] and
    ``prompts`` [B, P], masks ``response_mask`` [B, T] (as bool) and ``attention_mask``
    [B, P + T], float [B, T] entropies and log-probs, one device, B uids of initial rollouts."""
    r_name, responses = _tensor(batch, "responses")
    p_name, prompts = _tensor(batch, "prompts")
    m_name, response_mask = _tensor(batch, "response_mask")
    a_name, attention_mask = _tensor(batch, "attention_mask")
    stats = [
        _tensor(batch, entropy_key, " (compute_log_prob with calculate_entropy=True)"),
        _tensor(batch, log_prob_key, " (compute_log_prob)"),
        _tensor(
            batch, rollout_log_prob_key, " (actor_rollout_ref.rollout.calculate_log_probs=True)"
        ),
    ]
    validation.check_ndim(r_name, validation.check_int(r_name, responses), 2, "[B, T]")
    rows, length = responses.shape
    validation.check_ndim(p_name, validation.check_int(p_name, prompts), 2, "[B, P]")
    validation.check_shape(p_name, prompts, (rows, prompts.shape[1]), f"[B, P], B from {r_name}")
    validation.check_shape(m_name, validation.check_mask(m_name, response_mask), responses.shape,
                           r_name)  # fmt: skip
    validation.check_shape(
        a_name,
        validation.check_mask(a_name, attention_mask),
        (rows, prompts.shape[1] + length),
        f"[B, P + T]: the prompts' and the responses' columns, P from {p_name}, T from {r_name}",
    )
    for name, x in stats:
        validation.check_shape(name, validation.check_float(name, x), responses.shape, r_name)
    named = {r_name: responses, p_name: prompts, m_name: response_mask, a_name: attention_mask}
    validation.check_same_device(named | dict(stats))
    if "uid" not in batch.non_tensor_batch:
        raise ValueError("batch.non_tensor_batch must hold 'uid' (the prompt group of each row)")
    u_name = "batch.non_tensor_batch['uid']"
    uids = _check_uids(u_name, batch.non_tensor_batch["uid"], rows)
    is_branch = _parse_uids(uids, length, u_name)[1]
    if bool(is_branch.any()):
        row = int(is_branch.nonzero()[0])
        raise ValueError(
            f"{u_name}[{row}] = {uids[row]!r} is a branch row (from an earlier select_branches): "
            "select_branches takes a batch of initial rollouts; drop the branch rows first "
            "(batch[~is_branch_row(uids)])"
        )
    return responses, response_mask.bool(), prompts, attention_mask, [x for _, x in stats]


def select_branches(
    batch: DataProto,
    budget: int,
    *,
    rule: str = "appo",
    keep_selected_token: bool = False,
    gamma: float = 1.0,
    clip: float = 0.2,
    exclude_token_ids: Iterable[int] | torch.Tensor | None = None,
    entropy_key: str = "entropy",
    log_prob_key: str = "old_log_probs",
    rollout_log_prob_key: str = "rollout_log_probs",
) -> Branches:
    """APPO's branching step (docs/design.md sections 5-7) on a verl batch of initial rollouts.

    Scores every generated token with ``branching_score_from_stats`` (trainer entropies and
    log-probs against the rollout engine's log-probs), picks ``budget`` points per prompt group
    (rows sharing a uid) with ``select_branch_points`` (preferred: ``z(H) > 0`` and ``z(Ω) > 0``)
    among generated tokens (``response_mask`` 1, so never prompt, tool output or padding) that
    are not in ``exclude_token_ids`` (e.g. whitespace-only tokens).

    Args:
        batch: verl ``DataProto`` of initial rollouts with integer ``prompts`` ``[B, P]``
            (left-padded) and ``responses`` ``[B, T]``, ``attention_mask`` ``[B, P + T]``,
            ``response_mask`` ``[B, T]``, the float ``[B, T]`` entropy and log-prob columns named
            below (verl's ``compute_log_prob`` with entropy, and
            ``rollout.calculate_log_probs=True``) and ``non_tensor_batch["uid"]``. Each is checked
            by name before use. A batch that still holds branch rows (uids
            ``<uid>#appo:<k>:<split>``, from an earlier call) is refused: their parent and split
            would be lost; drop them first (``is_branch_row``).
        budget: branch points per prompt group (>= 1).
        rule: the branch-point rule, a name in ``appo.branching.RULES`` (docs/design.md section
            7.1a); ``"appo"`` is the Branching Score described above.
        keep_selected_token: keep the chosen token and re-sample from the next one (the paper
            code's variant); a row's last generated token is then never chosen.
        gamma, clip: future-value discount and clip (docs/design.md section 5).
        exclude_token_ids: token ids (ints or an integer tensor, >= 0) never branched at;
            token strings are a ``TypeError`` (map them with the tokenizer first).

    Returns:
        ``Branches``. Set ``batch.non_tensor_batch["uid"] = branches.batch_uid``, give each
        branch row ``branches.uid``, and verl's ``compute_advantage`` with
        ``adv_estimator="appo"`` credits every branch to its parent's prefix.
    """
    budget = validation.check_count("budget", budget, 1)
    responses, response_mask, prompts, attention_mask, stats = _checked_batch(
        batch, entropy_key, log_prob_key, rollout_log_prob_key
    )
    entropy, log_prob, rollout_log_prob = stats
    group_uids = [str(uid).partition(UID_TAG)[0] for uid in batch.non_tensor_batch["uid"]]
    names, group_ids = np.unique(np.array(group_uids, dtype=object), return_inverse=True)
    device = responses.device

    blank = _blank_table(exclude_token_ids, responses)
    plan = plan_branches(
        rule,
        entropy=entropy,
        logprob=log_prob,
        behavior_logprob=rollout_log_prob,
        mask=response_mask,
        candidates=branch_candidates(
            response_mask,
            responses,
            blank_tokens=blank,
            keep_selected_token=keep_selected_token,
        ),
        group_ids=torch.as_tensor(group_ids, device=device),
        budget=budget,
        num_groups=len(names),
        gamma=gamma,
        clip=clip,
    )
    parent, position = plan.rows, plan.positions
    split = position + int(keep_selected_token)

    prompt_width = prompts.shape[1]
    prefix_ids, prefix_mask, prefix_log_probs, uid = [], [], [], []
    for row, cut in zip(parent.tolist(), split.tolist()):
        prompt = prompts[row][attention_mask[row, :prompt_width].bool()]
        prefix_ids.append(prompt.tolist() + responses[row, :cut].tolist())
        prefix_mask.append(response_mask[row, :cut].to(torch.int64))
        prefix_log_probs.append(rollout_log_prob[row, :cut])
        uid.append(f"{group_uids[row]}{UID_TAG}{row}:{cut}")
    batch_uid = [f"{group}{UID_TAG}{row}" for row, group in enumerate(group_uids)]
    return Branches(
        parent=parent,
        position=position,
        split=split,
        score=plan.scores,
        prefix_ids=prefix_ids,
        prefix_response_mask=prefix_mask,
        prefix_rollout_log_probs=prefix_log_probs,
        uid=np.array(uid, dtype=object),
        batch_uid=np.array(batch_uid, dtype=object),
    )


register()
if os.environ.get("APPO_VERL_KERNELS") == "1":
    # for the life of this process (verl's workers import this module); the reference keeps the
    # context from being closed by garbage collection
    _process_kernels = use_kernels()
    _process_kernels.__enter__()
