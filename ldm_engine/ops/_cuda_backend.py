"""Python side of the "cuda" backend: allocates outputs / workspaces with torch (caching allocator,
graph-capture safe) and calls ``ldm_engine._C`` on the current stream. ``_C`` checks everything."""

from __future__ import annotations

import torch

from ldm_engine._cuda import extension


def _stream_and_device(t: torch.Tensor) -> tuple[int, int]:
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    return torch.cuda.current_stream(index).cuda_stream, index


def group_norm_silu(x, weight, bias, num_groups: int, eps: float, silu: bool, channels_last_3d: bool):
    ext = extension()
    # torch refuses __cuda_array_interface__ on tensors that require grad (nn.Parameter weights,
    # inputs in grad mode reach custom ops unchanged); the op has no autograd, so read detached views.
    if x.requires_grad:
        x = x.detach()
    if weight is not None and weight.requires_grad:
        weight = weight.detach()
    if bias is not None and bias.requires_grad:
        bias = bias.detach()
    channels_last = channels_last_3d or (x.dim() == 4 and not x.is_contiguous()
                                         and x.is_contiguous(memory_format=torch.channels_last))
    if not (channels_last or x.is_contiguous()):
        x = x.contiguous()
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y
    # The kernels read affine parameters in x's dtype (converting C values is cheap).
    w = weight.to(dtype=x.dtype).contiguous() if weight is not None else None
    b = bias.to(dtype=x.dtype).contiguous() if bias is not None else None
    n_ws = ext.group_norm_silu_workspace_size(x, num_groups, channels_last)
    ws = torch.empty(n_ws, dtype=torch.float32, device=x.device) if n_ws > 0 else None
    stream, device = _stream_and_device(x)
    ext.group_norm_silu(x, w, b, y, ws, num_groups, eps, silu, channels_last, stream, device)
    return y


def _aligned(t: torch.Tensor) -> bool:
    """Head dim contiguous, other strides and the pointer 16-byte aligned (what _C requires)."""
    if t.stride(-1) != 1 or t.data_ptr() % 16:
        return False
    return all(size <= 1 or (stride * t.element_size()) % 16 == 0 for size, stride in zip(t.shape[:3], t.stride()[:3]))


_attention_plans: dict = {}


def attention(q, k, v, scale: float):
    ext = extension()
    # as in group_norm_silu: _C reads tensors through __cuda_array_interface__, which grad tensors refuse
    q, k, v = (t.detach() if t.requires_grad else t for t in (q, k, v))
    q, k, v = (t if _aligned(t) else t.contiguous() for t in (q, k, v))
    bsz, heads, lq, d = q.shape
    out = torch.empty((bsz, lq, heads, d), dtype=q.dtype, device=q.device).transpose(1, 2)
    if out.numel() == 0:
        return out
    stream, device = _stream_and_device(q)
    key = (bsz, heads, lq, k.shape[2], d, q.dtype, device)
    plan = _attention_plans.get(key)
    if plan is None:  # queries occupancy: once per shape and device
        plan = _attention_plans[key] = tuple(ext.attention_plan(q, k, device))
    num_splits, n_ws = plan
    ws = torch.empty(n_ws, dtype=torch.float32, device=q.device) if n_ws > 0 else None
    ext.attention(q, k, v, out, ws, scale, num_splits, stream, device)
    return out
