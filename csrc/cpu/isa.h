// Instruction-set dispatch shared by the CPU kernels.
#pragma once

// Builds per instruction set. On x86-64 (GCC or Clang, ELF) SELFEVAL_CLONES makes a function one
// clone each for AVX-512, AVX2 and the baseline, the loader picking the widest the CPU has, and
// attention.cpp instantiates its kernels per set. Elsewhere (ARM, Apple, or SELFEVAL_PORTABLE_CPU
// defined: the tests build that branch on x86 too) everything is built once, for the target's own
// 128-bit vectors.
#if defined(__x86_64__) && defined(__ELF__) && !defined(SELFEVAL_PORTABLE_CPU)
#define SELFEVAL_X86_DISPATCH 1
#define SELFEVAL_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SELFEVAL_X86_DISPATCH 0
#define SELFEVAL_CLONES
#endif
