"""Our AutoencoderKL vs diffusers' AutoencoderKL on the same random weights (fp32, CPU, tiny configs)."""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from ldm_engine import ops  # noqa: E402
from ldm_engine.models.vae import AutoencoderKL, VAEConfig  # noqa: E402
from model_utils import randomize_, rel_err  # noqa: E402

TOL = 1e-4
TINY = dict(
    block_out_channels=(16, 32, 32), layers_per_block=2, norm_num_groups=8, latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
)
VARIANTS = {
    "default": {},
    "no_quant_convs": dict(use_quant_conv=False, use_post_quant_conv=False),
    "no_mid_attention": dict(mid_block_add_attention=False),
}


def build_pair(seed: int, **overrides):
    ref = diffusers.AutoencoderKL(**TINY, **overrides).eval()
    randomize_(ref, seed)
    ours = AutoencoderKL(VAEConfig.from_dict(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_encode_matches_diffusers(variant):
    ours, ref = build_pair(21, **VARIANTS[variant])
    image = torch.rand(2, 3, 42, 26, generator=torch.Generator().manual_seed(22)) * 2 - 1  # 21x13 after one halving
    with torch.no_grad():
        dist = ref.encode(image).latent_dist
        mean, logvar = ours.encode(image)
    assert mean.shape == (2, 4, 10, 6)  # the encoder pads right/bottom by 1, then floors
    assert rel_err(mean, dist.mean) <= TOL
    assert rel_err(logvar, dist.logvar) <= TOL


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_decode_matches_diffusers(variant):
    ours, ref = build_pair(23, **VARIANTS[variant])
    z = torch.randn(2, 4, 5, 7, generator=torch.Generator().manual_seed(24))
    with torch.no_grad():
        expected = ref.decode(z).sample
        got = ours.decode(z)
    assert got.shape == (2, 3, 20, 28)
    assert rel_err(got, expected) <= TOL


def test_logvar_is_clamped_like_diffusers():
    ours, ref = build_pair(25)
    with torch.no_grad():  # push the logvar half of quant_conv far out of [-30, 20]
        ours.quant_conv.bias[4:] += torch.tensor([100.0, -100.0, 0.0, 50.0])
        ref.quant_conv.bias.copy_(ours.quant_conv.bias)
        image = torch.rand(1, 3, 40, 24, generator=torch.Generator().manual_seed(26))
        _, logvar = ours.encode(image)
        expected = ref.encode(image).latent_dist.logvar
    assert logvar.max().item() == 20.0 and logvar.min().item() == -30.0
    assert rel_err(logvar, expected) <= TOL


def test_mid_attention_uses_ops_attention_single_head(monkeypatch):
    ours, _ = build_pair(27)
    shapes = []
    real = ops.attention

    def spy(q, k, v, **kwargs):
        shapes.append(tuple(q.shape))
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(ops, "attention", spy)
    with torch.no_grad():
        ours.decode(torch.randn(1, 4, 5, 3))
    assert shapes == [(1, 1, 15, 32)]  # (B, H=1, L=h*w, D=C)


def test_config_fields_and_bad_input():
    cfg = VAEConfig.from_dict({"_class_name": "AutoencoderKL", "scaling_factor": 0.13025, "force_upcast": True,
                               "block_out_channels": [8], "norm_num_groups": 4})
    assert cfg.scaling_factor == 0.13025 and cfg.shift_factor is None and cfg.force_upcast
    with pytest.raises(ValueError, match="up_block_types"):
        VAEConfig.from_dict({"up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"], "block_out_channels": [8]})
    with torch.device("meta"):
        vae = AutoencoderKL(cfg)
    with pytest.raises(ValueError, match="decode expects"):
        vae.decode(torch.zeros(1, 3, 4, 4, device="meta"))
