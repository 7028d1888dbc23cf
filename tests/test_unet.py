"""Our U-Net vs diffusers' UNet2DConditionModel on the same random weights (fp32, CPU, tiny configs)."""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from ldm_engine import ops  # noqa: E402
from ldm_engine.models import layers  # noqa: E402
from ldm_engine.models.unet import UNet2DConditionModel, UNetConfig  # noqa: E402
from model_utils import count_calls, randomize_, rel_err  # noqa: E402

TOL = 1e-4
LATENT_HW = (13, 10)  # not a multiple of 4: exercises the up path's explicit upsample sizes
BATCH, TOKENS = 2, 77

SD1 = dict(
    block_out_channels=(32, 64, 64), layers_per_block=2, norm_num_groups=8, cross_attention_dim=32,
    attention_head_dim=2,  # legacy meaning: 2 heads per block
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    use_linear_projection=False,
)
SD2 = dict(SD1, cross_attention_dim=48, attention_head_dim=(2, 4, 4), use_linear_projection=True,
           upcast_attention=True)
SDXL = dict(
    block_out_channels=(32, 64, 64), layers_per_block=2, norm_num_groups=8, cross_attention_dim=40,
    attention_head_dim=(1, 2, 4), transformer_layers_per_block=(1, 2, 3),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=16 + 6 * 8,  # pooled text (16) + 6 time ids x 8
)
CONFIGS = {"sd1": SD1, "sd2": SD2, "sdxl": SDXL}
POOLED_DIM = 16


def build_pair(kind: str, seed: int = 0):
    ref = diffusers.UNet2DConditionModel(**CONFIGS[kind]).eval()
    randomize_(ref, seed)
    ours = UNet2DConditionModel(UNetConfig.from_dict(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def skip_shapes(cfg: dict, batch: int, hw: tuple[int, int]):
    """Shapes of the U-Net's skip tensors (ControlNet down residuals) and of the mid-block output."""
    chans, lpb = cfg["block_out_channels"], cfg["layers_per_block"]
    h, w = hw
    shapes = [(batch, chans[0], h, w)]
    for i, ch in enumerate(chans):
        shapes += [(batch, ch, h, w)] * lpb
        if i < len(chans) - 1:
            h, w = (h + 1) // 2, (w + 1) // 2  # 3x3 stride-2 conv, padding 1
            shapes.append((batch, ch, h, w))
    return shapes, (batch, chans[-1], h, w)


def make_inputs(kind: str, gen: torch.Generator):
    cfg = CONFIGS[kind]
    sample = torch.randn(BATCH, 4, *LATENT_HW, generator=gen)
    context = torch.randn(BATCH, TOKENS, cfg["cross_attention_dim"], generator=gen)
    timestep = torch.tensor([999.0, 37.0])
    extra = {}
    if kind == "sdxl":
        text_embeds = torch.randn(BATCH, POOLED_DIM, generator=gen)
        time_ids = torch.tensor([[104.0, 80.0, 0.0, 0.0, 104.0, 80.0], [512.0, 384.0, 8.0, 16.0, 96.0, 72.0]])
        extra = dict(text_embeds=text_embeds, time_ids=time_ids)
    return sample, timestep, context, extra


@pytest.mark.parametrize("with_residuals", [False, True], ids=["plain", "controlnet_residuals"])
@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_unet_matches_diffusers(kind, with_residuals):
    ours, ref = build_pair(kind, seed=1)
    gen = torch.Generator().manual_seed(2)
    sample, timestep, context, extra = make_inputs(kind, gen)
    ref_kwargs, our_kwargs = {}, dict(extra)
    if extra:
        ref_kwargs["added_cond_kwargs"] = extra
    if with_residuals:
        down_shapes, mid_shape = skip_shapes(CONFIGS[kind], BATCH, LATENT_HW)
        down = tuple(torch.randn(s, generator=gen) for s in down_shapes)
        mid = torch.randn(mid_shape, generator=gen)
        ref_kwargs.update(down_block_additional_residuals=down, mid_block_additional_residual=mid)
        our_kwargs.update(down_block_additional_residuals=down, mid_block_additional_residual=mid)
    with torch.no_grad():
        expected = ref(sample, timestep, context, **ref_kwargs).sample
        got = ours(sample, timestep, context, **our_kwargs)
        if with_residuals:  # the residuals must matter
            plain = ours(sample, timestep, context, **extra)
            assert rel_err(plain, expected) > 1e-2
    assert rel_err(got, expected) <= TOL


def test_scalar_timestep_broadcasts_like_diffusers():
    ours, ref = build_pair("sd1", seed=3)
    gen = torch.Generator().manual_seed(4)
    sample, _, context, _ = make_inputs("sd1", gen)
    with torch.no_grad():
        for t in (torch.tensor(421), torch.tensor([421.5]), 421):
            assert rel_err(ours(sample, t, context), ref(sample, t, context).sample) <= TOL


def test_every_norm_and_attention_goes_through_ops(monkeypatch):
    ours, _ = build_pair("sdxl", seed=5)
    calls = count_calls(monkeypatch, (ops, "attention"), (ops, "group_norm_silu"))
    gen = torch.Generator().manual_seed(6)
    sample, timestep, context, extra = make_inputs("sdxl", gen)
    with torch.no_grad():
        ours(sample, timestep, context, **extra)
    modules = list(ours.modules())
    assert calls["attention"] == sum(isinstance(m, layers.Attention) for m in modules) > 0
    assert calls["group_norm_silu"] == sum(isinstance(m, torch.nn.GroupNorm) for m in modules) > 0
    assert all(isinstance(m, layers.GroupNorm) for m in modules if isinstance(m, torch.nn.GroupNorm))


def test_bad_inputs_raise_value_error():
    ours, _ = build_pair("sdxl", seed=7)
    gen = torch.Generator().manual_seed(8)
    sample, timestep, context, extra = make_inputs("sdxl", gen)
    with torch.no_grad():
        with pytest.raises(ValueError, match="text_embeds"):
            ours(sample, timestep, context)
        with pytest.raises(ValueError, match="timestep"):
            ours(sample, torch.tensor([1.0, 2.0, 3.0]), context, **extra)
        with pytest.raises(ValueError, match="both"):
            ours(sample, timestep, context, **extra, mid_block_additional_residual=torch.zeros(1))
        with pytest.raises(ValueError, match="skip connections"):
            ours(sample, timestep, context, **extra, down_block_additional_residuals=(sample,),
                 mid_block_additional_residual=torch.zeros(1))


def test_builds_on_meta_device():
    with torch.device("meta"):
        model = UNet2DConditionModel(UNetConfig.from_dict(SDXL))
    assert all(p.is_meta for p in model.parameters())
