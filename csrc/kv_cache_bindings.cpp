// Torch binding of the paged-KV-cache kernels: registers the ops `appo_kernels_kv::*` (CUDA
// implementations), checks their arguments and launches on the current CUDA stream.
// appo_kernels/kv/ops.py loads this library and holds the PyTorch fallback of each op.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>

#include "kv_cache.h"

namespace appo_kernels_kv {
namespace {

constexpr int64_t kMaxGridY = 65535;  // also the limit of gridDim.z
constexpr int64_t kMaxGridX = std::numeric_limits<int32_t>::max();

ElementType element_type(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return ElementType::kFloat32;
    case at::kHalf:
      return ElementType::kFloat16;
    case at::kBFloat16:
      return ElementType::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, name, " must be float32, float16 or bfloat16, got ",
                       t.scalar_type());
  }
  return ElementType::kFloat32;  // unreachable
}

void check_cuda(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  TORCH_CHECK_VALUE(t.is_cuda() && t.device() == ref.device(), name, " must be on ",
                    ref.device(), ", got ", t.device());
}

void check_index(const at::Tensor& t, const at::Tensor& ref, at::ScalarType dtype,
                 const char* name) {
  check_cuda(t, ref, name);
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, " must be ", dtype, ", got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
}

void check_launch(cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, "appo_kernels_kv launch failed: ", cudaGetErrorString(err));
}

// One layer's caches: two contiguous CUDA tensors [blocks, block_size, heads, head_dim] of one
// shape, dtype and device. Returns their element type.
ElementType check_layer_caches(const at::Tensor& key_cache, const at::Tensor& value_cache) {
  const ElementType type = element_type(key_cache, "key_cache");
  TORCH_CHECK_VALUE(key_cache.is_cuda(), "key_cache must be a CUDA tensor, got ",
                    key_cache.device());
  TORCH_CHECK_VALUE(key_cache.dim() == 4 && key_cache.is_contiguous(),
                    "key_cache must be a contiguous [blocks, block_size, heads, head_dim] "
                    "tensor, got shape ", key_cache.sizes());
  TORCH_CHECK_VALUE(value_cache.sizes() == key_cache.sizes() && value_cache.is_contiguous() &&
                        value_cache.scalar_type() == key_cache.scalar_type(),
                    "value_cache must be contiguous with key_cache's shape ", key_cache.sizes(),
                    " and dtype ", key_cache.scalar_type(), ", got ", value_cache.sizes(), " ",
                    value_cache.scalar_type());
  check_cuda(value_cache, key_cache, "value_cache");
  return type;
}

void copy_block_prefix(at::Tensor kv, const at::Tensor& src_blocks,
                       const at::Tensor& dst_blocks, int64_t num_tokens) {
  const ElementType type = element_type(kv, "kv");
  TORCH_CHECK_VALUE(kv.is_cuda(), "kv must be a CUDA tensor, got ", kv.device());
  TORCH_CHECK_VALUE(kv.dim() == 6 && kv.size(1) == 2 && kv.is_contiguous(),
                    "kv must be a contiguous [layers, 2, blocks, block_size, heads, head_dim] "
                    "tensor, got shape ", kv.sizes());
  check_index(src_blocks, kv, at::kLong, "src_blocks");
  check_index(dst_blocks, kv, at::kLong, "dst_blocks");
  TORCH_CHECK_VALUE(src_blocks.dim() == 1 && dst_blocks.sizes() == src_blocks.sizes(),
                    "src_blocks and dst_blocks must be 1-D of one length, got ",
                    src_blocks.sizes(), " and ", dst_blocks.sizes());
  TORCH_CHECK_VALUE(num_tokens >= 0 && num_tokens <= kv.size(3), "num_tokens must be in [0, ",
                    kv.size(3), "], got ", num_tokens);
  TORCH_CHECK_VALUE(src_blocks.numel() <= kMaxGridX && kv.size(0) * 2 <= kMaxGridY,
                    "too many block pairs or layers for one launch");
  const c10::cuda::CUDAGuard guard(kv.device());
  check_launch(launch_copy_block_prefix(
      type, kv.data_ptr(), kv.size(0), kv.stride(0), kv.stride(1), kv.stride(2), kv.size(2),
      src_blocks.data_ptr<int64_t>(), dst_blocks.data_ptr<int64_t>(), src_blocks.numel(),
      num_tokens * kv.stride(3), c10::cuda::getCurrentCUDAStream()));
}

void write_slots(at::Tensor key_cache, at::Tensor value_cache, const at::Tensor& key,
                 const at::Tensor& value, const at::Tensor& slots) {
  const ElementType type = check_layer_caches(key_cache, value_cache);
  check_index(slots, key_cache, at::kLong, "slots");
  TORCH_CHECK_VALUE(slots.dim() == 1 && slots.numel() <= kMaxGridX,
                    "slots must be 1-D with < 2^31 entries, got shape ", slots.sizes());
  const auto heads = key_cache.size(2), head_dim = key_cache.size(3);
  for (const auto& [x, name] : {std::pair{&key, "key"}, std::pair{&value, "value"}}) {
    check_cuda(*x, key_cache, name);
    TORCH_CHECK_TYPE(x->scalar_type() == key_cache.scalar_type(), name, " must be ",
                     key_cache.scalar_type(), ", got ", x->scalar_type());
    TORCH_CHECK_VALUE(x->dim() == 3 && x->size(0) == slots.size(0) && x->size(1) == heads &&
                          x->size(2) == head_dim && x->stride(2) == 1,
                      name, " must be [", slots.size(0), ", ", heads, ", ", head_dim,
                      "] with a contiguous last dim, got shape ", x->sizes());
  }
  const c10::cuda::CUDAGuard guard(key_cache.device());
  check_launch(launch_write_slots(
      type, key_cache.data_ptr(), value_cache.data_ptr(), key_cache.size(0) * key_cache.size(1),
      key.data_ptr(), value.data_ptr(), key.stride(0), key.stride(1), value.stride(0),
      value.stride(1), slots.data_ptr<int64_t>(), slots.numel(), heads, head_dim,
      c10::cuda::getCurrentCUDAStream()));
}

std::tuple<at::Tensor, at::Tensor> gather_padded(const at::Tensor& key_cache,
                                                 const at::Tensor& value_cache,
                                                 const at::Tensor& block_table,
                                                 const at::Tensor& lengths, int64_t max_len) {
  const ElementType type = check_layer_caches(key_cache, value_cache);
  check_index(block_table, key_cache, at::kInt, "block_table");
  check_index(lengths, key_cache, at::kLong, "lengths");
  const auto batch = block_table.size(0), block_size = key_cache.size(1);
  TORCH_CHECK_VALUE(block_table.dim() == 2 && lengths.dim() == 1 && lengths.size(0) == batch,
                    "block_table must be [batch, max_blocks] and lengths [batch], got ",
                    block_table.sizes(), " and ", lengths.sizes());
  TORCH_CHECK_VALUE(max_len >= 0 && max_len <= kMaxGridX && batch <= kMaxGridY,
                    "max_len must be in [0, 2^31) and batch <= 65535, got ", max_len, " and ",
                    batch);
  TORCH_CHECK_VALUE(block_table.size(1) * block_size >= max_len,
                    "block_table has ", block_table.size(1), " blocks per row, too few for max_len ",
                    max_len);
  const auto heads = key_cache.size(2), head_dim = key_cache.size(3);
  at::Tensor keys = at::empty({batch, heads, max_len, head_dim}, key_cache.options());
  at::Tensor values = at::empty_like(keys);
  const c10::cuda::CUDAGuard guard(key_cache.device());
  check_launch(launch_gather_padded(
      type, key_cache.data_ptr(), value_cache.data_ptr(), key_cache.size(0), block_size, heads,
      head_dim, block_table.data_ptr<int32_t>(), block_table.stride(0),
      lengths.data_ptr<int64_t>(), batch, max_len, keys.data_ptr(), values.data_ptr(),
      c10::cuda::getCurrentCUDAStream()));
  return {keys, values};
}

}  // namespace

TORCH_LIBRARY(appo_kernels_kv, m) {
  // The CPU kernels (the PyTorch path) and the fake kernels live in this Python module.
  m.set_python_module("appo_kernels.kv.ops");
  m.def("copy_block_prefix(Tensor(a!) kv, Tensor src_blocks, Tensor dst_blocks, int num_tokens) -> ()");
  m.def("write_slots(Tensor(a!) key_cache, Tensor(b!) value_cache, Tensor key, Tensor value, "
        "Tensor slots) -> ()");
  m.def("gather_padded(Tensor key_cache, Tensor value_cache, Tensor block_table, "
        "Tensor lengths, int max_len) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(appo_kernels_kv, CUDA, m) {
  m.impl("copy_block_prefix", &copy_block_prefix);
  m.impl("write_slots", &write_slots);
  m.impl("gather_padded", &gather_padded);
}

}  // namespace appo_kernels_kv
