"""Prompt conditioning for the U-Net, as the diffusers pipelines compute it.

* SD1.x: CLIP-L ``last_hidden_state`` (after the final LayerNorm).
* SD2.x / SD-Turbo: the same output of the 23-layer OpenCLIP-H text model.
* SDXL: concat(TE1 penultimate, TE2 penultimate) along features, TE2's pooled (projected)
  embedding, and time ids (original size, crop top-left, target size).
  With ``force_zeros_for_empty_prompt`` and no negative prompt, the unconditional embeddings
  are zeros (StableDiffusionXLPipeline does the same).

With classifier-free guidance the batch is [unconditional rows..., conditional rows...], so one
U-Net call does both halves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Conditioning:
    encoder_hidden_states: torch.Tensor       # (B', 77, D)
    text_embeds: torch.Tensor | None = None   # SDXL pooled (B', 1280)
    time_ids: torch.Tensor | None = None      # SDXL (B', 6)


def _repeat(x: torch.Tensor | None, n: int) -> torch.Tensor | None:
    # Each prompt's rows stay together: [p0, p0, p1, p1] for 2 images per prompt, as diffusers.
    return x if x is None or n == 1 else x.repeat_interleave(n, dim=0)


def _encode_sd(comps, prompts: list[str], device) -> torch.Tensor:
    ids = comps.tokenizer(prompts).to(device)
    return comps.text_encoder(ids).last_hidden_state


def _encode_sdxl(comps, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    # Both id tensors reach the device before the first encoder is queued: a host->device copy
    # behind queued kernels would make the host wait for them.
    ids1, ids2 = comps.tokenizer(prompts).to(device), comps.tokenizer_2(prompts).to(device)
    out1 = comps.text_encoder(ids1)
    out2 = comps.text_encoder_2(ids2)
    h1, h2 = out1.penultimate_hidden_state, out2.penultimate_hidden_state
    hidden = torch.cat([h1, h2.to(h1.dtype)], dim=-1)
    return hidden, out2.pooled


def sdxl_time_ids(height: int, width: int, batch: int, dtype, device) -> torch.Tensor:
    """(original_h, original_w, crop_top, crop_left, target_h, target_w): original = target, no crop."""
    ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype, device=device)
    return ids.expand(batch, 6)


def encode_prompts(comps, prompts: list[str], negative_prompts: list[str] | None, *,
                   do_cfg: bool, num_images_per_prompt: int, height: int, width: int,
                   force_zeros_for_empty_prompt: bool, dtype, device) -> Conditioning:
    """Conditioning for the whole U-Net batch (2 * B * n rows with guidance, B * n without)."""
    n = num_images_per_prompt
    if comps.family != "sdxl":
        if do_cfg:
            uncond = negative_prompts if negative_prompts is not None else [""] * len(prompts)
            # One text-encoder call for both halves.
            hidden = _encode_sd(comps, uncond + prompts, device)
            neg, pos = hidden.split(len(prompts))
            hidden = torch.cat([_repeat(neg, n), _repeat(pos, n)])
        else:
            hidden = _repeat(_encode_sd(comps, prompts, device), n)
        return Conditioning(hidden.to(dtype))

    rows = len(prompts) * n * (2 if do_cfg else 1)
    time_ids = sdxl_time_ids(height, width, rows, dtype, device)  # before any encoder is queued (see above)
    zero_uncond = do_cfg and negative_prompts is None and force_zeros_for_empty_prompt
    if do_cfg and not zero_uncond:
        uncond = negative_prompts if negative_prompts is not None else [""] * len(prompts)
        hidden, pooled = _encode_sdxl(comps, uncond + prompts, device)
        neg_h, pos_h = hidden.split(len(prompts))
        neg_p, pos_p = pooled.split(len(prompts))
    else:
        pos_h, pos_p = _encode_sdxl(comps, prompts, device)
        neg_h = torch.zeros_like(pos_h) if do_cfg else None
        neg_p = torch.zeros_like(pos_p) if do_cfg else None
    if do_cfg:
        hidden = torch.cat([_repeat(neg_h, n), _repeat(pos_h, n)])
        pooled = torch.cat([_repeat(neg_p, n), _repeat(pos_p, n)])
    else:
        hidden, pooled = _repeat(pos_h, n), _repeat(pos_p, n)
    return Conditioning(hidden.to(dtype), pooled.to(dtype), time_ids)
