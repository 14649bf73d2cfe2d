// The seeded sampler's uniforms on the CPU (float32), see sampling.cpp.
#pragma once

#include <cstdint>

namespace selfeval_cpu {

// out[r * vocab + c] = kernels.sampling's uniform for row key row_keys[r] and column key
// col_keys[c] (int64 holding 32-bit values): rows x vocab float32, contiguous.
void sampling_uniforms(uintptr_t row_keys, uintptr_t col_keys, uintptr_t out, int64_t rows, int64_t vocab,
                       int64_t threads);

}  // namespace selfeval_cpu
