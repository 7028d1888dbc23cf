"""Model construction on the meta device and one-pass weight loading, shared by every format.

A ``LoadPlan`` says, for each canonical state-dict key of one component, which stored tensor
(file + key) it comes from and how it is derived (split, transposed, squeezed). Plans are checked
against the model's own state dict before any tensor data is read, so every mismatch of every
component goes into one CheckpointError; then each tensor is read, cast and placed once.
"""

from __future__ import annotations

import contextlib
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from ldm_engine.errors import CheckpointError
from ldm_engine.loading.checkpoint_keys import KeyMapper, apply_op, target_shape
from ldm_engine.loading.safetensors_io import SafetensorsFile

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")
_LIST_LIMIT = 20


# ----------------------------------------------------------------------------------------------
# Tensor readers: a safetensors file, or (only with allow_pickle=True) an unpickled state dict.

class InMemoryTensors:
    """A state dict already in memory (from an explicitly allowed pickle file)."""

    def __init__(self, path: Path, tensors: dict[str, torch.Tensor]):
        self.path = path
        self.tensors = tensors
        self.metadata: dict = {}

    def keys(self) -> list[str]:
        return list(self.tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key].shape)

    def load(self, key: str, *, dtype=None, device=None) -> torch.Tensor:
        t = self.tensors[key]
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        return t.to(device) if device is not None else t

    def close(self) -> None:
        self.tensors = {}


def pickle_refusal(path: Path) -> CheckpointError:
    out = path.with_suffix(".safetensors")
    return CheckpointError(
        f"{path}: refusing to load a pickle-based checkpoint ({path.suffix}): unpickling can run "
        "arbitrary code. Convert it once to safetensors, e.g.\n"
        "    import torch, safetensors.torch\n"
        f"    sd = torch.load({str(path)!r}, map_location='cpu', weights_only=True); sd = sd.get('state_dict', sd)\n"
        f"    safetensors.torch.save_file({{k: v.contiguous().clone() for k, v in sd.items() "
        f"if isinstance(v, torch.Tensor)}}, {str(out)!r})\n"
        "or, if you trust the file, pass allow_pickle=True (it is then read with "
        "torch.load(weights_only=True)).")


def _looks_like_pickle(path: Path) -> bool:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    # torch.save's zip archive, or its legacy format (a pickled magic number: protocol 2, long1).
    return head.startswith(b"PK\x03\x04") or head[:3] == b"\x80\x02\x8a"


def open_weights(path: str | os.PathLike, *, allow_pickle: bool = False):
    """A reader for a weights file: SafetensorsFile, or InMemoryTensors for an allowed pickle."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if not _looks_like_pickle(path):
        return SafetensorsFile(path)
    if not allow_pickle:
        raise pickle_refusal(path)
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except (RuntimeError, ValueError):  # legacy (non-zip) format cannot be memory-mapped
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, ValueError, EOFError, OSError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{path}: cannot read this pickle checkpoint: {exc}") from None
    except Exception as exc:  # weights_only refuses non-tensor objects with UnpicklingError
        raise CheckpointError(f"{path}: cannot read this pickle checkpoint safely "
                              f"(torch.load(weights_only=True)): {exc}") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return InMemoryTensors(path, {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)})


# ----------------------------------------------------------------------------------------------
# Plans.

@dataclass
class TensorRef:
    reader: Any
    key: str
    op: tuple = ()

    @property
    def shape(self) -> tuple[int, ...]:
        return target_shape(self.reader.shape(self.key), self.op)


@dataclass
class LoadPlan:
    component: str
    sources: list[Path]
    refs: dict[str, TensorRef] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)  # stored names nothing maps to

    def add(self, readers: Iterable, mapper: KeyMapper, prefix: str = "",
            skip: Callable[[str], bool] | None = None) -> "LoadPlan":
        """Map every tensor of ``readers`` whose key starts with ``prefix``."""
        for reader in readers:
            if reader.path not in self.sources:
                self.sources.append(reader.path)
            for key in reader.keys():
                if not key.startswith(prefix) or (skip is not None and skip(key)):
                    continue
                targets = mapper(key[len(prefix):], reader.shape(key))
                if targets is None:
                    self.unexpected.append(key)
                    continue
                for target in targets:
                    if target.key in self.refs:  # e.g. both prefixed and bare CLIP names
                        self.unexpected.append(f"{key} (duplicate of {self.refs[target.key].key})")
                        continue
                    self.refs[target.key] = TensorRef(reader, key, target.op)
        return self

    def nbytes(self) -> int:
        seen = set()
        total = 0
        for ref in self.refs.values():
            ident = (id(ref.reader), ref.key)
            if ident not in seen:
                seen.add(ident)
                n = 1
                for s in ref.reader.shape(ref.key):
                    n *= s
                total += n
        return total


@dataclass
class Mismatch:
    plan: LoadPlan
    missing: list[str]
    unexpected: list[str]
    wrong_shape: list[str]

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.wrong_shape)


def _listing(kind: str, items: Sequence[str]) -> str:
    shown = "\n      ".join(items[:_LIST_LIMIT])
    more = f"\n      ... and {len(items) - _LIST_LIMIT} more" if len(items) > _LIST_LIMIT else ""
    return f"    {kind} ({len(items)}):\n      {shown}{more}"


def check_plan(plan: LoadPlan, model: nn.Module) -> Mismatch:
    expected = model.state_dict(keep_vars=True)
    # Parameters (and persistent buffers) still on the meta device must come from the file;
    # buffers the model computed itself may be absent.
    missing = [k for k, v in expected.items() if k not in plan.refs and v.is_meta]
    unexpected = list(plan.unexpected)
    wrong = []
    for key, ref in plan.refs.items():
        if key not in expected:
            unexpected.append(ref.key if ref.key == key else f"{ref.key} (as {key})")
            continue
        have, want = ref.shape, tuple(expected[key].shape)
        if have != want:
            stored = "" if ref.key == key else f" (stored as {ref.key} {list(ref.reader.shape(ref.key))})"
            wrong.append(f"{key}: checkpoint {list(have)}{stored}, model {list(want)}")
    return Mismatch(plan, missing, unexpected, wrong)


def raise_mismatches(mismatches: Sequence[Mismatch], *, hint: str = "") -> None:
    bad = [m for m in mismatches if m]
    if not bad:
        return
    files = []
    for m in bad:
        for s in m.plan.sources:
            if str(s) not in files:
                files.append(str(s))
    lines = [f"{', '.join(files)}: the checkpoint does not match the model"]
    for m in bad:
        lines.append(f"  {m.plan.component}:")
        if m.missing:
            lines.append(_listing("missing tensors", m.missing))
        if m.unexpected:
            lines.append(_listing("unexpected tensors", m.unexpected))
        if m.wrong_shape:
            lines.append(_listing("tensors with the wrong shape", m.wrong_shape))
    if hint:
        lines.append(hint)
    raise CheckpointError("\n".join(lines))


# ----------------------------------------------------------------------------------------------
# Construction and loading.

@contextlib.contextmanager
def parameters_on_meta():
    """Build modules entirely on the meta device: no memory, no init cost, and nothing allocated
    from a config's sizes before they are compared with the weights (a config claiming a million
    channels must give a CheckpointError, not an attempt to allocate terabytes). Buffers are on
    meta too: models must not compute buffers in __init__ (ours compute such tables in forward); a
    meta buffer the checkpoint does not provide is reported as missing. ``torch.device`` as a
    context is thread-local, so concurrent loads in other threads are unaffected."""
    with torch.device("meta"):
        yield


def build_empty(factory: Callable[[], nn.Module]) -> nn.Module:
    """The model of ``factory`` with its tensors on the meta device (see parameters_on_meta)."""
    with parameters_on_meta():
        model = factory()
    for module in model.modules():  # a tensor created with an explicit device escapes the context
        for name, p in module._parameters.items():
            if p is not None and not p.is_meta:
                module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)
    return model


def materialize(model: nn.Module, plan: LoadPlan, *, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """Read every planned tensor once (cast and placed as it is read) and assign it."""
    state: dict[str, torch.Tensor] = {}
    fused_key, fused = None, None  # q/k/v parts of one fused tensor are planned consecutively
    for key, ref in plan.refs.items():
        if ref.op and ref.op[0] == "chunk":
            ident = (id(ref.reader), ref.key)
            if ident != fused_key:
                fused_key, fused = ident, ref.reader.load(ref.key, dtype=dtype, device=device)
            state[key] = apply_op(fused, ref.op)
        else:
            state[key] = apply_op(ref.reader.load(ref.key, dtype=dtype, device=device), ref.op)
    del fused
    # Modules whose parameters are views of a fused tensor (models.layers.Attention) are fused after
    # ``state`` is dropped, one at a time: fusing inside load_state_dict (its post-load hook) would
    # hold every q/k/v weight twice until the end of the load (+9 % peak for SD-Turbo's U-Net).
    fusing = [m for m in model.modules() if hasattr(m, "fuse_projections")]
    for m in fusing:
        m.unfuse_projections()
    model.load_state_dict(state, strict=False, assign=True)
    del state
    for m in fusing:
        m.fuse_projections()
    for module in model.modules():  # computed buffers: follow the weights like Module.to() would
        for name, buf in module._buffers.items():
            if buf is not None and not buf.is_meta:
                module._buffers[name] = buf.to(device=device, dtype=dtype if buf.is_floating_point() else None)
    leftover = [n for n, p in model.named_parameters() if p.is_meta]
    if leftover:  # check_plan makes this unreachable; keep a clear message if it is not
        raise CheckpointError(f"{plan.component}: parameters left unloaded: {leftover[:_LIST_LIMIT]}")
    return model.requires_grad_(False).eval()


def normalize_dtype_device(dtype, device) -> tuple[torch.dtype, torch.device]:
    if isinstance(dtype, str):
        name = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16"}.get(dtype, dtype)
        dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype (e.g. torch.float16), got {dtype!r}")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"invalid device {device!r}: {exc}") from None
    return dtype, device


def close_all(readers: Iterable) -> None:
    for r in readers:
        r.close()
