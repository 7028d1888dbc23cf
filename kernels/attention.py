"""Non-causal flash attention (online softmax, fp32 statistics) in Triton.

q (B, H, Lq, D), k and v (B, H, Lk, D), any strides. Any Lq and Lk: query rows past Lq are loaded
as zeros and never stored; keys past Lk get a score of -inf. The head dim is padded to a power of
two inside the kernel through masked loads (40 -> 64, 80 -> 128, 160 -> 256, 512 stays); for the
largest head dims the output's head dim can be split over a third grid axis (``D_SPLIT``), each
program recomputing the scores, so one program's accumulator stays register-sized.

The output is written into (B, Lq, H, D) storage and returned as its (B, H, Lq, D) view, so that
callers who merge heads (``o.transpose(1, 2).reshape(B, Lq, H * D)``) get a free view.

Under TRITON_INTERPRET=1 (set before this module is imported) it runs on CPU tensors; there the
autotuner is bypassed and the first config is used.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

__all__ = ["attention", "INTERPRET"]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_LOG2E = 1.4426950408889634


@triton.jit
def _attn_fwd_kernel(Q, K, V, O, qk_scale, Lq, Lk, H,
                     sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd, sob, soh, sol, sod,
                     D: tl.constexpr, BLOCK_D: tl.constexpr, D_SPLIT: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE_FP32: tl.constexpr):
    BLOCK_DV: tl.constexpr = BLOCK_D // D_SPLIT
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_d = tl.program_id(2)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = pid_d * BLOCK_DV + tl.arange(0, BLOCK_DV)
    d_mask = offs_d < D
    dv_mask = offs_dv < D

    q_ptrs = Q + b * sqb + h * sqh + offs_m[:, None].to(tl.int64) * sql + offs_d[None, :] * sqd
    q = tl.load(q_ptrs, mask=(offs_m < Lq)[:, None] & d_mask[None, :], other=0.0)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for start_n in range(0, Lk, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < Lk
        k = tl.load(k_base + offs_n[None, :].to(tl.int64) * skl + offs_d[:, None] * skd,
                    mask=n_mask[None, :] & d_mask[:, None], other=0.0)  # (BLOCK_D, BLOCK_N)
        if IEEE_FP32:
            s = tl.dot(q, k, input_precision="ieee")
        else:
            s = tl.dot(q, k)
        # Scores in the log2 domain; every tile holds at least one real key, so m_new is finite.
        s = tl.where(n_mask[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + offs_n[:, None].to(tl.int64) * svl + offs_dv[None, :] * svd,
                    mask=n_mask[:, None] & dv_mask[None, :], other=0.0)  # (BLOCK_N, BLOCK_DV)
        if IEEE_FP32:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    acc = acc / l_i[:, None]
    o_ptrs = O + b * sob + h * soh + offs_m[:, None].to(tl.int64) * sol + offs_dv[None, :] * sod
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=(offs_m < Lq)[:, None] & dv_mask[None, :])


def _configs(big_d: bool, fp32: bool = False):
    """(BLOCK_M, BLOCK_N, D_SPLIT, num_warps, num_stages) candidates; all compile for sm_80 / sm_90."""
    if fp32:  # tests / odd callers only: small tiles keep fp32 operands inside shared memory
        shapes = [(32, 32, 4, 4, 1), (16, 32, 2, 4, 1)] if big_d else [(64, 32, 1, 4, 2), (32, 32, 1, 4, 2)]
    elif big_d:  # D = 512 (VAE mid-block): keep the accumulator small, split its head dim.
        shapes = [(64, 32, 2, 8, 2), (64, 32, 1, 8, 2), (32, 32, 2, 4, 2), (128, 32, 4, 8, 2)]
    else:
        shapes = [(128, 64, 1, 8, 3), (64, 64, 1, 4, 3), (128, 32, 1, 4, 3), (128, 128, 1, 8, 2), (64, 32, 1, 4, 4)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "D_SPLIT": ds}, num_warps=w, num_stages=st)
            for m, n, ds, w, st in shapes]


_tuned = {}


def _kernel_for(big_d: bool, fp32: bool):
    if INTERPRET:
        return None
    if (big_d, fp32) not in _tuned:
        _tuned[big_d, fp32] = triton.autotune(configs=_configs(big_d, fp32), key=["Lq", "Lk", "D"])(_attn_fwd_kernel)
    return _tuned[big_d, fp32]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None, *,
              config: dict | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v. ``config`` (BLOCK_M, BLOCK_N, D_SPLIT) bypasses autotuning (tests)."""
    if q.device.type == "cpu" and not INTERPRET:
        raise ValueError("triton attention on a CPU tensor needs TRITON_INTERPRET=1 set before "
                         "ldm_engine.kernels is imported")
    bsz, heads, lq, d = q.shape
    lk = k.shape[2]
    if d > 512:
        raise ValueError(f"triton attention supports head dims up to 512, got {d}")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    out = torch.empty((bsz, lq, heads, d), dtype=q.dtype, device=q.device).transpose(1, 2)
    if out.numel() == 0:
        return out
    block_d = max(16, triton.next_power_of_2(d))
    big_d = block_d > 256
    args = (q, k, v, out, scale * _LOG2E, lq, lk, heads, *q.stride(), *k.stride(), *v.stride(), *out.stride())
    fp32 = q.dtype == torch.float32
    flags = dict(D=d, BLOCK_D=block_d, IEEE_FP32=fp32)
    kernel = None if config is not None else _kernel_for(big_d, fp32)
    if kernel is None:
        if config is not None:
            cfg = dict(config)
        elif INTERPRET:  # CPU: small tiles keep the numpy emulation quick
            cfg = {"BLOCK_M": 16, "BLOCK_N": 32, "D_SPLIT": 2 if big_d else 1}
        else:
            cfg = dict(_configs(big_d, fp32)[0].kwargs)
        grid = (triton.cdiv(lq, cfg["BLOCK_M"]), bsz * heads, cfg.get("D_SPLIT", 1))
        _attn_fwd_kernel[grid](*args, **flags, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                               D_SPLIT=cfg.get("D_SPLIT", 1), num_warps=cfg.get("num_warps", 4))
        return out

    def grid(meta):
        return (triton.cdiv(lq, meta["BLOCK_M"]), bsz * heads, meta["D_SPLIT"])

    kernel[grid](*args, **flags)
    return out
