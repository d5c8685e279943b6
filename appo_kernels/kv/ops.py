"""Device data movement for the paged KV cache: tail-block copy, slot write, padded gather.

Each op runs the CUDA kernels of the extension ``appo_kernels._C`` (csrc/) when the extension is
built and the tensors are on CUDA, and otherwise a PyTorch path that gives bit-identical results
(every op only moves bits). ``APPO_KERNELS_BACKEND=torch`` forces the PyTorch path.

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


def _load_extension() -> bool:
    """Loads ``appo_kernels._C`` (it registers ``torch.ops.appo_kernels_kv``) if it was built."""
    spec = importlib.util.find_spec("appo_kernels._C")
    if spec is None or spec.origin is None:
        return False
    torch.ops.load_library(spec.origin)
    return True


HAS_EXTENSION = _load_extension()


def _use_extension(t: torch.Tensor) -> bool:
    return HAS_EXTENSION and t.is_cuda and forced_backend() != "torch"


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
    if _use_extension(kv):
        torch.ops.appo_kernels_kv.copy_block_prefix(kv, src_blocks, dst_blocks, num_tokens)
    else:
        copy_block_prefix_torch(kv, src_blocks, dst_blocks, num_tokens)


def copy_block_prefix_torch(
    kv: torch.Tensor, src_blocks: torch.Tensor, dst_blocks: torch.Tensor, num_tokens: int
) -> None:
    kv[:, :, dst_blocks, :num_tokens] = kv[:, :, src_blocks, :num_tokens]


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
    if _use_extension(key_cache):
        torch.ops.appo_kernels_kv.write_slots(key_cache, value_cache, key, value, slots)
    else:
        write_slots_torch(key_cache, value_cache, key, value, slots)


def write_slots_torch(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    slots: torch.Tensor,
) -> None:
    key_cache.flatten(0, 1).index_copy_(0, slots, key)
    value_cache.flatten(0, 1).index_copy_(0, slots, value)


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
    if _use_extension(key_cache):
        keys, values = torch.ops.appo_kernels_kv.gather_padded(
            key_cache, value_cache, block_table, lengths, max_len
        )
        return keys, values
    return gather_padded_torch(key_cache, value_cache, block_table, lengths, max_len)


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
