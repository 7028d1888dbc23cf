"""fp32-upcast references of the fused ops: the yardstick every backend is tested against.

Written from the definitions (mean / biased variance per group, softmax(q k^T * scale) v), not
through ``F.group_norm`` or ``F.scaled_dot_product_attention``, so that the "torch" backend is
checked against something independent of it. Slow and memory-hungry by design: tests only.
"""

from __future__ import annotations

import math

import torch

__all__ = ["group_norm_silu_reference", "attention_reference"]


def group_norm_silu_reference(x: torch.Tensor, weight, bias, num_groups: int, eps: float = 1e-5, *,
                              silu: bool = True, channels_last_3d: bool = False,
                              out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """GroupNorm(+SiLU) computed in fp32 from the definition.

    x: (N, C, *spatial), or (N, L, C) when ``channels_last_3d``. The result keeps x's memory format
    and is cast to ``out_dtype`` (default: x.dtype; pass torch.float32 to measure errors).
    """
    out_dtype = x.dtype if out_dtype is None else out_dtype
    xf = x.float()
    if channels_last_3d:
        xf = xf.transpose(1, 2)  # (N, C, L) view
    n, c = xf.shape[:2]
    if c % num_groups:
        raise ValueError(f"channels ({c}) must be divisible by num_groups ({num_groups})")
    grouped = xf.reshape(n, num_groups, -1)
    mean = grouped.mean(dim=-1, keepdim=True)
    var = (grouped - mean).square().mean(dim=-1, keepdim=True)  # two-pass: no cancellation
    y = ((grouped - mean) * torch.rsqrt(var + eps)).reshape(xf.shape)
    affine_shape = (1, c) + (1,) * (xf.dim() - 2)
    if weight is not None:
        y = y * weight.float().reshape(affine_shape)
    if bias is not None:
        y = y + bias.float().reshape(affine_shape)
    if silu:
        y = y * torch.sigmoid(y)
    if channels_last_3d:
        return y.transpose(1, 2).contiguous().to(out_dtype)
    fmt = torch.channels_last if (x.dim() == 4 and not x.is_contiguous()
                                  and x.is_contiguous(memory_format=torch.channels_last)) else torch.contiguous_format
    return y.to(dtype=out_dtype, memory_format=fmt)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                        out_dtype: torch.dtype | None = None, chunk: int = 1024) -> torch.Tensor:
    """softmax(q k^T * scale) v in fp32, non-causal; q (B, H, Lq, D), k and v (B, H, Lk, D).

    Works over query chunks so that a 4096 x 4096 score matrix per head never sits in memory whole.
    """
    out_dtype = q.dtype if out_dtype is None else out_dtype
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    kf, vf = k.float(), v.float()
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for start in range(0, q.shape[2], chunk):
        qf = q[:, :, start:start + chunk].float()
        scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale
        scores = scores - scores.amax(dim=-1, keepdim=True)
        probs = scores.exp()
        probs = probs / probs.sum(dim=-1, keepdim=True)
        out[:, :, start:start + chunk] = torch.matmul(probs, vf)
    return out.to(out_dtype)
