"""ControlNet (SD1.x/2.x and SDXL), state-dict compatible with diffusers' ``ControlNetModel``.

A ControlNet is the U-Net's encoder half (``UNetEncoder``: conv_in, time embedding, down blocks,
mid block) plus a small conv network that embeds the hint image onto the latent grid and a 1x1
"zero conv" per skip tensor and for the mid block, whose outputs are the residuals the U-Net adds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ldm_engine.models.layers import require
from ldm_engine.models.unet import UNetEncoder, UNetEncoderConfig

__all__ = ["ControlNetConfig", "ControlNetConditioningEmbedding", "ControlNetModel"]


@dataclass
class ControlNetConfig(UNetEncoderConfig):
    """diffusers ``ControlNetModel`` config.json keys (the U-Net encoder keys plus these)."""

    conditioning_channels: int = 3
    controlnet_conditioning_channel_order: str = "rgb"
    conditioning_embedding_out_channels: tuple = (16, 32, 96, 256)
    global_pool_conditions: bool = False

    def validate(self) -> None:
        super().validate()
        owner = type(self).__name__
        require(owner, "controlnet_conditioning_channel_order", self.controlnet_conditioning_channel_order,
                ("rgb", "bgr"))
        if not self.conditioning_embedding_out_channels:
            raise ValueError(f"{owner}: conditioning_embedding_out_channels must list at least one width")

    @property
    def hint_downscale(self) -> int:
        """Hint pixels per latent pixel (8 for the published (16, 32, 96, 256) embedding)."""
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)


class ControlNetConditioningEmbedding(nn.Module):
    """Hint image -> latent-grid features: conv_in, pairs of (3x3 conv, stride-2 3x3 conv), each
    followed by SiLU, then conv_out to the U-Net's first block width."""

    def __init__(self, out_channels: int, in_channels: int, widths: tuple[int, ...]):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        blocks = []
        for w_in, w_out in zip(widths[:-1], widths[1:]):
            blocks += [nn.Conv2d(w_in, w_in, 3, padding=1), nn.Conv2d(w_in, w_out, 3, padding=1, stride=2)]
        self.blocks = nn.ModuleList(blocks)
        self.conv_out = nn.Conv2d(widths[-1], out_channels, 3, padding=1)

    def forward(self, hint: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.conv_in(hint))
        for conv in self.blocks:
            x = F.silu(conv(x))
        return self.conv_out(x)


class ControlNetModel(UNetEncoder):
    """See ``forward``."""

    def __init__(self, config: ControlNetConfig):
        if not isinstance(config, ControlNetConfig):
            raise TypeError(f"ControlNetModel needs a ControlNetConfig, got {type(config).__name__}")
        super().__init__(config)
        channels = config.block_out_channels
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            channels[0], config.conditioning_channels, tuple(config.conditioning_embedding_out_channels))
        # One zero conv per skip tensor of the down path: conv_in's output, one per resnet, one per downsampler.
        skip_channels = [channels[0]]
        for i, ch in enumerate(channels):
            skip_channels += [ch] * config.layers_per_block + ([ch] if i < config.num_blocks - 1 else [])
        self.controlnet_down_blocks = nn.ModuleList(nn.Conv2d(ch, ch, 1) for ch in skip_channels)
        self.controlnet_mid_block = nn.Conv2d(channels[-1], channels[-1], 1)

    def embed_hint(self, controlnet_cond: torch.Tensor, latent_size: tuple[int, int] | None = None) -> torch.Tensor:
        """(N, conditioning_channels, H, W) hint pixels in [0, 1] -> (N, block_out_channels[0], H/f, W/f)
        features (f = config.hint_downscale): the part of forward() that depends on the hint alone (channel
        order, conditioning embedding). It is the same for every denoising step and both guidance halves:
        compute it once per control image and pass it as ``forward(hint_features=...)``.
        latent_size: the (h, w) of the latents the features will meet; checked when given."""
        if controlnet_cond.dim() != 4:
            raise ValueError(f"controlnet_cond must be 4-D (N, C, H, W), got {tuple(controlnet_cond.shape)}")
        if controlnet_cond.shape[1] != self.config.conditioning_channels:
            raise ValueError(f"controlnet_cond has {controlnet_cond.shape[1]} channels, the config says "
                             f"conditioning_channels={self.config.conditioning_channels}")
        if self.config.controlnet_conditioning_channel_order == "bgr":
            controlnet_cond = torch.flip(controlnet_cond, dims=[1])
        features = self.controlnet_cond_embedding(controlnet_cond)
        if latent_size is not None and tuple(features.shape[-2:]) != tuple(latent_size):
            f = self.config.hint_downscale
            raise ValueError(f"controlnet_cond of size {tuple(controlnet_cond.shape[-2:])} embeds to "
                             f"{tuple(features.shape[-2:])}, latents are {tuple(latent_size)}: the hint must be "
                             f"{f}x the latent size")
        return features

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
                controlnet_cond: torch.Tensor | None = None, *, hint_features: torch.Tensor | None = None,
                conditioning_scale: float | torch.Tensor = 1.0, text_embeds: torch.Tensor | None = None,
                time_ids: torch.Tensor | None = None) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """sample (N, C, h, w) latents. The hint, exactly one of: controlnet_cond (N, 3, h*f, w*f) pixels in
        [0, 1], or hint_features = ``embed_hint(controlnet_cond)`` computed beforehand (N, C0, h, w).
        Returns (down residuals, mid residual), already multiplied by ``conditioning_scale``."""
        if (controlnet_cond is None) == (hint_features is None):
            given = "both" if controlnet_cond is not None else "neither"
            raise ValueError(f"pass exactly one of controlnet_cond (hint pixels) and hint_features "
                             f"(embed_hint(controlnet_cond)); got {given}")
        if sample.dim() != 4:
            raise ValueError(f"sample must be 4-D (N, C, H, W), got {tuple(sample.shape)}")
        if hint_features is None:
            hint_features = self.embed_hint(controlnet_cond, sample.shape[-2:])
        else:
            expected = (sample.shape[0], self.config.block_out_channels[0], *sample.shape[-2:])
            if tuple(hint_features.shape) != expected:
                raise ValueError(f"hint_features has shape {tuple(hint_features.shape)}, expected {expected}: "
                                 f"embed_hint() of hint pixels {self.config.hint_downscale}x the latent size, "
                                 f"one row per sample row")

        # 1. time embedding
        temb_act = F.silu(self.embed_time(sample, timestep, text_embeds, time_ids))

        # 2. pre-process: the embedded hint is added to conv_in's output
        sample = self.conv_in(sample) + hint_features

        # 3. down
        sample, skips = self.run_down(sample, temb_act, encoder_hidden_states)

        # 4. mid
        sample = self.mid_block(sample, temb_act, encoder_hidden_states)

        # 5. zero convs -> residuals, scaled (and pooled for global-pool ControlNets)
        down = [conv(s) for conv, s in zip(self.controlnet_down_blocks, skips)]
        mid = self.controlnet_mid_block(sample)
        if not (isinstance(conditioning_scale, (int, float)) and conditioning_scale == 1.0):
            down = [r * conditioning_scale for r in down]
            mid = mid * conditioning_scale
        if self.config.global_pool_conditions:
            down = [r.mean(dim=(2, 3), keepdim=True) for r in down]
            mid = mid.mean(dim=(2, 3), keepdim=True)
        return tuple(down), mid
