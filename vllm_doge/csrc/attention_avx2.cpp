// AVX2 attention (avx2 + fma + f16c), for x86-64 CPUs without AVX-512 (e.g. AMD Zen 2/3, Intel client cores):
// the loop path of attention_avx512.cpp on 8 fp32 lanes, chosen at run time. Only the functions marked
// DOGE_AVX2 use these instructions, so the library loads on any x86-64.
//  - bf16 / fp16: each 32-bit pair of the page (two channels of K, two tokens of V) is widened to two fp32
//    vectors in registers (bf16: a shift and a mask; fp16: vcvtph2ps after separating the halves), then FMA.
//    Products and sums in fp32; P stays fp32 (no bf16 rounding of the probabilities on this path).
//  - fp32: FMA on the transposed K and row-major V.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "common.h"

#define DOGE_AVX2 __attribute__((target("avx2,fma,f16c")))
#define DOGE_INLINE inline __attribute__((always_inline))

namespace vllm_doge {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

// exp(x) for x <= 0, 0 where x is -inf: the reduction and polynomial of exp_ps (vec_avx512.h), with 2^n
// built in the exponent field. After the clamp at -87, n >= -126 and the result stays a normal float.
DOGE_AVX2 DOGE_INLINE __m256 exp8(__m256 x) {
  const __m256 live = _mm256_cmp_ps(x, _mm256_set1_ps(-kInf), _CMP_NEQ_OQ);
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606820309417232e-06f), r);
  __m256 y = _mm256_set1_ps(1.f / 5040);
  for (const float c : {1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f})
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(c));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(live, _mm256_mul_ps(y, _mm256_castsi256_ps(e)));
}

DOGE_AVX2 DOGE_INLINE float hmax8(__m256 x) {
  __m128 v = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  v = _mm_max_ps(v, _mm_movehl_ps(v, v));
  return _mm_cvtss_f32(_mm_max_ss(v, _mm_movehdup_ps(v)));
}

DOGE_AVX2 DOGE_INLINE float hsum8(__m256 x) {
  __m128 v = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  v = _mm_add_ps(v, _mm_movehl_ps(v, v));
  return _mm_cvtss_f32(_mm_add_ss(v, _mm_movehdup_ps(v)));
}

// 8 pairs of 16-bit values at src as fp32: lo the first of each pair, hi the second.
template <Dt DT>
DOGE_AVX2 DOGE_INLINE void widen_pairs(const uint16_t* src, __m256& lo, __m256& hi) {
  const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
  if constexpr (DT == Dt::bf16) {
    lo = _mm256_castsi256_ps(_mm256_slli_epi32(x, 16));
    hi = _mm256_castsi256_ps(_mm256_and_si256(x, _mm256_set1_epi32(int(0xFFFF0000u))));
  } else {
    // per 128-bit lane: first halves to its low 8 bytes, second halves to its high 8; then gather the lanes'
    // first halves in the low 128 bits.
    const __m256i split = _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15,
                                           0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15);
    const __m256i y = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(x, split), _MM_SHUFFLE(3, 1, 2, 0));
    lo = _mm256_cvtph_ps(_mm256_castsi256_si128(y));
    hi = _mm256_cvtph_ps(_mm256_extracti128_si256(y, 1));
  }
}

// S[m0 + r][t0 .. t0 + 8 NT) = q_r . k_t for MR rows, channel (pair) loop outermost: each step reads NT * 32
// contiguous bytes of K.
template <Dt DT, int MR, int NT>
DOGE_AVX2 void qk_tile(const char* page, int bs, int d, int t0, const float* q, float* s, int ld, int m0) {
  __m256 acc[MR][NT];
  for (int r = 0; r < MR; ++r)
    for (int t = 0; t < NT; ++t) acc[r][t] = _mm256_setzero_ps();
  q += int64_t(m0) * d;
  if constexpr (DT == Dt::f32) {
    const float* k = reinterpret_cast<const float*>(page) + t0;
    for (int c = 0; c < d; ++c)
      for (int t = 0; t < NT; ++t) {
        const __m256 kv = _mm256_loadu_ps(k + int64_t(c) * bs + 8 * t);
        for (int r = 0; r < MR; ++r) acc[r][t] = _mm256_fmadd_ps(kv, _mm256_set1_ps(q[r * d + c]), acc[r][t]);
      }
  } else {
    const uint16_t* k = reinterpret_cast<const uint16_t*>(page) + t0 * 2;
    for (int c = 0; c < d / 2; ++c)
      for (int t = 0; t < NT; ++t) {
        __m256 ke, ko;
        widen_pairs<DT>(k + (int64_t(c) * bs + 8 * t) * 2, ke, ko);
        for (int r = 0; r < MR; ++r) {
          acc[r][t] = _mm256_fmadd_ps(ke, _mm256_set1_ps(q[r * d + 2 * c]), acc[r][t]);
          acc[r][t] = _mm256_fmadd_ps(ko, _mm256_set1_ps(q[r * d + 2 * c + 1]), acc[r][t]);
        }
      }
  }
  for (int r = 0; r < MR; ++r)
    for (int t = 0; t < NT; ++t) _mm256_storeu_ps(s + int64_t(m0 + r) * ld + t0 + 8 * t, acc[r][t]);
}

// 8-key chunks [0, nch) in groups of up to NT: at most 8 accumulators, enough to hide the FMA latency.
template <Dt DT, int MR>
DOGE_AVX2 void qk_rows(const char* page, int bs, int d, int nch, const float* q, float* s, int ld, int m) {
  constexpr int NT = MR == 1 ? 8 : MR == 2 ? 4 : 2;
  int t = 0;
  for (; t + NT <= nch; t += NT) qk_tile<DT, MR, NT>(page, bs, d, 8 * t, q, s, ld, m);
  if constexpr (NT > 4)
    for (; t + 4 <= nch; t += 4) qk_tile<DT, MR, 4>(page, bs, d, 8 * t, q, s, ld, m);
  if constexpr (NT > 2)
    for (; t + 2 <= nch; t += 2) qk_tile<DT, MR, 2>(page, bs, d, 8 * t, q, s, ld, m);
  for (; t < nch; ++t) qk_tile<DT, MR, 1>(page, bs, d, 8 * t, q, s, ld, m);
}

template <Dt DT>
DOGE_AVX2 void qk_group(const char* page, int bs, int d, int nch, const float* q, float* s, int ld, int rows, int m) {
  switch (std::min(rows, 4)) {
    case 3: return qk_rows<DT, 3>(page, bs, d, nch, q, s, ld, m);
    case 2: return qk_rows<DT, 2>(page, bs, d, nch, q, s, ld, m);
    case 1: return qk_rows<DT, 1>(page, bs, d, nch, q, s, ld, m);
    default: return qk_rows<DT, 4>(page, bs, d, nch, q, s, ld, m);
  }
}

// Rows in groups of 4; with more than one group, strips of 32 keys outermost so each strip of K stays in L1
// for every row group.
template <Dt DT>
DOGE_AVX2 void qk_block(const char* page, int bs, int d, int n, const float* q, float* s, int ld, int M) {
  const int nch = (n + 7) / 8;
  if (M <= 4) return qk_group<DT>(page, bs, d, nch, q, s, ld, M, 0);
  for (int c0 = 0; c0 < nch; c0 += 4)  // key t of a page lies 4 t bytes into its K row in every layout
    for (int m = 0; m < M; m += 4)
      qk_group<DT>(page + 4 * 8 * c0, bs, d, std::min(4, nch - c0), q, s + 8 * c0, ld, M - m, m);
}

// O[m0 + r][c0 .. c0 + 8 CB) = alpha_r O + sum_{t < n} p_rt v_t. Tokens past n are never read: their slots
// may hold anything (0 * NaN is not 0).
template <Dt DT, int MR, int CB>
DOGE_AVX2 void pv_tile(const char* page, int bs, int d, int n, const Scratch& sc, int m0, int c0) {
  __m256 acc[MR][CB];
  for (int r = 0; r < MR; ++r)
    for (int b = 0; b < CB; ++b)
      acc[r][b] = _mm256_mul_ps(_mm256_loadu_ps(sc.o + (m0 + r) * d + c0 + 8 * b), _mm256_set1_ps(sc.alpha[m0 + r]));
  const float* p = sc.p + int64_t(m0) * sc.ld;
  if constexpr (DT == Dt::f32) {
    const float* v = reinterpret_cast<const float*>(page) + int64_t(bs) * d + c0;
    for (int t = 0; t < n; ++t)
      for (int b = 0; b < CB; ++b) {
        const __m256 vv = _mm256_loadu_ps(v + int64_t(t) * d + 8 * b);
        for (int r = 0; r < MR; ++r) acc[r][b] = _mm256_fmadd_ps(vv, _mm256_set1_ps(p[r * sc.ld + t]), acc[r][b]);
      }
  } else {
    const uint16_t* v = reinterpret_cast<const uint16_t*>(page) + int64_t(bs) * d + c0 * 2;
    for (int tp = 0; tp < (n + 1) / 2; ++tp) {
      const bool half = 2 * tp + 1 == n;
      for (int b = 0; b < CB; ++b) {
        __m256 ve, vo;
        widen_pairs<DT>(v + (int64_t(tp) * d + 8 * b) * 2, ve, vo);
        for (int r = 0; r < MR; ++r) {
          acc[r][b] = _mm256_fmadd_ps(ve, _mm256_set1_ps(p[r * sc.ld + 2 * tp]), acc[r][b]);
          if (!half) acc[r][b] = _mm256_fmadd_ps(vo, _mm256_set1_ps(p[r * sc.ld + 2 * tp + 1]), acc[r][b]);
        }
      }
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int b = 0; b < CB; ++b) _mm256_storeu_ps(sc.o + (m0 + r) * d + c0 + 8 * b, acc[r][b]);
}

// Channels [c0, c1) of MR rows in tiles of up to CB * 8 channels.
template <Dt DT, int MR>
DOGE_AVX2 void pv_rows(const char* page, int bs, int d, int n, const Scratch& sc, int m0, int c0, int c1) {
  constexpr int CB = MR == 1 ? 8 : MR == 2 ? 4 : 2;
  int c = c0;
  for (; c + 8 * CB <= c1; c += 8 * CB) pv_tile<DT, MR, CB>(page, bs, d, n, sc, m0, c);
  if constexpr (CB > 4)
    for (; c + 32 <= c1; c += 32) pv_tile<DT, MR, 4>(page, bs, d, n, sc, m0, c);
  if constexpr (CB > 2)
    for (; c + 16 <= c1; c += 16) pv_tile<DT, MR, 2>(page, bs, d, n, sc, m0, c);
  for (; c < c1; c += 8) pv_tile<DT, MR, 1>(page, bs, d, n, sc, m0, c);
}

template <Dt DT>
DOGE_AVX2 void pv_group(const char* page, int bs, int d, int n, const Scratch& sc, int rows, int m, int c0, int c1) {
  switch (std::min(rows, 4)) {
    case 3: return pv_rows<DT, 3>(page, bs, d, n, sc, m, c0, c1);
    case 2: return pv_rows<DT, 2>(page, bs, d, n, sc, m, c0, c1);
    case 1: return pv_rows<DT, 1>(page, bs, d, n, sc, m, c0, c1);
    default: return pv_rows<DT, 4>(page, bs, d, n, sc, m, c0, c1);
  }
}

// As qk_block: with more than one row group, strips of 16 channels of V outermost, kept in L1.
template <Dt DT>
DOGE_AVX2 void pv_block(const char* page, int bs, int d, int n, const Scratch& sc, int M) {
  if (M <= 4) return pv_group<DT>(page, bs, d, n, sc, M, 0, 0, d);
  for (int c0 = 0; c0 < d; c0 += 16)
    for (int m = 0; m < M; m += 4) pv_group<DT>(page, bs, d, n, sc, M - m, m, c0, std::min(d, c0 + 16));
}

// x = scale s + bias for the block's chunks [0, nch) of each row, -inf where the key is not visible from the
// row (past its position, before its window, or t >= n); the rows' maxima folded into sc.cmax.
DOGE_AVX2 void score_block(const Params& p, const Item& it, const Scratch& sc, const float* bias, int j0, int n,
                           int M) {
  const int bs = p.geo.bs, G = p.group, nch = (n + 7) / 8, ld = sc.ld;
  const int pos0 = p.ctx(it.b) + it.row0;
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256 ninf = _mm256_set1_ps(-kInf), scale = _mm256_set1_ps(p.scale);
  for (int m = 0; m < M; ++m) {
    const int pos = pos0 + m / G;
    const int lo = p.window > 0 ? pos - p.window + 1 : 0;
    const int hi = std::min(pos, j0 + n - 1);  // last visible key
    const float* b = bias + p.channel(m % G) * bs;
    float* row = sc.s + int64_t(m) * ld;
    __m256 vmax = ninf;
    const __m256i vlo = _mm256_set1_epi32(lo - 1), vhi = _mm256_set1_epi32(hi + 1);
    for (int c = 0; c < nch; ++c) {
      __m256 x = _mm256_fmadd_ps(_mm256_loadu_ps(row + 8 * c), scale, _mm256_loadu_ps(b + 8 * c));
      if (j0 + 8 * c < lo || j0 + 8 * c + 7 > hi) {
        const __m256i j = _mm256_add_epi32(_mm256_set1_epi32(j0 + 8 * c), iota);
        const __m256i ok = _mm256_and_si256(_mm256_cmpgt_epi32(j, vlo), _mm256_cmpgt_epi32(vhi, j));
        x = _mm256_blendv_ps(ninf, x, _mm256_castsi256_ps(ok));
      }
      _mm256_storeu_ps(row + 8 * c, x);
      vmax = _mm256_max_ps(vmax, x);
    }
    sc.cmax[m] = hmax8(vmax);
  }
}

// P = exp(x - m_new) over the scored columns (masked keys give exactly 0), alpha = exp(m_old - m_new), running
// max and sum updated. A row with no visible key so far keeps max -inf, P 0 and alpha 1.
DOGE_AVX2 void softmax_rows(const Scratch& sc, int M, int width) {
  for (int m = 0; m < M; ++m) {
    const float m_old = sc.mx[m], m_new = std::max(m_old, sc.cmax[m]);
    const float* x = sc.s + int64_t(m) * sc.ld;
    float* pr = sc.p + int64_t(m) * sc.ld;
    if (m_new == -kInf) {
      std::memset(pr, 0, sizeof(float) * width);
      sc.alpha[m] = 1.f;
      continue;
    }
    const __m256 mn = _mm256_set1_ps(m_new);
    __m256 sum = _mm256_setzero_ps();
    for (int c = 0; c < width; c += 8) {
      const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + c), mn));
      sum = _mm256_add_ps(sum, e);
      _mm256_storeu_ps(pr + c, e);
    }
    const float alpha = std::exp(m_old - m_new);
    sc.alpha[m] = alpha;
    sc.sum[m] = sc.sum[m] * alpha + hsum8(sum);
    sc.mx[m] = m_new;
  }
}

// fp32 -> bf16, rounding to nearest even; NaN stays a (quiet) NaN.
DOGE_AVX2 DOGE_INLINE __m128i to_bf16(__m256 x) {
  const __m256i u = _mm256_castps_si256(x);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256 nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(nan));
  // 32-bit lanes -> 16-bit: packus per 128-bit lane, then the two lanes' low halves together.
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), _MM_SHUFFLE(3, 1, 2, 0));
  return _mm256_castsi256_si128(packed);
}

template <Dt DT>
DOGE_AVX2 void load_q(const Params& p, const Item& it, const Scratch& sc) {
  const int d = p.geo.d, G = p.group, e = elt_size(DT);
  for (int m = 0; m < it.nrows * G; ++m) {
    const char* q = p.q + ((p.qsl[it.b] + it.row0 + m / G) * p.q_s0 + (it.g * G + m % G) * p.q_s1) * e;
    float* dst = sc.q + int64_t(m) * d;
    for (int c = 0; c < d; c += 8) {
      __m256 x;
      if constexpr (DT == Dt::f32) {
        x = _mm256_loadu_ps(reinterpret_cast<const float*>(q) + c);
      } else {
        const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q) + c / 8);
        x = DT == Dt::f16 ? _mm256_cvtph_ps(h) : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
      }
      _mm256_storeu_ps(dst + c, x);
    }
  }
}

template <Dt DT>
DOGE_AVX2 void finish(const Params& p, const Item& it, const Scratch& sc, const Partials& parts) {
  const int d = p.geo.d, G = p.group, M = it.nrows * G;
  if (it.part >= 0) return store_partial(parts, it.part, sc, M, d);
  const int e = elt_size(DT);
  for (int m = 0; m < M; ++m) {
    const __m256 inv = _mm256_set1_ps(1.f / sc.sum[m]);
    char* dst = p.out + ((p.qsl[it.b] + it.row0 + m / G) * p.o_s0 + (it.g * G + m % G) * p.o_s1) * e;
    for (int c = 0; c < d; c += 8) {
      const __m256 x = _mm256_mul_ps(_mm256_loadu_ps(sc.o + m * d + c), inv);
      if constexpr (DT == Dt::f32)
        _mm256_storeu_ps(reinterpret_cast<float*>(dst) + c, x);
      else
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst) + c / 8,
                         DT == Dt::bf16 ? to_bf16(x) : _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
  }
}

template <Dt DT>
DOGE_AVX2 void attend(const Params& p, const Item& it, const Scratch& sc, const Partials& parts) {
  const int d = p.geo.d, bs = p.geo.bs, M = it.nrows * p.group;
  // keys from the item's last row position on are masked for every row: neither scored nor multiplied
  const int vis = p.ctx(it.b) + it.row0 + it.nrows;
  load_q<DT>(p, it, sc);
  std::fill(sc.o, sc.o + M * d, 0.f);
  std::fill(sc.mx, sc.mx + M, -kInf);
  std::fill(sc.sum, sc.sum + M, 0.f);
  for (int blk = it.blk0; blk < it.blk1; ++blk) {
    const char* page = p.page(it.b, blk, it.g);
    const int j0 = blk * bs, n = std::min(bs, vis - j0);
    qk_block<DT>(page, bs, d, n, sc.q, sc.s, sc.ld, M);
    score_block(p, it, sc, reinterpret_cast<const float*>(page + p.geo.bias_byte_off()), j0, n, M);
    softmax_rows(sc, M, 8 * ((n + 7) / 8));
    pv_block<DT>(page, bs, d, n, sc, M);
  }
  finish<DT>(p, it, sc, parts);
}

}  // namespace

bool avx2_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

void attend_avx2(const Params& p, const Item& it, const Scratch& s, const Partials& parts) {
  switch (p.geo.dt) {
    case Dt::f32: return attend<Dt::f32>(p, it, s, parts);
    case Dt::bf16: return attend<Dt::bf16>(p, it, s, parts);
    case Dt::f16: return attend<Dt::f16>(p, it, s, parts);
  }
}

}  // namespace vllm_doge
