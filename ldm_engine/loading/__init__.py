"""Loading Stable Diffusion pipelines and ControlNets from the files people have.

- diffusers folders (``model_index.json`` + component folders; plain, sharded or ``fp16``
  variant safetensors), also as Hugging Face repo ids resolved in the local cache (no network);
- single-file original checkpoints (ldm / sgm layout) of SD1.x, SD2.x / SD-Turbo, SDXL /
  SDXL-Turbo and ControlNet, the family detected from the keys.

Models are built on the meta device and each tensor is read once from a memory map, cast and
placed: no second copy of the weights. Every problem raises ``ldm_engine.errors.CheckpointError``.
Pickle files (.ckpt .bin .pt .pth) are refused unless ``allow_pickle=True``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ldm_engine.errors import CheckpointError
from ldm_engine.loading.build import normalize_dtype_device
from ldm_engine.loading.components import Components
from ldm_engine.loading.hub import resolve_model_path

__all__ = ["Components", "load_pipeline", "load_controlnet", "load_component", "load_vae", "resolve_model_path",
           "CheckpointError"]


def load_vae(spec, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
             family: str | None = None, allow_pickle: bool = False):
    """A VAE on its own (AutoencoderKL or AutoencoderTiny / TAESD): a loaded module, a VAE or
    pipeline folder, a cached repo id, the original taesd_encoder / taesd_decoder files, or one
    .safetensors VAE (``family`` picks its default config). See ldm_engine.loading.vae."""
    from ldm_engine.loading.vae import load_vae as load

    return load(spec, device=device, dtype=dtype, family=family, allow_pickle=allow_pickle)


def _only_weights_file(folder: Path) -> Path | None:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix == ".safetensors")
    return files[0] if len(files) == 1 else None


def load_pipeline(path_or_repo_id: str | os.PathLike, *, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32, variant: str | None = None, config: Any = None,
                  prediction_type: str | None = None, allow_pickle: bool = False) -> Components:
    """Load a whole pipeline (U-Net, VAE, text encoder(s), tokenizer(s), scheduler config).

    path_or_repo_id: a diffusers folder, a single ``.safetensors`` checkpoint, or a repo id in the
        local Hugging Face cache.
    variant: weights variant of a diffusers folder ("fp16"); None prefers the plain files and
        falls back to fp16 ones.
    config: single files only: a diffusers folder (or cached repo id) whose unet/ vae/
        text_encoder*/ configs describe the checkpoint's architecture (default: ldm_engine/configs
        for the detected family).
    prediction_type: single files only: "epsilon" or "v_prediction" (overrides the default).
    allow_pickle: read .ckpt/.bin/.pt/.pth with torch.load(weights_only=True) instead of refusing.
    """
    dtype, device = normalize_dtype_device(dtype, device)
    if prediction_type is not None and prediction_type not in ("epsilon", "v_prediction", "v"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
    path = resolve_model_path(path_or_repo_id)
    if path.is_dir():
        from ldm_engine.loading.diffusers_folder import is_diffusers_pipeline_folder, load_diffusers_pipeline

        if is_diffusers_pipeline_folder(path):
            return load_diffusers_pipeline(path, device=device, dtype=dtype, variant=variant,
                                           allow_pickle=allow_pickle)
        single = _only_weights_file(path)
        if single is None:
            raise CheckpointError(f"{path}: neither a diffusers pipeline folder (no model_index.json or "
                                  "unet/config.json) nor a folder holding one .safetensors checkpoint")
        path = single
    from ldm_engine.loading.single_file import load_single_file_pipeline

    return load_single_file_pipeline(path, device=device, dtype=dtype, config=config,
                                     prediction_type=prediction_type, allow_pickle=allow_pickle)


def load_controlnet(path_or_repo_id: str | os.PathLike, *, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32, variant: str | None = None, config: Any = None,
                    allow_pickle: bool = False):
    """Load a ControlNet: a diffusers folder (config.json + weights), a single file in ldm layout
    (``control_model.*``) or diffusers layout, or a cached repo id. ``config``: a config.json
    path / folder / dict for single files whose architecture differs from the default."""
    dtype, device = normalize_dtype_device(dtype, device)
    path = resolve_model_path(path_or_repo_id)
    if path.is_dir():
        if (path / "config.json").is_file():
            from ldm_engine.loading.diffusers_folder import load_diffusers_controlnet

            return load_diffusers_controlnet(path, device=device, dtype=dtype, variant=variant,
                                             allow_pickle=allow_pickle)
        single = _only_weights_file(path)
        if single is None:
            raise CheckpointError(f"{path}: not a ControlNet folder (no config.json) and not a folder "
                                  "holding one .safetensors checkpoint")
        path = single
    from ldm_engine.loading.single_file import load_controlnet_file

    return load_controlnet_file(path, device=device, dtype=dtype, config=config, allow_pickle=allow_pickle)


def load_component(path_or_repo_id: str | os.PathLike, kind: str, *, device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32, variant: str | None = None, allow_pickle: bool = False):
    """One model from a diffusers component folder (config.json + weights, e.g. ``<pipeline>/unet``):
    kind "unet", "vae", "text_encoder" or "controlnet"."""
    dtype, device = normalize_dtype_device(dtype, device)
    path = resolve_model_path(path_or_repo_id)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: not a component folder (no config.json)")
    from ldm_engine.loading.diffusers_folder import load_diffusers_component

    return load_diffusers_component(path, kind, device=device, dtype=dtype, variant=variant, allow_pickle=allow_pickle)
