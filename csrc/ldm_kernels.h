// Host-side interface of the CUDA kernels: plain pointers, shapes, strides and a stream.
// Included by binding.cpp (host compiler) and by the .cu files; nothing device-only here.
// All input validation lives in binding.cpp; these launchers assume valid arguments.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace ldm {

enum class DType : int { kF16 = 0, kBF16 = 1, kF32 = 2 };

inline int dtype_size(DType t) { return t == DType::kF32 ? 4 : 2; }

// ---------------------------------------------------------------------------------------------
// GroupNorm (+ SiLU). x and y are dense: channels-first (N, C, S) with S contiguous, or
// channels-last (N, S, C) with C contiguous. weight/bias: C elements of x's dtype or of float32
// (params_f32), or null.
// ---------------------------------------------------------------------------------------------
struct GroupNormPlan {
  bool fused = false;        // one CTA per (n, group), no workspace
  int vec = 1;               // elements per vector access (16 bytes when aligned)
  int64_t splits = 1;        // split path: slices per group (channels-first) or row slices (channels-last)
  int64_t chunk = 0;         // elements (channels-first) or rows (channels-last) per slice
  int64_t workspace_floats = 0;
};

struct GroupNormArgs {
  const void* x = nullptr;
  const void* weight = nullptr;
  const void* bias = nullptr;
  void* y = nullptr;
  float* workspace = nullptr;
  bool params_f32 = false;  // weight / bias are float32 (else x's dtype)
  int64_t n = 0, c = 0, s = 0;
  int groups = 1;
  float eps = 1e-5f;
  bool silu = true;
  bool channels_last = false;
  DType dtype = DType::kF16;
};

// The plan depends only on shapes, layout, dtype, whether x/y are 16-byte aligned and the device's
// multiprocessor count (sm_count; 0 = unknown), so the binding can size the workspace before the
// launch and the launch recomputes the same plan.
GroupNormPlan group_norm_plan(int64_t n, int64_t c, int64_t s, int groups, bool channels_last, DType dtype,
                              bool aligned16, int sm_count);
cudaError_t group_norm_silu_launch(const GroupNormArgs& args, const GroupNormPlan& plan, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// Attention (non-causal, online softmax). Strides in elements; the head dim is contiguous.
// ---------------------------------------------------------------------------------------------
struct AttentionArgs {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* o = nullptr;
  float* workspace = nullptr;  // split-KV partials: num_splits * B * H * Lq * (D + 1) floats
  int b = 0, h = 0, lq = 0, lk = 0, d = 0;
  int64_t q_sb = 0, q_sh = 0, q_sl = 0;
  int64_t k_sb = 0, k_sh = 0, k_sl = 0;
  int64_t v_sb = 0, v_sh = 0, v_sl = 0;
  int64_t o_sb = 0, o_sh = 0, o_sl = 0;
  float scale = 1.f;
  int num_splits = 1;
  DType dtype = DType::kF16;
};

bool attention_head_dim_supported(int d);
// Number of key/value splits for this shape on `device` (1 when the grid already fills the GPU).
// Queries the device (occupancy, multiprocessor count), so it needs a working CUDA context.
cudaError_t attention_num_splits(int b, int h, int lq, int lk, int d, DType dtype, int device, int* num_splits);
inline int64_t attention_workspace_floats(int b, int h, int lq, int d, int num_splits) {
  return num_splits > 1 ? int64_t(num_splits) * b * h * lq * (d + 1) : 0;
}
cudaError_t attention_launch(const AttentionArgs& args, int device, cudaStream_t stream);

}  // namespace ldm
