"""Device data movement for the paged KV cache: tail-block copy, slot write, padded gather.

Each op is a ``torch.library`` operator ``appo_kernels_kv::<name>`` (so ``torch.compile`` and
fake tensors see one opaque op with declared mutations). Its CUDA kernel is the extension
``appo_kernels._C`` (csrc/, which defines the schemas) when it is built; its CPU kernel -- and its
CUDA kernel when the extension is not built -- is a PyTorch path that gives bit-identical results
(every op only moves bits). ``APPO_KERNELS_BACKEND=torch`` forces the PyTorch path on CUDA too.

Layouts (the cache owns and validates them; these functions trust their arguments):

- ``kv``: the whole pool, contiguous ``[num_layers, 2, num_blocks, block_size, heads, head_dim]``
  (index 0 of dim 1 is K, 1 is V).
- ``key_cache`` / ``value_cache``: one layer, contiguous
  ``[num_blocks, block_size, heads, head_dim]``.
- slot ``s`` is position ``s % block_size`` of block ``s // block_size``.
"""

from __future__ import annotations

import importlib.util

import torch

from appo_kernels._backend import forced_backend

NAMESPACE = "appo_kernels_kv"
# The operator schemas, exactly as csrc/kv_cache_bindings.cpp defines them (a test compares).
SCHEMAS = {
    "copy_block_prefix": (
        "copy_block_prefix(Tensor(a!) kv, Tensor src_blocks, Tensor dst_blocks, int num_tokens) "
        "-> ()"
    ),
    "write_slots": (
        "write_slots(Tensor(a!) key_cache, Tensor(b!) value_cache, Tensor key, Tensor value, "
        "Tensor slots) -> ()"
    ),
    "gather_padded": (
        "gather_padded(Tensor key_cache, Tensor value_cache, Tensor block_table, "
        "Tensor lengths, int max_len) -> (Tensor, Tensor)"
    ),
}


def _load_extension() -> bool:
    """Loads ``appo_kernels._C`` (it defines ``torch.ops.appo_kernels_kv`` with CUDA kernels) if
    it was built."""
    spec = importlib.util.find_spec("appo_kernels._C")
    if spec is None or spec.origin is None:
        return False
    torch.ops.load_library(spec.origin)
    return True


HAS_EXTENSION = _load_extension()
_LIBRARY = torch.library.Library(NAMESPACE, "FRAGMENT")
if not HAS_EXTENSION:
    for _schema in SCHEMAS.values():
        _LIBRARY.define(_schema)


def _register(name: str, torch_path, fake) -> None:
    """The PyTorch path as the op's CPU kernel (and CUDA kernel without the extension), and its
    fake (shapes only) for meta / fake tensors."""
    _LIBRARY.impl(name, torch_path, "CPU")
    if not HAS_EXTENSION:
        _LIBRARY.impl(name, torch_path, "CUDA")
    torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=_LIBRARY)


def _use_torch_path(t: torch.Tensor) -> bool:
    """Whether to call the PyTorch path directly: only to override the extension's CUDA kernel
    when ``APPO_KERNELS_BACKEND=torch``; everything else goes through the op."""
    return HAS_EXTENSION and t.is_cuda and forced_backend() == "torch"


# ----------------------------------------------------------------------------------------------
# copy_block_prefix: kv[:, :, dst[i], :n] = kv[:, :, src[i], :n] for every pair i, one launch
# ----------------------------------------------------------------------------------------------
def copy_block_prefix(
    kv: torch.Tensor, src_blocks: torch.Tensor, dst_blocks: torch.Tensor, num_tokens: int
) -> None:
    """Copies the first ``num_tokens`` slots of block ``src_blocks[i]`` into ``dst_blocks[i]``, in
    every layer, for K and V. ``src_blocks``/``dst_blocks``: int64 ``[pairs]`` on ``kv``'s device;
    destination blocks are distinct and never sources."""
    if src_blocks.numel() == 0 or num_tokens == 0:
        return
    if _use_torch_path(kv):
        copy_block_prefix_torch(kv, src_blocks, dst_blocks, num_tokens)
    else:
        torch.ops.appo_kernels_kv.copy_block_prefix(kv, src_blocks, dst_blocks, num_tokens)


def copy_block_prefix_torch(
    kv: torch.Tensor, src_blocks: torch.Tensor, dst_blocks: torch.Tensor, num_tokens: int
) -> None:
    kv[:, :, dst_blocks, :num_tokens] = kv[:, :, src_blocks, :num_tokens]


_register("copy_block_prefix", copy_block_prefix_torch, lambda *args: None)


# ----------------------------------------------------------------------------------------------
# write_slots: key_cache[slots] = key, value_cache[slots] = value
# ----------------------------------------------------------------------------------------------
def write_slots(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    slots: torch.Tensor,
) -> None:
    """Writes token ``i`` of ``key``/``value`` ``[tokens, heads, head_dim]`` to slot ``slots[i]``
    (int64, distinct, in range) of one layer's caches."""
    if slots.numel() == 0:
        return
    if _use_torch_path(key_cache):
        write_slots_torch(key_cache, value_cache, key, value, slots)
    else:
        torch.ops.appo_kernels_kv.write_slots(key_cache, value_cache, key, value, slots)


def write_slots_torch(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    slots: torch.Tensor,
) -> None:
    key_cache.flatten(0, 1).index_copy_(0, slots, key)
    value_cache.flatten(0, 1).index_copy_(0, slots, value)


_register("write_slots", write_slots_torch, lambda *args: None)


# ----------------------------------------------------------------------------------------------
# gather_padded: block table -> contiguous [batch, heads, max_len, head_dim], zeros past a length
# ----------------------------------------------------------------------------------------------
def gather_padded(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    lengths: torch.Tensor,
    max_len: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reads sequence ``b``'s positions ``t < lengths[b]`` (position ``t`` lives in block
    ``block_table[b, t // block_size]``) into ``[B, heads, max_len, head_dim]`` tensors; positions
    past ``lengths[b]`` are +0.0. ``block_table``: int32 ``[B, >= ceil(max_len / block_size)]``;
    ``lengths``: int64 ``[B]``, each ``<= max_len``."""
    if _use_torch_path(key_cache):
        return gather_padded_torch(key_cache, value_cache, block_table, lengths, max_len)
    keys, values = torch.ops.appo_kernels_kv.gather_padded(
        key_cache, value_cache, block_table, lengths, max_len
    )
    return keys, values


def gather_padded_torch(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    lengths: torch.Tensor,
    max_len: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    block_size = key_cache.shape[1]
    batch = block_table.shape[0]
    pos = torch.arange(max_len, device=key_cache.device)
    blocks = block_table.long().gather(1, (pos // block_size).expand(batch, max_len))
    valid = pos < lengths[:, None]
    slots = torch.where(valid, blocks * block_size + pos % block_size, 0)
    hidden = ~valid[:, :, None, None]

    def read(cache: torch.Tensor) -> torch.Tensor:
        tokens = cache.flatten(0, 1)[slots].masked_fill_(hidden, 0)  # [B, T, H, D]
        return tokens.transpose(1, 2).contiguous()

    return read(key_cache), read(value_cache)


def _gather_padded_fake(key_cache, value_cache, block_table, lengths, max_len):
    _, _, heads, head_dim = key_cache.shape
    keys = key_cache.new_empty((block_table.shape[0], heads, max_len, head_dim))
    return keys, torch.empty_like(keys)


_register("gather_padded", gather_padded_torch, _gather_padded_fake)
