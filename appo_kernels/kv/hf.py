"""Run a transformers causal LM (Llama / Qwen2 families) on the paged KV cache.

``PagedCausalLM`` owns a :class:`~appo_kernels.kv.PagedKVCache` sized for the model and exposes
the four steps a branching rollout needs -- ``prefill``, ``extend`` (ragged tool observations),
``decode`` and ``fork`` -- each returning float32 logits at every sequence's new last token.
Everything is inference only (``torch.no_grad``).

How one step runs (``_step``), for a batch of sequences with ``past[b]`` cached tokens and
``n[b] >= 1`` new tokens:

- the new tokens are **left**-padded to ``q = max(n)`` columns, so every sequence's last token is
  the last column (the LM head runs on that column only, ``logits_to_keep=1``);
- slots for the new tokens are reserved in the cache, and ``length[b] = past[b] + n[b]``;
- column ``i`` of row ``b`` holds the token at absolute position ``length[b] - q + i`` (the
  ``position_ids``; padding columns are clamped to position 0);
- each attention layer calls ``cache.update(k, v, layer)`` on a :class:`_PagedStep` (a
  ``transformers.Cache``): it writes the new tokens' K/V at their slots, then

  * **torch path** (any device, eager / sdpa attention): it also writes them to a *dense mirror*
    of the batch (below) and returns the mirror's K/V, ``[B, kv_heads, max(length), head_dim]``,
    together with a 4-D additive mask that lets a query at position ``p`` see keys ``0..p`` of its
    own sequence (padding queries see key 0 only, so no softmax row is empty);
  * **flash path** (CUDA, fp16/bf16, ``block_size % 256 == 0`` as flash-attn 2 requires of
    paged caches, ``flash_attn`` installed): attention reads the blocks in place through the
    block table with ``flash_attn_with_kvcache`` -- nothing is gathered. Its causal mask is
    bottom-right aligned (query ``i`` sees keys ``<= length[b] - q + i``), which is exactly the
    left-padded layout above; padding queries' outputs are never read (only the last column
    reaches the LM head).

The dense mirror (torch path): attention over paged blocks needs each sequence's K/V in one
tensor, and gathering them from the blocks at every layer of every step cost about 30% of a
SmolLM2 decode step on CPU. So the adapter keeps, per layer, a contiguous copy of the K/V of the
sequences of the latest step, ``[B, kv_heads, capacity, head_dim]`` in the model's dtype (values
rounded through the cache's dtype, so it reads exactly what the blocks hold; head-major, so
attention reads each head's keys as one contiguous ``[length, head_dim]`` run), and writes each
step's new tokens to both the blocks and the mirror. A step over the same sequences -- or a subset
of them, as rollouts finish (one row compaction) -- reads the mirror in place; any other batch,
or a cache that was edited behind the adapter's back (``PagedKVCache.edits`` changed), gathers the
mirror once from the blocks. The blocks stay the one source of truth (fork, truncate, free).

Position ids and masks follow from the cached lengths, so forked and truncated sequences need no
special handling: to re-sample token ``t`` of a sequence, ``fork(sid, 1, at=t - 1)`` and
``decode`` token ``t - 1``; the logits are those of a full forward over the first ``t`` tokens.
"""

from __future__ import annotations

import contextlib
import inspect
import operator
from collections.abc import Callable, Sequence

import torch
from transformers.cache_utils import Cache

from appo_kernels.kv.cache import PagedKVCache
from appo_kernels.kv.ops import gather_padded, write_slots
from appo_kernels.validation import FLOAT_DTYPES

_FLASH_IMPLEMENTATION = "appo_paged"  # no "flash" in it: transformers keys heuristics on that word


def _load_flash_attn_with_kvcache() -> Callable | None:
    try:
        from flash_attn import flash_attn_with_kvcache
    except ImportError:
        return None
    return flash_attn_with_kvcache


def _flash_path_supported(
    device: torch.device, dtype: torch.dtype, block_size: int, head_dim: int
) -> bool:
    """Whether flash-attn 2's paged ``flash_attn_with_kvcache`` accepts this cache."""
    return (
        device.type == "cuda"
        and dtype in (torch.float16, torch.bfloat16)
        and block_size % 256 == 0
        and head_dim <= 256
    )


class _DenseMirror:
    """Contiguous K/V of the sequences of one batch (see the module docstring): ``kv`` is
    ``[num_layers, 2, B, kv_heads, capacity, head_dim]`` in the model's dtype; row ``b`` holds the
    first ``lengths[b]`` positions of sequence ``sids[b]`` and zeros after them. Valid while the
    cache's ``edits`` equals ``edits``."""

    def __init__(self, sids: list[int], lengths: list[int], kv: torch.Tensor, edits: int) -> None:
        self.sids = sids
        self.lengths = lengths
        self.kv = kv
        self.edits = edits

    @property
    def capacity(self) -> int:
        return self.kv.shape[4]

    def rows_of(self, sids: list[int], past: list[int], edits: int) -> list[int] | None:
        """The mirror rows of ``sids`` if each holds exactly the ``past[b]`` cached tokens of its
        sequence; None if any does not (then the mirror must be rebuilt)."""
        if edits != self.edits:
            return None
        row_of = {sid: row for row, sid in enumerate(self.sids)}
        rows = [row_of.get(sid) for sid in sids]
        if None in rows or any(self.lengths[r] != p for r, p in zip(rows, past)):
            return None
        return rows


class _PagedStep(Cache):
    """The ``transformers.Cache`` of one forward step over a batch of paged sequences.

    ``update`` stores the new tokens' K/V (``[B, kv_heads, q, head_dim]``, left-padded;
    ``token_index`` lists the real tokens as flat ``b * q + column`` indices (None: every column
    is real, as in a decode step), whose cache slots are
    ``slots`` in the same order). On the torch path (``mirror`` set) it also writes them to the
    dense mirror at ``mirror_slots`` (``(b * kv_heads + head) * capacity + position`` for each
    token and head, the mirror seen as ``[B * kv_heads, capacity, 1, head_dim]`` blocks) and
    returns the mirror's K/V of the batch; on the flash path (``flash_attn`` set) it returns its
    inputs unchanged and :func:`_paged_flash_attention` reads the blocks in place.
    """

    def __init__(
        self,
        cache: PagedKVCache,
        slots: torch.Tensor,
        token_index: torch.Tensor | None,
        lengths: torch.Tensor,
        max_length: int,
        block_table: torch.Tensor | None,
        flash_attn: Callable | None,
        mirror: _DenseMirror | None,
        mirror_slots: torch.Tensor | None,
    ) -> None:
        super().__init__(layers=[])
        self.cache = cache
        self.slots = slots
        self.token_index = token_index
        self.lengths = lengths  # int64 [B]: cached tokens after this step
        self.max_length = max_length
        self.block_table = block_table
        self.flash_attn = flash_attn
        self.cache_seqlens = lengths.to(torch.int32) if flash_attn is not None else None
        self.mirror = mirror
        self.mirror_slots = mirror_slots

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = self.cache.dtype
        new_keys, new_values = (  # [tokens, kv_heads, head_dim]; integer indexing: no host sync
            states.transpose(1, 2).flatten(0, 1) for states in (key_states, value_states)
        )
        if self.token_index is not None:
            new_keys = new_keys.index_select(0, self.token_index)
            new_values = new_values.index_select(0, self.token_index)
        new_keys, new_values = new_keys.to(dtype), new_values.to(dtype)
        self.cache.write_reserved(layer_idx, new_keys, new_values, self.slots)
        if self.flash_attn is not None:
            return key_states, value_states
        keys, values = self.mirror.kv[layer_idx]  # [B, kv_heads, capacity, head_dim] each
        batch, heads, capacity, head_dim = keys.shape
        write_slots(
            keys.view(batch * heads, capacity, 1, head_dim),
            values.view(batch * heads, capacity, 1, head_dim),
            new_keys.to(keys.dtype).reshape(-1, 1, head_dim),
            new_values.to(values.dtype).reshape(-1, 1, head_dim),
            self.mirror_slots,
        )
        return keys[:, :, : self.max_length], values[:, :, : self.max_length]


def _paged_flash_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    paged_step: _PagedStep | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """An ``AttentionInterface`` function: ``softmax(q K^T * scaling + causal) V`` over the paged
    cache of ``module.layer_idx`` (grouped-query heads handled by flash-attn), returning
    ``[B, q, heads, head_dim]`` as transformers expects. ``key``/``value`` are already in the
    cache (``_PagedStep.update`` wrote them)."""
    if paged_step is None:
        raise RuntimeError(f"attention {_FLASH_IMPLEMENTATION!r} only runs inside PagedCausalLM")
    layer = module.layer_idx
    output = paged_step.flash_attn(
        query.transpose(1, 2),
        paged_step.cache.key_cache[layer],
        paged_step.cache.value_cache[layer],
        cache_seqlens=paged_step.cache_seqlens,
        block_table=paged_step.block_table,
        softmax_scale=scaling,
        causal=True,
    )
    return output, None


@contextlib.contextmanager
def _attention_implementation(config, name: str):
    """Switches ``config``'s attention implementation to ``name`` for the duration of a step."""
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous


class PagedCausalLM:
    """A transformers causal LM whose KV cache is a :class:`PagedKVCache` (prefix sharing,
    copy-on-fork), driven one batched step at a time.

    ``model``: a transformers causal LM of the Llama / Qwen2 families (full attention in every
    layer; grouped-query attention is fine). The cache lives on the model's device with
    ``num_blocks`` blocks of ``block_size`` tokens, in ``cache_dtype`` (default: the model's).
    Sequence ids are the cache's.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        num_blocks: int,
        block_size: int = 16,
        cache_dtype: torch.dtype | None = None,
    ) -> None:
        config = getattr(model, "config", None)
        if not isinstance(model, torch.nn.Module) or config is None:
            raise TypeError(f"model must be a transformers causal LM, got {type(model).__name__}")
        layer_types = getattr(config, "layer_types", None) or ()
        if any(kind != "full_attention" for kind in layer_types):
            raise ValueError(
                "model must use full attention in every layer, got layer_types "
                f"{sorted(set(layer_types))}"
            )
        parameters = inspect.signature(model.forward).parameters
        # transformers 5.24 renamed `past_key_values` to `cache`; older 5.x only know the former.
        self._cache_argument = next(
            (name for name in ("cache", "past_key_values") if name in parameters), None
        )
        if self._cache_argument is None:
            raise TypeError(
                f"model.forward of {type(model).__name__} takes neither `cache` nor "
                "`past_key_values`"
            )
        self._keeps_last_logits = "logits_to_keep" in parameters

        weight = next(model.parameters())
        num_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        self.model = model
        self._dtype = weight.dtype
        self.vocab_size = config.vocab_size
        self.cache = PagedKVCache(
            config.num_hidden_layers,
            getattr(config, "num_key_value_heads", None) or num_heads,
            head_dim,
            num_blocks,
            block_size=block_size,
            dtype=weight.dtype if cache_dtype is None else _check_cache_dtype(cache_dtype),
            device=weight.device,
        )
        self._mirror: _DenseMirror | None = None
        self._flash_attn = None
        if self.cache.dtype == weight.dtype and _flash_path_supported(
            weight.device, self.cache.dtype, block_size, head_dim
        ):
            self._flash_attn = _load_flash_attn_with_kvcache()
        if self._flash_attn is not None:
            from transformers import AttentionInterface

            AttentionInterface.register(_FLASH_IMPLEMENTATION, _paged_flash_attention)

    # ------------------------------------------------------------------------------------------
    # generation steps
    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, prompts: Sequence[Sequence[int]]) -> tuple[list[int], torch.Tensor]:
        """New sequences holding ``prompts`` (one batched forward). Returns their ids and the
        float32 logits ``[B, V]`` at each prompt's last token."""
        prompts = self._token_lists("prompts", prompts, None)
        sids = [self.cache.new_sequence() for _ in prompts]
        try:
            return sids, self._step(sids, prompts)
        except BaseException:
            for sid in sids:
                self.cache.free(sid)
            raise

    @torch.no_grad()
    def extend(self, sids: Sequence[int], tokens: Sequence[Sequence[int]]) -> torch.Tensor:
        """Appends ``tokens[b]`` (>= 1 token each, lengths may differ) to sequence ``sids[b]``.
        Returns the float32 logits ``[B, V]`` at each sequence's new last token."""
        sids = self._sid_list(sids)
        return self._step(sids, self._token_lists("tokens", tokens, len(sids)))

    @torch.no_grad()
    def decode(self, sids: Sequence[int], tokens: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Appends one token per sequence (``tokens``: integer tensor ``[B]`` or list of ints).
        Returns the float32 logits ``[B, V]`` that follow it."""
        sids = self._sid_list(sids)
        if isinstance(tokens, torch.Tensor):
            if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
                raise TypeError(f"tokens must be an integer tensor, got {tokens.dtype}")
            if tokens.dim() != 1:
                raise ValueError(f"tokens must be 1-D [B], got shape {tuple(tokens.shape)}")
            tokens = tokens.tolist()
        elif isinstance(tokens, (str, bytes)) or not isinstance(tokens, Sequence):
            raise TypeError(
                f"tokens must be a LongTensor [B] or a list of ints, got {type(tokens).__name__}"
            )
        return self._step(sids, self._token_lists("tokens", [[t] for t in tokens], len(sids)))

    # ------------------------------------------------------------------------------------------
    # sequence management (the cache's)
    # ------------------------------------------------------------------------------------------
    def fork(self, sid: int, n: int, at: int | None = None) -> list[int]:
        """``n`` new sequences sharing ``sid``'s first ``at`` tokens (default: all)."""
        return self.cache.fork(sid, n, at=at)

    def truncate(self, sid: int, length: int) -> None:
        """Keeps the first ``length`` tokens of ``sid``."""
        self.cache.truncate(sid, length)

    def free(self, sids: int | Sequence[int]) -> None:
        """Releases one sequence or several (and the dense mirror once none of its rows is live)."""
        for sid in self._sid_list(sids):
            self.cache.free(sid)
        if self._mirror is not None and not set(self._mirror.sids) & set(self.cache.sequences):
            self._mirror = None

    def seq_len(self, sid: int) -> int:
        return self.cache.seq_len(sid)

    # ------------------------------------------------------------------------------------------
    # internals
    # ------------------------------------------------------------------------------------------
    def _sid_list(self, sids: int | Sequence[int]) -> list[int]:
        if isinstance(sids, int) and not isinstance(sids, bool):
            sids = [sids]
        elif isinstance(sids, torch.Tensor):
            sids = sids.tolist()
        elif isinstance(sids, (str, bytes)) or not isinstance(sids, Sequence):
            raise TypeError(f"sids must be a list of sequence ids, got {type(sids).__name__}")
        sids = list(sids)
        for sid in sids:
            self.cache.seq_len(sid)  # raises on unknown or non-int ids
        if len(set(sids)) != len(sids):
            raise ValueError(f"sids must not repeat a sequence id, got {sids}")
        return sids

    def _token_lists(
        self, name: str, tokens: Sequence[Sequence[int]], batch: int | None
    ) -> list[list[int]]:
        """Checks a batch of token-id lists: one non-empty list of ints in [0, vocab) per
        sequence. Returns them as lists of Python ints."""
        if isinstance(tokens, (str, bytes, torch.Tensor)) or not isinstance(tokens, Sequence):
            raise TypeError(f"{name} must be a list of token-id lists, got {type(tokens).__name__}")
        if batch is not None and len(tokens) != batch:
            raise ValueError(
                f"{name} must hold one entry per sequence ({batch}), got {len(tokens)}"
            )
        lists = []
        for row, ids in enumerate(tokens):
            if isinstance(ids, torch.Tensor):
                ids = ids.tolist() if ids.dim() == 1 and not ids.is_floating_point() else None
            if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
                raise TypeError(
                    f"{name}[{row}] must be a list of ints, got {type(tokens[row]).__name__}"
                )
            if len(ids) == 0:
                raise ValueError(f"{name}[{row}] must hold at least one token, got none")
            try:
                if any(isinstance(t, bool) for t in ids):
                    raise TypeError("bool is not a token id")
                ids = [operator.index(t) for t in ids]
            except TypeError as error:
                raise TypeError(f"{name}[{row}] must hold ints: {error}") from None
            low, high = min(ids), max(ids)
            if low < 0 or high >= self.vocab_size:
                raise ValueError(
                    f"{name}[{row}] token ids must be in [0, {self.vocab_size}), got values in "
                    f"[{low}, {high}]"
                )
            lists.append(ids)
        return lists

    def _step(self, sids: list[int], tokens: list[list[int]]) -> torch.Tensor:
        """One forward over the new ``tokens`` of ``sids`` (see the module docstring)."""
        if not sids:
            return torch.empty(0, self.vocab_size, dtype=torch.float32, device=self.cache.device)
        past = [self.cache.seq_len(sid) for sid in sids]
        counts = [len(ids) for ids in tokens]
        slots = self.cache.reserve(sids, counts)
        try:
            return self._forward(sids, tokens, past, counts, slots)
        except BaseException:
            for sid, length in zip(sids, past):
                self.cache.truncate(sid, length)
            raise

    def _forward(
        self,
        sids: list[int],
        tokens: list[list[int]],
        past: list[int],
        counts: list[int],
        slots: torch.Tensor,
    ) -> torch.Tensor:
        device = self.cache.device
        q = max(counts)
        new_lengths = [p + n for p, n in zip(past, counts)]
        input_ids = torch.tensor([[0] * (q - len(ids)) + ids for ids in tokens], device=device)
        lengths = torch.tensor(new_lengths, device=device)
        columns = torch.arange(q, device=device)
        positions = (lengths[:, None] - q + columns).clamp_min(0)  # [B, q]
        token_index = None  # the real (not padding) tokens, row-major; None: all of them
        if min(counts) < q:
            token_index = torch.tensor(
                [b * q + column for b, n in enumerate(counts) for column in range(q - n, q)],
                device=device,
            )
        mirror = mirror_slots = block_table = None
        if self._flash_attn is not None:
            block_table = self.cache.block_table(sids)
        else:
            mirror = self._mirror_for(sids, past, max(new_lengths))
            heads_capacity = self.cache.num_kv_heads * mirror.capacity
            positions_at = torch.tensor(  # row b, position p -> b * kv_heads * capacity + p
                [
                    b * heads_capacity + p
                    for b, (p0, p1) in enumerate(zip(past, new_lengths))
                    for p in range(p0, p1)
                ],
                device=device,
            )
            heads_at = torch.arange(self.cache.num_kv_heads, device=device) * mirror.capacity
            mirror_slots = (positions_at[:, None] + heads_at).flatten()  # token-major, then head
        step = _PagedStep(
            self.cache,
            slots,
            token_index,
            lengths,
            max(new_lengths),
            block_table,
            self._flash_attn,
            mirror,
            mirror_slots,
        )

        inputs = {
            "input_ids": input_ids,
            "position_ids": positions,
            self._cache_argument: step,
            "use_cache": True,
        }
        if self._keeps_last_logits:
            inputs["logits_to_keep"] = 1
        if self._flash_attn is not None:
            inputs["paged_step"] = step
            with _attention_implementation(self.model.config, _FLASH_IMPLEMENTATION):
                logits = self.model(**inputs).logits
        else:
            keys = torch.arange(step.max_length, device=device)
            visible = keys[None, None, :] <= positions[:, :, None]  # [B, q, T]
            mask = torch.zeros(visible.shape, dtype=self._dtype, device=device)
            mask.masked_fill_(~visible, torch.finfo(mask.dtype).min)
            inputs["attention_mask"] = mask[:, None]
            logits = self.model(**inputs).logits
            mirror.lengths = new_lengths
        return logits[:, -1].float()

    def _mirror_for(self, sids: list[int], past: list[int], needed: int) -> _DenseMirror:
        """The dense mirror for a step over ``sids`` (``past[b]`` cached tokens each) that needs
        ``needed`` positions: the current mirror (its rows compacted to ``sids`` and its capacity
        widened as needed) if it holds these sequences as they are, else one gathered from the
        blocks. The result becomes the current mirror."""
        edits = self.cache.edits
        current = self._mirror
        self._mirror = None  # dropped before a new one is allocated
        rows = None if current is None else current.rows_of(sids, past, edits)
        if rows is None:
            kv = self._gather_mirror(sids, past, _mirror_capacity(needed))
        else:
            kv = current.kv
            if rows != list(range(len(current.sids))):  # finished sequences left the batch
                kv = kv.index_select(2, torch.tensor(rows, device=kv.device))
            if needed > kv.shape[4]:
                wider = kv.new_zeros(kv.shape[:4] + (_mirror_capacity(needed),) + kv.shape[5:])
                wider[..., : kv.shape[4], :] = kv
                kv = wider
        del current
        self._mirror = _DenseMirror(sids, list(past), kv, edits)
        return self._mirror

    def _gather_mirror(self, sids: list[int], past: list[int], capacity: int) -> torch.Tensor:
        """``[num_layers, 2, B, kv_heads, capacity, head_dim]``: the first ``past[b]`` cached
        tokens of ``sids[b]`` read from the blocks, zeros after them."""
        cache = self.cache
        kv = torch.zeros(
            (cache.num_layers, 2, len(sids), cache.num_kv_heads, capacity, cache.head_dim),
            dtype=self._dtype,
            device=cache.device,
        )
        longest = max(past)
        if longest:
            table = cache.block_table(sids)
            lengths = torch.tensor(past, device=cache.device)
            for layer in range(cache.num_layers):
                keys, values = gather_padded(  # [B, kv_heads, longest, head_dim] each
                    cache.key_cache[layer], cache.value_cache[layer], table, lengths, longest
                )
                kv[layer, 0, :, :, :longest] = keys
                kv[layer, 1, :, :, :longest] = values
        return kv


def _check_cache_dtype(cache_dtype: object) -> torch.dtype:
    if not isinstance(cache_dtype, torch.dtype) or cache_dtype not in FLOAT_DTYPES:
        raise TypeError(f"cache_dtype must be one of {FLOAT_DTYPES}, got {cache_dtype!r}")
    return cache_dtype


def _mirror_capacity(needed: int) -> int:
    """Positions to allocate for a mirror that needs ``needed`` now: room for at least 64 more
    tokens (a quarter more for long sequences), so it is widened once per many decode steps."""
    return needed + max(64, needed // 4)
