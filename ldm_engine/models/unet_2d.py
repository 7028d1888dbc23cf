"""Unconditional pixel-space U-Net (the DDPM paper's models: CIFAR-10, CelebA-HQ, LSUN), state-dict
compatible with diffusers' ``UNet2DModel``.

Blocks: ``DownBlock2D`` / ``AttnDownBlock2D``, ``UNetMidBlock2D`` (optionally without attention),
``UpBlock2D`` / ``AttnUpBlock2D``: the conditional U-Net's DownBlock / MidBlock / UpBlock
(models/unet.py) given self-attention instead of cross-attention; sinusoidal ("positional") timestep
embedding. The attention blocks are GroupNorm + multi-head self-attention over the H*W pixels with a
residual (diffusers' ``_from_deprecated_attn_block`` attention); ``attention_head_dim=None`` means one
head of all channels.
Unlike the conditional U-Net, the up blocks always upsample 2x (as diffusers' UNet2DModel), so the
image size must be a multiple of ``2 ** (len(block_out_channels) - 1)``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ldm_engine.models.layers import (
    ConfigBase, GroupNorm, SpatialSelfAttention, TimestepEmbedding, Timesteps, batch_timesteps, require,
)
from ldm_engine.models.unet import DownBlock, MidBlock, UpBlock

__all__ = ["UNet2DConfig", "UNet2DModel"]

PLAIN_DOWN, ATTN_DOWN = "DownBlock2D", "AttnDownBlock2D"
PLAIN_UP, ATTN_UP = "UpBlock2D", "AttnUpBlock2D"
MID = "UNetMidBlock2D"


@dataclass
class UNet2DConfig(ConfigBase):
    """diffusers ``UNet2DModel`` config.json keys (diffusers' defaults)."""

    sample_size: int | tuple | None = None
    in_channels: int = 3
    out_channels: int = 3
    center_input_sample: bool = False
    time_embedding_type: str = "positional"
    time_embedding_dim: int | None = None
    freq_shift: int = 0
    flip_sin_to_cos: bool = True
    down_block_types: tuple = (PLAIN_DOWN, ATTN_DOWN, ATTN_DOWN, ATTN_DOWN)
    mid_block_type: str | None = MID
    up_block_types: tuple = (ATTN_UP, ATTN_UP, ATTN_UP, PLAIN_UP)
    block_out_channels: tuple = (224, 448, 672, 896)
    layers_per_block: int = 2
    mid_block_scale_factor: float = 1.0
    downsample_padding: int = 1
    downsample_type: str = "conv"
    upsample_type: str = "conv"
    dropout: float = 0.0  # inference only: ignored
    act_fn: str = "silu"
    attention_head_dim: int | None = 8
    norm_num_groups: int = 32
    attn_norm_num_groups: int | None = None
    norm_eps: float = 1e-5
    resnet_time_scale_shift: str = "default"
    add_attention: bool = True
    class_embed_type: str | None = None
    num_class_embeds: int | None = None
    num_train_timesteps: int | None = None

    def __post_init__(self):
        self.validate()

    @property
    def num_blocks(self) -> int:
        return len(self.block_out_channels)

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    @property
    def size_multiple(self) -> int:
        """Image sizes must divide by this (one 2x downsampling per block but the last)."""
        return 2 ** (self.num_blocks - 1)

    def validate(self) -> None:
        owner = type(self).__name__
        n = self.num_blocks
        for key, types, supported in (("down_block_types", self.down_block_types, (PLAIN_DOWN, ATTN_DOWN)),
                                      ("up_block_types", self.up_block_types, (PLAIN_UP, ATTN_UP))):
            if len(types) != n:
                raise ValueError(f"{owner}: {key} has {len(types)} entries but block_out_channels has {n}")
            for t in types:
                require(owner, key, t, supported)
        require(owner, "mid_block_type", self.mid_block_type, (MID, None))
        if isinstance(self.layers_per_block, bool) or not isinstance(self.layers_per_block, int):
            raise ValueError(f"{owner}: layers_per_block={self.layers_per_block!r} must be an int")
        if not isinstance(self.norm_num_groups, int):
            raise ValueError(f"{owner}: norm_num_groups={self.norm_num_groups!r} must be an int")
        require(owner, "time_embedding_type", self.time_embedding_type, ("positional",))
        require(owner, "downsample_type", self.downsample_type, ("conv",))
        require(owner, "upsample_type", self.upsample_type, ("conv",))
        require(owner, "act_fn", self.act_fn, ("silu", "swish"))
        require(owner, "resnet_time_scale_shift", self.resnet_time_scale_shift, ("default",))
        require(owner, "class_embed_type", self.class_embed_type, (None,))
        require(owner, "num_class_embeds", self.num_class_embeds, (None,))


def _attention(config: UNet2DConfig, level: int, groups: int | None = None,
               rescale_output_factor: float = 1.0) -> SpatialSelfAttention:
    """The self-attention of block ``level`` (down-block order; -1: the mid block)."""
    channels = config.block_out_channels[level]
    return SpatialSelfAttention(channels, groups=groups or config.norm_num_groups, eps=config.norm_eps,
                                head_dim=config.attention_head_dim or channels,
                                rescale_output_factor=rescale_output_factor)


def _self_attention(config: UNet2DConfig, level: int, block_type: str) -> Callable[[], nn.Module] | None:
    """make_attention of a block of ``block_type`` at ``level`` (unet.DownBlock / UpBlock): None
    for DownBlock2D / UpBlock2D."""
    if block_type not in (ATTN_DOWN, ATTN_UP):
        return None
    return functools.partial(_attention, config, level)


class UNet2DModel(nn.Module):
    """``forward(sample, timestep) -> noise prediction`` for an (N, C, H, W) image in [-1, 1]."""

    def __init__(self, config: UNet2DConfig):
        super().__init__()
        if not isinstance(config, UNet2DConfig):
            raise TypeError(f"UNet2DModel needs a UNet2DConfig, got {type(config).__name__}")
        self.config = config
        c0 = config.block_out_channels[0]
        self.conv_in = nn.Conv2d(config.in_channels, c0, 3, padding=1)
        self.time_proj = Timesteps(c0, config.flip_sin_to_cos, config.freq_shift)
        self.time_embedding = TimestepEmbedding(c0, config.time_embed_dim)
        n = config.num_blocks
        self.down_blocks = nn.ModuleList(DownBlock(config, i, _self_attention(config, i, config.down_block_types[i]))
                                         for i in range(n))
        self.mid_block = None
        if config.mid_block_type is not None:
            mid_attention = functools.partial(_attention, config, -1, config.attn_norm_num_groups,
                                              config.mid_block_scale_factor) if config.add_attention else None
            self.mid_block = MidBlock(config, mid_attention)
        self.up_blocks = nn.ModuleList(UpBlock(config, i, _self_attention(config, n - 1 - i, config.up_block_types[i]))
                                       for i in range(n))
        self.conv_norm_out = GroupNorm(config.norm_num_groups, c0, config.norm_eps, silu=True)
        self.conv_out = nn.Conv2d(c0, config.out_channels, 3, padding=1)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv_in.weight.device

    def forward(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        """sample (N, C, H, W), H and W multiples of ``config.size_multiple``; timestep 0-d, (1,) or (N,)."""
        if sample.dim() != 4:
            raise ValueError(f"sample must be (N, C, H, W), got shape {tuple(sample.shape)}")
        t = batch_timesteps(timestep, sample)
        temb_act = F.silu(self.time_embedding(self.time_proj(t).to(self.dtype)))

        if self.config.center_input_sample:
            sample = 2 * sample - 1.0
        x = self.conv_in(sample)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, temb_act)
            skips.extend(block_skips)
        if self.mid_block is not None:
            x = self.mid_block(x, temb_act)
        for block in self.up_blocks:
            n = len(block.resnets)
            skips, block_skips = skips[:-n], skips[-n:]
            x = block(x, block_skips, temb_act)
        return self.conv_out(self.conv_norm_out(x))
