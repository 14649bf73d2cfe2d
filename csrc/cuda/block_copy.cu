// Copy-on-write block copy: every (src, dst) pair of every cache tensor in one launch.
// Raw device pointers and the caller's stream; no torch ABI.
#include <cuda_runtime.h>

#include <cstdint>

namespace selfeval {

__global__ void copy_blocks_kernel(const uint64_t* __restrict__ caches, int64_t block_bytes,
                                   const int32_t* __restrict__ pairs) {
  const int pair = blockIdx.x;
  char* base = reinterpret_cast<char*>(caches[blockIdx.y]);
  const int64_t src = static_cast<int64_t>(pairs[2 * pair]) * block_bytes;
  const int64_t dst = static_cast<int64_t>(pairs[2 * pair + 1]) * block_bytes;
  if ((block_bytes & 15) == 0) {  // 16-byte vectors when the block size allows
    const int4* s = reinterpret_cast<const int4*>(base + src);
    int4* d = reinterpret_cast<int4*>(base + dst);
    for (int64_t i = threadIdx.x; i < block_bytes / 16; i += blockDim.x) d[i] = s[i];
  } else {
    for (int64_t i = threadIdx.x; i < block_bytes; i += blockDim.x) base[dst + i] = base[src + i];
  }
}

int launch_copy_blocks(uint64_t caches, int64_t num_caches, int64_t block_bytes, uint64_t pairs,
                       int64_t num_pairs, uint64_t stream) {
  if (num_pairs == 0 || num_caches == 0) return 0;
  dim3 grid(static_cast<unsigned>(num_pairs), static_cast<unsigned>(num_caches));
  copy_blocks_kernel<<<grid, 256, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      reinterpret_cast<const uint64_t*>(caches), block_bytes,
      reinterpret_cast<const int32_t*>(pairs));
  return static_cast<int>(cudaGetLastError());
}

}  // namespace selfeval
