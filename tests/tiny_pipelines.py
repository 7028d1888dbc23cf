"""Tiny random-weight diffusers pipelines saved to disk, for tests that compare ldm_engine with diffusers.

    from tiny_pipelines import tiny_pipeline       # tests/ is on sys.path under pytest
    path = tiny_pipeline("sd-turbo", tmp_root)      # builds once, returns the folder
    path = tiny_pipeline("controlnet-sd", tmp_root)  # a ControlNet folder (config.json + weights)

Kinds (pipelines): "sd15" (CLIP-L style text encoder, PNDM), "sd-turbo" (SD2 style: gelu text encoder,
pad "!", linear projections, Euler trailing), "sdxl" (two text encoders, Euler leading), "sdxl-turbo"
(Euler ancestral trailing), "sd15-inpaint" / "sdxl-inpaint" (9-channel inpainting U-Nets). ControlNets:
"controlnet-sd", "controlnet-sd-2" (another seed), "controlnet-sdxl". Weights come from fixed seeds, so a
kind is the same model in every run.

Every model is tiny (block_out_channels (32, 64), 2-level VAE: 32x32 px images -> 16x16 latents) but
keeps the real structure: text encoders have the real 49408-token vocabulary, and the tokenizer
folders hold the standard CLIP vocab shipped with ldm_engine (vocab.json, merges.txt), so
transformers and ldm_engine tokenise identically. ControlNet zero-convolutions get random weights,
otherwise a fresh ControlNet would add exactly nothing and tests could not fail.
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import torch

VOCAB_DIR = Path(__file__).resolve().parents[1] / "ldm_engine" / "data" / "clip"
PIPELINE_KINDS = ("sd15", "sd-turbo", "sdxl", "sdxl-turbo", "sd15-inpaint", "sdxl-inpaint")
CONTROLNET_KINDS = ("controlnet-sd", "controlnet-sd-2", "controlnet-sdxl")

_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
              prediction_type="epsilon", steps_offset=1, trained_betas=None, clip_sample=False,
              set_alpha_to_one=False, skip_prk_steps=True, sample_max_value=1.0)
SCHEDULERS = {
    "sd15": dict(_BETAS, _class_name="PNDMScheduler"),
    "sd-turbo": dict(_BETAS, _class_name="EulerDiscreteScheduler", timestep_spacing="trailing",
                     interpolation_type="linear", use_karras_sigmas=False, timestep_type="discrete"),
    "sdxl": dict(_BETAS, _class_name="EulerDiscreteScheduler", timestep_spacing="leading",
                 interpolation_type="linear", use_karras_sigmas=False),
    "sdxl-turbo": dict(_BETAS, _class_name="EulerAncestralDiscreteScheduler", timestep_spacing="trailing"),
}
SCHEDULERS["sd15-inpaint"], SCHEDULERS["sdxl-inpaint"] = SCHEDULERS["sd15"], SCHEDULERS["sdxl"]
_SEEDS = {"sd15": 10, "sd15-inpaint": 11, "sdxl-inpaint": 31, "sd-turbo": 20, "sdxl": 30, "sdxl-turbo": 40,
          "controlnet-sd": 50, "controlnet-sd-2": 51, "controlnet-sdxl": 60}


def write_tokenizer(folder: Path, pad_token: str) -> None:
    """The shipped CLIP vocab as a transformers/diffusers tokenizer folder (no tokenizer.json)."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for name in ("vocab.json", "merges.txt"):
        with gzip.open(VOCAB_DIR / f"{name}.gz", "rb") as src:
            (folder / name).write_bytes(src.read())
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
              "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
              "pad_token": pad_token}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}, indent=2))


def _hf_tokenizer(pad_token: str, tmp: Path):
    from transformers import CLIPTokenizer

    write_tokenizer(tmp, pad_token)
    return CLIPTokenizer.from_pretrained(tmp)


def _text_encoder(hidden: int, *, act: str, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden + 5,
                         num_attention_heads=4, num_hidden_layers=3, max_position_embeddings=77,
                         hidden_act=act, bos_token_id=0, eos_token_id=2, pad_token_id=1,
                         projection_dim=hidden, layer_norm_eps=1e-5)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def _vae(scaling_factor: float, force_upcast: bool):
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, norm_num_groups=32, sample_size=32,
                         scaling_factor=scaling_factor, force_upcast=force_upcast).eval()


def _unet_kwargs(kind: str) -> dict:
    common = dict(block_out_channels=(32, 64), layers_per_block=2, in_channels=4, norm_num_groups=32,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"))
    if kind in ("sd15", "sd15-inpaint"):
        channels = 9 if kind == "sd15-inpaint" else 4  # inpainting: latents + mask + masked-image latents
        return dict(common, cross_attention_dim=32, attention_head_dim=8, in_channels=channels)
    if kind == "sd-turbo":
        return dict(common, cross_attention_dim=32, attention_head_dim=(2, 4), use_linear_projection=True)
    # SDXL: time ids (6 x 8) + pooled TE2 (32) = 80
    if kind == "sdxl-inpaint":
        common = dict(common, in_channels=9)
    return dict(common, cross_attention_dim=64, attention_head_dim=(2, 4), use_linear_projection=True,
                transformer_layers_per_block=(1, 2), addition_embed_type="text_time",
                addition_time_embed_dim=8, projection_class_embeddings_input_dim=80)


def _build_pipeline(kind: str, path: Path) -> None:
    from diffusers import (EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, PNDMScheduler,
                           StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel)

    torch.manual_seed(_SEEDS[kind])
    sched_cls = {"PNDMScheduler": PNDMScheduler, "EulerDiscreteScheduler": EulerDiscreteScheduler,
                 "EulerAncestralDiscreteScheduler": EulerAncestralDiscreteScheduler}
    sched_cfg = dict(SCHEDULERS[kind])
    scheduler = sched_cls[sched_cfg.pop("_class_name")].from_config(sched_cfg)
    unet = UNet2DConditionModel(sample_size=16, up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                **_unet_kwargs(kind)).eval()
    tmp = path.parent / f".{path.name}-tok"
    if kind in ("sd15", "sd-turbo", "sd15-inpaint"):
        sd15 = kind != "sd-turbo"
        pipe = StableDiffusionPipeline(
            vae=_vae(0.18215, force_upcast=not sd15), unet=unet, scheduler=scheduler,
            text_encoder=_text_encoder(32, act="quick_gelu" if sd15 else "gelu"),
            tokenizer=_hf_tokenizer("<|endoftext|>" if sd15 else "!", tmp),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.save_pretrained(path)
        write_tokenizer(path / "tokenizer", "<|endoftext|>" if sd15 else "!")
    else:
        pipe = StableDiffusionXLPipeline(
            vae=_vae(0.13025, force_upcast=True), unet=unet, scheduler=scheduler,
            text_encoder=_text_encoder(32, act="quick_gelu"),
            text_encoder_2=_text_encoder(32, act="gelu", projection=True),
            tokenizer=_hf_tokenizer("<|endoftext|>", tmp), tokenizer_2=_hf_tokenizer("!", tmp.with_name(tmp.name + "2")),
            force_zeros_for_empty_prompt=True)
        pipe.save_pretrained(path)
        write_tokenizer(path / "tokenizer", "<|endoftext|>")
        write_tokenizer(path / "tokenizer_2", "!")
    for t in (tmp, tmp.with_name(tmp.name + "2")):
        shutil.rmtree(t, ignore_errors=True)


def _build_controlnet(kind: str, path: Path) -> None:
    from diffusers import ControlNetModel

    torch.manual_seed(_SEEDS[kind])
    unet_kind = "sdxl" if kind == "controlnet-sdxl" else "sd15"
    net = ControlNetModel(conditioning_embedding_out_channels=(16, 32), **_unet_kwargs(unet_kind)).eval()
    with torch.no_grad():  # zero-initialised outputs would make the ControlNet a no-op
        zero_init = [net.controlnet_cond_embedding.conv_out, net.controlnet_mid_block, *net.controlnet_down_blocks]
        for module in zero_init:
            module.weight.normal_(0.0, 0.3)
            module.bias.normal_(0.0, 0.1)
    net.save_pretrained(path)


def tiny_pipeline(kind: str, root) -> Path:
    """Folder of tiny model ``kind`` under ``root`` (built on first use)."""
    path = Path(root) / f"tiny-{kind}"
    if (path / ("model_index.json" if kind in PIPELINE_KINDS else "config.json")).exists():
        return path
    if kind in PIPELINE_KINDS:
        _build_pipeline(kind, path)
    elif kind in CONTROLNET_KINDS:
        _build_controlnet(kind, path)
    else:
        raise ValueError(f"unknown tiny model kind {kind!r}; choose from {PIPELINE_KINDS + CONTROLNET_KINDS}")
    return path
