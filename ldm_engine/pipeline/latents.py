"""Image -> initial latents for img2img, for either kind of VAE.

AutoencoderKL's encoder gives a distribution (mean, logvar) and diffusers' ``retrieve_latents``
samples it with the pipeline's generator: one draw before the initial noise. AutoencoderTiny
(TAESD) gives the latents themselves (``encode`` -> (latents, None); the model says
``latent_distribution = False``): diffusers takes them as they are and draws nothing, so the
initial noise is then the generator's first draw.
"""

from __future__ import annotations

import torch


def draws_posterior(vae) -> bool:
    """Whether encoding an image samples the VAE's latent distribution (one random draw)."""
    return bool(getattr(vae, "latent_distribution", True))


def encode_image(vae, pixels: torch.Tensor, posterior_noise: torch.Tensor | None) -> torch.Tensor:
    """Unscaled float32 latents of ``pixels`` (in [-1, 1]): mean + std * posterior_noise for a
    distribution (as ``latent_dist.sample(generator)``), the encoder's output otherwise."""
    mean, logvar = vae.encode(pixels)
    if logvar is None:
        return mean.float()
    std = torch.exp(0.5 * logvar.float().clamp(-30.0, 20.0))
    return mean.float() + std * posterior_noise


def image_latents(vae, pixels: torch.Tensor, posterior_noise: torch.Tensor | None, scale: float,
                  shift: float) -> torch.Tensor:
    """encode_image() in the U-Net's latent space: (latents - shift) * scale, float32."""
    return (encode_image(vae, pixels, posterior_noise) - shift) * scale


def check_vae_latent_channels(unet_config, vae, preview_vae=None) -> None:
    """The VAE (and preview VAE) must work in the U-Net's latent space: same latent channels as
    the U-Net's output (an inpainting U-Net takes more channels in, but outputs the latents')."""
    from ldm_engine.errors import InvalidInputError

    want = getattr(unet_config, "out_channels", None) or unet_config.in_channels
    for what, v in (("vae", vae), ("preview_vae", preview_vae)):
        have = None if v is None else getattr(v.config, "latent_channels", None)
        if have is not None and have != want:
            raise InvalidInputError(f"{what} has {have} latent channels but the model's U-Net works on {want}: "
                                    "it belongs to another model family (e.g. TAESD3 / FLUX VAEs have 16)")
