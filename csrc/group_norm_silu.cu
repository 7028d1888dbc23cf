// GroupNorm (+ SiLU) with fp32 statistics, vectorised (16-byte accesses where aligned).
//
// Plans (chosen by group_norm_plan from shapes and the SM count, so the binding can size the workspace):
// - fused (channels-first, group <= kFusedThreads * kFusedItems vectors, and n * groups >= SMs or
//   groups too small to split, see group_norm_plan): one CTA per (n, group)
//   keeps the group in registers: exact two-pass mean/variance, then normalise + SiLU + store.
//   One read, one write, one launch -- the U-Net's small feature maps.
// - split (everything else): stats kernel writes Welford partials (count, mean, M2) per slice;
//   finalize merges them per (n, group) (Chan's formula) into per-(n, channel) scale/shift;
//   apply is a flat elementwise pass y = silu(x * scale + shift). The second read of x mostly
//   hits L2 for tensors that fit in it.
// weight / bias are read in x's dtype or in float32, as given (no per-call cast, no rounding).
#include <algorithm>

#include "cuda_utils.cuh"

namespace ldm {
namespace {

constexpr int kFusedThreads = 1024;
constexpr int kFusedItems = 5;  // vectors per thread held in registers (6 spilled: bf16, sm_90)
constexpr int kStatsThreads = 256;
constexpr int kStatsUnroll = 4;  // independent loads in flight per thread
constexpr int64_t kChunkTarget = 16384;  // elements per channels-first stats CTA
constexpr int64_t kMaxSplits = 1024;
constexpr int64_t kMinSliceElems = 2048;  // smallest channels-first slice the small-batch rule makes
constexpr int kClCols = 32, kClRows = 8;  // channels-last stats block: 32 column vectors x 8 rows
constexpr int64_t kClMaxSplits = 256;
constexpr int kApplyThreads = 256;
constexpr int kFinalizeThreads = 256;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// weight / bias: x's dtype T, or float32 when PF32 (read as is: fp32 parameters are not rounded to
// fp16 / bf16). A template parameter, not a runtime flag: the fused kernel runs at the 64-register
// cap of 1024 threads, where a runtime branch made ptxas spill (bf16, sm_90).
template <typename T, bool PF32>
__device__ __forceinline__ float param_or(const void* p, int64_t i, float dflt) {
  if (p == nullptr) return dflt;
  if constexpr (PF32) return static_cast<const float*>(p)[i];
  else return to_float(static_cast<const T*>(p)[i]);
}

// ------------------------------------------------------------------------------------------
template <typename T, int VEC, bool PF32>
__global__ void __launch_bounds__(kFusedThreads)
gn_fused_cf_kernel(const T* __restrict__ x, const void* __restrict__ w, const void* __restrict__ b, T* __restrict__ y, int c, int s, int groups, float eps, bool silu) {
  __shared__ float scratch[96];
  const int ng = blockIdx.x;
  const int g = ng % groups;
  const int cg = c / groups;
  const int e = cg * s;
  const int64_t base = int64_t(ng) * e;  // (n * G + g) * cg * s == n * C * S + g * cg * S
  const T* xg = x + base;
  T* yg = y + base;

  Vec<T, VEC> buf[kFusedItems];
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < kFusedItems; ++i) {
    const int idx = (i * kFusedThreads + int(threadIdx.x)) * VEC;
    if (idx < e) {
      buf[i] = load_vec<T, VEC>(xg + idx);
#pragma unroll
      for (int j = 0; j < VEC; ++j) sum += to_float(buf[i].v[j]);
    }
  }
  const float mean = block_reduce_sum(sum, scratch) / float(e);
  float sq = 0.f;
#pragma unroll
  for (int i = 0; i < kFusedItems; ++i) {
    const int idx = (i * kFusedThreads + int(threadIdx.x)) * VEC;
    if (idx < e) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float d = to_float(buf[i].v[j]) - mean;
        sq += d * d;
      }
    }
  }
  const float var = block_reduce_sum(sq, scratch) / float(e);
  const float rstd = rsqrtf(var + eps);
#pragma unroll
  for (int i = 0; i < kFusedItems; ++i) {
    const int idx = (i * kFusedThreads + int(threadIdx.x)) * VEC;
    if (idx < e) {
      const int ch = g * cg + idx / s;  // s % VEC == 0: one channel per vector
      const float sc = rstd * param_or<T, PF32>(w, ch, 1.f);
      const float sh = param_or<T, PF32>(b, ch, 0.f) - mean * sc;
      Vec<T, VEC> out;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        float v = to_float(buf[i].v[j]) * sc + sh;
        if (silu) v = silu_f(v);
        out.v[j] = from_float<T>(v);
      }
      store_vec<T, VEC>(yg + idx, out);
    }
  }
}

// ------------------------------------------------------------------------------------------
// Channels-first statistics: grid (N * G, splits); CTA (ng, k) covers elements
// [k * chunk, min(E, (k + 1) * chunk)) of group ng's contiguous E = cg * S elements.
template <typename T, int VEC>
__global__ void __launch_bounds__(kStatsThreads)
gn_stats_cf_kernel(const T* __restrict__ x, float* __restrict__ partials, int64_t e, int64_t chunk, int splits) {
  __shared__ float scratch[96];
  const int64_t ng = blockIdx.x;
  const int k = blockIdx.y;
  const T* xg = x + ng * e;
  const int64_t begin = int64_t(k) * chunk;
  const int64_t end = min(e, begin + chunk);
  constexpr int64_t kStep = int64_t(kStatsThreads) * VEC;
  Welford acc;
  for (int64_t i0 = begin + int64_t(threadIdx.x) * VEC; i0 < end; i0 += kStep * kStatsUnroll) {
    Vec<T, VEC> v[kStatsUnroll];
#pragma unroll
    for (int u = 0; u < kStatsUnroll; ++u) {
      const int64_t i = i0 + u * kStep;
      if (i < end) v[u] = load_vec<T, VEC>(xg + i);
    }
#pragma unroll
    for (int u = 0; u < kStatsUnroll; ++u) {
      if (i0 + u * kStep < end) {
        float f[VEC];
        float sum = 0.f;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          f[j] = to_float(v[u].v[j]);
          sum += f[j];
        }
        const float m = sum * (1.f / VEC);
        float m2 = 0.f;
#pragma unroll
        for (int j = 0; j < VEC; ++j) m2 += (f[j] - m) * (f[j] - m);
        acc.merge(float(VEC), m, m2);
      }
    }
  }
  acc = block_reduce_welford(acc, scratch);
  if (threadIdx.x == 0) {
    float* p = partials + (ng * splits + k) * 3;
    p[0] = acc.n;
    p[1] = acc.mean;
    p[2] = acc.m2;
  }
}

// Channels-last statistics: grid (ceil(C / VEC / 32), splits, N), block (32, 8). Thread column
// `cv` owns channels [cv * VEC, cv * VEC + VEC) for every row of the slice, so a warp reads 32
// consecutive vectors of one row. Writes per-channel partials [(n * splits + k) * C + c].
template <typename T, int VEC>
__global__ void __launch_bounds__(kClCols * kClRows)
gn_stats_cl_kernel(const T* __restrict__ x, float* __restrict__ partials, int64_t s, int c, int64_t rows_per_split,
                   int splits) {
  __shared__ float sh_n[kClRows][kClCols];
  __shared__ float sh_mean[kClRows][kClCols * VEC];
  __shared__ float sh_m2[kClRows][kClCols * VEC];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int cv = blockIdx.x * kClCols + tx;
  const int k = blockIdx.y;
  const int64_t n = blockIdx.z;
  const int ncv = c / VEC;
  const int64_t r0 = int64_t(k) * rows_per_split;
  const int64_t r1 = min(s, r0 + rows_per_split);
  float mean[VEC], m2[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) mean[j] = m2[j] = 0.f;
  float cnt = 0.f;
  if (cv < ncv) {
    const T* xc = x + n * s * c + int64_t(cv) * VEC;
    for (int64_t r = r0 + ty; r < r1; r += int64_t(kClRows) * kStatsUnroll) {
      Vec<T, VEC> v[kStatsUnroll];
#pragma unroll
      for (int u = 0; u < kStatsUnroll; ++u) {
        const int64_t rr = r + int64_t(u) * kClRows;
        if (rr < r1) v[u] = load_vec<T, VEC>(xc + rr * c);
      }
#pragma unroll
      for (int u = 0; u < kStatsUnroll; ++u) {
        if (r + int64_t(u) * kClRows < r1) {
          cnt += 1.f;
          const float inv = 1.f / cnt;
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            const float f = to_float(v[u].v[j]);
            const float d = f - mean[j];
            mean[j] += d * inv;
            m2[j] += d * (f - mean[j]);
          }
        }
      }
    }
  }
  sh_n[ty][tx] = cnt;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    sh_mean[ty][tx * VEC + j] = mean[j];
    sh_m2[ty][tx * VEC + j] = m2[j];
  }
  __syncthreads();
  if (cv < ncv) {
    // Thread row ty merges channel j == ty, ty + 8, ... of its column (spreads the work).
    for (int j = ty; j < VEC; j += kClRows) {
      Welford wf;
#pragma unroll
      for (int r = 0; r < kClRows; ++r) wf.merge(sh_n[r][tx], sh_mean[r][tx * VEC + j], sh_m2[r][tx * VEC + j]);
      const int64_t ch = int64_t(cv) * VEC + j;
      float* p = partials + ((n * splits + k) * c + ch) * 3;
      p[0] = wf.n;
      p[1] = wf.mean;
      p[2] = wf.m2;
    }
  }
}

// Merges a group's partials into mean / rstd, then writes per-channel (scale, shift).
template <typename T, bool PF32>
__global__ void __launch_bounds__(kFinalizeThreads)
gn_finalize_kernel(const float* __restrict__ partials, const void* __restrict__ w, const void* __restrict__ b,
                   float2* __restrict__ scale_shift, int c, int groups, int splits, bool channels_last, float eps) {
  __shared__ float scratch[96];
  const int64_t ng = blockIdx.x;
  const int64_t n = ng / groups;
  const int g = int(ng % groups);
  const int cg = c / groups;
  Welford acc;
  if (!channels_last) {
    for (int i = threadIdx.x; i < splits; i += kFinalizeThreads) {
      const float* p = partials + (ng * splits + i) * 3;
      acc.merge(p[0], p[1], p[2]);
    }
  } else {
    const int64_t count = int64_t(splits) * cg;
    for (int64_t i = threadIdx.x; i < count; i += kFinalizeThreads) {
      const int64_t k = i / cg;
      const int64_t ch = int64_t(g) * cg + i % cg;
      const float* p = partials + ((n * splits + k) * c + ch) * 3;
      acc.merge(p[0], p[1], p[2]);
    }
  }
  acc = block_reduce_welford(acc, scratch);
  const float var = fmaxf(acc.m2 / acc.n, 0.f);
  const float rstd = rsqrtf(var + eps);
  for (int j = threadIdx.x; j < cg; j += kFinalizeThreads) {
    const int ch = g * cg + j;
    const float sc = rstd * param_or<T, PF32>(w, ch, 1.f);
    scale_shift[n * c + ch] = make_float2(sc, param_or<T, PF32>(b, ch, 0.f) - acc.mean * sc);
  }
}

// y = silu(x * scale[n, c] + shift[n, c]) over the flat tensor; IDX is uint32_t when it fits.
template <typename T, int VEC, bool CL, typename IDX>
__global__ void __launch_bounds__(kApplyThreads)
gn_apply_kernel(const T* __restrict__ x, T* __restrict__ y, const float2* __restrict__ scale_shift, IDX total_vecs,
                IDX c, IDX s, bool silu) {
  for (IDX vi = IDX(blockIdx.x) * kApplyThreads + threadIdx.x; vi < total_vecs; vi += IDX(gridDim.x) * kApplyThreads) {
    const IDX e = vi * VEC;
    IDX nc;
    if constexpr (CL) {
      const IDX row = e / c;  // n * S + s
      nc = (row / s) * c + (e - row * c);
    } else {
      nc = e / s;  // n * C + c; s % VEC == 0 keeps a vector in one channel
    }
    const Vec<T, VEC> xv = load_vec<T, VEC>(x + e);
    Vec<T, VEC> out;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float2 p = scale_shift[CL ? nc + j : nc];
      float v = to_float(xv.v[j]) * p.x + p.y;
      if (silu) v = silu_f(v);
      out.v[j] = from_float<T>(v);
    }
    store_vec<T, VEC>(y + e, out);
  }
}

int64_t partial_floats(const GroupNormPlan& p, int64_t n, int64_t c, int groups, bool channels_last) {
  return channels_last ? n * p.splits * c * 3 : n * groups * p.splits * 3;
}

template <typename T, int VEC>
cudaError_t launch_split(const GroupNormArgs& a, const GroupNormPlan& p, cudaStream_t stream) {
  const T* x = static_cast<const T*>(a.x);
  T* y = static_cast<T*>(a.y);
  float* partials = a.workspace;
  float2* scale_shift = reinterpret_cast<float2*>(a.workspace + round_up(partial_floats(p, a.n, a.c, a.groups,
                                                                                        a.channels_last), 4));
  const int64_t cg = a.c / a.groups;
  if (!a.channels_last) {
    gn_stats_cf_kernel<T, VEC><<<dim3(unsigned(a.n * a.groups), unsigned(p.splits)), kStatsThreads, 0, stream>>>(
        x, partials, cg * a.s, p.chunk, int(p.splits));
  } else {
    const int64_t ncv = a.c / VEC;
    gn_stats_cl_kernel<T, VEC><<<dim3(unsigned(ceil_div(ncv, kClCols)), unsigned(p.splits), unsigned(a.n)),
                                 dim3(kClCols, kClRows), 0, stream>>>(x, partials, a.s, int(a.c), p.chunk,
                                                                      int(p.splits));
  }
  auto finalize = a.params_f32 ? gn_finalize_kernel<T, true> : gn_finalize_kernel<T, false>;
  finalize<<<unsigned(a.n * a.groups), kFinalizeThreads, 0, stream>>>(
      partials, a.weight, a.bias, scale_shift, int(a.c), a.groups, int(p.splits), a.channels_last, a.eps);
  const int64_t total_vecs = a.n * a.c * a.s / VEC;
  const unsigned grid = unsigned(std::min<int64_t>(ceil_div(total_vecs, kApplyThreads), int64_t(1) << 20));
  const bool small = a.n * a.c * a.s < (int64_t(1) << 31);
  if (a.channels_last) {
    if (small)
      gn_apply_kernel<T, VEC, true, uint32_t><<<grid, kApplyThreads, 0, stream>>>(
          x, y, scale_shift, uint32_t(total_vecs), uint32_t(a.c), uint32_t(a.s), a.silu);
    else
      gn_apply_kernel<T, VEC, true, int64_t><<<grid, kApplyThreads, 0, stream>>>(x, y, scale_shift, total_vecs, a.c,
                                                                                a.s, a.silu);
  } else {
    if (small)
      gn_apply_kernel<T, VEC, false, uint32_t><<<grid, kApplyThreads, 0, stream>>>(
          x, y, scale_shift, uint32_t(total_vecs), uint32_t(a.c), uint32_t(a.s), a.silu);
    else
      gn_apply_kernel<T, VEC, false, int64_t><<<grid, kApplyThreads, 0, stream>>>(x, y, scale_shift, total_vecs, a.c,
                                                                                 a.s, a.silu);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_typed(const GroupNormArgs& a, const GroupNormPlan& p, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  if (p.fused) {
    auto fused = a.params_f32 ? gn_fused_cf_kernel<T, kVec, true> : gn_fused_cf_kernel<T, kVec, false>;
    fused<<<unsigned(a.n * a.groups), kFusedThreads, 0, stream>>>(
        static_cast<const T*>(a.x), a.weight, a.bias, static_cast<T*>(a.y), int(a.c), int(a.s), a.groups, a.eps, a.silu);
    return cudaGetLastError();
  }
  return p.vec == kVec ? launch_split<T, kVec>(a, p, stream) : launch_split<T, 1>(a, p, stream);
}

}  // namespace

GroupNormPlan group_norm_plan(int64_t n, int64_t c, int64_t s, int groups, bool channels_last, DType dtype,
                              bool aligned16, int sm_count) {
  GroupNormPlan p;
  if (n == 0 || c == 0 || s == 0) return p;  // nothing to launch; also avoids ceil_div(0, 0) below
  const int vmax = 16 / dtype_size(dtype);
  const int64_t cg = c / groups;
  if (!channels_last) {
    p.vec = (aligned16 && s % vmax == 0) ? vmax : 1;
    const int64_t e = cg * s;
    // Small batch: the fused plan launches one CTA per (n, group), e.g. 32-64 CTAs at batch 1-2 on
    // GPUs with 108-132 SMs. When n * groups is below the SM count, the split plan spreads each group
    // over enough slices for ~2 CTAs per SM (slices of >= kMinSliceElems). Untimed rule (no GPU run
    // yet); the measurement that settles it: benchmarks/bench_ops.py's cuda GroupNorm rows at batch 1
    // and 2, run with LDM_ENGINE_GN_SM_COUNT=0 (sm_count 0: fused wherever it fits) and without it
    // (this rule); keep the rule only where it is faster.
    const int64_t ctas = n * groups;
    const int64_t small_batch_splits =
        (sm_count > 0 && ctas < sm_count) ? std::min(ceil_div(2 * int64_t(sm_count), ctas), e / kMinSliceElems) : 1;
    if (p.vec == vmax && e <= int64_t(kFusedThreads) * kFusedItems * vmax && small_batch_splits <= 1) {
      p.fused = true;
      return p;
    }
    int64_t splits = std::min(std::max<int64_t>({ceil_div(e, kChunkTarget), small_batch_splits, 1}), kMaxSplits);
    p.chunk = round_up(ceil_div(e, splits), p.vec);
    p.splits = ceil_div(e, p.chunk);  // no empty slices
  } else {
    p.vec = (aligned16 && c % vmax == 0) ? vmax : 1;
    int64_t splits = std::min(std::max<int64_t>(ceil_div(s, 32), 1), kClMaxSplits);
    p.chunk = ceil_div(s, splits);
    p.splits = ceil_div(s, p.chunk);
  }
  p.workspace_floats = round_up(partial_floats(p, n, c, groups, channels_last), 4) + 2 * n * c;
  return p;
}

cudaError_t group_norm_silu_launch(const GroupNormArgs& a, const GroupNormPlan& p, cudaStream_t stream) {
  if (a.n == 0 || a.c == 0 || a.s == 0) return cudaSuccess;
  switch (a.dtype) {
    case DType::kF16: return launch_typed<__half>(a, p, stream);
    case DType::kBF16: return launch_typed<__nv_bfloat16>(a, p, stream);
    case DType::kF32: return launch_typed<float>(a, p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace ldm
