"""The engine's fused ops, each with several backends.

``group_norm_silu`` and ``attention`` are what every model in ldm_engine calls. Backends:

- "torch": PyTorch's own kernels (``F.group_norm`` + ``F.silu``, ``F.scaled_dot_product_attention``);
  always available, and what runs on CPU.
- "reference": the fp32-upcast definitions in ``ldm_engine.ops.reference`` (tests; slow).
- "triton": ``ldm_engine.kernels`` (CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``).
- "cuda": the CUDA C++ kernels of ``ldm_engine._C``.

``backend=None`` takes ``LDM_ENGINE_BACKEND`` when set, else the default order below; an input the
chosen backend cannot take then falls back to "torch". An explicit ``backend=`` that cannot take
the input raises ``ValueError`` naming the reason. LDM_ENGINE_BACKEND is read on every call; what the
device, its value and ``backend=`` decide is cached (``_PLANS``), so only backends other than torch and
reference are asked about each input (dispatch overhead: ``benchmarks/bench_dispatch.py``).

The GPU backends are ``torch.library.custom_op``s (``torch.ops.ldm_engine.*``) with fake kernels, so
torch.compile, CUDA-graph capture and export see each call as one op.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os

import torch
import torch.nn.functional as F

from ldm_engine.errors import BackendUnavailableError, InvalidInputError

from . import _custom  # noqa: F401  (registers torch.ops.ldm_engine.*)

__all__ = ["group_norm_silu", "attention", "BACKENDS", "default_backend_order"]

log = logging.getLogger(__name__)

BACKENDS = ("torch", "reference", "triton", "cuda")

# Default order when neither backend= nor LDM_ENGINE_BACKEND is given. A backend enters (or moves up)
# only with figures measured on a GPU, recorded here with GPU, commit and file under benchmarks/results/.
# As of this commit no GPU run of the triton or cuda backends exists, so "torch" is the default
# everywhere. Replace the CUDA entries from `python benchmarks/bench_ops.py` once tests have passed
# on the GPU (issue 4: attention >= 1.0x SDPA at every U-Net shape; GroupNorm-SiLU >= 2x eager).
_DEFAULT_ORDER = {
    "cpu": ("torch",),
    "cuda": ("torch",),
}

_CUDA_HEAD_DIMS = (40, 64, 80, 128, 160, 512)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_Tensor = torch.Tensor


def default_backend_order(device_type: str) -> tuple[str, ...]:
    return _DEFAULT_ORDER.get(device_type, ("torch",))


def _requested_backend(backend: str | None, env: str | None) -> tuple[str | None, bool]:
    """(name, explicit): explicit=True when given as an argument (unsupported input -> error).
    ``env`` is the current value of LDM_ENGINE_BACKEND (None when unset)."""
    if backend is not None:
        if backend not in BACKENDS:
            raise InvalidInputError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
        return backend, True
    env = env or None
    if env is not None and env not in BACKENDS:
        raise InvalidInputError(f"LDM_ENGINE_BACKEND={env!r} is not one of {BACKENDS}")
    return env, False


# ----------------------------------------------------------------------------------------------
# Dispatch plans: what (device, LDM_ENGINE_BACKEND, backend=) alone decide, cached
# ----------------------------------------------------------------------------------------------
# Every GroupNorm and attention layer dispatches on each call (~150 times per U-Net forward), so the
# common case must cost little Python. Which backend to try depends on the device, the current value
# of LDM_ENGINE_BACKEND (read on every call: it may change between calls) and backend=; a plan is
#   - a backend name ("torch" or "reference": they take every input, so nothing per input is checked), or
#   - (name, explicit): a backend that must be asked about this input (``_pick`` with the op's reasons);
#     name None means "the default order of the device".
# Plans are cached per (device, LDM_ENGINE_BACKEND value, backend); an unknown name raises and is never
# cached. The default order is read when a plan is made: after changing _DEFAULT_ORDER at run time, call
# ``_PLANS.clear()``.
_ALWAYS_AVAILABLE = ("torch", "reference")
_ENV_NAME = "LDM_ENGINE_BACKEND"
_PLANS: dict = {}

def _plan(device: torch.device, backend: str | None):
    """The plan for this call: LDM_ENGINE_BACKEND is read now, the rest comes from _PLANS once made.
    Raises InvalidInputError for an unknown backend= or LDM_ENGINE_BACKEND value."""
    if torch.compiler.is_compiling():
        # While torch.compile traces, resolve without the cache, as before it existed: the choice is made
        # at trace time, and the graph's guards see neither os.environ's dict nor _PLANS (a new plan
        # cached by an eager call must not recompile a compiled network).
        return _new_plan(device, os.environ.get(_ENV_NAME), backend, cache=False)
    env = os.environ.get(_ENV_NAME)
    try:
        return _PLANS[(device, env, backend)]
    except (KeyError, TypeError):  # TypeError: an unhashable backend= (rejected by _new_plan)
        return _new_plan(device, env, backend)


def _new_plan(device: torch.device, env: str | None, backend: str | None, cache: bool = True):
    name, explicit = _requested_backend(backend, env)  # raises for unknown names
    if name is None:
        order = default_backend_order(device.type)
        if not order or order[0] in _ALWAYS_AVAILABLE:
            plan = order[0] if order else "torch"
        else:
            plan = (None, False)
    else:
        plan = name if name in _ALWAYS_AVAILABLE else (name, explicit)
    if cache:
        _PLANS[(device, env, backend)] = plan
    return plan


def _triton_reason(t: torch.Tensor) -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if t.device.type == "cuda":
        return None
    if t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1":
        return None
    return f"triton needs CUDA tensors (got {t.device.type}; CPU only under TRITON_INTERPRET=1)"


def _cuda_reason(t: torch.Tensor, op: str) -> str | None:
    from ldm_engine._cuda import extension

    ext = extension()
    if ext is None:
        return "ldm_engine._C is not built (no nvcc at install time, or LDM_ENGINE_CUDA=0)"
    if not hasattr(ext, op):
        return f"ldm_engine._C has no {op} (rebuild the package)"
    if t.device.type != "cuda":
        return f"the cuda backend needs CUDA tensors (got {t.device.type})"
    return None


def _pick(name: str | None, explicit: bool, device_type: str, reason, inputs: tuple) -> str:
    """The backend to run: ``reason(name, *inputs)`` is None when ``name`` can take the input."""
    if name is not None:
        why = reason(name, *inputs)
        if why is None:
            return name
        if explicit:
            raise BackendUnavailableError(f"backend {name!r} cannot run this input: {why}")
        log.debug("LDM_ENGINE_BACKEND=%s cannot run this input (%s); using torch", name, why)
        return "torch"
    for candidate in default_backend_order(device_type):
        if reason(candidate, *inputs) is None:
            return candidate
    return "torch"


# ----------------------------------------------------------------------------------------------
# GroupNorm (+ SiLU)
# ----------------------------------------------------------------------------------------------

def _is_channels_last_4d(x: torch.Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _gn_reason(name: str, x: torch.Tensor) -> str | None:
    """Why backend ``name`` cannot take ``x`` (None: it can)."""
    if name in _ALWAYS_AVAILABLE:
        return None
    if x.dtype not in _FLOAT_DTYPES:
        return f"dtype {x.dtype} (supported: float16, bfloat16, float32)"
    if name == "triton":
        return _triton_reason(x)
    if x.shape[0] > 65535:  # _C's channels-last statistics put the batch in grid z
        return "batch > 65535"
    return _cuda_reason(x, "group_norm_silu")


def group_norm_silu(x: torch.Tensor, weight, bias, num_groups: int, eps: float = 1e-5, *,
                    silu: bool = True, backend: str | None = None) -> torch.Tensor:
    """GroupNorm (fp32 statistics), optionally followed by SiLU.

    x: (N, C, *spatial) in contiguous or channels_last memory format (kept in the output), or
    (N, L, C) -- recognised when x is 3-D, ``weight`` has ``x.shape[-1]`` entries and ``x.shape[1]``
    differs from that (so a 3-D tensor with L == C is read as (N, C, L)).
    """
    if not isinstance(x, _Tensor) or x.dim() < 2:
        raise InvalidInputError("group_norm_silu: x must be a tensor of shape (N, C, *spatial) or (N, L, C)")
    if not isinstance(num_groups, int) or num_groups <= 0:
        raise InvalidInputError(f"group_norm_silu: num_groups must be a positive int, got {num_groups!r}")
    shape = x.shape
    channels_last_3d = (len(shape) == 3 and weight is not None and shape[2] == weight.shape[0]
                        and shape[1] != weight.shape[0])
    c = shape[-1] if channels_last_3d else shape[1]
    if c % num_groups:
        raise InvalidInputError(f"group_norm_silu: {c} channels are not divisible by num_groups={num_groups}")
    if weight is not None:
        s = weight.shape
        if len(s) != 1 or s[0] != c:
            raise InvalidInputError(f"group_norm_silu: weight must have shape ({c},), got {tuple(s)}")
    if bias is not None:
        s = bias.shape
        if len(s) != 1 or s[0] != c:
            raise InvalidInputError(f"group_norm_silu: bias must have shape ({c},), got {tuple(s)}")

    name = _plan(x.device, backend)
    if name.__class__ is tuple:  # a backend that must be asked about this input
        name = _pick(name[0], name[1], x.device.type, _gn_reason, (x,))
    if name == "torch":
        if channels_last_3d or not x.is_contiguous():
            return _group_norm_silu_torch(x, weight, bias, num_groups, eps, silu, channels_last_3d)
        y = F.group_norm(x, num_groups, weight, bias, eps)  # the common case of _group_norm_silu_torch
        return F.silu(y) if silu else y
    if name == "reference":
        from .reference import group_norm_silu_reference
        return group_norm_silu_reference(x, weight, bias, num_groups, eps, silu=silu,
                                         channels_last_3d=channels_last_3d)
    # The GPU kernels take dense layouts; anything else is made contiguous first.
    if not (x.is_contiguous() or _is_channels_last_4d(x)):
        x = x.contiguous()
    op = torch.ops.ldm_engine.group_norm_silu_triton if name == "triton" else torch.ops.ldm_engine.group_norm_silu_cuda
    return op(x, weight, bias, num_groups, float(eps), bool(silu), channels_last_3d)


def _group_norm_silu_torch(x, weight, bias, num_groups, eps, silu, channels_last_3d):
    if channels_last_3d:
        y = F.group_norm(x.transpose(1, 2), num_groups, weight, bias, eps).transpose(1, 2)
    else:
        y = F.group_norm(x, num_groups, weight, bias, eps)
        if _is_channels_last_4d(x) and not _is_channels_last_4d(y):
            y = y.contiguous(memory_format=torch.channels_last)
    return F.silu(y) if silu else y


# ----------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------

def _attn_reason(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why backend ``name`` cannot take q, k, v (None: it can)."""
    if name in _ALWAYS_AVAILABLE:
        return None
    if q.dtype not in _FLOAT_DTYPES:
        return f"dtype {q.dtype}"
    if k.dtype != q.dtype or v.dtype != q.dtype:
        return "q, k and v must share one dtype"
    if not (q.device == k.device == v.device):
        return "q, k and v must be on one device"
    if v.shape[-1] != q.shape[-1]:
        return f"v's head dim ({v.shape[-1]}) differs from q's ({q.shape[-1]})"
    if q.shape[2] == 0 or k.shape[2] == 0:
        return "empty sequence"
    d = q.shape[-1]
    if name == "triton":
        if d > 512:
            return f"head dim {d} > 512"
        return _triton_reason(q)
    if q.dtype == torch.float32:
        return "the cuda backend takes float16 and bfloat16 (float32 runs through torch)"
    if d not in _CUDA_HEAD_DIMS:
        return f"head dim {d} (the cuda backend is built for {_CUDA_HEAD_DIMS})"
    if q.shape[0] * q.shape[1] > 65535:
        return "batch * heads > 65535"
    why = _cuda_reason(q, "attention")
    if why is None and (q.data_ptr() % 16 or k.data_ptr() % 16 or v.data_ptr() % 16):
        # e.g. a contiguous view at an odd element offset: _C needs 16-byte aligned rows (cp.async)
        return "a data pointer of q, k or v is not 16-byte aligned"
    return why


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
              backend: str | None = None) -> torch.Tensor:
    """Non-causal attention; q (B, H, Lq, D), k and v (B, H, Lk, D) -> (B, H, Lq, D).

    The triton and cuda backends return a (B, H, Lq, D) view of (B, Lq, H, D) storage, so merging
    heads afterwards (``o.transpose(1, 2).reshape(B, Lq, H * D)``) costs no copy.
    """
    if not (isinstance(q, _Tensor) and isinstance(k, _Tensor) and isinstance(v, _Tensor)
            and q.dim() == 4 and k.dim() == 4 and v.dim() == 4):
        for label, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, _Tensor) or t.dim() != 4:
                raise InvalidInputError(f"attention: {label} must be a 4-D tensor (B, H, L, D)")
    qb, qh, _, qd = q.shape
    kb, kh, lk, kd = k.shape
    vb, vh, lv, _ = v.shape
    # q (B, H, Lq, D), k (B, H, Lk, D), v (B, H, Lk, Dv)
    if qb != kb or qh != kh or kb != vb or kh != vh or lk != lv or qd != kd:
        raise InvalidInputError(f"attention: shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                                "do not match (q (B,H,Lq,D), k (B,H,Lk,D), v (B,H,Lk,Dv))")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise InvalidInputError(f"attention: scale must be a positive finite number, got {scale!r}")

    name = _plan(q.device, backend)
    if name.__class__ is tuple:  # a backend that must be asked about this input
        name = _pick(name[0], name[1], q.device.type, _attn_reason, (q, k, v))
    if name == "torch":
        if scale is None:  # passing scale=None costs ~0.2 us of argument parsing
            return F.scaled_dot_product_attention(q, k, v)
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    if name == "reference":
        from .reference import attention_reference
        return attention_reference(q, k, v, scale=scale)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    op = torch.ops.ldm_engine.attention_triton if name == "triton" else torch.ops.ldm_engine.attention_cuda
    return op(q, k, v, scale)
