// AVX-512 attention (avx512f/bw/vl/dq + avx512_bf16), chosen at run time: only the functions marked
// DOGE_AVX512 use these instructions, so the library loads on any x86-64.
//
// Per item and key block: scores S = Q.K^T for 16-key chunks, a masked online-softmax step in fp32,
// then O = alpha*O + P.V. Decode and short queries use the hand-written tiles below; items of >= 16
// stacked rows may instead use oneDNN's brgemm ukernel (AMX tiles where present) for both products.
//  - bf16: Q.K^T with vdpbf16ps on channel pairs (exact products, fp32 sums), one accumulator per
//    (row, 16 keys): no horizontal reductions. P is rounded to bf16 for P.V (as for brgemm).
//  - fp16: pairs widened to fp32 (vcvtph2ps) and FMA; P stays fp32.
//  - fp32: FMA on the transposed K and row-major V.
#include <ATen/Context.h>
#include <ATen/native/CPUBlas.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "common.h"

#define DOGE_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c")))
#define DOGE_INLINE inline __attribute__((always_inline))

namespace vllm_doge {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

// exp(x) = 2^n exp(r), n = round(x log2 e), r = x - n ln2 (ln2 in two parts), |r| <= ln2/2; the degree-7
// Taylor polynomial leaves a truncation error < 2^-27, so the result is within a few ulp.
DOGE_AVX512 DOGE_INLINE __m512 exp_ps(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.f)), _mm512_set1_ps(88.7f));
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
  return _mm512_scalef_ps(y, n);
}

DOGE_AVX512 DOGE_INLINE __m512bh as_bh(__m512i x) { return (__m512bh)x; }

// Widen the two halves of each 32-bit lane (a channel or token pair) of 16 fp16 pairs to fp32.
DOGE_AVX512 DOGE_INLINE void widen_f16_pairs(__m512i x, __m512& lo, __m512& hi) {
  lo = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(x));
  hi = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(x, 16)));
}

// S[m0 + r][t0 .. t0 + 16 NT) = q_r . k_t for MR rows. The channel (pair) loop is outermost so each step
// reads NT * 64 contiguous bytes of K; U independent partial sums hide the FMA latency when MR * NT is small.
// Each step of the channel loop also prefetches the matching K row (4 bs bytes) of the next page `pf`:
// block-table pages are scattered, so the hardware prefetcher cannot run ahead across them.
DOGE_AVX512 DOGE_INLINE void prefetch_row(const char* pf, int64_t row, int bytes) {
  if (!pf) return;
  for (int b = 0; b < bytes; b += 64) _mm_prefetch(pf + row * bytes + b, _MM_HINT_T0);
}

template <Dt DT, int MR, int NT, int U>
DOGE_AVX512 void qk_tile(const char* page, int bs, int d, int t0, const float* qbuf, float* s, int m0,
                         const char* pf) {
  __m512 acc[U][MR][NT];
  for (int u = 0; u < U; ++u)
    for (int r = 0; r < MR; ++r)
      for (int t = 0; t < NT; ++t) acc[u][r][t] = _mm512_setzero_ps();
  if constexpr (DT == Dt::bf16) {
    const uint32_t* q = reinterpret_cast<const uint32_t*>(qbuf) + m0 * (d / 2);
    const uint16_t* k = reinterpret_cast<const uint16_t*>(page) + t0 * 2;
    for (int c = 0; c < d / 2; c += U)
      for (int u = 0; u < U; ++u) {
        const uint16_t* kc = k + int64_t(c + u) * bs * 2;
        prefetch_row(pf, c + u, 4 * bs);
        __m512i qb[MR];
        for (int r = 0; r < MR; ++r) qb[r] = _mm512_set1_epi32(q[r * (d / 2) + c + u]);
        for (int t = 0; t < NT; ++t) {
          const __m512i kv = _mm512_loadu_si512(kc + 32 * t);
          for (int r = 0; r < MR; ++r) acc[u][r][t] = _mm512_dpbf16_ps(acc[u][r][t], as_bh(kv), as_bh(qb[r]));
        }
      }
  } else if constexpr (DT == Dt::f16) {
    const float* q = qbuf + m0 * d;
    const uint16_t* k = reinterpret_cast<const uint16_t*>(page) + t0 * 2;
    for (int c = 0; c < d / 2; c += U)
      for (int u = 0; u < U; ++u) {
        const uint16_t* kc = k + int64_t(c + u) * bs * 2;
        prefetch_row(pf, c + u, 4 * bs);
        for (int t = 0; t < NT; ++t) {
          __m512 ke, ko;
          widen_f16_pairs(_mm512_loadu_si512(kc + 32 * t), ke, ko);
          for (int r = 0; r < MR; ++r) {
            acc[u][r][t] = _mm512_fmadd_ps(ke, _mm512_set1_ps(q[r * d + 2 * (c + u)]), acc[u][r][t]);
            acc[u][r][t] = _mm512_fmadd_ps(ko, _mm512_set1_ps(q[r * d + 2 * (c + u) + 1]), acc[u][r][t]);
          }
        }
      }
  } else {
    const float* q = qbuf + m0 * d;
    const float* k = reinterpret_cast<const float*>(page) + t0;
    for (int c = 0; c < d; c += U)
      for (int u = 0; u < U; ++u) {
        prefetch_row(pf, c + u, 4 * bs);
        for (int t = 0; t < NT; ++t) {
          const __m512 kv = _mm512_loadu_ps(k + int64_t(c + u) * bs + 16 * t);
          for (int r = 0; r < MR; ++r)
            acc[u][r][t] = _mm512_fmadd_ps(kv, _mm512_set1_ps(q[r * d + c + u]), acc[u][r][t]);
        }
      }
  }
  for (int r = 0; r < MR; ++r)
    for (int t = 0; t < NT; ++t) {
      for (int u = 1; u < U; ++u) acc[0][r][t] = _mm512_add_ps(acc[0][r][t], acc[u][r][t]);
      _mm512_storeu_ps(s + (m0 + r) * bs + t0 + 16 * t, acc[0][r][t]);
    }
}

// Key chunks of 16 in groups of up to NT (at most 16 accumulators), with partial sums over the channels
// when a group is small (block size 16 or 32, one query row).
template <Dt DT, int MR>
DOGE_AVX512 void qk_rows(const char* page, int bs, int d, int nch, const float* q, float* s, int m,
                         const char* pf) {
  constexpr int NT = MR <= 2 ? 8 : 4;
  int t = 0;
  for (; t + NT <= nch; t += NT, pf = nullptr) qk_tile<DT, MR, NT, 1>(page, bs, d, 16 * t, q, s, m, pf);
  for (; t + 4 <= nch; t += 4, pf = nullptr) qk_tile<DT, MR, 4, (MR == 1 ? 2 : 1)>(page, bs, d, 16 * t, q, s, m, pf);
  for (; t + 2 <= nch; t += 2, pf = nullptr) qk_tile<DT, MR, 2, (MR == 1 ? 4 : 2)>(page, bs, d, 16 * t, q, s, m, pf);
  for (; t < nch; ++t, pf = nullptr) qk_tile<DT, MR, 1, (MR == 1 ? 8 : 4)>(page, bs, d, 16 * t, q, s, m, pf);
}

template <Dt DT>
DOGE_AVX512 void qk_block(const char* page, int bs, int d, int n, const float* q, float* s, int M,
                          const char* pf) {
  const int nch = (n + 15) / 16;
  int m = 0;
  for (; m + 4 <= M; m += 4, pf = nullptr) qk_rows<DT, 4>(page, bs, d, nch, q, s, m, pf);
  switch (M - m) {
    case 3: qk_rows<DT, 3>(page, bs, d, nch, q, s, m, pf); break;
    case 2: qk_rows<DT, 2>(page, bs, d, nch, q, s, m, pf); break;
    case 1: qk_rows<DT, 1>(page, bs, d, nch, q, s, m, pf); break;
    default: break;
  }
}

// O[m0 + r][c0 .. c0 + 16 CB) = alpha_r O + sum_{t < n} p_rt v_t.
// pf: the next page's V, prefetched one row (4 d bytes) per token (pair) step.
template <Dt DT, int MR, int CB>
DOGE_AVX512 void pv_tile(const char* page, int bs, int d, int n, const Scratch& sc, int m0, int c0,
                         const char* pf) {
  __m512 acc[MR][CB];
  for (int r = 0; r < MR; ++r)
    for (int b = 0; b < CB; ++b)
      acc[r][b] = _mm512_mul_ps(_mm512_loadu_ps(sc.o + (m0 + r) * d + c0 + 16 * b), _mm512_set1_ps(sc.alpha[m0 + r]));
  if constexpr (DT == Dt::bf16) {
    const uint32_t* pp = reinterpret_cast<const uint32_t*>(sc.p) + m0 * (bs / 2);
    const uint16_t* v = reinterpret_cast<const uint16_t*>(page) + int64_t(bs) * d + c0 * 2;
    const __m512i low = _mm512_set1_epi32(0xFFFF);
    for (int tp = 0; tp < (n + 1) / 2; ++tp) {
      // The odd token of a last half pair was never written: zero it (p is 0, but 0 * NaN is not).
      const bool half = 2 * tp + 1 == n;
      prefetch_row(pf, tp, 4 * d);
      for (int b = 0; b < CB; ++b) {
        __m512i vv = _mm512_loadu_si512(v + (int64_t(tp) * d + 16 * b) * 2);
        if (half) vv = _mm512_and_si512(vv, low);
        for (int r = 0; r < MR; ++r)
          acc[r][b] = _mm512_dpbf16_ps(acc[r][b], as_bh(vv), as_bh(_mm512_set1_epi32(pp[r * (bs / 2) + tp])));
      }
    }
  } else if constexpr (DT == Dt::f16) {
    const float* p = sc.p + m0 * bs;
    const uint16_t* v = reinterpret_cast<const uint16_t*>(page) + int64_t(bs) * d + c0 * 2;
    for (int tp = 0; tp < (n + 1) / 2; ++tp) {
      const bool half = 2 * tp + 1 == n;
      prefetch_row(pf, tp, 4 * d);
      for (int b = 0; b < CB; ++b) {
        __m512 ve, vo;
        widen_f16_pairs(_mm512_loadu_si512(v + (int64_t(tp) * d + 16 * b) * 2), ve, vo);
        for (int r = 0; r < MR; ++r) {
          acc[r][b] = _mm512_fmadd_ps(ve, _mm512_set1_ps(p[r * bs + 2 * tp]), acc[r][b]);
          if (!half) acc[r][b] = _mm512_fmadd_ps(vo, _mm512_set1_ps(p[r * bs + 2 * tp + 1]), acc[r][b]);
        }
      }
    }
  } else {
    const float* p = sc.p + m0 * bs;
    const float* v = reinterpret_cast<const float*>(page) + int64_t(bs) * d + c0;
    for (int t = 0; t < n; ++t) {
      prefetch_row(pf, t, 4 * d);
      for (int b = 0; b < CB; ++b) {
        const __m512 vv = _mm512_loadu_ps(v + int64_t(t) * d + 16 * b);
        for (int r = 0; r < MR; ++r) acc[r][b] = _mm512_fmadd_ps(vv, _mm512_set1_ps(p[r * bs + t]), acc[r][b]);
      }
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int b = 0; b < CB; ++b) _mm512_storeu_ps(sc.o + (m0 + r) * d + c0 + 16 * b, acc[r][b]);
}

template <Dt DT, int MR>
DOGE_AVX512 void pv_rows(const char* page, int bs, int d, int n, const Scratch& sc, int m0, const char* pf) {
  constexpr int CB = MR <= 2 ? 8 : 4;
  int c = 0;
  for (; c + 16 * CB <= d; c += 16 * CB, pf = nullptr) pv_tile<DT, MR, CB>(page, bs, d, n, sc, m0, c, pf);
  if constexpr (CB > 4)
    for (; c + 64 <= d; c += 64, pf = nullptr) pv_tile<DT, MR, 4>(page, bs, d, n, sc, m0, c, pf);
  for (; c + 32 <= d; c += 32, pf = nullptr) pv_tile<DT, MR, 2>(page, bs, d, n, sc, m0, c, pf);
  for (; c < d; c += 16, pf = nullptr) pv_tile<DT, MR, 1>(page, bs, d, n, sc, m0, c, pf);
}

template <Dt DT>
DOGE_AVX512 void pv_block(const char* page, int bs, int d, int n, const Scratch& sc, int M, const char* pf) {
  int m = 0;
  for (; m + 4 <= M; m += 4, pf = nullptr) pv_rows<DT, 4>(page, bs, d, n, sc, m, pf);
  switch (M - m) {
    case 3: pv_rows<DT, 3>(page, bs, d, n, sc, m, pf); break;
    case 2: pv_rows<DT, 2>(page, bs, d, n, sc, m, pf); break;
    case 1: pv_rows<DT, 1>(page, bs, d, n, sc, m, pf); break;
    default: break;
  }
}

// Masked online-softmax step over keys j0 .. j0+n-1 of one block. Writes P (fp32, or bf16 when
// p_bf16) for the chunks up to `width` keys (zeros past n), alpha = exp(m_old - m_new), and updates
// the running max and sum. A row with no allowed key so far keeps max -inf, P 0 and alpha 1.
DOGE_AVX512 void softmax_step(const Params& p, const Item& it, const Scratch& sc, const float* bias, int j0, int n,
                              int M, bool p_bf16, int width) {
  const int bs = p.geo.bs, G = p.group, nch = (n + 15) / 16;
  const int pos0 = p.ctx(it.b) + it.row0;
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512 ninf = _mm512_set1_ps(-kInf), scale = _mm512_set1_ps(p.scale);
  for (int m = 0; m < M; ++m) {
    const int pos = pos0 + m / G;
    const int lo = p.window > 0 ? pos - p.window + 1 : 0;
    const float* b = bias + p.channel(m % G) * bs;
    float* s = sc.s + m * bs;
    __m512 vmax = ninf;
    for (int c = 0; c < nch; ++c) {
      const __m512i j = _mm512_add_epi32(_mm512_set1_epi32(j0 + 16 * c), iota);
      const __mmask16 ok = _mm512_cmple_epi32_mask(j, _mm512_set1_epi32(pos)) &
                           _mm512_cmpge_epi32_mask(j, _mm512_set1_epi32(lo));
      const __m512 x = _mm512_mask_mov_ps(
          ninf, ok, _mm512_fmadd_ps(_mm512_loadu_ps(s + 16 * c), scale, _mm512_loadu_ps(b + 16 * c)));
      _mm512_storeu_ps(s + 16 * c, x);
      vmax = _mm512_max_ps(vmax, x);
    }
    const float m_old = sc.mx[m], m_new = std::max(m_old, _mm512_reduce_max_ps(vmax));
    __m512 vsum = _mm512_setzero_ps();
    const bool live = m_new != -kInf;
    const __m512 mn = _mm512_set1_ps(m_new);
    for (int c = 0; c < width / 16; ++c) {
      __m512 e = _mm512_setzero_ps();
      if (live && c < nch) {
        const __m512 x = _mm512_loadu_ps(s + 16 * c);
        e = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, ninf, _CMP_NEQ_OQ), exp_ps(_mm512_sub_ps(x, mn)));
        vsum = _mm512_add_ps(vsum, e);
      }
      if (p_bf16)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(reinterpret_cast<uint16_t*>(sc.p) + m * bs + 16 * c),
                            (__m256i)_mm512_cvtneps_pbh(e));
      else
        _mm512_storeu_ps(sc.p + m * bs + 16 * c, e);
    }
    if (!live) {
      sc.alpha[m] = 1.f;
      continue;
    }
    const float alpha = std::exp(m_old - m_new);
    sc.alpha[m] = alpha;
    sc.sum[m] = sc.sum[m] * alpha + _mm512_reduce_add_ps(vsum);
    sc.mx[m] = m_new;
  }
}

template <Dt DT>
DOGE_AVX512 void load_q(const Params& p, const Item& it, const Scratch& sc, bool raw) {
  const int d = p.geo.d, G = p.group, e = elt_size(DT);
  for (int m = 0; m < it.nrows * G; ++m) {
    const char* q = p.q + ((p.qsl[it.b] + it.row0 + m / G) * p.q_s0 + (it.g * G + m % G) * p.q_s1) * e;
    if (DT == Dt::f16 && !raw) {
      for (int c = 0; c < d; c += 16)
        _mm512_storeu_ps(sc.q + m * d + c,
                         _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q) + c / 16)));
    } else {
      std::memcpy(reinterpret_cast<char*>(sc.q) + int64_t(m) * d * e, q, size_t(d) * e);
    }
  }
}

template <Dt DT>
DOGE_AVX512 void finish(const Params& p, const Item& it, const Scratch& sc, const Partials& parts) {
  const int d = p.geo.d, G = p.group, M = it.nrows * G;
  if (it.part >= 0) {
    float* o = parts.o + int64_t(it.part) * parts.m_max * d;
    float* ml = parts.ml + int64_t(it.part) * parts.m_max * 2;
    std::memcpy(o, sc.o, sizeof(float) * M * d);
    for (int m = 0; m < M; ++m) {
      ml[2 * m] = sc.mx[m];
      ml[2 * m + 1] = sc.sum[m];
    }
    return;
  }
  const int e = elt_size(DT);
  for (int m = 0; m < M; ++m) {
    const __m512 inv = _mm512_set1_ps(1.f / sc.sum[m]);
    char* dst = p.out + ((p.qsl[it.b] + it.row0 + m / G) * p.o_s0 + (it.g * G + m % G) * p.o_s1) * e;
    for (int c = 0; c < d; c += 16) {
      const __m512 x = _mm512_mul_ps(_mm512_loadu_ps(sc.o + m * d + c), inv);
      if constexpr (DT == Dt::f32)
        _mm512_storeu_ps(reinterpret_cast<float*>(dst) + c, x);
      else if constexpr (DT == Dt::bf16)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst) + c / 16, (__m256i)_mm512_cvtneps_pbh(x));
      else
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst) + c / 16,
                            _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
  }
}

DOGE_AVX512 void init_rows(const Scratch& sc, int M, int d) {
  std::fill(sc.o, sc.o + M * d, 0.f);
  std::fill(sc.mx, sc.mx + M, -kInf);
  std::fill(sc.sum, sc.sum + M, 0.f);
}

template <Dt DT>
DOGE_AVX512 void attend_loops(const Params& p, const Item& it, const Scratch& sc, const Partials& parts) {
  const int d = p.geo.d, bs = p.geo.bs, M = it.nrows * p.group, seq = p.seq_lens[it.b];
  load_q<DT>(p, it, sc, false);
  init_rows(sc, M, d);
  for (int blk = it.blk0; blk < it.blk1; ++blk) {
    const char* page = p.page(it.b, blk, it.g);
    const int j0 = blk * bs, n = std::min(bs, seq - j0);
    const char* next = blk + 1 < it.blk1 ? p.page(it.b, blk + 1, it.g) : nullptr;
    qk_block<DT>(page, bs, d, n, sc.q, sc.s, M, next);
    softmax_step(p, it, sc, reinterpret_cast<const float*>(page + p.geo.bias_byte_off()), j0, n, M, DT == Dt::bf16,
                 (n + 15) / 16 * 16);
    pv_block<DT>(page, bs, d, n, sc, M, next ? next + int64_t(bs) * d * elt_size(DT) : nullptr);
  }
  finish<DT>(p, it, sc, parts);
}

// Both products through brgemm. P.V runs over the whole block, so a partial last block's V is first
// copied with zeros past n (those slots were never written).
template <Dt DT>
DOGE_AVX512 void attend_gemm(const Params& p, const Item& it, const Scratch& sc, const Partials& parts) {
  using T = std::conditional_t<DT == Dt::bf16, at::BFloat16, float>;
  constexpr bool vnni = DT == Dt::bf16;
  const int d = p.geo.d, bs = p.geo.bs, M = it.nrows * p.group, seq = p.seq_lens[it.b], e = sizeof(T);
  load_q<DT>(p, it, sc, true);
  init_rows(sc, M, d);
  const T* q = reinterpret_cast<const T*>(sc.q);
  for (int blk = it.blk0; blk < it.blk1; ++blk) {
    const char* page = p.page(it.b, blk, it.g);
    const int j0 = blk * bs, n = std::min(bs, seq - j0);
    at::native::cpublas::brgemm(M, bs, d, d, bs, bs, false, q, reinterpret_cast<const T*>(page), sc.s, vnni);
    softmax_step(p, it, sc, reinterpret_cast<const float*>(page + p.geo.bias_byte_off()), j0, n, M, vnni, bs);
    for (int m = 0; m < M; ++m) {
      const __m512 a = _mm512_set1_ps(sc.alpha[m]);
      for (int c = 0; c < d; c += 16)
        _mm512_storeu_ps(sc.o + m * d + c, _mm512_mul_ps(_mm512_loadu_ps(sc.o + m * d + c), a));
    }
    const char* v = page + int64_t(bs) * d * e;
    if (n < bs) {
      char* pad = reinterpret_cast<char*>(sc.v);
      const int64_t keep = vnni ? int64_t(n / 2) * d * 2 * e : int64_t(n) * d * e;
      std::memcpy(pad, v, keep);
      std::memset(pad + keep, 0, int64_t(bs) * d * e - keep);
      if (vnni && n % 2) {  // last half pair: its even token only
        const uint16_t* src = reinterpret_cast<const uint16_t*>(v) + int64_t(n / 2) * d * 2;
        uint16_t* dst = reinterpret_cast<uint16_t*>(pad) + int64_t(n / 2) * d * 2;
        for (int c = 0; c < d; ++c) dst[2 * c] = src[2 * c];
      }
      v = pad;
    }
    at::native::cpublas::brgemm(M, d, bs, bs, d, d, true, reinterpret_cast<const T*>(sc.p),
                                reinterpret_cast<const T*>(v), sc.o, vnni);
  }
  finish<DT>(p, it, sc, parts);
}

}  // namespace

bool avx512_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512bf16");
}

// bf16 brgemm only where oneDNN packs for AMX (could_pack); on AVX512_BF16 without AMX the hand-written
// tiles run, as this machine cannot measure oneDNN's non-AMX ukernel. fp32 wherever oneDNN is enabled.
bool brgemm_usable(Dt dt) {
  if (dt == Dt::bf16) return at::native::cpublas::could_pack(at::kBFloat16);
  if (dt == Dt::f32) return at::globalContext().userEnabledMkldnn();
  return false;
}

void brgemm_done() { at::native::cpublas::brgemm_release(); }

void attend_avx512(const Params& p, const Item& it, const Scratch& s, const Partials& parts, bool gemm) {
  switch (p.geo.dt) {
    case Dt::f32: return gemm ? attend_gemm<Dt::f32>(p, it, s, parts) : attend_loops<Dt::f32>(p, it, s, parts);
    case Dt::bf16: return gemm ? attend_gemm<Dt::bf16>(p, it, s, parts) : attend_loops<Dt::bf16>(p, it, s, parts);
    case Dt::f16: return attend_loops<Dt::f16>(p, it, s, parts);
  }
}

}  // namespace vllm_doge
