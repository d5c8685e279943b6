"""Branching multi-turn tool-use rollouts on the paged KV cache, and their padded training batch.

A rollout is a prompt followed by a response: tokens the policy sampled (each with its behaviour
log-prob, the float32 ``log_softmax`` of the sampling logits) interleaved with observation tokens
that the environment appended after a tool call (no log-prob; never trained on, never a branch
point). The tool loop, for every sequence of a batch at once:

1. sample a token from the logits at the sequence's last position;
2. a stop token or ``</answer>`` ends the rollout, and so does the policy-token budget;
3. when the text written since the last observation contains a call's closing tag, the tool runs
   and its observation ``<out>...</out>`` is appended (``lm.extend``: the sampled token and the
   observation in one ragged step); a call beyond ``max_tool_calls`` ends the rollout instead;
4. otherwise the sampled token is fed (``lm.decode``) and the loop goes on.

Prompts are prefilled once each, and their shared start (the system turn) once for all:
:meth:`RolloutEngine.sample` prefills the longest common prefix of the distinct prompts as one
sequence, forks it into one sequence per distinct prompt and extends each with the rest of its
prompt (one ragged step), then forks each prompt's sequence into one per rollout of that prompt;
all rollouts of a prompt sample their first token from the same logits. Forks share full cache
blocks (a partial tail block is copied), so nothing is computed or stored twice.

A branch re-samples position ``t`` of a finished rollout: ``fork`` shares the parent's cached
prefix (no re-prefill), the token before ``t`` is fed, and the same loop continues with the
parent's tool-call count. With ``keep_selected_token`` the branch keeps token ``t`` and re-samples
from ``t + 1``. :meth:`RolloutEngine.resume` continues any token prompt that starts with part of a
cached rollout (its prompt and response): it forks the shared part and feeds only the rest, which
is how a trainer that renders its own tool turns (TRL) continues a rollout after a tool call, or
branches it. Cache blocks stay alive until :meth:`RolloutEngine.release`.

``generator`` may be one ``torch.Generator`` for the call or one per rollout; with one each, a
rollout's samples do not depend on which other rollouts share its batch.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from appo.model import stop_token_ids
from appo.tools import ANSWER_CLOSE_TAG, CALL_CLOSE_TAGS, run_tool_call
from appo_kernels.validation import check_count

# Tokens decoded after each sampled token to look for a closing tag: enough for the longest tag
# even at one character (or one byte) per token.
_TAG_WINDOW = 2 * max(len(tag) for tag in (*CALL_CLOSE_TAGS, ANSWER_CLOSE_TAG)) + 4
IGNORE_INDEX = -100


@dataclass
class Rollout:
    """One prompt and its response. ``parent``/``split``: for a branch, the index of the rollout
    it came from (in the list given to :meth:`RolloutEngine.branch`) and the first response
    position it re-sampled; -1 for an initial rollout."""

    group: int
    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    is_observation: list[bool] = field(default_factory=list)
    behavior_logprob: list[float] = field(default_factory=list)
    tool_calls: int = 0
    parent: int = -1
    split: int = -1
    point: int = -1  # the selected branch position (== split unless the selected token was kept)
    reused_prefix: int = 0  # cached tokens a fork shared instead of re-computing them
    stop: str = ""  # "stop_token" | "answer" | "length" | "tool_limit"
    sid: int | None = None
    turn_start: int = 0  # response index where the current model turn began (after an observation)
    generator: torch.Generator | None = None  # the rollout's own random stream (else the call's)
    max_new_tokens: int | None = None  # the rollout's policy-token budget (else the config's)

    @property
    def is_branch(self) -> bool:
        return self.parent >= 0

    @property
    def generated(self) -> int:
        """Policy (non-observation) tokens in the response."""
        return len(self.tokens) - sum(self.is_observation)

    @property
    def new_tokens(self) -> int:
        """Policy tokens this rollout sampled itself (a branch inherits its prefix)."""
        start = max(self.split, 0)
        return len(self.tokens) - start - sum(self.is_observation[start:])

    def append(
        self, tokens: Sequence[int], observation: bool, logprobs: Sequence[float] | None = None
    ):
        self.tokens.extend(tokens)
        self.is_observation.extend([observation] * len(tokens))
        self.behavior_logprob.extend(logprobs if logprobs is not None else [0.0] * len(tokens))


@dataclass
class RolloutConfig:
    max_new_tokens: int = 64  # policy tokens per rollout (observations not counted)
    max_tool_calls: int = 4
    temperature: float = 1.0
    greedy: bool = False
    use_tools: bool = True  # False: plain sampling until a stop token or the budget
    share_prefixes: bool = True  # False: prefill every rollout's prompt on its own


LogitsProcessor = Callable[[torch.Tensor, list[Rollout]], torch.Tensor]
Generators = torch.Generator | Sequence[torch.Generator] | None


class RolloutEngine:
    """Samples initial rollouts and branches with the tool loop on a ``PagedCausalLM``.

    ``logits_processor(logits [B, V], rollouts) -> logits`` may edit the sampling logits (e.g. to
    force or ban tokens); behaviour log-probs are taken from the edited logits.
    """

    def __init__(
        self,
        lm,
        tokenizer,
        config: RolloutConfig | None = None,
        logits_processor: LogitsProcessor | None = None,
    ):
        self.lm = lm
        self.tokenizer = tokenizer
        self.config = config or RolloutConfig()
        self.logits_processor = logits_processor
        self.stop_ids = stop_token_ids(tokenizer)

    # ------------------------------------------------------------------------------------------
    def sample(
        self,
        prompts: Sequence[Sequence[int]],
        groups: Sequence[int],
        generator: Generators = None,
    ) -> list[Rollout]:
        """One rollout per prompt (repeat a prompt for N samples); ``groups[i]`` is its group."""
        rollouts = [
            Rollout(group=int(g), prompt=list(p)) for p, g in zip(prompts, groups, strict=True)
        ]
        if not rollouts:
            return rollouts
        generator = _own_generators(rollouts, generator)
        prefill = self._prefill_shared if self.config.share_prefixes else self.lm.prefill
        sids, logits = prefill([r.prompt for r in rollouts])
        for rollout, sid in zip(rollouts, sids):
            rollout.sid = sid
        self._loop(rollouts, generator, logits=logits)
        return rollouts

    def branch(
        self,
        parents: Sequence[Rollout],
        points: Sequence[tuple[int, int]],
        generator: Generators = None,
        *,
        keep_selected_token: bool = False,
    ) -> list[Rollout]:
        """One branch per ``(row, position)``: re-samples ``parents[row]`` from ``position``
        (from ``position + 1`` with ``keep_selected_token``), forking its cached prefix."""
        branches, feeds = [], []
        for row, position in points:
            parent = parents[row]
            if not 0 <= position < len(parent.tokens) or parent.is_observation[position]:
                raise ValueError(
                    f"branch point ({row}, {position}) is not a sampled token of rollout {row}"
                )
            keep = position + 1 if keep_selected_token else position
            child = Rollout(
                group=parent.group, prompt=parent.prompt, parent=row, split=keep, point=position
            )
            child.append(parent.tokens[:keep], False, parent.behavior_logprob[:keep])
            child.is_observation[:] = parent.is_observation[:keep]
            child.tool_calls = sum(
                1
                for i in range(keep)
                if child.is_observation[i] and (i == 0 or not child.is_observation[i - 1])
            )
            observed = [i for i in range(keep) if child.is_observation[i]]
            child.turn_start = observed[-1] + 1 if observed else 0
            branches.append(child)
            full_prefix = len(parent.prompt) + keep
            if keep_selected_token:
                feed = self._after_token(child)  # the kept token acts as if just sampled
                if feed is None:
                    continue
            else:
                feed = [(parent.prompt + parent.tokens)[full_prefix - 1]]
            shared = full_prefix - 1  # the fed token's KV is computed by the first step
            child.sid = self.lm.fork(parent.sid, 1, at=shared)[0]
            child.reused_prefix = shared
            feeds.append((child, feed))
        if feeds:
            active = [child for child, _ in feeds]
            self._loop(active, generator, pending={id(c): feed for c, feed in feeds})
        return branches

    def resume(
        self,
        parents: Sequence[Rollout],
        prompts: Sequence[Sequence[int]],
        generator: Generators = None,
        *,
        max_new_tokens: Sequence[int] | None = None,
    ) -> list[Rollout]:
        """One rollout per prompt, continuing the cache of ``parents[i]`` (a rollout that still
        holds its sequence, of any group): the longest common prefix of ``prompts[i]`` and the
        parent's cached tokens (its prompt and response, as far as the cache holds them; at most
        all but the last prompt token) is forked, only the rest of the prompt is fed, then the
        loop samples. The new rollout's ``prompt`` is all of ``prompts[i]``, its ``group`` the
        parent's, its ``reused_prefix`` the forked length. ``max_new_tokens[i]`` (default: the
        config's) is its budget; a budget of 0 gives an empty rollout (``stop="length"``, no
        sequence)."""
        if len(parents) != len(prompts):
            raise ValueError(
                f"prompts must hold one prompt per parent ({len(parents)}), got {len(prompts)}"
            )
        budgets = [self.config.max_new_tokens] * len(prompts)
        if max_new_tokens is not None:
            if len(max_new_tokens) != len(prompts):
                raise ValueError(
                    f"max_new_tokens must hold one budget per prompt ({len(prompts)}), "
                    f"got {len(max_new_tokens)}"
                )
            budgets = [check_count("max_new_tokens", budget) for budget in max_new_tokens]
        children = [Rollout(group=p.group, prompt=list(x)) for p, x in zip(parents, prompts)]
        generator = _own_generators(children, generator)
        feeds = {}
        for parent, child, budget in zip(parents, children, budgets):
            if parent.sid is None:
                raise ValueError("every parent must still hold its cache sequence (not released)")
            if not child.prompt:
                raise ValueError("every prompt must hold at least one token, got an empty one")
            child.max_new_tokens = budget
            if budget == 0:
                child.stop = "length"
                continue
            cached = (parent.prompt + parent.tokens)[: self.lm.seq_len(parent.sid)]
            at = min(_common_prefix_length([cached, child.prompt]), len(child.prompt) - 1)
            child.sid = self.lm.fork(parent.sid, 1, at=at)[0]
            child.reused_prefix = at
            feeds[id(child)] = child.prompt[at:]
        active = [child for child in children if id(child) in feeds]
        if active:
            self._loop(active, generator, pending=feeds)
        return children

    def release(self, rollouts: Sequence[Rollout]) -> None:
        """Frees the cache blocks of every rollout that still holds a sequence."""
        sids = [r.sid for r in rollouts if r.sid is not None]
        if sids:
            self.lm.free(sids)
        for r in rollouts:
            r.sid = None

    # ------------------------------------------------------------------------------------------
    def _prefill_shared(self, prompts: list[list[int]]) -> tuple[list[int], torch.Tensor]:
        """``lm.prefill(prompts)``'s result -- one sequence per prompt and the logits ``[B, V]`` at
        each prompt's last token -- computing each distinct prompt once and the common prefix of
        the distinct prompts once (see the module docstring)."""
        copies = Counter(map(tuple, prompts))  # insertion order: first appearance
        distinct = list(copies)
        # every distinct prompt keeps >= 1 token of its own, whose logits it needs
        common = min(_common_prefix_length(distinct), min(map(len, distinct)) - 1)
        if len(distinct) > 1 and common > 0:
            root, _ = self.lm.prefill([distinct[0][:common]])
            try:
                heads = self.lm.fork(root[0], len(distinct))
            finally:
                self.lm.free(root)
            try:
                logits = self.lm.extend(heads, [p[common:] for p in distinct])
            except BaseException:
                self.lm.free(heads)
                raise
        else:
            heads, logits = self.lm.prefill(distinct)
        # each prompt's first rollout keeps its sequence; the others are forks of it
        sequences: list[list[int]] = []
        try:
            for head, prompt in zip(heads, distinct):
                sequences.append(
                    [head] + (self.lm.fork(head, copies[prompt] - 1) if copies[prompt] > 1 else [])
                )
        except BaseException:
            self.lm.free(heads[len(sequences) :] + [s for seqs in sequences for s in seqs])
            raise
        row = {prompt: i for i, prompt in enumerate(distinct)}
        rows = [row[tuple(p)] for p in prompts]
        sids = [sequences[i].pop(0) for i in rows]
        return sids, logits[torch.tensor(rows, device=logits.device)]

    def _loop(
        self,
        active: list[Rollout],
        generator,
        *,
        logits: torch.Tensor | None = None,
        pending: dict[int, list[int]] | None = None,
    ) -> None:
        """Generates until every rollout in ``active`` has finished. ``logits`` [B, V] follow
        each rollout's cached tokens; ``pending`` maps ``id(rollout)`` to tokens it must feed
        before it samples again (the first step's feeds when there are no logits yet).

        A rollout whose feed is longer than one token -- its sampled token and a tool's output --
        feeds one token a step and samples nothing until the last is in, while the others keep
        decoding: the step stays a one-token decode of the whole batch, where feeding it all at
        once would pad every row to the longest feed. Only when no rollout would sample after a
        one-token step are all the remaining feeds given at once (one padded extend)."""
        pending = dict(pending or {})
        while active:
            if logits is not None:
                idle = [i for i, r in enumerate(active) if not pending.get(id(r))]
                rows = [active[i] for i in idle]
                finished = set()
                if rows:
                    if len(idle) < len(active):  # rollouts still feeding sample nothing
                        logits = logits[torch.tensor(idle, device=logits.device)]
                    tokens, logprobs = self._sample(logits, rows, generator)
                    for rollout, token, logprob in zip(rows, tokens, logprobs):
                        rollout.append([token], False, [logprob])
                        feed = self._after_token(rollout)
                        if feed is None:
                            finished.add(id(rollout))
                        else:
                            pending[id(rollout)] = feed
                active = [r for r in active if id(r) not in finished]
            if not active:
                break
            sids = [r.sid for r in active]
            if all(len(pending[id(r)]) > 1 for r in active):  # no row would sample next step
                logits = self.lm.extend(sids, [pending.pop(id(r)) for r in active])
            else:
                logits = self.lm.decode(sids, [pending[id(r)].pop(0) for r in active])

    def _sample(self, logits: torch.Tensor, rollouts: list[Rollout], generator):
        logits = logits.float()
        if self.logits_processor is not None:
            logits = self.logits_processor(logits, rollouts)
        logp = torch.log_softmax(logits / self.config.temperature, dim=-1)
        if self.config.greedy:
            tokens = logp.argmax(dim=-1)
        else:
            if any(r.generator is not None for r in rollouts):
                generator = [generator if r.generator is None else r.generator for r in rollouts]
            tokens = sample_categorical(logp.exp(), generator)
        return tokens.tolist(), logp.gather(1, tokens[:, None]).squeeze(1).tolist()

    def _after_token(self, rollout: Rollout) -> list[int] | None:
        """Applies the tool loop to the rollout's last (just sampled or kept) token. Returns the
        tokens to feed next, or None when the rollout is finished."""
        token = rollout.tokens[-1]
        if token in self.stop_ids:
            rollout.stop = "stop_token"
            return None
        feed = [token]
        if self.config.use_tools:
            # Earlier tokens were checked already, so a closing tag that is new ends in this
            # token: decode only the turn's last few tokens (decoding the whole turn after every
            # token would be quadratic in its length), and the whole turn once a call closes.
            window_start = max(rollout.turn_start, len(rollout.tokens) - _TAG_WINDOW)
            tail = self.tokenizer.decode(rollout.tokens[window_start:])
            if ANSWER_CLOSE_TAG in tail:
                rollout.stop = "answer"
                return None
            call_end = -1
            if any(tag in tail for tag in CALL_CLOSE_TAGS):
                turn = self.tokenizer.decode(rollout.tokens[rollout.turn_start :])
                call_end = min(turn.find(tag) + len(tag) for tag in CALL_CLOSE_TAGS if tag in turn)
            if call_end >= 0:
                if rollout.tool_calls >= self.config.max_tool_calls:
                    rollout.stop = "tool_limit"
                    return None
                observation = self.tokenizer.encode(
                    run_tool_call(turn[:call_end]), add_special_tokens=False
                )
                rollout.append(observation, True)
                rollout.tool_calls += 1
                rollout.turn_start = len(rollout.tokens)
                feed += observation
        budget = (
            self.config.max_new_tokens if rollout.max_new_tokens is None else rollout.max_new_tokens
        )
        if rollout.generated >= budget:  # observations do not count
            rollout.stop = "length"
            return None
        return feed


def sample_categorical(probs: torch.Tensor, generator: Generators) -> torch.Tensor:
    """One token id per row of ``probs`` ``[B, V]`` (non-negative, any positive total), drawn by
    inverse transform sampling: the first token whose float64 cumulative probability exceeds
    ``u * total`` with ``u ~ U[0, 1)``. Exact up to float64 rounding, never a zero-probability
    token, and one random number per row: ``torch.multinomial`` took ~30 ms per call for
    16 x 49152 on one CPU thread of the development machine, this ~7 ms. ``generator``: one for
    all rows, or a sequence of one per row (each row's ``u`` from its own; None entries use the
    default generator)."""
    cdf = probs.cumsum(-1, dtype=torch.float64)
    total = cdf[:, -1:]
    if not bool((torch.isfinite(total) & (total > 0)).all()):
        raise ValueError(
            "sampling probabilities must be finite with a positive sum in every row; rows "
            f"{torch.nonzero(~(torch.isfinite(total) & (total > 0)))[:, 0].tolist()} are not "
            "(NaN logits, or every token banned)"
        )
    if isinstance(generator, torch.Generator) or generator is None:
        u = torch.rand(total.shape, dtype=torch.float64, device=probs.device, generator=generator)
    else:
        if len(generator) != probs.shape[0]:
            raise ValueError(
                f"generator must be one generator or one per row ({probs.shape[0]}), "
                f"got {len(generator)}"
            )
        u = torch.cat(
            [
                torch.rand(1, dtype=torch.float64, device=probs.device, generator=g)
                for g in generator
            ]
        )[:, None]
    below_total = torch.nextafter(total, torch.zeros_like(total))  # u * total may round up
    return torch.searchsorted(cdf, torch.minimum(u * total, below_total), right=True)[:, 0]


def _own_generators(rollouts: list[Rollout], generator: Generators) -> torch.Generator | None:
    """Gives each rollout its own generator when ``generator`` is a sequence of one per rollout;
    returns the generator the call shares (None in that case)."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if len(generator) != len(rollouts):
        raise ValueError(
            f"generator must be one torch.Generator or one per rollout ({len(rollouts)}), "
            f"got {len(generator)}"
        )
    for rollout, own in zip(rollouts, generator):
        rollout.generator = own
    return None


def _common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """The length of the longest prefix that all ``sequences`` share."""
    first, length = sequences[0], min(map(len, sequences))
    for other in sequences[1:]:
        length = next((i for i in range(length) if other[i] != first[i]), length)
    return length


# ----------------------------------------------------------------------------------------------
@dataclass
class RolloutBatch:
    """Rollouts as one padded batch: prompts left-padded to a common width ``P``, responses
    right-padded to ``T``, so the logits of response token ``t`` of every row sit at column
    ``P - 1 + t``.

    ``tokens`` [R, T] (``IGNORE_INDEX`` at padding), ``policy_mask`` [R, T] (sampled tokens: the
    loss mask), ``observation_mask`` [R, T], ``behavior_logprob`` [R, T] float32.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    prompt_width: int
    tokens: torch.Tensor
    policy_mask: torch.Tensor
    observation_mask: torch.Tensor
    behavior_logprob: torch.Tensor

    @classmethod
    def from_rollouts(cls, rollouts: Sequence[Rollout], pad_id: int, device) -> RolloutBatch:
        P = max(len(r.prompt) for r in rollouts)
        T = max(max(len(r.tokens) for r in rollouts), 1)
        R = len(rollouts)
        input_ids = torch.full((R, P + T), pad_id, dtype=torch.long)
        attention = torch.zeros(R, P + T, dtype=torch.long)
        tokens = torch.full((R, T), IGNORE_INDEX, dtype=torch.long)
        observation = torch.zeros(R, T, dtype=torch.bool)
        behavior = torch.zeros(R, T, dtype=torch.float32)
        for i, r in enumerate(rollouts):
            p, n = len(r.prompt), len(r.tokens)
            input_ids[i, P - p : P] = torch.tensor(r.prompt)
            attention[i, P - p : P + n] = 1
            if n:
                input_ids[i, P : P + n] = torch.tensor(r.tokens)
                tokens[i, :n] = torch.tensor(r.tokens)
                observation[i, :n] = torch.tensor(r.is_observation)
                behavior[i, :n] = torch.tensor(r.behavior_logprob)
        position_ids = (attention.cumsum(-1) - 1).clamp_min(0)
        policy = (tokens != IGNORE_INDEX) & ~observation
        return cls(
            input_ids.to(device),
            attention.to(device),
            position_ids.to(device),
            P,
            tokens.to(device),
            policy.to(device),
            observation.to(device),
            behavior.to(device),
        )

    def response_logits(self, model) -> torch.Tensor:
        """Logits ``[R, T, V]`` for every response position (a view; the LM head runs on the
        response columns only)."""
        T = self.tokens.shape[1]
        out = model(
            input_ids=self.input_ids,
            attention_mask=self.attention_mask,
            position_ids=self.position_ids,
            logits_to_keep=T + 1,
        )
        return out.logits[:, :-1]
