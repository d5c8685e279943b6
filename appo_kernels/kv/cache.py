"""A prefix-sharing paged KV cache with copy-on-fork, for branching rollouts.

Memory is a pool of fixed-size blocks (``block_size`` token slots each, all layers, K and V). A
sequence is a list of block ids plus a length. Blocks are reference-counted so that sequences
forked from one parent share the parent's full prefix blocks instead of copying them:

- ``fork(sid, n, at)`` gives ``n`` children the parent's first ``at`` tokens. The ``at //
  block_size`` full blocks are shared (reference count + n). If ``at`` falls inside a block, each
  child gets a private copy of that block's ``at % block_size`` filled slots -- all children and
  all layers in one kernel launch. Nothing else is copied.
- A shared block is always full and never written: new tokens go to a private tail block.
  ``truncate`` into the middle of a shared block copies its kept slots to a private block first.

The bookkeeping (block lists, reference counts, free list) is plain Python on the host; only the
data movement (ops.py) touches the device. Running out of blocks raises ``KVCacheFull`` before any
state changes.

Conventions: ``reserve`` allocates slots for new tokens and returns their slot ids (``block_id *
block_size + offset``, int64 on the cache's device, concatenated in ``sids`` order);
``seq_len`` counts reserved tokens, whether or not they were written yet; ``block_table`` is the
flash-attention / vLLM layout (int32 ``[len(sids), max_blocks]``, padded with block 0, which
kernels never read past a sequence's length).

The cache stores values, never an autograd graph: ``write`` stores the values of its inputs
(gradients never flow into or out of the pool, which never requires grad), and the pool is created
outside inference mode, so it can be written both inside and outside ``torch.inference_mode``.

One hazard stays by design: ``write`` takes raw slot ids. Slots are only meaningful while the
sequence that reserved them holds its blocks; slot ids kept from a sequence that was since freed
(or truncated) point into blocks that the pool may have handed to another sequence, and writing
them overwrites that sequence's K/V. ``write`` cannot tell (a slot id carries no owner); callers
must use slots straight from ``reserve`` and drop them when the sequence is freed or truncated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from appo_kernels.kv import ops
from appo_kernels.validation import (
    FLOAT_DTYPES,
    check_count,
    check_device,
    check_float,
    check_int,
    check_ndim,
    check_shape,
)


class KVCacheFull(RuntimeError):
    """The pool has too few free blocks for the request; the cache was left unchanged."""


@dataclass
class KVCacheStats:
    """Counters since construction. ``bytes_copied`` counts K and V of every layer."""

    forks: int = 0  # fork() calls
    children: int = 0  # sequences created by fork()
    blocks_shared: int = 0  # block references handed to children instead of copies
    blocks_copied: int = 0  # blocks allocated as partial copies (fork tails, truncate)
    bytes_copied: int = 0


@dataclass
class _Sequence:
    blocks: list[int] = field(default_factory=list)
    length: int = 0


class PagedKVCache:
    """Paged K/V storage for ``num_layers`` layers with prefix sharing between forked sequences.

    ``key_cache[layer]`` / ``value_cache[layer]``: ``[num_blocks, block_size, num_kv_heads,
    head_dim]`` views of one contiguous pool ``[num_layers, 2, num_blocks, block_size,
    num_kv_heads, head_dim]`` (so one launch can copy a block across all layers).
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        num_blocks: int,
        *,
        block_size: int = 16,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cuda",
    ) -> None:
        for name, value in (
            ("num_layers", num_layers),
            ("num_kv_heads", num_kv_heads),
            ("head_dim", head_dim),
            ("num_blocks", num_blocks),
            ("block_size", block_size),
        ):
            check_count(name, value, minimum=1)
        if not isinstance(dtype, torch.dtype) or dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be one of {FLOAT_DTYPES}, got {dtype!r}")
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.dtype = dtype
        self.device = check_device("device", device)
        with torch.inference_mode(False):  # an inference tensor could not be written outside it
            self.kv = torch.zeros(
                (num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim),
                dtype=dtype,
                device=self.device,
            )
        self.key_cache = tuple(self.kv[layer, 0] for layer in range(num_layers))
        self.value_cache = tuple(self.kv[layer, 1] for layer in range(num_layers))
        self._slot_bytes = 2 * num_layers * num_kv_heads * head_dim * self.kv.element_size()
        self._ref_counts = [0] * num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: block 0 is handed out first
        self._seqs: dict[int, _Sequence] = {}
        self._next_sid = 0
        self._stats = KVCacheStats()
        self._edits = 0

    # ------------------------------------------------------------------------------------------
    # inspection
    # ------------------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def stats(self) -> KVCacheStats:
        """A snapshot of the counters."""
        return KVCacheStats(**vars(self._stats))

    @property
    def ref_counts(self) -> list[int]:
        """How many sequences hold each block (0 = free)."""
        return list(self._ref_counts)

    @property
    def sequences(self) -> list[int]:
        """Live sequence ids, in creation order."""
        return list(self._seqs)

    @property
    def edits(self) -> int:
        """How many calls so far could have changed K/V that a live sequence already held:
        ``truncate`` (later tokens may land where dropped ones were) and ``write`` (its slots may
        be anyone's); ``write_reserved``, a decode loop's own writes, does not count. A reader that
        keeps a copy of cached K/V across steps (the transformers adapter's dense mirror) re-reads
        the blocks when this changes."""
        return self._edits

    def seq_len(self, sid: int) -> int:
        """Reserved tokens of sequence ``sid``."""
        return self._seq("sid", sid).length

    def block_ids(self, sid: int) -> list[int]:
        """The blocks of sequence ``sid``, in token order."""
        return list(self._seq("sid", sid).blocks)

    def block_table(self, sids: int | Sequence[int]) -> torch.Tensor:
        """int32 ``[len(sids), max_blocks]`` on the cache's device; unused entries are 0."""
        seqs = [self._seq("sids", s) for s in self._sid_list(sids)]
        return self._block_table(seqs)

    # ------------------------------------------------------------------------------------------
    # sequence life cycle
    # ------------------------------------------------------------------------------------------
    def new_sequence(self) -> int:
        """A new empty sequence; returns its id (ids are never reused)."""
        sid = self._next_sid
        self._next_sid += 1
        self._seqs[sid] = _Sequence()
        return sid

    def reserve(
        self, sids: int | Sequence[int], num_new_tokens: int | Sequence[int]
    ) -> torch.Tensor:
        """Appends ``num_new_tokens`` slots to each sequence (one int for all, or one per sequence)
        and returns their slot ids, int64 on the cache's device, sequence after sequence in
        ``sids`` order. Raises ``KVCacheFull`` (and allocates nothing) if the pool is too small."""
        sid_list = self._sid_list(sids)
        seqs = [self._seq("sids", s) for s in sid_list]
        if isinstance(num_new_tokens, Sequence):
            counts = list(num_new_tokens)
            if len(counts) != len(seqs):
                raise ValueError(
                    f"num_new_tokens must have one count per sequence ({len(seqs)}), "
                    f"got {len(counts)}"
                )
        else:
            counts = [num_new_tokens] * len(seqs)
        for count in counts:
            check_count("num_new_tokens", count, minimum=0)
        needed = sum(
            self._blocks_for(seq.length + count) - len(seq.blocks)
            for seq, count in zip(seqs, counts)
        )
        self._require_free(needed, "reserve")

        slots: list[int] = []  # plain ints: a decode step adds one slot per sequence
        size = self.block_size
        for seq, count in zip(seqs, counts):
            start = seq.length
            seq.length += count
            while len(seq.blocks) < self._blocks_for(seq.length):
                seq.blocks.append(self._allocate())
            slots.extend(seq.blocks[p // size] * size + p % size for p in range(start, seq.length))
        return torch.tensor(slots, dtype=torch.int64).to(self.device)

    def fork(self, sid: int, n: int, at: int | None = None) -> list[int]:
        """``n`` new sequences holding ``sid``'s first ``at`` tokens (default: all of them).

        Full blocks of the prefix are shared; a partial tail block (``at % block_size`` slots) is
        copied once per child, for all children and layers in one launch."""
        parent = self._seq("sid", sid)
        check_count("n", n, minimum=1)
        if n > self.num_blocks:  # a block-aligned fork takes no block: n is not bounded by them
            raise ValueError(
                f"n must be <= num_blocks = {self.num_blocks} (each child needs a block of its "
                f"own for its next token), got {n}"
            )
        at = parent.length if at is None else at
        check_count("at", at, minimum=0)
        if at > parent.length:
            raise ValueError(f"at must be <= seq_len(sid) = {parent.length}, got {at}")
        full, tail = divmod(at, self.block_size)
        self._require_free(n if tail else 0, "fork")

        shared = parent.blocks[:full]
        for block in shared:
            self._ref_counts[block] += n
        children = []
        for _ in range(n):
            child = self.new_sequence()
            self._seqs[child].blocks = list(shared)
            self._seqs[child].length = at
            children.append(child)
        if tail:
            tails = [self._allocate() for _ in children]
            for child, block in zip(children, tails):
                self._seqs[child].blocks.append(block)
            self._copy_prefix([parent.blocks[full]] * n, tails, tail)
        self._stats.forks += 1
        self._stats.children += n
        self._stats.blocks_shared += n * full
        return children

    def truncate(self, sid: int, length: int) -> None:
        """Keeps the first ``length`` tokens of ``sid``. If the new last block is shared and only
        partly kept, its kept slots are first copied to a private block."""
        seq = self._seq("sid", sid)
        check_count("length", length, minimum=0)
        if length > seq.length:
            raise ValueError(f"length must be <= seq_len(sid) = {seq.length}, got {length}")
        keep = self._blocks_for(length)
        dropped = seq.blocks[keep:]
        tail = length % self.block_size
        copy_tail = tail > 0 and self._ref_counts[seq.blocks[keep - 1]] > 1
        if copy_tail:
            released = sum(1 for block in dropped if self._ref_counts[block] == 1)
            if len(self._free) + released < 1:
                raise KVCacheFull(
                    "truncate needs 1 free block to copy a shared tail block, 0 are free"
                )
        del seq.blocks[keep:]
        seq.length = length
        self._edits += 1
        for block in dropped:
            self._release(block)
        if copy_tail:
            shared = seq.blocks[-1]
            private = self._allocate()
            self._copy_prefix([shared], [private], tail)
            self._release(shared)
            seq.blocks[-1] = private

    def free(self, sid: int) -> None:
        """Releases ``sid``; its blocks return to the pool once no other sequence holds them."""
        seq = self._seq("sid", sid)
        for block in seq.blocks:
            self._release(block)
        del self._seqs[sid]

    def grow(self, num_blocks: int) -> None:
        """Enlarges the pool to ``num_blocks`` blocks (at least the current count): live sequences,
        block ids, reference counts and statistics are kept, the new blocks are free. The pool is
        reallocated and copied once, so take the views ``key_cache`` / ``value_cache`` anew after
        a call."""
        check_count("num_blocks", num_blocks, minimum=self.num_blocks)
        if num_blocks == self.num_blocks:
            return
        with torch.inference_mode(False):
            kv = torch.zeros(
                self.kv.shape[:2] + (num_blocks,) + self.kv.shape[3:],
                dtype=self.dtype,
                device=self.device,
            )
        kv[:, :, : self.num_blocks] = self.kv
        self.kv = kv
        self.key_cache = tuple(kv[layer, 0] for layer in range(self.num_layers))
        self.value_cache = tuple(kv[layer, 1] for layer in range(self.num_layers))
        # the new ids go under the stack's top, so the old free blocks are handed out first
        self._free[:0] = range(num_blocks - 1, self.num_blocks - 1, -1)
        self._ref_counts.extend([0] * (num_blocks - self.num_blocks))
        self.num_blocks = num_blocks

    # ------------------------------------------------------------------------------------------
    # data
    # ------------------------------------------------------------------------------------------
    def write(
        self, layer: int, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor
    ) -> None:
        """Stores the values of ``key``/``value`` ``[tokens, num_kv_heads, head_dim]`` (the cache's
        dtype and device) at ``slots`` (distinct slot ids, as returned by ``reserve``) of
        ``layer``. Inputs that require grad are stored as values: no graph is recorded.

        The slots must belong to live sequences: see the module docstring for what writing slots
        kept from a freed or truncated sequence does."""
        self._check_layer(layer)
        slots = check_int("slots", slots)
        check_ndim("slots", slots, 1, "[tokens]")
        shape = (slots.shape[0], self.num_kv_heads, self.head_dim)
        for name, x in (("key", key), ("value", value)):
            check_float(name, x, (self.dtype,))
            check_shape(name, x, shape, "[len(slots), num_kv_heads, head_dim]")
        for name, x in (("key", key), ("value", value), ("slots", slots)):
            if x.device != self.device:
                raise ValueError(
                    f"{name} must be on the cache's device {self.device}, got {x.device}"
                )
        if slots.numel() == 0:
            return
        slots = slots.long()
        ordered = slots.sort().values
        low, high, repeats = torch.stack(
            [ordered[0], ordered[-1], (ordered[1:] == ordered[:-1]).sum()]
        ).tolist()  # one host sync
        if low < 0 or high >= self.num_blocks * self.block_size:
            raise ValueError(
                f"slots must be in [0, {self.num_blocks * self.block_size}), got values in "
                f"[{low}, {high}]"
            )
        if repeats:
            raise ValueError(f"slots must be distinct, got {repeats} repeated slot id(s)")
        self._edits += 1
        self.write_reserved(layer, key, value, slots)

    def write_reserved(
        self, layer: int, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor
    ) -> None:
        """``write`` without its argument checks, for a decode loop that passes the int64 slots
        ``reserve`` just returned (as ``appo_kernels.kv.hf`` does once per layer and step): no
        host sync, nothing but the device copy. ``key``/``value``: the cache's dtype and device,
        ``[len(slots), num_kv_heads, head_dim]`` with a contiguous last dim; ``slots``: distinct
        and in range. Anything else is undefined behaviour (on CUDA: out-of-bounds writes);
        use ``write`` for untrusted input. Like ``write``, stores values (no autograd graph)."""
        with torch.no_grad():
            ops.write_slots(self.key_cache[layer], self.value_cache[layer], key, value, slots)

    def gather(
        self, layer: int, sids: int | Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(keys, values, lengths)`` of ``layer`` for ``sids``: keys/values ``[B, num_kv_heads,
        max_len, head_dim]`` (zeros past each length, the transformers layout), lengths int64
        ``[B]``, all on the cache's device."""
        self._check_layer(layer)
        seqs = [self._seq("sids", s) for s in self._sid_list(sids)]
        max_len = max((seq.length for seq in seqs), default=0)
        lengths = torch.tensor([seq.length for seq in seqs], dtype=torch.int64).to(self.device)
        keys, values = ops.gather_padded(
            self.key_cache[layer],
            self.value_cache[layer],
            self._block_table(seqs),
            lengths,
            max_len,
        )
        return keys, values, lengths

    # ------------------------------------------------------------------------------------------
    # internals
    # ------------------------------------------------------------------------------------------
    def _blocks_for(self, length: int) -> int:
        return -(-length // self.block_size)

    def _seq(self, name: str, sid: object) -> _Sequence:
        if isinstance(sid, bool) or not isinstance(sid, int):
            raise TypeError(f"{name}: sequence ids must be ints, got {type(sid).__name__}")
        seq = self._seqs.get(sid)
        if seq is None:
            raise ValueError(f"{name}: unknown or freed sequence id {sid}")
        return seq

    @staticmethod
    def _sid_list(sids: int | Sequence[int]) -> list[int]:
        sid_list = [sids] if isinstance(sids, int) else list(sids)
        if len(set(sid_list)) != len(sid_list):
            raise ValueError(f"sids must not repeat a sequence id, got {sid_list}")
        return sid_list

    def _check_layer(self, layer: object) -> None:
        check_count("layer", layer, minimum=0)
        if layer >= self.num_layers:
            raise ValueError(f"layer must be in [0, {self.num_layers}), got {layer}")

    def _block_table(self, seqs: list[_Sequence]) -> torch.Tensor:
        width = max((len(s.blocks) for s in seqs), default=0)
        rows = [s.blocks + [0] * (width - len(s.blocks)) for s in seqs]
        # reshape: torch.tensor([]) of an empty batch would be 1-D
        return torch.tensor(rows, dtype=torch.int32).reshape(len(seqs), width).to(self.device)

    def _require_free(self, needed: int, what: str) -> None:
        if needed > len(self._free):
            raise KVCacheFull(
                f"{what} needs {needed} free blocks, {len(self._free)} of {self.num_blocks} "
                "are free"
            )

    def _allocate(self) -> int:
        block = self._free.pop()
        self._ref_counts[block] = 1
        return block

    def _release(self, block: int) -> None:
        self._ref_counts[block] -= 1
        if self._ref_counts[block] == 0:
            self._free.append(block)

    def _copy_prefix(self, src: list[int], dst: list[int], num_tokens: int) -> None:
        ops.copy_block_prefix(
            self.kv,
            torch.tensor(src, dtype=torch.int64).to(self.device),
            torch.tensor(dst, dtype=torch.int64).to(self.device),
            num_tokens,
        )
        self._stats.blocks_copied += len(dst)
        self._stats.bytes_copied += len(dst) * num_tokens * self._slot_bytes
