// Paged decode attention, one thread block per (sequence, query head). Each warp walks every
// NUM_WARPS-th key with its own online softmax; lanes hold HEAD_DIM / 32 elements of q, k, v and a
// warp reduction forms each score; the warps' partial results merge through shared memory.
#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>

#include "dtypes.cuh"

namespace selfeval {

constexpr int kWarps = 4;

template <typename T, int HEAD_DIM>
__global__ void decode_attention_kernel(const T* __restrict__ q, const T* __restrict__ k_cache,
                                        const T* __restrict__ v_cache,
                                        const int32_t* __restrict__ block_tables,
                                        const int32_t* __restrict__ context_lens, T* __restrict__ out,
                                        int64_t q_stride_t, int64_t q_stride_h, int64_t o_stride_t,
                                        int64_t o_stride_h, int64_t cache_stride_slot,
                                        int64_t cache_stride_head, int64_t table_stride, int group,
                                        int block_size, float scale) {
  constexpr int kPerLane = HEAD_DIM / 32;
  const int b = blockIdx.x, h = blockIdx.y, kvh = h / group;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int ctx = context_lens[b];
  const int32_t* table = block_tables + b * table_stride;

  float qv[kPerLane], acc[kPerLane];
  const T* qp = q + b * q_stride_t + h * q_stride_h + lane * kPerLane;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    qv[i] = to_float(qp[i]) * scale;
    acc[i] = 0.f;
  }
  float m = -FLT_MAX, den = 0.f;
  for (int pos = warp; pos < ctx; pos += kWarps) {
    const int64_t slot = static_cast<int64_t>(table[pos / block_size]) * block_size + pos % block_size;
    const int64_t off = slot * cache_stride_slot + kvh * cache_stride_head + lane * kPerLane;
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) s += qv[i] * to_float(k_cache[off + i]);
#pragma unroll
    for (int w = 16; w > 0; w /= 2) s += __shfl_xor_sync(0xffffffffu, s, w);
    const float m_new = fmaxf(m, s);
    const float alpha = __expf(m - m_new), p = __expf(s - m_new);
    den = den * alpha + p;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) acc[i] = acc[i] * alpha + p * to_float(v_cache[off + i]);
    m = m_new;
  }

  __shared__ float warp_m[kWarps], warp_den[kWarps], warp_acc[kWarps][HEAD_DIM];
  if (lane == 0) {
    warp_m[warp] = m;
    warp_den[warp] = den;
  }
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) warp_acc[warp][lane * kPerLane + i] = acc[i];
  __syncthreads();
  float m_all = -FLT_MAX;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) m_all = fmaxf(m_all, warp_m[w]);
  float total = 0.f, weights[kWarps];
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    weights[w] = warp_den[w] > 0.f ? __expf(warp_m[w] - m_all) : 0.f;
    total += weights[w] * warp_den[w];
  }
  T* op = out + b * o_stride_t + h * o_stride_h;
  for (int d = threadIdx.x; d < HEAD_DIM; d += blockDim.x) {
    float o = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) o += weights[w] * warp_acc[w][d];
    op[d] = from_float<T>(total > 0.f ? o / total : 0.f);
  }
}

template <typename T, int HEAD_DIM>
static void launch(uint64_t q, uint64_t k_cache, uint64_t v_cache, uint64_t block_tables,
                   uint64_t context_lens, uint64_t out, int64_t batch, int64_t num_heads,
                   int64_t q_stride_t, int64_t q_stride_h, int64_t o_stride_t, int64_t o_stride_h,
                   int64_t cache_stride_slot, int64_t cache_stride_head, int64_t table_stride,
                   int group, int block_size, float scale, cudaStream_t stream) {
  dim3 grid(static_cast<unsigned>(batch), static_cast<unsigned>(num_heads));
  decode_attention_kernel<T, HEAD_DIM><<<grid, kWarps * 32, 0, stream>>>(
      reinterpret_cast<const T*>(q), reinterpret_cast<const T*>(k_cache),
      reinterpret_cast<const T*>(v_cache), reinterpret_cast<const int32_t*>(block_tables),
      reinterpret_cast<const int32_t*>(context_lens), reinterpret_cast<T*>(out), q_stride_t,
      q_stride_h, o_stride_t, o_stride_h, cache_stride_slot, cache_stride_head, table_stride,
      group, block_size, scale);
}

// Returns a cudaError_t, or -1 for an unsupported dtype / head_dim (the caller falls back).
int launch_decode_attention(uint64_t q, uint64_t k_cache, uint64_t v_cache, uint64_t block_tables,
                            uint64_t context_lens, uint64_t out, int64_t batch, int64_t num_heads,
                            int64_t head_dim, int dtype, int64_t q_stride_t, int64_t q_stride_h,
                            int64_t o_stride_t, int64_t o_stride_h, int64_t cache_stride_slot,
                            int64_t cache_stride_head, int64_t table_stride, int group,
                            int block_size, float scale, uint64_t stream_handle) {
  if (batch == 0) return 0;
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
#define SELFEVAL_DECODE(T, D)                                                                   \
  launch<T, D>(q, k_cache, v_cache, block_tables, context_lens, out, batch, num_heads,         \
               q_stride_t, q_stride_h, o_stride_t, o_stride_h, cache_stride_slot,              \
               cache_stride_head, table_stride, group, block_size, scale, stream)
#define SELFEVAL_DECODE_DIMS(T)         \
  switch (head_dim) {                   \
    case 64: SELFEVAL_DECODE(T, 64); break;   \
    case 128: SELFEVAL_DECODE(T, 128); break; \
    case 256: SELFEVAL_DECODE(T, 256); break; \
    default: return -1;                 \
  }
  switch (dtype) {
    case kFloat32: SELFEVAL_DECODE_DIMS(float); break;
    case kFloat16: SELFEVAL_DECODE_DIMS(__half); break;
    case kBFloat16: SELFEVAL_DECODE_DIMS(__nv_bfloat16); break;
    default: return -1;
  }
#undef SELFEVAL_DECODE_DIMS
#undef SELFEVAL_DECODE
  return static_cast<int>(cudaGetLastError());
}

}  // namespace selfeval
