// CPU kernels for the small ops of a step (engine._cpu), float32 only (the block copy: any dtype).
//
// At batch 1 a decode step of a small model on the CPU is dominated not by its matmuls but by the
// dozens of small torch ops around them, each costing microseconds of dispatch for nanoseconds of
// work (RoPE alone is ~12 ops a layer). These loops do one op's work in one call, as vLLM's CPU
// backend does. Tensors arrive as raw pointers with their strides (kernels/cpu_ops.py checks dtype,
// device, shapes and layout, so every pointer and stride stays inside its tensor); no torch ABI.
// The GIL is released while they run. Built with -ffp-contract=off so that, like torch,
// a*b + c*d rounds each product: RoPE matches the torch reference bit for bit.
#include <pybind11/pybind11.h>

#include "activation.h"
#include "attention.h"
#include "sampling.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

namespace {

float* f32(uintptr_t p) { return reinterpret_cast<float*>(p); }
const int64_t* i64(uintptr_t p) { return reinterpret_cast<const int64_t*>(p); }

// out[r] = (x[r] + res[r]) * rsqrt(mean((x[r] + res[r])^2) + eps) * w; res_out[r] = x[r] + res[r].
// has_res false: x alone, res_out unused. Sums of squares in double (torch's float32 mean is a
// pairwise sum: the two agree to float32 rounding).
// Rows spread over `threads` OpenMP threads from selfeval_cpu::kParallelRows rows on (activation.h).
using selfeval_cpu::kParallelRows;

void rms_norm(uintptr_t x, uintptr_t res, uintptr_t w, uintptr_t out, uintptr_t res_out, int64_t rows,
              int64_t cols, int64_t x_stride, int64_t res_stride, double eps, bool has_res, int64_t threads) {
  const float* weight = f32(w);
#pragma omp parallel for num_threads(static_cast<int>(threads)) if (threads > 1 && rows >= kParallelRows)
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = f32(x) + r * x_stride;
    float* o = f32(out) + r * cols;
    const float* h = xr;
    if (has_res) {
      const float* rr = f32(res) + r * res_stride;
      float* ro = f32(res_out) + r * cols;
      for (int64_t c = 0; c < cols; ++c) ro[c] = xr[c] + rr[c];
      h = ro;
    }
    double sum = 0.0;
    for (int64_t c = 0; c < cols; ++c) sum += static_cast<double>(h[c]) * h[c];
    const float mean = static_cast<float>(sum / static_cast<double>(cols));
    const float rstd = 1.0f / std::sqrt(mean + static_cast<float>(eps));
    for (int64_t c = 0; c < cols; ++c) o[c] = (h[c] * rstd) * weight[c];
  }
}

// Rotate-half RoPE on q (into q_out [T, H, D] contiguous) and k (straight into k_cache at the
// token's slot), and v copied to v_cache at the same slot. cos_sin [positions, D]: cos in the
// first half, sin in the second; num_positions and num_slots bound positions and slots.
void rotary_store_kv(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t q_out, uintptr_t k_cache,
                     uintptr_t v_cache, uintptr_t positions, uintptr_t slots, uintptr_t cos_sin,
                     int64_t num_positions, int64_t num_slots, int64_t tokens, int64_t heads,
                     int64_t kv_heads, int64_t dim, int64_t q_s0, int64_t q_s1, int64_t k_s0, int64_t k_s1,
                     int64_t v_s0, int64_t v_s1, int64_t c_s0, int64_t c_s1) {
  // Copied, then checked before anything is written (an index out of range raises IndexError, as
  // torch's would); only the copies are used, so another thread changing the tensors while the GIL
  // is released cannot slip an unchecked index in.
  std::vector<int64_t> pos_of(i64(positions), i64(positions) + tokens);
  std::vector<int64_t> slot_of(i64(slots), i64(slots) + tokens);
  for (int64_t t = 0; t < tokens; ++t) {
    if (pos_of[t] < 0 || pos_of[t] >= num_positions)
      throw py::index_error("rotary_store_kv: position " + std::to_string(pos_of[t]) + " outside the rotary table");
    if (slot_of[t] < 0 || slot_of[t] >= num_slots)
      throw py::index_error("rotary_store_kv: slot " + std::to_string(slot_of[t]) + " outside the KV cache");
  }
  const int64_t half = dim / 2;
  auto rotate = [half](const float* src, float* dst, const float* cs) {
    const float* cos = cs;
    const float* sin = cs + half;
    for (int64_t i = 0; i < half; ++i) {
      const float x1 = src[i], x2 = src[half + i];
      const float a = x1 * cos[i], b = -x2 * sin[i];  // torch: x * cos + cat(-x2, x1) * sin
      const float c = x2 * cos[i], d = x1 * sin[i];
      dst[i] = a + b;
      dst[half + i] = c + d;
    }
  };
  for (int64_t t = 0; t < tokens; ++t) {
    const float* cs = f32(cos_sin) + pos_of[t] * dim;
    for (int64_t h = 0; h < heads; ++h)
      rotate(f32(q) + t * q_s0 + h * q_s1, f32(q_out) + (t * heads + h) * dim, cs);
    const int64_t slot = slot_of[t];
    for (int64_t h = 0; h < kv_heads; ++h) {
      rotate(f32(k) + t * k_s0 + h * k_s1, f32(k_cache) + slot * c_s0 + h * c_s1, cs);
      const float* vs = f32(v) + t * v_s0 + h * v_s1;
      float* vd = f32(v_cache) + slot * c_s0 + h * c_s1;
      for (int64_t i = 0; i < dim; ++i) vd[i] = vs[i];
    }
  }
}

// Copy-on-write: for each (src, dst) pair, block src of each of the `caches` caches into block
// dst, every block `block_bytes` long, `blocks` to a cache, caches back to back (the runner's
// [C, blocks, numel] view, any dtype). All sources are read before any block is written, as the
// torch reference's one gather and one scatter. One thread: a few kilobytes a pair, and the torch
// reference's parallel gather waited on its threads whenever the server's processes held the
// cores (bench/serve_load.py). Pairs are checked before anything is copied.
std::string copy_blocks(uintptr_t base, int64_t caches, int64_t blocks, int64_t block_bytes, uintptr_t pairs,
                        int64_t n_pairs) {
  std::vector<int64_t> p(i64(pairs), i64(pairs) + 2 * n_pairs);
  for (int64_t i = 0; i < 2 * n_pairs; ++i)
    if (p[i] < 0 || p[i] >= blocks) return "copy_blocks: block " + std::to_string(p[i]) + " outside the cache";
  char* data = reinterpret_cast<char*>(base);
  std::vector<char> staged(static_cast<size_t>(n_pairs * caches * block_bytes));
  for (int64_t i = 0; i < n_pairs; ++i)
    for (int64_t c = 0; c < caches; ++c)
      std::memcpy(staged.data() + (i * caches + c) * block_bytes, data + (c * blocks + p[2 * i]) * block_bytes,
                  block_bytes);
  for (int64_t i = 0; i < n_pairs; ++i)
    for (int64_t c = 0; c < caches; ++c)
      std::memcpy(data + (c * blocks + p[2 * i + 1]) * block_bytes, staged.data() + (i * caches + c) * block_bytes,
                  block_bytes);
  return {};
}

}  // namespace

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "selfeval-engine CPU kernels for the small ops of a decode step (float32)";
  m.def("rms_norm", &rms_norm, py::call_guard<py::gil_scoped_release>());
  m.def("silu_and_mul", &selfeval_cpu::silu_and_mul, py::call_guard<py::gil_scoped_release>());
  m.def("sampling_uniforms", &selfeval_cpu::sampling_uniforms, py::call_guard<py::gil_scoped_release>());
  m.def("rotary_store_kv", &rotary_store_kv, py::call_guard<py::gil_scoped_release>());
  m.def(
      "copy_blocks",
      [](uintptr_t base, int64_t caches, int64_t blocks, int64_t block_bytes, uintptr_t pairs, int64_t n_pairs) {
        const std::string error = copy_blocks(base, caches, blocks, block_bytes, pairs, n_pairs);
        if (!error.empty()) throw py::index_error(error);
      },
      py::call_guard<py::gil_scoped_release>());
  m.def("isa", &selfeval_cpu::cpu_isa);
  m.def("set_isa", [](const std::string& name) {
    const std::string error = selfeval_cpu::set_cpu_isa(name);
    if (!error.empty()) throw py::value_error(error);
  });
  m.def(
      "paged_attention",
      [](uintptr_t q, uintptr_t k_cache, uintptr_t v_cache, uintptr_t out, uintptr_t block_tables,
         uintptr_t context_lens, uintptr_t query_start_loc, int64_t seqs, int64_t tokens, int64_t heads,
         int64_t kv_heads, int64_t dim, int64_t block_size, int64_t num_blocks, int64_t table_width,
         int64_t table_stride, int64_t q_s0, int64_t q_s1, int64_t c_s0, int64_t c_s1, double scale,
         int64_t threads) {
        const std::string error = selfeval_cpu::paged_attention(
            q, k_cache, v_cache, out, block_tables, context_lens, query_start_loc, seqs, tokens, heads, kv_heads,
            dim, block_size, num_blocks, table_width, table_stride, q_s0, q_s1, c_s0, c_s1, scale, threads);
        if (!error.empty()) throw py::index_error(error);
      },
      py::call_guard<py::gil_scoped_release>());
}
