"""Paged KV cache with prefix sharing and copy-on-fork for branching rollouts."""

from appo_kernels.kv.cache import KVCacheFull, KVCacheStats, PagedKVCache

__all__ = ["KVCacheFull", "KVCacheStats", "PagedKVCache"]
