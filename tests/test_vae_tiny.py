"""Our AutoencoderTiny (TAESD / TAESDXL) vs diffusers' AutoencoderTiny on the same random weights (fp32, CPU)."""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from ldm_engine.models.vae_tiny import TAESD_CONFIG, AutoencoderTiny, TinyVAEConfig  # noqa: E402
from model_utils import randomize_, rel_err  # noqa: E402

TOL = 1e-4
CONFIGS = {
    "taesd": {},  # TAESD and TAESDXL: the same architecture (diffusers' defaults)
    "narrow": dict(encoder_block_out_channels=(8, 8, 8), decoder_block_out_channels=(8, 8, 8),
                   num_encoder_blocks=(1, 2, 1), num_decoder_blocks=(2, 1, 1), act_fn="silu"),
}


def build_pair(seed: int, **overrides):
    ref = diffusers.AutoencoderTiny(**overrides).eval()
    randomize_(ref, seed)
    ours = AutoencoderTiny(TinyVAEConfig.from_dict(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


@pytest.mark.parametrize("name", list(CONFIGS))
def test_encode_matches_diffusers(name):
    ours, ref = build_pair(31, **CONFIGS[name])
    image = torch.rand(2, 3, 42, 26, generator=torch.Generator().manual_seed(32)) * 2 - 1
    with torch.no_grad():
        expected = ref.encode(image).latents
        got, logvar = ours.encode(image)
    assert logvar is None and got.shape == expected.shape
    assert expected.std() > 1e-3
    assert rel_err(got, expected) <= TOL


@pytest.mark.parametrize("name", list(CONFIGS))
def test_decode_matches_diffusers(name):
    ours, ref = build_pair(33, **CONFIGS[name])
    z = torch.randn(2, 4, 5, 7, generator=torch.Generator().manual_seed(34)) * 2
    with torch.no_grad():
        expected = ref.decode(z).sample
        got = ours.decode(z)
    f = ours.downscale
    assert got.shape == (2, 3, 5 * f, 7 * f) and expected.std() > 1e-3
    assert rel_err(got, expected) <= TOL


def test_full_configs_parameter_counts_on_meta():
    with torch.device("meta"):
        ours = AutoencoderTiny(TAESD_CONFIG)
        ref = diffusers.AutoencoderTiny()
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(ours.encoder) == count(ref.encoder) and count(ours.decoder) == count(ref.decoder)
    assert 1_000_000 < count(ours) < 3_000_000  # TAESD: ~2.4M parameters in all
    assert TAESD_CONFIG.block_out_channels == (64, 64, 64, 64) and ours.downscale == 8
    assert TAESD_CONFIG.scaling_factor == 1.0 and TAESD_CONFIG.shift_factor == 0.0 and not TAESD_CONFIG.force_upcast


@pytest.mark.parametrize("bad", [dict(encoder_block_out_channels=(8, 16), num_encoder_blocks=(1, 1),
                                      decoder_block_out_channels=(8, 8), num_decoder_blocks=(1, 1)),
                                 dict(num_encoder_blocks=(1, 3, 3)), dict(act_fn="tanh"),
                                 dict(upsample_fn="bilinear")])
def test_bad_configs_raise(bad):
    with pytest.raises(ValueError):
        TinyVAEConfig.from_dict(bad)


def test_recorded_flops_match_flop_counter():
    """benchmarks/flops.json's tiny-VAE figures are what torch.utils.flop_counter counts (meta device)."""
    import json
    from pathlib import Path

    from torch.utils.flop_counter import FlopCounterMode

    recorded = json.loads((Path(__file__).resolve().parents[1] / "benchmarks" / "flops.json").read_text())
    with torch.device("meta"):
        vae = AutoencoderTiny(TAESD_CONFIG)
        with FlopCounterMode(display=False) as fc:
            vae.decode(torch.randn(1, 4, 64, 64))
        decode = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc:
            vae.encode(torch.randn(1, 3, 512, 512))
        encode = fc.get_total_flops()
    assert recorded["taesd"]["vae_decode_512"] == decode and recorded["taesd"]["vae_encode_512"] == encode
    assert decode * 10 < recorded["sd-turbo"]["vae_decode_512"]  # the point of the tiny VAE
