// Device helpers shared by the kernels: element types, vector access, Welford merges, reductions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "ldm_kernels.h"

namespace ldm {

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// VEC elements moved as one access (16 bytes when VEC * sizeof(T) == 16).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ Vec<T, VEC> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, VEC>*>(p);
}
template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, VEC>& v) {
  *reinterpret_cast<Vec<T, VEC>*>(p) = v;
}

// Running (count, mean, M2) statistics; merged with Chan et al.'s formula.
struct Welford {
  float n = 0.f, mean = 0.f, m2 = 0.f;
  __device__ __forceinline__ void merge(float nb, float mean_b, float m2_b) {
    const float tot = n + nb;
    if (tot == 0.f) return;
    const float delta = mean_b - mean;
    const float fb = nb / tot;
    mean += delta * fb;
    m2 += m2_b + delta * delta * n * fb;
    n = tot;
  }
  __device__ __forceinline__ void merge(const Welford& o) { merge(o.n, o.mean, o.m2); }
};

__device__ __forceinline__ Welford warp_reduce_welford(Welford w) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    Welford o;
    o.n = __shfl_xor_sync(0xffffffffu, w.n, offset);
    o.mean = __shfl_xor_sync(0xffffffffu, w.mean, offset);
    o.m2 = __shfl_xor_sync(0xffffffffu, w.m2, offset);
    w.merge(o);
  }
  return w;
}

// Block-wide Welford reduction; every thread gets the result. `scratch` holds 3 * 32 floats.
__device__ __forceinline__ Welford block_reduce_welford(Welford w, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nwarps = (blockDim.x + 31) >> 5;
  w = warp_reduce_welford(w);
  __syncthreads();  // scratch may still be read by a previous reduction
  if (lane == 0) {
    scratch[warp] = w.n;
    scratch[32 + warp] = w.mean;
    scratch[64 + warp] = w.m2;
  }
  __syncthreads();
  Welford r;
  if (lane < nwarps) {
    r.n = scratch[lane];
    r.mean = scratch[32 + lane];
    r.m2 = scratch[64 + lane];
  }
  return warp_reduce_welford(r);
}

__device__ __forceinline__ float warp_reduce_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Block-wide sum; every thread gets the result. `scratch` holds 32 floats.
__device__ __forceinline__ float block_reduce_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nwarps = (blockDim.x + 31) >> 5;
  v = warp_reduce_sum(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < nwarps ? scratch[lane] : 0.f;
  return warp_reduce_sum(v);
}

__device__ __forceinline__ float silu_f(float x) { return x / (1.f + __expf(-x)); }

}  // namespace ldm
