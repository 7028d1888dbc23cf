"""The loaded pipeline (``Components``) and the per-component model factories shared by the
diffusers-folder and single-file loaders."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ldm_engine.errors import CheckpointError
from ldm_engine.loading.build import (
    LoadPlan, build_empty, check_plan, close_all, materialize, raise_mismatches,
)

FAMILIES = ("sd1", "sd2", "sdxl")
# Pad token of each family's tokenizer(s) when none is stored (single files).
PAD_TOKENS = {"sd1": ("<|endoftext|>",), "sd2": ("!",), "sdxl": ("<|endoftext|>", "!")}


@dataclass
class Components:
    family: str                  # "sd1" | "sd2" | "sdxl"
    unet: Any                    # ldm_engine.models.unet.UNet2DConditionModel
    vae: Any                     # ldm_engine.models.vae.AutoencoderKL (or vae_tiny.AutoencoderTiny)
    text_encoder: Any            # ldm_engine.models.clip.CLIPTextModel
    tokenizer: Any               # ldm_engine.tokenizer.CLIPTokenizer
    text_encoder_2: Any | None   # SDXL (with_projection=True)
    tokenizer_2: Any | None
    scheduler_config: dict       # diffusers scheduler_config.json content, incl. "_class_name"
    source: str                  # resolved path
    configs: dict = field(default_factory=dict, repr=False)  # component -> config.json dict used


def read_json(path: Path, what: str = "config") -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: {what} file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: {what} file is not valid JSON: {exc}") from None
    except RecursionError:
        raise CheckpointError(f"{path}: {what} file is JSON nested too deeply") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read the {what} file: {exc}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: {what} file must hold a JSON object")
    return data


def read_scheduler_config(path: Path) -> dict:
    """scheduler_config.json, its numbers checked (ldm_engine.samplers.check_scheduler_config)."""
    from ldm_engine.samplers import check_scheduler_config

    data = read_json(path, "scheduler config")
    try:
        check_scheduler_config(data)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    return data


def family_from_unet_config(config: dict, source: str, text_encoder_config: dict | None = None) -> str:
    """sdxl: addition_embed_type "text_time"; sd1 / sd2: cross_attention_dim 768 / 1024. Other
    widths (small test models) fall back on the text encoder: OpenCLIP's gelu means SD2, CLIP-L's
    quick_gelu SD1."""
    if config.get("addition_embed_type") == "text_time":
        return "sdxl"
    width = config.get("cross_attention_dim")
    if width == 768:
        return "sd1"
    if width == 1024:
        return "sd2"
    if config.get("addition_embed_type") is None and isinstance(width, int) and text_encoder_config:
        return "sd2" if text_encoder_config.get("hidden_act") == "gelu" else "sd1"
    raise CheckpointError(f"{source}: unsupported U-Net (cross_attention_dim={width!r}, "
                          f"addition_embed_type={config.get('addition_embed_type')!r}); ldm_engine "
                          "loads SD1.x (768), SD2.x (1024) and SDXL (text_time) U-Nets")


# ---- model factories (models are imported lazily: loading code imports without them) --------

def _config(cls, config: dict, what: str, source: str):
    try:
        return cls.from_dict(config)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{source}: unsupported {what} config: {exc}") from None


def unet_factory(config: dict, source: str) -> Callable[[], nn.Module]:
    from ldm_engine.models.unet import UNet2DConditionModel, UNetConfig
    cfg = _config(UNetConfig, config, "unet", source)
    return lambda: UNet2DConditionModel(cfg)


def vae_factory(config: dict, source: str) -> Callable[[], nn.Module]:
    """AutoencoderKL, or AutoencoderTiny (TAESD) when the config's ``_class_name`` says so."""
    if config.get("_class_name") == "AutoencoderTiny":
        from ldm_engine.models.vae_tiny import AutoencoderTiny, TinyVAEConfig
        tiny = _config(TinyVAEConfig, config, "tiny vae", source)
        return lambda: AutoencoderTiny(tiny)
    from ldm_engine.models.vae import AutoencoderKL, VAEConfig
    cfg = _config(VAEConfig, config, "vae", source)
    return lambda: AutoencoderKL(cfg)


def text_encoder_factory(config: dict, source: str, *, with_projection: bool) -> Callable[[], nn.Module]:
    from ldm_engine.models.clip import CLIPTextConfig, CLIPTextModel
    cfg = _config(CLIPTextConfig, config, "text encoder", source)
    return lambda: CLIPTextModel(cfg, with_projection=with_projection)


def controlnet_factory(config: dict, source: str) -> Callable[[], nn.Module]:
    from ldm_engine.models.controlnet import ControlNetConfig, ControlNetModel
    cfg = _config(ControlNetConfig, config, "controlnet", source)
    return lambda: ControlNetModel(cfg)


def assemble(specs: dict[str, tuple[Callable[[], nn.Module], LoadPlan]], *, dtype: torch.dtype,
             device: torch.device, readers, hint: str = "") -> dict[str, nn.Module]:
    """Build every component on the meta device, check all plans (one error for all
    mismatches), then read the weights. Closes ``readers`` in every case."""
    try:
        models = {}
        for name, (factory, plan) in specs.items():
            try:
                models[name] = build_empty(factory)
            except (TypeError, ValueError, RuntimeError, OverflowError, MemoryError) as exc:
                # a config whose values are of the wrong type or out of range (it is built on meta:
                # no memory is allocated whatever the sizes)
                where = ", ".join(str(s) for s in plan.sources) or plan.component
                raise CheckpointError(f"{where}: cannot build the {name} its config describes: "
                                      f"{type(exc).__name__}: {str(exc)[:300]}") from None
        raise_mismatches([check_plan(plan, models[name]) for name, (_, plan) in specs.items()], hint=hint)
        for name, (_, plan) in specs.items():
            materialize(models[name], plan, dtype=dtype, device=device)
        return models
    finally:
        close_all(readers)


def default_tokenizer(pad_token: str):
    from ldm_engine.tokenizer import CLIPTokenizer
    return CLIPTokenizer.default(pad_token=pad_token)


def _tokenizer_from_tokenizer_json(folder: Path):
    """transformers >= 5 saves a CLIP tokenizer as tokenizer.json + tokenizer_config.json only
    (no vocab.json / merges.txt): take the BPE vocab and merges from tokenizer.json and the
    special tokens from the config."""
    from ldm_engine.tokenizer import CLIPTokenizer

    data = read_json(folder / "tokenizer.json", "tokenizer")
    model = data.get("model") or {}
    vocab, merges = model.get("vocab"), model.get("merges")
    if model.get("type") != "BPE" or not isinstance(vocab, dict) or not isinstance(merges, list):
        raise CheckpointError(f"{folder / 'tokenizer.json'}: not a BPE tokenizer")
    pairs = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]
    settings = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the config wins
        if (folder / name).is_file():
            cfg = read_json(folder / name, "tokenizer config")
            for key in ("pad_token", "bos_token", "eos_token", "unk_token"):
                value = cfg.get(key)
                value = value.get("content") if isinstance(value, dict) else value
                if isinstance(value, str):
                    settings[key] = value
            length = cfg.get("model_max_length")
            if isinstance(length, int) and 2 <= length <= 10**6:
                settings["model_max_length"] = length
    return CLIPTokenizer(vocab, pairs, **settings)


def folder_tokenizer(folder: Path):
    from ldm_engine.tokenizer import CLIPTokenizer
    try:
        if not (folder / "vocab.json").is_file() and (folder / "tokenizer.json").is_file():
            return _tokenizer_from_tokenizer_json(folder)
        return CLIPTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{folder}: cannot load the tokenizer: {exc}") from None
