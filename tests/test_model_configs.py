"""The real model configs, built on the meta device: parameter counts, state-dict keys/shapes equal
to diffusers', config parsing and rejection of unsupported features."""

import json
from pathlib import Path

import pytest
import torch

import ldm_engine
from ldm_engine.models.controlnet import ControlNetConfig, ControlNetModel
from ldm_engine.models.unet import UNet2DConditionModel, UNetConfig
from ldm_engine.models.vae import AutoencoderKL, VAEConfig

PACKAGE_CONFIGS = Path(ldm_engine.__file__).resolve().parent / "configs"
SHARED_CONFIGS = Path(__file__).resolve().parents[1].parent / "shared" / "configs"

UNET = (UNetConfig, UNet2DConditionModel, "UNet2DConditionModel")
VAE = (VAEConfig, AutoencoderKL, "AutoencoderKL")
CONTROLNET = (ControlNetConfig, ControlNetModel, "ControlNetModel")

# (folder, file, kind, parameter count from shared/configs/README.md)
REAL = [
    ("sd15", "unet.json", UNET, 859_520_964),
    ("sd-turbo", "unet.json", UNET, 865_910_724),
    ("sdxl-turbo", "unet.json", UNET, 2_567_463_684),
    ("sd21-v", "unet.json", UNET, 865_910_724),  # package data only (SD2.1-768 layout = SD-Turbo's)
    ("sd15", "vae.json", VAE, 83_653_863),
    ("sd-turbo", "vae.json", VAE, 83_653_863),
    ("sdxl-turbo", "vae.json", VAE, 83_653_863),
    ("controlnet-sd15-canny", "config.json", CONTROLNET, 361_279_120),
    ("controlnet-sdxl-canny", "config.json", CONTROLNET, 1_251_014_160),
]
IDS = [f"{folder}/{name}" for folder, name, _, _ in REAL]


def load_config(folder: str, name: str) -> dict:
    """From the package data if present, else the repo's sibling shared/configs; skip otherwise."""
    for root in (PACKAGE_CONFIGS, SHARED_CONFIGS):
        path = root / folder / name
        if path.is_file():
            return json.loads(path.read_text())
    pytest.skip(f"config {folder}/{name} found neither in {PACKAGE_CONFIGS} nor in {SHARED_CONFIGS}")


def build_ours(kind, cfg: dict):
    config_cls, model_cls, _ = kind
    with torch.device("meta"):
        return model_cls(config_cls.from_dict(cfg))


@pytest.mark.parametrize("folder,name,kind,expected", REAL, ids=IDS)
def test_parameter_count(folder, name, kind, expected):
    model = build_ours(kind, load_config(folder, name))
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == expected


@pytest.mark.parametrize("folder,name,kind,expected", REAL, ids=IDS)
def test_state_dict_keys_and_shapes_equal_diffusers(folder, name, kind, expected):
    diffusers = pytest.importorskip("diffusers")
    cfg = load_config(folder, name)
    ours = build_ours(kind, cfg)
    with torch.device("meta"):
        ref = getattr(diffusers, kind[2]).from_config(cfg)
    our_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert sorted(set(our_shapes) - set(ref_shapes)) == [] and sorted(set(ref_shapes) - set(our_shapes)) == []
    assert our_shapes == ref_shapes


@pytest.mark.parametrize("folder,name,kind,expected", REAL, ids=IDS)
def test_every_real_config_key_is_a_field(folder, name, kind, expected):
    cfg = load_config(folder, name)
    fields = set(kind[0].__dataclass_fields__)
    assert sorted(k for k in cfg if not k.startswith("_") and k not in fields) == []


def test_legacy_attention_head_dim_means_heads():
    sd15 = build_ours(UNET, load_config("sd15", "unet.json"))
    attn = sd15.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    assert (attn.heads, attn.head_dim) == (8, 40)  # 320 channels / 8 heads
    turbo = build_ours(UNET, load_config("sd-turbo", "unet.json"))
    attn = turbo.up_blocks[3].attentions[0].transformer_blocks[0].attn2
    assert (attn.heads, attn.head_dim) == (5, 64)  # heads [5, 10, 20, 20], reversed for the up path
    xl = build_ours(UNET, load_config("sdxl-turbo", "unet.json"))
    assert len(xl.mid_block.attentions[0].transformer_blocks) == 10
    assert [len(b.attentions[0].transformer_blocks) for b in xl.up_blocks[:2]] == [10, 2]


def test_from_dict_ignores_unknown_keys_and_fills_defaults():
    cfg = UNetConfig.from_dict({"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.42.1",
                                "some_future_key": 1, "cross_attention_dim": 768})
    assert cfg.cross_attention_dim == 768 and cfg.in_channels == 4 and cfg.block_out_channels == (320, 640, 1280, 1280)
    cn = ControlNetConfig.from_dict(load_config("controlnet-sdxl-canny", "config.json"))
    assert cn.transformer_layers_per_block == (1, 2, 10) and cn.addition_embed_type == "text_time"


UNSUPPORTED_UNET = [
    ("class_embed_type", "timestep"),
    ("num_class_embeds", 10),
    ("addition_embed_type", "text"),
    ("encoder_hid_dim", 512),
    ("time_cond_proj_dim", 256),
    ("only_cross_attention", True),
    ("dual_cross_attention", True),
    ("resnet_time_scale_shift", "scale_shift"),
    ("time_embedding_type", "fourier"),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
    ("attention_type", "gated"),
    ("reverse_transformer_layers_per_block", ((1, 1, 1),) * 4),
    ("down_block_types", ("SimpleCrossAttnDownBlock2D",) * 4),
    ("up_block_types", ("UpBlock2D", "AttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
    ("layers_per_block", (2, 2, 2, 2)),
    ("attention_head_dim", (8, 8)),
]


@pytest.mark.parametrize("key,value", UNSUPPORTED_UNET, ids=[k for k, _ in UNSUPPORTED_UNET])
def test_unsupported_unet_features_raise_value_error_naming_the_key(key, value):
    with pytest.raises(ValueError, match=key):
        UNetConfig.from_dict({key: value})


def test_unsupported_controlnet_and_vae_features_raise():
    with pytest.raises(ValueError, match="controlnet_conditioning_channel_order"):
        ControlNetConfig.from_dict({"controlnet_conditioning_channel_order": "rgba"})
    with pytest.raises(ValueError, match="class_embed_type"):
        ControlNetConfig.from_dict({"class_embed_type": "projection"})
    with pytest.raises(ValueError, match="down_block_types"):
        VAEConfig.from_dict({"down_block_types": ["DownBlock2D"]})
    with pytest.raises(TypeError):
        UNet2DConditionModel(ControlNetConfig())
