// Paged attention on the CPU (float32), see attention.cpp.
#pragma once

#include <cstdint>
#include <string>

namespace selfeval_cpu {

// Returns an empty string, or the error (an index outside the table or cache) found before any
// read; pointers and strides come from kernels/cpu_ops.py, which checks dtypes and layouts.
// query_start_loc: int32 [seqs + 1] offsets of each sequence's query rows, or 0 for one query per
// sequence (a step of decodes: tokens == seqs).
std::string paged_attention(uintptr_t q, uintptr_t k_cache, uintptr_t v_cache, uintptr_t out,
                            uintptr_t block_tables, uintptr_t context_lens, uintptr_t query_start_loc,
                            int64_t seqs, int64_t tokens, int64_t heads, int64_t kv_heads, int64_t dim,
                            int64_t block_size, int64_t num_blocks, int64_t table_width, int64_t table_stride,
                            int64_t q_s0, int64_t q_s1, int64_t c_s0, int64_t c_s1, double scale, int64_t threads);

// The instruction set the attention kernels run with ("avx512f", "avx2" or "sse2"): the widest this
// CPU has unless set_cpu_isa chose a narrower one (tests and benchmarks compare them; every set
// gives the same bits). set_cpu_isa returns an error for a set this CPU lacks; "best" restores it.
std::string cpu_isa();
std::string set_cpu_isa(const std::string& name);

}  // namespace selfeval_cpu
