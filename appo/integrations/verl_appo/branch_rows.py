"""The branch rows of a verl batch: what the agent loop manager runs to continue the rollouts that
``select_branches`` picked (docs/design.md section 18.3)."""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tensordict import TensorDict
from verl import DataProto

from appo.integrations.verl import UID_TAG, Branches
from appo.integrations.verl_appo.agent_loops import (
    BRANCH_AGENT,
    PREFIX_FIELD,
    RESUME_FIELD,
    TOOL_AGENT,
)

ROLLOUT_N_FIELD = "__rollout_n__"  # per-row rollout count of verl's TransferQueue agent loop worker
_RECORD_KEYS = (
    "request_id",
    "turn_starts",
    "turn_messages",
    "turn_user_turns",
    "messages",
    "prompt_fields",
)


def object_column(values: Sequence[Any]) -> np.ndarray:
    """A 1-d object array of ``values`` (numpy would turn a list of lists into a 2-d array)."""
    column = np.empty(len(values), dtype=object)
    column[:] = list(values)
    return column


def resume_records(batch: DataProto) -> Sequence[Any]:
    """Each row's ``appo_resume`` record (None where a row has none): the non-tensor column of
    that name (verl's ``AgentLoopWorker`` post-processing spreads ``extra_fields`` into columns) or
    the key of that name in the rows' ``extra_fields`` (TransferQueue rows keep them in one)."""
    columns = batch.non_tensor_batch
    if RESUME_FIELD in columns:
        return columns[RESUME_FIELD]
    if "extra_fields" in columns:
        return [
            extra.get(RESUME_FIELD) if isinstance(extra, dict) else None
            for extra in columns["extra_fields"]
        ]
    raise ValueError(
        f"batch must hold the {RESUME_FIELD!r} records of agent loop {TOOL_AGENT!r}, as a "
        f"non-tensor column or in 'extra_fields'; it has {sorted(columns)}"
    )


def _record(records: Sequence[Any], row: int) -> dict[str, Any]:
    record = records[row]
    if not isinstance(record, dict) or any(key not in record for key in _RECORD_KEYS):
        raise ValueError(
            f"row {row} has no {RESUME_FIELD!r} record: run the initial rollouts with agent loop "
            f"{TOOL_AGENT!r} (or a subclass), got {type(record).__name__}"
        )
    return record


def _tensor(batch: DataProto, key: str) -> torch.Tensor:
    if batch.batch is None or key not in batch.batch.keys():
        raise ValueError(f"batch.batch must hold {key!r} (verl's agent loop post-processing)")
    return batch.batch[key]


def build_branch_rows(batch: DataProto, branches: Branches) -> DataProto:
    """The rows that continue ``batch``'s rollouts where ``branches`` says, for verl's agent loop
    manager: one row per distinct (parent, split), with ``__rollout_n__`` the number of times
    ``select_branches`` picked it (a group with fewer candidates than its budget repeats picks).

    ``batch`` is laid out as verl's agent loop post-processing builds it: ``prompts``
    (left-padded), ``responses``, ``attention_mask``, ``response_mask`` and, if the rollout engine
    recorded them, ``rollout_log_probs``; non-tensor ``uid``; each row's ``appo_resume`` record
    (agent loop ``appo_tool_agent``) as a column or in ``extra_fields``; and the fields the record
    names in ``prompt_fields`` (``raw_prompt``, ``tools_kwargs``, ...), as non-tensor columns or
    tensors. ``branches`` is ``select_branches(batch, ...)``.

    Each row has the parent's prompt fields, ``agent_name`` ``"appo_branch"``, uid
    ``"<uid>#appo:<k>:<split>"`` and ``appo_prefix``: the context to continue (unpadded prompt +
    ``responses[k, :split]``, exactly the token ids of the parent, no re-tokenising), the
    response mask and log-probs of the prefix, the messages before the split turn, the split
    turn's tokens before the split, the turn counts and the parent's request id. Returns a
    ``DataProto`` (tensor prompt fields in ``batch``, the rest in ``non_tensor_batch``).
    """
    if not isinstance(batch, DataProto):
        raise TypeError(f"batch must be a verl DataProto, got {type(batch).__name__}")
    if not isinstance(branches, Branches):
        raise TypeError(
            f"branches must be select_branches's Branches, got {type(branches).__name__}"
        )
    prompts = _tensor(batch, "prompts")
    responses = _tensor(batch, "responses")
    attention_mask = _tensor(batch, "attention_mask")
    response_mask = _tensor(batch, "response_mask")
    log_probs = batch.batch["rollout_log_probs"] if "rollout_log_probs" in batch.batch else None
    if "uid" not in batch.non_tensor_batch:
        raise ValueError("batch.non_tensor_batch must hold 'uid' (the prompt group of each row)")
    groups = [str(uid).partition(UID_TAG)[0] for uid in batch.non_tensor_batch["uid"]]
    rows, length = responses.shape
    parents, splits = branches.parent.tolist(), branches.split.tolist()
    if not len(parents) == len(splits) == len(branches.uid):
        raise ValueError(
            f"branches must have one parent, split and uid per branch, got {len(parents)}, "
            f"{len(splits)} and {len(branches.uid)}"
        )
    records = resume_records(batch)

    picks: dict[tuple[int, int], int] = {}  # (parent, split) -> times picked, in pick order
    for i, (row, split) in enumerate(zip(parents, splits)):
        if not (0 <= row < rows and 0 <= split < length):
            raise ValueError(
                f"branch {i}: parent {row} must be in [0, {rows}) and split {split} in "
                f"[0, {length}) (select_branches on this batch)"
            )
        if not response_mask[row, split]:
            raise ValueError(
                f"branch {i}: split {split} of row {row} must be a generated token "
                "(response_mask 1): the first token a branch re-samples"
            )
        if branches.uid[i] != f"{groups[row]}{UID_TAG}{row}:{split}":
            raise ValueError(
                f"branch {i}: uid {branches.uid[i]!r} does not name row {row} of this batch "
                f"(uid {groups[row]!r}) and split {split}"
            )
        picks[row, split] = picks.get((row, split), 0) + 1

    prompt_width = prompts.shape[1]
    prefixes, names = [], set()
    for row, split in picks:
        record = _record(records, row)
        names.update(record["prompt_fields"])
        turn = bisect.bisect_right(record["turn_starts"], split) - 1
        start = record["turn_starts"][turn] if turn >= 0 else split
        if turn < 0 or not response_mask[row, start:split].all():
            raise ValueError(
                f"row {row}: its {RESUME_FIELD} record does not place split {split} inside an "
                f"assistant turn (turn starts {record['turn_starts']})"
            )
        prompt = prompts[row][attention_mask[row, :prompt_width].bool()].tolist()
        response = responses[row, :split].tolist()
        prefixes.append(
            {
                "prompt_ids": prompt + response,
                "response_mask": response_mask[row, :split].tolist(),
                "response_logprobs": None if log_probs is None else log_probs[row, :split].tolist(),
                "messages": record["messages"][: record["turn_messages"][turn]],
                "turn_tokens": response[start:],
                "assistant_turns": turn,
                "user_turns": record["turn_user_turns"][turn],
                "request_id": record["request_id"],
                "turn_starts": record["turn_starts"][: turn + 1],
                "turn_messages": record["turn_messages"][: turn + 1],
                "turn_user_turns": record["turn_user_turns"][: turn + 1],
            }
        )

    parent_rows = [row for row, _ in picks]
    tensors, columns = {}, {}
    for name in sorted(names - {"uid"}):
        if name in batch.non_tensor_batch:
            column = batch.non_tensor_batch[name]
            columns[name] = object_column([column[row] for row in parent_rows])
        elif batch.batch is not None and name in batch.batch.keys():
            tensors[name] = batch.batch[name][parent_rows]
        else:
            raise ValueError(
                f"batch lacks the prompt field {name!r} that its rollouts ran with (the "
                f"{RESUME_FIELD} records' prompt_fields)"
            )
    columns["uid"] = object_column([f"{groups[row]}{UID_TAG}{row}:{split}" for row, split in picks])
    columns["agent_name"] = object_column([BRANCH_AGENT] * len(picks))
    columns[ROLLOUT_N_FIELD] = object_column(list(picks.values()))
    columns[PREFIX_FIELD] = object_column(prefixes)
    tensor_batch = TensorDict(tensors, batch_size=[len(picks)]) if tensors else None
    return DataProto(batch=tensor_batch, non_tensor_batch=columns)
