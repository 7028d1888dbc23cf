"""Reading LoRA adapter files and matching them to a loaded pipeline's networks.

Formats (key names in ldm_engine.loading.checkpoint_keys):
- kohya-ss / A1111 / ComfyUI: ``lora_unet_*``, ``lora_te_*`` (SDXL ``lora_te1_*`` / ``lora_te2_*``)
  with ``.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``; module names in the diffusers
  layout or the ldm/sgm one (``input_blocks`` / ``middle_block`` / ``output_blocks``); linear
  layers and convolutions (LoCon: k x k down, 1 x 1 up).
- diffusers / PEFT: ``unet.*`` / ``text_encoder.*`` / ``text_encoder_2.*`` with ``.lora_A.weight`` /
  ``.lora_B.weight``; alphas from ``.alpha`` tensors or the ``lora_adapter_metadata`` that
  diffusers' ``save_lora_weights`` stores (lora_alpha, alpha_pattern, use_rslora), else 1 per
  rank; diffusers' older ``.lora.down`` / ``.lora.up`` and attention-processor keys.

A layer's update is ``factor * up @ down`` with ``factor = alpha / rank``. ``read_lora`` checks
the whole file against the networks (every key known, every module present, every shape fitting)
and raises one ``CheckpointError`` naming the first offending keys before anything is changed.
Files are read with ldm_engine's own safetensors reader; pickles are refused.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ldm_engine.errors import CheckpointError, InvalidInputError
from ldm_engine.loading.checkpoint_keys import lora_module_aliases, split_lora_key, unet_ldm_table

WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' file name in a folder / repo
LORA_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


@dataclass
class LoraLayer:
    """One layer's low-rank update: ``factor * up @ down`` reshaped to the weight's shape."""

    up: torch.Tensor        # (out, rank) float32
    down: torch.Tensor      # (rank, in * kh * kw) float32
    factor: float           # alpha / rank


@dataclass
class LoraAdapter:
    name: str
    path: Path
    layers: dict = field(default_factory=dict)  # (component, module path) -> LoraLayer


def parse_lora_spec(text: str) -> tuple[str, float]:
    """``FILE[:SCALE]`` (command lines) -> (file, scale). A trailing ``:number`` is the scale."""
    head, sep, tail = str(text).rpartition(":")
    if sep and head:
        try:
            scale = float(tail)
        except ValueError:
            return str(text), 1.0
        if not math.isfinite(scale):
            raise InvalidInputError(f"--lora {text!r}: the scale must be a finite number")
        return head, scale
    return str(text), 1.0


def resolve_lora_file(path_or_repo_id) -> Path:
    """A ``.safetensors`` file, or a folder / cached repo id holding ``pytorch_lora_weights.safetensors``
    (or a single ``.safetensors`` file)."""
    from ldm_engine.loading.hub import resolve_model_path

    path = resolve_model_path(path_or_repo_id)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".safetensors" and p.is_file())
        if (path / WEIGHT_NAME).is_file():
            return path / WEIGHT_NAME
        if len(files) != 1:
            raise CheckpointError(f"{path}: no {WEIGHT_NAME} and not exactly one .safetensors file in this folder")
        return files[0]
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: LoRA adapters are read from .safetensors files only (pickle formats "
                              "such as .bin / .pt / .ckpt are never loaded)")
    return path


def _lora_modules(net: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in net.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def _squeeze11(shape) -> tuple:
    shape = tuple(shape)
    return shape[:2] if len(shape) == 4 and shape[2:] == (1, 1) else shape


def _peft_alpha(metadata: dict, component: str, name: str, rank: int) -> float | None:
    """alpha / rank from diffusers' ``lora_adapter_metadata`` (PEFT LoraConfig), or None."""
    cfg = metadata.get(component)
    if not cfg:
        return None
    if cfg.get("use_dora"):
        raise CheckpointError(f"{component}: DoRA adapters (use_dora) are not supported")
    alpha = cfg.get("lora_alpha", rank)
    for pattern, value in (cfg.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            alpha = value
            break
    return float(alpha) / (math.sqrt(rank) if cfg.get("use_rslora") else rank)


def _adapter_metadata(raw: dict) -> dict:
    """{component: PEFT LoraConfig dict} from safetensors metadata (diffusers >= 0.35 stores it)."""
    text = (raw or {}).get("lora_adapter_metadata")
    if not text:
        return {}
    try:
        flat = json.loads(text)
    except json.JSONDecodeError:
        return {}
    out: dict = {}
    for key, value in flat.items():
        component, _, option = key.partition(".")
        out.setdefault(component, {})[option] = value
    return out


def read_lora(path_or_repo_id, networks: dict, *, name: str | None = None, device=None) -> LoraAdapter:
    """Reads and checks one adapter against ``networks`` ({"unet": ..., "text_encoder": ...,
    "text_encoder_2": ... or None}); factors end up on ``device`` in float32."""
    from ldm_engine.loading.safetensors_io import SafetensorsFile

    path = resolve_lora_file(path_or_repo_id)
    problems: list[str] = []
    aliases: dict[str, dict] = {}
    modules: dict[str, dict] = {}
    for component, net in networks.items():
        if net is not None:
            modules[component] = _lora_modules(net)
            table = unet_ldm_table(net.config) if component == "unet" else None
            aliases[component] = lora_module_aliases(modules[component], ldm_table=table)

    with SafetensorsFile(path) as f:
        metadata = _adapter_metadata(f.metadata)
        parts: dict[tuple, dict] = {}
        for key in f.keys():
            split = split_lora_key(key)
            if split is None:
                problems.append(f"{key!r}: not a LoRA tensor of a known format (lora_down/lora_up/lora_A/lora_B/"
                                "alpha of the U-Net or text encoders; LoHa, LoKr, DoRA are not supported)")
                continue
            component, stored, part = split
            if component not in aliases:
                problems.append(f"{key!r}: this model has no {component}")
                continue
            path_ = aliases[component].get(stored)
            if path_ is None:
                problems.append(f"{key!r}: no linear or convolution layer {stored!r} in the {component}")
                continue
            found = parts.setdefault((component, path_), {})
            if part in found:
                problems.append(f"{key!r}: the same {part} tensor of {component}.{path_} as {found[part][0]!r}")
                continue
            found[part] = (key, stored)
        if not parts and not problems:
            problems.append("no LoRA tensors in the file")

        layers = {}
        dev = torch.device(device) if device is not None else None
        for (component, mpath), found in parts.items():
            if len(problems) >= 3:
                break
            missing = [p for p in ("down", "up") if p not in found]
            if missing:
                key = next(iter(found.values()))[0]
                problems.append(f"{key!r}: its {' and '.join(missing)} factor is missing")
                continue
            weight = modules[component][mpath].weight
            down_key, stored = found["down"]
            up_key = found["up"][0]
            down_shape, up_shape = f.shape(down_key), f.shape(up_key)
            out_dim, rank = weight.shape[0], down_shape[0] if down_shape else 0
            if (_squeeze11(up_shape) != (out_dim, rank) or len(down_shape) < 2
                    or _squeeze11(down_shape)[1:] != _squeeze11(weight.shape)[1:]):
                problems.append(f"{down_key!r}: shapes down {list(down_shape)} / up {list(up_shape)} do not fit "
                                f"{component}.{mpath}.weight {list(weight.shape)}")
                continue
            down = f.load(down_key, dtype=torch.float32, device=dev or weight.device).reshape(rank, -1)
            up = f.load(up_key, dtype=torch.float32, device=dev or weight.device).reshape(out_dim, rank)
            if "alpha" in found:
                alpha_key = found["alpha"][0]
                alpha = f.load(alpha_key, dtype=torch.float32, device="cpu")
                if alpha.numel() != 1:
                    problems.append(f"{alpha_key!r}: alpha must be one number, got shape {list(alpha.shape)}")
                    continue
                factor = float(alpha) / rank
            else:
                try:
                    factor = _peft_alpha(metadata, component, stored, rank)
                except CheckpointError as e:
                    problems.append(str(e))
                    continue
                factor = 1.0 if factor is None else factor
            if not (math.isfinite(factor) and bool(torch.isfinite(down).all()) and bool(torch.isfinite(up).all())):
                problems.append(f"{down_key!r}: non-finite values (a corrupt file?)")
                continue
            layers[(component, mpath)] = LoraLayer(up=up.contiguous(), down=down.contiguous(), factor=factor)

    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointError(f"{path}: this LoRA adapter does not fit the model: " + "; ".join(problems[:3]) + more)
    return LoraAdapter(name=name or path.stem, path=path, layers=layers)


def network_dict(components) -> dict:
    """{component name: the nn.Module LoRAs change} of a loaded pipeline (compiled modules unwrapped)."""
    out = {}
    for component in LORA_COMPONENTS:
        net = getattr(components, component, None)
        out[component] = getattr(net, "_orig_mod", net)
    return out


__all__ = ["LoraAdapter", "LoraLayer", "parse_lora_spec", "read_lora", "resolve_lora_file", "network_dict",
           "WEIGHT_NAME"]
