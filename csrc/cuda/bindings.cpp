// engine._cuda: CUDA kernels on raw device pointers (built only when a CUDA toolkit is found).
// Python passes data_ptr()s, strides and torch's current stream; nothing here links against torch.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace selfeval {
int launch_copy_blocks(uint64_t caches, int64_t num_caches, int64_t block_bytes, uint64_t pairs,
                       int64_t num_pairs, uint64_t stream);
int launch_store_kv(uint64_t k, uint64_t v, uint64_t k_cache, uint64_t v_cache, uint64_t slots,
                    int64_t num_tokens, int64_t k_stride_bytes, int64_t v_stride_bytes,
                    int64_t row_bytes, uint64_t stream);
}  // namespace selfeval

namespace py = pybind11;

static void check(int err, const char* what) {
  if (err != 0) {
    throw std::runtime_error(std::string(what) + " launch failed: " +
                             cudaGetErrorString(static_cast<cudaError_t>(err)));
  }
}

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "selfeval-engine CUDA kernels (raw device pointers, caller's stream)";
  m.def(
      "copy_blocks",
      [](uint64_t caches, int64_t num_caches, int64_t block_bytes, uint64_t pairs,
         int64_t num_pairs, uint64_t stream) {
        check(selfeval::launch_copy_blocks(caches, num_caches, block_bytes, pairs, num_pairs,
                                           stream),
              "copy_blocks");
      },
      py::arg("caches"), py::arg("num_caches"), py::arg("block_bytes"), py::arg("pairs"),
      py::arg("num_pairs"), py::arg("stream"),
      "Copy block pairs[i, 0] to pairs[i, 1] in each cache (device uint64 array of base pointers).");
  m.def(
      "store_kv",
      [](uint64_t k, uint64_t v, uint64_t k_cache, uint64_t v_cache, uint64_t slots,
         int64_t num_tokens, int64_t k_stride_bytes, int64_t v_stride_bytes, int64_t row_bytes,
         uint64_t stream) {
        check(selfeval::launch_store_kv(k, v, k_cache, v_cache, slots, num_tokens, k_stride_bytes,
                                        v_stride_bytes, row_bytes, stream),
              "store_kv");
      },
      py::arg("k"), py::arg("v"), py::arg("k_cache"), py::arg("v_cache"), py::arg("slots"),
      py::arg("num_tokens"), py::arg("k_stride_bytes"), py::arg("v_stride_bytes"),
      py::arg("row_bytes"), py::arg("stream"),
      "Write each token's K and V row (row_bytes, same dtype as the cache) to its int64 slot.");
}
