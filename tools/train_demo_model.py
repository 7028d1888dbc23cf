"""Train the built-in demo model (``Engine.from_pretrained("demo")``) on the synthetic shapes data set.

    python tools/train_demo_model.py --out ldm_engine/data/demo            # the shipped model (see its README)
    python tools/train_demo_model.py --out /tmp/demo --smoke               # a few steps (CI smoke test)

Data: tools/demo_shapes.py draws "a {color} {shape} on a {color} background" images (64x64 px).
Networks: the engine's own AutoencoderKL, CLIPTextModel (the shipped CLIP vocabulary and tokenizer) and
UNet2DConditionModel, at toy size, trained in fp32 on the CPU, saved in the diffusers folder layout as
fp16 safetensors (diffusers' StableDiffusionPipeline loads the folder too).

1. VAE (64x64 px -> 16x16x4 latents): L1 + MSE reconstruction, a tiny KL weight.
2. U-Net and text encoder together: the DDPM denoising loss on the VAE's (scaled) latents of a fixed set
   of drawn images, with v-prediction on a zero-terminal-SNR schedule, so that a trailing Euler
   sampler gives clean images in 1-4 steps. Half the timesteps are drawn uniformly, half from the
   4-step trailing set {999, 749, 499, 249} (which contains the 1- and 2-step sets). 10 % of the
   captions are dropped (empty prompt) so classifier-free guidance works. The saved U-Net and text
   encoder are an exponential moving average of the weights.

Sizes were chosen for the 2-core CPU budget (about 35 minutes on one thread). GroupNorm uses few groups
(1 in the VAE, 4 in the U-Net): with one channel per group, a flat color region normalises to zero and
its color is lost, which made the VAE learn several times slower.

Deterministic given --seed (single process, fixed thread count; torch's CPU kernels are deterministic
for a fixed number of threads). The folder is rewritten every --save-every steps, so a run can be
stopped early and still leave a usable model.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import demo_shapes  # noqa: E402

VAE_CONFIG = {
    "_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 4,
    "block_out_channels": [8, 16, 32], "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3, "layers_per_block": 1, "act_fn": "silu",
    "norm_num_groups": 1, "sample_size": 64, "scaling_factor": 1.0, "force_upcast": False,
    "mid_block_add_attention": False,
}
TEXT_ENCODER_CONFIG = {
    "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": 49408,
    "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 1,
    "max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
    "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "projection_dim": 32,
}
UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel", "sample_size": 16, "in_channels": 4, "out_channels": 4,
    "block_out_channels": [16, 32, 64], "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn", "cross_attention_dim": 32, "attention_head_dim": 4,
    "norm_num_groups": 4, "use_linear_projection": True,
}
SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "steps_offset": 1,
    "interpolation_type": "linear", "use_karras_sigmas": False, "timestep_type": "discrete",
    "final_sigmas_type": "zero",
}
FEW_STEP_TIMESTEPS = (999, 749, 499, 249)
DEFAULTS = {"turbo": False, "num_inference_steps": 4, "guidance_scale": 2.0, "strength": 0.6,
            "height": 64, "width": 64}


def alphas_cumprod(n: int = 1000) -> torch.Tensor:
    """scaled_linear betas rescaled to zero terminal SNR (Lin et al. 2023), as diffusers computes them."""
    betas = torch.linspace(SCHEDULER_CONFIG["beta_start"] ** 0.5, SCHEDULER_CONFIG["beta_end"] ** 0.5, n,
                           dtype=torch.float64) ** 2
    sqrt_ac = torch.cumprod(1.0 - betas, 0).sqrt()
    first, last = sqrt_ac[0].clone(), sqrt_ac[-1].clone()
    sqrt_ac = (sqrt_ac - last) * first / (first - last)
    return (sqrt_ac ** 2).float()


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def draw_batch(rng: np.random.Generator, n: int) -> tuple[np.ndarray, list]:
    triples = [demo_shapes.random_triple(rng) for _ in range(n)]
    return np.stack([demo_shapes.draw(rng, *t) for t in triples]), triples


def build_models():
    from ldm_engine.models.clip import CLIPTextConfig, CLIPTextModel
    from ldm_engine.models.unet import UNet2DConditionModel, UNetConfig
    from ldm_engine.models.vae import AutoencoderKL, VAEConfig

    return (AutoencoderKL(VAEConfig.from_dict(VAE_CONFIG)), CLIPTextModel(CLIPTextConfig.from_dict(TEXT_ENCODER_CONFIG)),
            UNet2DConditionModel(UNetConfig.from_dict(UNET_CONFIG)))


def log(msg: str, t0: float) -> None:
    print(f"[{time.time() - t0:7.1f}s] {msg}", flush=True)


def train_vae(vae, steps: int, batch: int, rng, t0: float, lr: float = 2e-3):
    with torch.no_grad():  # start with a small posterior std: unit-variance noise would drown the latents
        vae.quant_conv.bias[vae.config.latent_channels:] = -8.0
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    vae.train()
    for step in range(steps):
        for g in opt.param_groups:  # linear warm-up, cosine decay
            g["lr"] = lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / steps))
        x = to_tensor(draw_batch(rng, batch)[0])
        mean, logvar = vae.encode(x)
        z = mean + torch.randn(mean.shape, generator=_gen(rng)) * (0.5 * logvar).exp()
        rec = vae.decode(z)
        kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).mean()
        loss = (rec - x).abs().mean() + F.mse_loss(rec, x) + 1e-5 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 25 == 0 or step == steps - 1:
            log(f"vae step {step}/{steps} loss {loss.item():.4f} (l1 {(rec - x).abs().mean().item():.4f}, "
                f"kl {kl.item():.2f})", t0)
    vae.eval()
    return vae


def _gen(rng: np.random.Generator) -> torch.Generator:
    return torch.Generator().manual_seed(int(rng.integers(2**62)))


@torch.no_grad()
def encode_dataset(vae, n: int, rng, batch: int = 128):
    latents, triples = [], []
    for i in range(0, n, batch):
        images, t = draw_batch(rng, min(batch, n - i))
        latents.append(vae.encode(to_tensor(images))[0])
        triples += t
    return torch.cat(latents), triples


def train_denoiser(unet, text_encoder, latents, prompt_ids, steps: int, batch: int, rng, t0: float,
                   lr: float = 1e-3, ema_decay: float = 0.998, save=None, save_every: int = 0,
                   stop_at: int | None = None):
    """latents: (N, 4, 16, 16) scaled; prompt_ids: (N, 77) token ids (empty-prompt ids for dropped captions
    are swapped in here)."""
    from ldm_engine.tokenizer import CLIPTokenizer

    empty_ids = CLIPTokenizer.default()([""])[0]
    ac = alphas_cumprod()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    ema_unet, ema_te = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)
    ema_params = list(ema_unet.parameters()) + list(ema_te.parameters())
    unet.train(), text_encoder.train()
    few = torch.tensor(FEW_STEP_TIMESTEPS)
    for step in range(min(steps, stop_at or steps)):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        gen = _gen(rng)
        idx = torch.randint(len(latents), (batch,), generator=gen)
        x0 = latents[idx]
        ids = prompt_ids[idx].clone()
        drop = torch.rand(batch, generator=gen) < 0.1
        ids[drop] = empty_ids
        uniform = torch.randint(1000, (batch,), generator=gen)
        t = torch.where(torch.rand(batch, generator=gen) < 0.5, uniform,
                        few[torch.randint(len(few), (batch,), generator=gen)])
        noise = torch.randn(x0.shape, generator=gen)
        a = ac[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        v = a.sqrt() * noise - (1 - a).sqrt() * x0
        pred = unet(xt, t, text_encoder(ids).last_hidden_state)
        loss = F.mse_loss(pred, v)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        if step % 25 == 0 or step == steps - 1:
            log(f"unet step {step}/{steps} loss {loss.item():.4f}", t0)
        if save is not None and save_every and (step + 1) % save_every == 0 and step + 1 < steps:
            save(ema_unet, ema_te, step + 1)
            log(f"saved at step {step + 1}", t0)
    return ema_unet.eval(), ema_te.eval()


def _state_fp16(module) -> dict:
    return {k: v.detach().to(torch.float16).contiguous() for k, v in module.state_dict().items()}


def save_folder(out: Path, unet, vae, text_encoder, scaling_factor: float, info: dict) -> None:
    """The diffusers folder layout: model_index.json, unet/ vae/ text_encoder/ tokenizer/ scheduler/."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    vae_config = dict(VAE_CONFIG, scaling_factor=round(float(scaling_factor), 5))
    for name, module, config, weights in (
            ("unet", unet, UNET_CONFIG, "diffusion_pytorch_model.safetensors"),
            ("vae", vae, vae_config, "diffusion_pytorch_model.safetensors"),
            ("text_encoder", text_encoder, TEXT_ENCODER_CONFIG, "model.safetensors")):
        (out / name).mkdir(exist_ok=True)
        (out / name / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(_state_fp16(module), str(out / name / weights), metadata={"format": "pt"})
    (out / "scheduler").mkdir(exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=2) + "\n")
    write_tokenizer(out / "tokenizer")
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
             "feature_extractor": [None, None], "safety_checker": [None, None], "requires_safety_checker": False,
             "image_encoder": [None, None],
             "scheduler": ["diffusers", "EulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "_ldm_engine_defaults": DEFAULTS, "_ldm_engine_training": info}
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_tokenizer(folder: Path) -> None:
    """The shipped CLIP vocabulary as a transformers tokenizer folder (SD1 style: pad = eos)."""
    import gzip

    from ldm_engine.tokenizer import SHIPPED_VOCAB_DIR

    folder.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        with gzip.open(SHIPPED_VOCAB_DIR / f"{name}.gz", "rb") as src:
            (folder / name).write_bytes(src.read())
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
              "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
              "pad_token": "<|endoftext|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}, indent=2) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="output folder (diffusers layout)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (fixed, for determinism)")
    p.add_argument("--vae-steps", type=int, default=1500)
    p.add_argument("--vae-batch", type=int, default=8)
    p.add_argument("--unet-steps", type=int, default=3000)
    p.add_argument("--unet-batch", type=int, default=32)
    p.add_argument("--images", type=int, default=20000, help="drawn images for the denoiser phase")
    p.add_argument("--save-every", type=int, default=250)
    p.add_argument("--stop-at", type=int, default=None,
                   help="stop the denoiser phase after this many steps (the schedules still follow --unet-steps)")
    p.add_argument("--resume", type=Path, default=None,
                   help="continue from a folder this script wrote: its VAE (no VAE phase) and its U-Net and "
                        "text encoder as the starting point of a new denoiser phase")
    p.add_argument("--smoke", action="store_true", help="a few steps of each phase (tests)")
    args = p.parse_args(argv)
    if args.smoke:
        args.vae_steps, args.vae_batch, args.unet_steps, args.unet_batch, args.images = 2, 2, 2, 4, 8
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    t0 = time.time()

    from ldm_engine.tokenizer import CLIPTokenizer

    vae, text_encoder, unet = build_models()
    counts = {n: sum(p.numel() for p in m.parameters()) for n, m in
              (("vae", vae), ("text_encoder", text_encoder), ("unet", unet))}
    log(f"parameters: {counts}", t0)
    if args.resume is not None:
        from safetensors.torch import load_file

        for name, module, weights in (("vae", vae, "diffusion_pytorch_model"), ("unet", unet, "diffusion_pytorch_model"),
                                      ("text_encoder", text_encoder, "model")):
            state = load_file(str(args.resume / name / f"{weights}.safetensors"))
            module.load_state_dict({k: v.float() for k, v in state.items()})
        vae.eval()
        log(f"resumed from {args.resume}", t0)
    else:
        train_vae(vae, args.vae_steps, args.vae_batch, rng, t0)
    vae.requires_grad_(False)
    # The fp16 round trip the shipped weights go through, before the latents are computed from them.
    vae.load_state_dict({k: v.float() for k, v in _state_fp16(vae).items()})

    latents, triples = encode_dataset(vae, args.images, rng)
    scaling_factor = 1.0 / latents.std().item()
    if args.resume is not None:  # the U-Net was trained on latents scaled by the folder's factor
        scaling_factor = json.loads((args.resume / "vae" / "config.json").read_text())["scaling_factor"]
    log(f"{len(latents)} latents {tuple(latents.shape[1:])}, std {latents.std().item():.4f} -> "
        f"scaling_factor {scaling_factor:.5f}", t0)
    prompt_ids = CLIPTokenizer.default()([demo_shapes.prompt_of(*t) for t in triples])
    info = {"seed": args.seed, "threads": args.threads, "vae_steps": args.vae_steps, "vae_batch": args.vae_batch,
            "resume": None if args.resume is None else str(args.resume), "unet_steps": args.unet_steps,
            "stop_at": args.stop_at, "unet_batch": args.unet_batch, "images": args.images, "parameters": counts}

    def save(u, te, steps_done):
        save_folder(args.out, u, vae, te, scaling_factor,
                    dict(info, minutes=round((time.time() - t0) / 60, 1), steps_done=steps_done))

    ema_unet, ema_te = train_denoiser(unet, text_encoder, latents * scaling_factor, prompt_ids,
                                      args.unet_steps, args.unet_batch, rng, t0, save=save,
                                      save_every=args.save_every, stop_at=args.stop_at)
    save(ema_unet, ema_te, min(args.unet_steps, args.stop_at or args.unet_steps))
    log(f"done: {args.out}", t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
