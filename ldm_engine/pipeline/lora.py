"""LoRA adapters merged into the networks' weights in place (``Engine.load_lora`` and friends).

No cost per step: each touched weight becomes ``W0 + sum_i scale_i * factor_i * up_i @ down_i``,
computed in float32 on the weight's device and written back in the weight's dtype (and memory
format) with ``copy_``. The parameter keeps its storage, so ``torch.compile``'d networks do not
recompile and captured CUDA graphs (which read weights at fixed addresses) replay with the new
values without recapture.

Originals: the first time an adapter touches a weight, a copy of it is kept in host memory
(pinned when the weight is on a GPU): for a rank-r adapter over all attention layers of an SD1.5
U-Net that is ~ the size of those layers' weights (see benchmarks/bench_lora.py). Every change of
scales, load or unload recomputes the touched weights from these originals -- never by
subtracting -- so nothing drifts over any number of swaps, and a weight no adapter touches any
more gets its original back bitwise (and the copy is dropped).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ldm_engine.errors import InvalidInputError
from ldm_engine.loading.lora import LoraAdapter, network_dict, read_lora


def _check_scale(what: str, scale) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise InvalidInputError(f"{what}: a LoRA scale must be a finite number, got {scale!r}")
    return float(scale)


class LoraWeights:
    """The loaded adapters of one set of networks, their scales and the kept original weights."""

    def __init__(self, networks: dict):
        self.networks = networks
        self.adapters: dict[str, LoraAdapter] = {}
        self.scales: dict[str, float] = {}
        self._originals: dict[tuple, torch.Tensor] = {}   # (component, module) -> host copy of the weight
        self._params: dict[tuple, nn.Parameter] = {}

    @classmethod
    def for_components(cls, components) -> LoraWeights:
        networks = network_dict(components)
        if not isinstance(networks["unet"], nn.Module):
            raise InvalidInputError("LoRA adapters need the torch backend (exported networks have fixed weights: "
                                    "bake adapters in with `python -m ldm_engine.export ... --lora FILE`)")
        return cls(networks)

    @property
    def host_bytes(self) -> int:
        """Host memory held by the kept originals."""
        return sum(t.numel() * t.element_size() for t in self._originals.values())

    def load(self, path_or_repo_id, *, scale: float = 1.0, name: str | None = None) -> str:
        scale = _check_scale("load_lora", scale)
        if name is not None and (not isinstance(name, str) or not name):
            raise InvalidInputError(f"load_lora: name must be a non-empty string, got {name!r}")
        if name is not None and name in self.adapters:
            raise InvalidInputError(f"a LoRA adapter named {name!r} is already loaded; unload_lora({name!r}) first "
                                    "or pass another name=")
        adapter = read_lora(path_or_repo_id, self.networks, name=name)  # checks everything, changes nothing
        if adapter.name in self.adapters:
            raise InvalidInputError(f"a LoRA adapter named {adapter.name!r} is already loaded; unload it first or "
                                    "pass name=")
        self.adapters[adapter.name], self.scales[adapter.name] = adapter, scale
        try:
            self._apply(adapter.layers)
        except BaseException:
            del self.adapters[adapter.name], self.scales[adapter.name]
            self._apply(adapter.layers)
            raise
        return adapter.name

    def set_scales(self, scales: dict) -> None:
        if not isinstance(scales, dict):
            raise InvalidInputError(f"set_lora_scales takes a dict {{name: scale}}, got {type(scales).__name__}")
        unknown = [n for n in scales if n not in self.adapters]
        if unknown:
            raise InvalidInputError(f"no LoRA adapter named {unknown[0]!r} is loaded (loaded: {sorted(self.adapters)})")
        new = {n: _check_scale(f"set_lora_scales[{n!r}]", s) for n, s in scales.items()}
        changed = [n for n, s in new.items() if s != self.scales[n]]
        self.scales.update(new)
        self._apply({key for n in changed for key in self.adapters[n].layers})

    def unload(self, name: str | None = None) -> None:
        if name is not None and name not in self.adapters:
            raise InvalidInputError(f"no LoRA adapter named {name!r} is loaded (loaded: {sorted(self.adapters)})")
        names = list(self.adapters) if name is None else [name]
        keys = {key for n in names for key in self.adapters[n].layers}
        for n in names:
            del self.adapters[n], self.scales[n]
        self._apply(keys)

    # ------------------------------------------------------------------ merging
    def _param(self, key: tuple) -> nn.Parameter:
        p = self._params.get(key)
        if p is None:
            component, module = key
            p = self._params[key] = self.networks[component].get_submodule(module).weight
        return p

    @torch.no_grad()
    def _apply(self, keys) -> None:
        for key in keys:
            param = self._param(key)
            users = [(a.layers[key], self.scales[n]) for n, a in self.adapters.items() if key in a.layers]
            original = self._originals.get(key)
            if original is None:
                if not users:
                    continue
                # contiguous host copy (pinned for fast uploads when the weight lives on a GPU)
                original = torch.empty(param.shape, dtype=param.dtype, pin_memory=param.is_cuda)
                original.copy_(param.detach())
                self._originals[key] = original
            active = [(layer, s) for layer, s in users if s != 0.0]
            if not active:
                param.copy_(original, non_blocking=True)   # bitwise the original
            else:
                # upload in the stored dtype (a CPU->GPU copy that also converts may convert on the
                # host), then to float32 on the device; always a fresh tensor, never the original
                w = original.to(param.device, non_blocking=True)
                w = w.to(torch.float32, copy=w is original)
                flat = w.view(w.shape[0], -1)
                for layer, s in active:
                    flat.addmm_(layer.up, layer.down, alpha=s * layer.factor)
                param.copy_(w)                              # rounds to the weight's dtype, keeps its layout
            if not users:
                del self._originals[key]
                self._params.pop(key, None)


def bake_loras(components, specs) -> None:
    """Merges adapters for good (export): ``specs`` is a list of (file, scale)."""
    weights = LoraWeights.for_components(components)
    for path, scale in specs:
        weights.load(path, scale=scale)
