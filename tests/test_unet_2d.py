"""The pixel-space UNet2DModel (DDPM models) against diffusers' UNet2DModel: same state-dict keys
and shapes, same outputs (fp32 CPU), the real CIFAR-10 / CelebA-HQ configs' parameter counts."""

import json
from pathlib import Path

import pytest
import torch

import ldm_engine
from ldm_engine.models.unet_2d import UNet2DConfig, UNet2DModel
from model_utils import rel_err
from pixel_fixtures import TINY, diffusers_unet, unet_inputs

CONFIGS = Path(ldm_engine.__file__).resolve().parent / "configs"
# (folder, parameter count of google/ddpm-cifar10-32 / google/ddpm-celebahq-256: 35.7M / 113.7M)
REAL = [("ddpm-cifar10", 35_746_307), ("ddpm-celebahq", 113_673_219)]


def ours_from(ref) -> UNet2DModel:
    model = UNet2DModel(UNet2DConfig.from_dict(dict(ref.config)))
    model.load_state_dict(ref.state_dict())
    return model.eval()


@pytest.mark.parametrize("kind", sorted(TINY))
def test_matches_diffusers(kind):
    ref = diffusers_unet(kind, seed=3)
    ours = ours_from(ref)
    x, t = unet_inputs(kind, batch=3)
    with torch.no_grad():
        expected = ref(x, t).sample
        assert rel_err(ours(x, t), expected) <= 1e-4
        # 0-d timestep (the pipelines' form) and a python int
        assert rel_err(ours(x, t[0]), ref(x, t[0]).sample) <= 1e-4
        assert rel_err(ours(x[:1], 17), ref(x[:1], 17).sample) <= 1e-4


@pytest.mark.parametrize("folder,expected", REAL, ids=[r[0] for r in REAL])
def test_real_configs_parameter_count_equals_diffusers(folder, expected):
    from diffusers import UNet2DModel as Reference

    cfg = json.loads((CONFIGS / folder / "unet.json").read_text())
    with torch.device("meta"):
        ours = UNet2DModel(UNet2DConfig.from_dict(cfg))
        ref = Reference(**{k: v for k, v in cfg.items() if not k.startswith("_")})
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters()) == expected


@pytest.mark.parametrize("bad", [dict(time_embedding_type="fourier"), dict(downsample_type="resnet"),
                                 dict(num_class_embeds=10), dict(down_block_types=("SkipDownBlock2D",) * 4),
                                 dict(up_block_types=("UpBlock2D",))])
def test_unsupported_config_is_refused(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        UNet2DConfig.from_dict(bad)


def test_bad_inputs():
    model = UNet2DModel(UNet2DConfig.from_dict(dict(TINY["attn"])))
    with pytest.raises(ValueError, match="sample"):
        model(torch.randn(3, 16, 16), 1)
    with pytest.raises(ValueError, match="timestep"):
        model(torch.randn(2, 3, 16, 16), torch.tensor([1, 2, 3]))
