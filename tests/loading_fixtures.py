"""Tiny random-weight diffusers pipelines and an independent diffusers -> ldm/sgm key writer,
shared by tests/test_loading.py and tests/test_single_file.py.

The models keep the real structure at toy width: 3-level U-Nets with 2 resnets per level, mixed
attention / plain blocks, per-level transformer depth for SDXL, 3-level VAEs, 2-layer text
encoders with the real 49408-token vocabulary. Every parameter is randomised (LayerNorm and
GroupNorm scales too, ControlNet zero convs too) so that a swapped or dropped tensor changes
the outputs.

The ldm writer below is written from the original repositories' module layout (index
arithmetic), independently of ldm_engine/loading/checkpoint_keys.py, so that a test compares
two implementations — and diffusers' own from_single_file is a third.
"""

from __future__ import annotations

import atexit
import functools
import gzip
import json
import re
import shutil
import tempfile
from pathlib import Path

import torch

VOCAB_DIR = Path(__file__).resolve().parents[1] / "ldm_engine" / "data" / "clip"
TOL = 1e-4
_ROOT = Path(tempfile.mkdtemp(prefix="ldm_loading_tests_"))
atexit.register(shutil.rmtree, _ROOT, True)


def scratch_dir(name: str) -> Path:
    path = _ROOT / name
    path.mkdir(parents=True, exist_ok=True)
    return path


# ---- random weights and comparisons ---------------------------------------------------------

def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.dim() == 1 and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)  # norm scales
            elif p.dim() == 1:
                p.copy_(0.1 * noise)
            else:
                p.copy_(noise / p[0].numel() ** 0.5)
    return module.eval()


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    assert ours.shape == ref.shape, (tuple(ours.shape), tuple(ref.shape))
    return ((ours.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


# ---- tiny configs ---------------------------------------------------------------------------

def unet_kwargs(family: str) -> dict:
    common = dict(block_out_channels=(32, 64, 64), layers_per_block=2, norm_num_groups=8, sample_size=16)
    if family == "sd1":
        return dict(common, cross_attention_dim=32, attention_head_dim=8,
                    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    if family == "sd2":
        return dict(common, cross_attention_dim=32, attention_head_dim=(2, 4, 4), use_linear_projection=True,
                    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    # SDXL: context = TE1 (32) + TE2 (48) = 80; pooled TE2 projection (40) + 6 time ids x 8 = 88.
    # The two encoders differ in width as in the real model (diffusers tells them apart by width).
    return dict(common, cross_attention_dim=80, attention_head_dim=(2, 4, 4), use_linear_projection=True,
                transformer_layers_per_block=(1, 1, 2), addition_embed_type="text_time",
                addition_time_embed_dim=8, projection_class_embeddings_input_dim=88,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))


def make_unet(family: str, seed: int):
    from diffusers import UNet2DConditionModel
    return randomize_(UNet2DConditionModel(**unet_kwargs(family)), seed)


def make_vae(seed: int):
    from diffusers import AutoencoderKL
    vae = AutoencoderKL(block_out_channels=(16, 32, 32), layers_per_block=2, norm_num_groups=8, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        sample_size=32)
    return randomize_(vae, seed)


def make_text_encoder(act: str, seed: int, *, projection: bool = False, hidden: int = 32, projection_dim: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=hidden + 5, num_attention_heads=4,
                         num_hidden_layers=2, max_position_embeddings=77, hidden_act=act,
                         projection_dim=projection_dim,
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)
    return randomize_(model, seed)


def make_controlnet(family: str, seed: int):
    from diffusers import ControlNetModel
    kwargs = {k: v for k, v in unet_kwargs(family).items() if k not in ("up_block_types", "sample_size")}
    return randomize_(ControlNetModel(conditioning_embedding_out_channels=(8, 16, 16, 32), **kwargs), seed)


def write_tokenizer(folder: Path, pad_token: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        with gzip.open(VOCAB_DIR / f"{name}.gz", "rb") as src:
            (folder / name).write_bytes(src.read())
    cfg = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
           "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
           "pad_token": pad_token}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return folder


def hf_tokenizer(pad_token: str):
    from transformers import CLIPTokenizer
    return CLIPTokenizer.from_pretrained(write_tokenizer(scratch_dir(f"tok-{ord(pad_token[0])}"), pad_token))


SEEDS = {"sd1": 100, "sd2": 200, "sdxl": 300}


@functools.lru_cache(maxsize=None)
def tiny_pipeline(family: str):
    """A diffusers pipeline object (cached per process)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    seed = SEEDS[family]
    scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       timestep_spacing="trailing", steps_offset=1)
    if family in ("sd1", "sd2"):
        return StableDiffusionPipeline(
            unet=make_unet(family, seed), vae=make_vae(seed + 1),
            text_encoder=make_text_encoder("quick_gelu" if family == "sd1" else "gelu", seed + 2),
            tokenizer=hf_tokenizer("<|endoftext|>" if family == "sd1" else "!"), scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return StableDiffusionXLPipeline(
        unet=make_unet("sdxl", seed), vae=make_vae(seed + 1),
        text_encoder=make_text_encoder("quick_gelu", seed + 2),
        text_encoder_2=make_text_encoder("gelu", seed + 3, projection=True, hidden=48, projection_dim=40),
        tokenizer=hf_tokenizer("<|endoftext|>"), tokenizer_2=hf_tokenizer("!"), scheduler=scheduler)


@functools.lru_cache(maxsize=None)
def tiny_pipeline_folder(family: str) -> Path:
    path = scratch_dir(f"pipe-{family}")
    tiny_pipeline(family).save_pretrained(path, safe_serialization=True)
    return path


@functools.lru_cache(maxsize=None)
def tiny_controlnet(family: str):
    return make_controlnet(family, 400 if family == "sd1" else 500)


@functools.lru_cache(maxsize=None)
def tiny_controlnet_folder(family: str) -> Path:
    path = scratch_dir(f"controlnet-{family}")
    tiny_controlnet(family).save_pretrained(path, safe_serialization=True)
    return path


# ---- comparisons ------------------------------------------------------------------------------

def assert_same_weights(ours: torch.nn.Module, ref: torch.nn.Module, *, cast=None):
    """Exact equality of every tensor (our keys are diffusers' / published transformers' keys;
    transformers >= 5.6 CLIPTextModel drops the text_model. prefix)."""
    def canonical(state):
        return {("text_model." + k if k.startswith(("embeddings.", "encoder.", "final_layer_norm.")) else k): v
                for k, v in state.items() if not k.endswith("position_ids")}

    got, want = canonical(ours.state_dict()), canonical(ref.state_dict())
    assert set(got) == set(want), sorted(set(got) ^ set(want))[:10]
    for k, v in want.items():
        v = v if cast is None else v.to(cast).to(got[k].dtype)
        assert torch.equal(got[k], v), k


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def unet_inputs(family: str, seed: int = 0):
    g = _gen(seed)
    width = unet_kwargs(family)["cross_attention_dim"]
    x = torch.randn(2, 4, 12, 20, generator=g)
    t = torch.tensor([3.0, 721.0])
    ctx = torch.randn(2, 7, width, generator=g)
    extra = {}
    if family == "sdxl":
        extra = {"text_embeds": torch.randn(2, 40, generator=g),
                 "time_ids": torch.tensor([[64.0, 96, 0, 0, 64, 96], [80, 80, 4, 8, 64, 64]])}
    return x, t, ctx, extra


@torch.no_grad()
def assert_unet_matches(ours, ref, family: str, tol: float = TOL):
    x, t, ctx, extra = unet_inputs(family)
    want = ref(x, t, ctx, added_cond_kwargs=extra or None).sample
    got = ours(x, t, ctx, **extra)
    err = rel_err(got, want)
    assert err <= tol, f"unet rel err {err:.3g}"


@torch.no_grad()
def assert_vae_matches(ours, ref, tol: float = TOL):
    g = _gen(1)
    image = torch.rand(1, 3, 24, 40, generator=g) * 2 - 1
    dist = ref.encode(image).latent_dist
    mean, logvar = ours.encode(image)
    assert rel_err(mean, dist.mean) <= tol
    assert rel_err(logvar, dist.logvar) <= tol
    z = torch.randn(1, 4, 6, 10, generator=g)
    err = rel_err(ours.decode(z), ref.decode(z).sample)
    assert err <= tol, f"vae decode rel err {err:.3g}"


@torch.no_grad()
def assert_text_encoder_matches(ours, ref, tol: float = TOL):
    ids = torch.randint(0, 49406, (2, 77), generator=_gen(2))
    ids[:, 0] = 49406
    ids[0, 9], ids[1, 30] = 49407, 49407
    out = ref(ids, output_hidden_states=True)
    got = ours(ids)
    assert rel_err(got.last_hidden_state, out.last_hidden_state) <= tol
    assert rel_err(got.penultimate_hidden_state, out.hidden_states[-2]) <= tol
    pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
    assert rel_err(got.pooled, pooled) <= tol


@torch.no_grad()
def assert_controlnet_matches(ours, ref, family: str, tol: float = TOL):
    x, t, ctx, extra = unet_inputs(family, seed=3)
    hint = torch.rand(2, 3, 12 * 8, 20 * 8, generator=_gen(4))
    down, mid = ref(x, t, ctx, controlnet_cond=hint, added_cond_kwargs=extra or None, return_dict=False)
    got_down, got_mid = ours(x, t, ctx, hint, **extra)
    assert len(got_down) == len(down)
    for a, b in zip(got_down, down):
        assert rel_err(a, b) <= tol
    assert rel_err(got_mid, mid) <= tol


# ---- diffusers -> ldm / sgm (the original repositories' names) ---------------------------------

_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
           ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]


def _resnet_rest(rest: str) -> str:
    for new, old in _RESNET:
        if rest.startswith(new + "."):
            return old + rest[len(new):]
    raise KeyError(rest)


def unet_to_ldm(state: dict, config: dict, *, controlnet: bool = False) -> dict:
    """diffusers U-Net (or ControlNet) state dict -> ldm names (no prefix). In ldm, input block
    0 is conv_in and level i's resnet j is input block 1 + i*(L+1) + j, its downsampler the
    (L+1)-th; output block i*(L+1) + j holds up level i's resnet j (L+1 per level), the
    upsampler sitting after the attention if the level has one."""
    L = config["layers_per_block"]
    up_attn = ["Attn" in t for t in config.get("up_block_types", ())]
    hint_blocks = 2 * (len(config.get("conditioning_embedding_out_channels", ())) - 1)
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
             "controlnet_mid_block": "middle_block_out.0",
             "controlnet_cond_embedding.conv_in": "input_hint_block.0",
             "controlnet_cond_embedding.conv_out": f"input_hint_block.{2 * hint_blocks + 2}"}
    out = {}
    for key, value in state.items():
        module, param = key.rsplit(".", 1)
        if module in fixed:
            out[f"{fixed[module]}.{param}"] = value
            continue
        if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            idx = 1 + i * (L + 1) + j
            new = f"input_blocks.{idx}.0.{_resnet_rest(rest)}" if kind == "resnets" else f"input_blocks.{idx}.1.{rest}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", key):
            new = f"input_blocks.{1 + int(m[1]) * (L + 1) + L}.0.op.{m[2]}"
        elif m := re.fullmatch(r"mid_block\.resnets\.(\d)\.(.+)", key):
            new = f"middle_block.{2 * int(m[1])}.{_resnet_rest(m[2])}"
        elif m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
            new = f"middle_block.1.{m[1]}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            idx = i * (L + 1) + j
            new = f"output_blocks.{idx}.0.{_resnet_rest(rest)}" if kind == "resnets" else f"output_blocks.{idx}.1.{rest}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", key):
            i = int(m[1])
            new = f"output_blocks.{i * (L + 1) + L}.{2 if up_attn[i] else 1}.conv.{m[2]}"
        elif m := re.fullmatch(r"controlnet_down_blocks\.(\d+)\.(\w+)", key):
            new = f"zero_convs.{m[1]}.0.{m[2]}"
        elif m := re.fullmatch(r"controlnet_cond_embedding\.blocks\.(\d+)\.(\w+)", key):
            new = f"input_hint_block.{2 * int(m[1]) + 2}.{m[2]}"
        else:
            raise KeyError(f"no ldm name for {key}")
        out[new] = value
    return out


def vae_to_ldm(state: dict, num_levels: int) -> dict:
    out = {}
    for key, value in state.items():
        new = key
        if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            new = f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", key):
            new = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            new = f"decoder.up.{num_levels - 1 - int(m[1])}.block.{m[2]}.{m[3]}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", key):
            new = f"decoder.up.{num_levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.+)", key):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(\w+)(\.0)?\.(\w+)", key):
            name = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}[m[2]]
            new = f"{m[1]}.mid.attn_1.{name}.{m[4]}"
            if value.dim() == 2:  # ldm's attention projections are 1x1 convolutions
                value = value[:, :, None, None]
        elif m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(\w+)", key):
            new = f"{m[1]}.norm_out.{m[2]}"
        new = new.replace("conv_shortcut", "nin_shortcut")
        out[new] = value
    return out


def clip_to_ldm(state: dict) -> dict:
    """transformers CLIP (any version) -> the names inside ``cond_stage_model.transformer.``."""
    return {k if k.startswith("text_model.") else "text_model." + k: v for k, v in state.items()
            if not k.endswith("position_ids")}


def clip_to_open_clip(state: dict, *, extra_layer: bool, seed: int = 7) -> dict:
    """transformers CLIP -> open_clip text-tower names. ``extra_layer``: append one more resblock
    (random), as SD2 files hold the full 24-layer tower of which the model uses 23."""
    state = {k.removeprefix("text_model."): v for k, v in state.items() if not k.endswith("position_ids")}
    out = {}
    layers = sorted({int(m[1]) for k in state if (m := re.match(r"encoder\.layers\.(\d+)\.", k))})
    for n in layers:
        p = f"encoder.layers.{n}."
        r = f"transformer.resblocks.{n}."
        out[r + "attn.in_proj_weight"] = torch.cat([state[f"{p}self_attn.{x}_proj.weight"] for x in "qkv"])
        out[r + "attn.in_proj_bias"] = torch.cat([state[f"{p}self_attn.{x}_proj.bias"] for x in "qkv"])
        for ours, theirs in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                             ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
            for param in ("weight", "bias"):
                out[f"{r}{theirs}.{param}"] = state[f"{p}{ours}.{param}"]
    out["token_embedding.weight"] = state["embeddings.token_embedding.weight"]
    out["positional_embedding"] = state["embeddings.position_embedding.weight"]
    out["ln_final.weight"] = state["final_layer_norm.weight"]
    out["ln_final.bias"] = state["final_layer_norm.bias"]
    hidden = out["ln_final.weight"].shape[0]
    g = torch.Generator().manual_seed(seed)
    device = out["ln_final.weight"].device  # meta for the real-size mapping checks

    def random(*shape):
        return torch.empty(shape, device="meta") if device.type == "meta" else torch.randn(shape, generator=g)

    if "text_projection.weight" in state:
        out["text_projection"] = state["text_projection.weight"].t().contiguous()
    else:  # SD2 stores a projection it does not use
        out["text_projection"] = random(hidden, hidden)
    out["logit_scale"] = torch.tensor(4.6)
    if extra_layer:
        n = len(layers)
        template = {k[len(f"transformer.resblocks.{n - 1}."):]: v for k, v in out.items()
                    if k.startswith(f"transformer.resblocks.{n - 1}.")}
        for k, v in template.items():
            out[f"transformer.resblocks.{n}.{k}"] = random(*v.shape)
    return out


def _prefixed(prefix: str, state: dict) -> dict:
    return {prefix + k: v.contiguous() for k, v in state.items()}


def pipeline_to_single_file(family: str, *, sd2_prefix: str = "cond_stage_model.model.") -> dict:
    """The tiny pipeline of ``family`` as one original-layout state dict, plus the kind of
    extras real files carry (schedule buffers, EMA bookkeeping, stale position ids)."""
    pipe = tiny_pipeline(family)
    unet_cfg = dict(pipe.unet.config)
    sd = _prefixed("model.diffusion_model.", unet_to_ldm(pipe.unet.state_dict(), unet_cfg))
    sd.update(_prefixed("first_stage_model.", vae_to_ldm(pipe.vae.state_dict(), len(pipe.vae.config.block_out_channels))))
    te = pipe.text_encoder.state_dict()
    if family == "sd1":
        sd.update(_prefixed("cond_stage_model.transformer.", clip_to_ldm(te)))
        sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    elif family == "sd2":
        sd.update(_prefixed(sd2_prefix, clip_to_open_clip(te, extra_layer=True)))
    else:
        sd.update(_prefixed("conditioner.embedders.0.transformer.", clip_to_ldm(te)))
        sd.update(_prefixed("conditioner.embedders.1.model.",
                            clip_to_open_clip(pipe.text_encoder_2.state_dict(), extra_layer=False)))
    sd["alphas_cumprod"] = torch.linspace(0.999, 0.01, 1000)
    sd["model_ema.decay"] = torch.tensor(0.9999)
    sd["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    return sd


def controlnet_to_single_file(family: str, prefix: str = "control_model.") -> dict:
    net = tiny_controlnet(family)
    return _prefixed(prefix, unet_to_ldm(net.state_dict(), dict(net.config), controlnet=True))
