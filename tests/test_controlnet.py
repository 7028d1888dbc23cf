"""Our ControlNet vs diffusers' ControlNetModel on the same random weights (fp32, CPU, tiny configs)."""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from ldm_engine.models.controlnet import ControlNetConfig, ControlNetModel  # noqa: E402
from ldm_engine.models.unet import UNet2DConditionModel, UNetConfig  # noqa: E402
from model_utils import randomize_, rel_err  # noqa: E402

TOL = 1e-4
LATENT_HW = (13, 10)
BATCH, TOKENS = 2, 77
HINT_WIDTHS = (8, 8, 16, 16)  # 3 stride-2 convs: the hint is 8x the latent, as in the real models

SD = dict(
    block_out_channels=(32, 64, 64), layers_per_block=2, norm_num_groups=8, cross_attention_dim=32,
    attention_head_dim=2, conditioning_embedding_out_channels=HINT_WIDTHS,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
)
SDXL = dict(
    block_out_channels=(32, 64, 64), layers_per_block=2, norm_num_groups=8, cross_attention_dim=40,
    attention_head_dim=(1, 2, 4), transformer_layers_per_block=(1, 2, 3), use_linear_projection=True,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8,
    conditioning_embedding_out_channels=HINT_WIDTHS,
)
CONFIGS = {"sd": SD, "sdxl": SDXL}


def build_pair(kind: str, seed: int = 0, **overrides):
    ref = diffusers.ControlNetModel(**CONFIGS[kind], **overrides).eval()
    randomize_(ref, seed)
    ours = ControlNetModel(ControlNetConfig.from_dict(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def make_inputs(kind: str, gen: torch.Generator):
    cfg = CONFIGS[kind]
    sample = torch.randn(BATCH, 4, *LATENT_HW, generator=gen)
    context = torch.randn(BATCH, TOKENS, cfg["cross_attention_dim"], generator=gen)
    hint = torch.rand(BATCH, 3, LATENT_HW[0] * 8, LATENT_HW[1] * 8, generator=gen)
    timestep = torch.tensor([999, 250])
    extra = {}
    if kind == "sdxl":
        extra = dict(text_embeds=torch.randn(BATCH, 16, generator=gen),
                     time_ids=torch.tensor([[104.0, 80.0, 0.0, 0.0, 104.0, 80.0]] * BATCH))
    return sample, timestep, context, hint, extra


@pytest.mark.parametrize("scale", [0.5, 1.0])
@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_controlnet_matches_diffusers(kind, scale):
    ours, ref = build_pair(kind, seed=11)
    sample, timestep, context, hint, extra = make_inputs(kind, torch.Generator().manual_seed(12))
    with torch.no_grad():
        ref_out = ref(sample, timestep, context, hint, conditioning_scale=scale,
                      added_cond_kwargs=extra or None, return_dict=False)
        down, mid = ours(sample, timestep, context, hint, conditioning_scale=scale, **extra)
    ref_down, ref_mid = ref_out
    assert isinstance(down, tuple) and len(down) == len(ref_down) == len(ours.controlnet_down_blocks)
    for got, expected in zip(down, ref_down):
        assert rel_err(got, expected) <= TOL
    assert rel_err(mid, ref_mid) <= TOL


def test_bgr_order_and_global_pool_match_diffusers():
    ours, ref = build_pair("sd", seed=13, controlnet_conditioning_channel_order="bgr", global_pool_conditions=True)
    sample, timestep, context, hint, _ = make_inputs("sd", torch.Generator().manual_seed(14))
    with torch.no_grad():
        ref_down, ref_mid = ref(sample, timestep, context, hint, return_dict=False)
        down, mid = ours(sample, timestep, context, hint)
    assert mid.shape[-2:] == (1, 1)
    for got, expected in zip((*down, mid), (*ref_down, ref_mid)):
        assert rel_err(got, expected) <= TOL


def test_residuals_plug_into_our_unet():
    """ControlNet output feeds the U-Net: shapes line up with its skip connections."""
    unet_cfg = dict(SD, up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    del unet_cfg["conditioning_embedding_out_channels"]
    with torch.no_grad():
        unet = UNet2DConditionModel(UNetConfig.from_dict(unet_cfg)).eval()
        ours, _ = build_pair("sd", seed=15)
        sample, timestep, context, hint, _ = make_inputs("sd", torch.Generator().manual_seed(16))
        down, mid = ours(sample, timestep, context, hint, conditioning_scale=0.7)
        out = unet(sample, timestep, context, down_block_additional_residuals=down,
                   mid_block_additional_residual=mid)
    assert out.shape == sample.shape


def test_hint_size_mismatch_raises():
    ours, _ = build_pair("sd", seed=17)
    sample, timestep, context, hint, _ = make_inputs("sd", torch.Generator().manual_seed(18))
    with torch.no_grad(), pytest.raises(ValueError, match="8x the latent size"):
        ours(sample, timestep, context, hint[..., :40, :40])


# ------------------------------------------------------------------ the hint embedded once (embed_hint)
@pytest.mark.parametrize("kind,overrides", [("sd", {}), ("sdxl", {}),
                                            ("sd", dict(controlnet_conditioning_channel_order="bgr",
                                                        global_pool_conditions=True))])
def test_precomputed_hint_features_match_pixels_and_diffusers(kind, overrides):
    ours, ref = build_pair(kind, seed=19, **overrides)
    sample, timestep, context, hint, extra = make_inputs(kind, torch.Generator().manual_seed(20))
    with torch.no_grad():
        ref_down, ref_mid = ref(sample, timestep, context, hint, conditioning_scale=0.6,
                                added_cond_kwargs=extra or None, return_dict=False)
        features = ours.embed_hint(hint, LATENT_HW)
        down, mid = ours(sample, timestep, context, hint_features=features, conditioning_scale=0.6, **extra)
        px_down, px_mid = ours(sample, timestep, context, hint, conditioning_scale=0.6, **extra)
    assert features.shape == (BATCH, CONFIGS[kind]["block_out_channels"][0], *LATENT_HW)
    for got, from_pixels, expected in zip((*down, mid), (*px_down, px_mid), (*ref_down, ref_mid)):
        assert torch.equal(got, from_pixels)  # the same computation, only split in two
        assert rel_err(got, expected) <= TOL


def test_embed_hint_and_forward_argument_errors():
    ours, _ = build_pair("sd", seed=21)
    sample, timestep, context, hint, _ = make_inputs("sd", torch.Generator().manual_seed(22))
    with torch.no_grad():
        features = ours.embed_hint(hint)
        with pytest.raises(ValueError, match="exactly one of controlnet_cond .* got both"):
            ours(sample, timestep, context, hint, hint_features=features)
        with pytest.raises(ValueError, match="exactly one of controlnet_cond .* got neither"):
            ours(sample, timestep, context)
        for bad in (features[:1], features[:, :-1], features[..., :-1, :]):
            with pytest.raises(ValueError, match=r"hint_features has shape .*expected \(2, 32, 13, 10\)"):
                ours(sample, timestep, context, hint_features=bad)
        with pytest.raises(ValueError, match="4-D"):
            ours.embed_hint(hint[0])
        with pytest.raises(ValueError, match="conditioning_channels=3"):
            ours.embed_hint(hint[:, :2])
        with pytest.raises(ValueError, match=r"embeds to \(5, 5\), latents are \(13, 10\).*8x the latent size"):
            ours.embed_hint(hint[..., :40, :40], LATENT_HW)
        with pytest.raises(ValueError, match="sample must be 4-D"):
            ours(sample[0], timestep, context, hint_features=features)
