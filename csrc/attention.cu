// Non-causal attention, FlashAttention-2 style: one CTA owns BR query rows and streams key/value
// tiles of BC rows through shared memory (cp.async), computing S = Q K^T and O += P V with
// mma.sync m16n8k16 (fp16/bf16 in, fp32 accumulate) and an online softmax in fp32 (log2 domain).
//
// Warps: WM row slabs of 16 query rows x WD head-dim parts. With WD == 1 (head dims <= 160) each
// warp owns 16 rows and the whole head dim. With WD == 2 (head dim 512, VAE mid-block) the two
// warps of a slab each contract half of the head dim for S, exchange the partial S through shared
// memory, and each accumulates half of O's head dim -- 128 fp32 registers of O per thread instead
// of 256.
//
// Tails: query rows past Lq are zero-filled and never stored; key rows past Lk are zero-filled
// (so P * V never meets garbage) and their scores set to -inf. Head dims that are not a multiple
// of 16 (40) are zero-padded in shared memory for the QK^T contraction.
//
// Split-KV (num_splits > 1, when the grid would leave SMs idle, e.g. the VAE's single head):
// split z handles a contiguous range of key tiles and writes O / l in fp32 plus its log2-sum-exp
// to the workspace; attn_combine_kernel merges the splits.
#include <algorithm>
#include <atomic>

#include "cuda_utils.cuh"

namespace ldm {
namespace {

constexpr float kLog2e = 1.4426950408889634f;

// ---- PTX wrappers -------------------------------------------------------------------------------
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy global -> shared; src_bytes == 0 writes zeros (out-of-range rows / padding).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_addr(p)));
}

template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats -> one 32-bit register of two 16-bit values (low half = first).
template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

// ---- configuration ------------------------------------------------------------------------------
// MINB_: __launch_bounds__ min blocks per SM (2 caps registers at 128 per thread for 256 threads).
template <int D_, int BR_, int BC_, int WM_, int WD_, int MINB_ = 1>
struct AttnCfg {
  static constexpr int D = D_, BR = BR_, BC = BC_, WM = WM_, WD = WD_, MINB = MINB_;
  static constexpr int DK = (D + 15) / 16 * 16;  // contraction dim of Q K^T, zero-padded
  static constexpr int SROW = DK + 8;            // smem row stride: (SROW * 2 / 16) odd -> ldmatrix conflict-free
  static constexpr int WARPS = WM * WD;
  static constexpr int THREADS = 32 * WARPS;
  static constexpr int KT = DK / 16;             // k-steps of Q K^T
  static constexpr int KT_W = KT / WD;           // ... per warp
  static constexpr int NT_O = D / 8;             // n-tiles of O
  static constexpr int NT_OW = NT_O / WD;        // ... per warp
  static constexpr int NT_S = BC / 8;            // n-tiles of S
  static constexpr int CPR = DK / 8;             // 16-byte chunks per smem row
  static constexpr int SMEM_TILES = (BR + 2 * BC) * SROW * 2;  // bytes: Q, K, V (16-bit elements)
  static constexpr int SMEM_XCHG = WD > 1 ? WARPS * NT_S * 32 * 16 : 0;
  static constexpr int SMEM = SMEM_TILES + SMEM_XCHG;
  static_assert(BR == 16 * WM, "one 16-row slab per warp row");
  static_assert(KT % WD == 0 && NT_O % WD == 0, "head dim must split evenly over WD warps");
  static_assert(BC % 16 == 0, "key tile must be a multiple of 16");
  static_assert(D % 8 == 0, "head dim must be a multiple of 8");
  static_assert(NT_OW % 2 == 0 || WD == 1, "odd n-tile count only without head-dim split");
};

struct KernelParams {
  const void* q;
  const void* k;
  const void* v;
  void* o;
  float* ws_o;    // split-KV partial outputs [split][bh][lq][d]
  float* ws_lse;  // split-KV log2-sum-exp   [split][bh][lq]
  int h, lq, lk, num_splits;
  int64_t q_sb, q_sh, q_sl, k_sb, k_sh, k_sl, v_sb, v_sh, v_sl, o_sb, o_sh, o_sl;
  float scale_log2;
};

// Loads `rows` rows (from row0, valid below `limit`) of a (L, D) matrix into smem rows of SROW.
template <typename Cfg, typename T>
__device__ __forceinline__ void load_tile(T* dst, const T* src, int64_t stride_l, int row0, int limit, int rows) {
  const int chunks = rows * Cfg::CPR;
  for (int i = threadIdx.x; i < chunks; i += Cfg::THREADS) {
    const int r = i / Cfg::CPR;
    const int cc = i % Cfg::CPR;
    const bool valid = (row0 + r < limit) && (cc < Cfg::D / 8);
    const T* g = valid ? src + int64_t(row0 + r) * stride_l + cc * 8 : src;
    cp_async_16(dst + r * Cfg::SROW + cc * 8, g, valid);
  }
}

template <typename T, typename Cfg>
__global__ void __launch_bounds__(Cfg::THREADS, Cfg::MINB) attn_fwd_kernel(const KernelParams p) {
  constexpr int BR = Cfg::BR, BC = Cfg::BC, WM = Cfg::WM, WD = Cfg::WD, SROW = Cfg::SROW;
  constexpr int KT_W = Cfg::KT_W, NT_S = Cfg::NT_S, NT_OW = Cfg::NT_OW;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + BR * SROW;
  T* sV = sK + BC * SROW;
  float4* sX = reinterpret_cast<float4*>(smem_raw + Cfg::SMEM_TILES);  // [warp][NT_S][32]

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int wm = warp % WM;  // row slab
  const int wd = warp / WM;  // head-dim part
  const int bh = blockIdx.y;
  const int b = bh / p.h, h = bh % p.h;
  const int q0 = blockIdx.x * BR;

  const int n_tiles = (p.lk + BC - 1) / BC;
  const int tiles_per_split = (n_tiles + p.num_splits - 1) / p.num_splits;
  const int t_begin = blockIdx.z * tiles_per_split;
  const int t_end = min(n_tiles, t_begin + tiles_per_split);

  const T* qg = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh;
  const T* kg = static_cast<const T*>(p.k) + b * p.k_sb + h * p.k_sh;
  const T* vg = static_cast<const T*>(p.v) + b * p.v_sb + h * p.v_sh;

  load_tile<Cfg>(sQ, qg, p.q_sl, q0, p.lq, BR);
  if (t_begin < t_end) load_tile<Cfg>(sK, kg, p.k_sl, t_begin * BC, p.lk, BC);
  cp_async_commit();

  float o_acc[NT_OW][4];
#pragma unroll
  for (int i = 0; i < NT_OW; ++i) o_acc[i][0] = o_acc[i][1] = o_acc[i][2] = o_acc[i][3] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY};  // running max (log2 domain) of rows lane/4 and lane/4 + 8
  float l_run[2] = {0.f, 0.f};              // this thread's share of the running row sums

  const int qrow = wm * 16;
  for (int t = t_begin; t < t_end; ++t) {
    cp_async_wait_all();
    __syncthreads();  // K_t (and Q) visible; every warp is done with V_{t-1}
    load_tile<Cfg>(sV, vg, p.v_sl, t * BC, p.lk, BC);
    cp_async_commit();

    // Keys of this tile that exist (>= 1). In the last tile, 16-key groups wholly past Lk are skipped
    // in both products (the branches are uniform over the CTA): 77 keys with BC = 64 cost 80, not 128.
    const int kv_valid = min(BC, p.lk - t * BC);

    // ---- S = Q K^T (this warp's share of the head dim) ----
    float s[NT_S][4];
#pragma unroll
    for (int i = 0; i < NT_S; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
    for (int kt = 0; kt < KT_W; ++kt) {
      const int kcol = (wd * KT_W + kt) * 16;
      uint32_t a[4];
      ldmatrix_x4(a, sQ + (qrow + (lane & 15)) * SROW + kcol + (lane >> 4) * 8);
#pragma unroll
      for (int nt = 0; nt < NT_S; nt += 2) {
        if (nt * 8 >= kv_valid) continue;
        uint32_t kb[4];
        ldmatrix_x4(kb, sK + (nt * 8 + (lane & 7) + (lane >> 4) * 8) * SROW + kcol + ((lane >> 3) & 1) * 8);
        mma_16816<T>(s[nt], a, kb[0], kb[1]);
        mma_16816<T>(s[nt + 1], a, kb[2], kb[3]);
      }
    }
    if constexpr (WD > 1) {
#pragma unroll
      for (int nt = 0; nt < NT_S; ++nt) sX[(warp * NT_S + nt) * 32 + lane] = make_float4(s[nt][0], s[nt][1], s[nt][2], s[nt][3]);
      __syncthreads();
#pragma unroll
      for (int part = 1; part < WD; ++part) {
        const int other = ((wd + part) % WD) * WM + wm;
#pragma unroll
        for (int nt = 0; nt < NT_S; ++nt) {
          const float4 x = sX[(other * NT_S + nt) * 32 + lane];
          s[nt][0] += x.x;
          s[nt][1] += x.y;
          s[nt][2] += x.z;
          s[nt][3] += x.w;
        }
      }
    }

    // ---- online softmax (fp32, log2 domain) ----
    const int col0 = t * BC + 2 * (lane & 3);
    const bool tail = (t + 1) * BC > p.lk;
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < NT_S; ++nt) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        float x = s[nt][j] * p.scale_log2;
        if (tail && col0 + nt * 8 + (j & 1) >= p.lk) x = -INFINITY;
        s[nt][j] = x;
        mx[j >> 1] = fmaxf(mx[j >> 1], x);
      }
    }
    float corr[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
      const float m_new = fmaxf(m_run[r], mx[r]);  // finite: every tile holds a real key
      corr[r] = exp2f(m_run[r] - m_new);            // exp2(-inf) = 0 on the first tile
      m_run[r] = m_new;
      l_run[r] *= corr[r];
    }
    uint32_t pa[BC / 16][4];  // P as A fragments of the P V product
#pragma unroll
    for (int nt = 0; nt < NT_S; ++nt) {
      const float p0 = exp2f(s[nt][0] - m_run[0]);
      const float p1 = exp2f(s[nt][1] - m_run[0]);
      const float p2 = exp2f(s[nt][2] - m_run[1]);
      const float p3 = exp2f(s[nt][3] - m_run[1]);
      l_run[0] += p0 + p1;
      l_run[1] += p2 + p3;
      pa[nt / 2][(nt & 1) * 2 + 0] = pack2<T>(p0, p1);
      pa[nt / 2][(nt & 1) * 2 + 1] = pack2<T>(p2, p3);
    }
#pragma unroll
    for (int i = 0; i < NT_OW; ++i) {
      o_acc[i][0] *= corr[0];
      o_acc[i][1] *= corr[0];
      o_acc[i][2] *= corr[1];
      o_acc[i][3] *= corr[1];
    }

    cp_async_wait_all();
    __syncthreads();  // V_t visible; every warp is done reading K_t (and the S exchange)
    if (t + 1 < t_end) load_tile<Cfg>(sK, kg, p.k_sl, (t + 1) * BC, p.lk, BC);
    cp_async_commit();

    // ---- O += P V (this warp's share of the head dim) ----
#pragma unroll
    for (int kt = 0; kt < BC / 16; ++kt) {
      if (kt * 16 >= kv_valid) continue;  // P is 0 there (scores -inf)
      const T* vrow = sV + (kt * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * SROW;
#pragma unroll
      for (int i = 0; i + 1 < NT_OW; i += 2) {
        uint32_t vb[4];
        ldmatrix_x4_trans(vb, vrow + (wd * NT_OW + i) * 8 + (lane >> 4) * 8);
        mma_16816<T>(o_acc[i], pa[kt], vb[0], vb[1]);
        mma_16816<T>(o_acc[i + 1], pa[kt], vb[2], vb[3]);
      }
      if constexpr (NT_OW % 2 == 1) {
        uint32_t vb[2];
        ldmatrix_x2_trans(vb, vrow + (wd * NT_OW + NT_OW - 1) * 8);
        mma_16816<T>(o_acc[NT_OW - 1], pa[kt], vb[0], vb[1]);
      }
    }
  }

  cp_async_wait_all();  // an empty split never waited for its Q copies

  // ---- epilogue ----
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l_run[r] += __shfl_xor_sync(0xffffffffu, l_run[r], 1);
    l_run[r] += __shfl_xor_sync(0xffffffffu, l_run[r], 2);
  }
  const float inv[2] = {l_run[0] > 0.f ? 1.f / l_run[0] : 0.f, l_run[1] > 0.f ? 1.f / l_run[1] : 0.f};
  const int row[2] = {q0 + qrow + (lane >> 2), q0 + qrow + (lane >> 2) + 8};
  const int col = wd * NT_OW * 8 + 2 * (lane & 3);
  if (p.num_splits == 1) {
    T* og = static_cast<T*>(p.o) + b * p.o_sb + h * p.o_sh;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      if (row[r] >= p.lq) continue;
      T* orow = og + int64_t(row[r]) * p.o_sl + col;
#pragma unroll
      for (int i = 0; i < NT_OW; ++i)
        *reinterpret_cast<uint32_t*>(orow + i * 8) = pack2<T>(o_acc[i][2 * r] * inv[r], o_acc[i][2 * r + 1] * inv[r]);
    }
  } else {
    const int64_t slot = int64_t(blockIdx.z) * gridDim.y + bh;  // [split][bh]
    const int d = Cfg::D;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      if (row[r] >= p.lq) continue;
      float* orow = p.ws_o + (slot * p.lq + row[r]) * d + col;
#pragma unroll
      for (int i = 0; i < NT_OW; ++i)
        *reinterpret_cast<float2*>(orow + i * 8) = make_float2(o_acc[i][2 * r] * inv[r], o_acc[i][2 * r + 1] * inv[r]);
      if (wd == 0 && (lane & 3) == 0)
        p.ws_lse[slot * p.lq + row[r]] = l_run[r] > 0.f ? m_run[r] + __log2f(l_run[r]) : -INFINITY;
    }
  }
}

// Merges split-KV partials: O = sum_i 2^(lse_i - max) O_i / sum_i 2^(lse_i - max).
template <typename T>
__global__ void __launch_bounds__(256) attn_combine_kernel(const float* __restrict__ ws_o, const float* __restrict__ ws_lse,
                                                           void* o_ptr, int h, int lq, int d, int num_splits,
                                                           int64_t o_sb, int64_t o_sh, int64_t o_sl, int bh_total) {
  const int64_t pairs = int64_t(lq) * (d / 2);
  const int bh = blockIdx.y;
  const int b = bh / h, hh = bh % h;
  T* og = static_cast<T*>(o_ptr) + b * o_sb + hh * o_sh;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < pairs; i += int64_t(gridDim.x) * blockDim.x) {
    const int row = int(i / (d / 2));
    const int col = int(i % (d / 2)) * 2;
    float mx = -INFINITY;
    for (int sp = 0; sp < num_splits; ++sp) mx = fmaxf(mx, ws_lse[(int64_t(sp) * bh_total + bh) * lq + row]);
    float wsum = 0.f, a0 = 0.f, a1 = 0.f;
    for (int sp = 0; sp < num_splits; ++sp) {
      const int64_t slot = int64_t(sp) * bh_total + bh;
      const float wgt = exp2f(ws_lse[slot * lq + row] - mx);  // 0 for empty splits (lse = -inf)
      const float2 v = *reinterpret_cast<const float2*>(ws_o + (slot * lq + row) * d + col);
      wsum += wgt;
      a0 += wgt * v.x;
      a1 += wgt * v.y;
    }
    const float inv = 1.f / wsum;
    *reinterpret_cast<uint32_t*>(og + int64_t(row) * o_sl + col) = pack2<T>(a0 * inv, a1 * inv);
  }
}

// ---- dispatch -----------------------------------------------------------------------------------
// Tile shapes per head dim. The D = 512 configs need the large opt-in shared memory of sm_80 /
// sm_90 (~149 KB); GPUs with ~99 KB (sm_86, sm_89) get the smaller one.
//
// Occupancy: 256 threads per CTA. Head dims <= 80 are built with __launch_bounds__(256, 2) (<= 128
// registers, two CTAs per SM, so one CTA's K/V loads overlap the other's math); ptxas reports no
// spills for them (tests/test_cuda_extension.py::test_ptxas_registers_and_spills, table in
// benchmarks/results/ptxas-attention.txt). Head dims 128 / 160 need 166 / 198 registers: one CTA per
// SM with single-stage K/V loads. Open choice, to be settled on a GPU: 64-row / 4-warp tiles (two
// CTAs per SM) or double-buffered K/V (cp.async of tile t+1 during tile t; +BC*SROW*2 bytes of smem)
// for D = 128 and 160; measure `python benchmarks/bench_ops.py` attention rows at D = 128 / 160
// (SDXL 4096 x 4096 and 1024 x 77) for each and keep the faster.
using Cfg40 = AttnCfg<40, 128, 64, 8, 1, 2>;
using Cfg64 = AttnCfg<64, 128, 64, 8, 1, 2>;
using Cfg80 = AttnCfg<80, 128, 64, 8, 1, 2>;
using Cfg128 = AttnCfg<128, 128, 64, 8, 1>;
using Cfg160 = AttnCfg<160, 128, 64, 8, 1>;
using Cfg512Big = AttnCfg<512, 64, 32, 4, 2>;
using Cfg512Small = AttnCfg<512, 32, 16, 2, 2>;

int max_smem_optin(int device) {
  static int cache[64] = {0};
  if (device < 0 || device >= 64) return 0;
  if (cache[device] == 0) {
    int v = 0;
    if (cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) return 0;
    cache[device] = v;
  }
  return cache[device];
}

bool use_big512(int device) { return max_smem_optin(device) >= Cfg512Big::SMEM; }

// Sets the kernel's max dynamic shared memory once per (device, kernel): the attribute belongs to
// the device's context, so a later call on the same device is a load of one atomic word.
// (cudaFuncSetAttribute enqueues nothing on a stream, so it is legal during graph capture too; the
// ops are warmed up before a capture anyway.)
template <typename T, typename Cfg>
cudaError_t prepare_kernel(int device) {
  static std::atomic<uint64_t> done{0};  // bit d: set on device d (devices >= 64: every call)
  const uint64_t bit = (device >= 0 && device < 64) ? (uint64_t(1) << device) : 0;
  if (bit != 0 && (done.load(std::memory_order_acquire) & bit)) return cudaSuccess;
  const cudaError_t err =
      cudaFuncSetAttribute(attn_fwd_kernel<T, Cfg>, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::SMEM);
  if (err == cudaSuccess && bit != 0) done.fetch_or(bit, std::memory_order_release);
  return err;
}

template <typename T, typename Cfg>
cudaError_t num_splits_for(int b, int h, int lq, int lk, int device, int* out) {
  *out = 1;
  cudaError_t err = prepare_kernel<T, Cfg>(device);
  if (err != cudaSuccess) return err;
  int per_sm = 0, sms = 0;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, attn_fwd_kernel<T, Cfg>, Cfg::THREADS, Cfg::SMEM);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  const int64_t ctas = int64_t((lq + Cfg::BR - 1) / Cfg::BR) * b * h;
  const int64_t slots = int64_t(std::max(per_sm, 1)) * sms;
  const int n_tiles = (lk + Cfg::BC - 1) / Cfg::BC;
  // Split only when fewer than ~3/4 of one wave is busy, never beyond one full wave, and keep
  // >= 4 key tiles per split. Untuned heuristic: to be revisited with GPU timings (bench_ops.py).
  if (4 * ctas >= 3 * slots) return cudaSuccess;
  int splits = int(std::min<int64_t>(slots / ctas, 8));
  splits = std::max(1, std::min(splits, n_tiles / 4));
  *out = splits;
  return cudaSuccess;
}

template <typename T, typename Cfg>
cudaError_t launch_cfg(const AttentionArgs& a, int device, cudaStream_t stream) {
  cudaError_t err = prepare_kernel<T, Cfg>(device);
  if (err != cudaSuccess) return err;
  KernelParams p;
  p.q = a.q;
  p.k = a.k;
  p.v = a.v;
  p.o = a.o;
  p.h = a.h;
  p.lq = a.lq;
  p.lk = a.lk;
  const int n_tiles = (a.lk + Cfg::BC - 1) / Cfg::BC;
  int splits = std::max(1, std::min(a.num_splits, n_tiles));
  if (a.workspace == nullptr) splits = 1;
  p.num_splits = splits;
  p.ws_o = a.workspace;
  p.ws_lse = splits > 1 ? a.workspace + int64_t(splits) * a.b * a.h * a.lq * a.d : nullptr;
  p.q_sb = a.q_sb; p.q_sh = a.q_sh; p.q_sl = a.q_sl;
  p.k_sb = a.k_sb; p.k_sh = a.k_sh; p.k_sl = a.k_sl;
  p.v_sb = a.v_sb; p.v_sh = a.v_sh; p.v_sl = a.v_sl;
  p.o_sb = a.o_sb; p.o_sh = a.o_sh; p.o_sl = a.o_sl;
  p.scale_log2 = a.scale * kLog2e;
  const dim3 grid((a.lq + Cfg::BR - 1) / Cfg::BR, a.b * a.h, splits);
  attn_fwd_kernel<T, Cfg><<<grid, Cfg::THREADS, Cfg::SMEM, stream>>>(p);
  err = cudaGetLastError();
  if (err != cudaSuccess || splits == 1) return err;
  const int64_t pairs = int64_t(a.lq) * (a.d / 2);
  const unsigned cgrid = unsigned(std::min<int64_t>((pairs + 255) / 256, 1024));
  attn_combine_kernel<T><<<dim3(cgrid, a.b * a.h), 256, 0, stream>>>(p.ws_o, p.ws_lse, a.o, a.h, a.lq, a.d, splits,
                                                                     a.o_sb, a.o_sh, a.o_sl, a.b * a.h);
  return cudaGetLastError();
}

// Calls f.template operator()<T, Cfg>() for the instantiated configuration of (dtype, d, device).
template <typename F>
cudaError_t dispatch(DType dtype, int d, int device, F&& f) {
  auto by_d = [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    switch (d) {
      case 40: return f.template operator()<T, Cfg40>();
      case 64: return f.template operator()<T, Cfg64>();
      case 80: return f.template operator()<T, Cfg80>();
      case 128: return f.template operator()<T, Cfg128>();
      case 160: return f.template operator()<T, Cfg160>();
      case 512:
        return use_big512(device) ? f.template operator()<T, Cfg512Big>() : f.template operator()<T, Cfg512Small>();
      default: return cudaErrorInvalidValue;
    }
  };
  if (dtype == DType::kF16) return by_d(__half{});
  if (dtype == DType::kBF16) return by_d(__nv_bfloat16{});
  return cudaErrorInvalidValue;
}

struct SplitsFn {
  int b, h, lq, lk, device;
  int* out;
  template <typename T, typename Cfg>
  cudaError_t operator()() const { return num_splits_for<T, Cfg>(b, h, lq, lk, device, out); }
};

struct LaunchFn {
  const AttentionArgs& a;
  int device;
  cudaStream_t stream;
  template <typename T, typename Cfg>
  cudaError_t operator()() const { return launch_cfg<T, Cfg>(a, device, stream); }
};

}  // namespace

bool attention_head_dim_supported(int d) {
  return d == 40 || d == 64 || d == 80 || d == 128 || d == 160 || d == 512;
}

cudaError_t attention_num_splits(int b, int h, int lq, int lk, int d, DType dtype, int device, int* num_splits) {
  *num_splits = 1;
  return dispatch(dtype, d, device, SplitsFn{b, h, lq, lk, device, num_splits});
}

cudaError_t attention_launch(const AttentionArgs& args, int device, cudaStream_t stream) {
  if (args.lq == 0 || args.b == 0 || args.h == 0) return cudaSuccess;
  return dispatch(args.dtype, args.d, device, LaunchFn{args, device, stream});
}

}  // namespace ldm
