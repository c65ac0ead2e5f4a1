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
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <cstdlib>
#include <type_traits>

#include "common.h"
#include "vec_avx512.h"

#define DOGE_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c")))
#define DOGE_INLINE inline __attribute__((always_inline))

namespace vllm_doge {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();


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
DOGE_AVX512 void qk_tile(const char* page, int bs, int d, int t0, const float* qbuf, float* s, int ld, int m0,
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
      _mm512_storeu_ps(s + int64_t(m0 + r) * ld + t0 + 16 * t, acc[0][r][t]);
    }
}

// Key chunks of 16 in groups of up to NT (at most 16 accumulators), with partial sums over the channels
// when a group is small (block size 16 or 32, one query row).
template <Dt DT, int MR>
DOGE_AVX512 void qk_rows(const char* page, int bs, int d, int nch, const float* q, float* s, int ld, int m,
                         const char* pf) {
  constexpr int NT = MR <= 2 ? 8 : 4;
  int t = 0;
  for (; t + NT <= nch; t += NT, pf = nullptr) qk_tile<DT, MR, NT, 1>(page, bs, d, 16 * t, q, s, ld, m, pf);
  for (; t + 4 <= nch; t += 4, pf = nullptr) qk_tile<DT, MR, 4, (MR == 1 ? 2 : 1)>(page, bs, d, 16 * t, q, s, ld, m, pf);
  for (; t + 2 <= nch; t += 2, pf = nullptr) qk_tile<DT, MR, 2, (MR == 1 ? 4 : 2)>(page, bs, d, 16 * t, q, s, ld, m, pf);
  for (; t < nch; ++t, pf = nullptr) qk_tile<DT, MR, 1, (MR == 1 ? 8 : 4)>(page, bs, d, 16 * t, q, s, ld, m, pf);
}

template <Dt DT>
DOGE_AVX512 void qk_group(const char* page, int bs, int d, int nch, const float* q, float* s, int ld, int M, int m,
                          const char* pf) {
  switch (M - m) {
    case 3: return qk_rows<DT, 3>(page, bs, d, nch, q, s, ld, m, pf);
    case 2: return qk_rows<DT, 2>(page, bs, d, nch, q, s, ld, m, pf);
    case 1: return qk_rows<DT, 1>(page, bs, d, nch, q, s, ld, m, pf);
    default: return qk_rows<DT, 4>(page, bs, d, nch, q, s, ld, m, pf);
  }
}

// Rows in groups of 4. With more than one group, strips of 64 keys are the outer loop: a strip of K (d x 64
// keys, 16 KB in bf16, 32 KB in fp32) stays in L1 for every row group, where rows-outer streamed the whole
// page from L2 once per 4 rows and ran at L2 bandwidth instead of the FMA rate.
template <Dt DT>
DOGE_AVX512 void qk_block(const char* page, int bs, int d, int n, const float* q, float* s, int ld, int M,
                          const char* pf) {
  const int nch = (n + 15) / 16;
  if (M <= 4) return qk_group<DT>(page, bs, d, nch, q, s, ld, M, 0, pf);
  for (int c0 = 0; c0 < nch; c0 += 4)  // key t of a page lies 4 t bytes into its K row in every layout
    for (int m = 0; m < M; m += 4, pf = nullptr)
      qk_group<DT>(page + 4 * 16 * c0, bs, d, std::min(4, nch - c0), q, s + 16 * c0, ld, M, m, pf);
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
    const uint32_t* pp = reinterpret_cast<const uint32_t*>(sc.p) + int64_t(m0) * (sc.ld / 2);
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
          acc[r][b] = _mm512_dpbf16_ps(acc[r][b], as_bh(vv), as_bh(_mm512_set1_epi32(pp[r * (sc.ld / 2) + tp])));
      }
    }
  } else if constexpr (DT == Dt::f16) {
    const float* p = sc.p + int64_t(m0) * sc.ld;
    const uint16_t* v = reinterpret_cast<const uint16_t*>(page) + int64_t(bs) * d + c0 * 2;
    for (int tp = 0; tp < (n + 1) / 2; ++tp) {
      const bool half = 2 * tp + 1 == n;
      prefetch_row(pf, tp, 4 * d);
      for (int b = 0; b < CB; ++b) {
        __m512 ve, vo;
        widen_f16_pairs(_mm512_loadu_si512(v + (int64_t(tp) * d + 16 * b) * 2), ve, vo);
        for (int r = 0; r < MR; ++r) {
          acc[r][b] = _mm512_fmadd_ps(ve, _mm512_set1_ps(p[r * sc.ld + 2 * tp]), acc[r][b]);
          if (!half) acc[r][b] = _mm512_fmadd_ps(vo, _mm512_set1_ps(p[r * sc.ld + 2 * tp + 1]), acc[r][b]);
        }
      }
    }
  } else {
    const float* p = sc.p + int64_t(m0) * sc.ld;
    const float* v = reinterpret_cast<const float*>(page) + int64_t(bs) * d + c0;
    for (int t = 0; t < n; ++t) {
      prefetch_row(pf, t, 4 * d);
      for (int b = 0; b < CB; ++b) {
        const __m512 vv = _mm512_loadu_ps(v + int64_t(t) * d + 16 * b);
        for (int r = 0; r < MR; ++r) acc[r][b] = _mm512_fmadd_ps(vv, _mm512_set1_ps(p[r * sc.ld + t]), acc[r][b]);
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

template <Dt DT, int MR>
DOGE_AVX512 void pv_strip(const char* page, int bs, int d, int n, const Scratch& sc, int m0, int c0, int w,
                          const char* pf) {
  if (w == 64) return pv_tile<DT, MR, 4>(page, bs, d, n, sc, m0, c0, pf);
  if (w == 32) return pv_tile<DT, MR, 2>(page, bs, d, n, sc, m0, c0, pf);
  pv_tile<DT, MR, 1>(page, bs, d, n, sc, m0, c0, pf);
}

// As qk_block: with more than one row group, strips of 64 channels of V (n x 64) outermost, kept in L1.
template <Dt DT>
DOGE_AVX512 void pv_block(const char* page, int bs, int d, int n, const Scratch& sc, int M, const char* pf) {
  if (M <= 4) {
    switch (M) {
      case 4: return pv_rows<DT, 4>(page, bs, d, n, sc, 0, pf);
      case 3: return pv_rows<DT, 3>(page, bs, d, n, sc, 0, pf);
      case 2: return pv_rows<DT, 2>(page, bs, d, n, sc, 0, pf);
      default: return pv_rows<DT, 1>(page, bs, d, n, sc, 0, pf);
    }
  }
  for (int c0 = 0; c0 < d; c0 += 64) {
    const int w = std::min(64, d - c0);
    for (int strip = 0; strip < w; strip += (w - strip >= 64 ? 64 : w - strip >= 32 ? 32 : 16)) {
      const int sw = w - strip >= 64 ? 64 : w - strip >= 32 ? 32 : 16;
      int m = 0;
      for (; m + 4 <= M; m += 4, pf = nullptr) pv_strip<DT, 4>(page, bs, d, n, sc, m, c0 + strip, sw, pf);
      switch (M - m) {
        case 3: pv_strip<DT, 3>(page, bs, d, n, sc, m, c0 + strip, sw, pf); break;
        case 2: pv_strip<DT, 2>(page, bs, d, n, sc, m, c0 + strip, sw, pf); break;
        case 1: pv_strip<DT, 1>(page, bs, d, n, sc, m, c0 + strip, sw, pf); break;
        default: break;
      }
      pf = nullptr;
    }
  }
}

// Online softmax in two passes per chunk of keys (one block, or several for brgemm).
// Pass 1, per block: x = scale s + bias in place for the block's chunks [0, wch) of each row, -inf where
// the key is not visible from the row (past the row's position, before its window, or past seq: t >= n),
// the rows' maxima folded into sc.cmax. Rows that see the whole block skip the mask.
DOGE_AVX512 void score_block(const Params& p, const Item& it, const Scratch& sc, float* s, const float* bias,
                             int j0, int n, int wch, int M) {
  const int bs = p.geo.bs, G = p.group, nch = (n + 15) / 16, ld = sc.ld;
  const int pos0 = p.ctx(it.b) + it.row0;
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512 ninf = _mm512_set1_ps(-kInf), scale = _mm512_set1_ps(p.scale);
  for (int m = 0; m < M; ++m) {
    const int pos = pos0 + m / G;
    const int lo = p.window > 0 ? pos - p.window + 1 : 0;
    const float* b = bias + p.channel(m % G) * bs;
    float* row = s + int64_t(m) * ld;
    __m512 vmax = ninf;
    int c = 0;
    if (j0 > pos || j0 + n <= lo) {
      // no visible key in this block
    } else if (j0 + 16 * nch - 1 <= pos && j0 >= lo) {
      for (; c < nch; ++c) {
        const __m512 x = _mm512_fmadd_ps(_mm512_loadu_ps(row + 16 * c), scale, _mm512_loadu_ps(b + 16 * c));
        _mm512_storeu_ps(row + 16 * c, x);
        vmax = _mm512_max_ps(vmax, x);
      }
    } else {
      const __m512i vpos = _mm512_set1_epi32(pos), vlo = _mm512_set1_epi32(lo);
      for (; c < nch; ++c) {
        const __m512i j = _mm512_add_epi32(_mm512_set1_epi32(j0 + 16 * c), iota);
        const __mmask16 ok = _mm512_cmple_epi32_mask(j, vpos) & _mm512_cmpge_epi32_mask(j, vlo);
        const __m512 x = _mm512_mask_mov_ps(
            ninf, ok, _mm512_fmadd_ps(_mm512_loadu_ps(row + 16 * c), scale, _mm512_loadu_ps(b + 16 * c)));
        _mm512_storeu_ps(row + 16 * c, x);
        vmax = _mm512_max_ps(vmax, x);
      }
    }
    for (; c < wch; ++c) _mm512_storeu_ps(row + 16 * c, ninf);
    sc.cmax[m] = std::max(sc.cmax[m], _mm512_reduce_max_ps(vmax));
  }
}

// Pass 2 over the chunk's `width` scored columns: P = exp(x - m_new) (bf16 when p_bf16, else fp32; masked
// keys, -inf, give exactly 0), alpha = exp(m_old - m_new), running max and sum updated, cmax reset. A row with no
// visible key so far keeps max -inf, P 0 and alpha 1.
DOGE_AVX512 void softmax_rows(const Scratch& sc, int M, int width, bool p_bf16) {
  const int ld = sc.ld, nc = width / 16;
  for (int m = 0; m < M; ++m) {
    const float m_old = sc.mx[m], m_new = std::max(m_old, sc.cmax[m]);
    sc.cmax[m] = -kInf;
    const float* x = sc.s + int64_t(m) * ld;
    uint16_t* ph = reinterpret_cast<uint16_t*>(sc.p) + int64_t(m) * ld;
    float* pf = sc.p + int64_t(m) * ld;
    if (m_new == -kInf) {
      if (p_bf16)
        std::memset(ph, 0, sizeof(uint16_t) * width);
      else
        std::memset(pf, 0, sizeof(float) * width);
      sc.alpha[m] = 1.f;
      continue;
    }
    const __m512 mn = _mm512_set1_ps(m_new);
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
    int c = 0;
    for (; c + 2 <= nc; c += 2) {
      const __m512 e0 = exp_ps(_mm512_sub_ps(_mm512_loadu_ps(x + 16 * c), mn));
      const __m512 e1 = exp_ps(_mm512_sub_ps(_mm512_loadu_ps(x + 16 * c + 16), mn));
      s0 = _mm512_add_ps(s0, e0);
      s1 = _mm512_add_ps(s1, e1);
      if (p_bf16) {
        // cvtne2ps puts its second operand in the low half: 32 bf16 in key order.
        _mm512_storeu_si512(ph + 16 * c, (__m512i)_mm512_cvtne2ps_pbh(e1, e0));
      } else {
        _mm512_storeu_ps(pf + 16 * c, e0);
        _mm512_storeu_ps(pf + 16 * c + 16, e1);
      }
    }
    if (c < nc) {
      const __m512 e0 = exp_ps(_mm512_sub_ps(_mm512_loadu_ps(x + 16 * c), mn));
      s0 = _mm512_add_ps(s0, e0);
      if (p_bf16)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(ph + 16 * c), (__m256i)_mm512_cvtneps_pbh(e0));
      else
        _mm512_storeu_ps(pf + 16 * c, e0);
    }
    const float alpha = std::exp(m_old - m_new);
    sc.alpha[m] = alpha;
    sc.sum[m] = sc.sum[m] * alpha + _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
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
  if (it.part >= 0) return store_partial(parts, it.part, sc, M, d);
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

// One past the last key any row of the item sees (its last row's position): keys from there on are masked for
// every row -- the upper half of a causal diagonal block when the item's rows start mid-block -- so the loop
// paths neither score nor multiply them (brgemm still runs whole blocks, but skips their softmax).
inline int visible_end(const Params& p, const Item& it) { return p.ctx(it.b) + it.row0 + it.nrows; }

DOGE_AVX512 void init_rows(const Scratch& sc, int M, int d) {
  std::fill(sc.o, sc.o + M * d, 0.f);
  std::fill(sc.mx, sc.mx + M, -kInf);
  std::fill(sc.cmax, sc.cmax + M, -kInf);
  std::fill(sc.sum, sc.sum + M, 0.f);
}

template <Dt DT>
DOGE_AVX512 void attend_loops(const Params& p, const Item& it, const Scratch& sc, const Partials& parts,
                              const char* pf) {
  const int d = p.geo.d, bs = p.geo.bs, M = it.nrows * p.group, vis = visible_end(p, it);
  load_q<DT>(p, it, sc, false);
  init_rows(sc, M, d);
  for (int blk = it.blk0; blk < it.blk1; ++blk) {
    const char* page = p.page(it.b, blk, it.g);
    const int j0 = blk * bs, n = std::min(bs, vis - j0), nch = (n + 15) / 16;
    const char* next = blk + 1 < it.blk1 ? p.page(it.b, blk + 1, it.g) : pf;
    qk_block<DT>(page, bs, d, n, sc.q, sc.s, sc.ld, M, next);
    score_block(p, it, sc, sc.s, reinterpret_cast<const float*>(page + p.geo.bias_byte_off()), j0, n, nch, M);
    softmax_rows(sc, M, 16 * nch, DT == Dt::bf16);
    pv_block<DT>(page, bs, d, n, sc, M, next ? next + int64_t(bs) * d * elt_size(DT) : nullptr);
  }
  finish<DT>(p, it, sc, parts);
}

// bf16 rows of a few (<= 16) stacked rows -- decode, speculative verification -- on AMX tiles, where oneDNN
// packs for AMX: vdpbf16ps costs ~4 FMA times on these cores, which left decode compute-bound in L2 and
// unable to hide L3 latency. One tile configuration for both products:
//   tmm0 A [M][32 bf16]  (32 channels of Q, or 32 keys of P)
//   tmm1-3 B [16 pairs][16 x 2 bf16]  (K: 16 channel pairs x 16 keys, stride 4 bs bytes; V: 16 token pairs x
//          16 channels, stride 4 d bytes -- the page layout, no packing)
//   tmm4-7 C [M][16 fp32]  (S for 4 x 16 keys, or O for 4 x 16 channels)
// Needs d % 64 == 0, bs % 32 == 0. The tail of a partial block's last 32 keys reads V from a zero-padded copy
// (its unwritten slots may hold NaN, and 0 x NaN is not 0); P is 0 there.
// Rows of the tile configuration this thread loaded for attend_amx, 0 when brgemm's (or none) is loaded.
thread_local int t_amx_rows = 0;

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

#define DOGE_AMX __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c,amx-tile,amx-bf16")))

DOGE_AMX void attend_amx(const Params& p, const Item& it, const Scratch& sc, const Partials& parts) {
  const int d = p.geo.d, bs = p.geo.bs, M = it.nrows * p.group, vis = visible_end(p, it);
  TileConfig cfg;
  cfg.rows[0] = uint8_t(M);
  cfg.colsb[0] = 64;
  for (int t = 1; t <= 3; ++t) cfg.rows[t] = 16, cfg.colsb[t] = 64;
  for (int t = 4; t <= 7; ++t) cfg.rows[t] = uint8_t(M), cfg.colsb[t] = 64;
  if (t_amx_rows != M) {  // kept loaded across this thread's items of one height
    _tile_loadconfig(&cfg);
    t_amx_rows = M;
  }
  load_q<Dt::bf16>(p, it, sc, true);
  init_rows(sc, M, d);
  const uint16_t* q = reinterpret_cast<const uint16_t*>(sc.q);
  const uint16_t* pm = reinterpret_cast<const uint16_t*>(sc.p);
  uint16_t* pad = reinterpret_cast<uint16_t*>(sc.v);  // [16 pairs][d][2]
  const int64_t sk = 4 * bs, sv = 4 * d;
  for (int blk = it.blk0; blk < it.blk1; ++blk) {
    const char* page = p.page(it.b, blk, it.g);
    const int j0 = blk * bs, n = std::min(bs, vis - j0), nk = (n + 15) / 16 * 16, np = (n + 31) / 32 * 32;
    // S = Q.K^T, 64 keys at a time.
    int t = 0;
    for (; t + 64 <= nk; t += 64) {
      _tile_zero(4);
      _tile_zero(5);
      _tile_zero(6);
      _tile_zero(7);
      for (int k = 0; k < d / 32; ++k) {
        _tile_loadd(0, q + 32 * k, 2 * d);
        const char* kb = page + int64_t(16 * k) * sk + 4 * t;
        _tile_loadd(1, kb, sk);
        _tile_dpbf16ps(4, 0, 1);
        _tile_loadd(2, kb + 64, sk);
        _tile_dpbf16ps(5, 0, 2);
        _tile_loadd(3, kb + 128, sk);
        _tile_dpbf16ps(6, 0, 3);
        _tile_loadd(1, kb + 192, sk);
        _tile_dpbf16ps(7, 0, 1);
      }
      float* s = sc.s + t;
      _tile_stored(4, s, 4 * sc.ld);
      _tile_stored(5, s + 16, 4 * sc.ld);
      _tile_stored(6, s + 32, 4 * sc.ld);
      _tile_stored(7, s + 48, 4 * sc.ld);
    }
    for (; t < nk; t += 16) {
      _tile_zero(4);
      for (int k = 0; k < d / 32; ++k) {
        _tile_loadd(0, q + 32 * k, 2 * d);
        _tile_loadd(1, page + int64_t(16 * k) * sk + 4 * t, sk);
        _tile_dpbf16ps(4, 0, 1);
      }
      _tile_stored(4, sc.s + t, 4 * sc.ld);
    }
    score_block(p, it, sc, sc.s, reinterpret_cast<const float*>(page + p.geo.bias_byte_off()), j0, n, np / 16, M);
    softmax_rows(sc, M, np, true);
    for (int m = 0; m < M; ++m) {
      if (sc.alpha[m] == 1.f) continue;
      const __m512 a = _mm512_set1_ps(sc.alpha[m]);
      float* o = sc.o + int64_t(m) * d;
      for (int c = 0; c < d; c += 16) _mm512_storeu_ps(o + c, _mm512_mul_ps(_mm512_loadu_ps(o + c), a));
    }
    // O += P.V, 64 channels at a time; the last 32 keys of a partial block from the padded copy.
    const char* v = page + int64_t(bs) * d * 2;
    const int full = n / 32 * 32;
    if (full < np) {
      const uint16_t* src = reinterpret_cast<const uint16_t*>(v) + int64_t(full / 2) * d * 2;
      const int pairs = (n - full) / 2;  // whole pairs < n
      std::memcpy(pad, src, size_t(pairs) * d * 4);
      std::memset(pad + int64_t(pairs) * d * 2, 0, size_t(16 - pairs) * d * 4);
      if ((n - full) % 2)
        for (int c = 0; c < d; ++c) pad[(int64_t(pairs) * d + c) * 2] = src[(int64_t(pairs) * d + c) * 2];
    }
    for (int c = 0; c < d; c += 64) {
      float* o = sc.o + c;
      _tile_loadd(4, o, 4 * d);
      _tile_loadd(5, o + 16, 4 * d);
      _tile_loadd(6, o + 32, 4 * d);
      _tile_loadd(7, o + 48, 4 * d);
      for (int kk = 0; kk < np; kk += 32) {
        _tile_loadd(0, pm + kk, 2 * sc.ld);
        const char* vb = kk < full ? v + int64_t(kk / 2) * sv + 4 * c : reinterpret_cast<const char*>(pad) + 4 * c;
        _tile_loadd(1, vb, sv);
        _tile_dpbf16ps(4, 0, 1);
        _tile_loadd(2, vb + 64, sv);
        _tile_dpbf16ps(5, 0, 2);
        _tile_loadd(3, vb + 128, sv);
        _tile_dpbf16ps(6, 0, 3);
        _tile_loadd(1, vb + 192, sv);
        _tile_dpbf16ps(7, 0, 1);
      }
      _tile_stored(4, o, 4 * d);
      _tile_stored(5, o + 16, 4 * d);
      _tile_stored(6, o + 32, 4 * d);
      _tile_stored(7, o + 48, 4 * d);
    }
  }
  finish<Dt::bf16>(p, it, sc, parts);
}

// bf16 through the fp32 tiles: q widened to fp32 once, each page's K and V widened once into the fp32
// page layout in sc.v (K [d][bs], V [bs][d]; bf16 -> fp32 is exact: the 16 bits move up), then the fp32
// Q.K^T and P.V with P in fp32. Only V tokens < n are widened: the fp32 P.V reads no further.
DOGE_AVX512 void widen_page(const char* page, int bs, int d, int n, float* dst) {
  const __m512i hi = _mm512_set1_epi32(int(0xFFFF0000u));
  const uint16_t* k = reinterpret_cast<const uint16_t*>(page);
  for (int c = 0; c < d / 2; ++c)
    for (int t = 0; t < bs; t += 16) {
      const __m512i x = _mm512_loadu_si512(k + (int64_t(c) * bs + t) * 2);
      _mm512_storeu_si512(dst + int64_t(2 * c) * bs + t, _mm512_slli_epi32(x, 16));
      _mm512_storeu_si512(dst + int64_t(2 * c + 1) * bs + t, _mm512_and_si512(x, hi));
    }
  const uint16_t* v = k + int64_t(bs) * d;
  float* vd = dst + int64_t(bs) * d;
  for (int tp = 0; tp < (n + 1) / 2; ++tp)
    for (int c = 0; c < d; c += 16) {
      const __m512i x = _mm512_loadu_si512(v + (int64_t(tp) * d + c) * 2);
      _mm512_storeu_si512(vd + int64_t(2 * tp) * d + c, _mm512_slli_epi32(x, 16));
      _mm512_storeu_si512(vd + int64_t(2 * tp + 1) * d + c, _mm512_and_si512(x, hi));
    }
}

DOGE_AVX512 void attend_widen(const Params& p, const Item& it, const Scratch& sc, const Partials& parts) {
  const int d = p.geo.d, bs = p.geo.bs, G = p.group, M = it.nrows * G, vis = visible_end(p, it);
  for (int m = 0; m < M; ++m) {
    const uint16_t* q = reinterpret_cast<const uint16_t*>(p.q) +
                        (p.qsl[it.b] + it.row0 + m / G) * p.q_s0 + (it.g * G + m % G) * p.q_s1;
    for (int c = 0; c < d; c += 16)
      _mm512_storeu_si512(sc.q + int64_t(m) * d + c,
                          _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(
                                                reinterpret_cast<const __m256i*>(q + c))), 16));
  }
  init_rows(sc, M, d);
  const char* wide = reinterpret_cast<const char*>(sc.v);
  for (int blk = it.blk0; blk < it.blk1; ++blk) {
    const char* page = p.page(it.b, blk, it.g);
    const int j0 = blk * bs, n = std::min(bs, vis - j0), nch = (n + 15) / 16;
    widen_page(page, bs, d, n, sc.v);
    qk_block<Dt::f32>(wide, bs, d, n, sc.q, sc.s, sc.ld, M, nullptr);
    score_block(p, it, sc, sc.s, reinterpret_cast<const float*>(page + p.geo.bias_byte_off()), j0, n, nch, M);
    softmax_rows(sc, M, 16 * nch, false);
    pv_block<Dt::f32>(wide, bs, d, n, sc, M, nullptr);
  }
  finish<Dt::bf16>(p, it, sc, parts);
}

// Both products through brgemm, a chunk of whole blocks (sc.ld keys) at a time: Q.K^T of every block of the
// chunk into one score row, one softmax pass over it, O rescaled (rows whose max moved only), then P.V of
// every block accumulated into O. P.V runs over whole blocks, so a partial last block's V is first copied
// with zeros past n (those slots were never written; its P there is 0).
template <Dt DT>
DOGE_AVX512 void attend_gemm(const Params& p, const Item& it, const Scratch& sc, const Partials& parts) {
  using T = std::conditional_t<DT == Dt::bf16, at::BFloat16, float>;
  constexpr bool vnni = DT == Dt::bf16;
  const int d = p.geo.d, bs = p.geo.bs, M = it.nrows * p.group, seq = p.seq_lens[it.b], e = sizeof(T);
  const int vis = visible_end(p, it);
  const int ld = sc.ld, per_chunk = ld / bs;
  if (t_amx_rows) {  // attend_amx replaced brgemm's tile configuration: make brgemm load its own again
    at::native::cpublas::brgemm_release();
    t_amx_rows = 0;
  }
  load_q<DT>(p, it, sc, true);
  init_rows(sc, M, d);
  const T* q = reinterpret_cast<const T*>(sc.q);
  const T* pm = reinterpret_cast<const T*>(sc.p);
  for (int blk0 = it.blk0; blk0 < it.blk1; blk0 += per_chunk) {
    const int nb = std::min(per_chunk, it.blk1 - blk0);
    // Keys of a block the products cover: whole blocks but the item's last, cut (to 32) after its last
    // visible key; S and P columns past that are never read, P is 0 there.
    auto cols = [&](int i) { return std::min(bs, (vis - (blk0 + i) * bs + 31) / 32 * 32); };
    for (int i = 0; i < nb; ++i)
      at::native::cpublas::brgemm(M, cols(i), d, d, bs, ld, false, q,
                                  reinterpret_cast<const T*>(p.page(it.b, blk0 + i, it.g)), sc.s + i * bs, vnni);
    for (int i = 0; i < nb; ++i) {
      const char* page = p.page(it.b, blk0 + i, it.g);
      const int j0 = (blk0 + i) * bs;
      score_block(p, it, sc, sc.s + i * bs, reinterpret_cast<const float*>(page + p.geo.bias_byte_off()), j0,
                  std::min(bs, vis - j0), bs / 16, M);
    }
    softmax_rows(sc, M, nb * bs, vnni);
    for (int m = 0; m < M; ++m) {
      if (sc.alpha[m] == 1.f) continue;
      const __m512 a = _mm512_set1_ps(sc.alpha[m]);
      float* o = sc.o + int64_t(m) * d;
      for (int c = 0; c < d; c += 16) _mm512_storeu_ps(o + c, _mm512_mul_ps(_mm512_loadu_ps(o + c), a));
    }
    for (int i = 0; i < nb; ++i) {
      const char* page = p.page(it.b, blk0 + i, it.g);
      const int n = std::min(bs, seq - (blk0 + i) * bs);
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
      at::native::cpublas::brgemm(M, d, cols(i), ld, d, d, true, pm + i * bs, reinterpret_cast<const T*>(v), sc.o,
                                  vnni);
    }
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

// bf16 brgemm where oneDNN packs for AMX (could_pack); force: also oneDNN's avx512_core_bf16 ukernel (any
// effective ISA >= avx512_core), which takes the same VNNI pairs. fp32 wherever oneDNN is enabled.
bool brgemm_usable(Dt dt, bool force) {
  if (!at::globalContext().userEnabledMkldnn()) return false;
  if (dt == Dt::bf16) return force || at::native::cpublas::could_pack(at::kBFloat16);
  if (dt == Dt::f32) return true;
  return false;
}

// AMX tiles for few-row bf16 items: where oneDNN itself runs AMX (so ONEDNN_MAX_CPU_ISA caps both) and
// Linux grants this process the tile data state.
bool amx_usable() {
  static const bool ok = [] {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("amx-tile") || !__builtin_cpu_supports("amx-bf16")) return false;
    if (!at::native::cpublas::could_pack(at::kBFloat16)) return false;
    constexpr long kReqXcompPerm = 0x1023, kXtileData = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0;
  }();
  return ok;
}

int gemm_chunk(int bs) { return std::max(1, 512 / bs) * bs; }

void brgemm_done() {
  at::native::cpublas::brgemm_release();  // also releases attend_amx's tiles
  t_amx_rows = 0;
}

void attend_avx512(const Params& p, const Item& it, const Scratch& s, const Partials& parts, Path path,
                   const char* pf) {
  const bool gemm = path == Path::gemm;
  switch (p.geo.dt) {
    case Dt::f32: return gemm ? attend_gemm<Dt::f32>(p, it, s, parts) : attend_loops<Dt::f32>(p, it, s, parts, pf);
    case Dt::bf16:
      if (path == Path::widen) return attend_widen(p, it, s, parts);
      if (path == Path::amx) return attend_amx(p, it, s, parts);
      return gemm ? attend_gemm<Dt::bf16>(p, it, s, parts) : attend_loops<Dt::bf16>(p, it, s, parts, pf);
    case Dt::f16: return attend_loops<Dt::f16>(p, it, s, parts, pf);
  }
}

namespace {
// 16 independent chains of vdpbf16ps, or of vfmadd231ps, `iters` x 16 instructions.
DOGE_AVX512 __attribute__((noinline)) float chains(bool dot, int iters) {
  __m512 acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
  const __m512i a = _mm512_set1_epi32(0x3f803f80);
  const __m512 f = _mm512_set1_ps(1e-3f);
  for (int it = 0; it < iters; ++it) {
    if (dot)
      for (int i = 0; i < 16; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], as_bh(a), as_bh(a));
    else
      for (int i = 0; i < 16; ++i) acc[i] = _mm512_fmadd_ps(f, f, acc[i]);
  }
  __m512 t = acc[0];
  for (int i = 1; i < 16; ++i) t = _mm512_add_ps(t, acc[i]);
  return _mm512_reduce_add_ps(t);
}
}  // namespace

bool bf16_dot_slow() {
  static const bool slow = [] {
    double best[2] = {1e30, 1e30};
    volatile float sink = 0.f;
    for (int rep = 0; rep < 5; ++rep)
      for (int k = 0; k < 2; ++k) {
        const auto t0 = std::chrono::steady_clock::now();
        sink = sink + chains(k == 0, 2000);
        best[k] = std::min(best[k], std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
      }
    // The fp32 tiles do 16 MACs per FMA, vdpbf16ps 32: widening pays when one vdpbf16ps takes more than
    // ~2.2 FMA times (the widening itself costs ~10%).
    return best[0] > 2.2 * best[1];
  }();
  return slow;
}

}  // namespace vllm_doge
