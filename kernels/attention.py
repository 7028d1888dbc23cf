"""Non-causal flash attention (online softmax, fp32 statistics) in Triton.

q (B, H, Lq, D), k and v (B, H, Lk, D), any strides. Any Lq and Lk: query rows past Lq are loaded
as zeros and never stored; keys past Lk get a score of -inf. The head dim is covered by at most two
power-of-two pieces, each with its own ``tl.dot`` (``head_dim_pieces``: 40 -> 32 + 16, 80 -> 64 + 16,
160 -> 128 + 32; 64, 128 and 512 are one piece), so padding wastes at most 8 of 48 columns (head dim
40) instead of up to 37.5 % with one power-of-two block. For 512 (the VAE's single head) the
output's head dim can be split over a second grid axis (``D_SPLIT``), each program recomputing the
scores, so one program's accumulator stays register-sized.

Autotune configs per head dim (``configs_for``) are those that compile for sm_80 and sm_90 within the
opt-in shared memory and without register spills, checked ahead of time on a CPU machine
(``tools/triton_aot.py``; tests/test_ops_attention.py::test_triton_configs_fit_*). The autotuner key
includes Lk, so short key sequences (77 text tokens) pick among 32- and 64-key tiles by measurement.

The output is written into (B, Lq, H, D) storage and returned as its (B, H, Lq, D) view, so that
callers who merge heads (``o.transpose(1, 2).reshape(B, Lq, H * D)``) get a free view.

Under TRITON_INTERPRET=1 (set before this module is imported) it runs on CPU tensors; there the
autotuner is bypassed and small tiles are used.
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
def _dot(a, b, acc, IEEE_FP32: tl.constexpr):
    if IEEE_FP32:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _attn_fwd_kernel(Q, K, V, O, qk_scale, Lq, Lk, H,
                     sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd, sob, soh, sol, sod,
                     D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, D_SPLIT: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE_FP32: tl.constexpr):
    # Grid: (cdiv(Lq, BLOCK_M) * B * H, D_SPLIT): query blocks and batch * heads share grid x (limit
    # 2**31 - 1; in grid y, batch * heads would be capped at 65535).
    # Head dim in two power-of-two pieces [0, D0) and [D0, D0 + D1) (D1 == 0: one piece), each with
    # its own tl.dot; columns >= D are masked. With D_SPLIT > 1 (one piece only) program d owns output
    # columns [d * D0 / D_SPLIT, (d + 1) * D0 / D_SPLIT) and recomputes the scores.
    BLOCK_DV: tl.constexpr = D0 // D_SPLIT
    m_blocks = tl.cdiv(Lq, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % m_blocks
    pid_bh = pid // m_blocks
    pid_d = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < Lq
    offs_d0 = tl.arange(0, D0)
    offs_dv = pid_d * BLOCK_DV + tl.arange(0, BLOCK_DV)
    dv_mask = offs_dv < D

    q_rows = Q + b * sqb + h * sqh + offs_m[:, None].to(tl.int64) * sql
    q0 = tl.load(q_rows + offs_d0[None, :] * sqd, mask=m_mask[:, None] & (offs_d0 < D)[None, :], other=0.0)
    if D1 > 0:
        offs_d1 = D0 + tl.arange(0, D1)
        d1_mask = offs_d1 < D
        q1 = tl.load(q_rows + offs_d1[None, :] * sqd, mask=m_mask[:, None] & d1_mask[None, :], other=0.0)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc0 = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    if D1 > 0:
        acc1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
    for start_n in range(0, Lk, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < Lk
        k_cols = k_base + offs_n[None, :].to(tl.int64) * skl
        k0 = tl.load(k_cols + offs_d0[:, None] * skd, mask=n_mask[None, :] & (offs_d0 < D)[:, None],
                     other=0.0)  # (D0, BLOCK_N)
        s = _dot(q0, k0, None, IEEE_FP32)
        if D1 > 0:
            k1 = tl.load(k_cols + offs_d1[:, None] * skd, mask=n_mask[None, :] & d1_mask[:, None], other=0.0)
            s = _dot(q1, k1, s, IEEE_FP32)
        # Scores in the log2 domain; every tile holds at least one real key, so m_new is finite.
        s = tl.where(n_mask[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v_rows = v_base + offs_n[:, None].to(tl.int64) * svl
        v0 = tl.load(v_rows + offs_dv[None, :] * svd, mask=n_mask[:, None] & dv_mask[None, :],
                     other=0.0)  # (BLOCK_N, BLOCK_DV)
        p_lp = p.to(v0.dtype)
        acc0 = _dot(p_lp, v0, acc0 * alpha[:, None], IEEE_FP32)
        if D1 > 0:
            v1 = tl.load(v_rows + offs_d1[None, :] * svd, mask=n_mask[:, None] & d1_mask[None, :], other=0.0)
            acc1 = _dot(p_lp, v1, acc1 * alpha[:, None], IEEE_FP32)
        m_i = m_new
    inv_l = 1.0 / l_i
    o_rows = O + b * sob + h * soh + offs_m[:, None].to(tl.int64) * sol
    tl.store(o_rows + offs_dv[None, :] * sod, (acc0 * inv_l[:, None]).to(O.dtype.element_ty),
             mask=m_mask[:, None] & dv_mask[None, :])
    if D1 > 0:
        tl.store(o_rows + offs_d1[None, :] * sod, (acc1 * inv_l[:, None]).to(O.dtype.element_ty),
                 mask=m_mask[:, None] & d1_mask[None, :])


def head_dim_pieces(d: int) -> tuple[int, int]:
    """(D0, D1): power-of-two pieces (>= 16 each, as tl.dot needs) covering head dim d with little
    padding: 40 -> 32 + 16 (48), 80 -> 64 + 16, 160 -> 128 + 32, 64 / 128 / 512 -> one piece; head
    dims above 256 are one power-of-two piece."""
    if d > 256:  # one padded piece (512 for the VAE), whose output can be split over programs (D_SPLIT)
        return triton.next_power_of_2(d), 0
    d0 = max(16, 1 << (max(d, 1).bit_length() - 1))  # largest power of two <= d (at least 16)
    rest = d - d0
    if rest <= 0:
        return d0, 0
    d1 = max(16, triton.next_power_of_2(rest))
    if d1 >= d0:  # e.g. 100 -> 64 + 64: one padded piece is as good and simpler
        return 2 * d0, 0
    return d0, d1


def _cfg(m, n, ds, w, st):
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n, "D_SPLIT": ds}, num_warps=w, num_stages=st)


# (BLOCK_M, BLOCK_N, D_SPLIT, num_warps, num_stages) per head-dim class, 16-bit inputs. Every entry
# compiles for sm_80 and sm_90 within the opt-in shared memory (166,912 / 232,448 B) and without
# register spills (Triton 3.9 AOT, `python tools/triton_aot.py`). Measured and dropped: for 512,
# (64, 32, 1, 8, 2) spills on sm_90, (128, 32, 4, 8, 2) needs 172,032 B on sm_80, (128, 32, 2, 8, 2)
# and (32, 32, 1, 4, 2) spill; for 160, (128, 32, 1, 4, 3), (128, 128, 1, 8, 2) and (64, 128, 1, 8, 2)
# spill on sm_80; for 128, (128, 32, 1, 4, 3) spills on sm_80.
_SHAPES_UP_TO_128 = [(128, 64, 1, 8, 3), (64, 64, 1, 4, 3), (128, 32, 1, 8, 3), (128, 128, 1, 8, 2),
                     (64, 32, 1, 4, 4)]
_SHAPES_160 = [(128, 64, 1, 8, 3), (64, 64, 1, 4, 3), (128, 32, 1, 8, 3), (64, 64, 1, 8, 2), (64, 32, 1, 4, 4)]
_SHAPES_512 = [(64, 32, 2, 8, 2), (64, 32, 4, 8, 2), (32, 32, 2, 4, 2), (64, 64, 4, 8, 2), (64, 16, 2, 4, 2)]
# float32 inputs (tests / odd callers only): small tiles keep fp32 operands inside shared memory.
_SHAPES_FP32 = [(64, 32, 1, 4, 2), (32, 32, 1, 4, 2)]
_SHAPES_FP32_512 = [(32, 32, 4, 4, 1), (16, 32, 2, 4, 1)]


def configs_for(d: int, fp32: bool = False) -> list:
    """Autotune candidates for head dim d (see the shape lists above)."""
    d0, d1 = head_dim_pieces(d)
    width = d0 + d1
    if fp32:
        shapes = _SHAPES_FP32_512 if width > 256 else _SHAPES_FP32
    elif width > 256:
        shapes = _SHAPES_512
    elif width > 128:
        shapes = _SHAPES_160
    else:
        shapes = _SHAPES_UP_TO_128
    return [_cfg(*s) for s in shapes]


_tuned = {}


def _kernel_for(d: int, fp32: bool):
    if INTERPRET:
        return None
    key = (head_dim_pieces(d), fp32)
    if key not in _tuned:
        _tuned[key] = triton.autotune(configs=configs_for(d, fp32), key=["Lq", "Lk", "D"])(_attn_fwd_kernel)
    return _tuned[key]


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
    d0, d1 = head_dim_pieces(d)
    big_d = d0 + d1 > 256
    fp32 = q.dtype == torch.float32
    flags = dict(D=d, D0=d0, D1=d1, IEEE_FP32=fp32)

    def grid(meta):
        m_blocks = triton.cdiv(lq, meta["BLOCK_M"])
        return (m_blocks * bsz * heads, meta["D_SPLIT"])

    args = (q, k, v, out, scale * _LOG2E, lq, lk, heads, *q.stride(), *k.stride(), *v.stride(), *out.stride())

    kernel = None if config is not None else _kernel_for(d, fp32)
    if kernel is None:
        if config is not None:
            cfg = dict(config)
        elif INTERPRET:  # CPU: small tiles keep the numpy emulation quick
            cfg = {"BLOCK_M": 16, "BLOCK_N": 32, "D_SPLIT": 2 if big_d else 1}
        else:
            cfg = dict(configs_for(d, fp32)[0].kwargs)
        cfg.setdefault("D_SPLIT", 1)
        if d1 and cfg["D_SPLIT"] != 1:
            raise ValueError(f"D_SPLIT > 1 needs a power-of-two head dim (got {d} = {d0} + {d1})")
        _attn_fwd_kernel[grid({"BLOCK_M": cfg["BLOCK_M"], "D_SPLIT": cfg["D_SPLIT"]})](
            *args, **flags, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
            D_SPLIT=cfg["D_SPLIT"], num_warps=cfg.get("num_warps", 4))
        return out
    kernel[grid](*args, **flags)
    return out
