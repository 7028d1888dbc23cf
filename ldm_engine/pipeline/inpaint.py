"""Inpainting: mask parsing and the mask / masked-image latents, as diffusers' inpaint pipelines
(StableDiffusionInpaintPipeline, StableDiffusionXLInpaintPipeline, StableDiffusionControlNetInpaintPipeline).

White (1) in the mask is repainted, black (0) is kept. The mask is resized to the output size like
diffusers' mask processor (PIL: Lanczos, then to grayscale "L"; arrays and tensors: nearest), and
binarised at 0.5. Then:

* inpainting models (9-channel U-Net): the U-Net input is [latents, mask at latent size, latents of
  the masked image (the image with the repainted region set to 0, i.e. mid grey)];
* any other model (4-channel U-Net): masked img2img. After every step the known region is replaced
  by the encoded image noised to the next timestep (the clean image after the last step):
  ``x = (1 - mask) * add_noise(image_latents, noise, t_next) + mask * x``.

Start: strength 1.0 starts from pure noise (times the sampler's init sigma), a lower strength from the
encoded image noised to the first kept timestep. Randomness, in diffusers' order: the image's VAE
posterior sample (only when the image latents are used: 4-channel models or strength < 1), the
initial noise, the masked image's posterior sample, then the samplers' per-step noise.

Accepted masks (``mask_image``): PIL images (the modes of ldm_engine.pipeline.images), numpy arrays
(H, W), (H, W, C) or (N, H, W, C) and tensors (H, W), (C, H, W) or (N, C, H, W) with C = 1 (gray) or
3 / 4 (RGB / RGBA: the luminance 0.299 R + 0.587 G + 0.114 B is used, alpha ignored, as PIL's "L");
bool, uint8 (0..255) or float in [0, 1]; or a list of one kind. Batches: one mask (and image) for all,
one per prompt (shared by that prompt's images) or one per output image. (diffusers tiles a per-prompt
mask over the batch instead, which pairs masks with the wrong prompts when several prompts each get
several images; everywhere else the two agree.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ldm_engine.errors import InvalidInputError
from ldm_engine.pipeline.images import ImageBatch, stack_arrays, _is_pil, _to_unit_float, expand_batch, parse_image

try:
    from PIL import Image
except ImportError:
    Image = None

_LUMA = (0.299, 0.587, 0.114)


@dataclass
class MaskBatch(ImageBatch):
    """Parsed mask: PIL images as given, anything else a float32 (N, 1, H, W) tensor in [0, 1] on the CPU."""

    def to_tensor(self, height: int, width: int) -> torch.Tensor:
        """(N, 1, height, width) float32 of 0 / 1: resized like diffusers' mask processor, binarised at 0.5."""
        x = self._resized(height, width, "L")
        return (x >= 0.5).to(torch.float32)


def _gray(name: str, x: torch.Tensor, layout: str) -> torch.Tensor:
    """(N, C, H, W) with C in {1, 3, 4} -> (N, 1, H, W) float32 in [0, 1]."""
    if x.shape[1] not in (1, 3, 4):
        raise InvalidInputError(f"{name} must have 1 (gray), 3 (RGB) or 4 (RGBA) channels ({layout}), "
                                f"got shape {tuple(x.shape)}")
    if x.dtype == torch.bool:
        x = x.to(torch.float32)
    x = _to_unit_float(name, x)
    if x.shape[1] == 1:
        return x
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return r * _LUMA[0] + g * _LUMA[1] + b * _LUMA[2]


def _mask_from_numpy(name: str, arr: np.ndarray) -> torch.Tensor:
    if arr.dtype != np.bool_ and (arr.dtype.kind not in "uf" or (arr.dtype.kind == "u" and arr.dtype != np.uint8)):
        raise InvalidInputError(f"{name} must be a bool, uint8 or float array, got dtype {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[None, :, :, None]
    elif arr.ndim == 3:
        arr = arr[None]
    elif arr.ndim != 4:
        raise InvalidInputError(f"{name} as a numpy array must be (H, W), (H, W, C) or (N, H, W, C), "
                                f"got shape {arr.shape}")
    x = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2)
    return _gray(name, x, "N, H, W, C")


def _mask_from_torch(name: str, x: torch.Tensor) -> torch.Tensor:
    if x.ndim == 2:
        x = x[None, None]
    elif x.ndim == 3:
        x = x[None]
    elif x.ndim != 4:
        raise InvalidInputError(f"{name} as a tensor must be (H, W), (C, H, W) or (N, C, H, W), "
                                f"got shape {tuple(x.shape)}")
    return _gray(name, x.detach().to("cpu"), "N, C, H, W")


def parse_mask(mask, name: str = "mask_image") -> MaskBatch:
    """Checks a mask input and normalises its container; see the module docstring."""
    items = list(mask) if isinstance(mask, (list, tuple)) else [mask]
    if items and all(_is_pil(i) for i in items):
        return MaskBatch(pil=parse_image(items, name).pil, tensor=None)
    if not items:
        raise InvalidInputError(f"{name} must not be an empty list")
    x = stack_arrays(items, name, _mask_from_numpy, _mask_from_torch)
    return MaskBatch(pil=None, tensor=x)


def masked_pixels(pixels: torch.Tensor, mask: torch.Tensor, num_prompts: int, n: int) -> torch.Tensor:
    """The image in [-1, 1] with the repainted region zeroed, as diffusers: ``image * (mask < 0.5)``.
    Batches broadcast as in diffusers (equal, or one of them 1); otherwise both expand to the output batch."""
    a, b = pixels.shape[0], mask.shape[0]
    if a != b and 1 not in (a, b):
        pixels = expand_batch(pixels, num_prompts, n, "image")
        mask = expand_batch(mask, num_prompts, n, "mask_image")
    return pixels * (mask < 0.5)


def mask_latents(mask: torch.Tensor, vae_scale_factor: int) -> torch.Tensor:
    """The pixel mask at latent size (nearest), as prepare_mask_latents."""
    f = vae_scale_factor
    return F.interpolate(mask, size=(mask.shape[-2] // f, mask.shape[-1] // f))


def blend_known(schedule, image_latents: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor):
    """after_step hook for 4-channel models: keep the known region (mask 0) on the image's noising path."""
    last = schedule.num_steps - 1

    def after_step(i, x, out):
        proper = image_latents if i == last else schedule.add_noise(image_latents, noise, i + 1)
        return (1 - mask) * proper + mask * x

    return after_step
