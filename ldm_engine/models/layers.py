"""Building blocks shared by the U-Net, the ControlNet and the VAE.

Module and attribute names follow diffusers 0.42.1 so that state-dict keys are identical
(``norm1``, ``conv1``, ``time_emb_proj``, ``to_q``, ``to_out.0``, ``ff.net.0.proj`` ...).
Every GroupNorm(+SiLU) goes through ``ldm_engine.ops.group_norm_silu`` and every attention
through ``ldm_engine.ops.attention`` (looked up at call time, so backends can be swapped).
"""

from __future__ import annotations

import json
import math
import weakref
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ldm_engine import ops

__all__ = [
    "ConfigBase", "require", "per_block",
    "batch_timesteps", "timestep_embedding", "Timesteps", "TimestepEmbedding",
    "GroupNorm", "ResnetBlock2D", "Downsample2D", "Upsample2D", "subpixel_weights", "subpixel_conv",
    "set_subpixel_upsample",
    "Attention", "SpatialSelfAttention", "GEGLU", "FeedForward", "TransformerBlock", "Transformer2D",
]


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------

def _freeze(value: Any) -> Any:
    """JSON lists -> tuples (nested), so configs are immutable-looking and comparable."""
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


@dataclass
class ConfigBase:
    """Dataclass config whose fields are named like the diffusers config.json keys."""

    @classmethod
    def from_dict(cls, d: dict) -> "ConfigBase":
        """Build from a config.json dict; unknown keys (``_class_name``, ...) are ignored and
        missing keys take diffusers' defaults."""
        if not isinstance(d, dict):
            raise TypeError(f"{cls.__name__}.from_dict expects a dict, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        return cls(**{k: _freeze(v) for k, v in d.items() if k in known})

    @classmethod
    def from_json(cls, path: str | Path) -> "ConfigBase":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_dict(self) -> dict:
        return asdict(self)


def require(owner: str, key: str, value: Any, supported: tuple) -> None:
    """Raise a ValueError naming the config key when ``value`` is not one of ``supported``."""
    if value not in supported:
        raise ValueError(f"{owner}: unsupported {key}={value!r} (supported: "
                         f"{', '.join(repr(s) for s in supported)})")


def per_block(owner: str, key: str, value: Any, num_blocks: int) -> list:
    """An int (same for every block) or a sequence with one entry per block -> list."""
    if isinstance(value, int) and not isinstance(value, bool):
        return [value] * num_blocks
    if isinstance(value, (tuple, list)) and len(value) == num_blocks and \
            all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return list(value)
    raise ValueError(f"{owner}: {key}={value!r} must be an int or {num_blocks} ints (one per block)")


# ---------------------------------------------------------------------------------------------
# Time embedding
# ---------------------------------------------------------------------------------------------

def batch_timesteps(timestep, sample: torch.Tensor) -> torch.Tensor:
    """A U-Net's timestep argument (tensor or number; 0-d, (1,) or (N,)) -> (N,) on the sample's device."""
    batch = sample.shape[0]
    t = timestep if torch.is_tensor(timestep) else torch.tensor(timestep)
    if t.dim() > 1 or (t.dim() == 1 and t.shape[0] not in (1, batch)):
        raise ValueError(f"timestep must be 0-d or of shape ({batch},) or (1,), got {tuple(t.shape)}")
    return t.to(sample.device).reshape(-1).expand(batch)


def timestep_embedding(timesteps: torch.Tensor, dim: int, *, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (N,) -> (N, dim) float32, as diffusers' ``get_timestep_embedding``."""
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=timesteps.device) * (-math.log(max_period))
    freqs = torch.exp(exponent / (half - freq_shift))
    angles = timesteps.float()[:, None] * freqs[None, :]
    emb = torch.cat([angles.cos(), angles.sin()] if flip_sin_to_cos else [angles.sin(), angles.cos()], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class Timesteps(nn.Module):
    """Parameter-free sinusoidal projection (diffusers' ``time_proj`` / ``add_time_proj``)."""

    def __init__(self, dim: int, flip_sin_to_cos: bool, freq_shift: float):
        super().__init__()
        self.dim, self.flip_sin_to_cos, self.freq_shift = dim, flip_sin_to_cos, freq_shift

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        return timestep_embedding(timesteps, self.dim, flip_sin_to_cos=self.flip_sin_to_cos,
                                  freq_shift=self.freq_shift)


class TimestepEmbedding(nn.Module):
    """linear_1 -> SiLU -> linear_2."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


# ---------------------------------------------------------------------------------------------
# Convolutional blocks
# ---------------------------------------------------------------------------------------------

class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm (same parameters and keys) computed by ``ops.group_norm_silu``; ``silu=True``
    fuses the SiLU that follows the norm in diffusers."""

    def __init__(self, num_groups: int, num_channels: int, eps: float, *, silu: bool):
        super().__init__(num_groups, num_channels, eps=eps, affine=True)
        self.silu = silu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.group_norm_silu(x, self.weight, self.bias, self.num_groups, self.eps, silu=self.silu)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", silu={self.silu}"


class ResnetBlock2D(nn.Module):
    """GN+SiLU -> conv1 (+ time embedding) -> GN+SiLU -> conv2, plus a (1x1-conv) shortcut.

    ``temb_act`` is the time embedding *after* SiLU: diffusers applies SiLU inside every block,
    the models here apply it once per forward and hand the result to all blocks.
    """

    def __init__(self, in_channels: int, out_channels: int, *, temb_channels: int | None, groups: int,
                 eps: float, output_scale_factor: float = 1.0):
        super().__init__()
        self.norm1 = GroupNorm(groups, in_channels, eps, silu=True)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels is not None else None
        self.norm2 = GroupNorm(groups, out_channels, eps, silu=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.output_scale_factor = output_scale_factor

    def forward(self, x: torch.Tensor, temb_act: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(self.norm1(x))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(temb_act)[:, :, None, None]
        h = self.conv2(self.norm2(h))
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        out = shortcut + h
        return out if self.output_scale_factor == 1.0 else out / self.output_scale_factor


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv. ``padding=0`` (VAE encoder) pads right/bottom by one, as diffusers does."""

    def __init__(self, channels: int, padding: int):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest 2x upsampling (or to ``size``: odd skip sizes in the U-Net) then a 3x3 conv.

    With ``subpixel`` on (``set_subpixel_upsample``), an exact 2x upsample is computed without the
    4x larger upsampled tensor: output pixel (2i + a, 2j + b) of nearest-2x + 3x3 conv sees input
    rows {i-1, i} (a = 0) or {i, i+1} (a = 1), so each of the four phases (a, b) is a 2x2 conv of the
    input whose taps are sums of the 3x3 ones (``subpixel_weights``): 16 instead of 36 multiply-adds
    per input pixel and channel pair. A ``size`` that is not exactly 2x, and ONNX export (a traced
    branch would be baked for the sample size), take the plain path.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.subpixel = False
        self._phase_cache = None  # (weight ref, bias ref, fingerprint, phase weight, phase bias)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        twice = size is None or (size[0] == 2 * x.shape[-2] and size[1] == 2 * x.shape[-1])
        if self.subpixel and twice and not torch.jit.is_tracing():
            return self._subpixel_forward(x)
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=tuple(size), mode="nearest")
        return self.conv(x)

    def _subpixel_forward(self, x: torch.Tensor) -> torch.Tensor:
        return subpixel_conv(x, *self._phase_weights(x))

    def _phase_weights(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The phase weights, derived once per weight state in eager inference (keyed on the weight's
        identity, version -- in-place changes such as LoRA merges -- and storage; ``_apply``, i.e.
        .to() / .half() / channels_last, drops them). Derived inline, every call, where a cache would
        be wrong: under torch.compile (traced into the graph), while a CUDA graph is captured (its
        replays then follow in-place weight changes) and when autograd is recording."""
        w, b = self.conv.weight, self.conv.bias
        capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
        if torch.compiler.is_compiling() or capturing or torch.is_grad_enabled() or w.device.type == "meta":
            return subpixel_weights(w, b)
        state = tuple((t._version, t.data_ptr(), t.dtype, t.device, t.stride()) for t in (w, b) if t is not None)
        cached = self._phase_cache
        if (cached is None or cached[2] != state or cached[0]() is not w
                or (b is not None and cached[1]() is not b)):
            cached = (weakref.ref(w), None if b is None else weakref.ref(b), state, *subpixel_weights(w, b))
            self._phase_cache = cached
        return cached[3], cached[4]

    def _apply(self, fn, recurse=True):
        self._phase_cache = None  # new weight storage, dtype or layout: derive again
        return super()._apply(fn, recurse)


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    cl = t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if cl else torch.contiguous_format


def _fold_taps(w: torch.Tensor, dim: int) -> torch.Tensor:
    """The 3 taps along ``dim`` -> 2 phases (a new leading dim) x 2 taps: phase 0 reads input
    (i-1, i) with (w0, w1 + w2), phase 1 reads (i, i+1) with (w0 + w1, w2)."""
    w0, w1, w2 = w.unbind(dim)
    return torch.stack((torch.stack((w0, w1 + w2), dim), torch.stack((w0 + w1, w2), dim)))


def subpixel_weights(weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """3x3 conv weight (C, I, 3, 3) -> the 2x2 weights of the four phases of nearest-2x + that conv,
    (4C, I, 2, 2) with phase z = 2a + b major, and the bias repeated per phase. Half types are summed
    in float32 and rounded once; the weight's memory format is kept."""
    c, i = weight.shape[:2]
    wide = weight.to(torch.promote_types(weight.dtype, torch.float32))
    k = _fold_taps(_fold_taps(wide, -1), -2)  # (2 a, 2 b, C, I, 2 p, 2 q)
    k = k.reshape(4 * c, i, 2, 2).to(weight.dtype).contiguous(memory_format=_memory_format(weight))
    return k, None if bias is None else bias.repeat(4)


def subpixel_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Nearest 2x + 3x3 conv of ``x`` from the phase weights of ``subpixel_weights``: one 2x2 conv
    for all four phases, then one interleaving copy (cheaper than stack + pixel_shuffle on CPU).
    The output keeps the conv's memory format (channels_last in, channels_last out)."""
    n, _, h, w = x.shape
    c = weight.shape[0] // 4
    # Phase z = 2a + b is channels [z*c, (z+1)*c) of the (h+1, w+1) result, read from offset (a, b):
    # the padding of 1 serves both phases' neighbours (row i-1 for a = 0, row i+1 for a = 1).
    y = F.conv2d(x, weight, bias, padding=1)
    sn, sc, sh, sw = y.stride()
    phases = y.as_strided((n, c, h, 2, w, 2), (sn, sc, sh, 2 * c * sc + sh, sw, c * sc + sw))
    out = torch.empty((n, c, 2 * h, 2 * w), dtype=y.dtype, device=y.device, memory_format=_memory_format(y))
    out.view(n, c, h, 2, w, 2).copy_(phases)
    return out


def set_subpixel_upsample(module: nn.Module, enabled: bool) -> int:
    """Switches every Upsample2D inside ``module`` (VAE decoder, U-Net, pixel UNet2DModel) to the
    sub-pixel path or back; returns how many there are."""
    upsamplers = [m for m in module.modules() if isinstance(m, Upsample2D)]
    for m in upsamplers:
        m.subpixel, m._phase_cache = bool(enabled), None
    return len(upsamplers)


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------

def _is_row_split(fused: torch.Tensor | None, parts: list[torch.Tensor]) -> bool:
    """True when ``parts`` are consecutive row blocks of ``fused`` (same memory, dtype and device)."""
    if fused is None:
        return False
    start = 0
    for p in parts:
        rows = fused[start:start + p.shape[0]]
        if (p.dtype != fused.dtype or p.device != fused.device or p.shape != rows.shape
                or p.stride() != rows.stride() or p.data_ptr() != rows.data_ptr()):
            return False
        start += p.shape[0]
    return start == fused.shape[0]


def _fuse_rows(params: list[nn.Parameter]) -> torch.Tensor:
    """One new tensor [p0; p1; ...] (rows stacked); each parameter's data becomes its row block of it,
    in place (``.data =`` keeps the Parameter objects, which LoRA and optimizers hold on to)."""
    fused = torch.cat([p.detach() for p in params])
    start = 0
    for p in params:
        p.data = fused[start:start + p.shape[0]]
        start += p.shape[0]
    return fused


def _fuse_again_after_load(module: "Attention", incompatible_keys) -> None:
    # load_state_dict(assign=True) puts new tensors into the parameters: fuse again. A plain load
    # copies into the parameters (the fused tensor's rows): nothing to do.
    if module._fused_weight is not None:
        module.fuse_projections()


class Attention(nn.Module):
    """Multi-head attention on token sequences (B, L, C): self-attention, or cross-attention when
    ``context_dim`` is given. Heads are laid out (B, H, L, D) for ``ops.attention``.

    Fused projections: self-attention computes Q, K and V with one GEMM against a (3 * inner, C)
    weight, cross-attention K and V with one GEMM against (2 * inner, context_dim) (Q reads x, not
    the context). ``to_q`` / ``to_k`` / ``to_v`` stay ordinary ``nn.Linear``s with diffusers' keys and
    shapes; their weights and biases are row blocks (views) of the fused tensors, so state dicts,
    saving, and in-place writes to them (``load_state_dict``, LoRA's ``param.copy_``) are unchanged and
    seen by the fused GEMM. The fused tensors are plain attributes, not parameters or buffers.

    When fusing happens: when the module is built (also on meta), and again after every operation
    that gives the parameters new storage -- ``load_state_dict(assign=True)`` (a post-load hook),
    ``Module.to`` / ``half`` / ``to_empty`` / ... (``_apply``), ``copy.deepcopy`` and pickling
    (``__getstate__`` / ``__setstate__``). Nothing is checked or mutated in ``forward``: a per-call
    "are the views intact" test would cost Python time on each of the ~150 attention calls of a
    U-Net forward, cannot run while torch.compile traces or a CUDA graph is captured, and a lazy
    fuse there would race between the threads one Engine serves. What is NOT covered: replacing a
    parameter object by hand (``attn.to_q.weight = nn.Parameter(...)``, ``.data = ...``) or
    converting a single projection (``attn.to_q.half()``); call ``fuse_projections()`` after that.
    """

    def __init__(self, query_dim: int, heads: int, head_dim: int, *, context_dim: int | None = None,
                 qkv_bias: bool = False):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim, self.scale = heads, head_dim, head_dim ** -0.5
        self.is_cross_attention = context_dim is not None
        self.to_q = nn.Linear(query_dim, inner, bias=qkv_bias)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=qkv_bias)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=qkv_bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim)])  # diffusers: [Linear, Dropout]
        self._fused_weight: torch.Tensor | None = None
        self._fused_bias: torch.Tensor | None = None
        self.register_load_state_dict_post_hook(_fuse_again_after_load)
        self.fuse_projections()

    # -- fusing ---------------------------------------------------------------------------------
    def _fused_linears(self) -> tuple[nn.Linear, ...]:
        return (self.to_k, self.to_v) if self.is_cross_attention else (self.to_q, self.to_k, self.to_v)

    @property
    def projections_fused(self) -> bool:
        return self._fused_weight is not None

    @torch.no_grad()
    def fuse_projections(self) -> bool:
        """Make the projections' weights (and biases) row blocks of one fused tensor; idempotent (a
        no-op when they already are). Returns False, leaving the module unfused (separate GEMMs),
        when the parameters do not share one device and dtype (e.g. a partial load on meta).

        Row order [q; k; v] (not interleaved per head): each projection's block stays contiguous
        (state dicts, safetensors and LoRA see ordinary tensors), and the split output has the
        layout the separate GEMMs gave, only with a row stride of 3 * inner instead of inner: head
        dim unit-stride, every stride and the k / v offsets multiples of head_dim elements, so the
        "cuda" backend's 16-byte checks (``ops._attn_reason``, ``_cuda_backend.aligned``) pass
        whenever they passed before (inner * element size a multiple of 16) and Triton takes any
        strides; nothing is copied or sent to the torch fallback."""
        linears = self._fused_linears()
        weights = [m.weight for m in linears]
        biases = [m.bias for m in linears] if linears[0].bias is not None else []
        if _is_row_split(self._fused_weight, weights) and (not biases or _is_row_split(self._fused_bias, biases)):
            return True
        params = weights + biases
        if any(p.device != params[0].device or p.dtype != params[0].dtype for p in params):
            self.unfuse_projections()
            return False
        self._fused_weight = _fuse_rows(weights)
        self._fused_bias = _fuse_rows(biases) if biases else None
        return True

    def unfuse_projections(self) -> None:
        """Back to separate GEMMs per projection (the parameters keep their values and storage)."""
        self._fused_weight = self._fused_bias = None

    def _apply(self, fn, recurse=True):
        # Module.to / half / to_empty / share_memory ... replace each parameter's data separately,
        # which would leave the fused tensor stale: fuse again from the converted parameters.
        fused = self._fused_weight is not None
        super()._apply(fn, recurse)
        if fused:
            self.fuse_projections()
        return self

    def __getstate__(self):
        # copy.deepcopy / pickle: Parameter.__deepcopy__ clones each parameter on its own, so a copied
        # fused tensor would not be what the copy's parameters share; rebuild it in __setstate__.
        state = super().__getstate__()
        state["_fuse_again_on_setstate"] = state.pop("_fused_weight") is not None
        state["_fused_weight"] = state["_fused_bias"] = None
        return state

    def __setstate__(self, state):
        fuse_again = state.pop("_fuse_again_on_setstate", False)
        super().__setstate__(state)
        if fuse_again:
            self.fuse_projections()

    # -- forward --------------------------------------------------------------------------------
    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def _fused_params(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The fused weight and bias; concatenated afresh from the parameters when autograd must
        reach them (training), or while torch.jit traces (ONNX export): the tracer takes only
        parameters and buffers as weights (initializers) and would bake a plain tensor attribute into
        the graph as a Constant node; the Concat of initializers is constant-folded into one."""
        if torch.jit.is_tracing() or (torch.is_grad_enabled() and self.to_k.weight.requires_grad):
            linears = self._fused_linears()
            bias = torch.cat([m.bias for m in linears]) if linears[0].bias is not None else None
            return torch.cat([m.weight for m in linears]), bias
        return self._fused_weight, self._fused_bias

    def _split_fused(self, x: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
        """One GEMM against the fused weight, (B, L, n * inner) -> n views (B, H, L, D)."""
        y = F.linear(x, *self._fused_params())
        return y.unflatten(-1, (n, self.heads, self.head_dim)).permute(2, 0, 3, 1, 4).unbind(0)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        fused = self._fused_weight is not None
        if fused and self.is_cross_attention and context is not None:
            q = self._split_heads(self.to_q(x))
            k, v = self._split_fused(context, 2)
        elif fused and not self.is_cross_attention and context is None:
            q, k, v = self._split_fused(x, 3)
        else:  # unfused, or a context handed to a self-attention module
            context = x if context is None else context
            q = self._split_heads(self.to_q(x))
            k = self._split_heads(self.to_k(context))
            v = self._split_heads(self.to_v(context))
        out = ops.attention(q, k, v, scale=self.scale)
        out = out.transpose(1, 2).reshape(x.shape[0], x.shape[1], self.heads * self.head_dim)
        return self.to_out[0](out)


class SpatialSelfAttention(Attention):
    """The VAE mid-block attention and the pixel U-Net's (UNet2DModel) attention blocks: GroupNorm,
    then self-attention over the H*W positions with C channels (heads of ``head_dim`` channels, one
    head by default), plus the residual, divided by ``rescale_output_factor``."""

    def __init__(self, channels: int, *, groups: int, eps: float, head_dim: int | None = None,
                 rescale_output_factor: float = 1.0):
        head_dim = head_dim or channels
        super().__init__(channels, heads=channels // head_dim, head_dim=head_dim, qkv_bias=True)
        self.group_norm = GroupNorm(groups, channels, eps, silu=False)
        self.rescale_output_factor = rescale_output_factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        tokens = self.group_norm(x).view(b, c, hgt * wid).transpose(1, 2)
        out = x + super().forward(tokens).transpose(1, 2).view(b, c, hgt, wid)
        return out if self.rescale_output_factor == 1.0 else out / self.rescale_output_factor


class GEGLU(nn.Module):
    """proj -> (hidden, gate) -> hidden * gelu(gate)."""

    def __init__(self, dim: int, inner_dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner_dim * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, gate = self.proj(x).chunk(2, dim=-1)
        return hidden * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward; ``net.1`` stands in for diffusers' Dropout so the output layer keeps
    the key ``net.2``."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class TransformerBlock(nn.Module):
    """diffusers' BasicTransformerBlock (layer_norm type): self-attn, cross-attn, GEGLU FF, each
    pre-LayerNorm with a residual."""

    def __init__(self, dim: int, heads: int, head_dim: int, cross_attention_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, head_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, head_dim, context_dim=cross_attention_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


def _pointwise(layer: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Apply a Linear or a 1x1 Conv2d to (B, L, C) tokens (a 1x1 conv is a linear map)."""
    if isinstance(layer, nn.Conv2d):
        return F.linear(tokens, layer.weight.flatten(1), layer.bias)
    return layer(tokens)


class Transformer2D(nn.Module):
    """diffusers' Transformer2DModel for continuous inputs: GroupNorm, proj_in (1x1 conv in SD1,
    Linear with ``linear_projection``), transformer blocks, proj_out, residual."""

    def __init__(self, channels: int, heads: int, *, num_layers: int, cross_attention_dim: int,
                 groups: int, linear_projection: bool):
        super().__init__()
        head_dim = channels // heads
        inner = heads * head_dim
        self.norm = GroupNorm(groups, channels, 1e-6, silu=False)
        if linear_projection:
            self.proj_in, self.proj_out = nn.Linear(channels, inner), nn.Linear(inner, channels)
        else:
            self.proj_in, self.proj_out = nn.Conv2d(channels, inner, 1), nn.Conv2d(inner, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(inner, heads, head_dim, cross_attention_dim) for _ in range(num_layers))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        # Both projection kinds run on (B, H*W, C) tokens: one permute in, one out.
        tokens = _pointwise(self.proj_in, self.norm(x).permute(0, 2, 3, 1).reshape(b, hgt * wid, c))
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        out = _pointwise(self.proj_out, tokens)
        return x + out.view(b, hgt, wid, c).permute(0, 3, 1, 2)
