"""Pixel-space unconditional models (the DDPM paper's CIFAR-10 / CelebA-HQ / LSUN models): a diffusers
``UNet2DModel`` plus a scheduler config; no VAE, no text encoder.

Sources (repo ids are resolved in the local Hugging Face cache first):
- a pipeline folder: ``model_index.json`` naming ``DDPMPipeline`` / ``DDIMPipeline`` (or a
  ``UNet2DModel`` unet), or ``unet/`` + ``scheduler/`` whose ``unet/config.json`` is a UNet2DModel;
- a U-Net component folder (``config.json`` of a UNet2DModel + weights): scheduled like the DDPM
  paper (diffusers' DDPMScheduler defaults: linear betas 1e-4..0.02, 1000 steps, clipped x0);
- a single ``.safetensors`` U-Net in diffusers key names, with ``config=``: a config.json dict or
  path, a folder as above, or a packaged config name (``"ddpm-cifar10"``, ``"ddpm-celebahq"``);
  without ``config=``, the packaged config whose tensor shapes match the file.
Attention weights saved by diffusers < 0.14 (``query/key/value/proj_attn``) are renamed on load.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ldm_engine.errors import CheckpointError
from ldm_engine.loading import checkpoint_keys as keys
from ldm_engine.loading.build import (
    LoadPlan, build_empty, check_plan, close_all, normalize_dtype_device, open_weights,
)
from ldm_engine.loading.components import _config, assemble, read_json
from ldm_engine.loading.hub import resolve_model_path

PIPELINES = ("DDPMPipeline", "DDIMPipeline")
UNET_CLASS = "UNet2DModel"
PACKAGED = ("ddpm-cifar10", "ddpm-celebahq")
DEFAULT_SCHEDULER = {"_class_name": "DDPMScheduler"}  # diffusers' defaults = the DDPM paper's schedule


@dataclass
class PixelComponents:
    unet: Any                    # ldm_engine.models.unet_2d.UNet2DModel (or an exported wrapper)
    scheduler_config: dict       # diffusers scheduler_config.json content, incl. "_class_name"
    source: str
    pipeline: str | None = None  # model_index.json's _class_name (DDPMPipeline / DDIMPipeline)
    configs: dict = field(default_factory=dict, repr=False)
    family: str = "pixel"


def _json_or_none(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_unet_2d_config(cfg: dict | None) -> bool:
    return isinstance(cfg, dict) and cfg.get("_class_name", UNET_CLASS) == UNET_CLASS and \
        "cross_attention_dim" not in cfg


def _folder_layout(path: Path) -> str | None:
    """"pipeline" / "component" for a pixel-model folder, None for anything else."""
    index = _json_or_none(path / "model_index.json")
    if index is not None:
        unet = index.get("unet")
        named_unet = isinstance(unet, (list, tuple)) and len(unet) == 2 and unet[1] == UNET_CLASS
        return "pipeline" if index.get("_class_name") in PIPELINES or named_unet else None
    if (path / "unet" / "config.json").is_file():
        cfg = _json_or_none(path / "unet" / "config.json")
        return "pipeline" if cfg is not None and cfg.get("_class_name") == UNET_CLASS else None
    cfg = _json_or_none(path / "config.json")
    return "component" if cfg is not None and cfg.get("_class_name") == UNET_CLASS else None


def _single_file(path: Path) -> Path | None:
    if path.is_file():
        return path if path.suffix == ".safetensors" else None
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix == ".safetensors")
    return files[0] if len(files) == 1 else None


def _looks_like_unet_2d_file(path: Path) -> bool:
    """diffusers-named UNet2DModel tensors: a time embedding, no text conditioning, no ldm prefix."""
    from ldm_engine.loading.safetensors_io import read_safetensors_header

    try:
        names = list(read_safetensors_header(path)[0])
    except (CheckpointError, OSError, ValueError):
        return False
    return ("conv_in.weight" in names and "time_embedding.linear_1.weight" in names
            and not any("attn2" in k or "transformer_blocks" in k or k.startswith("model.") for k in names))


def is_pixel_model(path_or_repo_id, config: Any = None) -> bool:
    """Whether ``Engine.from_pretrained(path_or_repo_id, config=config)`` names an unconditional
    UNet2DModel (False for anything else, including paths that do not resolve: the Stable Diffusion
    loader then reports the problem)."""
    try:
        path = resolve_model_path(path_or_repo_id)
    except (CheckpointError, TypeError):
        return False
    if path.is_dir():
        layout = _folder_layout(path)
        if layout is not None:
            return True
        if (path / "model_index.json").is_file() or (path / "unet").is_dir():
            return False
    single = _single_file(path)
    if single is None:
        return False
    if config is not None:
        try:
            return _is_unet_2d_config(_configs_from(config)[0])
        except (CheckpointError, TypeError, ValueError):
            return False
    return _looks_like_unet_2d_file(single)


def _configs_from(config: Any) -> tuple[dict, dict, str | None]:
    """(unet config, scheduler config, pipeline class) described by ``config=``."""
    if isinstance(config, dict):
        return config, dict(DEFAULT_SCHEDULER), None
    if isinstance(config, str) and config in PACKAGED:
        from ldm_engine.configs import default_config

        return default_config(config, "unet.json"), default_config(config, "scheduler_config.json"), "DDPMPipeline"
    if not isinstance(config, (str, os.PathLike)):
        raise TypeError(f"config must be a dict, a path, a repo id or one of {PACKAGED}, got {type(config).__name__}")
    path = resolve_model_path(config)
    if path.is_file():
        return read_json(path), dict(DEFAULT_SCHEDULER), None
    layout = _folder_layout(path)
    if layout == "component":
        return read_json(path / "config.json"), dict(DEFAULT_SCHEDULER), None
    if layout == "pipeline":
        return _pipeline_configs(path)
    raise CheckpointError(f"config={config!r}: not a UNet2DModel config.json, DDPM/DDIM pipeline folder or U-Net "
                          f"folder")


def _pipeline_configs(root: Path) -> tuple[dict, dict, str | None]:
    index = _json_or_none(root / "model_index.json") or {}
    pipeline = index.get("_class_name")
    sched_path = root / "scheduler" / "scheduler_config.json"
    scheduler = read_json(sched_path, "scheduler config") if sched_path.is_file() else dict(DEFAULT_SCHEDULER)
    if pipeline == "DDIMPipeline":  # DDIMPipeline.__init__ converts any scheduler to DDIMScheduler
        scheduler = {**scheduler, "_class_name": "DDIMScheduler"}
    return read_json(root / "unet" / "config.json"), scheduler, pipeline


def _unet_factory(config: dict, source: str):
    from ldm_engine.models.unet_2d import UNet2DConfig, UNet2DModel

    if not _is_unet_2d_config(config):
        raise CheckpointError(f"{source}: not a UNet2DModel config (_class_name={config.get('_class_name')!r})")
    cfg = _config(UNet2DConfig, config, "UNet2DModel", source)
    return lambda: UNet2DModel(cfg)


def _match_packaged(reader, source: str) -> tuple[dict, dict, str]:
    """The packaged config whose shapes the file's tensors fit exactly."""
    for name in PACKAGED:
        unet_cfg, sched, pipeline = _configs_from(name)
        plan = LoadPlan("unet", []).add([reader], keys.diffusers_unet_2d_key)
        if not check_plan(plan, build_empty(_unet_factory(unet_cfg, source))):
            return unet_cfg, sched, pipeline
    raise CheckpointError(f"{source}: a UNet2DModel checkpoint whose shapes match none of the packaged configs "
                          f"({', '.join(PACKAGED)}); pass config= (its config.json, or the model's folder)")


def load_pixel_pipeline(path_or_repo_id, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                        variant: str | None = None, config: Any = None, allow_pickle: bool = False
                        ) -> PixelComponents:
    """Load an unconditional UNet2DModel and its scheduler config (see the module docstring)."""
    from ldm_engine.loading.diffusers_folder import _check_variant_found, find_weight_files

    dtype, device = normalize_dtype_device(dtype, device)
    path = resolve_model_path(path_or_repo_id)
    layout = _folder_layout(path) if path.is_dir() else None
    readers: list = []
    try:
        if layout is not None:
            folder = path / "unet" if layout == "pipeline" else path
            unet_cfg, sched, pipeline = (_pipeline_configs(path) if layout == "pipeline"
                                         else (read_json(path / "config.json"), dict(DEFAULT_SCHEDULER), None))
            files, used = find_weight_files(folder, variant, allow_pickle=allow_pickle)
            _check_variant_found(folder, variant, {"unet": used})
        else:
            single = _single_file(path)
            if single is None:
                raise CheckpointError(f"{path}: not a DDPM/DDIM pipeline folder, UNet2DModel folder or .safetensors "
                                      f"U-Net file")
            files = [single]
        readers.extend(open_weights(f, allow_pickle=allow_pickle) for f in files)
        if layout is None:
            unet_cfg, sched, pipeline = (_configs_from(config) if config is not None
                                         else _match_packaged(readers[0], str(path)))
        plan = LoadPlan("unet", []).add(readers, keys.diffusers_unet_2d_key)
        factory = _unet_factory(unet_cfg, str(path))
    except BaseException:
        close_all(readers)
        raise
    unet = assemble({"unet": (factory, plan)}, dtype=dtype, device=device, readers=readers)["unet"]
    return PixelComponents(unet=unet.eval(), scheduler_config=sched, source=str(path), pipeline=pipeline,
                           configs={"unet": unet_cfg})
