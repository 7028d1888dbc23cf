"""AutoencoderKL (the SD/SDXL VAE), state-dict compatible with diffusers' ``AutoencoderKL``.

``encode`` returns the latent distribution's (mean, logvar) and ``decode`` maps latents back to
pixels; both work on *unscaled* latents (``scaling_factor`` / ``shift_factor`` are applied by the
caller). ``force_upcast`` is a hint for the caller (the SDXL VAE overflows in fp16).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ldm_engine.models.layers import (
    ConfigBase, Downsample2D, GroupNorm, ResnetBlock2D, SpatialSelfAttention, Upsample2D, require,
)

__all__ = ["VAEConfig", "AutoencoderKL", "Encoder", "Decoder"]

VAE_EPS = 1e-6  # diffusers hard-codes this eps in the VAE's norms


@dataclass
class VAEConfig(ConfigBase):
    """diffusers ``AutoencoderKL`` config.json keys (diffusers defaults)."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple = ("DownEncoderBlock2D",)
    up_block_types: tuple = ("UpDecoderBlock2D",)
    block_out_channels: tuple = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple | None = None
    latents_std: tuple | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        owner = type(self).__name__
        n = len(self.block_out_channels)
        for key, block_types, supported in (("down_block_types", self.down_block_types, "DownEncoderBlock2D"),
                                            ("up_block_types", self.up_block_types, "UpDecoderBlock2D")):
            if len(block_types) != n:
                raise ValueError(f"{owner}: {key} has {len(block_types)} entries but block_out_channels has {n}")
            for block_type in block_types:
                require(owner, key, block_type, (supported,))
        require(owner, "act_fn", self.act_fn, ("silu",))
        if isinstance(self.layers_per_block, bool) or not isinstance(self.layers_per_block, int):
            raise ValueError(f"{owner}: layers_per_block={self.layers_per_block!r} must be an int")


def _resnet(config: VAEConfig, in_ch: int, out_ch: int) -> ResnetBlock2D:
    return ResnetBlock2D(in_ch, out_ch, temb_channels=None, groups=config.norm_num_groups, eps=VAE_EPS)


class EncoderBlock(nn.Module):
    """DownEncoderBlock2D: resnets, then a stride-2 conv (right/bottom zero pad) unless last."""

    def __init__(self, config: VAEConfig, index: int):
        super().__init__()
        channels = config.block_out_channels
        in_ch, out_ch = channels[max(index - 1, 0)], channels[index]
        self.resnets = nn.ModuleList(
            _resnet(config, in_ch if j == 0 else out_ch, out_ch) for j in range(config.layers_per_block))
        last = index == len(channels) - 1
        self.downsamplers = None if last else nn.ModuleList([Downsample2D(out_ch, padding=0)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.downsamplers is None else self.downsamplers[0](x)


class DecoderBlock(nn.Module):
    """UpDecoderBlock2D: ``layers_per_block + 1`` resnets, then a 2x upsampler unless last.
    Decoder block ``index`` mirrors encoder block ``num_blocks - 1 - index``."""

    def __init__(self, config: VAEConfig, index: int):
        super().__init__()
        channels = config.block_out_channels
        n = len(channels)
        in_ch, out_ch = channels[min(n - index, n - 1)], channels[n - 1 - index]
        self.resnets = nn.ModuleList(
            _resnet(config, in_ch if j == 0 else out_ch, out_ch) for j in range(config.layers_per_block + 1))
        self.upsamplers = None if index == n - 1 else nn.ModuleList([Upsample2D(out_ch)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.upsamplers is None else self.upsamplers[0](x)


class MidBlock(nn.Module):
    """UNetMidBlock2D as the VAE uses it: resnet, single-head spatial self-attention, resnet."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        ch = config.block_out_channels[-1]
        self.resnets = nn.ModuleList([_resnet(config, ch, ch), _resnet(config, ch, ch)])
        self.attentions = None
        if config.mid_block_add_attention:
            self.attentions = nn.ModuleList(
                [SpatialSelfAttention(ch, groups=config.norm_num_groups, eps=VAE_EPS)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    """Pixels (N, in_channels, H, W) -> latent moments (N, 2 * latent_channels, H/f, W/f)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        channels = config.block_out_channels
        self.conv_in = nn.Conv2d(config.in_channels, channels[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(EncoderBlock(config, i) for i in range(len(channels)))
        self.mid_block = MidBlock(config)
        self.conv_norm_out = GroupNorm(config.norm_num_groups, channels[-1], VAE_EPS, silu=True)
        self.conv_out = nn.Conv2d(channels[-1], 2 * config.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(self.conv_norm_out(x))


class Decoder(nn.Module):
    """Latents (N, latent_channels, h, w) -> pixels (N, out_channels, h*f, w*f)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        channels = config.block_out_channels
        self.conv_in = nn.Conv2d(config.latent_channels, channels[-1], 3, padding=1)
        self.mid_block = MidBlock(config)
        self.up_blocks = nn.ModuleList(DecoderBlock(config, i) for i in range(len(channels)))
        self.conv_norm_out = GroupNorm(config.norm_num_groups, channels[0], VAE_EPS, silu=True)
        self.conv_out = nn.Conv2d(channels[0], config.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(self.conv_norm_out(x))


class AutoencoderKL(nn.Module):
    """The KL autoencoder: ``encode`` -> (mean, logvar), ``decode`` -> image."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        if not isinstance(config, VAEConfig):
            raise TypeError(f"AutoencoderKL needs a VAEConfig, got {type(config).__name__}")
        self.config = config
        latent = config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * latent, 2 * latent, 1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(latent, latent, 1) if config.use_post_quant_conv else None

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.decoder.conv_in.weight.device

    @property
    def downscale(self) -> int:
        """Pixels per latent pixel (8 for the SD/SDXL VAE)."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image (N, C, H, W), roughly in [-1, 1] -> (mean, logvar), unscaled latent moments;
        logvar is clamped to [-30, 20] like diffusers' DiagonalGaussianDistribution."""
        if x.dim() != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"encode expects (N, {self.config.in_channels}, H, W), got {tuple(x.shape)}")
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents (N, latent_channels, h, w) -> image (N, out_channels, h*f, w*f)."""
        if z.dim() != 4 or z.shape[1] != self.config.latent_channels:
            raise ValueError(f"decode expects (N, {self.config.latent_channels}, h, w), got {tuple(z.shape)}")
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)
