// Paged attention on the CPU (engine._cpu.paged_attention), float32.
//
// Each query row against its keys in the paged cache (a decode's row: the whole context; a chunk's
// row i: the context up to its position), with no padding to the longest context, no copies of KV
// heads for grouped-query attention and no gather of the blocks: the torch path
// (kernels/attention.py) does all three, and at batch 1 its dozen ops cost more than the
// arithmetic. Each (query row, KV head) is one task: the scores of the KV head's query heads, an
// exact softmax (max subtracted) and the weighted values. Tasks spread over OpenMP threads. A chunk's
// rows each read their keys again (no tiling), so long chunks belong to the torch path's matmuls.
//
// Built with -ffinite-math-only -fno-signed-zeros (this file alone) so that the clamp in exp_neg
// and the reductions vectorize; inputs are finite (the torch reference gives NaN otherwise too).
#include "attention.h"
#include "vec_math.h"

#include <algorithm>
#include <cmath>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace selfeval_cpu {
namespace {

const float* cf32(uintptr_t p) { return reinterpret_cast<const float*>(p); }
float* f32(uintptr_t p) { return reinterpret_cast<float*>(p); }
const int32_t* i32(uintptr_t p) { return reinterpret_cast<const int32_t*>(p); }

// GCC vector types: each clone of attend lowers a v16 to one AVX-512 register, two AVX2 or four
// SSE ones. Loads and stores go through memcpy (no alignment assumed).
typedef float v16 __attribute__((vector_size(64)));
typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));

inline v16 load16(const float* p) {
  v16 v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}

inline void store16(float* p, v16 v) { __builtin_memcpy(p, &v, sizeof v); }

inline float hsum(v16 a) {
  const v8 b = __builtin_shufflevector(a, a, 0, 1, 2, 3, 4, 5, 6, 7) +
               __builtin_shufflevector(a, a, 8, 9, 10, 11, 12, 13, 14, 15);
  const v4 c = __builtin_shufflevector(b, b, 0, 1, 2, 3) + __builtin_shufflevector(b, b, 4, 5, 6, 7);
  return (c[0] + c[2]) + (c[1] + c[3]);
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
// horizontal sum each), and its V row once for all their accumulators. Cloned per vector ISA
// (AVX-512, AVX2, baseline) and picked when the module loads.
template <int64_t DIM>
__attribute__((target_clones("avx512f", "avx2", "default"))) void attend(
    const float* q, int64_t q_s1, int64_t group, const float* kc, const float* vc, int64_t c_s0,
    const int64_t* blk, int64_t n_ctx, int64_t block_size, int64_t dim, float scale, float* scores,
    float* acc, float* out) {
  for (int64_t j = 0, n0 = 0; n0 < n_ctx; ++j, n0 += block_size) {
    const int64_t len = std::min(block_size, n_ctx - n0);
    const float* kb = kc + blk[j] * block_size * c_s0;
    if constexpr (DIM > 0) {
      for (int64_t i = 0; i < len; ++i) {
        v16 k[DIM / 16];
        for (int64_t c = 0; c < DIM / 16; ++c) k[c] = load16(kb + i * c_s0 + 16 * c);
        for (int64_t g = 0; g < group; ++g) {
          const float* qg = q + g * q_s1;
          v16 s = load16(qg) * k[0];
          for (int64_t c = 1; c < DIM / 16; ++c) s += load16(qg + 16 * c) * k[c];
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
        v16 v[DIM / 16];
        for (int64_t c = 0; c < DIM / 16; ++c) v[c] = load16(vn + 16 * c);
        for (int64_t g = 0; g < group; ++g) {
          const float p = scores[g * n_ctx + n0 + i];
          float* a = acc + g * DIM;
          for (int64_t c = 0; c < DIM / 16; ++c) store16(a + 16 * c, load16(a + 16 * c) + p * v[c]);
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
    float total = 0.0f;
#pragma omp simd reduction(+ : total)
    for (int64_t n = 0; n < n_ctx; ++n) total += sg[n];
    const float inv = 1.0f / total;
    for (int64_t d = 0; d < dim; ++d) out[g * dim + d] = acc[g * dim + d] * inv;
  }
}


}  // namespace

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
  std::vector<int64_t> row_seq(tokens), row_keys(tokens);
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
      const int64_t q_len = static_cast<int64_t>(qsl[b + 1]) - qsl[b];
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
  const int64_t group = heads / kv_heads, tasks = tokens * kv_heads;
  const float fscale = static_cast<float>(scale);
  auto* run = dim == 16    ? &attend<16>
              : dim == 32  ? &attend<32>
              : dim == 64  ? &attend<64>
              : dim == 128 ? &attend<128>
              : dim == 256 ? &attend<256>
                           : &attend<0>;
  // Each thread's scratch, allocated here: a failed allocation raises MemoryError in the caller
  // (inside the parallel region it would terminate the process).
  const int64_t team = threads > 1 && tasks > 1 ? threads : 1;
  const int64_t per_thread = group * std::max<int64_t>(longest, 1) + group * dim;
  std::vector<float> scratch(team * per_thread);
#pragma omp parallel num_threads(static_cast<int>(team)) if (team > 1)
  {
#ifdef _OPENMP
    float* scores = scratch.data() + omp_get_thread_num() * per_thread;
#else
    float* scores = scratch.data();
#endif
    float* acc = scores + group * std::max<int64_t>(longest, 1);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t t = task / kv_heads, h = task % kv_heads, b = row_seq[t];
      float* o = f32(out) + (t * heads + h * group) * dim;
      if (row_keys[t] == 0) {
        std::fill(o, o + group * dim, 0.0f);
        continue;
      }
      run(cf32(q) + t * q_s0 + h * group * q_s1, q_s1, group, cf32(k_cache) + h * c_s1, cf32(v_cache) + h * c_s1,
          c_s0, blocks.data() + first[b], row_keys[t], block_size, dim, fscale, scores, acc, o);
    }
  }
  return {};
}

}  // namespace selfeval_cpu
