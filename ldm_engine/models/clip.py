"""CLIP text encoders: CLIP ViT-L/14 (SD1.x, SDXL's first encoder), OpenCLIP ViT-H (SD2.x,
SD-Turbo, run as 23 layers) and OpenCLIP ViT-bigG with projection (SDXL's second encoder).

Parameter names follow the published transformers checkpoints (``text_model.*``,
``text_projection.weight``). Pre-LayerNorm transformer with causal self-attention.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class CLIPTextConfig:
    """transformers' CLIPTextConfig keys; defaults are transformers' defaults."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    pad_token_id: int = 1

    def __post_init__(self):
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (use one of {sorted(_ACTIVATIONS)})")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers",
                     "num_attention_heads", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        if not isinstance(self.eos_token_id, int) or isinstance(self.eos_token_id, bool):
            raise ValueError(f"eos_token_id must be an int, got {self.eos_token_id!r}")

    @classmethod
    def from_dict(cls, d: dict) -> CLIPTextConfig:
        """From a config.json dict; unknown keys are ignored. A full CLIPConfig (with
        "text_config") gives its text part."""
        if not isinstance(d, dict):
            raise TypeError(f"config must be a dict, got {type(d).__name__}")
        if "hidden_size" not in d and isinstance(d.get("text_config"), dict):
            d = d["text_config"]
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known and v is not None}
        if isinstance(kwargs.get("eos_token_id"), list) and len(kwargs["eos_token_id"]) == 1:
            kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str | Path) -> CLIPTextConfig:
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    # OpenAI CLIP's sigmoid approximation of GELU (CLIP-L was trained with it).
    return x * torch.sigmoid(1.702 * x)


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


_ACTIVATIONS = {
    "quick_gelu": _quick_gelu,
    "gelu": F.gelu,  # exact (erf) GELU: OpenCLIP ViT-H / bigG
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
}


class CLIPTextOutput(NamedTuple):
    last_hidden_state: torch.Tensor          # (N, L, hidden) after final_layer_norm
    penultimate_hidden_state: torch.Tensor   # (N, L, hidden) output of the second-to-last layer, no final LN
    pooled: torch.Tensor                     # (N, hidden) or (N, projection_dim): the EOS token's final state


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        # No position_ids buffer: a non-persistent buffer would stay on "meta" after assign-loading.
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(input_ids) + self.position_embedding.weight[: input_ids.shape[1]]


class CLIPAttention(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        width = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, width = x.shape
        heads = (n, length, self.num_heads, width // self.num_heads)
        q = self.q_proj(x).view(heads).transpose(1, 2)
        k = self.k_proj(x).view(heads).transpose(1, 2)
        v = self.v_proj(x).view(heads).transpose(1, 2)
        # Causal: each token sees itself and the tokens before it (the project's attention op is not causal).
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(out.transpose(1, 2).reshape(n, length, width))


class CLIPMLP(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.activation = _ACTIVATIONS[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.self_attn = CLIPAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers))


class CLIPTextTransformer(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class CLIPTextModel(nn.Module):
    """CLIP text tower; ``with_projection=True`` adds ``text_projection`` (transformers'
    CLIPTextModelWithProjection, whose ``text_embeds`` is our ``pooled``)."""

    def __init__(self, config: CLIPTextConfig, with_projection: bool = False):
        super().__init__()
        if not isinstance(config, CLIPTextConfig):
            raise TypeError(f"config must be a CLIPTextConfig, got {type(config).__name__}")
        self.config = config
        self.with_projection = bool(with_projection)
        self.text_model = CLIPTextTransformer(config)
        if self.with_projection:
            self.text_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)

    def forward(self, input_ids: torch.Tensor) -> CLIPTextOutput:
        """input_ids: (N, L) integer tensor, L <= max_position_embeddings (77)."""
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must have shape (batch, length) with length >= 1, got {tuple(input_ids.shape)}")
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"input_ids has {input_ids.shape[1]} tokens; this encoder takes at most "
                             f"{self.config.max_position_embeddings}")

        tm = self.text_model
        x = tm.embeddings(input_ids)
        layers = tm.encoder.layers
        # hidden_states[-2] in transformers: the input of the last layer (the embeddings when 1 layer).
        for layer in layers[:-1]:
            x = layer(x)
        penultimate = x
        x = layers[-1](x)
        last = tm.final_layer_norm(x)

        ids = input_ids.to(torch.int32)
        if self.config.eos_token_id == 2:
            # transformers' rule for configs saved before its PR #24773 (eos_token_id 2, every SD
            # checkpoint): the EOS is the largest id (49407) in the sequence, first occurrence.
            eos_position = ids.argmax(dim=-1)
        else:
            eos_position = (ids == self.config.eos_token_id).int().argmax(dim=-1)
        pooled = last[torch.arange(last.shape[0], device=last.device), eos_position.to(last.device)]
        if self.with_projection:
            pooled = self.text_projection(pooled)
        return CLIPTextOutput(last, penultimate, pooled)

    @property
    def dtype(self) -> torch.dtype:
        return self.text_model.final_layer_norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.text_model.final_layer_norm.weight.device
