// Data movement of the paged KV cache: tail-block copy on fork, slot write, padded gather.
//
// Every kernel only moves bits, so results equal the PyTorch fallback (appo_kernels/kv/ops.py)
// bit for bit. Each kernel is templated on the element type T (float, __half, __nv_bfloat16) and
// on N, the elements moved per access: N = 16 / sizeof(T) (16-byte vector loads and stores) when
// every pointer, stride and length is a multiple of 16 bytes, else N = 1. Offsets are int64.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>

#include "kv_cache.h"

namespace appo_kernels_kv {
namespace {

// N elements of T moved as one aligned access.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T>
__device__ __forceinline__ T positive_zero();
template <>
__device__ __forceinline__ float positive_zero<float>() { return 0.0f; }
template <>
__device__ __forceinline__ __half positive_zero<__half>() { return __ushort_as_half(0); }
template <>
__device__ __forceinline__ __nv_bfloat16 positive_zero<__nv_bfloat16>() {
  return __ushort_as_bfloat16(0);
}

// Copy on fork: pool[l, kv, dst[p], :prefix] = pool[l, kv, src[p], :prefix] (prefix in packs).
// One CTA per (pair p = blockIdx.x, layer and K/V = blockIdx.y).
template <typename T, int N>
__global__ void copy_block_prefix_kernel(T* __restrict__ pool, int64_t layer_stride,
                                         int64_t kv_stride, int64_t block_stride,
                                         int64_t num_blocks, const int64_t* __restrict__ src_blocks,
                                         const int64_t* __restrict__ dst_blocks,
                                         int64_t prefix_packs) {
  const int64_t pair = blockIdx.x;
  const int64_t src = src_blocks[pair];
  const int64_t dst = dst_blocks[pair];
  if (src < 0 || src >= num_blocks || dst < 0 || dst >= num_blocks) return;
  T* base = pool + (blockIdx.y >> 1) * layer_stride + (blockIdx.y & 1) * kv_stride;
  const auto* from = reinterpret_cast<const Pack<T, N>*>(base + src * block_stride);
  auto* to = reinterpret_cast<Pack<T, N>*>(base + dst * block_stride);
  for (int64_t i = threadIdx.x; i < prefix_packs; i += blockDim.x) to[i] = from[i];
}

// cache[slots[i], h, :] = x[i, h, :] for x = key (blockIdx.y == 0) or value (blockIdx.y == 1).
// One CTA per token i = blockIdx.x; threads stride over the token's heads x head_packs packs.
template <typename T, int N>
__global__ void write_slots_kernel(T* __restrict__ key_cache, T* __restrict__ value_cache,
                                   int64_t num_slots, const T* __restrict__ key,
                                   const T* __restrict__ value, int64_t key_token_stride,
                                   int64_t key_head_stride, int64_t value_token_stride,
                                   int64_t value_head_stride, const int64_t* __restrict__ slots,
                                   int64_t num_heads, int64_t head_packs) {
  const int64_t token = blockIdx.x;
  const int64_t slot = slots[token];
  if (slot < 0 || slot >= num_slots) return;
  const bool is_value = blockIdx.y == 1;
  const T* src = is_value ? value + token * value_token_stride : key + token * key_token_stride;
  const int64_t head_stride = is_value ? value_head_stride : key_head_stride;
  auto* dst = reinterpret_cast<Pack<T, N>*>((is_value ? value_cache : key_cache) +
                                            slot * num_heads * head_packs * N);
  for (int64_t i = threadIdx.x; i < num_heads * head_packs; i += blockDim.x) {
    const int64_t head = i / head_packs;
    dst[i] = reinterpret_cast<const Pack<T, N>*>(src + head * head_stride)[i % head_packs];
  }
}

// out[b, h, t, :] = cache[block_table[b, t / block_size], t % block_size, h, :] if t < lengths[b],
// else +0. One CTA per (position t = blockIdx.x, sequence b = blockIdx.y, K/V = blockIdx.z).
template <typename T, int N>
__global__ void gather_padded_kernel(const T* __restrict__ key_cache,
                                     const T* __restrict__ value_cache, int64_t num_blocks,
                                     int64_t block_size, int64_t num_heads, int64_t head_packs,
                                     const int32_t* __restrict__ block_table, int64_t table_stride,
                                     const int64_t* __restrict__ lengths, int64_t max_len,
                                     T* __restrict__ keys_out, T* __restrict__ values_out) {
  const int64_t t = blockIdx.x;
  const int64_t b = blockIdx.y;
  const bool is_value = blockIdx.z == 1;
  const int64_t block = t < lengths[b] ? block_table[b * table_stride + t / block_size] : -1;
  const bool present = block >= 0 && block < num_blocks;
  const int64_t slot_packs = num_heads * head_packs;
  const auto* src = reinterpret_cast<const Pack<T, N>*>(is_value ? value_cache : key_cache) +
                    (present ? (block * block_size + t % block_size) * slot_packs : 0);
  // out[b, 0, t, 0]; head h is h * max_len * head_packs packs further.
  auto* out = reinterpret_cast<Pack<T, N>*>(is_value ? values_out : keys_out) +
              (b * num_heads * max_len + t) * head_packs;
  Pack<T, N> zero;
#pragma unroll
  for (int k = 0; k < N; ++k) zero.v[k] = positive_zero<T>();
  for (int64_t i = threadIdx.x; i < slot_packs; i += blockDim.x) {
    const int64_t head = i / head_packs;
    out[head * max_len * head_packs + i % head_packs] = present ? src[i] : zero;
  }
}

// ---------------------------------------------------------------------------------------------
// host side
// ---------------------------------------------------------------------------------------------
template <typename T>
constexpr int kVectorElems = 16 / static_cast<int>(sizeof(T));

// Whether every pointer is 16-byte aligned and every count (in elements) fills whole 16 bytes.
template <typename T>
bool vectorizable(std::initializer_list<const void*> pointers,
                  std::initializer_list<int64_t> counts) {
  for (const void* p : pointers)
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  for (int64_t c : counts)
    if (c % kVectorElems<T> != 0) return false;
  return true;
}

// Threads per CTA for `work` units: a multiple of 32 in [32, 256].
unsigned threads_for(int64_t work) {
  return static_cast<unsigned>(std::min<int64_t>(256, std::max<int64_t>(32, (work + 31) / 32 * 32)));
}

// Calls fn(T{}) with T the C++ type of `type`.
template <typename Fn>
cudaError_t dispatch_element_type(ElementType type, Fn&& fn) {
  switch (type) {
    case ElementType::kFloat32:
      return fn(float{});
    case ElementType::kFloat16:
      return fn(__half{});
    case ElementType::kBFloat16:
      return fn(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_copy_block_prefix(ElementType type, void* pool, int64_t num_layers,
                                     int64_t layer_stride, int64_t kv_stride, int64_t block_stride,
                                     int64_t num_blocks, const int64_t* src_blocks,
                                     const int64_t* dst_blocks, int64_t num_pairs,
                                     int64_t prefix_elems, cudaStream_t stream) {
  if (num_pairs == 0 || num_layers == 0 || prefix_elems == 0) return cudaSuccess;
  return dispatch_element_type(type, [&](auto tag) {
    using T = decltype(tag);
    const dim3 grid(static_cast<unsigned>(num_pairs), static_cast<unsigned>(num_layers * 2));
    T* base = static_cast<T*>(pool);
    if (vectorizable<T>({pool}, {layer_stride, kv_stride, block_stride, prefix_elems})) {
      constexpr int N = kVectorElems<T>;
      copy_block_prefix_kernel<T, N><<<grid, threads_for(prefix_elems / N), 0, stream>>>(
          base, layer_stride, kv_stride, block_stride, num_blocks, src_blocks, dst_blocks,
          prefix_elems / N);
    } else {
      copy_block_prefix_kernel<T, 1><<<grid, threads_for(prefix_elems), 0, stream>>>(
          base, layer_stride, kv_stride, block_stride, num_blocks, src_blocks, dst_blocks,
          prefix_elems);
    }
    return cudaGetLastError();
  });
}

cudaError_t launch_write_slots(ElementType type, void* key_cache, void* value_cache,
                               int64_t num_slots, const void* key, const void* value,
                               int64_t key_token_stride, int64_t key_head_stride,
                               int64_t value_token_stride, int64_t value_head_stride,
                               const int64_t* slots, int64_t num_tokens, int64_t num_heads,
                               int64_t head_dim, cudaStream_t stream) {
  if (num_tokens == 0 || num_heads == 0 || head_dim == 0) return cudaSuccess;
  return dispatch_element_type(type, [&](auto tag) {
    using T = decltype(tag);
    const dim3 grid(static_cast<unsigned>(num_tokens), 2);
    auto* kc = static_cast<T*>(key_cache);
    auto* vc = static_cast<T*>(value_cache);
    const auto* k = static_cast<const T*>(key);
    const auto* v = static_cast<const T*>(value);
    if (vectorizable<T>({key_cache, value_cache, key, value},
                        {head_dim, key_token_stride, key_head_stride, value_token_stride,
                         value_head_stride})) {
      constexpr int N = kVectorElems<T>;
      write_slots_kernel<T, N><<<grid, threads_for(num_heads * head_dim / N), 0, stream>>>(
          kc, vc, num_slots, k, v, key_token_stride, key_head_stride, value_token_stride,
          value_head_stride, slots, num_heads, head_dim / N);
    } else {
      write_slots_kernel<T, 1><<<grid, threads_for(num_heads * head_dim), 0, stream>>>(
          kc, vc, num_slots, k, v, key_token_stride, key_head_stride, value_token_stride,
          value_head_stride, slots, num_heads, head_dim);
    }
    return cudaGetLastError();
  });
}

cudaError_t launch_gather_padded(ElementType type, const void* key_cache,
                                 const void* value_cache, int64_t num_blocks, int64_t block_size,
                                 int64_t num_heads, int64_t head_dim, const int32_t* block_table,
                                 int64_t table_stride, const int64_t* lengths, int64_t batch,
                                 int64_t max_len, void* keys_out, void* values_out,
                                 cudaStream_t stream) {
  if (batch == 0 || max_len == 0 || num_heads == 0 || head_dim == 0) return cudaSuccess;
  return dispatch_element_type(type, [&](auto tag) {
    using T = decltype(tag);
    const dim3 grid(static_cast<unsigned>(max_len), static_cast<unsigned>(batch), 2);
    const auto* kc = static_cast<const T*>(key_cache);
    const auto* vc = static_cast<const T*>(value_cache);
    auto* ko = static_cast<T*>(keys_out);
    auto* vo = static_cast<T*>(values_out);
    if (vectorizable<T>({key_cache, value_cache, keys_out, values_out}, {head_dim})) {
      constexpr int N = kVectorElems<T>;
      gather_padded_kernel<T, N><<<grid, threads_for(num_heads * head_dim / N), 0, stream>>>(
          kc, vc, num_blocks, block_size, num_heads, head_dim / N, block_table, table_stride,
          lengths, max_len, ko, vo);
    } else {
      gather_padded_kernel<T, 1><<<grid, threads_for(num_heads * head_dim), 0, stream>>>(
          kc, vc, num_blocks, block_size, num_heads, head_dim, block_table, table_stride,
          lengths, max_len, ko, vo);
    }
    return cudaGetLastError();
  });
}

}  // namespace appo_kernels_kv
