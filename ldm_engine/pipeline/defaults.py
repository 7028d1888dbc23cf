"""Per-model defaults for Engine.generate(): size, steps, guidance, img2img strength.

Turbo (adversarially distilled: SD-Turbo, SDXL-Turbo) or not is decided as follows:
  1. model_index.json may carry an explicit hint, ``"_ldm_engine_defaults": {"turbo": true, ...}``
     (diffusers ignores keys starting with "_"); any of height, width, num_inference_steps,
     guidance_scale and strength given there override the family values too;
  2. otherwise a model is turbo when its scheduler uses ``timestep_spacing: "trailing"`` AND its
     name (the repo id / path given, or the resolved folder) contains "turbo".

Family values:
  * turbo (SD-Turbo, SDXL-Turbo): 1 step, guidance 0 (no CFG); img2img strength 0.5 and just enough
    steps for one denoising step (steps = ceil(1 / strength), 2 at strength 0.5, as the model cards);
  * SD1.x / SD2.x: 25 steps, guidance 7.5, img2img strength 0.8;
  * SDXL: 30 steps, guidance 5.0, img2img strength 0.8.
Size: the U-Net's ``sample_size`` times the VAE factor -- 512 for SD1.5, SD-Turbo and SDXL-Turbo,
768 for SD2.x-768, 1024 for SDXL base, and small sizes for tiny test models.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

HINT_KEY = "_ldm_engine_defaults"


@dataclass(frozen=True)
class Defaults:
    turbo: bool
    height: int
    width: int
    num_inference_steps: int
    guidance_scale: float
    strength: float

    def img2img_steps(self, strength: float) -> int:
        """Default step count for img2img at ``strength``."""
        if not self.turbo:
            return self.num_inference_steps
        steps = max(1, math.ceil(1.0 / strength))
        while int(steps * strength) < 1:  # guard against float rounding
            steps += 1
        return steps


def read_model_index(source) -> dict:
    """model_index.json of a pipeline folder, or {} when there is none (or it is unreadable)."""
    if source is None:
        return {}
    path = Path(source) / "model_index.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def is_turbo(names, scheduler_config: dict, model_index: dict) -> bool:
    hint = model_index.get(HINT_KEY)
    if isinstance(hint, dict) and isinstance(hint.get("turbo"), bool):
        return hint["turbo"]
    trailing = scheduler_config.get("timestep_spacing") == "trailing"
    return trailing and any("turbo" in str(n).lower() for n in names if n)


def _sample_size_px(unet_config, vae_factor: int) -> tuple[int, int]:
    size = getattr(unet_config, "sample_size", None) or 64
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return int(h) * vae_factor, int(w) * vae_factor


def model_defaults(family: str, names, scheduler_config: dict, model_index: dict,
                   unet_config, vae_factor: int) -> Defaults:
    turbo = is_turbo(names, scheduler_config, model_index)
    height, width = _sample_size_px(unet_config, vae_factor)
    if turbo:
        d = Defaults(True, height, width, 1, 0.0, 0.5)
    elif family == "sdxl":
        d = Defaults(False, height, width, 30, 5.0, 0.8)
    else:
        d = Defaults(False, height, width, 25, 7.5, 0.8)
    hint = model_index.get(HINT_KEY)
    if isinstance(hint, dict):
        overrides = {k: hint[k] for k in ("height", "width", "num_inference_steps", "guidance_scale", "strength")
                     if k in hint}
        d = replace(d, **overrides)
    return d


def vae_needs_fp32(family: str, vae_config) -> bool:
    """Whether the VAE must run in fp32 when the engine runs in fp16.

    The SDXL VAE overflows in fp16 and its config says ``force_upcast``; diffusers' SDXL pipelines
    then decode in fp32. SD1/SD2 (and SD-Turbo) VAE configs carry ``force_upcast: true`` as well (a
    diffusers default), but that VAE is fine in fp16 and diffusers' SD pipelines ignore the flag --
    so do we: at one step the VAE decoder is ~3x the U-Net's cost, and fp32 would double it.
    """
    return family == "sdxl" and bool(getattr(vae_config, "force_upcast", False))


def vae_dtype_for(family: str, vae_config, engine_dtype, requested=None):
    """The VAE's dtype: ``requested`` when given (``vae_dtype=``), else the engine's, except fp32 where
    ``vae_needs_fp32`` says so. bf16 has fp32's exponent range, so it is the half type that cannot
    overflow where fp16 does (the SDXL VAE): half the fp32 decoder's cost on GPUs with bf16 tensor cores
    (expected, not yet measured: there is no benchmark variant for it), at bf16's 8-bit mantissa.
    Any overflow left is caught after decoding (pipeline/finite.py: decoded again in fp32)."""
    import torch

    if requested is not None:
        return requested
    if engine_dtype == torch.float16 and vae_needs_fp32(family, vae_config):
        return torch.float32
    return engine_dtype

