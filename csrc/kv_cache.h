// Launchers of the paged-KV-cache kernels (kv_cache_kernels.cu). Plain pointers, sizes and
// strides (in elements, int64); no torch types, so the kernels compile with plain nvcc. Each
// launcher enqueues one kernel on `stream` and returns cudaGetLastError().
//
// Layouts:
//   pool         [num_layers, 2 (K, V), num_blocks, block_size, num_heads, head_dim]; a block's
//                slots are contiguous and a slot's [num_heads, head_dim] is contiguous.
//   layer cache  [num_blocks, block_size, num_heads, head_dim], contiguous.
//   slot s       = position s % block_size of block s / block_size.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace appo_kernels_kv {

enum class ElementType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// For every pair p, layer l and K/V: the first `prefix_elems` elements of block src_blocks[p]
// are copied to block dst_blocks[p]. Pairs with a block id outside [0, num_blocks) are skipped.
// Grid: (num_pairs, num_layers * 2); num_layers * 2 <= 65535.
cudaError_t launch_copy_block_prefix(ElementType type, void* pool, int64_t num_layers,
                                     int64_t layer_stride, int64_t kv_stride, int64_t block_stride,
                                     int64_t num_blocks, const int64_t* src_blocks,
                                     const int64_t* dst_blocks, int64_t num_pairs,
                                     int64_t prefix_elems, cudaStream_t stream);

// key_cache[slots[i]] = key[i] and value_cache[slots[i]] = value[i] ([num_heads, head_dim] each).
// key/value element (i, h, d) is at i * token_stride + h * head_stride + d. Tokens whose slot is
// outside [0, num_slots) are skipped. Grid: (num_tokens, 2).
cudaError_t launch_write_slots(ElementType type, void* key_cache, void* value_cache,
                               int64_t num_slots, const void* key, const void* value,
                               int64_t key_token_stride, int64_t key_head_stride,
                               int64_t value_token_stride, int64_t value_head_stride,
                               const int64_t* slots, int64_t num_tokens, int64_t num_heads,
                               int64_t head_dim, cudaStream_t stream);

// keys_out[b, h, t, :] = key_cache[block_table[b, t / block_size], t % block_size, h, :] for
// t < lengths[b], else zeros (same for values). Outputs are contiguous [batch, num_heads,
// max_len, head_dim]; block_table row b starts at b * table_stride and has >= ceil(max_len /
// block_size) entries. A block id outside [0, num_blocks) reads as zeros.
// Grid: (max_len, batch, 2); batch <= 65535.
cudaError_t launch_gather_padded(ElementType type, const void* key_cache,
                                 const void* value_cache, int64_t num_blocks, int64_t block_size,
                                 int64_t num_heads, int64_t head_dim, const int32_t* block_table,
                                 int64_t table_stride, const int64_t* lengths, int64_t batch,
                                 int64_t max_len, void* keys_out, void* values_out,
                                 cudaStream_t stream);

}  // namespace appo_kernels_kv
