"""PagedKVCache and its device ops (PyTorch fallback on CPU).

- the ops against clone()-and-loop references (random block mappings, partial tails, dtypes,
  head sizes), bit for bit;
- a Hypothesis state machine of random new/reserve+write/fork/truncate/free programs against a
  plain model holding every sequence's K/V as Python lists: contents (via gather), reference
  counts, free list, KVCacheFull leaving everything unchanged, bytes copied per fork/truncate;
- bad input.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from appo_kernels.kv import KVCacheFull, PagedKVCache, ops

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.uint8)


def _randn(shape, dtype, gen):
    return torch.randn(shape, generator=gen).to(dtype)


# ------------------------------------------------------------------------------------------------
# device ops against loop references
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_copy_block_prefix_matches_loop(dtype, head_dim, gen):
    layers, blocks, block_size, heads = 2, 12, 16, 2
    kv = _randn((layers, 2, blocks, block_size, heads, head_dim), dtype, gen)
    perm = torch.randperm(blocks, generator=gen)
    src, dst = perm[:3].repeat(2), perm[3:9]  # each source copied twice, like fork's children
    for num_tokens in (1, 9, block_size):
        expected = kv.clone()
        for s, d in zip(src.tolist(), dst.tolist()):
            expected[:, :, d, :num_tokens] = expected[:, :, s, :num_tokens]
        ops.copy_block_prefix(kv, src, dst, num_tokens)
        assert torch.equal(_bits(kv), _bits(expected))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_write_slots_matches_loop(dtype, head_dim, gen):
    blocks, block_size, heads, tokens = 6, 16, 2, 23
    key_cache = _randn((blocks, block_size, heads, head_dim), dtype, gen)
    value_cache = _randn((blocks, block_size, heads, head_dim), dtype, gen)
    slots = torch.randperm(blocks * block_size, generator=gen)[:tokens]
    key = _randn((tokens, heads, head_dim + 4), dtype, gen)[..., :head_dim]  # strided rows
    value = _randn((tokens, heads, head_dim), dtype, gen)
    exp_k, exp_v = key_cache.clone(), value_cache.clone()
    for i, s in enumerate(slots.tolist()):
        exp_k[s // block_size, s % block_size] = key[i]
        exp_v[s // block_size, s % block_size] = value[i]
    ops.write_slots(key_cache, value_cache, key, value, slots)
    assert torch.equal(_bits(key_cache), _bits(exp_k))
    assert torch.equal(_bits(value_cache), _bits(exp_v))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gather_padded_matches_loop(dtype, head_dim, gen):
    blocks, block_size, heads = 10, 16, 2
    key_cache = _randn((blocks, block_size, heads, head_dim), dtype, gen)
    value_cache = _randn((blocks, block_size, heads, head_dim), dtype, gen)
    lengths = torch.tensor([0, 1, 16, 17, 45])
    table = torch.randint(0, blocks, (5, 4), generator=gen, dtype=torch.int32)
    max_len = 45
    keys, values = ops.gather_padded(key_cache, value_cache, table, lengths, max_len)
    for got, cache in ((keys, key_cache), (values, value_cache)):
        expected = torch.zeros((5, heads, max_len, head_dim), dtype=dtype)
        for b, n in enumerate(lengths.tolist()):
            for t in range(n):
                expected[b, :, t] = cache[table[b, t // block_size], t % block_size]
        assert got.is_contiguous() and torch.equal(_bits(got), _bits(expected))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ops_pass_opcheck(dtype, device, gen):
    """``torch.library.opcheck`` on each KV op (schema and declared mutations, fake kernel, autograd
    registration, AOT dispatch), on this machine's device: the PyTorch path here, the CUDA
    extension where it is built."""
    layers, blocks, block_size, heads, head_dim = 2, 6, 4, 2, 8
    kv = _randn((layers, 2, blocks, block_size, heads, head_dim), dtype, gen).to(device)
    index = dict(dtype=torch.int64, device=device)
    samples = {
        "copy_block_prefix": [
            (kv, torch.tensor([0, 0, 1], **index), torch.tensor([3, 4, 5], **index), n)
            for n in (1, block_size)
        ],
        "write_slots": [
            (
                kv[1, 0],
                kv[1, 1],
                _randn((tokens, heads, head_dim), dtype, gen).to(device),
                _randn((tokens, heads, head_dim), dtype, gen).to(device),
                torch.randperm(blocks * block_size, generator=gen)[:tokens].to(device),
            )
            for tokens in (1, 9)
        ],
        "gather_padded": [
            (
                kv[0, 0],
                kv[0, 1],
                torch.randint(0, blocks, (3, 3), generator=gen, dtype=torch.int32).to(device),
                torch.tensor([0, 5, 11], **index),
                11,
            )
        ],
    }
    assert set(samples) == set(ops.SCHEMAS)
    for name, cases in samples.items():
        for args in cases:
            torch.library.opcheck(getattr(torch.ops.appo_kernels_kv, name).default, args)


def test_op_schemas_match_the_cuda_binding():
    """ops.py defines the schemas itself when the extension is not built: they must be the ones
    csrc/kv_cache_bindings.cpp defines (adjacent C++ string literals joined)."""
    binding = (Path(__file__).parent.parent / "csrc" / "kv_cache_bindings.cpp").read_text()
    defined = [
        "".join(re.findall(r'"([^"]*)"', call))
        for call in re.findall(r"m\.def\((.*?)\);", binding, flags=re.S)
    ]
    assert sorted(defined) == sorted(ops.SCHEMAS.values())
    for name, schema in ops.SCHEMAS.items():
        assert str(getattr(torch.ops.appo_kernels_kv, name).default._schema) == (
            f"{ops.NAMESPACE}::{schema}"
        )


# ------------------------------------------------------------------------------------------------
# cache semantics on hand-made cases
# ------------------------------------------------------------------------------------------------
def _cache(num_blocks=8, block_size=4, layers=2, heads=2, head_dim=8, dtype=torch.float32):
    return PagedKVCache(
        layers, heads, head_dim, num_blocks, block_size=block_size, dtype=dtype, device="cpu"
    )


def test_reserve_slot_layout_and_block_table():
    cache = _cache()
    a, b = cache.new_sequence(), cache.new_sequence()
    slots = cache.reserve([a, b], [6, 3])
    blocks_a, blocks_b = cache.block_ids(a), cache.block_ids(b)
    expected = [blocks_a[t // 4] * 4 + t % 4 for t in range(6)] + [
        blocks_b[0] * 4 + t for t in range(3)
    ]
    assert slots.dtype == torch.int64 and slots.tolist() == expected
    assert (cache.seq_len(a), cache.seq_len(b)) == (6, 3)
    more = cache.reserve(b, 2)  # one int: same count for every sequence
    assert more.tolist() == [blocks_b[0] * 4 + 3, cache.block_ids(b)[1] * 4]
    table = cache.block_table([b, a])
    assert table.dtype == torch.int32 and table.tolist() == [cache.block_ids(b), blocks_a]
    assert cache.reserve([a], 0).numel() == 0


def test_fork_shares_full_blocks_and_copies_only_the_tail(gen):
    cache = _cache(num_blocks=16)
    parent = cache.new_sequence()
    slots = cache.reserve(parent, 10)  # blocks: full, full, 2-slot tail
    for layer in range(2):
        cache.write(
            layer, torch.randn(10, 2, 8, generator=gen), torch.randn(10, 2, 8, generator=gen), slots
        )
    children = cache.fork(parent, 3)
    stats = cache.stats
    assert (stats.forks, stats.children, stats.blocks_shared, stats.blocks_copied) == (1, 3, 6, 3)
    assert (
        stats.bytes_copied == 3 * 2 * 2 * 2 * 2 * 8 * 4
    )  # children x tail x layers x KV x H x D x 4 B
    refs = cache.ref_counts
    assert [refs[b] for b in cache.block_ids(parent)] == [4, 4, 1]
    for layer in range(2):
        keys, values, lengths = cache.gather(layer, [parent, *children])
        assert lengths.tolist() == [10] * 4
        assert torch.equal(keys, keys[:1].expand_as(keys)) and torch.equal(
            values, values[:1].expand_as(values)
        )
    # fork at a block boundary copies nothing; mid-block copies `at % block_size` slots
    before = cache.stats.bytes_copied
    cache.fork(parent, 2, at=8)
    assert cache.stats.bytes_copied == before
    cache.fork(parent, 2, at=5)
    assert cache.stats.bytes_copied == before + 2 * 1 * 2 * 2 * 2 * 8 * 4
    # a child writes past the fork point without touching the parent or its siblings
    new = cache.reserve(children[0], 1)
    assert new.tolist() == [cache.block_ids(children[0])[2] * 4 + 2]


def test_truncate_into_shared_block_copies_it_first(gen):
    cache = _cache(num_blocks=8)
    parent = cache.new_sequence()
    slots = cache.reserve(parent, 8)
    k, v = torch.randn(8, 2, 8, generator=gen), torch.randn(8, 2, 8, generator=gen)
    cache.write(0, k, v, slots)
    (child,) = cache.fork(parent, 1)  # both blocks shared, no copy
    assert cache.stats.bytes_copied == 0
    cache.truncate(child, 6)  # into the shared second block
    assert cache.block_ids(child)[0] == cache.block_ids(parent)[0]
    assert cache.block_ids(child)[1] != cache.block_ids(parent)[1]
    assert cache.stats.bytes_copied == 2 * 2 * 2 * 2 * 8 * 4  # 2 kept slots, all layers, K and V
    keys, _, _ = cache.gather(0, [child])
    assert torch.equal(keys[0].transpose(0, 1), k[:6])
    cache.truncate(child, 4)  # at a block boundary: the private block is simply released
    assert cache.block_ids(child) == cache.block_ids(parent)[:1]


def test_kv_cache_full_leaves_state_unchanged():
    cache = _cache(num_blocks=3)
    a = cache.new_sequence()
    cache.reserve(a, 6)  # 2 blocks, tail of 2
    snapshot = (
        cache.ref_counts,
        cache.num_free_blocks,
        cache.block_ids(a),
        cache.seq_len(a),
        cache.stats,
    )
    with pytest.raises(KVCacheFull):
        cache.reserve(a, 7)
    with pytest.raises(KVCacheFull):
        cache.fork(a, 2)  # two tail copies, one free block
    b = cache.new_sequence()
    with pytest.raises(KVCacheFull):
        cache.reserve([b, a], [1, 3])  # b alone fits, both do not
    assert cache.seq_len(b) == 0 and cache.block_ids(b) == []
    assert snapshot == (
        cache.ref_counts,
        cache.num_free_blocks,
        cache.block_ids(a),
        cache.seq_len(a),
        cache.stats,
    )
    cache.free(b)
    (c,) = cache.fork(a, 1, at=4)  # shares block 0
    d = cache.new_sequence()
    cache.reserve(d, 1)  # takes the last free block
    with pytest.raises(KVCacheFull):
        cache.truncate(c, 2)  # would need a private copy of the shared block
    assert cache.seq_len(c) == 4 and cache.block_ids(c) == cache.block_ids(a)[:1]
    cache.free(d)
    cache.reserve(c, 4)  # c's next block: the pool is empty again
    cache.truncate(c, 2)  # releasing c's private block makes room for the copy
    assert cache.seq_len(c) == 2 and cache.block_ids(c)[0] != cache.block_ids(a)[0]


def test_grow_keeps_sequences_and_contents(gen):
    """grow: live sequences keep their blocks, K/V, reference counts and statistics; the old free
    blocks are handed out before the new ones; the new blocks serve reserve and fork; shrinking
    or a non-int size is refused."""
    cache = _cache(num_blocks=3)
    a = cache.new_sequence()
    slots = cache.reserve(a, 6)  # 2 blocks
    key, value = (_randn((6, 2, 8), torch.float32, gen) for _ in range(2))
    for layer in range(cache.num_layers):
        cache.write(layer, key, value, slots)
    (b,) = cache.fork(a, 1, at=5)  # shares block 0, its own tail copy: the pool is full
    before = (cache.ref_counts, cache.block_ids(a), cache.block_ids(b), cache.stats)
    with pytest.raises(KVCacheFull):
        cache.reserve(a, 3)
    cache.grow(6)
    assert cache.num_blocks == 6 and cache.num_free_blocks == 3
    assert (cache.ref_counts[:3], cache.block_ids(a), cache.block_ids(b), cache.stats) == before
    assert cache.key_cache[0].shape[0] == 6 and cache.key_cache[0].data_ptr() == cache.kv.data_ptr()
    keys, values, _ = cache.gather(1, [a, b])
    torch.testing.assert_close(keys[0].transpose(0, 1), key, rtol=0, atol=0)
    torch.testing.assert_close(values[1, :, :5].transpose(0, 1), value[:5], rtol=0, atol=0)
    cache.reserve(a, 3)  # the third block of a: one of the new ones
    assert max(cache.block_ids(a)) >= 3
    cache.fork(a, 2)
    with pytest.raises(ValueError, match="num_blocks"):
        cache.grow(2)
    with pytest.raises(TypeError, match="num_blocks"):
        cache.grow(7.0)


# ------------------------------------------------------------------------------------------------
# random programs against a plain model
# ------------------------------------------------------------------------------------------------
LAYERS, HEADS, HEAD_DIM, BLOCK_SIZE, NUM_BLOCKS = 2, 2, 4, 4, 12
SLOT_BYTES = 2 * LAYERS * HEADS * HEAD_DIM * 4  # fp32, K and V, all layers


class CacheMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.cache = PagedKVCache(
            LAYERS,
            HEADS,
            HEAD_DIM,
            NUM_BLOCKS,
            block_size=BLOCK_SIZE,
            dtype=torch.float32,
            device="cpu",
        )
        self.model: dict[int, list[torch.Tensor]] = {}  # sid -> per token [LAYERS, 2, H, D]
        self.gen = torch.Generator().manual_seed(0)

    def _snapshot(self):
        c = self.cache
        return (
            c.ref_counts,
            c.num_free_blocks,
            c.stats,
            c.kv.clone(),
            {s: (c.block_ids(s), c.seq_len(s)) for s in c.sequences},
        )

    def _assert_unchanged(self, snapshot):
        now = self._snapshot()
        assert now[:3] == snapshot[:3] and now[4] == snapshot[4]
        assert torch.equal(now[3], snapshot[3])

    @rule()
    def new(self):
        self.model[self.cache.new_sequence()] = []

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def reserve_and_write(self, data):
        sids = data.draw(
            st.lists(st.sampled_from(sorted(self.model)), min_size=1, max_size=3, unique=True)
        )
        counts = data.draw(st.lists(st.integers(0, 9), min_size=len(sids), max_size=len(sids)))
        snapshot = self._snapshot()
        try:
            slots = self.cache.reserve(sids, counts)
        except KVCacheFull:
            self._assert_unchanged(snapshot)
            return
        tokens = torch.randn((sum(counts), LAYERS, 2, HEADS, HEAD_DIM), generator=self.gen)
        for layer in range(LAYERS):
            self.cache.write(layer, tokens[:, layer, 0], tokens[:, layer, 1], slots)
        for sid, chunk in zip(sids, tokens.split(counts)):
            self.model[sid].extend(chunk)
        assert self.cache.stats.bytes_copied == snapshot[2].bytes_copied

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def fork(self, data):
        sid = data.draw(st.sampled_from(sorted(self.model)))
        n = data.draw(st.integers(1, 3))
        at = data.draw(st.none() | st.integers(0, len(self.model[sid])))
        snapshot = self._snapshot()
        try:
            children = self.cache.fork(sid, n, at=at)
        except KVCacheFull:
            self._assert_unchanged(snapshot)
            return
        at = len(self.model[sid]) if at is None else at
        for child in children:
            self.model[child] = list(self.model[sid][:at])
        copied = self.cache.stats.bytes_copied - snapshot[2].bytes_copied
        assert copied == n * (at % BLOCK_SIZE) * SLOT_BYTES
        assert copied <= n * BLOCK_SIZE * SLOT_BYTES  # at most one tail block per child and layer

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def truncate(self, data):
        sid = data.draw(st.sampled_from(sorted(self.model)))
        length = data.draw(st.integers(0, len(self.model[sid])))
        snapshot = self._snapshot()
        try:
            self.cache.truncate(sid, length)
        except KVCacheFull:
            self._assert_unchanged(snapshot)
            return
        del self.model[sid][length:]
        assert self.cache.stats.bytes_copied - snapshot[2].bytes_copied <= BLOCK_SIZE * SLOT_BYTES

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def free(self, data):
        sid = data.draw(st.sampled_from(sorted(self.model)))
        self.cache.free(sid)
        del self.model[sid]

    @invariant()
    def reference_counts_conserved(self):
        held = [0] * NUM_BLOCKS
        for sid in self.model:
            blocks = self.cache.block_ids(sid)
            assert len(blocks) == -(-self.cache.seq_len(sid) // BLOCK_SIZE)
            for block in blocks:
                held[block] += 1
        assert self.cache.ref_counts == held
        assert self.cache.num_free_blocks == held.count(0)
        for sid in self.model:  # shared blocks are full
            full = self.cache.seq_len(sid) // BLOCK_SIZE
            assert all(held[b] == 1 for b in self.cache.block_ids(sid)[full:])

    @invariant()
    def contents_match_model(self):
        sids = sorted(self.model)
        assert sorted(self.cache.sequences) == sids
        for layer in range(LAYERS):
            keys, values, lengths = self.cache.gather(layer, sids)
            assert lengths.tolist() == [len(self.model[s]) for s in sids]
            for row, sid in enumerate(sids):
                n = len(self.model[sid])
                if n:
                    expected = torch.stack(self.model[sid])[:, layer]  # [n, 2, H, D]
                    assert torch.equal(keys[row, :, :n].transpose(0, 1), expected[:, 0])
                    assert torch.equal(values[row, :, :n].transpose(0, 1), expected[:, 1])
                assert not keys[row, :, n:].any() and not values[row, :, n:].any()

    def teardown(self):
        for sid in list(self.model):
            self.cache.free(sid)
        assert self.cache.num_free_blocks == NUM_BLOCKS
        assert self.cache.ref_counts == [0] * NUM_BLOCKS


CacheMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_random_programs = CacheMachine.TestCase


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, error, name",
    [
        (dict(num_layers=0), ValueError, "num_layers"),
        (dict(num_kv_heads=2.0), TypeError, "num_kv_heads"),
        (dict(head_dim=-1), ValueError, "head_dim"),
        (dict(num_blocks=True), TypeError, "num_blocks"),
        (dict(block_size=0), ValueError, "block_size"),
        (dict(dtype=torch.int32), TypeError, "dtype"),
    ],
)
def test_bad_constructor_arguments(kwargs, error, name):
    args = dict(
        num_layers=2,
        num_kv_heads=2,
        head_dim=8,
        num_blocks=4,
        block_size=4,
        dtype=torch.float32,
        device="cpu",
    )
    args.update(kwargs)
    with pytest.raises(error, match=name):
        PagedKVCache(**args)


def test_bad_calls_raise_naming_the_argument():
    cache = _cache()
    a = cache.new_sequence()
    slots = cache.reserve(a, 5)
    gone = cache.new_sequence()
    cache.free(gone)
    key = torch.zeros(5, 2, 8)
    cases = [
        (lambda: cache.seq_len(gone), ValueError, "sid"),
        (lambda: cache.seq_len(99), ValueError, "sid"),
        (lambda: cache.seq_len("0"), TypeError, "sid"),
        (lambda: cache.reserve([a, gone], 1), ValueError, "sids"),
        (lambda: cache.reserve([a, a], 1), ValueError, "sids"),
        (lambda: cache.reserve(a, -1), ValueError, "num_new_tokens"),
        (lambda: cache.reserve(a, 1.5), TypeError, "num_new_tokens"),
        (lambda: cache.reserve([a], [1, 2]), ValueError, "num_new_tokens"),
        (lambda: cache.fork(a, 0), ValueError, "n"),
        (lambda: cache.fork(a, 10**9, at=4), ValueError, "n must be <= num_blocks"),
        (lambda: cache.fork(a, 2, at=6), ValueError, "at"),
        (lambda: cache.fork(a, 2, at=-1), ValueError, "at"),
        (lambda: cache.fork(gone, 1), ValueError, "sid"),
        (lambda: cache.truncate(a, 6), ValueError, "length"),
        (lambda: cache.truncate(a, -1), ValueError, "length"),
        (lambda: cache.free(gone), ValueError, "sid"),
        (lambda: cache.block_table([gone]), ValueError, "sids"),
        (lambda: cache.gather(0, [gone]), ValueError, "sids"),
        (lambda: cache.gather(2, [a]), ValueError, "layer"),
        (lambda: cache.write(-1, key, key, slots), ValueError, "layer"),
        (lambda: cache.write(0, key.half(), key, slots), TypeError, "key"),
        (lambda: cache.write(0, key, key[:, :1], slots), ValueError, "value"),
        (lambda: cache.write(0, key[:4], key[:4], slots), ValueError, "key"),
        (lambda: cache.write(0, key, key, slots.float()), TypeError, "slots"),
        (lambda: cache.write(0, key, key, slots[None]), ValueError, "slots"),
        (lambda: cache.write(0, key, key, slots + 1000), ValueError, "slots"),
        (lambda: cache.write(0, key, key, slots - 10), ValueError, "slots"),
        (lambda: cache.write(0, key.numpy(), key, slots), TypeError, "key"),
    ]
    for call, error, name in cases:
        with pytest.raises(error, match=name):
            call()
    assert cache.seq_len(a) == 5 and cache.num_free_blocks == 6  # nothing changed


@pytest.mark.parametrize("other", ["meta"] + (["cuda"] if torch.cuda.is_available() else []))
def test_write_rejects_tensors_on_another_device(other):
    cache = _cache()
    slots = cache.reserve(cache.new_sequence(), 2)
    key = torch.zeros(2, 2, 8)
    elsewhere = key.to(other)
    for args, name in (
        ((elsewhere, key, slots), "key"),
        ((key, elsewhere, slots), "value"),
        ((key, key, slots.to(other)), "slots"),
    ):
        with pytest.raises(ValueError, match=f"{name} must be on the cache's device"):
            cache.write(0, *args)


def test_bad_write_slots_repeated():
    cache = _cache()
    slots = cache.reserve(cache.new_sequence(), 3)
    key = torch.zeros(3, 2, 8)
    with pytest.raises(ValueError, match="slots must be distinct"):
        cache.write(0, key, key, slots[[0, 1, 1]])


def test_cuda_device_without_cuda_is_a_value_error(monkeypatch):
    """Issue 10 item 10: was an AssertionError from torch's lazy CUDA init."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device is 'cuda' but .* no CUDA device"):
        PagedKVCache(2, 2, 8, 4, dtype=torch.float32, device="cuda")


# ------------------------------------------------------------------------------------------------
# the pool stores values: no autograd graph, usable in and out of inference mode
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["write", "write_reserved"])
def test_write_of_inputs_that_require_grad_stores_values_only(method, gen):
    """Issue 10 item 4: writing a key that requires grad made the pool part of the autograd graph,
    which then grew with every write (20,000 writes: +119 MB)."""
    cache = _cache()
    sid = cache.new_sequence()
    leaf = torch.randn(2, 2, 8, generator=gen, requires_grad=True)
    written = []
    for _ in range(3):
        key = leaf * 2.0  # a non-leaf with a graph behind it
        getattr(cache, method)(0, key, key + 1.0, cache.reserve(sid, 2))
        written.append(key.detach())
        assert not cache.kv.requires_grad and cache.kv.grad_fn is None
    keys, values, _ = cache.gather(0, sid)
    assert not keys.requires_grad and not values.requires_grad
    want = torch.cat(written).transpose(0, 1)
    assert torch.equal(keys[0], want) and torch.equal(values[0], want + 1.0)
    leaf.sum().backward()  # the caller's own graph is untouched
    assert torch.equal(leaf.grad, torch.ones_like(leaf))


def test_cache_built_in_inference_mode_is_writable_outside_it(gen):
    with torch.inference_mode():
        cache = _cache()
    sid = cache.new_sequence()
    key = torch.randn(3, 2, 8, generator=gen)
    slots = cache.reserve(sid, 3)
    cache.write(0, key, key, slots)  # was: "Inplace update to inference tensor outside ..."
    with torch.inference_mode():
        cache.write(1, -key, -key, slots)
    assert torch.equal(cache.gather(0, sid)[0][0], key.transpose(0, 1))
    assert torch.equal(cache.gather(1, sid)[0][0], -key.transpose(0, 1))


def test_stale_slots_of_a_freed_sequence_write_into_its_successor(gen):
    """The documented hazard that stays by design: a slot id carries no owner, so slots kept from
    a freed sequence overwrite whichever sequence reuses those blocks."""
    cache = _cache()
    old = cache.new_sequence()
    stale = cache.reserve(old, 4)
    cache.free(old)
    new = cache.new_sequence()
    fresh = cache.reserve(new, 4)
    assert torch.equal(fresh, stale)  # the freed block went straight to the new sequence
    key = torch.randn(4, 2, 8, generator=gen)
    cache.write(0, key, key, fresh)
    cache.write(0, -key, -key, stale)
    assert torch.equal(cache.gather(0, new)[0][0], -key.transpose(0, 1))
