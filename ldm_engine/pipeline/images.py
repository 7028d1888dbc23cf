"""Image inputs (img2img source, ControlNet hints) and image outputs.

Accepted inputs, for ``image`` and each ``control_image``:
  * PIL images (or a list of them) in an 8-bit mode: RGB, RGBA, RGBX, L, LA, P, PA, 1;
  * numpy arrays (H, W), (H, W, C) or (N, H, W, C), C in {1, 3}: uint8 in [0, 255] or float in [0, 1];
  * torch tensors (C, H, W) or (N, C, H, W), C in {1, 3}: uint8 or float in [0, 1];
  * a list of numpy arrays / tensors of one size (concatenated along the batch).
Resizing follows diffusers' VaeImageProcessor so results match the reference pipelines: PIL images
are resized with Lanczos and then converted to RGB; arrays and tensors with nearest-neighbour
interpolation (F.interpolate's default).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ldm_engine.errors import InvalidInputError

try:
    from PIL import Image
except ImportError:  # pillow is a dependency; keep the import error readable if it is missing
    Image = None

PIL_MODES = ("RGB", "RGBA", "RGBX", "L", "LA", "P", "PA", "1")


@dataclass
class ImageBatch:
    """Parsed image input: PIL images kept as-is (resizing must happen before RGB conversion,
    as in diffusers), anything else as a float32 (N, 3, H, W) tensor in [0, 1] on the CPU."""

    pil: list | None
    tensor: torch.Tensor | None

    @property
    def batch_size(self) -> int:
        return len(self.pil) if self.pil is not None else self.tensor.shape[0]

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the (first) image."""
        if self.pil is not None:
            return self.pil[0].height, self.pil[0].width
        return tuple(self.tensor.shape[-2:])

    def to_tensor(self, height: int, width: int) -> torch.Tensor:
        """(N, 3, height, width) float32 in [0, 1], resized like diffusers' VaeImageProcessor."""
        return self._resized(height, width, "RGB")

    def _resized(self, height: int, width: int, pil_mode: str) -> torch.Tensor:
        """(N, C, height, width) float32 in [0, 1]: PIL images resized with Lanczos, then converted to
        ``pil_mode`` (RGB, or L for masks), as diffusers does; tensors resized nearest-neighbour."""
        if self.pil is not None:
            arrays = []
            for img in self.pil:
                if img.size != (width, height):
                    img = img.resize((width, height), resample=Image.Resampling.LANCZOS)
                arrays.append(np.asarray(img.convert(pil_mode), dtype=np.float32) / 255.0)
            x = np.stack(arrays)
            return torch.from_numpy((x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)).copy())
        x = self.tensor
        if tuple(x.shape[-2:]) != (height, width):
            x = F.interpolate(x, size=(height, width))
        return x


def _is_pil(obj) -> bool:
    return Image is not None and isinstance(obj, Image.Image)


def _check_range(name: str, x: torch.Tensor) -> None:
    lo, hi = float(x.min()), float(x.max())
    if not (lo >= 0.0 and hi <= 1.0):  # NaN fails too
        raise InvalidInputError(
            f"{name} values must be in [0, 1] for float images (uint8 images may use 0..255), "
            f"got range [{lo:g}, {hi:g}]")


def _to_unit_float(name: str, x: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.uint8:
        return x.to(torch.float32) / 255.0
    if not x.is_floating_point():
        raise InvalidInputError(f"{name} must have dtype uint8 or a float dtype, got {x.dtype}")
    x = x.to(torch.float32)
    _check_range(name, x)
    return x


def _channels_to_rgb(name: str, x: torch.Tensor, layout: str) -> torch.Tensor:
    """(N, C, H, W) with C in {1, 3} -> (N, 3, H, W)."""
    channels = x.shape[1]
    if channels == 1:
        return x.expand(-1, 3, -1, -1).contiguous()
    if channels != 3:
        raise InvalidInputError(
            f"{name} must have 1 or 3 channels ({layout}), got shape {tuple(x.shape)}")
    return x


def _numpy_to_tensor(name: str, arr: np.ndarray) -> torch.Tensor:
    if arr.dtype == np.bool_ or arr.dtype.kind not in "uf" or (arr.dtype.kind == "u" and arr.dtype != np.uint8):
        raise InvalidInputError(f"{name} must be a uint8 or float array, got dtype {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[None, :, :, None]
    elif arr.ndim == 3:
        arr = arr[None]
    elif arr.ndim != 4:
        raise InvalidInputError(
            f"{name} as a numpy array must be (H, W), (H, W, C) or (N, H, W, C) with C in {{1, 3}}, "
            f"got shape {arr.shape}")
    if arr.shape[-1] not in (1, 3):
        raise InvalidInputError(
            f"{name} as a numpy array must be channels-last with 1 or 3 channels, got shape {arr.shape}")
    x = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2)
    return _channels_to_rgb(name, _to_unit_float(name, x), "N, H, W, C")


def _torch_to_tensor(name: str, x: torch.Tensor) -> torch.Tensor:
    if x.ndim == 3:
        x = x[None]
    elif x.ndim != 4:
        raise InvalidInputError(
            f"{name} as a tensor must be (C, H, W) or (N, C, H, W) with C in {{1, 3}}, got shape {tuple(x.shape)}")
    if x.shape[1] not in (1, 3):
        raise InvalidInputError(
            f"{name} as a tensor must be channels-first with 1 or 3 channels, got shape {tuple(x.shape)}")
    x = x.detach().to("cpu")
    return _channels_to_rgb(name, _to_unit_float(name, x), "N, C, H, W")


def parse_image(image, name: str = "image") -> ImageBatch:
    """Checks an image input and normalises its container; see the module docstring."""
    items = list(image) if isinstance(image, (list, tuple)) else [image]
    if not items:
        raise InvalidInputError(f"{name} must not be an empty list")
    if all(_is_pil(i) for i in items):
        for i, img in enumerate(items):
            if img.mode not in PIL_MODES:
                raise InvalidInputError(
                    f"{name}{'' if len(items) == 1 else f'[{i}]'} has PIL mode {img.mode!r}; "
                    f"allowed modes: {', '.join(PIL_MODES)} (convert it, e.g. img.convert('RGB'))")
            if img.width < 1 or img.height < 1:
                raise InvalidInputError(f"{name} is empty ({img.width}x{img.height})")
        return ImageBatch(pil=items, tensor=None)
    x = stack_arrays(items, name, _numpy_to_tensor, _torch_to_tensor)
    return ImageBatch(pil=None, tensor=x)


def stack_arrays(items: list, name: str, from_numpy, from_torch) -> torch.Tensor:
    """numpy arrays / tensors (checked and converted by from_numpy / from_torch to (N, C, H, W)) as one
    batch: same size, not empty. Used for images and masks alike."""
    tensors = []
    for item in items:
        if isinstance(item, np.ndarray):
            tensors.append(from_numpy(name, item))
        elif isinstance(item, torch.Tensor):
            tensors.append(from_torch(name, item))
        else:
            raise TypeError(
                f"{name} must be a PIL image, a numpy array, a torch tensor or a list of one of those, "
                f"got {type(item).__name__}")
    if len({tuple(t.shape[1:]) for t in tensors}) > 1:
        raise InvalidInputError(f"{name}: all items in a list must have the same size")
    x = torch.cat(tensors)
    if x.shape[-1] < 1 or x.shape[-2] < 1:
        raise InvalidInputError(f"{name} is empty (shape {tuple(x.shape)})")
    return x


def expand_batch(x: torch.Tensor, num_prompts: int, num_images_per_prompt: int, name: str) -> torch.Tensor:
    """Images for the (num_prompts * num_images_per_prompt) batch: one image is shared by all,
    otherwise one image per prompt (repeated for each image of that prompt) or one per output."""
    n = x.shape[0]
    total = num_prompts * num_images_per_prompt
    if n == 1:
        return x.expand(total, *x.shape[1:])
    if n == total:
        return x
    if n == num_prompts:
        return x.repeat_interleave(num_images_per_prompt, dim=0)
    raise InvalidInputError(
        f"{name} holds {n} images; give 1, one per prompt ({num_prompts}) or one per output image ({total})")


def postprocess(decoded: torch.Tensor, output_type: str):
    """VAE output in [-1, 1] (N, 3, H, W) -> PIL list, float32 numpy (N, H, W, 3) or tensor (N, 3, H, W)."""
    images = (decoded * 0.5 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return images.float()
    arr = images.cpu().permute(0, 2, 3, 1).float().numpy()
    if output_type == "np":
        return arr
    return [Image.fromarray(a) for a in (arr * 255).round().astype("uint8")]
