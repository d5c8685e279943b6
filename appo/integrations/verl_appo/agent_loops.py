"""The two agent loops APPO's verl trainer runs (docs/design.md section 18.2).

- ``appo_tool_agent`` (:class:`APPOToolAgentLoop`): verl's ``ToolAgentLoop``, unchanged, plus a
  record of what a branch needs to resume the rollout, in ``extra_fields["appo_resume"]``:

  ``request_id``       the request id of the rollout (sticky routing: branches of one rollout go
                       to the server that holds its prefix in its prefix cache);
  ``turn_starts``      for each assistant turn, the response position of its first token;
  ``turn_messages``    for each assistant turn, how many messages preceded it;
  ``turn_user_turns``  for each assistant turn, how many tool rounds preceded it;
  ``messages``         the conversation at the end (prompt messages, then the assistant and tool
                       messages of every turn);
  ``prompt_fields``    the names of the row's fields the loop ran with (``raw_prompt``,
                       ``tools_kwargs``, ``reward_model``, ...), without the ones the agent loop
                       manager sets for each dispatch (:data:`DISPATCH_FIELDS`).

- ``appo_branch`` (:class:`APPOBranchAgentLoop`): continues a rollout from a split inside one of
  its assistant turns. It takes the row field ``appo_prefix`` (built by
  :func:`appo.integrations.verl_appo.branch_rows.build_branch_rows`), seeds verl's ``AgentData``
  with it (context token ids = prompt + response[:split], response mask and log-probs of the
  prefix, the messages before the split turn, the turn counts, the request id) and enters
  ``ToolAgentLoop``'s state machine in its generating state. The tool parser of the split turn
  sees the turn's tokens before the split followed by the new ones, so a tool call that
  straddles the split still runs; tool calls before the split turn do not run again.
  Generation, token merging, tools, limits, padding and rewards stay verl's own code.

verl's agent loop workers create one loop instance per trajectory, which is what lets a loop
keep its trajectory's ``AgentData`` on itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from verl.experimental.agent_loop.agent_loop import register
from verl.experimental.agent_loop.tool_agent_loop import AgentData, AgentState, ToolAgentLoop

RESUME_FIELD = "appo_resume"
PREFIX_FIELD = "appo_prefix"
TOOL_AGENT = "appo_tool_agent"
BRANCH_AGENT = "appo_branch"
# Row fields the agent loop manager (or the trainer) sets for each dispatch: a branch gets its own.
DISPATCH_FIELDS = frozenset(
    {"uid", "session_id", "global_steps", "priority", "validate", "agent_name", "__rollout_n__"}
)
_PREFIX_KEYS = (
    "prompt_ids",
    "response_mask",
    "response_logprobs",
    "messages",
    "turn_tokens",
    "assistant_turns",
    "user_turns",
    "request_id",
    "turn_starts",
    "turn_messages",
    "turn_user_turns",
)


@register(TOOL_AGENT)
class APPOToolAgentLoop(ToolAgentLoop):
    """``ToolAgentLoop`` that records what a branch needs to resume (module docstring). Its
    token ids, masks, log-probs and tool calls are ``ToolAgentLoop``'s."""

    async def run(self, sampling_params: dict[str, Any], **kwargs: Any):
        self._turns: dict[str, list[int]] = {
            "turn_starts": [],
            "turn_messages": [],
            "turn_user_turns": [],
        }
        prompt_fields = sorted(set(kwargs) - DISPATCH_FIELDS)
        output = await super().run(sampling_params, **kwargs)
        agent_data: AgentData = self._agent_data
        output.extra_fields[RESUME_FIELD] = {
            "request_id": agent_data.request_id,
            **self._turns,
            "messages": list(agent_data.messages),
            "prompt_fields": prompt_fields,
        }
        return output

    async def _handle_pending_state(
        self, agent_data: AgentData, sampling_params: dict[str, Any]
    ) -> AgentState:
        self._agent_data = agent_data
        return await super()._handle_pending_state(agent_data, sampling_params)

    async def _handle_generating_state(
        self,
        agent_data: AgentData,
        sampling_params: dict[str, Any],
        ignore_termination: bool = False,
    ) -> AgentState:
        turns = self._turns
        if len(turns["turn_starts"]) == agent_data.assistant_turns:  # a new turn (a branch's
            # split turn is already recorded: its generation continues it)
            turns["turn_starts"].append(len(agent_data.response_mask))
            turns["turn_messages"].append(len(agent_data.messages))
            turns["turn_user_turns"].append(agent_data.user_turns)
        return await super()._handle_generating_state(
            agent_data, sampling_params, ignore_termination
        )


class _SplitTurnParser:
    """verl's tool parser for a branch: its first call parses the split turn's tokens before the
    split followed by the newly generated ones (a call that straddles the split is found); every
    later call is the parser's own."""

    def __init__(self, parser: Any, turn_tokens: Sequence[int]):
        self.parser = parser
        self._head = list(turn_tokens)

    @property
    def stop_token_ids(self) -> list[int]:
        return self.parser.stop_token_ids

    async def extract_tool_calls(self, responses_ids: list[int], tools: Any = None):
        head, self._head = self._head, []
        return await self.parser.extract_tool_calls(head + list(responses_ids), tools)


def check_prefix(prefix: object) -> dict[str, Any]:
    """``prefix`` (the ``appo_prefix`` row field) with its keys and lengths checked."""
    if not isinstance(prefix, dict):
        raise TypeError(
            f"{BRANCH_AGENT} needs the row field {PREFIX_FIELD!r} (a dict built by "
            f"build_branch_rows), got {type(prefix).__name__}"
        )
    missing = [key for key in _PREFIX_KEYS if key not in prefix]
    if missing:
        raise ValueError(f"{PREFIX_FIELD} lacks {missing}")
    context, mask = prefix["prompt_ids"], prefix["response_mask"]
    log_probs, head = prefix["response_logprobs"], prefix["turn_tokens"]
    if len(mask) >= len(context):
        raise ValueError(
            f"{PREFIX_FIELD}: response_mask ({len(mask)}) must be shorter than prompt_ids "
            f"({len(context)}), which hold the prompt and the response prefix"
        )
    if log_probs is not None and len(log_probs) != len(mask):
        raise ValueError(
            f"{PREFIX_FIELD}: response_logprobs ({len(log_probs)}) and response_mask "
            f"({len(mask)}) must have one entry per response token"
        )
    if len(head) > len(mask) or list(context[len(context) - len(head) :]) != list(head):
        raise ValueError(f"{PREFIX_FIELD}: turn_tokens must be the tail of prompt_ids")
    turns = prefix["assistant_turns"]
    if not all(len(prefix[key]) == turns + 1 for key in _PREFIX_KEYS[-3:]):
        raise ValueError(
            f"{PREFIX_FIELD}: turn_starts, turn_messages and turn_user_turns must record the "
            f"{turns} turns before the split turn and the split turn"
        )
    return prefix


@register(BRANCH_AGENT)
class APPOBranchAgentLoop(APPOToolAgentLoop):
    """Continues a rollout from the ``appo_prefix`` row field (module docstring). Text rollouts
    and prompt images only: a prefix whose tool outputs carried images, or a prompt with videos,
    is refused (their features are not in the prefix)."""

    async def run(self, sampling_params: dict[str, Any], **kwargs: Any):
        self._prefix = check_prefix(kwargs.pop(PREFIX_FIELD, None))
        return await super().run(sampling_params, **kwargs)

    async def _handle_pending_state(
        self, agent_data: AgentData, sampling_params: dict[str, Any]
    ) -> AgentState:
        prefix = self._prefix
        prompt_messages = len(agent_data.messages)
        if agent_data.video_data or any(
            isinstance(message.get("content"), list)
            for message in prefix["messages"][prompt_messages:]
        ):
            raise ValueError(
                f"{BRANCH_AGENT} resumes text rollouts (prompt images allowed): this prefix has "
                "videos or multimodal tool outputs"
            )
        self._agent_data = agent_data
        agent_data.messages = list(prefix["messages"])
        agent_data.prompt_ids = list(prefix["prompt_ids"])
        agent_data.response_mask = list(prefix["response_mask"])
        agent_data.response_logprobs = list(prefix["response_logprobs"] or [])
        agent_data.assistant_turns = prefix["assistant_turns"]
        agent_data.user_turns = prefix["user_turns"]
        agent_data.request_id = prefix["request_id"]
        for key in self._turns:
            self._turns[key] = list(prefix[key])
        self.tool_parser = _SplitTurnParser(self.tool_parser, prefix["turn_tokens"])
        return AgentState.GENERATING
