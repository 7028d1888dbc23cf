"""Tiny random diffusers UNet2DModels (with and without attention) and DDPM/DDIM pipeline folders,
shared by test_unet_2d, test_pixel_engine and the export test."""

from pathlib import Path

import torch

from model_utils import randomize_

# Two tiny layouts: attention blocks (2 heads, mid attention, DDPM's legacy time embedding and
# downsampling) and none at all (add_attention=False, 3 levels, own time_embedding_dim).
TINY = {
    "attn": dict(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                 down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                 layers_per_block=1, norm_num_groups=8, norm_eps=1e-6, attention_head_dim=16, flip_sin_to_cos=False,
                 freq_shift=1, downsample_padding=0, mid_block_scale_factor=1.25),
    "plain": dict(sample_size=(8, 12), in_channels=3, out_channels=3, block_out_channels=(8, 16, 16),
                  down_block_types=("DownBlock2D",) * 3, up_block_types=("UpBlock2D",) * 3, layers_per_block=2,
                  norm_num_groups=4, add_attention=False, attention_head_dim=None, time_embedding_dim=40),
}
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                 clip_sample=True, variance_type="fixed_small")


def diffusers_unet(kind: str, seed: int = 0):
    from diffusers import UNet2DModel

    unet = UNet2DModel(**TINY[kind]).eval()
    randomize_(unet, seed)
    return unet


def save_pipeline(kind: str, root: Path, *, pipeline: str = "DDPMPipeline", seed: int = 0) -> Path:
    """A diffusers DDPM/DDIM pipeline folder (model_index.json, unet/, scheduler/) written by diffusers."""
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler

    unet = diffusers_unet(kind, seed)
    if pipeline == "DDPMPipeline":
        pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(**SCHEDULER))
    else:
        pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler(**{k: v for k, v in SCHEDULER.items()
                                                                  if k != "variance_type"}))
    path = Path(root) / f"{kind}-{pipeline}"
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def unet_inputs(kind: str, batch: int = 2, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    size = TINY[kind]["sample_size"]
    h, w = (size, size) if isinstance(size, int) else size
    x = torch.randn(batch, TINY[kind]["in_channels"], h, w, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    return x, t
