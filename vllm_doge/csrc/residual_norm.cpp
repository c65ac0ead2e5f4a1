// residual_rms_norm: Doge's scaled residual and the RMSNorm after it, one pass over each row:
//     x' = s ⊙ x + y          h = RMSNorm(x') ⊙ w
// with the roundings of the torch expression it replaces in the model's dtype: s ⊙ x and the sum are
// each rounded (as two bf16 ops), the norm runs in fp32 and is rounded before and after the weight (as
// vLLM's RMSNorm). A row's result depends on that row alone, so its bits are the same in any batch.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <type_traits>

#include "common.h"
#if defined(__x86_64__)
#include "vec_avx512.h"
#endif

namespace vllm_doge {
namespace {

template <typename E>
void rows_portable(const E* x, const E* y, const E* s, const E* w, E* xo, E* ho, int64_t n, float eps) {
  float lane[16] = {};
  for (int64_t i = 0; i < n; ++i) {
    const E v = E(float(E(float(s[i]) * float(x[i]))) + float(y[i]));
    xo[i] = v;
    lane[i % 16] += float(v) * float(v);
  }
  float sum = 0.f;
  for (int l = 0; l < 16; ++l) sum += lane[l];
  const float inv = 1.f / std::sqrt(sum / float(n) + eps);
  for (int64_t i = 0; i < n; ++i) ho[i] = E(float(E(float(xo[i]) * inv)) * float(w[i]));
}

#if defined(__x86_64__)
#define DOGE_NORM_ISA __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c")))

// Round fp32 lanes to E (nearest even) and back; bits16: the rounded lanes' 16-bit patterns.
template <typename E>
DOGE_NORM_ISA inline __m512 round_ps(__m512 v, __m256i* bits16) {
  if constexpr (std::is_same_v<E, float>) {
    return v;
  } else if constexpr (std::is_same_v<E, at::Half>) {
    const __m256i h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    if (bits16) *bits16 = h;
    return _mm512_cvtph_ps(h);
  } else {  // vcvtneps2bf16: nearest even, as c10::BFloat16 (but denormals flush to 0)
    const __m256i h = (__m256i)_mm512_cvtneps_pbh(v);
    if (bits16) *bits16 = h;
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
}

template <typename E>
DOGE_NORM_ISA inline void store_ps(E* dst, __m512 rounded, __m256i bits16, int m) {
  const __mmask16 live = m >= 16 ? __mmask16(0xffff) : __mmask16((1u << m) - 1);
  if constexpr (std::is_same_v<E, float>)
    _mm512_mask_storeu_ps(dst, live, rounded);
  else
    _mm256_mask_storeu_epi16(dst, live, bits16);
}

template <typename E>
DOGE_NORM_ISA void rows_avx512(const E* x, const E* y, const E* s, const E* w, E* xo, E* ho, int64_t n, float eps) {
  constexpr bool half = std::is_same_v<E, at::Half>;
  __m512 acc = _mm512_setzero_ps();
  __m256i bits;
  for (int64_t i = 0; i < n; i += 16) {
    const int m = int(std::min<int64_t>(16, n - i));
    const __m512 p = round_ps<E>(_mm512_mul_ps(load_ps(s + i, m, half), load_ps(x + i, m, half)), nullptr);
    const __m512 v = round_ps<E>(_mm512_add_ps(p, load_ps(y + i, m, half)), &bits);
    store_ps(xo + i, v, bits, m);
    acc = _mm512_fmadd_ps(v, v, acc);  // lanes past m are 0
  }
  const float inv = 1.f / std::sqrt(_mm512_reduce_add_ps(acc) / float(n) + eps);
  const __m512 vinv = _mm512_set1_ps(inv);
  for (int64_t i = 0; i < n; i += 16) {
    const int m = int(std::min<int64_t>(16, n - i));
    const __m512 normed = round_ps<E>(_mm512_mul_ps(load_ps(xo + i, m, half), vinv), nullptr);
    const __m512 out = round_ps<E>(_mm512_mul_ps(normed, load_ps(w + i, m, half)), &bits);
    store_ps(ho + i, out, bits, m);
  }
}
#endif

template <typename E>
void run(const at::Tensor& x, const at::Tensor& y, const at::Tensor& scale, const at::Tensor& weight, at::Tensor& xo,
         at::Tensor& ho, float eps) {
  const int64_t T = x.size(0), n = x.size(1);
#if defined(__x86_64__)
  const bool vec = configured_isa() == Isa::avx512;
#endif
  const E* xp = x.data_ptr<E>();
  const E* yp = y.data_ptr<E>();
  const E* sp = scale.data_ptr<E>();
  const E* wp = weight.data_ptr<E>();
  E* xop = xo.data_ptr<E>();
  E* hop = ho.data_ptr<E>();
  const int64_t xs = x.stride(0), ys = y.stride(0);
  at::parallel_for(0, T, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
#if defined(__x86_64__)
      if (vec) {
        rows_avx512(xp + t * xs, yp + t * ys, sp, wp, xop + t * n, hop + t * n, n, eps);
        continue;
      }
#endif
      rows_portable(xp + t * xs, yp + t * ys, sp, wp, xop + t * n, hop + t * n, n, eps);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> residual_rms_norm(const at::Tensor& x, const at::Tensor& y, const at::Tensor& scale,
                                                     const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.dim() == 2 && y.sizes() == x.sizes(), "x and y must be [T, hidden] of one shape");
  TORCH_CHECK(x.stride(1) == 1 && y.stride(1) == 1, "x/y rows must be contiguous");
  const int64_t n = x.size(1);
  TORCH_CHECK(scale.dim() == 1 && weight.dim() == 1 && scale.size(0) == n && weight.size(0) == n &&
                  scale.is_contiguous() && weight.is_contiguous(),
              "scale and weight must be contiguous [", n, "]");
  const auto dt = x.scalar_type();
  TORCH_CHECK(y.scalar_type() == dt && scale.scalar_type() == dt && weight.scalar_type() == dt,
              "x, y, scale and weight must have one dtype");
  at::Tensor xo = at::empty_like(x, at::MemoryFormat::Contiguous), ho = at::empty_like(xo);
  if (x.size(0) == 0) return {xo, ho};
  switch (dt) {
    case at::kFloat: run<float>(x, y, scale, weight, xo, ho, float(eps)); break;
    case at::kBFloat16: run<at::BFloat16>(x, y, scale, weight, xo, ho, float(eps)); break;
    case at::kHalf: run<at::Half>(x, y, scale, weight, xo, ho, float(eps)); break;
    default: TORCH_CHECK(false, "residual_rms_norm: dtype must be fp32, bf16 or fp16, not ", dt);
  }
  return {xo, ho};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(vllm_doge, m) {
  m.def("residual_rms_norm(Tensor x, Tensor y, Tensor scale, Tensor weight, float eps) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(vllm_doge, CPU, m) { m.impl("residual_rms_norm", &residual_rms_norm); }

}  // namespace vllm_doge
