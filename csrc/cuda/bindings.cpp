// engine._cuda: CUDA kernels on raw device pointers (built only when a CUDA toolkit is found).
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace selfeval {
int launch_copy_blocks(uint64_t caches, int64_t num_caches, int64_t block_bytes, uint64_t pairs,
                       int64_t num_pairs, uint64_t stream);
}

namespace py = pybind11;

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "selfeval-engine CUDA kernels (raw device pointers, caller's stream)";
  m.def(
      "copy_blocks",
      [](uint64_t caches, int64_t num_caches, int64_t block_bytes, uint64_t pairs,
         int64_t num_pairs, uint64_t stream) {
        int err = selfeval::launch_copy_blocks(caches, num_caches, block_bytes, pairs, num_pairs,
                                               stream);
        if (err != 0) {
          throw std::runtime_error(std::string("copy_blocks launch failed: ") +
                                   cudaGetErrorString(static_cast<cudaError_t>(err)));
        }
      },
      py::arg("caches"), py::arg("num_caches"), py::arg("block_bytes"), py::arg("pairs"),
      py::arg("num_pairs"), py::arg("stream"),
      "Copy block pairs[i, 0] to pairs[i, 1] in each cache (device uint64 array of base pointers).");
}
