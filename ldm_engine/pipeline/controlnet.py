"""ControlNet residuals for the denoising loop, each control image embedded once per generate().

The hint embedding (``ControlNetModel.embed_hint``: 8 convolutions up to the control image's full
resolution, ~15 GFLOP per 512x512 image for the SD1.5 ControlNets) depends on the control image
alone, not on the step or the guidance half. ``prepare_controls`` runs it once per ControlNet on the
un-duplicated batch; every step then passes the features to the network (``hint_features=``), with
guidance as one copy holding both halves. Networks without ``embed_hint`` (exported ONNX / TensorRT
ControlNets, whose graphs take pixels) get the pixels every step. The embedding runs eagerly, also
when the networks are compiled or replayed from CUDA graphs: once per call, it gains nothing from
either, and the graphed ControlNet takes the features as a static input like any other tensor.

Guess mode: a ``global_pool_conditions`` ControlNet under guidance sees only the conditional half and
the unconditional half gets zero residuals, as in diffusers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ldm_engine.pipeline.conditioning import Conditioning


@dataclass
class Control:
    """One ControlNet's inputs for every step of one generate()."""

    net: Any
    scale: float
    hint: dict          # {"hint_features": ...} (torch ControlNets) or {"controlnet_cond": pixels}
    cond_half: bool     # runs on the conditional half only (guess mode under guidance)


def prepare_controls(nets, hints, scales, *, do_cfg: bool, latent_size) -> list[Control]:
    """hints: one (B, 3, H, W) pixel batch per ControlNet on the device, not duplicated for guidance.
    The embedding of each (where the network has one) runs here, once."""
    controls = []
    for net, pixels, scale in zip(nets, hints, scales):
        cond_half = do_cfg and getattr(net.config, "global_pool_conditions", False)
        embed = getattr(net, "embed_hint", None)
        value = pixels if embed is None else embed(pixels, latent_size)
        if do_cfg and not cond_half:
            value = torch.cat([value, value])
        controls.append(Control(net, scale, {"controlnet_cond" if embed is None else "hint_features": value},
                                cond_half))
    return controls


def controlnet_residuals(controls: list[Control], x_in: torch.Tensor, t, cond: Conditioning):
    """(down residuals, mid residual) summed over the ControlNets, for the U-Net batch ``x_in``
    (both halves under guidance); (None, None) without ControlNets."""
    down = mid = None
    for c in controls:
        if c.cond_half:
            h = x_in.shape[0] // 2
            d, m = c.net(x_in[h:], t, cond.encoder_hidden_states[h:], **c.hint, conditioning_scale=c.scale,
                         **_rows(cond, h))
            d, m = [torch.cat([torch.zeros_like(r), r]) for r in d], torch.cat([torch.zeros_like(m), m])
        else:
            d, m = c.net(x_in, t, cond.encoder_hidden_states, **c.hint, conditioning_scale=c.scale,
                         **_rows(cond, 0))
        if down is None:
            down, mid = list(d), m
        else:  # multi-ControlNet: residuals add up
            down, mid = [a + b for a, b in zip(down, d)], mid + m
    return (None, None) if down is None else (tuple(down), mid)


def _rows(cond: Conditioning, start: int) -> dict:
    """SDXL's added conditioning from row ``start`` on (None for SD1/SD2)."""
    te, ti = cond.text_embeds, cond.time_ids
    if start:
        te, ti = (None if v is None else v[start:] for v in (te, ti))
    return {"text_embeds": te, "time_ids": ti}
