// Shared definitions of the Doge CPU attention kernels.
//
// Page of one (block, kv head), BS tokens, head_dim d, C bias channels, element size e:
//   K     16-bit: [d/2][BS][2]  (channel pairs, VNNI)    fp32: [d][BS]  (transposed)
//   V     16-bit: [BS/2][d][2]  (token pairs, VNNI)      fp32: [BS][d]
//   bias  fp32 [C][BS] at byte offset 2*BS*d*e
// K is the B operand of Q.K^T ([d][BS]) and V that of P.V ([BS][d]) without repacking.
#pragma once

#include <cstdint>
#include <cstring>

namespace vllm_doge {

enum class Isa : int { portable = 0, avx512 = 1, avx2 = 2 };
enum class Dt : int { f32 = 0, bf16 = 1, f16 = 2 };

// The vector ISA the kernels run (VLLM_DOGE_ISA, re-read by reconfigure(); attention.cpp).
Isa configured_isa();

inline int elt_size(Dt t) { return t == Dt::f32 ? 4 : 2; }

struct Geometry {
  Dt dt;
  int d, bs, c;  // head_dim, block size, bias channels
  int64_t k_off(int t, int ch) const {  // element offsets inside a page
    return dt == Dt::f32 ? int64_t(ch) * bs + t : (int64_t(ch >> 1) * bs + t) * 2 + (ch & 1);
  }
  int64_t v_off(int t, int ch) const {
    return int64_t(bs) * d + (dt == Dt::f32 ? int64_t(t) * d + ch : (int64_t(t >> 1) * d + ch) * 2 + (t & 1));
  }
  int64_t bias_byte_off() const { return int64_t(2) * bs * d * elt_size(dt); }
};

struct Params {
  Geometry geo;
  int heads, kv_heads, group;  // group = heads / kv_heads
  float scale;
  int window;  // <= 0: none
  const char* q;  // element strides below
  int64_t q_s0, q_s1;
  char* out;
  int64_t o_s0, o_s1;
  const char* cache;
  int64_t c_s0, c_s1;
  const int32_t* qsl;
  const int32_t* seq_lens;
  const int32_t* block_table;
  int64_t bt_s0;

  int q_len(int b) const { return qsl[b + 1] - qsl[b]; }
  int ctx(int b) const { return seq_lens[b] - q_len(b); }
  const char* page(int b, int blk, int g) const {
    int64_t e = elt_size(geo.dt);
    return cache + (int64_t(block_table[b * bt_s0 + blk]) * c_s0 + int64_t(g) * c_s1) * e;
  }
  int channel(int hg) const { return geo.c > 1 ? hg : 0; }
};

// Rows (query position r, head hg of the group) of request b, kv head g, stacked as m = r * group + hg,
// against key blocks [blk0, blk1). part < 0: normalise and write `out`; else store the unnormalised
// partial (O, max, sum) in slot `part` for the split-KV merge.
struct Item {
  int32_t b, g, row0, nrows, blk0, blk1, part;
};

// Per-thread buffers, sized for the largest item (m_max rows). Rows of s and p are `ld` floats apart
// (ld = bs, or the key chunk of several blocks the brgemm path scores at once).
struct Scratch {
  float* q;      // [m_max][d] (fp32 or raw 16-bit rows)
  float* s;      // [m_max][ld] scores
  float* p;      // [m_max][ld] probabilities (fp32, or bf16 rows of ld elements)
  float* o;      // [m_max][d] accumulator
  float* mx;     // [m_max] running max
  float* sum;    // [m_max] running sum
  float* alpha;  // [m_max] rescale of this block
  float* cmax;   // [m_max] max of the current chunk's scores
  float* v;      // [2][bs][d]: a zero-padded copy of a partial last block's V (brgemm), or one page widened
                 // to the fp32 layout (bf16 items on the fp32 tiles)
  int ld;
};

struct Partials {
  float* o;   // [parts][m_max][d]
  float* ml;  // [parts][m_max][2]
  int m_max;
};

// An item's unnormalised rows (O, max, sum) into its split-KV partial slot `part`, for merge().
inline void store_partial(const Partials& parts, int part, const Scratch& sc, int M, int d) {
  std::memcpy(parts.o + int64_t(part) * parts.m_max * d, sc.o, sizeof(float) * M * d);
  float* ml = parts.ml + int64_t(part) * parts.m_max * 2;
  for (int m = 0; m < M; ++m) {
    ml[2 * m] = sc.mx[m];
    ml[2 * m + 1] = sc.sum[m];
  }
}

void attend_portable(const Params& p, const Item& it, const Scratch& s, const Partials& parts);
void store_rows_portable(const Params& p, int b, int g, int row0, int nrows, const float* o, int64_t ld, const float* scale);

#if defined(__x86_64__)
bool avx2_supported();  // avx2 + fma + f16c (attention_avx2.cpp)
void attend_avx2(const Params& p, const Item& it, const Scratch& s, const Partials& parts);

bool avx512_supported();
// How an item runs: hand-written tiles on the page's dtype; oneDNN brgemm (>= 16 rows); bf16 only: each page
// widened to fp32 once and the fp32 tiles (>= 16 rows, CPUs whose vdpbf16ps is slow next to their FMA, see
// bf16_dot_slow), or AMX tiles written here (<= 16 rows: decode, speculative verification; see amx_usable).
// pf: a page of the item this thread likely runs next (prefetched during the last block), or null.
enum class Path : int { loops = 0, gemm = 1, widen = 2, amx = 3 };
void attend_avx512(const Params& p, const Item& it, const Scratch& s, const Partials& parts, Path path,
                   const char* pf);
// Whether vdpbf16ps runs below ~half the MAC rate of fp32 FMA here (a micro-benchmark, run once): then bf16
// rows in numbers (prefill without AMX) go faster widened to fp32 (Intel cores: ~3 FMA times per vdpbf16ps)
// than on the vdpbf16ps tiles (AMD Zen 4/5: about one).
bool bf16_dot_slow();
bool amx_usable();
// Keys per chunk of the brgemm path: scores of up to this many keys (whole blocks) go through one softmax
// pass, so both ukernels run back to back per chunk rather than alternating per block.
int gemm_chunk(int bs);
bool brgemm_usable(Dt dt, bool force);
void brgemm_done();
#endif

// A cell is one token's K, V and fp32 biases; a keep-window layer's adds its key's int32 position
// (keep_window.cpp), which attention and cache_write leave alone.
inline bool cell_fits(int64_t cell_bytes, int64_t d, int64_t e, int64_t c) {
  const int64_t base = 2 * d * e + 4 * c;
  return cell_bytes == base || cell_bytes == base + 4;
}

}  // namespace vllm_doge
