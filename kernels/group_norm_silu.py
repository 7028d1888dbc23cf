"""GroupNorm (+ SiLU) in Triton, fp32 statistics.

The tensor is seen as (N, C, S) with element strides (stride_n, stride_c, stride_s), which covers
NCHW contiguous (stride_s == 1), channels_last and (N, L, C) (stride_c == 1) without copies.
Channels per group (CG) is a compile-time constant, so that in channels_last / (N, L, C) layouts a
group's channels are known-contiguous and aligned runs: Triton vectorises those loads (16 bytes when
CG is a multiple of 8 for 16-bit types) instead of reading one element at a time. A model has few
distinct CG values (C / 32), so this adds a handful of compilations.
Weight and bias are read in their own dtype (fp32 parameters are not rounded to x's dtype).
Grids are 1-D where a dimension could exceed 65535 (the apply kernel's spatial blocks).

Two plans:
- fused: one program per (n, group) holds the whole group in registers (two-pass mean/variance,
  exact), then normalises and stores: one read, one write. Used when the padded group tile is small.
- split: ``_gn_stats_kernel`` writes (mean, M2, count) partials of K slices per group, and
  ``_gn_apply_kernel`` merges a group's K partials (Chan's formula) and applies. Two reads, one write;
  the reads of the second pass mostly hit L2 for U-Net-sized tensors.

Under TRITON_INTERPRET=1 (set before this module is imported) the kernels run on CPU tensors.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["group_norm_silu", "INTERPRET"]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Elements of the padded (BLOCK_C x BLOCK_S) tile one program keeps in registers (8 warps -> 32 fp32
# per thread at the fused limit).
_FUSED_MAX_ELEMS = 8192
_TILE_ELEMS = 4096
_MAX_SPLITS = 128


@triton.jit
def _gn_fused_kernel(x_ptr, w_ptr, b_ptr, y_ptr, S, CG: tl.constexpr, G, stride_n, stride_c, stride_s, eps,
                     HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr,
                     BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    pid = tl.program_id(0)  # n * G + g
    n = pid // G
    g = pid % G
    cc = tl.arange(0, BLOCK_C)
    ss = tl.arange(0, BLOCK_S)
    c = g * CG + cc
    cmask = cc < CG
    mask = cmask[:, None] & (ss < S)[None, :]
    offs = n.to(tl.int64) * stride_n + c[:, None].to(tl.int64) * stride_c + ss[None, :].to(tl.int64) * stride_s
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    count = (CG * S) * 1.0  # CG and S may both be specialised to the constant 1
    mean = tl.sum(tl.sum(x, axis=1), axis=0) / count
    d = tl.where(mask, x - mean, 0.0)
    var = tl.sum(tl.sum(d * d, axis=1), axis=0) / count
    rstd = 1.0 / tl.sqrt(var + eps)
    if HAS_W:
        scale = tl.load(w_ptr + c, mask=cmask, other=1.0).to(tl.float32) * rstd
    else:
        scale = tl.zeros([BLOCK_C], dtype=tl.float32) + rstd
    y = d * scale[:, None]
    if HAS_B:
        y = y + tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)[:, None]
    if SILU:
        y = y * tl.sigmoid(y)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gn_stats_kernel(x_ptr, ws_ptr, S, CG: tl.constexpr, G, stride_n, stride_c, stride_s, S_PER_SPLIT,
                     BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    pid = tl.program_id(0)  # n * G + g
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    n = pid // G
    g = pid % G
    cc = tl.arange(0, BLOCK_C)
    c = g * CG + cc
    cmask = cc < CG
    base = n.to(tl.int64) * stride_n + c[:, None].to(tl.int64) * stride_c
    s_begin = split * S_PER_SPLIT
    s_end = tl.minimum(s_begin + S_PER_SPLIT, S)
    acc_n = 0.0
    acc_mean = 0.0
    acc_m2 = 0.0
    for s0 in range(s_begin, s_end, BLOCK_S):
        ss = s0 + tl.arange(0, BLOCK_S)
        smask = ss < s_end
        mask = cmask[:, None] & smask[None, :]
        x = tl.load(x_ptr + base + ss[None, :].to(tl.int64) * stride_s, mask=mask, other=0.0).to(tl.float32)
        blk_n = (tl.sum(smask.to(tl.int32), axis=0) * CG).to(tl.float32)
        blk_mean = tl.sum(tl.sum(x, axis=1), axis=0) / blk_n
        d = tl.where(mask, x - blk_mean, 0.0)
        blk_m2 = tl.sum(tl.sum(d * d, axis=1), axis=0)
        # Chan et al.: merge (blk_n, blk_mean, blk_m2) into the running statistics.
        tot = acc_n + blk_n
        delta = blk_mean - acc_mean
        acc_mean = acc_mean + delta * (blk_n / tot)
        acc_m2 = acc_m2 + blk_m2 + delta * delta * (acc_n * blk_n / tot)
        acc_n = tot
    out = ws_ptr + (pid * n_splits + split) * 3
    tl.store(out + 0, acc_mean)
    tl.store(out + 1, acc_m2)
    tl.store(out + 2, acc_n)


@triton.jit
def _gn_apply_kernel(x_ptr, w_ptr, b_ptr, y_ptr, ws_ptr, S, CG: tl.constexpr, G, stride_n, stride_c, stride_s, eps,
                     N_SPLITS, S_BLOCKS, HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr,
                     BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr):
    # 1-D grid of (n * G) * S_BLOCKS programs: a 2-D grid would cap S_BLOCKS (grid y) at 65535.
    pid = tl.program_id(0) // S_BLOCKS  # n * G + g
    sblk = tl.program_id(0) % S_BLOCKS
    n = pid // G
    g = pid % G
    # Merge the group's partials: mean = sum(n_k mean_k) / n, M2 = sum(M2_k) + sum(n_k (mean_k - mean)^2).
    kk = tl.arange(0, BLOCK_K)
    kmask = kk < N_SPLITS
    part = ws_ptr + (pid * N_SPLITS + kk) * 3
    p_mean = tl.load(part + 0, mask=kmask, other=0.0)
    p_m2 = tl.load(part + 1, mask=kmask, other=0.0)
    p_n = tl.load(part + 2, mask=kmask, other=0.0)
    total = tl.sum(p_n, axis=0)
    mean = tl.sum(p_n * p_mean, axis=0) / total
    dm = p_mean - mean
    m2 = tl.sum(p_m2, axis=0) + tl.sum(p_n * dm * dm, axis=0)
    rstd = 1.0 / tl.sqrt(m2 / total + eps)

    cc = tl.arange(0, BLOCK_C)
    c = g * CG + cc
    cmask = cc < CG
    ss = sblk * BLOCK_S + tl.arange(0, BLOCK_S)
    mask = cmask[:, None] & (ss < S)[None, :]
    offs = n.to(tl.int64) * stride_n + c[:, None].to(tl.int64) * stride_c + ss[None, :].to(tl.int64) * stride_s
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_W:
        scale = tl.load(w_ptr + c, mask=cmask, other=1.0).to(tl.float32) * rstd
    else:
        scale = tl.zeros([BLOCK_C], dtype=tl.float32) + rstd
    y = (x - mean) * scale[:, None]
    if HAS_B:
        y = y + tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)[:, None]
    if SILU:
        y = y * tl.sigmoid(y)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def _as_ncs(x: torch.Tensor, channels_last_3d: bool):
    """(N, C, S, stride_n, stride_c, stride_s) of a dense x, in elements."""
    if channels_last_3d:
        n, s, c = x.shape
        return n, c, s, x.stride(0), x.stride(2), x.stride(1)
    n, c = x.shape[:2]
    if x.dim() == 2:
        return n, c, 1, x.stride(0), x.stride(1), 1
    v = x.view(n, c, -1) if x.dim() == 3 else x.flatten(2)  # dense layouts flatten to a view
    if v.data_ptr() != x.data_ptr():
        raise ValueError("group_norm_silu (triton): x must be dense (contiguous or channels_last)")
    return n, c, v.shape[2], v.stride(0), v.stride(1), v.stride(2)


def group_norm_silu(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, num_groups: int,
                    eps: float = 1e-5, silu: bool = True, channels_last_3d: bool = False, *,
                    plan: str | None = None, n_splits: int | None = None,
                    block_s: int | None = None) -> torch.Tensor:
    """x: dense (N, C, *spatial) (contiguous or channels_last) or (N, L, C) with ``channels_last_3d``.

    ``plan`` ("fused" | "split"), ``n_splits`` and ``block_s`` (a power of two) override the size
    heuristics (tests use them to reach every code path at small shapes).
    """
    if x.device.type == "cpu" and not INTERPRET:
        raise ValueError("triton group_norm_silu on a CPU tensor needs TRITON_INTERPRET=1 set before "
                         "ldm_engine.kernels is imported")
    n, c, s, stride_n, stride_c, stride_s = _as_ncs(x, channels_last_3d)
    if c % num_groups:
        raise ValueError(f"channels ({c}) must be divisible by num_groups ({num_groups})")
    cg = c // num_groups
    y = torch.empty_like(x)
    if y.stride() != x.stride():
        raise ValueError("group_norm_silu (triton): x must be dense (contiguous or channels_last)")
    if n == 0 or c == 0 or s == 0:
        return y
    w = weight.contiguous() if weight is not None else x  # dummy pointer when absent
    b = bias.contiguous() if bias is not None else x
    block_c = triton.next_power_of_2(cg)
    block_s_full = triton.next_power_of_2(s)
    if plan is None:
        plan = "fused" if block_c * block_s_full <= _FUSED_MAX_ELEMS else "split"
    common = dict(HAS_W=weight is not None, HAS_B=bias is not None, SILU=bool(silu))
    if plan == "fused":
        _gn_fused_kernel[(n * num_groups,)](
            x, w, b, y, s, cg, num_groups, stride_n, stride_c, stride_s, float(eps),
            BLOCK_C=block_c, BLOCK_S=block_s_full, num_warps=8, **common)
        return y
    if plan != "split":
        raise ValueError(f"unknown plan {plan!r}")
    if block_s is None:
        block_s = max(1, min(block_s_full, _TILE_ELEMS // block_c))
    s_blocks = triton.cdiv(s, block_s)
    if n_splits is None:
        # Aim at >= ~4 programs per SM-sized slice of work without tiny slices.
        n_splits = max(1, min(_MAX_SPLITS, s_blocks // 4))
    n_splits = max(1, min(int(n_splits), s_blocks))
    s_per_split = triton.cdiv(s_blocks, n_splits) * block_s
    n_splits = triton.cdiv(s, s_per_split)  # no empty slices
    ws = torch.empty((n * num_groups, n_splits, 3), dtype=torch.float32, device=x.device)
    _gn_stats_kernel[(n * num_groups, n_splits)](
        x, ws, s, cg, num_groups, stride_n, stride_c, stride_s, s_per_split,
        BLOCK_C=block_c, BLOCK_S=block_s, num_warps=4)
    _gn_apply_kernel[(n * num_groups * s_blocks,)](
        x, w, b, y, ws, s, cg, num_groups, stride_n, stride_c, stride_s, float(eps), n_splits, s_blocks,
        BLOCK_C=block_c, BLOCK_S=block_s, BLOCK_K=triton.next_power_of_2(n_splits), num_warps=4, **common)
    return y
