"""Sub-pixel Upsample2D (four 2x2 phase convolutions instead of nearest-2x + 3x3 conv) against
F.interpolate + F.conv2d, against the plain path in whole networks, against diffusers, and in
Engine.generate / compile / CUDA graphs (CPU stand-in) / ONNX export."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from model_utils import randomize_, rel_err
from tiny_pipelines import tiny_pipeline

from ldm_engine import Engine
from ldm_engine.models.layers import Upsample2D, set_subpixel_upsample, subpixel_weights

PROMPT = "a lighthouse on a cliff at dusk"


def _reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), weight, bias, padding=1)


def _upsampler(channels: int, *, bias: bool, seed: int, dtype=torch.float32) -> Upsample2D:
    up = Upsample2D(channels)
    if not bias:
        up.conv = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False)
    randomize_(up, seed)
    set_subpixel_upsample(up, True)
    return up.to(dtype)


def _inputs(shape, seed: int, dtype=torch.float32, channels_last: bool = False) -> torch.Tensor:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _count_subpixel_calls(monkeypatch) -> list:
    calls = []
    real = Upsample2D._subpixel_forward

    def spy(self, x):
        calls.append(tuple(x.shape))
        return real(self, x)

    monkeypatch.setattr(Upsample2D, "_subpixel_forward", spy)
    return calls


# ------------------------------------------------------------------------------------------------ the op

@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("shape", [(2, 5, 13, 7), (3, 8, 4, 9), (1, 3, 1, 1)], ids=str)
def test_phase_convs_equal_nearest_then_conv_float64(shape, bias, channels_last):
    up = _upsampler(shape[1], bias=bias, seed=1, dtype=torch.float64)
    if channels_last:
        up.to(memory_format=torch.channels_last)
    x = _inputs(shape, 2, torch.float64, channels_last)
    with torch.no_grad():
        got = up(x)
    want = _reference(x, up.conv.weight, up.conv.bias)
    assert got.shape == (shape[0], shape[1], 2 * shape[2], 2 * shape[3])
    assert (got - want).abs().max().item() <= 1e-12 * want.abs().max().item()
    if channels_last and shape[2] * shape[3] > 1:  # the layout of the input carries through, as conv2d's does
        assert got.is_contiguous(memory_format=torch.channels_last) and not got.is_contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_low_precision_error_is_within_twice_torchs(dtype, channels_last):
    """Against the float64 result of the same rounded weights and inputs: the phase path's error is
    at most twice that of torch's own nearest + conv in the same dtype (plus a small atol)."""
    up = _upsampler(32, bias=True, seed=3, dtype=dtype)
    x = _inputs((2, 32, 11, 6), 4, dtype, channels_last)
    exact = _reference(x.double(), up.conv.weight.double(), up.conv.bias.double())
    with torch.no_grad():
        ours = up(x).double()
        torchs = _reference(x, up.conv.weight, up.conv.bias).double()
    err, err_torch = (ours - exact).abs().max().item(), (torchs - exact).abs().max().item()
    atol = 1e-6 if dtype == torch.float32 else 1e-3
    assert err <= 2 * err_torch + atol, (err, err_torch)


def test_phase_weights_are_sums_of_the_3x3_taps():
    w = torch.arange(9.0).view(1, 1, 3, 3)  # rows (0 1 2), (3 4 5), (6 7 8)
    k, b = subpixel_weights(w, torch.tensor([0.5]))
    assert k.shape == (4, 1, 2, 2) and b.tolist() == [0.5] * 4
    # phase (0, 0): rows {i-1: W0, i: W1 + W2}, same for columns
    assert k[0, 0].tolist() == [[0.0, 1 + 2], [3 + 6, 4 + 5 + 7 + 8]]
    # phase (1, 1): rows {i: W0 + W1, i+1: W2}
    assert k[3, 0].tolist() == [[0 + 1 + 3 + 4, 2 + 5], [6 + 7, 8]]


def test_size_not_twice_falls_back_and_twice_does_not(monkeypatch):
    calls = _count_subpixel_calls(monkeypatch)
    up = _upsampler(4, bias=True, seed=5)
    x = _inputs((2, 4, 7, 5), 6)
    with torch.no_grad():
        odd = up(x, size=(13, 10))  # the U-Net's odd skip sizes
        assert not calls
        set_subpixel_upsample(up, False)
        assert torch.equal(odd, up(x, size=(13, 10)))
        set_subpixel_upsample(up, True)
        twice = up(x, size=torch.Size([14, 10]))
    assert calls == [(2, 4, 7, 5)]
    torch.testing.assert_close(twice, _reference(x, up.conv.weight, up.conv.bias), rtol=0, atol=1e-5)


def test_phase_weights_follow_weight_changes():
    """In-place changes (LoRA merges, load_state_dict), new storage (.to, channels_last) and a new
    parameter all re-derive the cached phase weights."""
    up = _upsampler(6, bias=True, seed=7)
    x = _inputs((1, 6, 5, 9), 8)

    def check():
        with torch.inference_mode():
            got = up(x)
        torch.testing.assert_close(got, _reference(x, up.conv.weight, up.conv.bias), rtol=0, atol=1e-5)

    check()
    with torch.no_grad():
        up.conv.weight.mul_(-2.0)
        check()
        up.conv.bias.add_(1.0)
        check()
        up.load_state_dict({k: v * 0.5 for k, v in up.state_dict().items()})
        check()
    up.half().float()  # same parameter objects, rounded values, maybe the old addresses
    check()
    up.to(memory_format=torch.channels_last)
    check()
    up.conv.weight = torch.nn.Parameter(torch.randn_like(up.conv.weight))
    check()


def test_gradients_flow_through_the_phase_weights():
    up = _upsampler(4, bias=True, seed=9)
    x = _inputs((2, 4, 6, 5), 10).requires_grad_()
    up(x).square().sum().backward()
    grads = (x.grad.clone(), up.conv.weight.grad.clone())
    x.grad = None
    up.zero_grad()
    set_subpixel_upsample(up, False)
    up(x).square().sum().backward()
    torch.testing.assert_close(grads[0], x.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads[1], up.conv.weight.grad, rtol=1e-4, atol=1e-4)


def test_compiles_as_one_graph_and_follows_the_switch():
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    up = _upsampler(4, bias=True, seed=11)
    compiled = torch.compile(up, backend=backend, fullgraph=True)
    x = _inputs((1, 4, 6, 3), 12)
    try:
        with torch.no_grad():
            got = compiled(x)
            torch.testing.assert_close(got, _reference(x, up.conv.weight, up.conv.bias), rtol=0, atol=1e-5)
            assert "as_strided" in graphs[-1].code
            set_subpixel_upsample(up, False)  # a guard on the switch: compiled again, plain
            compiled(x)
            assert len(graphs) == 2 and "interpolate" in graphs[-1].code
    finally:
        torch._dynamo.reset()


# ------------------------------------------------------------------------------------------------ networks

def test_vae_decode_equals_plain_and_diffusers(monkeypatch):
    diffusers = pytest.importorskip("diffusers")
    from ldm_engine.models.vae import AutoencoderKL, VAEConfig

    ref = diffusers.AutoencoderKL(block_out_channels=(16, 32, 32), layers_per_block=2, norm_num_groups=8,
                                  latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 3,
                                  up_block_types=("UpDecoderBlock2D",) * 3).eval()
    randomize_(ref, 13)
    ours = AutoencoderKL(VAEConfig.from_dict(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict())
    z = _inputs((2, 4, 5, 7), 14)
    calls = _count_subpixel_calls(monkeypatch)
    with torch.no_grad():
        plain = ours.decode(z)
        assert set_subpixel_upsample(ours, True) == 2
        got = ours.decode(z)
        expected = ref.decode(z).sample
    assert calls == [(2, 32, 5, 7), (2, 32, 10, 14)]
    assert got.shape == (2, 3, 20, 28)
    assert rel_err(got, plain) <= 1e-5
    assert rel_err(got, expected) <= 1e-4


@pytest.mark.parametrize("latent_hw,subpixel_calls", [((12, 8), 2), ((13, 10), 0)], ids=["x4", "odd"])
def test_unet_forward_equals_plain_and_diffusers(monkeypatch, latent_hw, subpixel_calls):
    pytest.importorskip("diffusers")
    from test_unet import build_pair, make_inputs

    ours, ref = build_pair("sd2", seed=15)
    sample, timestep, context, _ = make_inputs("sd2", torch.Generator().manual_seed(16))
    sample = _inputs((sample.shape[0], sample.shape[1], *latent_hw), 17)
    calls = _count_subpixel_calls(monkeypatch)
    with torch.no_grad():
        plain = ours(sample, timestep, context)
        set_subpixel_upsample(ours, True)
        got = ours(sample, timestep, context)
        expected = ref(sample, timestep, context).sample
    assert len(calls) == subpixel_calls  # odd sizes: both upsamplers take the explicit-size path
    assert rel_err(got, plain) <= 1e-5
    assert rel_err(got, expected) <= 1e-4


def test_pixel_unet_2d_equals_plain_and_diffusers(monkeypatch):
    pytest.importorskip("diffusers")
    from pixel_fixtures import TINY, diffusers_unet, unet_inputs

    from ldm_engine.models.unet_2d import UNet2DConfig, UNet2DModel

    ref = diffusers_unet("plain", seed=18)
    ours = UNet2DModel(UNet2DConfig.from_dict(dict(TINY["plain"]))).eval()
    ours.load_state_dict(ref.state_dict())
    x, t = unet_inputs("plain", batch=2, seed=19)
    calls = _count_subpixel_calls(monkeypatch)
    with torch.no_grad():
        plain = ours(x, t)
        assert set_subpixel_upsample(ours, True) == 2
        got = ours(x, t)
        expected = ref(x, t).sample
    assert len(calls) == 2
    assert rel_err(got, plain) <= 1e-5
    assert rel_err(got, expected) <= 1e-4


# ------------------------------------------------------------------------------------------------ engine

@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-subpixel")
    return {k: tiny_pipeline(k, root) for k in ("sd-turbo", "sd15", "controlnet-sd")}


@pytest.mark.parametrize("kind,nets,seeds,kw", [
    ("sd-turbo", (), (0, 1), dict(num_inference_steps=2, height=32, width=48)),
    ("sd15", ("controlnet-sd",), (2,), dict(num_inference_steps=1, guidance_scale=4.0, height=40, width=24,
                                           control_image=np.random.default_rng(0).random((40, 24, 3), dtype=np.float32))),
])
def test_engine_images_equal_with_and_without(paths, monkeypatch, kind, nets, seeds, kw):
    nets = [paths[n] for n in nets] or None
    base = Engine.from_pretrained(paths[kind], controlnet=nets)
    engine = Engine.from_pretrained(paths[kind], controlnet=nets)
    assert engine.use_subpixel_upsample() is engine
    calls = _count_subpixel_calls(monkeypatch)
    for seed in seeds:
        want = base.generate(PROMPT, seed=seed, output_type="np", **kw).images
        n_before = len(calls)
        got = engine.generate(PROMPT, seed=seed, output_type="np", **kw).images
        assert len(calls) > n_before  # the VAE decoder's upsamplers at least
        assert np.isfinite(got).all() and got.std() > 1e-3
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)
    engine.use_subpixel_upsample(False)
    n_before = len(calls)
    np.testing.assert_array_equal(engine.generate(PROMPT, seed=seeds[0], output_type="np", **kw).images,
                                  base.generate(PROMPT, seed=seeds[0], output_type="np", **kw).images)
    assert len(calls) == n_before


def test_engine_with_channels_last_and_graphs(paths, monkeypatch):
    """With channels_last, and switched on after CUDA graphs (the CPU stand-in) were captured: the
    graphs are captured again and replay the sub-pixel path."""
    from ldm_engine.pipeline.cuda_graphs import RerunGraphs

    kw = dict(num_inference_steps=1, height=32, width=32, output_type="np")
    want = Engine.from_pretrained(paths["sd-turbo"]).generate(PROMPT, seed=3, **kw).images
    engine = Engine.from_pretrained(paths["sd-turbo"]).use_channels_last()
    graphs = RerunGraphs()
    engine._install_graphs(graphs, 8)
    engine.generate(PROMPT, seed=3, **kw)
    captured = graphs.captures
    calls = _count_subpixel_calls(monkeypatch)
    engine.use_subpixel_upsample()
    got = engine.generate(PROMPT, seed=3, **kw).images
    assert graphs.captures > captured and calls
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)


def test_engine_option_errors(paths):
    engine = Engine.from_pretrained(paths["sd-turbo"])
    with pytest.raises(ValueError, match="True or False"):
        engine.use_subpixel_upsample("yes")
    engine.components.unet = object()  # stands for an exported network's wrapper
    with pytest.raises(ValueError, match="torch backend"):
        engine.use_subpixel_upsample()


def test_onnx_export_traces_the_plain_path(paths, tmp_path):
    """Exporting a module with the option on works: the graph holds the plain path (Resize + 3x3
    Conv, dynamic sizes), and ONNX Runtime matches the module's sub-pixel output."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from ldm_engine.export import contracts as C
    from ldm_engine.export.onnx_export import export_onnx
    from ldm_engine.loading import load_pipeline

    vae = load_pipeline(paths["sd-turbo"]).vae
    assert set_subpixel_upsample(vae, True) > 0
    export_onnx(vae, C.vae_decoder_contract(vae.config), tmp_path / "vae_decoder.onnx",
                symbols={"B": 1, "H": 8, "W": 8})
    proto = onnx.load(str(tmp_path / "vae_decoder.onnx"))
    assert any(n.op_type == "Resize" for n in proto.graph.node)
    session = ort.InferenceSession(str(tmp_path / "vae_decoder.onnx"), providers=["CPUExecutionProvider"])
    z = _inputs((2, 4, 5, 7), 20)
    with torch.no_grad():
        want = vae.decode(z)
    got = torch.from_numpy(session.run(None, {"latent": z.numpy()})[0])
    assert rel_err(got, want) <= 1e-4


# ------------------------------------------------------------------------------------------------ GPU

@pytest.mark.cuda
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_fp16_on_gpu_and_graph_replays_follow_weight_changes(channels_last):
    up = _upsampler(64, bias=True, seed=21, dtype=torch.float16).cuda()
    if channels_last:
        up.to(memory_format=torch.channels_last)
    x = _inputs((2, 64, 17, 12), 22, torch.float16, channels_last).cuda()

    def errors():
        exact = _reference(x.double(), up.conv.weight.double(), up.conv.bias.double())
        with torch.no_grad():
            ours, torchs = up(x).double(), _reference(x, up.conv.weight, up.conv.bias).double()
        return (ours - exact).abs().max().item(), (torchs - exact).abs().max().item()

    err, err_torch = errors()
    assert err <= 2 * err_torch + 1e-3, (err, err_torch)
    with torch.no_grad():
        up(x)  # warm-up (fills the eager cache), then capture: the graph derives the phase weights itself
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = up(x)
        up.conv.weight.mul_(-1.0)  # in place, as a LoRA merge: the replay must see it
        graph.replay()
        torch.cuda.synchronize()
        want = _reference(x, up.conv.weight, up.conv.bias)
    torch.testing.assert_close(out, want, rtol=2e-2, atol=2e-2)
