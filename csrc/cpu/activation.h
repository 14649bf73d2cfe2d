// SiLU-and-mul on the CPU (float32), see activation.cpp.
#pragma once

#include <cstdint>

namespace selfeval_cpu {

// Row-wise CPU kernels (RMSNorm, SiLU-and-mul) spread rows over OpenMP threads from this many rows
// on (a prompt's); each row's arithmetic is the same on any thread, so the bits do not depend on
// the count.
constexpr int64_t kParallelRows = 64;

// out[r] = silu(gate) * up for x[r] = [gate | up] (inter columns each, rows x_stride apart);
// out [rows, inter] contiguous. Pointers and strides come from kernels/cpu_ops.py.
void silu_and_mul(uintptr_t x, uintptr_t out, int64_t rows, int64_t inter, int64_t x_stride, int64_t threads);

}  // namespace selfeval_cpu
