// Portable attention: plain C++ over the page layout, fp32 accumulation, any even head_dim, any dtype.
// The reference every vector path must agree with, and the path of machines without AVX-512.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "common.h"

namespace vllm_doge {
namespace {

template <typename T>
void attend(const Params& p, const Item& it, const Scratch& sc, const Partials& parts) {
  const Geometry& geo = p.geo;
  const int d = geo.d, bs = geo.bs, G = p.group;
  const int M = it.nrows * G;
  const int seq = p.seq_lens[it.b], ctx = p.ctx(it.b), tok0 = p.qsl[it.b] + it.row0;
  const float inf = std::numeric_limits<float>::infinity();

  for (int m = 0; m < M; ++m) {
    const T* q = reinterpret_cast<const T*>(p.q) + (tok0 + m / G) * p.q_s0 + (it.g * G + m % G) * p.q_s1;
    for (int c = 0; c < d; ++c) sc.q[m * d + c] = float(q[c]);
    std::fill(sc.o + m * d, sc.o + (m + 1) * d, 0.f);
    sc.mx[m] = -inf;
    sc.sum[m] = 0.f;
  }
  for (int blk = it.blk0; blk < it.blk1; ++blk) {
    const char* page = p.page(it.b, blk, it.g);
    const T* kv = reinterpret_cast<const T*>(page);
    const float* bias = reinterpret_cast<const float*>(page + geo.bias_byte_off());
    const int j0 = blk * bs, n = std::min(bs, seq - j0);
    for (int m = 0; m < M; ++m) {
      const int pos = ctx + it.row0 + m / G;
      const int lo = p.window > 0 ? pos - p.window + 1 : 0;
      const float* q = sc.q + m * d;
      float* s = sc.s + m * bs;
      float blk_max = -inf;
      for (int t = 0; t < n; ++t) {
        const int j = j0 + t;
        if (j > pos || j < lo) {
          s[t] = -inf;
          continue;
        }
        float acc = 0.f;
        for (int c = 0; c < d; ++c) acc += q[c] * float(kv[geo.k_off(t, c)]);
        float b;
        std::memcpy(&b, bias + p.channel(m % G) * bs + t, sizeof b);
        s[t] = acc * p.scale + b;
        blk_max = std::max(blk_max, s[t]);
      }
      const float m_new = std::max(sc.mx[m], blk_max);
      if (m_new == -inf) continue;  // nothing allowed yet: avoid exp(-inf - -inf)
      const float alpha = std::exp(sc.mx[m] - m_new);
      float* o = sc.o + m * d;
      for (int c = 0; c < d; ++c) o[c] *= alpha;
      float sum = 0.f;
      for (int t = 0; t < n; ++t) {
        if (s[t] == -inf) continue;
        const float w = std::exp(s[t] - m_new);
        sum += w;
        for (int c = 0; c < d; ++c) o[c] += w * float(kv[geo.v_off(t, c)]);
      }
      sc.sum[m] = sc.sum[m] * alpha + sum;
      sc.mx[m] = m_new;
    }
  }
  if (it.part < 0) {
    for (int m = 0; m < M; ++m) sc.alpha[m] = 1.f / sc.sum[m];
    store_rows_portable(p, it.b, it.g, it.row0, it.nrows, sc.o, d, sc.alpha);
  } else {
    store_partial(parts, it.part, sc, M, d);
  }
}

template <typename T>
void store(const Params& p, int b, int g, int row0, int nrows, const float* o, int64_t ld, const float* scale) {
  const int G = p.group, d = p.geo.d;
  for (int m = 0; m < nrows * G; ++m) {
    T* dst = reinterpret_cast<T*>(p.out) + (p.qsl[b] + row0 + m / G) * p.o_s0 + (g * G + m % G) * p.o_s1;
    for (int c = 0; c < d; ++c) dst[c] = T(o[m * ld + c] * scale[m]);
  }
}

}  // namespace

void attend_portable(const Params& p, const Item& it, const Scratch& s, const Partials& parts) {
  switch (p.geo.dt) {
    case Dt::f32: return attend<float>(p, it, s, parts);
    case Dt::bf16: return attend<c10::BFloat16>(p, it, s, parts);
    case Dt::f16: return attend<c10::Half>(p, it, s, parts);
  }
}

void store_rows_portable(const Params& p, int b, int g, int row0, int nrows, const float* o, int64_t ld, const float* scale) {
  switch (p.geo.dt) {
    case Dt::f32: return store<float>(p, b, g, row0, nrows, o, ld, scale);
    case Dt::bf16: return store<c10::BFloat16>(p, b, g, row0, nrows, o, ld, scale);
    case Dt::f16: return store<c10::Half>(p, b, g, row0, nrows, o, ld, scale);
  }
}

}  // namespace vllm_doge
