// cache_write: scatter this step's K, V and bias into the page layout of common.h. K and V are a pure
// copy of element bits (no conversion), so any dtype of the right size works.
//
// cache_write_masked computes each token's bias on the way (Doge's dynamic mask, one value per mask row
// r = kv head * C + channel):
//     b_r = exp(A_r * softplus(w_r . x + dt_bias_r))
// The dot product runs over one token's row in a fixed order and softplus/exp in scalar fp64, so a token's
// bias has the same bits in any batch (the keep window's tie rule needs that).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "common.h"
#if defined(__x86_64__)
#include "vec_avx512.h"
#endif

namespace vllm_doge {
namespace {

// One token's biases, [KV][C] fp32.
using BiasRow = std::vector<float>;

template <typename E, typename Bias>  // E: uint16_t or uint32_t, the element's bits
void write_tokens(const at::Tensor& key, const at::Tensor& value, at::Tensor& cache, const int64_t* slots,
                  const Geometry& geo, const Bias& bias_of) {
  const int64_t T = key.size(0), KV = key.size(1), d = geo.d, bs = geo.bs, C = geo.c;
  const E* k = reinterpret_cast<const E*>(key.data_ptr());
  const E* v = reinterpret_cast<const E*>(value.data_ptr());
  char* base = reinterpret_cast<char*>(cache.data_ptr());
  const int64_t ks0 = key.stride(0), ks1 = key.stride(1), vs0 = value.stride(0), vs1 = value.stride(1);
  const int64_t cs0 = cache.stride(0) * sizeof(E), cs1 = cache.stride(1) * sizeof(E);
  at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
    BiasRow bias(KV * C);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t slot = slots[t];
      if (slot < 0) continue;
      bias_of(t, bias.data());
      const int off = int(slot % bs);
      for (int64_t g = 0; g < KV; ++g) {
        char* page = base + (slot / bs) * cs0 + g * cs1;
        E* dst = reinterpret_cast<E*>(page);
        const E* ks = k + t * ks0 + g * ks1;
        const E* vs = v + t * vs0 + g * vs1;
        if constexpr (sizeof(E) == 2) {  // K channel pairs are one 32-bit word of the VNNI layout
          uint32_t* k32 = reinterpret_cast<uint32_t*>(dst);
          for (int c = 0; c < d; c += 2) {
            uint32_t pair;
            std::memcpy(&pair, ks + c, sizeof(pair));
            k32[int64_t(c >> 1) * bs + off] = pair;
          }
        } else {
          for (int c = 0; c < d; ++c) dst[geo.k_off(off, c)] = ks[c];
        }
        for (int c = 0; c < d; ++c) dst[geo.v_off(off, c)] = vs[c];
        float* bdst = reinterpret_cast<float*>(page + geo.bias_byte_off());
        for (int64_t c = 0; c < C; ++c) bdst[c * bs + off] = bias[g * C + c];
      }
    }
  });
}

Geometry check_write(const at::Tensor& key, const at::Tensor& value, int64_t C, const at::Tensor& cache,
                     const at::Tensor& slot_mapping) {
  TORCH_CHECK(key.dim() == 3 && value.sizes() == key.sizes(), "key/value must be [T, KV, d] of one shape");
  TORCH_CHECK(key.stride(2) == 1 && value.stride(2) == 1, "key/value: the last dim must be contiguous");
  TORCH_CHECK(key.scalar_type() == cache.scalar_type() && value.scalar_type() == cache.scalar_type(),
              "key/value dtype must be the cache dtype");
  TORCH_CHECK(slot_mapping.dim() == 1 && slot_mapping.size(0) == key.size(0) &&
                  slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous(),
              "slot_mapping must be a contiguous int64 [T]");
  TORCH_CHECK(cache.dim() == 4 && cache.size(1) == key.size(1), "cache must be [num_blocks, KV, BS, cell]");
  const int64_t e = cache.element_size(), d = key.size(2), bs = cache.size(2);
  TORCH_CHECK(e == 4 || e == 2, "cache dtype must be fp32, bf16 or fp16");
  TORCH_CHECK(d % 2 == 0 && bs % 2 == 0, "head_dim and block size must be even");
  TORCH_CHECK(C > 0 && cell_fits(cache.size(3) * e, d, e, C), "cache cell size does not match head_dim ", d,
              " and ", C, " bias channels");
  TORCH_CHECK(cache.stride(3) == 1 && cache.stride(2) == cache.size(3), "each cache page must be contiguous");
  Dt dt = cache.scalar_type() == at::kFloat ? Dt::f32 : (cache.scalar_type() == at::kBFloat16 ? Dt::bf16 : Dt::f16);
  return Geometry{dt, int(d), int(bs), int(C)};
}

template <typename Bias>
void write(const at::Tensor& key, const at::Tensor& value, at::Tensor& cache, const at::Tensor& slot_mapping,
           const Geometry& geo, const Bias& bias_of) {
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  if (cache.element_size() == 4)
    write_tokens<uint32_t>(key, value, cache, slots, geo, bias_of);
  else
    write_tokens<uint16_t>(key, value, cache, slots, geo, bias_of);
}

void cache_write(const at::Tensor& key, const at::Tensor& value, const at::Tensor& bias, at::Tensor& cache,
                 const at::Tensor& slot_mapping) {
  TORCH_CHECK(bias.dim() == 3 && bias.size(0) == key.size(0) && bias.size(1) == key.size(1) &&
                  bias.scalar_type() == at::kFloat,
              "bias must be fp32 [T, KV, C]");
  const Geometry geo = check_write(key, value, bias.size(2), cache, slot_mapping);
  const float* bi = bias.data_ptr<float>();
  const int64_t KV = key.size(1), C = geo.c, s0 = bias.stride(0), s1 = bias.stride(1), s2 = bias.stride(2);
  write(key, value, cache, slot_mapping, geo, [&](int64_t t, float* out) {
    for (int64_t g = 0; g < KV; ++g)
      for (int64_t c = 0; c < C; ++c) out[g * C + c] = bi[t * s0 + g * s1 + c * s2];
  });
}

// w . x over n elements of one dtype, fp32 products and sums, in an order fixed by n alone.
template <typename E>
float dot_portable(const E* x, const E* w, int64_t n) {
  float lane[16] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int l = 0; l < 16; ++l) lane[l] += float(x[i + l]) * float(w[i + l]);
  for (int l = 0; i + l < n; ++l) lane[l] += float(x[i + l]) * float(w[i + l]);
  float sum = 0.f;
  for (int l = 0; l < 16; ++l) sum += lane[l];
  return sum;
}

#if defined(__x86_64__)
template <typename E>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c"))) float dot_avx512(const E* x, const E* w,
                                                                                       int64_t n, bool half) {
  __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  int64_t i = 0;
  for (; i + 64 <= n; i += 64)
    for (int u = 0; u < 4; ++u)
      acc[u] = _mm512_fmadd_ps(load_ps(x + i + 16 * u, 16, half), load_ps(w + i + 16 * u, 16, half), acc[u]);
  for (int u = 0; i < n; i += 16, ++u) {
    const int m = int(std::min<int64_t>(16, n - i));
    acc[u] = _mm512_fmadd_ps(load_ps(x + i, m, half), load_ps(w + i, m, half), acc[u]);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
}
#endif

float as_float(const at::Tensor& t, int64_t i) {
  switch (t.scalar_type()) {
    case at::kFloat: return t.data_ptr<float>()[i];
    case at::kBFloat16: return float(t.data_ptr<at::BFloat16>()[i]);
    default: return float(t.data_ptr<at::Half>()[i]);
  }
}

template <typename E>
void write_masked(const at::Tensor& key, const at::Tensor& value, const at::Tensor& dt_input,
                  const at::Tensor& dt_weight, const at::Tensor& dt_bias, const at::Tensor& A, at::Tensor& cache,
                  const at::Tensor& slot_mapping, const Geometry& geo) {
  const int64_t R = dt_weight.size(0), n = dt_weight.size(1), xs = dt_input.stride(0), ws = dt_weight.stride(0);
  const E* x = dt_input.data_ptr<E>();
  const E* w = dt_weight.data_ptr<E>();
  std::vector<float> shift(R);
  std::vector<double> a(R);
  for (int64_t r = 0; r < R; ++r) shift[r] = as_float(dt_bias, r), a[r] = as_float(A, r);
#if defined(__x86_64__)
  const bool vec = configured_isa() == Isa::avx512;
#else
  const bool vec = false;
#endif
  const bool half = std::is_same_v<E, at::Half>;
  write(key, value, cache, slot_mapping, geo, [&](int64_t t, float* out) {
    for (int64_t r = 0; r < R; ++r) {
#if defined(__x86_64__)
      const float dot = vec ? dot_avx512(x + t * xs, w + r * ws, n, half) : dot_portable(x + t * xs, w + r * ws, n);
#else
      const float dot = dot_portable(x + t * xs, w + r * ws, n);
#endif
      const double dt = double(dot + shift[r]);
      const double softplus = dt > 20.0 ? dt : std::log1p(std::exp(dt));  // torch's threshold
      out[r] = float(std::exp(a[r] * softplus));
    }
  });
}

void cache_write_masked(const at::Tensor& key, const at::Tensor& value, const at::Tensor& dt_input,
                        const at::Tensor& dt_weight, const at::Tensor& dt_bias, const at::Tensor& A, at::Tensor& cache,
                        const at::Tensor& slot_mapping) {
  const int64_t KV = key.size(1), R = dt_weight.size(0);
  TORCH_CHECK(dt_weight.dim() == 2 && R % KV == 0, "dt_weight must be [KV * C, inputs], KV = ", KV);
  TORCH_CHECK(dt_input.dim() == 2 && dt_input.size(0) == key.size(0) && dt_input.size(1) == dt_weight.size(1),
              "dt_input must be [T, ", dt_weight.size(1), "] for ", key.size(0), " tokens");
  TORCH_CHECK(dt_input.stride(1) == 1 && dt_weight.stride(1) == 1, "dt_input/dt_weight rows must be contiguous");
  TORCH_CHECK(dt_input.scalar_type() == dt_weight.scalar_type(), "dt_input and dt_weight must have one dtype");
  TORCH_CHECK(dt_bias.dim() == 1 && A.dim() == 1 && dt_bias.size(0) == R && A.size(0) == R &&
                  dt_bias.is_contiguous() && A.is_contiguous(),
              "dt_bias and A must be contiguous [", R, "]");
  const Geometry geo = check_write(key, value, R / KV, cache, slot_mapping);
  for (const at::Tensor* t : {&dt_input, &dt_bias, &A}) {
    const auto s = t->scalar_type();
    TORCH_CHECK(s == at::kFloat || s == at::kBFloat16 || s == at::kHalf, "dt tensors must be fp32, bf16 or fp16");
  }
  switch (dt_input.scalar_type()) {
    case at::kFloat: return write_masked<float>(key, value, dt_input, dt_weight, dt_bias, A, cache, slot_mapping, geo);
    case at::kBFloat16:
      return write_masked<at::BFloat16>(key, value, dt_input, dt_weight, dt_bias, A, cache, slot_mapping, geo);
    default: return write_masked<at::Half>(key, value, dt_input, dt_weight, dt_bias, A, cache, slot_mapping, geo);
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(vllm_doge, m) {
  m.def("cache_write(Tensor key, Tensor value, Tensor bias, Tensor(a!) cache, Tensor slot_mapping) -> ()");
  m.def(
      "cache_write_masked(Tensor key, Tensor value, Tensor dt_input, Tensor dt_weight, Tensor dt_bias, Tensor A, "
      "Tensor(a!) cache, Tensor slot_mapping) -> ()");
}

TORCH_LIBRARY_IMPL(vllm_doge, CPU, m) {
  m.impl("cache_write", &cache_write);
  m.impl("cache_write_masked", &cache_write_masked);
}

}  // namespace vllm_doge
