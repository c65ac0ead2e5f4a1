// attention op: validates, cuts the batch into work items, runs them on at::parallel_for threads and
// merges split-KV partials. The per-item math lives in attention_portable.cpp / attention_avx512.cpp.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <mutex>
#include <string>
#include <vector>

#include "common.h"

namespace vllm_doge {
namespace {

struct Config {
  Isa isa = Isa::portable;
  int gemm = -1;  // VLLM_DOGE_BRGEMM: -1 auto, 0 never, 1 whenever the dtype allows
  bool widen = false;  // VLLM_DOGE_BF16=fp32 (or auto where vdpbf16ps is slow): bf16 items of >= 16 rows
                       // not on brgemm run widened to fp32; dot: always the vdpbf16ps tiles
};

std::mutex config_mutex;
Config config;
bool configured = false;

Config resolve() {
  Config c;
  const char* env = std::getenv("VLLM_DOGE_ISA");
  std::string want = env && *env ? env : "auto";
#if defined(__x86_64__)
  const bool has512 = avx512_supported(), has2 = avx2_supported();
#else
  const bool has512 = false, has2 = false;
#endif
  if (want == "auto") {
    c.isa = has512 ? Isa::avx512 : has2 ? Isa::avx2 : Isa::portable;
  } else if (want == "portable") {
    c.isa = Isa::portable;
  } else if (want == "avx512") {
    TORCH_CHECK(has512, "VLLM_DOGE_ISA=avx512 but this CPU lacks avx512f/bw/vl/dq/bf16");
    c.isa = Isa::avx512;
  } else if (want == "avx2") {
    TORCH_CHECK(has2, "VLLM_DOGE_ISA=avx2 but this CPU lacks avx2/fma/f16c");
    c.isa = Isa::avx2;
  } else {
    TORCH_CHECK(false, "VLLM_DOGE_ISA must be auto, portable, avx2 or avx512, not '", want, "'");
  }
  const char* g = std::getenv("VLLM_DOGE_BRGEMM");
  std::string gs = g && *g ? g : "auto";
  TORCH_CHECK(gs == "auto" || gs == "0" || gs == "1", "VLLM_DOGE_BRGEMM must be auto, 0 or 1");
  c.gemm = gs == "auto" ? -1 : std::stoi(gs);
  const char* w = std::getenv("VLLM_DOGE_BF16");
  std::string ws = w && *w ? w : "auto";
  TORCH_CHECK(ws == "auto" || ws == "dot" || ws == "fp32", "VLLM_DOGE_BF16 must be auto, dot or fp32");
#if defined(__x86_64__)
  if (c.isa == Isa::avx512) c.widen = ws == "fp32" || (ws == "auto" && bf16_dot_slow());
#endif
  return c;
}

Config current() {
  std::lock_guard<std::mutex> lock(config_mutex);
  if (!configured) {
    config = resolve();
    configured = true;
  }
  return config;
}

// Whether items of dtype dt with at least 16 stacked rows go through oneDNN's brgemm (bf16 with AMX: 4x the
// hand-written tiles on prefill; fp32: ~7% faster). VLLM_DOGE_BRGEMM=1 also takes oneDNN's bf16 ukernel
// without AMX (avx512_core_bf16), which auto leaves to the hand-written tiles.
bool use_gemm(const Config& c, Dt dt) {
#if defined(__x86_64__)
  if (c.isa != Isa::avx512 || c.gemm == 0 || dt == Dt::f16) return false;
  return brgemm_usable(dt, c.gemm == 1);
#else
  return false;
#endif
}

std::string describe(const Config& c) {
  std::string s = c.isa == Isa::avx512 ? "avx512" : c.isa == Isa::avx2 ? "avx2" : "portable";
  if (use_gemm(c, Dt::bf16)) s += "+brgemm(bf16)";
#if defined(__x86_64__)
  if (use_gemm(c, Dt::bf16) && amx_usable()) s += "+amx(bf16<=16rows)";
#endif
  if (use_gemm(c, Dt::f32)) s += "+brgemm(fp32)";
  if (c.widen) s += use_gemm(c, Dt::bf16) ? "+bf16-fp32-tiles(when no brgemm)" : "+bf16-fp32-tiles";
  return s;
}

std::string isa_name() { return describe(current()); }

}  // namespace

Isa configured_isa() { return current().isa; }

namespace {

std::string reconfigure() {
  std::lock_guard<std::mutex> lock(config_mutex);
  config = resolve();
  configured = true;
  return describe(config);
}

// Stacked rows (positions x group heads) per prefill item: large M amortises the brgemm calls (128 rows
// measured 20% faster than 32 at L = 2048).
constexpr int kRowsPerItem = 128;
constexpr int kMinSplitBlocks = 2;

struct Plan {
  std::vector<Item> items;
  std::vector<Item> merges;  // part = first partial slot, blk1 - blk0 = number of partials
  int m_max = 1, parts = 0;
};

Plan schedule(const Params& p, int B, int threads) {
  Plan plan;
  const int G = p.group, bs = p.geo.bs;
  const int rows = std::max(1, kRowsPerItem / G);
  for (int b = 0; b < B; ++b) {
    const int ql = p.q_len(b), ctx = p.ctx(b);
    TORCH_CHECK(ql >= 0 && ctx >= 0, "request ", b, ": seq_len ", p.seq_lens[b], " < query length ", ql);
    for (int r0 = 0; r0 < ql; r0 += rows) {
      const int nr = std::min(rows, ql - r0);
      const int first = ctx + r0, last = ctx + r0 + nr - 1;
      const int lo = p.window > 0 ? std::max(0, first - p.window + 1) : 0;
      for (int g = 0; g < p.kv_heads; ++g) plan.items.push_back({b, g, r0, nr, lo / bs, last / bs + 1, -1});
      plan.m_max = std::max(plan.m_max, nr * G);
    }
  }
  // Too few items for the threads (decode of few requests): split the keys and merge partial softmaxes.
  const int want = 4 * threads, n = int(plan.items.size());
  if (n > 0 && n < want) {
    const int split = (want + n - 1) / n;
    std::vector<Item> out;
    for (const Item& it : plan.items) {
      const int nb = it.blk1 - it.blk0;
      const int s = std::min(split, nb / kMinSplitBlocks);
      if (s <= 1) {
        out.push_back(it);
        continue;
      }
      plan.merges.push_back({it.b, it.g, it.row0, it.nrows, 0, s, plan.parts});
      for (int i = 0; i < s; ++i) {
        Item piece = it;
        piece.blk0 = it.blk0 + int(int64_t(nb) * i / s);
        piece.blk1 = it.blk0 + int(int64_t(nb) * (i + 1) / s);
        piece.part = plan.parts++;
        out.push_back(piece);
      }
    }
    plan.items = std::move(out);
  }
  // Taken dynamically in this order. Items of one (request, kv head) stay together, longest first, so that
  // its pages, read by each of its row chunks, are still in L2 for the next one (interleaving kv heads made
  // the working set 4x larger and AMX waited on L3); the groups go longest first too, for the balance of
  // causal prefill items of very different cost.
  auto cost = [](const Item& a) { return int64_t(a.nrows) * (a.blk1 - a.blk0); };
  std::vector<int64_t> group_cost(size_t(B) * p.kv_heads, 0);
  for (const Item& it : plan.items) {
    int64_t& c = group_cost[size_t(it.b) * p.kv_heads + it.g];
    c = std::max(c, cost(it));
  }
  std::stable_sort(plan.items.begin(), plan.items.end(), [&](const Item& a, const Item& b) {
    const size_t ga = size_t(a.b) * p.kv_heads + a.g, gb = size_t(b.b) * p.kv_heads + b.g;
    if (ga != gb) return group_cost[ga] != group_cost[gb] ? group_cost[ga] > group_cost[gb] : ga < gb;
    return cost(a) > cost(b);
  });
  return plan;
}

void merge(const Params& p, const Item& mg, const Partials& parts, std::vector<float>& buf) {
  const int M = mg.nrows * p.group, d = p.geo.d, n = mg.blk1 - mg.blk0;
  buf.assign(size_t(M) * (d + 1), 0.f);
  float* o = buf.data();
  float* inv = o + size_t(M) * d;
  for (int m = 0; m < M; ++m) {
    float top = -std::numeric_limits<float>::infinity();
    for (int i = 0; i < n; ++i) top = std::max(top, parts.ml[(int64_t(mg.part + i) * parts.m_max + m) * 2]);
    float sum = 0.f;
    for (int i = 0; i < n; ++i) {
      const float* ml = parts.ml + (int64_t(mg.part + i) * parts.m_max + m) * 2;
      if (ml[0] == -std::numeric_limits<float>::infinity()) continue;  // no allowed key in this piece
      const float w = std::exp(ml[0] - top);
      sum += w * ml[1];
      const float* src = parts.o + (int64_t(mg.part + i) * parts.m_max + m) * d;
      for (int c = 0; c < d; ++c) o[m * d + c] += w * src[c];
    }
    inv[m] = 1.f / sum;
  }
  store_rows_portable(p, mg.b, mg.g, mg.row0, mg.nrows, o, d, inv);
}

Dt dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return Dt::f32;
    case at::kBFloat16: return Dt::bf16;
    case at::kHalf: return Dt::f16;
    default: TORCH_CHECK(false, "attention: dtype must be fp32, bf16 or fp16, not ", t);
  }
}

void attention(at::Tensor& out, const at::Tensor& query, const at::Tensor& cache, const at::Tensor& query_start_loc,
               const at::Tensor& seq_lens, const at::Tensor& block_table, double scale, int64_t sliding_window,
               int64_t bias_channels) {
  TORCH_CHECK(query.dim() == 3 && out.sizes() == query.sizes(), "query/out must be [T, H, d] of one shape");
  TORCH_CHECK(query.stride(2) == 1 && out.stride(2) == 1, "query/out: the last dim must be contiguous");
  TORCH_CHECK(query.scalar_type() == cache.scalar_type() && out.scalar_type() == cache.scalar_type(),
              "query/out dtype must be the cache dtype");
  TORCH_CHECK(cache.dim() == 4 && cache.stride(3) == 1 && cache.stride(2) == cache.size(3),
              "cache must be [num_blocks, KV, BS, cell] with contiguous pages");
  for (const at::Tensor* t : {&query_start_loc, &seq_lens, &block_table})
    TORCH_CHECK(t->scalar_type() == at::kInt, "query_start_loc, seq_lens and block_table must be int32");
  TORCH_CHECK(query_start_loc.is_contiguous() && seq_lens.is_contiguous() && block_table.stride(1) == 1,
              "query_start_loc/seq_lens must be contiguous, block_table rows contiguous");
  const int B = int(seq_lens.size(0));
  TORCH_CHECK(query_start_loc.size(0) == B + 1 && block_table.dim() == 2 && block_table.size(0) >= B,
              "query_start_loc must be [B+1] and block_table [B, max_blocks]");
  const int H = int(query.size(1)), d = int(query.size(2)), KV = int(cache.size(1)), bs = int(cache.size(2));
  const int C = int(bias_channels), e = int(cache.element_size());
  TORCH_CHECK(KV > 0 && H % KV == 0, "num_heads ", H, " is not a multiple of num_kv_heads ", KV);
  TORCH_CHECK(C == 1 || C == H / KV, "bias_channels must be 1 or num_heads / num_kv_heads");
  TORCH_CHECK(d % 2 == 0 && bs % 2 == 0, "head_dim and block size must be even");
  TORCH_CHECK(cell_fits(cache.size(3) * e, d, e, C), "cache cell size does not match head_dim ", d, " and ", C,
              " bias channels");
  if (B == 0 || query.size(0) == 0) return;

  Params p;
  p.geo = {dtype_of(cache.scalar_type()), d, bs, C};
  p.heads = H;
  p.kv_heads = KV;
  p.group = H / KV;
  p.scale = float(scale);
  p.window = int(sliding_window);
  p.q = reinterpret_cast<const char*>(query.data_ptr());
  p.q_s0 = query.stride(0);
  p.q_s1 = query.stride(1);
  p.out = reinterpret_cast<char*>(out.data_ptr());
  p.o_s0 = out.stride(0);
  p.o_s1 = out.stride(1);
  p.cache = reinterpret_cast<const char*>(cache.data_ptr());
  p.c_s0 = cache.stride(0);
  p.c_s1 = cache.stride(1);
  p.qsl = query_start_loc.data_ptr<int32_t>();
  p.seq_lens = seq_lens.data_ptr<int32_t>();
  p.block_table = block_table.data_ptr<int32_t>();
  p.bt_s0 = block_table.stride(0);
  TORCH_CHECK(p.qsl[B] <= query.size(0), "query_start_loc[B] exceeds the number of query rows");

  const Config cfg = current();
  const bool vec = cfg.isa == Isa::avx512 && d % 16 == 0 && bs % 16 == 0;
  const bool vec2 = cfg.isa == Isa::avx2 && d % 8 == 0 && bs % 8 == 0;
  const bool gemm = vec && use_gemm(cfg, p.geo.dt);
#if defined(__x86_64__)
  const bool amx = gemm && p.geo.dt == Dt::bf16 && d % 64 == 0 && bs % 32 == 0 && amx_usable();
#else
  const bool amx = false;
#endif
  const int threads = at::get_num_threads();
  const Plan plan = schedule(p, B, threads);

  std::vector<float> part_buf(size_t(plan.parts) * plan.m_max * (d + 2));
  Partials parts{part_buf.data(), part_buf.data() + size_t(plan.parts) * plan.m_max * d, plan.m_max};
  std::atomic<int64_t> next{0};
  const int64_t n_items = int64_t(plan.items.size());
  const int64_t tasks = std::min<int64_t>(threads, n_items);
  const int ld = gemm ? std::max(bs, gemm_chunk(bs)) : bs;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    const size_t M = plan.m_max;
    // Grown, never shrunk or cleared: OpenMP keeps its threads, so decode calls allocate nothing. Every array
    // starts on a cache line: a large vector comes from mmap at page + 16 bytes, which split every 64-byte
    // access of the tiles (and brgemm's) in two and cost prefill up to 35%, varying with the heap's history.
    thread_local std::vector<float> buf;
    auto up = [](size_t n) { return (n + 15) / 16 * 16; };
    const size_t need = 2 * up(M * d) + 2 * up(M * size_t(ld)) + 4 * up(M) + up(size_t(2) * bs * d) + 16;
    if (buf.size() < need) buf.resize(need);
    float* f = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(buf.data()) + 63) & ~uintptr_t(63));
    auto take = [&](size_t n) {
      float* r = f;
      f += up(n);
      return r;
    };
    Scratch s;
    s.q = take(M * d);
    s.o = take(M * d);
    s.s = take(M * size_t(ld));
    s.p = take(M * size_t(ld));
    s.mx = take(M);
    s.sum = take(M);
    s.alpha = take(M);
    s.cmax = take(M);
    s.v = take(size_t(2) * bs * d);
    s.ld = ld;
    bool used_gemm = false;
    (void)begin, (void)end;  // one task per thread; items are taken from a shared counter
    for (int64_t i = next++; i < n_items; i = next++) {
      const Item& it = plan.items[i];
#if defined(__x86_64__)
      if (vec) {
        const int rows = it.nrows * p.group;
        const bool g = gemm && rows >= 16;
        used_gemm |= g;
        const Path path = g ? Path::gemm
                          : amx && rows <= 16 ? Path::amx
                          : cfg.widen && p.geo.dt == Dt::bf16 && rows >= 16 ? Path::widen
                                                                            : Path::loops;
        used_gemm |= path == Path::amx;  // its tile configuration replaced brgemm's: release both
        // Items are taken in turn, so this thread's next one is most likely `tasks` further on.
        const Item* nx = i + tasks < n_items ? &plan.items[i + tasks] : nullptr;
        attend_avx512(p, it, s, parts, path, nx ? p.page(nx->b, nx->blk0, nx->g) : nullptr);
        continue;
      }
      if (vec2) {
        attend_avx2(p, it, s, parts);
        continue;
      }
#endif
      attend_portable(p, it, s, parts);
    }
#if defined(__x86_64__)
    if (used_gemm) brgemm_done();
#endif
  });
  if (!plan.merges.empty()) {
    at::parallel_for(0, int64_t(plan.merges.size()), 1, [&](int64_t begin, int64_t end) {
      std::vector<float> buf;
      for (int64_t i = begin; i < end; ++i) merge(p, plan.merges[i], parts, buf);
    });
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(vllm_doge, m) {
  m.def(
      "attention(Tensor(a!) out, Tensor query, Tensor cache, Tensor query_start_loc, Tensor seq_lens, "
      "Tensor block_table, float scale, int sliding_window, int bias_channels) -> ()");
  m.def("isa() -> str", &isa_name);
  m.def("reconfigure() -> str", &reconfigure);
}

TORCH_LIBRARY_IMPL(vllm_doge, CPU, m) { m.impl("attention", &attention); }

}  // namespace vllm_doge
