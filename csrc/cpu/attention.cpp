// Paged attention on the CPU (engine._cpu.paged_attention), float32.
//
// Each query row against its keys in the paged cache (a decode's row: the whole context; a chunk's
// row i: the context up to its position), with no padding to the longest context, no copies of KV
// heads for grouped-query attention and no gather of the blocks: the torch path
// (kernels/attention.py) does all three, and at batch 1 its dozen ops cost more than the
// arithmetic. A decode's row is one task per KV head (attend: the scores of the KV head's query
// heads, an exact softmax with the max subtracted, the weighted values); a chunk's rows go 16 to a
// task (attend_tile: keys transposed 16 at a time, so the scores need no horizontal sums; a tile
// scores the keys up to its last row, each row's softmax and values stop at its own). Tasks spread
// over OpenMP threads.
//
// Built with -ffinite-math-only -fno-signed-zeros (this file alone) so that the clamp in exp_neg
// and the max vectorize; inputs are finite (the torch reference gives NaN otherwise too).
#include "attention.h"
#include "isa.h"
#include "vec_math.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <memory>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace selfeval_cpu {
namespace {

const float* cf32(uintptr_t p) { return reinterpret_cast<const float*>(p); }
float* f32(uintptr_t p) { return reinterpret_cast<float*>(p); }
const int32_t* i32(uintptr_t p) { return reinterpret_cast<const int32_t*>(p); }

// A 16-lane float vector held as P native registers: one AVX-512 register (P = 1), two AVX2 ones
// (P = 2) or four SSE ones (P = 4). Every operation is lane by lane, and hsum and sum16 add in one
// fixed order, so each instantiation computes the same lanes in the same order: for head sizes 16
// to 256 every instruction set gives the same bits (a decode row of another head size takes
// dot_any, whose sum follows the vector width). A 16-lane GCC vector type in a function built for AVX2 is lowered
// through the stack: with one such type for every ISA (target_clones), the AVX2 build ran 5-8x
// slower than this (bench/cpu_attention.py, 2-core EPYC). Loads and stores go through memcpy per
// register (no alignment assumed).
#define SE_INLINE inline __attribute__((always_inline))

template <int P>
struct Vec {
  typedef float part __attribute__((vector_size(64 / P)));
  static constexpr int kLanes = 16 / P;
  part p[P];
};
typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));

template <int P>
SE_INLINE Vec<P> load16(const float* x) {
  Vec<P> v;
  for (int i = 0; i < P; ++i) __builtin_memcpy(&v.p[i], x + i * Vec<P>::kLanes, sizeof v.p[i]);
  return v;
}

template <int P>
SE_INLINE void store16(float* x, Vec<P> v) {
  for (int i = 0; i < P; ++i) __builtin_memcpy(x + i * Vec<P>::kLanes, &v.p[i], sizeof v.p[i]);
}

template <int P>
SE_INLINE Vec<P> operator+(Vec<P> a, Vec<P> b) {
  for (int i = 0; i < P; ++i) a.p[i] += b.p[i];
  return a;
}

template <int P>
SE_INLINE Vec<P>& operator+=(Vec<P>& a, Vec<P> b) {
  for (int i = 0; i < P; ++i) a.p[i] += b.p[i];
  return a;
}

template <int P>
SE_INLINE Vec<P> operator*(Vec<P> a, Vec<P> b) {
  for (int i = 0; i < P; ++i) a.p[i] *= b.p[i];
  return a;
}

template <int P>
SE_INLINE Vec<P> operator*(float s, Vec<P> a) {
  for (int i = 0; i < P; ++i) a.p[i] *= s;
  return a;
}

template <int P>
SE_INLINE Vec<P> operator*(Vec<P> a, float s) {
  return s * a;
}

// Lanes 0-15 summed as ((x0 + x8) + (x4 + x12)) + ((x2 + x10) + (x6 + x14)) + ..., whatever P.
SE_INLINE float hsum4(v4 c) { return (c[0] + c[2]) + (c[1] + c[3]); }

template <int P>
SE_INLINE float hsum(Vec<P> a) {
  if constexpr (P == 1) {
    const v8 b = __builtin_shufflevector(a.p[0], a.p[0], 0, 1, 2, 3, 4, 5, 6, 7) +
                 __builtin_shufflevector(a.p[0], a.p[0], 8, 9, 10, 11, 12, 13, 14, 15);
    return hsum4(__builtin_shufflevector(b, b, 0, 1, 2, 3) + __builtin_shufflevector(b, b, 4, 5, 6, 7));
  } else if constexpr (P == 2) {
    const v8 b = a.p[0] + a.p[1];
    return hsum4(__builtin_shufflevector(b, b, 0, 1, 2, 3) + __builtin_shufflevector(b, b, 4, 5, 6, 7));
  } else {
    static_assert(P == 4, "16 lanes as 1, 2 or 4 registers");
    return hsum4((a.p[0] + a.p[2]) + (a.p[1] + a.p[3]));
  }
}

// x[0] + ... + x[n - 1] in a fixed order (16 lanes, hsum, then the tail), whatever P: a softmax's
// total (an `omp simd` reduction would add in the order of the vector width).
template <int P>
SE_INLINE float sum16(const float* x, int64_t n) {
  Vec<P> acc = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) acc += load16<P>(x + i);
  float total = hsum(acc);
  for (; i < n; ++i) total += x[i];
  return total;
}

inline float dot_any(const float* q, const float* k, int64_t dim) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t d = 0; d < dim; ++d) s += q[d] * k[d];
  return s;
}

// One task: the `group` query heads at q (q_s1 apart) against the n_ctx keys and values of blocks
// blk (rows c_s0 apart from kc / vc), into out [group, dim]. scores [group, n_ctx] and acc
// [group, dim] are scratch. DIM: the head size when it is 16, 32, 64, 128 or 256, else 0 (a plain loop).
// Per key: its K row is loaded once for all the group's query heads (16-lane products, one
// horizontal sum each), and its V row once for all their accumulators. Instantiated per
// instruction set (attend_avx512 and the others below), picked at the first call.
template <int64_t DIM, int P>
SE_INLINE void attend(
    const float* q, int64_t q_s1, int64_t group, const float* kc, const float* vc, int64_t c_s0,
    const int64_t* blk, int64_t n_ctx, int64_t block_size, int64_t dim, float scale, float* scores,
    float* acc, float* out) {
  for (int64_t j = 0, n0 = 0; n0 < n_ctx; ++j, n0 += block_size) {
    const int64_t len = std::min(block_size, n_ctx - n0);
    const float* kb = kc + blk[j] * block_size * c_s0;
    if constexpr (DIM > 0) {
      for (int64_t i = 0; i < len; ++i) {
        Vec<P> k[DIM / 16];
        for (int64_t c = 0; c < DIM / 16; ++c) k[c] = load16<P>(kb + i * c_s0 + 16 * c);
        for (int64_t g = 0; g < group; ++g) {
          const float* qg = q + g * q_s1;
          Vec<P> s = load16<P>(qg) * k[0];
          for (int64_t c = 1; c < DIM / 16; ++c) s += load16<P>(qg + 16 * c) * k[c];
          scores[g * n_ctx + n0 + i] = hsum(s) * scale;
        }
      }
    } else {
      for (int64_t g = 0; g < group; ++g) {
        const float* qg = q + g * q_s1;
        float* sg = scores + g * n_ctx + n0;
        for (int64_t i = 0; i < len; ++i) sg[i] = dot_any(qg, kb + i * c_s0, dim) * scale;
      }
    }
  }
  for (int64_t g = 0; g < group; ++g) {  // softmax numerators, in place
    float* sg = scores + g * n_ctx;
    const float m = *std::max_element(sg, sg + n_ctx);
#pragma omp simd
    for (int64_t n = 0; n < n_ctx; ++n) sg[n] = exp_neg(sg[n] - m);
  }
  std::fill(acc, acc + group * dim, 0.0f);
  for (int64_t j = 0, n0 = 0; n0 < n_ctx; ++j, n0 += block_size) {
    const int64_t len = std::min(block_size, n_ctx - n0);
    const float* vb = vc + blk[j] * block_size * c_s0;
    for (int64_t i = 0; i < len; ++i) {
      const float* vn = vb + i * c_s0;
      if constexpr (DIM > 0) {
        Vec<P> v[DIM / 16];
        for (int64_t c = 0; c < DIM / 16; ++c) v[c] = load16<P>(vn + 16 * c);
        for (int64_t g = 0; g < group; ++g) {
          const float p = scores[g * n_ctx + n0 + i];
          float* a = acc + g * DIM;
          for (int64_t c = 0; c < DIM / 16; ++c) store16(a + 16 * c, load16<P>(a + 16 * c) + p * v[c]);
        }
      } else {
        for (int64_t g = 0; g < group; ++g) {
          const float p = scores[g * n_ctx + n0 + i];
          float* a = acc + g * dim;
#pragma omp simd
          for (int64_t d = 0; d < dim; ++d) a[d] += p * vn[d];
        }
      }
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    const float* sg = scores + g * n_ctx;
    const float inv = 1.0f / sum16<P>(sg, n_ctx);
    for (int64_t d = 0; d < dim; ++d) out[g * dim + d] = acc[g * dim + d] * inv;
  }
}


// Rows of a prompt chunk: a tile of `rows` consecutive query rows of one sequence (q_s0 apart),
// each with the `group` query heads of one KV head (q_s1 apart); row r sees the first n0 + r keys.
// Keys come TILE at a time: their K rows transposed into kt [dim, TILE], so that every query vector
// of the tile gets TILE scores from dim broadcast products and no horizontal sum (attend's per-key
// sums are most of its cost on chunks); the softmax is exact (max subtracted); then each vector's
// weighted V rows, its accumulator held in registers when DIM is known. scores [rows * group,
// stride] and kt [dim, TILE] are scratch; out rows are o_s0 apart, heads dim apart.
constexpr int64_t TILE = 16;

// Scores of V consecutive query vectors (vector v: row v / group, head v % group) against the TILE
// keys transposed in kt, into scores [v, k0 .. k0 + TILE). Each 64 of the head's dims are summed
// apart, then added (one chain of 256 products loses accuracy). Every V sums in the same order, so
// a row's scores do not depend on where its tile puts it.
template <int64_t DIM, int P, int V>
SE_INLINE void score_vectors(const float* q, int64_t q_s0, int64_t q_s1, int64_t group, int64_t v, const float* kt,
                          int64_t dim, float scale, float* scores, int64_t stride, int64_t k0) {
  const float* qs[V];
  for (int i = 0; i < V; ++i) qs[i] = q + ((v + i) / group) * q_s0 + ((v + i) % group) * q_s1;
  const int64_t d_end = DIM > 0 ? DIM : dim;
  Vec<P> s[V] = {};
  for (int64_t d0 = 0; d0 < d_end; d0 += 64) {
    Vec<P> t[V] = {};
    for (int64_t d = d0; d < std::min<int64_t>(d0 + 64, d_end); ++d) {
      const Vec<P> k = load16<P>(kt + d * TILE);
      for (int i = 0; i < V; ++i) t[i] += qs[i][d] * k;
    }
    for (int i = 0; i < V; ++i) s[i] += t[i];
  }
  for (int i = 0; i < V; ++i) store16(scores + (v + i) * stride + k0, s[i] * scale);
}

template <int64_t DIM, int P>
SE_INLINE void attend_tile(
    const float* q, int64_t q_s0, int64_t q_s1, int64_t group, int64_t rows, const float* kc, const float* vc,
    int64_t c_s0, const int64_t* blk, int64_t n0, int64_t block_size, int64_t dim, float scale, float* scores,
    int64_t stride, float* kt, float* out, int64_t o_s0) {
  const int64_t n_max = n0 + rows - 1, vectors = rows * group;
  for (int64_t k0 = 0; k0 < n_max; k0 += TILE) {
    const int64_t len = std::min(TILE, n_max - k0);
    for (int64_t j = 0; j < TILE; ++j) {
      if (j < len) {
        const int64_t n = k0 + j;
        const float* kr = kc + (blk[n / block_size] * block_size + n % block_size) * c_s0;
        for (int64_t d = 0; d < dim; ++d) kt[d * TILE + j] = kr[d];
      } else {
        for (int64_t d = 0; d < dim; ++d) kt[d * TILE + j] = 0.0f;
      }
    }
    // V vectors at a time: independent sums (one would wait on each add) and one load of each kt
    // row for all of them; as many as the registers hold (AVX-512's 32: 8, AVX2's 16: 2, SSE: 1)
    int64_t v = 0;
    if constexpr (P == 1) {
      for (; v + 8 <= vectors; v += 8)
        score_vectors<DIM, P, 8>(q, q_s0, q_s1, group, v, kt, dim, scale, scores, stride, k0);
      for (; v + 4 <= vectors; v += 4)
        score_vectors<DIM, P, 4>(q, q_s0, q_s1, group, v, kt, dim, scale, scores, stride, k0);
    } else if constexpr (P == 2) {
      for (; v + 2 <= vectors; v += 2)
        score_vectors<DIM, P, 2>(q, q_s0, q_s1, group, v, kt, dim, scale, scores, stride, k0);
    }
    for (; v < vectors; ++v) score_vectors<DIM, P, 1>(q, q_s0, q_s1, group, v, kt, dim, scale, scores, stride, k0);
  }
  // Softmax numerators in place, then each vector's weighted V rows. Two heads of a row (the same
  // keys) share each V row load where both accumulators fit the registers; they stay in registers
  // when DIM is known. (Pairing changes no sum: each head's accumulator adds in the same order.)
  constexpr bool kPairs = DIM > 0 && (P == 1 || (2 * (DIM / 16) + 1) * P <= 16);
  float inv[2];
  for (int64_t v = 0; v < vectors;) {
    const int64_t n = n0 + v / group;  // this row's keys
    const int64_t pair = (kPairs && v % group + 1 < group) ? 2 : 1;
    for (int64_t w = 0; w < pair; ++w) {
      float* sv = scores + (v + w) * stride;
      const float m = *std::max_element(sv, sv + n);
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) sv[i] = exp_neg(sv[i] - m);
      inv[w] = 1.0f / sum16<P>(sv, n);
    }
    float* o = out + (v / group) * o_s0 + (v % group) * dim;
    const float* p0 = scores + v * stride;
    if constexpr (DIM > 0) {
      if (pair == 2) {
        const float* p1 = p0 + stride;
        Vec<P> a0[DIM / 16] = {}, a1[DIM / 16] = {};
        for (int64_t j = 0, b0 = 0; b0 < n; ++j, b0 += block_size) {
          const int64_t len = std::min(block_size, n - b0);
          const float* vb = vc + blk[j] * block_size * c_s0;
          for (int64_t i = 0; i < len; ++i) {
            const float w0 = p0[b0 + i], w1 = p1[b0 + i];
            for (int64_t c = 0; c < DIM / 16; ++c) {
              const Vec<P> x = load16<P>(vb + i * c_s0 + 16 * c);
              a0[c] += w0 * x;
              a1[c] += w1 * x;
            }
          }
        }
        for (int64_t c = 0; c < DIM / 16; ++c) {
          store16(o + 16 * c, a0[c] * inv[0]);
          store16(o + dim + 16 * c, a1[c] * inv[1]);
        }
      } else {
        Vec<P> acc[DIM / 16] = {};
        for (int64_t j = 0, b0 = 0; b0 < n; ++j, b0 += block_size) {
          const int64_t len = std::min(block_size, n - b0);
          const float* vb = vc + blk[j] * block_size * c_s0;
          for (int64_t i = 0; i < len; ++i) {
            const float w0 = p0[b0 + i];
            for (int64_t c = 0; c < DIM / 16; ++c) acc[c] += w0 * load16<P>(vb + i * c_s0 + 16 * c);
          }
        }
        for (int64_t c = 0; c < DIM / 16; ++c) store16(o + 16 * c, acc[c] * inv[0]);
      }
    } else {
      std::fill(o, o + dim, 0.0f);
      for (int64_t j = 0, b0 = 0; b0 < n; ++j, b0 += block_size) {
        const int64_t len = std::min(block_size, n - b0);
        const float* vb = vc + blk[j] * block_size * c_s0;
        for (int64_t i = 0; i < len; ++i) {
          const float w0 = p0[b0 + i];
          const float* vn = vb + i * c_s0;
#pragma omp simd
          for (int64_t d = 0; d < dim; ++d) o[d] += w0 * vn[d];
        }
      }
      for (int64_t d = 0; d < dim; ++d) o[d] *= inv[0];
    }
    v += pair;
  }
}


// Each kernel once per instruction set, its body inlined and lowered with that set's registers.
// The set is chosen once, at the first call: the widest the CPU has, or the one set_isa named.
#define SE_ATTEND_PARAMS                                                                          \
  const float* q, int64_t q_s1, int64_t group, const float* kc, const float* vc, int64_t c_s0, \
      const int64_t* blk, int64_t n_ctx, int64_t block_size, int64_t dim, float scale, float* scores, float* acc, \
      float* out
#define SE_ATTEND_ARGS q, q_s1, group, kc, vc, c_s0, blk, n_ctx, block_size, dim, scale, scores, acc, out
#define SE_TILE_PARAMS                                                                                          \
  const float* q, int64_t q_s0, int64_t q_s1, int64_t group, int64_t rows, const float* kc, const float* vc, \
      int64_t c_s0, const int64_t* blk, int64_t n0, int64_t block_size, int64_t dim, float scale, float* scores, \
      int64_t stride, float* kt, float* out, int64_t o_s0
#define SE_TILE_ARGS \
  q, q_s0, q_s1, group, rows, kc, vc, c_s0, blk, n0, block_size, dim, scale, scores, stride, kt, out, o_s0

#if SELFEVAL_X86_DISPATCH
template <int64_t DIM>
__attribute__((target("avx512f"))) void attend_avx512(SE_ATTEND_PARAMS) { attend<DIM, 1>(SE_ATTEND_ARGS); }
template <int64_t DIM>
__attribute__((target("avx2"))) void attend_avx2(SE_ATTEND_PARAMS) { attend<DIM, 2>(SE_ATTEND_ARGS); }
template <int64_t DIM>
__attribute__((target("avx512f"))) void attend_tile_avx512(SE_TILE_PARAMS) { attend_tile<DIM, 1>(SE_TILE_ARGS); }
template <int64_t DIM>
__attribute__((target("avx2"))) void attend_tile_avx2(SE_TILE_PARAMS) { attend_tile<DIM, 2>(SE_TILE_ARGS); }
#endif
// x86-64's baseline (SSE2), or another target's 128-bit vectors (NEON on ARM)
template <int64_t DIM>
void attend_base(SE_ATTEND_PARAMS) { attend<DIM, 4>(SE_ATTEND_ARGS); }
template <int64_t DIM>
void attend_tile_base(SE_TILE_PARAMS) { attend_tile<DIM, 4>(SE_TILE_ARGS); }

using AttendFn = void (*)(SE_ATTEND_PARAMS);
using TileFn = void (*)(SE_TILE_PARAMS);

// [set][head size]: head sizes 16, 32, 64, 128, 256, then any other (a plain loop); sets widest first.
#define SE_BY_DIM(f) {&f<16>, &f<32>, &f<64>, &f<128>, &f<256>, &f<0>}
#if SELFEVAL_X86_DISPATCH
constexpr int kSets = 3;
const char* const kIsaNames[kSets] = {"avx512f", "avx2", "sse2"};
const AttendFn kAttend[kSets][6] = {SE_BY_DIM(attend_avx512), SE_BY_DIM(attend_avx2), SE_BY_DIM(attend_base)};
const TileFn kTile[kSets][6] = {SE_BY_DIM(attend_tile_avx512), SE_BY_DIM(attend_tile_avx2),
                                SE_BY_DIM(attend_tile_base)};

int best_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return 0;
  if (__builtin_cpu_supports("avx2")) return 1;
  return 2;
}
#else
constexpr int kSets = 1;
const char* const kIsaNames[kSets] = {"portable"};
const AttendFn kAttend[kSets][6] = {SE_BY_DIM(attend_base)};
const TileFn kTile[kSets][6] = {SE_BY_DIM(attend_tile_base)};

int best_isa() { return 0; }
#endif
#undef SE_BY_DIM

int dim_slot(int64_t dim) {
  switch (dim) {
    case 16: return 0;
    case 32: return 1;
    case 64: return 2;
    case 128: return 3;
    case 256: return 4;
    default: return 5;
  }
}

std::atomic<int> g_isa{-1};

int current_isa() {
  int isa = g_isa.load(std::memory_order_relaxed);
  if (isa < 0) g_isa.store(isa = best_isa(), std::memory_order_relaxed);
  return isa;
}

}  // namespace

std::string cpu_isa() { return kIsaNames[current_isa()]; }

std::string set_cpu_isa(const std::string& name) {
  const int best = best_isa();
  for (int i = 0; i < kSets; ++i) {
    if (name != kIsaNames[i]) continue;
    if (i < best) return "set_isa: this CPU has no " + name + " (it has " + kIsaNames[best] + ")";
    g_isa.store(i, std::memory_order_relaxed);
    return {};
  }
  if (name.empty() || name == "best") {
    g_isa.store(best, std::memory_order_relaxed);
    return {};
  }
  std::string known;
  for (int i = 0; i < kSets; ++i) known += std::string(kIsaNames[i]) + ", ";
  return "set_isa: unknown instruction set " + name + " (" + known + "or best)";
}

std::string paged_attention(uintptr_t q, uintptr_t k_cache, uintptr_t v_cache, uintptr_t out,
                            uintptr_t block_tables, uintptr_t context_lens, uintptr_t query_start_loc,
                            int64_t seqs, int64_t tokens, int64_t heads, int64_t kv_heads, int64_t dim,
                            int64_t block_size, int64_t num_blocks, int64_t table_width, int64_t table_stride,
                            int64_t q_s0, int64_t q_s1, int64_t c_s0, int64_t c_s1, double scale, int64_t threads) {
  // Contexts, query offsets and block ids are copied, then checked, before anything is read: only
  // the copies are used, so another thread changing the tensors while the GIL is released cannot
  // slip one in.
  if (block_size <= 0 || kv_heads <= 0 || heads % kv_heads)
    return "paged_attention: block size " + std::to_string(block_size) + ", " + std::to_string(heads) +
           " heads over " + std::to_string(kv_heads) + " KV heads";
  std::vector<int32_t> ctx(i32(context_lens), i32(context_lens) + seqs);
  std::vector<int64_t> first(seqs + 1, 0);  // row b's block ids: blocks[first[b] .. first[b + 1])
  for (int64_t b = 0; b < seqs; ++b) {
    const int64_t n = (static_cast<int64_t>(ctx[b]) + block_size - 1) / block_size;
    if (ctx[b] < 0 || n > table_width)
      return "paged_attention: context length " + std::to_string(ctx[b]) + " outside the block table";
    first[b + 1] = first[b] + n;
  }
  // Each query row's sequence and the keys it sees: a chunk's row i of q_len sits at position
  // ctx - q_len + i and sees the keys up to it; a decode's one row sees the whole context. Every
  // offset is checked before any row is written.
  std::vector<int64_t> row_seq(tokens), row_keys(tokens), seq_rows(seqs, 1);  // seq_rows: its query rows
  int64_t longest = 0;
  if (query_start_loc == 0) {
    if (tokens != seqs) return "paged_attention: one query per sequence needs as many rows as sequences";
    for (int64_t b = 0; b < seqs; ++b) row_seq[b] = b, row_keys[b] = ctx[b];
  } else {
    std::vector<int32_t> qsl(i32(query_start_loc), i32(query_start_loc) + seqs + 1);
    if (qsl[0] != 0 || qsl[seqs] != tokens) return "paged_attention: query offsets do not cover the rows";
    for (int64_t b = 0; b < seqs; ++b) {  // non-decreasing from 0 to tokens: every row in range
      const int64_t q_len = static_cast<int64_t>(qsl[b + 1]) - qsl[b];
      if (q_len < 0 || q_len > ctx[b])
        return "paged_attention: sequence " + std::to_string(b) + " has " + std::to_string(q_len) +
               " queries for a context of " + std::to_string(ctx[b]);
    }
    for (int64_t b = 0; b < seqs; ++b) {
      const int64_t q_len = seq_rows[b] = static_cast<int64_t>(qsl[b + 1]) - qsl[b];
      for (int64_t i = 0; i < q_len; ++i) row_seq[qsl[b] + i] = b, row_keys[qsl[b] + i] = ctx[b] - q_len + i + 1;
    }
  }
  for (int64_t t = 0; t < tokens; ++t) longest = std::max(longest, row_keys[t]);
  std::vector<int64_t> blocks(first[seqs]);
  for (int64_t b = 0; b < seqs; ++b) {
    const int32_t* row = i32(block_tables) + b * table_stride;
    for (int64_t j = 0; j < first[b + 1] - first[b]; ++j) {
      if (row[j] < 0 || row[j] >= num_blocks)
        return "paged_attention: block " + std::to_string(row[j]) + " outside the KV cache";
      blocks[first[b] + j] = row[j];
    }
  }
  // Work items: a decode's row alone (attend), a chunk's rows TILE_ROWS at a time (attend_tile);
  // each item once per KV head. A chunk row's result does not depend on how its rows are tiled.
  // (TILE_ROWS: query rows to a task; TILE, above: keys to a transposed block. Both 16.)
  constexpr int64_t TILE_ROWS = 16;
  struct Item {
    int64_t t, rows;
    bool tile;
  };
  std::vector<Item> items;
  items.reserve(tokens);
  for (int64_t t = 0; t < tokens;) {
    // a chunk: its sequence has more than one query row (a decode's has one, whatever the step)
    const bool chunk = query_start_loc != 0 && dim > 0 && seq_rows[row_seq[t]] > 1;
    int64_t rows = 1;
    while (chunk && t + rows < tokens && rows < TILE_ROWS && row_seq[t + rows] == row_seq[t]) ++rows;
    items.push_back({t, rows, chunk});
    t += rows;
  }
  const int64_t group = heads / kv_heads, tasks = static_cast<int64_t>(items.size()) * kv_heads;
  const float fscale = static_cast<float>(scale);
  const int isa = current_isa(), slot = dim_slot(dim);
  const AttendFn run = kAttend[isa][slot];
  const TileFn run_tile = kTile[isa][slot];
  // Each thread's scratch, allocated here: a failed allocation raises MemoryError in the caller
  // (inside the parallel region it would terminate the process).
  const int64_t team = threads > 1 && tasks > 1 ? threads : 1;
  int64_t longest_tile = 0;  // the keys of the longest row in a tile
  for (const Item& item : items)
    if (item.tile) longest_tile = std::max(longest_tile, row_keys[item.t + item.rows - 1]);
  const int64_t keys = std::max<int64_t>(longest, 1), stride = (longest_tile + TILE - 1) / TILE * TILE;
  const int64_t per_thread =
      std::max(group * keys + group * dim, longest_tile ? TILE_ROWS * group * stride + dim * TILE : 0);
  std::unique_ptr<float[]> scratch(new float[team * per_thread]);  // not zeroed: every read is written first
#pragma omp parallel num_threads(static_cast<int>(team)) if (team > 1)
  {
#ifdef _OPENMP
    float* scores = scratch.get() + omp_get_thread_num() * per_thread;
#else
    float* scores = scratch.get();
#endif
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const Item& item = items[task / kv_heads];
      const int64_t t = item.t, h = task % kv_heads, b = row_seq[t];
      float* o = f32(out) + (t * heads + h * group) * dim;
      const float* qt = cf32(q) + t * q_s0 + h * group * q_s1;
      if (item.tile) {
        run_tile(qt, q_s0, q_s1, group, item.rows, cf32(k_cache) + h * c_s1, cf32(v_cache) + h * c_s1, c_s0,
                 blocks.data() + first[b], row_keys[t], block_size, dim, fscale, scores, stride,
                 scores + TILE_ROWS * group * stride, o, heads * dim);
      } else if (row_keys[t] == 0) {
        std::fill(o, o + group * dim, 0.0f);
      } else {
        run(qt, q_s1, group, cf32(k_cache) + h * c_s1, cf32(v_cache) + h * c_s1, c_s0, blocks.data() + first[b],
            row_keys[t], block_size, dim, fscale, scores, scores + group * keys, o);
      }
    }
  }
  return {};
}

}  // namespace selfeval_cpu
