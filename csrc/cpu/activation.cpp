// SiLU-and-mul on the CPU (engine._cpu.silu_and_mul), float32.
//
// silu(g) = g * sigmoid(g) with sigmoid from e^-|g| (exp_neg, vectorized): 1 / (1 + e) for g >= 0,
// e / (1 + e) below, so the exponential never overflows. Within ~3e-7 relative of torch's
// g / (1 + e^-g) (its exp is another vectorized one); a std::exp loop was 4x slower than torch's
// two ops at 16 rows. Built with attention.cpp's relaxed flags (inputs are finite). Each element's
// arithmetic is the same in the vector body and the scalar tail, and a row's columns fall the same
// way on any thread, so the bits do not depend on the row count or the thread count.
#include "activation.h"
#include "isa.h"
#include "vec_math.h"

#include <algorithm>

namespace selfeval_cpu {
namespace {

const float* cf32(uintptr_t p) { return reinterpret_cast<const float*>(p); }
float* f32(uintptr_t p) { return reinterpret_cast<float*>(p); }

SELFEVAL_CLONES void silu_row(const float* gate, const float* up, float* out, int64_t n) {
  // Written so that GCC vectorizes every clone: min(g, -g) for -|g| (fabs left the AVX2 and
  // baseline loops scalar) and the sign's select through a bit mask (a ?: did the same).
  for (int64_t c = 0; c < n; ++c) {
    const float g = gate[c];
    const float e = exp_neg(std::min(g, -g));  // e^-|g|
    const float s = 1.0f / (1.0f + e);         // sigmoid(|g|)
    const float t = e * s;                     // sigmoid(-|g|)
    const int32_t neg = -static_cast<int32_t>(g < 0.0f);  // all ones where the gate is negative
    const float sig = __builtin_bit_cast(
        float, (__builtin_bit_cast(int32_t, s) & ~neg) | (__builtin_bit_cast(int32_t, t) & neg));
    out[c] = g * sig * up[c];
  }
}

}  // namespace

void silu_and_mul(uintptr_t x, uintptr_t out, int64_t rows, int64_t inter, int64_t x_stride, int64_t threads) {
#pragma omp parallel for num_threads(static_cast<int>(threads)) if (threads > 1 && rows >= kParallelRows)
  for (int64_t r = 0; r < rows; ++r) {
    const float* gate = cf32(x) + r * x_stride;
    silu_row(gate, gate + inter, f32(out) + r * inter, inter);
  }
}

}  // namespace selfeval_cpu
