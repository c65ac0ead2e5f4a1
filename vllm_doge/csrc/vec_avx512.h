// Vector helpers shared by the AVX-512 kernels (attention_avx512.cpp, keep_window.cpp). Each carries its
// own target attribute, a subset of its callers', so it inlines into them and the library still loads on
// any x86-64.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <limits>

namespace vllm_doge {

// exp(x) for x <= 0 (softmax arguments x - max), 0 where x is -inf (a masked key): x = n ln2 + r,
// n = round(x log2 e), ln2 in two parts, |r| <= ln2/2; the degree-7 Taylor polynomial leaves a truncation
// error < 2^-27, so the result is within a few ulp. x is clamped at -87 (exp(-87) is still a normal
// float): results that underflow into denormals or to 0 cost a microcode assist each (with FTZ off, as
// torch runs), which made causal prefill, half of whose diagonal-block scores are masked, 3x slower.
__attribute__((target("avx512f"), always_inline)) inline __m512 exp_ps(__m512 x) {
  const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-std::numeric_limits<float>::infinity()), _CMP_NEQ_OQ);
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606820309417232e-06f), r);
  __m512 y = _mm512_set1_ps(1.f / 5040);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.f / 720));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.f / 120));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.f / 24));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.f / 6));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(0.5f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.f));
  return _mm512_maskz_scalef_ps(live, y, n);
}

// n <= 16 elements of fp32, bf16 (half false) or fp16 (half true), widened to fp32 lanes; lanes past n are 0.
template <typename E>
__attribute__((target("avx512f,avx512bw,avx512vl,f16c"), always_inline)) inline __m512 load_ps(const E* src, int n,
                                                                                             bool half) {
  const __mmask16 live = n >= 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1);
  if constexpr (sizeof(E) == 4) {
    return _mm512_maskz_loadu_ps(live, src);
  } else {
    const __m256i x = _mm256_maskz_loadu_epi16(live, src);
    if (half) return _mm512_cvtph_ps(x);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(x), 16));
  }
}

}  // namespace vllm_doge
