"""Python side of the "cuda" backend: allocates outputs / workspaces with torch (caching allocator,
graph-capture safe) and calls ``ldm_engine._C`` on the current stream. ``_C`` checks everything.

Per call this costs a few attribute reads, dict lookups and the output allocation: the dtype goes to
``_C`` as a name (never inferred from ``__cuda_array_interface__``'s typestr, which torch 2.5 / 2.6
report as "<f2" for bfloat16); workspace sizes and attention plans are cached per shape; fp32
GroupNorm parameters are passed as they are (the kernels read fp32); and ``_C``'s pointer query
(cudaPointerGetAttributes) is skipped when every tensor is a torch CUDA tensor on the op's device.
"""

from __future__ import annotations

import os

import torch

from ldm_engine._cuda import extension

DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}

_sm_counts: dict = {}
_gn_workspace: dict = {}
_attention_plans: dict = {}


def _stream_and_device(t: torch.Tensor) -> tuple[int, int]:
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    return torch.cuda.current_stream(index).cuda_stream, index


def _sm_count(device: int) -> int:
    """Multiprocessors of cuda:device, which picks the GroupNorm plan (split below one CTA per SM);
    cached. LDM_ENGINE_GN_SM_COUNT (read once per device) overrides it: 0 keeps the fused plan
    wherever it fits -- the A/B switch for timing that rule on a GPU (csrc/group_norm_silu.cu)."""
    n = _sm_counts.get(device)
    if n is None:
        env = os.environ.get("LDM_ENGINE_GN_SM_COUNT")
        n = int(env) if env else torch.cuda.get_device_properties(device).multi_processor_count
        _sm_counts[device] = n
    return n


def _on_one_cuda_device(first: torch.Tensor, *others) -> bool:
    """True when every tensor is a CUDA tensor on first's device: torch's own allocations, so _C may
    skip its pointer query. Otherwise _C queries each pointer and names the one that is wrong."""
    dev = first.device
    return first.is_cuda and all(t is None or t.device == dev for t in others)


def _params(weight, bias, dtype: torch.dtype):
    """(weight, bias, their dtype name): x's dtype or float32 pass unchanged (the kernels read fp32
    directly: no rounding to fp16 / bf16, no cast kernel); anything else, or a mixed pair, -> float32."""
    present = [p for p in (weight, bias) if p is not None]
    if not present:
        return None, None, DTYPE_NAMES[dtype]
    pdt = present[0].dtype
    if pdt not in (dtype, torch.float32) or any(p.dtype != pdt for p in present):
        pdt = torch.float32
    weight, bias = (None if p is None else (p.detach() if p.requires_grad else p).to(pdt).contiguous()
                    for p in (weight, bias))
    return weight, bias, DTYPE_NAMES[pdt]


def group_norm_silu(x, weight, bias, num_groups: int, eps: float, silu: bool, channels_last_3d: bool):
    ext = extension()
    # torch refuses __cuda_array_interface__ on tensors that require grad (nn.Parameter weights,
    # inputs in grad mode reach custom ops unchanged); the op has no autograd, so read detached views.
    if x.requires_grad:
        x = x.detach()
    channels_last = channels_last_3d or (x.dim() == 4 and not x.is_contiguous()
                                         and x.is_contiguous(memory_format=torch.channels_last))
    if not (channels_last or x.is_contiguous()):
        x = x.contiguous()
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y
    w, b, param_dtype = _params(weight, bias, x.dtype)
    dtype = DTYPE_NAMES[x.dtype]
    stream, device = _stream_and_device(x)
    sm_count = _sm_count(device)
    key = (x.shape, num_groups, channels_last, x.dtype, x.data_ptr() % 16 == 0, sm_count)
    n_ws = _gn_workspace.get(key)
    if n_ws is None:
        n_ws = _gn_workspace[key] = ext.group_norm_silu_workspace_size(x, num_groups, channels_last, dtype=dtype,
                                                                      sm_count=sm_count)
    ws = torch.empty(n_ws, dtype=torch.float32, device=x.device) if n_ws > 0 else None
    ext.group_norm_silu(x, w, b, y, ws, num_groups, eps, silu, channels_last, stream, device, dtype=dtype,
                        param_dtype=param_dtype, sm_count=sm_count, check_pointers=not _on_one_cuda_device(x, w, b))
    return y


def aligned(t: torch.Tensor) -> bool:
    """Head dim contiguous, other strides and the pointer 16-byte aligned (what _C requires)."""
    if t.stride(-1) != 1 or t.data_ptr() % 16:
        return False
    return all(size <= 1 or (stride * t.element_size()) % 16 == 0 for size, stride in zip(t.shape[:3], t.stride()[:3]))


def attention(q, k, v, scale: float):
    ext = extension()
    # as in group_norm_silu: _C reads tensors through __cuda_array_interface__, which grad tensors refuse
    q, k, v = (t.detach() if t.requires_grad else t for t in (q, k, v))
    # A layout _C cannot read gets a fresh copy (clone: new storage, so a contiguous view at a
    # misaligned offset is fixed too). ops.attention sends such views to torch instead (_attn_reason).
    q, k, v = (t if aligned(t) else t.clone(memory_format=torch.contiguous_format) for t in (q, k, v))
    bsz, heads, lq, d = q.shape
    out = torch.empty((bsz, lq, heads, d), dtype=q.dtype, device=q.device).transpose(1, 2)
    if out.numel() == 0:
        return out
    dtype = DTYPE_NAMES[q.dtype]
    stream, device = _stream_and_device(q)
    key = (bsz, heads, lq, k.shape[2], d, q.dtype, device)
    plan = _attention_plans.get(key)
    if plan is None:  # queries occupancy: once per shape and device
        plan = _attention_plans[key] = tuple(ext.attention_plan(q, k, device, dtype=dtype))
    num_splits, n_ws = plan
    ws = torch.empty(n_ws, dtype=torch.float32, device=q.device) if n_ws > 0 else None
    ext.attention(q, k, v, out, ws, scale, num_splits, stream, device, dtype=dtype,
                  check_pointers=not _on_one_cuda_device(q, k, v))
    return out
