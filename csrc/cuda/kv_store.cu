// KV store: each new token's K and V rows (heads x head_dim, contiguous) into their cache slots.
// The cache and the inputs share one element type, so a row moves as raw bytes.
#include <cuda_runtime.h>

#include <cstdint>

namespace selfeval {

__global__ void store_kv_kernel(const char* __restrict__ k, const char* __restrict__ v,
                                char* __restrict__ k_cache, char* __restrict__ v_cache,
                                const int64_t* __restrict__ slots, int64_t k_stride_bytes,
                                int64_t v_stride_bytes, int64_t row_bytes) {
  const int64_t t = blockIdx.x;
  const int64_t slot = slots[t];
  const char* ks = k + t * k_stride_bytes;
  const char* vs = v + t * v_stride_bytes;
  char* kd = k_cache + slot * row_bytes;
  char* vd = v_cache + slot * row_bytes;
  const bool vec = ((row_bytes | k_stride_bytes | v_stride_bytes) & 15) == 0 &&
                   ((reinterpret_cast<uintptr_t>(k) | reinterpret_cast<uintptr_t>(v) |
                     reinterpret_cast<uintptr_t>(k_cache) | reinterpret_cast<uintptr_t>(v_cache)) &
                    15) == 0;
  if (vec) {
    for (int64_t i = threadIdx.x; i < row_bytes / 16; i += blockDim.x) {
      reinterpret_cast<int4*>(kd)[i] = reinterpret_cast<const int4*>(ks)[i];
      reinterpret_cast<int4*>(vd)[i] = reinterpret_cast<const int4*>(vs)[i];
    }
  } else {
    for (int64_t i = threadIdx.x; i < row_bytes; i += blockDim.x) {
      kd[i] = ks[i];
      vd[i] = vs[i];
    }
  }
}

int launch_store_kv(uint64_t k, uint64_t v, uint64_t k_cache, uint64_t v_cache, uint64_t slots,
                    int64_t num_tokens, int64_t k_stride_bytes, int64_t v_stride_bytes,
                    int64_t row_bytes, uint64_t stream) {
  if (num_tokens == 0) return 0;
  store_kv_kernel<<<static_cast<unsigned>(num_tokens), 128, 0,
                    reinterpret_cast<cudaStream_t>(stream)>>>(
      reinterpret_cast<const char*>(k), reinterpret_cast<const char*>(v),
      reinterpret_cast<char*>(k_cache), reinterpret_cast<char*>(v_cache),
      reinterpret_cast<const int64_t*>(slots), k_stride_bytes, v_stride_bytes, row_bytes);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace selfeval
