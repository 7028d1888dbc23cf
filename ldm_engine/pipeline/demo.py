"""The tiny random-weight model: ldm_engine/configs/tiny built with seeded random weights.

It has the layout of an SD1 pipeline at toy size (128x128 px, 4 Euler steps with guidance), so the
whole pipeline runs in well under a second on a CPU with no files at all; for tests and benchmarks
that need a model of that shape. Its images are noise: the weights are random. The CLI's default is
the trained built-in model instead (``Engine.from_pretrained("demo")``, ldm_engine/data/demo).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "tiny"


def build_tiny_components(seed: int = 0, device="cpu", dtype=torch.float32):
    from ldm_engine.loading import Components
    from ldm_engine.models.clip import CLIPTextConfig, CLIPTextModel
    from ldm_engine.models.unet import UNet2DConditionModel, UNetConfig
    from ldm_engine.models.vae import AutoencoderKL, VAEConfig
    from ldm_engine.tokenizer import CLIPTokenizer

    root = TINY_CONFIG_DIR
    # Fixed seed: the demo model is the same network on every machine (PyTorch's default init).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(UNetConfig.from_json(root / "unet" / "config.json"))
        vae = AutoencoderKL(VAEConfig.from_json(root / "vae" / "config.json"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_json(root / "text_encoder" / "config.json"))
    modules = [m.to(device=device, dtype=dtype).eval().requires_grad_(False) for m in (unet, vae, text_encoder)]
    scheduler_config = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    return Components(family="sd1", unet=modules[0], vae=modules[1], text_encoder=modules[2],
                      tokenizer=CLIPTokenizer.default(), text_encoder_2=None, tokenizer_2=None,
                      scheduler_config=scheduler_config, source=str(root))


def build_tiny_engine(*, device=None, dtype=None, scheduler=None, seed: int = 0):
    from ldm_engine.engine import Engine, resolve_device, resolve_dtype

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    comps = build_tiny_components(seed, device, dtype)
    return Engine(comps, device=device, dtype=dtype, scheduler=scheduler, name="ldm_engine tiny demo (random weights)")
