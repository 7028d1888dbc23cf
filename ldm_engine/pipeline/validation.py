"""Argument checks for Engine.generate(), run before any network is called.

Each check raises TypeError (wrong kind of object) or InvalidInputError (a ValueError: right kind,
bad value) with a message that names the argument and what is allowed.
"""

from __future__ import annotations

import math
import numbers

import torch

from ldm_engine.errors import InvalidInputError

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_text(text: str, name: str) -> str:
    """A str the tokenizer can take: encodable as UTF-8 (a lone surrogate such as "\\ud800" is not)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidInputError(f"{name} is not valid Unicode text: it holds a lone surrogate "
                                f"{text[e.start]!r} at position {e.start}") from None
    return text


def check_prompts(prompt) -> list[str]:
    """A str or a non-empty list/tuple of str -> list of str."""
    if isinstance(prompt, str):
        return [check_text(prompt, "prompt")]
    if isinstance(prompt, (list, tuple)):
        if not prompt:
            raise InvalidInputError("prompt must not be an empty list")
        for i, p in enumerate(prompt):
            if not isinstance(p, str):
                raise TypeError(f"prompt[{i}] must be a str, got {type(p).__name__}")
            check_text(p, f"prompt[{i}]")
        return list(prompt)
    raise TypeError(f"prompt must be a str or a list of str, got {type(prompt).__name__}")


def check_negative_prompts(negative_prompt, num_prompts: int) -> list[str] | None:
    """None, a str (used for every prompt) or a list of str as long as the prompt list."""
    if negative_prompt is None:
        return None
    if isinstance(negative_prompt, str):
        return [check_text(negative_prompt, "negative_prompt")] * num_prompts
    if isinstance(negative_prompt, (list, tuple)):
        for i, p in enumerate(negative_prompt):
            if not isinstance(p, str):
                raise TypeError(f"negative_prompt[{i}] must be a str, got {type(p).__name__}")
            check_text(p, f"negative_prompt[{i}]")
        if len(negative_prompt) != num_prompts:
            raise InvalidInputError(
                f"negative_prompt has {len(negative_prompt)} entries but prompt has {num_prompts}; "
                "pass one negative prompt per prompt, or a single string for all")
        return list(negative_prompt)
    raise TypeError(f"negative_prompt must be None, a str or a list of str, got {type(negative_prompt).__name__}")


def check_int(name: str, value, low: int, high: int | None = None) -> int:
    if not _is_int(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise InvalidInputError(f"{name} must be {allowed}, got {value}")
    return int(value)


def check_guidance(value) -> float:
    if not _is_real(value):
        raise TypeError(f"guidance_scale must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise InvalidInputError(f"guidance_scale must be a finite number >= 0 (<= 1 turns guidance off), got {value}")
    return value


def check_strength(value) -> float:
    if not _is_real(value):
        raise TypeError(f"strength must be a number, got {type(value).__name__}")
    value = float(value)
    if not (0.0 < value <= 1.0):  # also rejects NaN
        raise InvalidInputError(f"strength must be in (0, 1], got {value}")
    return value


def check_img2img_steps(num_inference_steps: int, strength: float) -> int:
    """img2img runs int(steps * strength) steps, which must be at least one."""
    steps = min(int(num_inference_steps * strength), num_inference_steps)
    if steps < 1:
        raise InvalidInputError(
            f"num_inference_steps * strength must be >= 1 (img2img runs int(steps * strength) steps), "
            f"got {num_inference_steps} * {strength} = {num_inference_steps * strength:g}; "
            "raise num_inference_steps or strength")
    return steps


def check_size(name: str, value, multiple: int, low: int, high: int) -> int:
    if not _is_int(value):
        raise TypeError(f"{name} must be an int (pixels), got {type(value).__name__}")
    if value % multiple or not (low <= value <= high):
        raise InvalidInputError(
            f"{name} must be a multiple of {multiple} in [{low}, {high}] for this model, got {value}")
    return int(value)


def check_seed(value) -> int | None:
    if value is None:
        return None
    if not _is_int(value):
        raise TypeError(f"seed must be an int or None, got {type(value).__name__}")
    if not (0 <= value < 2**64):
        raise InvalidInputError(f"seed must be in [0, 2**64 - 1], got {value}")
    return int(value)


def check_output_type(value) -> str:
    if value not in OUTPUT_TYPES:
        raise InvalidInputError(f"output_type must be one of {OUTPUT_TYPES}, got {value!r}")
    return value


def check_controlnet_scales(scale, num_controlnets: int) -> list[float]:
    """One scale for all ControlNets, or a list with one scale per ControlNet."""
    scales = list(scale) if isinstance(scale, (list, tuple)) else [scale] * max(num_controlnets, 1)
    for s in scales:
        if not _is_real(s):
            raise TypeError(f"controlnet_conditioning_scale must be a number or a list of numbers, got {s!r}")
        if not math.isfinite(float(s)):
            raise InvalidInputError(f"controlnet_conditioning_scale must be finite, got {s}")
    if num_controlnets and len(scales) != num_controlnets:
        raise InvalidInputError(
            f"controlnet_conditioning_scale has {len(scales)} entries but {num_controlnets} ControlNet(s) are loaded")
    return [float(s) for s in scales]


def check_control_images(control_image, num_controlnets: int) -> list:
    """Control image input(s): exactly one per loaded ControlNet (a list when there are several)."""
    if num_controlnets == 0:
        if control_image is not None:
            raise InvalidInputError(
                "control_image was given but no ControlNet is loaded; "
                "pass controlnet=... to Engine.from_pretrained")
        return []
    if control_image is None:
        raise InvalidInputError(
            f"control_image is required: {num_controlnets} ControlNet(s) are loaded")
    if num_controlnets == 1:
        return [control_image]
    if not isinstance(control_image, (list, tuple)) or len(control_image) != num_controlnets:
        got = len(control_image) if isinstance(control_image, (list, tuple)) else type(control_image).__name__
        raise InvalidInputError(
            f"control_image must be a list with one image per ControlNet ({num_controlnets}), got {got}")
    return list(control_image)


def check_latents(latents, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """User-supplied initial noise: a floating tensor of exactly ``shape`` on the engine's device."""
    if not isinstance(latents, torch.Tensor):
        raise TypeError(f"latents must be a torch.Tensor, got {type(latents).__name__}")
    if tuple(latents.shape) != tuple(shape):
        raise InvalidInputError(
            f"latents must have shape {tuple(shape)} (batch, channels, height / f, width / f), "
            f"got {tuple(latents.shape)}")
    if not latents.is_floating_point():
        raise InvalidInputError(f"latents must be a floating-point tensor, got dtype {latents.dtype}")
    if latents.device.type != device.type or (
            device.index is not None and latents.device.index not in (None, device.index)):
        raise InvalidInputError(f"latents must be on the engine's device {device}, got {latents.device}")
    if not bool(torch.isfinite(latents).all()):  # once, before the loop: NaN/inf would give a NaN image
        raise InvalidInputError("latents contain NaN or infinite values")
    return latents
