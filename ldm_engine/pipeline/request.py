"""Engine.generate()'s request: every argument checked and completed with the model's defaults
before any network runs (ValueError / TypeError subclasses naming the problem)."""

from __future__ import annotations

import secrets
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from ldm_engine.errors import InvalidInputError
from ldm_engine.pipeline import inpaint
from ldm_engine.pipeline import validation as check
from ldm_engine.pipeline.images import parse_image
from ldm_engine.samplers import build_schedule

MAX_SIZE = 4096  # pixels per side


@dataclass
class Request:
    """generate()'s arguments after checking and filling in defaults."""

    prompts: list
    negatives: list | None
    n: int                      # images per prompt
    output_type: str
    seed: int
    guidance: float
    do_cfg: bool
    init: Any                   # ImageBatch | None (img2img)
    mask: Any                   # MaskBatch | None (inpainting)
    strength: float | None
    height: int
    width: int
    controls: list              # one ImageBatch per ControlNet
    scales: list
    shape: tuple                # latent shape (batch, C, h, w)
    latents: torch.Tensor | None
    schedule: Any
    callback: Any = None        # per-step callback (ldm_engine.pipeline.preview)



def check_request(engine, prompt, negative_prompt, height, width, num_inference_steps, guidance_scale, seed,
                  latents, image, strength, control_image, controlnet_conditioning_scale,
                  num_images_per_prompt, output_type, mask_image=None) -> Request:
    """generate()'s arguments checked (InvalidInputError naming the problem) and completed with the
    model's defaults, before any network runs."""
    d = engine.defaults
    prompts = check.check_prompts(prompt)
    negatives = check.check_negative_prompts(negative_prompt, len(prompts))
    n = check.check_int("num_images_per_prompt", num_images_per_prompt, 1)
    output_type = check.check_output_type(output_type)
    seed = check.check_seed(seed)
    guidance = d.guidance_scale if guidance_scale is None else check.check_guidance(guidance_scale)

    init = mask = None
    if mask_image is not None and image is None:
        raise InvalidInputError("mask_image needs image= (the picture to inpaint)")
    if engine.inpainting_unet and mask_image is None:
        raise InvalidInputError("this is an inpainting model (its U-Net takes 9 channels: latents, mask, masked "
                                "image): pass image= and mask_image=")
    if image is not None:
        default_strength = 1.0 if mask_image is not None else d.strength
        strength = default_strength if strength is None else check.check_strength(strength)
        init = parse_image(image, "image")
        mask = None if mask_image is None else inpaint.parse_mask(mask_image)
    elif strength is not None:
        raise InvalidInputError("strength applies to img2img only: pass image= as well (or drop strength)")
    if num_inference_steps is None:
        steps = d.img2img_steps(strength) if init is not None else d.num_inference_steps
    else:
        steps = check.check_int("num_inference_steps", num_inference_steps, 1, engine.num_train_timesteps)
    if init is not None:
        check.check_img2img_steps(steps, strength)

    controls = [parse_image(c, "control_image" if len(engine.controlnets) == 1 else f"control_image[{i}]")
                for i, c in enumerate(check.check_control_images(control_image, len(engine.controlnets)))]
    for what, batch in [("image", init), ("mask_image", mask)] + [("control_image", c) for c in controls]:
        if batch is not None and batch.batch_size not in (1, len(prompts), len(prompts) * n):
            raise InvalidInputError(
                f"{what} holds {batch.batch_size} images; give 1, one per prompt ({len(prompts)}) "
                f"or one per output image ({len(prompts) * n})")

    # Default size, as the diffusers pipelines: the init image's, else the (first) control image's,
    # rounded down to the VAE factor; else the model's default.
    f = engine.vae_scale_factor
    source = init if init is not None else (controls[0] if controls else None)
    if source is not None:
        ih, iw = source.size
        default_h, default_w = max(ih - ih % f, f), max(iw - iw % f, f)
    else:
        default_h, default_w = d.height, d.width
    height = default_h if height is None else check.check_size("height", height, f, f, MAX_SIZE)
    width = default_w if width is None else check.check_size("width", width, f, f, MAX_SIZE)
    scales = check.check_controlnet_scales(controlnet_conditioning_scale, len(engine.controlnets))

    shape = (len(prompts) * n, engine.latent_channels, height // f, width // f)
    if latents is not None:
        latents = check.check_latents(latents, shape, engine.device)

    do_cfg = guidance > 1.0 and getattr(engine.components.unet.config, "time_cond_proj_dim", None) is None
    if negatives is not None and not do_cfg:
        warnings.warn("negative_prompt is ignored: guidance_scale <= 1 turns classifier-free guidance off",
                      UserWarning, stacklevel=3)
    schedule = build_schedule(engine.scheduler, engine.components.scheduler_config, steps,
                              strength=strength if init is not None else None, device=engine.device)
    return Request(prompts=prompts, negatives=negatives, n=n, output_type=output_type,
                    seed=secrets.randbits(63) if seed is None else seed, guidance=guidance, do_cfg=do_cfg,
                    init=init, mask=mask, strength=strength if init is not None else None,
                    height=height, width=width, controls=controls, scales=scales, shape=shape,
                    latents=latents, schedule=schedule)
