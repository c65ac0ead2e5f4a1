// Keep-window ops on the DOGE_ATTN page (common.h) of a keep-window layer, whose page carries one more
// field after the fp32 bias [C][BS]: the int32 original position [BS] of the key each slot holds, at byte
// offset 2*BS*d*e + 4*C*BS (cell = (2*d*e + 4*C + 4) / e elements).
//
// A key's rank is (bias, -position): higher bias ranks higher, equal biases (compared exactly) rank the
// earlier key higher. A query at i keeps its top W keys of K_{i-1} ∪ {i} (all of them while i < W). After
// the step that processed position p, the slots max(0, p-W+1) .. p of each (request, kv head) hold K_p.
// Nothing here reads a slot below max(0, p0 - W) of a chunk starting at p0 (vLLM frees those blocks).
//
//   keep_window_positions  write the int32 positions beside the K/V/bias that cache_write stored
//   keep_window_decode     one query at p >= W: the lowest-ranked key of slots p-W .. p leaves; slot p-W's
//                          entry moves onto its slot, so slots p-W+1 .. p hold K_p for the windowed op
//   keep_window_prefill    chunks (q_len > 1): exact rows over each query's kept set, then K_{p1} packed
//                          into slots max(0, p1-W+1) .. p1
//
// Prefill paths (VLLM_DOGE_ISA = auto | portable | avx2 | avx512, read at every call; avx2 runs the portable
// one): portable C++, or AVX-512 tiles (fp32 FMA; bf16 scores on vdpbf16ps unless VLLM_DOGE_KW_BF16=widen),
// with a vectorised exp.
// Inputs of any dtype become exact fp32 products; scores, softmax and P.V accumulate in fp32.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <functional>
#include <limits>
#include <queue>
#include <string>
#include <vector>

#include "common.h"
#include "vec_avx512.h"

namespace vllm_doge {
namespace {

// ------------------------------------------------------------------------------------------- the page

struct KwCache {
  Geometry geo;
  int64_t e;        // element size in bytes
  int64_t kv;       // kv heads
  int64_t pos_off;  // byte offset of the positions inside a page
  char* base;
  int64_t cs0, cs1;  // page strides in bytes (block, kv head)

  char* page_of_block(int64_t blk, int64_t g) const { return base + blk * cs0 + g * cs1; }
  float bias(const char* page, int off) const {  // channel 0 (keep-window layers have C = 1)
    float b;
    std::memcpy(&b, page + geo.bias_byte_off() + int64_t(off) * 4, 4);
    return b;
  }
  int32_t pos(const char* page, int off) const {
    int32_t p;
    std::memcpy(&p, page + pos_off + int64_t(off) * 4, 4);
    return p;
  }
};

Dt dtype_of(const at::Tensor& t) {
  if (t.scalar_type() == at::kFloat) return Dt::f32;
  if (t.scalar_type() == at::kBFloat16) return Dt::bf16;
  TORCH_CHECK(t.scalar_type() == at::kHalf, "keep_window: the cache dtype must be fp32, bf16 or fp16");
  return Dt::f16;
}

KwCache check_cache(const at::Tensor& cache, int64_t d, int64_t C) {
  TORCH_CHECK(cache.device().is_cpu(), "keep_window: the cache must be a CPU tensor");
  TORCH_CHECK(cache.dim() == 4, "keep_window: cache must be [num_blocks, KV, BS, cell]");
  const Dt dt = dtype_of(cache);
  const int64_t e = cache.element_size(), bs = cache.size(2);
  TORCH_CHECK(d > 0 && d % 2 == 0 && bs % 2 == 0, "keep_window: head_dim and block size must be even");
  TORCH_CHECK(C >= 1, "keep_window: bias_channels must be >= 1");
  TORCH_CHECK(cache.size(3) * e == 2 * d * e + 4 * C + 4, "keep_window: cache cell of ", cache.size(3),
              " elements does not match head_dim ", d, ", ", C, " bias channel(s) and the int32 position");
  TORCH_CHECK(cache.stride(3) == 1 && cache.stride(2) == cache.size(3),
              "keep_window: each cache page must be contiguous");
  KwCache kc;
  kc.geo = Geometry{dt, int(d), int(bs), int(C)};
  kc.e = e;
  kc.kv = cache.size(1);
  kc.pos_off = kc.geo.bias_byte_off() + 4 * C * bs;
  kc.base = reinterpret_cast<char*>(cache.data_ptr());
  kc.cs0 = cache.stride(0) * e;
  kc.cs1 = cache.stride(1) * e;
  return kc;
}

struct Batch {
  const int32_t* qsl;
  const int32_t* seq_lens;
  const int32_t* bt;
  int64_t bt_s0;
  int64_t B;
  int q_len(int64_t b) const { return qsl[b + 1] - qsl[b]; }
};

Batch check_batch(const at::Tensor& qsl, const at::Tensor& seq_lens, const at::Tensor& block_table) {
  TORCH_CHECK(qsl.scalar_type() == at::kInt && qsl.dim() == 1 && qsl.is_contiguous(),
              "keep_window: query_start_loc must be a contiguous int32 [B+1]");
  TORCH_CHECK(seq_lens.scalar_type() == at::kInt && seq_lens.dim() == 1 && seq_lens.is_contiguous() &&
                  seq_lens.size(0) + 1 <= qsl.size(0),
              "keep_window: seq_lens must be a contiguous int32 [B]");
  TORCH_CHECK(block_table.scalar_type() == at::kInt && block_table.dim() == 2 && block_table.stride(1) == 1 &&
                  block_table.size(0) >= seq_lens.size(0),
              "keep_window: block_table must be int32 [B, max_blocks] with contiguous rows");
  return Batch{qsl.data_ptr<int32_t>(), seq_lens.data_ptr<int32_t>(), block_table.data_ptr<int32_t>(),
               block_table.stride(0), seq_lens.size(0)};
}

// The page and offset of logical slot s of request b, kv head g.
inline char* slot_page(const KwCache& kc, const Batch& bt, int64_t b, int64_t s, int64_t g) {
  return kc.page_of_block(bt.bt[b * bt.bt_s0 + s / kc.geo.bs], g);
}

// Larger = ranks higher: the bias's bits made monotone (exact comparison, -0 == +0), then the earlier
// position. Biases are > 0, so every key of a real bias is >= 2^63 > 0, and 0 means "no threshold".
inline uint64_t rank_key(float bias, int32_t pos) {
  if (bias == 0.0f) bias = 0.0f;
  uint32_t u;
  std::memcpy(&u, &bias, 4);
  u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return (uint64_t(u) << 32) | uint64_t(~uint32_t(pos));
}

// Copy a whole entry (K, V, bias channels, position) of slot `so` of page `src` onto slot `dof` of `dst`.
template <typename E>
void copy_entry(const KwCache& kc, const char* src, int so, char* dst, int dof) {
  const Geometry& geo = kc.geo;
  const E* s = reinterpret_cast<const E*>(src);
  E* d = reinterpret_cast<E*>(dst);
  for (int c = 0; c < geo.d; ++c) d[geo.k_off(dof, c)] = s[geo.k_off(so, c)];
  for (int c = 0; c < geo.d; ++c) d[geo.v_off(dof, c)] = s[geo.v_off(so, c)];
  const int64_t bo = geo.bias_byte_off();
  for (int c = 0; c < geo.c; ++c)
    std::memcpy(dst + bo + (int64_t(c) * geo.bs + dof) * 4, src + bo + (int64_t(c) * geo.bs + so) * 4, 4);
  std::memcpy(dst + kc.pos_off + int64_t(dof) * 4, src + kc.pos_off + int64_t(so) * 4, 4);
}

void copy_slot(const KwCache& kc, const char* src, int so, char* dst, int dof) {
  if (kc.e == 4)
    copy_entry<uint32_t>(kc, src, so, dst, dof);
  else
    copy_entry<uint16_t>(kc, src, so, dst, dof);
}

// ----------------------------------------------------------------------------------------- positions

void keep_window_positions(at::Tensor& cache, const at::Tensor& positions, const at::Tensor& slot_mapping,
                           int64_t head_dim, int64_t bias_channels) {
  const KwCache kc = check_cache(cache, head_dim, bias_channels);
  TORCH_CHECK(slot_mapping.dim() == 1 && slot_mapping.scalar_type() == at::kLong,
              "keep_window_positions: slot_mapping must be int64 [T]");
  TORCH_CHECK(positions.dim() == 1 && positions.size(0) == slot_mapping.size(0) &&
                  (positions.scalar_type() == at::kLong || positions.scalar_type() == at::kInt),
              "keep_window_positions: positions must be int64 or int32 [T]");
  const at::Tensor pos = positions.to(at::kLong).contiguous();
  const at::Tensor slots = slot_mapping.contiguous();
  const int64_t* pp = pos.data_ptr<int64_t>();
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t T = slots.size(0), bs = kc.geo.bs;
  at::parallel_for(0, T, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t slot = sp[t];
      if (slot < 0) continue;
      const int32_t v = int32_t(pp[t]);
      for (int64_t g = 0; g < kc.kv; ++g)
        std::memcpy(kc.page_of_block(slot / bs, g) + kc.pos_off + (slot % bs) * 4, &v, 4);
    }
  });
}

// -------------------------------------------------------------------------------------------- decode

void keep_window_decode(at::Tensor& cache, const at::Tensor& query_start_loc, const at::Tensor& seq_lens,
                        const at::Tensor& block_table, int64_t window, int64_t head_dim) {
  const KwCache kc = check_cache(cache, head_dim, 1);
  const Batch bt = check_batch(query_start_loc, seq_lens, block_table);
  TORCH_CHECK(window >= 1, "keep_window_decode: window must be >= 1");
  const int64_t W = window, KV = kc.kv, bs = kc.geo.bs;
  at::parallel_for(0, bt.B * KV, std::max<int64_t>(1, 2048 / (W + 1)), [&](int64_t begin, int64_t end) {
    for (int64_t it = begin; it < end; ++it) {
      const int64_t b = it / KV, g = it % KV;
      if (bt.q_len(b) != 1) continue;
      const int64_t p = int64_t(bt.seq_lens[b]) - 1;
      if (p < W) continue;
      // The lowest rank among slots p-W .. p (K_{p-1} and the new key).
      int64_t low = p - W;
      uint64_t low_rank = std::numeric_limits<uint64_t>::max();
      for (int64_t s = p - W; s <= p;) {  // block by block: the bias and position rows are contiguous
        const char* pg = slot_page(kc, bt, b, s, g);
        const float* bias = reinterpret_cast<const float*>(pg + kc.geo.bias_byte_off());
        const int32_t* pos = reinterpret_cast<const int32_t*>(pg + kc.pos_off);
        const int off0 = int(s % bs), off1 = int(std::min<int64_t>(bs - 1, off0 + (p - s)));
        for (int off = off0; off <= off1; ++off) {
          const uint64_t r = rank_key(bias[off], pos[off]);
          if (r < low_rank) {
            low_rank = r;
            low = s + (off - off0);
          }
        }
        s += off1 - off0 + 1;
      }
      if (low != p - W)
        copy_slot(kc, slot_page(kc, bt, b, p - W, g), int((p - W) % bs), slot_page(kc, bt, b, low, g),
                  int(low % bs));
    }
  });
}

// ------------------------------------------------------------------------------------------- prefill

constexpr int kQueryBlock = 32;  // query positions per work item (times G stacked heads)

enum class KwPath { portable, avx512 };

#if defined(__x86_64__)
bool kw_cpu_has_avx512bf16() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
  return ok;
}
#endif

// VLLM_DOGE_ISA, read at every call: auto | portable | avx2 | avx512 (as the main library; these ops have no
// AVX2 path: avx2 runs the portable one).
KwPath current_path() {
  const char* env = std::getenv("VLLM_DOGE_ISA");
  const std::string want = env && *env ? env : "auto";
  TORCH_CHECK(want == "auto" || want == "portable" || want == "avx2" || want == "avx512",
              "VLLM_DOGE_ISA must be auto, portable, avx2 or avx512, not '", want, "'");
#if defined(__x86_64__)
  const bool has = kw_cpu_has_avx512bf16();
#else
  const bool has = false;
#endif
  if (want == "portable" || want == "avx2") return KwPath::portable;
  if (want == "avx512") {
    TORCH_CHECK(has, "VLLM_DOGE_ISA=avx512 but this CPU lacks avx512f/bw/vl/bf16");
    return KwPath::avx512;
  }
  return has ? KwPath::avx512 : KwPath::portable;
}

// bf16 scores on the fast path: vdpbf16ps on channel pairs ("dot"), or K widened to fp32 in the gather and
// the fp32 tiles ("widen"). VLLM_DOGE_KW_BF16 = auto | dot | widen, read at every call; auto: dot (both
// ran at the same speed on an Intel Xeon with AVX512_BF16, where P.V and the gathers dominate).
bool bf16_scores_on_dot() {
  const char* env = std::getenv("VLLM_DOGE_KW_BF16");
  const std::string want = env && *env ? env : "auto";
  TORCH_CHECK(want == "auto" || want == "dot" || want == "widen", "VLLM_DOGE_KW_BF16 must be auto, dot or widen, not '",
              want, "'");
  return want != "widen";
}

inline void from_f32(Dt dt, char* base, int64_t idx, float x) {
  if (dt == Dt::f32) {
    std::memcpy(base + idx * 4, &x, 4);
  } else if (dt == Dt::bf16) {
    const c10::BFloat16 v(x);  // round to nearest even
    std::memcpy(base + idx * 2, &v.x, 2);
  } else {
    const c10::Half v(x);
    std::memcpy(base + idx * 2, &v.x, 2);
  }
}

// Portable math. S[m][n] = sum_c Q[m][c] Kt[c][n] (rows padded to 4, keys to 32); O[m] = sum_n P[m][n] V[n].
void scores_portable(const float* Q, int R4, int d, const float* Kt, int np, float* S) {
  for (int m = 0; m < R4; m += 4) {
    float* __restrict s0 = S + int64_t(m) * np;
    float* __restrict s1 = s0 + np;
    float* __restrict s2 = s1 + np;
    float* __restrict s3 = s2 + np;
    for (int n = 0; n < np; ++n) s0[n] = s1[n] = s2[n] = s3[n] = 0.0f;
    for (int c = 0; c < d; ++c) {
      const float* __restrict k = Kt + int64_t(c) * np;
      const float q0 = Q[int64_t(m) * d + c], q1 = Q[int64_t(m + 1) * d + c];
      const float q2 = Q[int64_t(m + 2) * d + c], q3 = Q[int64_t(m + 3) * d + c];
      for (int n = 0; n < np; ++n) {
        const float kv = k[n];
        s0[n] += q0 * kv;
        s1[n] += q1 * kv;
        s2[n] += q2 * kv;
        s3[n] += q3 * kv;
      }
    }
  }
}

void pv_portable(const float* P, int R, int np, int n, const float* V, int d, float* O) {
  for (int m = 0; m < R; ++m) {
    float* __restrict o = O + int64_t(m) * d;
    const float* p = P + int64_t(m) * np;
    for (int c = 0; c < d; ++c) o[c] = 0.0f;
    for (int j = 0; j < n; ++j) {
      const float w = p[j];
      if (w == 0.0f) continue;
      const float* __restrict v = V + int64_t(j) * d;
      for (int c = 0; c < d; ++c) o[c] += w * v[c];
    }
  }
}

#if defined(__x86_64__)
#define KW_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

// fp32 scores, 4 rows x 32 keys per tile.
KW_AVX512 void scores_f32_avx512(const float* Q, int R4, int d, const float* Kt, int np, float* S) {
  for (int m = 0; m < R4; m += 4) {
    for (int n0 = 0; n0 < np; n0 += 32) {
      __m512 acc[4][2];
      for (int r = 0; r < 4; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
      for (int c = 0; c < d; ++c) {
        const __m512 k0 = _mm512_loadu_ps(Kt + int64_t(c) * np + n0);
        const __m512 k1 = _mm512_loadu_ps(Kt + int64_t(c) * np + n0 + 16);
        for (int r = 0; r < 4; ++r) {
          const __m512 q = _mm512_set1_ps(Q[int64_t(m + r) * d + c]);
          acc[r][0] = _mm512_fmadd_ps(q, k0, acc[r][0]);
          acc[r][1] = _mm512_fmadd_ps(q, k1, acc[r][1]);
        }
      }
      for (int r = 0; r < 4; ++r) {
        _mm512_storeu_ps(S + int64_t(m + r) * np + n0, acc[r][0]);
        _mm512_storeu_ps(S + int64_t(m + r) * np + n0 + 16, acc[r][1]);
      }
    }
  }
}

KW_AVX512 inline __m512bh kw_as_bh(__m512i x) { return (__m512bh)x; }

// bf16 scores with vdpbf16ps: Qp [R4][d/2] channel pairs, K16 [d/2][np] channel pairs (both as uint32).
// The products are exact in fp32 and summed in fp32.
KW_AVX512 void scores_bf16_avx512(const uint32_t* Qp, int R4, int d, const uint32_t* K16, int np, float* S) {
  const int d2 = d / 2;
  for (int m = 0; m < R4; m += 4) {
    for (int n0 = 0; n0 < np; n0 += 32) {
      __m512 acc[4][2];
      for (int r = 0; r < 4; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
      for (int c2 = 0; c2 < d2; ++c2) {
        const uint32_t* kp = K16 + int64_t(c2) * np + n0;
        const __m512i k0 = _mm512_loadu_si512(kp);
        const __m512i k1 = _mm512_loadu_si512(kp + 16);
        for (int r = 0; r < 4; ++r) {
          const __m512i q = _mm512_set1_epi32(int(Qp[int64_t(m + r) * d2 + c2]));
          acc[r][0] = _mm512_dpbf16_ps(acc[r][0], kw_as_bh(k0), kw_as_bh(q));
          acc[r][1] = _mm512_dpbf16_ps(acc[r][1], kw_as_bh(k1), kw_as_bh(q));
        }
      }
      for (int r = 0; r < 4; ++r) {
        _mm512_storeu_ps(S + int64_t(m + r) * np + n0, acc[r][0]);
        _mm512_storeu_ps(S + int64_t(m + r) * np + n0 + 16, acc[r][1]);
      }
    }
  }
}

// O[m] = sum_j P[m][j] V[j] in fp32 (d % 16 == 0): tiles of 4 rows x 64 channels in registers, so each
// V row loaded serves 4 rows; a key all 4 rows give weight 0 is skipped.
KW_AVX512 void pv_avx512(const float* P, int R, int np, int n, const float* V, int d, float* O) {
  for (int m = 0; m < R; m += 4) {
    const int mr = std::min(4, R - m);
    const float* p[4];
    for (int r = 0; r < 4; ++r) p[r] = P + int64_t(m + std::min(r, mr - 1)) * np;
    for (int c0 = 0; c0 < d; c0 += 64) {
      const int nv = std::min(64, d - c0) / 16;
      __m512 acc[4][4];
      for (int r = 0; r < 4; ++r)
        for (int u = 0; u < 4; ++u) acc[r][u] = _mm512_setzero_ps();
      for (int j = 0; j < n; ++j) {
        const float w0 = p[0][j], w1 = p[1][j], w2 = p[2][j], w3 = p[3][j];
        if (w0 == 0.0f && w1 == 0.0f && w2 == 0.0f && w3 == 0.0f) continue;
        const __m512 b0 = _mm512_set1_ps(w0), b1 = _mm512_set1_ps(w1), b2 = _mm512_set1_ps(w2), b3 = _mm512_set1_ps(w3);
        const float* v = V + int64_t(j) * d + c0;
        for (int u = 0; u < nv; ++u) {
          const __m512 vv = _mm512_loadu_ps(v + 16 * u);
          acc[0][u] = _mm512_fmadd_ps(b0, vv, acc[0][u]);
          acc[1][u] = _mm512_fmadd_ps(b1, vv, acc[1][u]);
          acc[2][u] = _mm512_fmadd_ps(b2, vv, acc[2][u]);
          acc[3][u] = _mm512_fmadd_ps(b3, vv, acc[3][u]);
        }
      }
      for (int r = 0; r < mr; ++r)
        for (int u = 0; u < nv; ++u) _mm512_storeu_ps(O + int64_t(m + r) * d + c0 + 16 * u, acc[r][u]);
    }
  }
}
#endif

// Per-thread buffers of one work item: n candidates padded to np, R query rows (padded to R4).
struct ItemBuffers {
  std::vector<int64_t> cslot;   // [np] logical slot (visibility: query i sees slots <= i)
  std::vector<uint64_t> crank;  // [np] rank keys
  std::vector<float> cbias;     // [np]
  std::vector<float> Kt;        // [d][np] fp32 keys (unless K16)
  std::vector<uint32_t> K16;    // [d/2][np] bf16 channel pairs (vdpbf16ps path)
  std::vector<float> V;         // [n][d] fp32 values
  std::vector<float> Q;         // [R4][d] fp32 rows (unless Qp)
  std::vector<uint32_t> Qp;     // [R4][d/2] bf16 channel pairs
  std::vector<float> S, O, inv;
};

template <Dt DT>
inline float load_f32(const char* base, int64_t idx) {
  if constexpr (DT == Dt::f32) {
    float f;
    std::memcpy(&f, base + idx * 4, 4);
    return f;
  } else {
    uint16_t h;
    std::memcpy(&h, base + idx * 2, 2);
    if constexpr (DT == Dt::bf16) {
      const uint32_t u = uint32_t(h) << 16;
      float f;
      std::memcpy(&f, &u, 4);
      return f;
    } else {
      return c10::detail::fp16_ieee_to_fp32_value(h);
    }
  }
}

// The candidates' K (transposed, fp32 or bf16 pairs), V (fp32), bias, and the item's query rows
// m = r * G + hg (zero-padded to R4).
template <Dt DT>
void gather(const KwCache& kc, const Batch& bt, int64_t b, int64_t g, ItemBuffers& buf, int n, int np, bool pairs,
            const char* q0, int64_t qs0, int64_t qs1, int rows, int G, int R4) {
  const Geometry& geo = kc.geo;
  const int d = geo.d, bs = geo.bs;
  buf.cbias.assign(np, 0.0f);
  buf.V.resize(size_t(n) * d);
  if (pairs)
    buf.K16.assign(size_t(np) * (d / 2), 0);
  else
    buf.Kt.assign(size_t(np) * d, 0.0f);
  for (int j = 0; j < n; ++j) {
    const int64_t s = buf.cslot[j];
    const char* pg = slot_page(kc, bt, b, s, g);
    const int off = int(s % bs);
    buf.cbias[j] = kc.bias(pg, off);
    float* v = buf.V.data() + size_t(j) * d;
    const int64_t v0 = geo.v_off(off, 0);  // channels of one token: stride 1 (fp32) or 2 (16-bit)
    const int vstride = DT == Dt::f32 ? 1 : 2;
    for (int ch = 0; ch < d; ++ch) v[ch] = load_f32<DT>(pg, v0 + int64_t(ch) * vstride);
    if (pairs) {  // K pairs (2c, 2c+1) of token off are one uint32 at ((c * bs) + off) * 2 elements
      const uint32_t* kp = reinterpret_cast<const uint32_t*>(pg);
      for (int c2 = 0; c2 < d / 2; ++c2) buf.K16[size_t(c2) * np + j] = kp[int64_t(c2) * bs + off];
    } else {
      for (int ch = 0; ch < d; ++ch) buf.Kt[size_t(ch) * np + j] = load_f32<DT>(pg, geo.k_off(off, ch));
    }
  }
  constexpr int64_t e = DT == Dt::f32 ? 4 : 2;
  if (pairs) {
    buf.Qp.assign(size_t(R4) * (d / 2), 0);
    for (int r = 0; r < rows; ++r)
      for (int hg = 0; hg < G; ++hg)
        std::memcpy(&buf.Qp[size_t(r * G + hg) * (d / 2)], q0 + (r * qs0 + hg * qs1) * e, size_t(d) * 2);
  } else {
    buf.Q.assign(size_t(R4) * d, 0.0f);
    for (int r = 0; r < rows; ++r)
      for (int hg = 0; hg < G; ++hg) {
        const char* qr = q0 + (r * qs0 + hg * qs1) * e;
        float* q = buf.Q.data() + size_t(r * G + hg) * d;
        for (int ch = 0; ch < d; ++ch) q[ch] = load_f32<DT>(qr, ch);
      }
  }
}

// Row m (query position a + m / G) keeps candidate j iff cslot[j] <= i and crank[j] >= thr[m / G]; its
// scores scale * q.k + bias become softmax weights (unnormalised; inv[m] = 1 / sum).
void softmax_portable(ItemBuffers& buf, int R, int G, int np, int n, int64_t a, const uint64_t* thr, float scale) {
  for (int m = 0; m < R; ++m) {
    const int64_t i = a + m / G;
    const uint64_t t = thr[m / G];
    float* s = buf.S.data() + size_t(m) * np;
    float mx = -std::numeric_limits<float>::infinity();
    for (int j = 0; j < n; ++j)
      if (buf.cslot[j] <= i && buf.crank[j] >= t) mx = std::max(mx, s[j] * scale + buf.cbias[j]);
    float sum = 0.0f;
    for (int j = 0; j < np; ++j) {
      float w = 0.0f;
      if (j < n && buf.cslot[j] <= i && buf.crank[j] >= t) w = std::exp((s[j] * scale + buf.cbias[j]) - mx);
      s[j] = w;
      sum += w;
    }
    buf.inv[m] = 1.0f / sum;
  }
}

#if defined(__x86_64__)

KW_AVX512 inline __mmask16 keep_mask(const ItemBuffers& buf, int j, __m512i iv, __m512i tv) {
  const __m512i s0 = _mm512_loadu_si512(buf.cslot.data() + j), s1 = _mm512_loadu_si512(buf.cslot.data() + j + 8);
  const __m512i r0 = _mm512_loadu_si512(buf.crank.data() + j), r1 = _mm512_loadu_si512(buf.crank.data() + j + 8);
  const __mmask8 lo = _mm512_cmple_epi64_mask(s0, iv) & _mm512_cmpge_epu64_mask(r0, tv);
  const __mmask8 hi = _mm512_cmple_epi64_mask(s1, iv) & _mm512_cmpge_epu64_mask(r1, tv);
  return __mmask16(lo) | __mmask16(__mmask16(hi) << 8);
}

KW_AVX512 void softmax_avx512(ItemBuffers& buf, int R, int G, int np, int64_t a, const uint64_t* thr, float scale) {
  const __m512 sc = _mm512_set1_ps(scale), ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int m = 0; m < R; ++m) {
    const __m512i iv = _mm512_set1_epi64(a + m / G);
    const __m512i tv = _mm512_set1_epi64(int64_t(thr[m / G]));
    float* s = buf.S.data() + size_t(m) * np;
    __m512 mx = ninf;
    for (int j = 0; j < np; j += 16) {
      const __mmask16 k = keep_mask(buf, j, iv, tv);
      const __m512 x = _mm512_fmadd_ps(_mm512_loadu_ps(s + j), sc, _mm512_loadu_ps(buf.cbias.data() + j));
      mx = _mm512_mask_max_ps(mx, k, mx, x);
    }
    const __m512 mv = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
    __m512 sum = _mm512_setzero_ps();
    for (int j = 0; j < np; j += 16) {
      const __mmask16 k = keep_mask(buf, j, iv, tv);
      const __m512 x = _mm512_fmadd_ps(_mm512_loadu_ps(s + j), sc, _mm512_loadu_ps(buf.cbias.data() + j));
      const __m512 w = _mm512_maskz_mov_ps(k, exp_ps(_mm512_sub_ps(x, mv)));
      _mm512_storeu_ps(s + j, w);
      sum = _mm512_add_ps(sum, w);
    }
    buf.inv[m] = 1.0f / _mm512_reduce_add_ps(sum);
  }
}
#endif

// Per (request, kv head) of a prefill chunk: slots lo .. p1, their ranks, each query's rank threshold.
struct Chunk {
  int64_t b, g, p0, p1, lo, row0;  // row0: the request's first query row
  std::vector<uint64_t> rank;       // [p1 - lo + 1]
  std::vector<uint64_t> thr;        // [p1 - p0 + 1]: query i keeps visible keys with rank >= thr
};

void keep_window_prefill(at::Tensor& out, const at::Tensor& query, at::Tensor& cache,
                         const at::Tensor& query_start_loc, const at::Tensor& seq_lens, const at::Tensor& block_table,
                         double scale, int64_t window) {
  TORCH_CHECK(query.dim() == 3 && query.stride(2) == 1,
              "keep_window_prefill: query must be [T, H, d], last dim contiguous");
  TORCH_CHECK(out.sizes() == query.sizes() && out.stride(2) == 1 && out.scalar_type() == query.scalar_type(),
              "keep_window_prefill: out must be [T, H, d] like query, last dim contiguous");
  TORCH_CHECK(query.scalar_type() == cache.scalar_type(), "keep_window_prefill: query dtype must be the cache dtype");
  TORCH_CHECK(window >= 1, "keep_window_prefill: window must be >= 1");
  const int64_t d = query.size(2), H = query.size(1);
  const KwCache kc = check_cache(cache, d, 1);
  const Batch bt = check_batch(query_start_loc, seq_lens, block_table);
  const int64_t KV = kc.kv, W = window, bs = kc.geo.bs;
  TORCH_CHECK(H % KV == 0, "keep_window_prefill: heads must be a multiple of kv heads");
  const int64_t G = H / KV;
  const Dt dt = kc.geo.dt;
  const KwPath path = current_path();
  const float fscale = float(scale);

  // Phase 1: ranks and thresholds, per (request, kv head).
  std::vector<Chunk> chunks;
  for (int64_t b = 0; b < bt.B; ++b) {
    const int ql = bt.q_len(b);
    if (ql <= 1) continue;
    const int64_t p1 = int64_t(bt.seq_lens[b]) - 1, p0 = p1 - ql + 1;
    TORCH_CHECK(p0 >= 0, "keep_window_prefill: seq_len shorter than the query rows");
    for (int64_t g = 0; g < KV; ++g) {
      Chunk c;
      c.b = b, c.g = g, c.p0 = p0, c.p1 = p1, c.lo = std::max<int64_t>(0, p0 - W), c.row0 = bt.qsl[b];
      chunks.push_back(std::move(c));
    }
  }
  if (chunks.empty()) return;
  at::parallel_for(0, int64_t(chunks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t ci = begin; ci < end; ++ci) {
      Chunk& c = chunks[ci];
      const int64_t n = c.p1 - c.lo + 1;
      c.rank.resize(n);
      c.thr.resize(c.p1 - c.p0 + 1);
      for (int64_t s = c.lo; s <= c.p1; ++s) {
        const char* pg = slot_page(kc, bt, c.b, s, c.g);
        c.rank[s - c.lo] = rank_key(kc.bias(pg, int(s % bs)), kc.pos(pg, int(s % bs)));
      }
      std::priority_queue<uint64_t, std::vector<uint64_t>, std::greater<uint64_t>> heap(
          c.rank.begin(), c.rank.begin() + (c.p0 - c.lo));  // K_{p0-1}: every slot below p0
      for (int64_t i = c.p0; i <= c.p1; ++i) {
        heap.push(c.rank[i - c.lo]);
        if (int64_t(heap.size()) > W) heap.pop();
        c.thr[i - c.p0] = int64_t(heap.size()) >= W ? heap.top() : 0;
      }
    }
  });

  // Phase 2: output rows, per (chunk, block of query positions).
  struct Item {
    int64_t ci, a, e;
  };
  std::vector<Item> items;
  for (int64_t ci = 0; ci < int64_t(chunks.size()); ++ci)
    for (int64_t a = chunks[ci].p0; a <= chunks[ci].p1; a += kQueryBlock)
      items.push_back({ci, a, std::min(chunks[ci].p1 + 1, a + kQueryBlock)});

  const char* qbase = reinterpret_cast<const char*>(query.data_ptr());
  char* obase = reinterpret_cast<char*>(out.data_ptr());
  const int64_t qs0 = query.stride(0), qs1 = query.stride(1), os0 = out.stride(0), os1 = out.stride(1);
  const bool fast = path == KwPath::avx512;
  const bool dp_bf16 = fast && dt == Dt::bf16 && bf16_scores_on_dot();
  const bool pv_fast = fast && d % 16 == 0;

  at::parallel_for(0, int64_t(items.size()), 1, [&](int64_t begin, int64_t end) {
    ItemBuffers buf;
    for (int64_t itx = begin; itx < end; ++itx) {
      const Item& item = items[itx];
      const Chunk& c = chunks[item.ci];
      const uint64_t thr_start = item.a == c.p0 ? 0 : c.thr[item.a - 1 - c.p0];
      // Candidates: K_{a-1} (visible keys below a at or above a-1's threshold) and the block's own keys,
      // padded to a multiple of 32 with entries no query keeps (slot INT64_MAX, rank 0).
      buf.cslot.clear();
      buf.crank.clear();
      for (int64_t s = c.lo; s < item.e; ++s) {
        const uint64_t r = c.rank[s - c.lo];
        if (s >= item.a || r >= thr_start) {
          buf.cslot.push_back(s);
          buf.crank.push_back(r);
        }
      }
      const int n = int(buf.cslot.size());
      const int np = (n + 31) / 32 * 32;
      buf.cslot.resize(np, std::numeric_limits<int64_t>::max());
      buf.crank.resize(np, 0);
      const int rows = int(item.e - item.a), R = rows * int(G), R4 = (R + 3) / 4 * 4;
      const char* q0 = qbase + ((c.row0 + (item.a - c.p0)) * qs0 + c.g * G * qs1) * kc.e;
      if (dt == Dt::f32)
        gather<Dt::f32>(kc, bt, c.b, c.g, buf, n, np, false, q0, qs0, qs1, rows, int(G), R4);
      else if (dt == Dt::bf16)
        gather<Dt::bf16>(kc, bt, c.b, c.g, buf, n, np, dp_bf16, q0, qs0, qs1, rows, int(G), R4);
      else
        gather<Dt::f16>(kc, bt, c.b, c.g, buf, n, np, false, q0, qs0, qs1, rows, int(G), R4);
      buf.S.assign(size_t(R4) * np, 0.0f);
      buf.inv.assign(R, 0.0f);
      buf.O.assign(size_t(R) * d, 0.0f);
      const int64_t first = item.a - c.p0;  // threshold index of row 0
#if defined(__x86_64__)
      if (fast) {
        if (dp_bf16)
          scores_bf16_avx512(buf.Qp.data(), R4, int(d), buf.K16.data(), np, buf.S.data());
        else
          scores_f32_avx512(buf.Q.data(), R4, int(d), buf.Kt.data(), np, buf.S.data());
        softmax_avx512(buf, R, int(G), np, item.a, c.thr.data() + first, fscale);
        if (pv_fast)
          pv_avx512(buf.S.data(), R, np, n, buf.V.data(), int(d), buf.O.data());
        else
          pv_portable(buf.S.data(), R, np, n, buf.V.data(), int(d), buf.O.data());
      } else
#endif
      {
        scores_portable(buf.Q.data(), R4, int(d), buf.Kt.data(), np, buf.S.data());
        softmax_portable(buf, R, int(G), np, n, item.a, c.thr.data() + first, fscale);
        pv_portable(buf.S.data(), R, np, n, buf.V.data(), int(d), buf.O.data());
      }
      for (int r = 0; r < rows; ++r)
        for (int hg = 0; hg < G; ++hg) {
          const int m = r * int(G) + hg;
          char* orow = obase + ((c.row0 + (item.a - c.p0) + r) * os0 + (c.g * G + hg) * os1) * kc.e;
          for (int ch = 0; ch < d; ++ch) from_f32(dt, orow, ch, buf.O[size_t(m) * d + ch] * buf.inv[m]);
        }
    }
  });

  // Phase 3: pack K_{p1} into slots p1-W+1 .. p1 (only chunks ending at or past W). The k-th kept slot in
  // ascending order is at most its target p1-W+1+k (W-1-k kept slots lie above it, all <= p1), so moving
  // them in descending order never overwrites a kept entry that is still to be moved.
  at::parallel_for(0, int64_t(chunks.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> kept;
    for (int64_t ci = begin; ci < end; ++ci) {
      const Chunk& c = chunks[ci];
      if (c.p1 < W) continue;
      const uint64_t t = c.thr.back();
      kept.clear();
      for (int64_t s = c.lo; s <= c.p1; ++s)
        if (c.rank[s - c.lo] >= t) kept.push_back(s);
      if (int64_t(kept.size()) != W) continue;  // cannot happen with distinct positions
      for (int64_t k = W - 1; k >= 0; --k) {
        const int64_t src = kept[k], dst = c.p1 - W + 1 + k;
        if (src == dst) continue;
        copy_slot(kc, slot_page(kc, bt, c.b, src, c.g), int(src % bs), slot_page(kc, bt, c.b, dst, c.g),
                  int(dst % bs));
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(vllm_doge, m) {
  m.def("keep_window_positions(Tensor(a!) cache, Tensor positions, Tensor slot_mapping, int head_dim, "
        "int bias_channels) -> ()");
  m.def("keep_window_decode(Tensor(a!) cache, Tensor query_start_loc, Tensor seq_lens, Tensor block_table, "
        "int window, int head_dim) -> ()");
  m.def("keep_window_prefill(Tensor(a!) out, Tensor query, Tensor(a!) cache, Tensor query_start_loc, "
        "Tensor seq_lens, Tensor block_table, float scale, int window) -> ()");
}

TORCH_LIBRARY_IMPL(vllm_doge, CPU, m) {
  m.impl("keep_window_positions", &keep_window_positions);
  m.impl("keep_window_decode", &keep_window_decode);
  m.impl("keep_window_prefill", &keep_window_prefill);
}

}  // namespace vllm_doge
