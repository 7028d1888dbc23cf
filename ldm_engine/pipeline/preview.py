"""Per-step callbacks and live previews for Engine.generate(..., callback=...).

After every denoising step the callback gets a ``Step``: ``index`` (0-based), ``timestep`` (a
Python float), ``num_steps``, ``latents`` (the latents after this step, as the sampler goes on
with them -- still noisy before the last step, the final latents at the last one; the same
tensor diffusers hands ``callback_on_step_end`` as ``latents``) and ``preview()``, which decodes
those latents through the engine's preview VAE (``Engine.from_pretrained(..., preview_vae=...)``,
e.g. TAESD) into PIL images.

Returning ``False`` from the callback stops generation after that step: the latents of that
step are then decoded by the engine's VAE as usual (``output_type="latent"`` returns them), so
the result holds the fully decoded image of the step where it stopped. Any other return value
goes on. An exception raised by the callback ends generate() and reaches the caller.

Without a callback nothing here runs: the loop is called with ``after_step=None`` (no extra
work, no host-device synchronisation). With one, the timesteps are read to the host once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from ldm_engine.errors import InvalidInputError
from ldm_engine.pipeline.images import postprocess


@dataclass
class Step:
    index: int
    timestep: float
    num_steps: int
    latents: torch.Tensor  # (batch, C, h, w), the sampler's latents after this step (do not modify in place)
    _decode: Callable[[torch.Tensor], torch.Tensor] | None = None

    def preview(self, output_type: str = "pil") -> Any:
        """The latents decoded through the preview VAE: a list of PIL images (one per batch item),
        or "np" / "pt" as generate()'s output_type."""
        if self._decode is None:
            raise InvalidInputError("step.preview() needs a preview VAE: load the engine with "
                                    "Engine.from_pretrained(..., preview_vae=<e.g. a TAESD folder>)")
        if output_type not in ("pil", "np", "pt"):
            raise InvalidInputError(f"step.preview(): output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        with torch.inference_mode():
            return postprocess(self._decode(self.latents), output_type)


class _Stop(Exception):
    """Raised out of the sampler loop when a callback returns False; carries that step's latents."""

    def __init__(self, latents: torch.Tensor):
        super().__init__("generation stopped by the callback")
        self.latents = latents


def check_callback(callback) -> Callable | None:
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable (it receives one Step) or None, "
                                f"got {type(callback).__name__}")
    return callback


def vae_decoder(vae, dtype: torch.dtype | None = None) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """latents (in the U-Net's space) -> pixels in [-1, 1] through ``vae``, with its own scaling
    and shift factors (1.0 / 0.0 for TAESD); None when there is no VAE."""
    if vae is None:
        return None
    cfg = vae.config
    scale, shift = cfg.scaling_factor, getattr(cfg, "shift_factor", None) or 0.0
    dtype = dtype or getattr(vae, "dtype", torch.float32)
    return lambda latents: vae.decode((latents.float() / scale + shift).to(dtype))


def compose(*hooks) -> Callable | None:
    """One after_step(i, x, out) -> x running the given hooks in order (None entries skipped)."""
    hooks = [h for h in hooks if h is not None]
    if len(hooks) <= 1:
        return hooks[0] if hooks else None

    def after_step(i, x, out):
        for h in hooks:
            x = h(i, x, out)
        return x

    return after_step


def callback_hook(callback, schedule, decode) -> Callable | None:
    """The sampler's after_step for ``callback`` (None when there is no callback)."""
    if callback is None:
        return None
    timesteps = [float(t) for t in schedule.timesteps.tolist()]  # one host read, before the loop
    n = schedule.num_steps

    def after_step(i, x, out):
        if callback(Step(i, timesteps[i], n, x, decode)) is False:
            raise _Stop(x)
        return x

    return after_step


def run_sampler(schedule, model_fn, x, noises, *, after_step=None) -> torch.Tensor:
    """samplers.sample(), returning the latents of the step where a callback stopped it, if one did."""
    from ldm_engine.samplers import sample

    try:
        return sample(schedule, model_fn, x, noises, after_step=after_step)
    except _Stop as stop:
        return stop.latents
