// cache_write: scatter this step's K, V and bias into the page layout of common.h.
// A pure copy of element bits (no conversion), so any dtype of the right size works.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common.h"

namespace vllm_doge {
namespace {

template <typename E>  // E: uint16_t or uint32_t, the element's bits
void write_tokens(const at::Tensor& key, const at::Tensor& value, const at::Tensor& bias, at::Tensor& cache,
                  const int64_t* slots, const Geometry& geo) {
  const int64_t T = key.size(0), KV = key.size(1), d = geo.d, bs = geo.bs, C = geo.c;
  const E* k = reinterpret_cast<const E*>(key.data_ptr());
  const E* v = reinterpret_cast<const E*>(value.data_ptr());
  const float* bi = bias.data_ptr<float>();
  char* base = reinterpret_cast<char*>(cache.data_ptr());
  const int64_t ks0 = key.stride(0), ks1 = key.stride(1), vs0 = value.stride(0), vs1 = value.stride(1);
  const int64_t bs0 = bias.stride(0), bs1 = bias.stride(1), bs2 = bias.stride(2);
  const int64_t cs0 = cache.stride(0) * sizeof(E), cs1 = cache.stride(1) * sizeof(E);
  at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t slot = slots[t];
      if (slot < 0) continue;
      const int off = int(slot % bs);
      for (int64_t g = 0; g < KV; ++g) {
        char* page = base + (slot / bs) * cs0 + g * cs1;
        E* dst = reinterpret_cast<E*>(page);
        const E* ks = k + t * ks0 + g * ks1;
        const E* vs = v + t * vs0 + g * vs1;
        for (int c = 0; c < d; ++c) dst[geo.k_off(off, c)] = ks[c];
        for (int c = 0; c < d; ++c) dst[geo.v_off(off, c)] = vs[c];
        char* bdst = page + geo.bias_byte_off();
        for (int64_t c = 0; c < C; ++c)
          std::memcpy(bdst + (c * bs + off) * sizeof(float), bi + t * bs0 + g * bs1 + c * bs2, sizeof(float));
      }
    }
  });
}

void cache_write(const at::Tensor& key, const at::Tensor& value, const at::Tensor& bias, at::Tensor& cache,
                 const at::Tensor& slot_mapping) {
  TORCH_CHECK(key.dim() == 3 && value.sizes() == key.sizes(), "key/value must be [T, KV, d] of one shape");
  TORCH_CHECK(key.stride(2) == 1 && value.stride(2) == 1, "key/value: the last dim must be contiguous");
  TORCH_CHECK(key.scalar_type() == cache.scalar_type() && value.scalar_type() == cache.scalar_type(),
              "key/value dtype must be the cache dtype");
  TORCH_CHECK(bias.dim() == 3 && bias.size(0) == key.size(0) && bias.size(1) == key.size(1) &&
                  bias.scalar_type() == at::kFloat,
              "bias must be fp32 [T, KV, C]");
  TORCH_CHECK(slot_mapping.dim() == 1 && slot_mapping.size(0) == key.size(0) &&
                  slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous(),
              "slot_mapping must be a contiguous int64 [T]");
  TORCH_CHECK(cache.dim() == 4 && cache.size(1) == key.size(1), "cache must be [num_blocks, KV, BS, cell]");
  const int64_t e = cache.element_size(), d = key.size(2), C = bias.size(2), bs = cache.size(2);
  TORCH_CHECK(d % 2 == 0 && bs % 2 == 0, "head_dim and block size must be even");
  TORCH_CHECK(cell_fits(cache.size(3) * e, d, e, C), "cache cell size does not match head_dim ", d, " and ", C,
              " bias channels");
  TORCH_CHECK(cache.stride(3) == 1 && cache.stride(2) == cache.size(3), "each cache page must be contiguous");
  Dt dt = cache.scalar_type() == at::kFloat ? Dt::f32 : (cache.scalar_type() == at::kBFloat16 ? Dt::bf16 : Dt::f16);
  TORCH_CHECK(e == 4 || e == 2, "cache dtype must be fp32, bf16 or fp16");
  Geometry geo{dt, int(d), int(bs), int(C)};
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  if (e == 4)
    write_tokens<uint32_t>(key, value, bias, cache, slots, geo);
  else
    write_tokens<uint16_t>(key, value, bias, cache, slots, geo);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(vllm_doge, m) {
  m.def("cache_write(Tensor key, Tensor value, Tensor bias, Tensor(a!) cache, Tensor slot_mapping) -> ()");
}

TORCH_LIBRARY_IMPL(vllm_doge, CPU, m) { m.impl("cache_write", &cache_write); }

}  // namespace vllm_doge
