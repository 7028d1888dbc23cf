"""Conditional U-Net (SD1.x, SD2.x / SD-Turbo, SDXL / SDXL-Turbo), state-dict compatible with
diffusers' ``UNet2DConditionModel``.

``UNetEncoder`` (conv_in, time embedding, down blocks, mid block) is the half the ControlNet
shares; ``UNet2DConditionModel`` adds the up blocks and the output head.

Naming legacy: in SD1/SD2/SDXL configs ``attention_head_dim`` is the number of heads per block
(diffusers reads it that way whenever ``num_attention_heads`` is None); the head size is
``channels // heads``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ldm_engine.models.layers import (
    ConfigBase, Downsample2D, GroupNorm, ResnetBlock2D, TimestepEmbedding, Timesteps, Transformer2D,
    Upsample2D, batch_timesteps, per_block, require,
)

__all__ = ["UNetEncoderConfig", "UNetConfig", "UNetEncoder", "UNet2DConditionModel",
           "DownBlock", "MidBlock", "UpBlock"]

CROSS_ATTN_DOWN, PLAIN_DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
CROSS_ATTN_UP, PLAIN_UP = "CrossAttnUpBlock2D", "UpBlock2D"
MID_CROSS_ATTN = "UNetMidBlock2DCrossAttn"


@dataclass
class UNetEncoderConfig(ConfigBase):
    """Keys shared by the U-Net and ControlNet configs (diffusers defaults)."""

    in_channels: int = 4
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple = (CROSS_ATTN_DOWN, CROSS_ATTN_DOWN, CROSS_ATTN_DOWN, PLAIN_DOWN)
    mid_block_type: str | None = MID_CROSS_ATTN
    only_cross_attention: bool | tuple = False
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int | None = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | tuple = 1280
    transformer_layers_per_block: int | tuple = 1
    encoder_hid_dim: int | None = None
    encoder_hid_dim_type: str | None = None
    attention_head_dim: int | tuple = 8
    num_attention_heads: int | tuple | None = None
    use_linear_projection: bool = False
    class_embed_type: str | None = None
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    num_class_embeds: int | None = None
    upcast_attention: bool | None = False  # no-op: ops.attention keeps softmax statistics in fp32
    resnet_time_scale_shift: str = "default"
    projection_class_embeddings_input_dim: int | None = None
    addition_embed_type_num_heads: int = 64  # only used by addition_embed_type "text" (unsupported)

    def __post_init__(self):
        self.validate()

    # -- per-block values (down-block order) --------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.block_out_channels)

    def heads_per_block(self) -> list[int]:
        heads = self.num_attention_heads if self.num_attention_heads is not None else self.attention_head_dim
        key = "num_attention_heads" if self.num_attention_heads is not None else "attention_head_dim"
        return per_block(type(self).__name__, key, heads, self.num_blocks)

    def transformer_layers(self) -> list[int]:
        return per_block(type(self).__name__, "transformer_layers_per_block",
                         self.transformer_layers_per_block, self.num_blocks)

    def cross_attention_dims(self) -> list[int]:
        return per_block(type(self).__name__, "cross_attention_dim", self.cross_attention_dim, self.num_blocks)

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]

    # -- validation ------------------------------------------------------------------------------
    def validate(self) -> None:
        owner = type(self).__name__
        if len(self.down_block_types) != self.num_blocks:
            raise ValueError(f"{owner}: down_block_types has {len(self.down_block_types)} entries but "
                             f"block_out_channels has {self.num_blocks}")
        for block_type in self.down_block_types:
            require(owner, "down_block_types", block_type, (CROSS_ATTN_DOWN, PLAIN_DOWN))
        require(owner, "mid_block_type", self.mid_block_type, (MID_CROSS_ATTN,))
        if isinstance(self.layers_per_block, bool) or not isinstance(self.layers_per_block, int):
            raise ValueError(f"{owner}: layers_per_block={self.layers_per_block!r} must be an int "
                             "(per-block lists are not supported)")
        only_cross = self.only_cross_attention
        require(owner, "only_cross_attention", only_cross if isinstance(only_cross, bool) else any(only_cross),
                (False,))
        require(owner, "act_fn", self.act_fn, ("silu",))
        if self.norm_num_groups is None:
            raise ValueError(f"{owner}: norm_num_groups=None (no output norm) is not supported")
        require(owner, "encoder_hid_dim", self.encoder_hid_dim, (None,))
        require(owner, "encoder_hid_dim_type", self.encoder_hid_dim_type, (None,))
        require(owner, "class_embed_type", self.class_embed_type, (None,))
        require(owner, "num_class_embeds", self.num_class_embeds, (None,))
        require(owner, "resnet_time_scale_shift", self.resnet_time_scale_shift, ("default",))
        require(owner, "addition_embed_type", self.addition_embed_type, (None, "text_time"))
        if self.addition_embed_type == "text_time":
            for key in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
                if not isinstance(getattr(self, key), int):
                    raise ValueError(f"{owner}: addition_embed_type='text_time' needs an int {key}")
        self.heads_per_block(), self.transformer_layers(), self.cross_attention_dims()


@dataclass
class UNetConfig(UNetEncoderConfig):
    """diffusers ``UNet2DConditionModel`` config.json keys."""

    sample_size: int | tuple | None = None
    out_channels: int = 4
    center_input_sample: bool = False
    up_block_types: tuple = (PLAIN_UP, CROSS_ATTN_UP, CROSS_ATTN_UP, CROSS_ATTN_UP)
    dropout: float = 0.0  # inference only: ignored
    reverse_transformer_layers_per_block: tuple | None = None
    dual_cross_attention: bool = False
    resnet_skip_time_act: bool = False
    resnet_out_scale_factor: float = 1.0
    time_embedding_type: str = "positional"
    time_embedding_dim: int | None = None
    time_embedding_act_fn: str | None = None
    timestep_post_act: str | None = None
    time_cond_proj_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    attention_type: str = "default"
    class_embeddings_concat: bool = False
    mid_block_only_cross_attention: bool | None = None
    cross_attention_norm: str | None = None

    def validate(self) -> None:
        super().validate()
        owner = type(self).__name__
        if len(self.up_block_types) != self.num_blocks:
            raise ValueError(f"{owner}: up_block_types has {len(self.up_block_types)} entries but "
                             f"block_out_channels has {self.num_blocks}")
        for block_type in self.up_block_types:
            require(owner, "up_block_types", block_type, (CROSS_ATTN_UP, PLAIN_UP))
        require(owner, "reverse_transformer_layers_per_block", self.reverse_transformer_layers_per_block, (None,))
        require(owner, "dual_cross_attention", self.dual_cross_attention, (False,))
        require(owner, "resnet_skip_time_act", self.resnet_skip_time_act, (False,))
        require(owner, "resnet_out_scale_factor", self.resnet_out_scale_factor, (1.0,))
        require(owner, "time_embedding_type", self.time_embedding_type, ("positional",))
        require(owner, "time_embedding_dim", self.time_embedding_dim, (None,))
        require(owner, "time_embedding_act_fn", self.time_embedding_act_fn, (None,))
        require(owner, "timestep_post_act", self.timestep_post_act, (None,))
        require(owner, "time_cond_proj_dim", self.time_cond_proj_dim, (None,))
        require(owner, "attention_type", self.attention_type, ("default",))
        require(owner, "class_embeddings_concat", self.class_embeddings_concat, (False,))
        require(owner, "mid_block_only_cross_attention", bool(self.mid_block_only_cross_attention), (False,))
        require(owner, "cross_attention_norm", self.cross_attention_norm, (None,))
        for key in ("conv_in_kernel", "conv_out_kernel"):
            kernel = getattr(self, key)
            if not isinstance(kernel, int) or kernel < 1 or kernel % 2 == 0:
                raise ValueError(f"{owner}: {key}={kernel!r} must be a positive odd int")


# ---------------------------------------------------------------------------------------------
# Blocks, shared with the pixel-space U-Net (models/unet_2d.py), whose configs use the same key
# names. Each block takes the config and its index, and builds its attention modules (if any)
# with ``make_attention()``: cross-attention Transformer2Ds here, self-attention in the pixel
# U-Net. Their forward passes ``*context`` (the text tokens here, nothing there) to the attention.
# ---------------------------------------------------------------------------------------------

def _transformer(config: UNetEncoderConfig, level: int) -> Transformer2D:
    """The Transformer2D of block ``level`` (down-block order; -1: the mid block)."""
    return Transformer2D(config.block_out_channels[level], config.heads_per_block()[level],
                         num_layers=config.transformer_layers()[level],
                         cross_attention_dim=config.cross_attention_dims()[level],
                         groups=config.norm_num_groups, linear_projection=config.use_linear_projection)


def _cross_attention(config: UNetEncoderConfig, level: int, block_type: str) -> Callable[[], nn.Module] | None:
    """make_attention of a block of ``block_type`` at ``level``: None for a block without attention."""
    if block_type not in (CROSS_ATTN_DOWN, CROSS_ATTN_UP):
        return None
    return functools.partial(_transformer, config, level)


def _resnet_args(config, **extra) -> dict:
    return dict(temb_channels=config.time_embed_dim, groups=config.norm_num_groups, eps=config.norm_eps, **extra)


class DownBlock(nn.Module):
    """DownBlock2D, or with ``make_attention`` CrossAttnDownBlock2D / AttnDownBlock2D:
    ``layers_per_block`` resnets, each followed by an attention module, then a stride-2
    downsampler unless last."""

    def __init__(self, config, index: int, make_attention: Callable[[], nn.Module] | None = None):
        super().__init__()
        channels = config.block_out_channels
        out_ch = channels[index]
        in_ch = channels[max(index - 1, 0)]
        self.resnets = nn.ModuleList(ResnetBlock2D(in_ch if j == 0 else out_ch, out_ch, **_resnet_args(config))
                                     for j in range(config.layers_per_block))
        self.attentions = None
        if make_attention is not None:
            self.attentions = nn.ModuleList(make_attention() for _ in range(config.layers_per_block))
        self.downsamplers = None
        if index < config.num_blocks - 1:
            self.downsamplers = nn.ModuleList([Downsample2D(out_ch, padding=config.downsample_padding)])

    def forward(self, x: torch.Tensor, temb_act: torch.Tensor, *context: torch.Tensor
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Returns the output and the skip tensors it adds for the up path."""
        skips = []
        for j, resnet in enumerate(self.resnets):
            x = resnet(x, temb_act)
            if self.attentions is not None:
                x = self.attentions[j](x, *context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    """UNetMidBlock2DCrossAttn / UNetMidBlock2D: resnet, attention (unless ``make_attention`` is
    None), resnet."""

    def __init__(self, config, make_attention: Callable[[], nn.Module] | None = None):
        super().__init__()
        ch = config.block_out_channels[-1]
        resnet = _resnet_args(config, output_scale_factor=config.mid_block_scale_factor)
        self.resnets = nn.ModuleList([ResnetBlock2D(ch, ch, **resnet), ResnetBlock2D(ch, ch, **resnet)])
        self.attentions = None if make_attention is None else nn.ModuleList([make_attention()])

    def forward(self, x: torch.Tensor, temb_act: torch.Tensor, *context: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x, temb_act)
        if self.attentions is not None:
            x = self.attentions[0](x, *context)
        return self.resnets[1](x, temb_act)


class UpBlock(nn.Module):
    """UpBlock2D, or with ``make_attention`` CrossAttnUpBlock2D / AttnUpBlock2D:
    ``layers_per_block + 1`` resnets, each on concat([x, skip]) and followed by an attention
    module; then an upsampler unless last. Up block ``index`` mirrors down block
    ``num_blocks - 1 - index``."""

    def __init__(self, config, index: int, make_attention: Callable[[], nn.Module] | None = None):
        super().__init__()
        n = config.num_blocks
        mirror = n - 1 - index
        channels = config.block_out_channels
        out_ch = channels[mirror]
        prev_ch = channels[min(mirror + 1, n - 1)]  # what the previous up block (or mid block) outputs
        skip_in_ch = channels[max(mirror - 1, 0)]  # the last skip comes from the block before the mirror
        num_layers = config.layers_per_block + 1
        self.resnets = nn.ModuleList(
            ResnetBlock2D((prev_ch if j == 0 else out_ch) + (skip_in_ch if j == num_layers - 1 else out_ch),
                          out_ch, **_resnet_args(config))
            for j in range(num_layers))
        self.attentions = None
        if make_attention is not None:
            self.attentions = nn.ModuleList(make_attention() for _ in range(num_layers))
        self.upsamplers = nn.ModuleList([Upsample2D(out_ch)]) if index < n - 1 else None

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor], temb_act: torch.Tensor, *context: torch.Tensor,
                upsample_size: tuple[int, int] | None = None) -> torch.Tensor:
        """``skips``: this block's skip tensors in down-path order (consumed last first)."""
        for j, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips[-1 - j]], dim=1), temb_act)
            if self.attentions is not None:
                x = self.attentions[j](x, *context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------

class UNetEncoder(nn.Module):
    """conv_in, time (+ SDXL text_time) embedding, down blocks and mid block."""

    def __init__(self, config: UNetEncoderConfig):
        super().__init__()
        self.config = config
        c0 = config.block_out_channels[0]
        kernel = getattr(config, "conv_in_kernel", 3)  # ControlNet configs have no such key: diffusers uses 3
        self.conv_in = nn.Conv2d(config.in_channels, c0, kernel, padding=(kernel - 1) // 2)
        self.time_proj = Timesteps(c0, config.flip_sin_to_cos, config.freq_shift)
        self.time_embedding = TimestepEmbedding(c0, config.time_embed_dim)
        self.add_time_proj = self.add_embedding = None
        if config.addition_embed_type == "text_time":
            self.add_time_proj = Timesteps(config.addition_time_embed_dim, config.flip_sin_to_cos, config.freq_shift)
            self.add_embedding = TimestepEmbedding(config.projection_class_embeddings_input_dim,
                                                   config.time_embed_dim)
        self.down_blocks = nn.ModuleList(
            DownBlock(config, i, _cross_attention(config, i, config.down_block_types[i]))
            for i in range(config.num_blocks))
        self.mid_block = MidBlock(config, functools.partial(_transformer, config, -1))

    # The engine reads .dtype / .device of its networks (exported backends' wrappers have them too).
    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv_in.weight.device

    def embed_time(self, sample: torch.Tensor, timestep, text_embeds: torch.Tensor | None,
                   time_ids: torch.Tensor | None) -> torch.Tensor:
        """Time embedding (N, 4*C0), plus the SDXL added conditioning (pooled text + 6 time ids)."""
        emb = self.time_embedding(self.time_proj(batch_timesteps(timestep, sample)).to(sample.dtype))
        if self.add_embedding is None:
            if text_embeds is not None or time_ids is not None:
                raise ValueError("text_embeds/time_ids given, but this model's config has no "
                                 "addition_embed_type='text_time' (SDXL) conditioning")
            return emb
        if text_embeds is None or time_ids is None:
            raise ValueError("this model (addition_embed_type='text_time', SDXL) needs text_embeds and time_ids")
        if text_embeds.dim() != 2 or time_ids.dim() != 2 or time_ids.shape[0] != text_embeds.shape[0]:
            raise ValueError(f"text_embeds must be (N, D) and time_ids (N, K); got {tuple(text_embeds.shape)} "
                             f"and {tuple(time_ids.shape)}")
        expected = self.add_embedding.linear_1.in_features
        got = text_embeds.shape[1] + time_ids.shape[1] * self.add_time_proj.dim
        if got != expected:
            raise ValueError(f"text_embeds dim {text_embeds.shape[1]} + {time_ids.shape[1]} time ids x "
                             f"{self.add_time_proj.dim} = {got}, but projection_class_embeddings_input_dim "
                             f"is {expected}")
        time_embeds = self.add_time_proj(time_ids.flatten()).reshape(time_ids.shape[0], -1)
        added = torch.cat([text_embeds, time_embeds.to(text_embeds.dtype)], dim=-1).to(emb.dtype)
        return emb + self.add_embedding(added)

    def run_down(self, sample: torch.Tensor, temb_act: torch.Tensor, context: torch.Tensor
                 ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Down blocks on the conv_in output; returns (output, all skip tensors incl. ``sample``)."""
        skips = [sample]
        for block in self.down_blocks:
            sample, block_skips = block(sample, temb_act, context)
            skips.extend(block_skips)
        return sample, skips


class UNet2DConditionModel(UNetEncoder):
    """The denoising U-Net; see ``forward``."""

    def __init__(self, config: UNetConfig):
        if not isinstance(config, UNetConfig):
            raise TypeError(f"UNet2DConditionModel needs a UNetConfig, got {type(config).__name__}")
        super().__init__(config)
        n = config.num_blocks
        self.up_blocks = nn.ModuleList(
            UpBlock(config, i, _cross_attention(config, n - 1 - i, config.up_block_types[i]))
            for i in range(n))
        c0 = config.block_out_channels[0]
        self.conv_norm_out = GroupNorm(config.norm_num_groups, c0, config.norm_eps, silu=True)
        k = config.conv_out_kernel
        self.conv_out = nn.Conv2d(c0, config.out_channels, k, padding=(k - 1) // 2)

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor, *,
                text_embeds: torch.Tensor | None = None, time_ids: torch.Tensor | None = None,
                down_block_additional_residuals: tuple[torch.Tensor, ...] | list | None = None,
                mid_block_additional_residual: torch.Tensor | None = None) -> torch.Tensor:
        """sample (N, C, h, w) latents; timestep 0-d or (N,); encoder_hidden_states (N, L, D).
        SDXL: text_embeds (N, 1280) pooled, time_ids (N, 6). ControlNet residuals (both or none)
        are added to the skip tensors and to the mid-block output."""
        if sample.dim() != 4:
            raise ValueError(f"sample must be (N, C, H, W), got shape {tuple(sample.shape)}")
        if encoder_hidden_states.dim() != 3:
            raise ValueError(f"encoder_hidden_states must be (N, L, D), got {tuple(encoder_hidden_states.shape)}")
        if (down_block_additional_residuals is None) != (mid_block_additional_residual is None):
            raise ValueError("ControlNet residuals: pass both down_block_additional_residuals and "
                             "mid_block_additional_residual, or neither")

        # 1. time embedding (SiLU'd once here; every resnet would apply it to its projection input)
        emb = self.embed_time(sample, timestep, text_embeds, time_ids)
        temb_act = F.silu(emb)

        # 2. pre-process
        if self.config.center_input_sample:
            sample = 2 * sample - 1.0
        sample = self.conv_in(sample)

        # 3. down
        sample, skips = self.run_down(sample, temb_act, encoder_hidden_states)
        if down_block_additional_residuals is not None:
            if len(down_block_additional_residuals) != len(skips):
                raise ValueError(f"down_block_additional_residuals has {len(down_block_additional_residuals)} "
                                 f"tensors, this U-Net has {len(skips)} skip connections")
            skips = [s + r for s, r in zip(skips, down_block_additional_residuals)]

        # 4. mid
        sample = self.mid_block(sample, temb_act, encoder_hidden_states)
        if mid_block_additional_residual is not None:
            sample = sample + mid_block_additional_residual

        # 5. up: each block takes the last len(resnets) skips; upsample to the next skip's size
        #    (differs from 2x when the latent size is not a multiple of 2**num_upsamplers)
        for block in self.up_blocks:
            n = len(block.resnets)
            skips, block_skips = skips[:-n], skips[-n:]
            upsample_size = skips[-1].shape[-2:] if block.upsamplers is not None else None
            sample = block(sample, block_skips, temb_act, encoder_hidden_states, upsample_size=upsample_size)

        # 6. post-process
        return self.conv_out(self.conv_norm_out(sample))
