"""AutoencoderTiny (TAESD / TAESDXL), state-dict compatible with diffusers' ``AutoencoderTiny``.

TAESD (SD 1.x / 2.x latents) and TAESDXL (SDXL latents) are two sets of weights for one
architecture: plain 3x3 convolutions with ReLU residual blocks, no normalisation and no attention,
so none of ``ldm_engine.ops``' fused kernels (GroupNorm+SiLU, attention) apply; the convolutions
go to cuDNN. It decodes the same latents as the full VAE at about 1/50 of its FLOPs and runs fine
in fp16 (``force_upcast`` is False: the SDXL fp32 rule does not apply).

Same interface as ``ldm_engine.models.vae.AutoencoderKL`` where the pipeline touches it:
``encode(x) -> (latents, None)`` (the encoder is deterministic: no distribution, so no logvar and
no posterior sample, as diffusers' ``retrieve_latents`` for ``AutoencoderTiny``), ``decode(z)``
and ``config`` with ``latent_channels``, ``scaling_factor`` (1.0), ``shift_factor`` (0.0) and
``block_out_channels`` (the decoder's, as diffusers registers it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ldm_engine.models.layers import ConfigBase, require

__all__ = ["TinyVAEConfig", "AutoencoderTiny", "EncoderTiny", "DecoderTiny", "TAESD_CONFIG"]

_ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU, "swish": nn.SiLU, "gelu": nn.GELU, "mish": nn.Mish}


@dataclass
class TinyVAEConfig(ConfigBase):
    """diffusers ``AutoencoderTiny`` config.json keys (diffusers defaults = TAESD = TAESDXL)."""

    in_channels: int = 3
    out_channels: int = 3
    encoder_block_out_channels: tuple = (64, 64, 64, 64)
    decoder_block_out_channels: tuple = (64, 64, 64, 64)
    act_fn: str = "relu"
    upsample_fn: str = "nearest"
    latent_channels: int = 4
    upsampling_scaling_factor: int = 2
    num_encoder_blocks: tuple = (1, 3, 3, 3)
    num_decoder_blocks: tuple = (3, 3, 3, 1)
    latent_magnitude: float = 3
    latent_shift: float = 0.5
    force_upcast: bool = False
    scaling_factor: float = 1.0
    shift_factor: float = 0.0

    def __post_init__(self):
        owner = type(self).__name__
        for side in ("encoder", "decoder"):
            channels, blocks = getattr(self, f"{side}_block_out_channels"), getattr(self, f"num_{side}_blocks")
            if len(channels) != len(blocks) or not channels:
                raise ValueError(f"{owner}: {side}_block_out_channels ({len(channels)} entries) and "
                                 f"num_{side}_blocks ({len(blocks)}) must have the same, non-zero length")
            if len(set(channels)) != 1:  # each level's first conv maps its own width to itself
                raise ValueError(f"{owner}: {side}_block_out_channels={channels!r} must all be equal "
                                 "(diffusers' AutoencoderTiny has no width change between levels)")
        if len(self.encoder_block_out_channels) != len(self.decoder_block_out_channels):
            raise ValueError(f"{owner}: the encoder and the decoder must have as many levels "
                             "(the same downscale factor)")
        require(owner, "act_fn", self.act_fn, tuple(_ACTIVATIONS))
        require(owner, "upsample_fn", self.upsample_fn, ("nearest",))
        require(owner, "upsampling_scaling_factor", self.upsampling_scaling_factor, (2,))

    def to_dict(self) -> dict:
        """config.json form, with diffusers' extra keys (class name, block_out_channels): a saved
        config says which VAE it describes (ldm_engine.loading, export/runtime read it back)."""
        return dict(super().to_dict(), _class_name="AutoencoderTiny", block_out_channels=self.block_out_channels)

    @property
    def block_out_channels(self) -> tuple:
        """The decoder's channels: diffusers registers them under this name, and the pipeline reads
        the VAE factor (2 ** (levels - 1)) from it for either kind of VAE."""
        return self.decoder_block_out_channels


TAESD_CONFIG = TinyVAEConfig()  # TAESD and TAESDXL (madebyollin/taesd, madebyollin/taesdxl) share it


def _conv(c_in: int, c_out: int, *, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=bias)


class TinyBlock(nn.Module):
    """diffusers' AutoencoderTinyBlock: relu(conv(act(conv(act(conv(x))))) + skip(x))."""

    def __init__(self, c_in: int, c_out: int, act_fn: str):
        super().__init__()
        act = _ACTIVATIONS[act_fn]()
        self.conv = nn.Sequential(_conv(c_in, c_out), act, _conv(c_out, c_out), act, _conv(c_out, c_out))
        self.skip = nn.Conv2d(c_in, c_out, 1, bias=False) if c_in != c_out else nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.conv(x) + self.skip(x))


class EncoderTiny(nn.Module):
    """Pixels in [-1, 1] -> latents; level i > 0 starts with a stride-2 conv (no bias)."""

    def __init__(self, config: TinyVAEConfig):
        super().__init__()
        channels = config.encoder_block_out_channels
        layers: list[nn.Module] = []
        for i, n in enumerate(config.num_encoder_blocks):
            ch = channels[i]
            layers.append(_conv(config.in_channels, ch) if i == 0 else _conv(ch, ch, stride=2, bias=False))
            layers += [TinyBlock(ch, ch, config.act_fn) for _ in range(n)]
        layers.append(_conv(channels[-1], config.latent_channels))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x.add(1).div(2))  # TAESD works on [0, 1] images


class DecoderTiny(nn.Module):
    """Latents -> pixels in [-1, 1]: soft clamp to (-3, 3), conv + act, then per level blocks,
    a 2x nearest upsample (not after the last) and a conv (biased only in the last)."""

    def __init__(self, config: TinyVAEConfig):
        super().__init__()
        channels = config.decoder_block_out_channels
        layers: list[nn.Module] = [_conv(config.latent_channels, channels[0]), _ACTIVATIONS[config.act_fn]()]
        last = len(channels) - 1
        for i, n in enumerate(config.num_decoder_blocks):
            ch = channels[i]
            layers += [TinyBlock(ch, ch, config.act_fn) for _ in range(n)]
            if i != last:
                layers.append(nn.Upsample(scale_factor=config.upsampling_scaling_factor, mode=config.upsample_fn))
            layers.append(_conv(ch, config.out_channels if i == last else ch, bias=i == last))
        self.layers = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.layers(torch.tanh(z / 3) * 3)
        return x.mul(2).sub(1)  # [0, 1] -> [-1, 1], the diffusers convention


class AutoencoderTiny(nn.Module):
    """The tiny autoencoder: ``encode`` -> (latents, None), ``decode`` -> image in [-1, 1]."""

    latent_distribution = False  # encode() gives final latents: img2img draws no posterior sample

    def __init__(self, config: TinyVAEConfig):
        super().__init__()
        if not isinstance(config, TinyVAEConfig):
            raise TypeError(f"AutoencoderTiny needs a TinyVAEConfig, got {type(config).__name__}")
        self.config = config
        self.encoder = EncoderTiny(config)
        self.decoder = DecoderTiny(config)

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.layers[0].weight.dtype

    @property
    def device(self) -> torch.device:
        return self.decoder.layers[0].weight.device

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.config.block_out_channels) - 1)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        """Image (N, C, H, W) in [-1, 1] -> (latents, None): the latents are final (no distribution,
        hence no logvar and no posterior sample); scaling_factor 1.0 leaves them as they are."""
        if x.dim() != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"encode expects (N, {self.config.in_channels}, H, W), got {tuple(x.shape)}")
        return self.encoder(x), None

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (N, latent_channels, h, w) -> image (N, out_channels, h*f, w*f), roughly in [-1, 1]."""
        if z.dim() != 4 or z.shape[1] != self.config.latent_channels:
            raise ValueError(f"decode expects (N, {self.config.latent_channels}, h, w), got {tuple(z.shape)}")
        return self.decoder(z)
