"""torch.library registration of the GPU backends: ``torch.ops.ldm_engine.*``.

Each op is opaque to torch.compile / export (one node) and has a fake kernel that states the output
exactly: GroupNorm returns ``empty_like(x)`` (memory format kept); attention returns a
(B, H, Lq, D) view of (B, Lq, H, D) storage. Registration touches no GPU; kernels import lazily.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def _attention_out(q: Tensor) -> Tensor:
    b, h, lq, d = q.shape
    return torch.empty((b, lq, h, d), dtype=q.dtype, device=q.device).transpose(1, 2)


@torch.library.custom_op("ldm_engine::group_norm_silu_triton", mutates_args=())
def group_norm_silu_triton(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], num_groups: int,
                           eps: float, silu: bool, channels_last_3d: bool) -> Tensor:
    from ldm_engine.kernels.group_norm_silu import group_norm_silu

    return group_norm_silu(x, weight, bias, num_groups, eps, silu, channels_last_3d)


@group_norm_silu_triton.register_fake
def _(x, weight, bias, num_groups, eps, silu, channels_last_3d):
    return torch.empty_like(x)


@torch.library.custom_op("ldm_engine::group_norm_silu_cuda", mutates_args=())
def group_norm_silu_cuda(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], num_groups: int,
                         eps: float, silu: bool, channels_last_3d: bool) -> Tensor:
    from . import _cuda_backend

    return _cuda_backend.group_norm_silu(x, weight, bias, num_groups, eps, silu, channels_last_3d)


@group_norm_silu_cuda.register_fake
def _(x, weight, bias, num_groups, eps, silu, channels_last_3d):
    return torch.empty_like(x)


@torch.library.custom_op("ldm_engine::attention_triton", mutates_args=())
def attention_triton(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    from ldm_engine.kernels.attention import attention

    return attention(q, k, v, scale)


@attention_triton.register_fake
def _(q, k, v, scale):
    return _attention_out(q)


@torch.library.custom_op("ldm_engine::attention_cuda", mutates_args=())
def attention_cuda(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    from . import _cuda_backend

    return _cuda_backend.attention(q, k, v, scale)


@attention_cuda.register_fake
def _(q, k, v, scale):
    return _attention_out(q)
