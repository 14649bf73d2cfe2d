// The seeded sampler's uniforms on the CPU (engine._cpu.sampling_uniforms).
//
// kernels/sampling.py draws a row's Gumbel noise from uniform_from_bits(_hash32(row_key ^ col_key))
// in int64 tensor ops: a dozen passes over [rows, vocab], each allocating (370 ms for 64 x 128,256
// on one core). Here the same hash runs in one pass in uint32 arithmetic: the reference's int64
// products masked to 32 bits are exactly these wrapped ones, and the float32 steps (the top 24
// bits converted, + 0.5, / 2^24, clamped below 1) are the same IEEE operations, so every uniform
// is bit-identical to the reference's (tested). Built with the strict flags (no contraction, no
// relaxed math); each element is independent, so the bits do not depend on the thread count.
#include "sampling.h"
#include "isa.h"

namespace selfeval_cpu {
namespace {

constexpr float kUMax = 1.0f - 1.0f / 16777216.0f;  // kernels.sampling.U_MAX

SELFEVAL_CLONES void uniforms_row(uint32_t key, const int64_t* cols, float* out, int64_t n) {
  for (int64_t c = 0; c < n; ++c) {
    uint32_t x = key ^ static_cast<uint32_t>(cols[c]);
    x = (x ^ (x >> 16)) * 0x7FEB352Du;
    x = (x ^ (x >> 15)) * 0x5BD1E995u;
    x ^= x >> 16;
    // x >> 8 < 2^24 converts exactly (through int32: the vector conversion); k + 0.5 rounds as
    // torch's float32 add does (to even, from 2^23 on), and / 2^24 is exact.
    const float u = (static_cast<float>(static_cast<int32_t>(x >> 8)) + 0.5f) / 16777216.0f;
    out[c] = u < kUMax ? u : kUMax;
  }
}

}  // namespace

void sampling_uniforms(uintptr_t row_keys, uintptr_t col_keys, uintptr_t out, int64_t rows, int64_t vocab,
                       int64_t threads) {
  const int64_t* rk = reinterpret_cast<const int64_t*>(row_keys);
  const int64_t* ck = reinterpret_cast<const int64_t*>(col_keys);
  float* u = reinterpret_cast<float*>(out);
#pragma omp parallel for num_threads(static_cast<int>(threads)) if (threads > 1 && rows * vocab >= (1 << 16))
  for (int64_t r = 0; r < rows; ++r) {
    uniforms_row(static_cast<uint32_t>(rk[r]), ck, u + r * vocab, vocab);
  }
}

}  // namespace selfeval_cpu
