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

enum class Isa : int { portable = 0, avx512 = 1 };
enum class Dt : int { f32 = 0, bf16 = 1, f16 = 2 };

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

// Per-thread buffers, sized for the largest item (m_max rows).
struct Scratch {
  float* q;      // [m_max][d] (fp32 or raw 16-bit rows)
  float* s;      // [m_max][bs] scores
  float* p;      // [m_max][bs] probabilities (fp32, or bf16 in the first half)
  float* o;      // [m_max][d] accumulator
  float* mx;     // [m_max] running max
  float* sum;    // [m_max] running sum
  float* alpha;  // [m_max] rescale of this block
  float* v;      // [bs][d] zero-padded copy of a partial last block (brgemm)
};

struct Partials {
  float* o;   // [parts][m_max][d]
  float* ml;  // [parts][m_max][2]
  int m_max;
};

void attend_portable(const Params& p, const Item& it, const Scratch& s, const Partials& parts);
void store_rows_portable(const Params& p, int b, int g, int row0, int nrows, const float* o, int64_t ld, const float* scale);

#if defined(__x86_64__)
bool avx512_supported();
void attend_avx512(const Params& p, const Item& it, const Scratch& s, const Partials& parts, bool gemm);
bool brgemm_usable(Dt dt);
void brgemm_done();
#endif

}  // namespace vllm_doge
