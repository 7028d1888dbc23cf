"""CUDA-graph replay (Engine.enable_cuda_graphs, ldm_engine.pipeline.cuda_graphs).

On CPU the graphs are RerunGraphs: the same static-input discipline (inputs copied into the
captured tensors, outputs written back into the captured outputs and cloned, non-tensor arguments
baked per signature) without the capture itself. So these tests fail when a later call would see
an earlier call's inputs, when a sampler's history aliases a replayed output, or when a signature
misses something the graph bakes in. The real capture runs in the tests marked ``cuda``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_pipelines import tiny_pipeline

from ldm_engine import Engine
from ldm_engine.pipeline.cuda_graphs import GraphedCallable, RerunGraphs

PROMPT = "a lighthouse on a cliff at dusk"


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-graphs")
    kinds = ("sd15", "sd-turbo", "sdxl-turbo", "controlnet-sd", "controlnet-sd-2")
    return {k: tiny_pipeline(k, root) for k in kinds}


def _graphed(engine: Engine, max_graphs: int = 8) -> RerunGraphs:
    graphs = RerunGraphs()
    engine._install_graphs(graphs, max_graphs)
    return graphs


def _control(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((32, 32, 3), dtype=np.float32)


# Each case: model, ControlNets, generate() arguments. PNDM without guidance keeps past U-Net
# outputs as they come out of the network (fp32: no cast, no CFG combine): aliasing would show.
CASES = {
    "sd-turbo": ("sd-turbo", (), dict(num_inference_steps=2)),
    "sdxl-turbo-euler-a": ("sdxl-turbo", (), dict(num_inference_steps=3, guidance_scale=2.0)),
    "sd15-pndm-no-cfg": ("sd15", (), dict(num_inference_steps=4, guidance_scale=1.0)),
    "sd15-cfg-2-controlnets": ("sd15", ("controlnet-sd", "controlnet-sd-2"),
                               dict(num_inference_steps=2, guidance_scale=4.0, negative_prompt="blurry",
                                    controlnet_conditioning_scale=[0.7, 0.4])),
}


@pytest.mark.parametrize("case", list(CASES))
def test_graphed_engine_matches_eager_over_calls(paths, case):
    kind, nets, kw = CASES[case]
    nets = [paths[n] for n in nets] or None
    eager = Engine.from_pretrained(paths[kind], controlnet=nets)
    engine = Engine.from_pretrained(paths[kind], controlnet=nets)
    graphs = _graphed(engine)

    calls = [dict(seed=1), dict(seed=2), dict(seed=2, prompt="a bowl of ramen")]
    for i, call in enumerate(calls):
        args = dict(kw, output_type="np", **{k: v for k, v in call.items() if k != "prompt"})
        if nets:
            args["control_image"] = [_control(i), _control(10 + i)]
        prompt = call.get("prompt", PROMPT)
        want = eager.generate(prompt, **args).images
        got = engine.generate(prompt, **args).images
        assert np.isfinite(got).all() and got.std() > 1e-3
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6, err_msg=f"call {i}: {call}")
        if i == 0:
            captured = graphs.captures
            assert captured >= 3  # text encoder(s), U-Net, VAE decoder (+ ControlNets)
    assert graphs.captures == captured, "same shapes must replay, not capture again"


def test_img2img_graphs_vae_encoder(paths):
    eager, engine = Engine.from_pretrained(paths["sd-turbo"]), Engine.from_pretrained(paths["sd-turbo"])
    graphs = _graphed(engine)
    for seed in (3, 4):
        init = np.random.default_rng(seed).random((32, 32, 3), dtype=np.float32)
        kw = dict(image=init, strength=0.5, num_inference_steps=4, seed=seed, output_type="np")
        np.testing.assert_allclose(engine.generate(PROMPT, **kw).images, eager.generate(PROMPT, **kw).images,
                                   rtol=0, atol=1e-6)
    assert graphs.captures == 4  # text encoder, VAE encoder, U-Net, VAE decoder


def test_new_shapes_capture_new_graphs_and_lru_bound(paths):
    engine = Engine.from_pretrained(paths["sd-turbo"])
    graphs = _graphed(engine, max_graphs=2)
    comps, _ = engine._networks()
    for size in (32, 48, 64):
        engine.generate(PROMPT, height=size, width=size, seed=0, output_type="latent")
    assert comps.unet.num_graphs == 2 and comps.text_encoder.num_graphs == 1
    # guidance on doubles the U-Net batch: one more U-Net graph; the size seen last is still cached
    before = graphs.captures
    engine.generate(PROMPT, height=64, width=64, seed=0, guidance_scale=3.0, output_type="latent")
    assert graphs.captures == before + 2  # U-Net (batch 2) and text encoder (2 prompts)
    engine.generate(PROMPT, height=64, width=64, seed=1, guidance_scale=3.0, output_type="latent")
    assert graphs.captures == before + 2


def test_controlnet_scale_is_part_of_the_signature(paths):
    nets = [paths["controlnet-sd"]]
    eager = Engine.from_pretrained(paths["sd15"], controlnet=nets)
    engine = Engine.from_pretrained(paths["sd15"], controlnet=nets)
    _graphed(engine)
    kw = dict(seed=0, num_inference_steps=1, control_image=_control(0), output_type="np")
    for scale in (1.0, 0.3):
        np.testing.assert_allclose(engine.generate(PROMPT, controlnet_conditioning_scale=scale, **kw).images,
                                   eager.generate(PROMPT, controlnet_conditioning_scale=scale, **kw).images,
                                   rtol=0, atol=1e-6)
    assert engine._networks()[1][0].num_graphs == 2


def test_graphed_controlnet_takes_the_embedded_hint_as_a_static_input(paths):
    """The hint is embedded once per generate(), eagerly; the ControlNet graph's tensor inputs hold the
    features (refreshed on every replay), not the pixels."""
    nets = [paths["controlnet-sd"]]
    eager = Engine.from_pretrained(paths["sd15"], controlnet=nets)
    engine = Engine.from_pretrained(paths["sd15"], controlnet=nets)
    _graphed(engine)
    embedded = []
    engine.controlnets[0].controlnet_cond_embedding.register_forward_hook(lambda m, a, o: embedded.append(a[0].shape))
    kw = dict(num_inference_steps=2, guidance_scale=4.0, output_type="np")
    for seed in (0, 1):  # new control image, same shapes: replayed with the new features
        np.testing.assert_allclose(engine.generate(PROMPT, control_image=_control(seed), seed=seed, **kw).images,
                                   eager.generate(PROMPT, control_image=_control(seed), seed=seed, **kw).images,
                                   rtol=0, atol=1e-6)
    assert embedded == [(1, 3, 32, 32)] * 2
    (entry,) = engine._networks()[1][0]._entries.values()
    shapes = [tuple(t.shape) for t in entry.static_inputs if isinstance(t, torch.Tensor)]
    latent = 32 // engine.vae_scale_factor
    assert (2, engine.controlnets[0].config.block_out_channels[0], latent, latent) in shapes
    assert not any(len(shape) == 4 and shape[1] == 3 for shape in shapes)  # no pixels


def test_bad_input_is_not_captured_and_the_wrapper_keeps_working():
    graphs = RerunGraphs()
    lin = torch.nn.Linear(5, 3)
    graphed = GraphedCallable(lin, lin, graphs)
    with pytest.raises(RuntimeError):
        graphed(torch.randn(2, 4))          # wrong feature count: fails in the warm-up
    assert graphed.num_graphs == 0 and graphs.captures == 0
    x = torch.randn(2, 5)
    torch.testing.assert_close(graphed(x), lin(x), rtol=0, atol=0)
    with pytest.raises(TypeError, match="hashable"):  # a set is a pytree leaf and cannot be hashed
        GraphedCallable(lambda t, s: t * 2, lin, graphs)(x, {1, 2})


def test_outputs_are_fresh_tensors_and_inputs_are_copied():
    graphs = RerunGraphs()
    lin = torch.nn.Linear(4, 4)
    graphed = GraphedCallable(lin, lin, graphs)
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    ya = graphed(a)
    yb = graphed(b)                         # a replay: must not change ya
    torch.testing.assert_close(ya, lin(a), rtol=0, atol=0)
    torch.testing.assert_close(yb, lin(b), rtol=0, atol=0)
    assert graphs.captures == 1 and graphs.replays == 2  # a capture runs nothing: the first call replays too


def test_moved_weights_drop_the_graphs():
    graphs = RerunGraphs()
    lin = torch.nn.Linear(4, 4)
    graphed = GraphedCallable(lin, lin, graphs)
    x = torch.randn(2, 4)
    graphed(x)
    with torch.no_grad():                   # new storage: a real graph would read the freed old one
        lin.weight.data = lin.weight.data * 2
    y = graphed(x)                          # same signature, yet captured again
    assert graphs.captures == 2 and graphed.num_graphs == 1
    torch.testing.assert_close(y, lin(x), rtol=0, atol=0)


def test_attributes_fall_through_to_the_network(paths):
    engine = Engine.from_pretrained(paths["sd15"], controlnet=[paths["controlnet-sd"]])
    _graphed(engine)
    comps, nets = engine._networks()
    assert comps.unet.config is engine.components.unet.config
    assert comps.vae.config is engine.components.vae.config
    assert nets[0].config is engine.controlnets[0].config


def test_enable_cuda_graphs_errors(paths):
    engine = Engine.from_pretrained(paths["sd-turbo"], device="cpu")
    with pytest.raises(ValueError, match="CUDA device"):
        engine.enable_cuda_graphs()
    _graphed(engine)
    with pytest.raises(ValueError, match="replays CUDA graphs itself"):
        engine.compile(mode="reduce-overhead")
    engine.disable_cuda_graphs()
    assert engine._networks()[0] is engine.components
    assert engine.generate(PROMPT, seed=0, output_type="np").images.std() > 1e-3


def test_compile_after_graphs_graphs_the_compiled_networks(paths):
    torch._dynamo.reset()
    try:
        eager = Engine.from_pretrained(paths["sd-turbo"])
        engine = Engine.from_pretrained(paths["sd-turbo"])
        _graphed(engine)
        engine.compile(backend="aot_eager")
        comps, _ = engine._networks()
        assert comps.unet.owner is engine.components.unet  # the compiled module
        kw = dict(seed=7, num_inference_steps=2, output_type="np")
        np.testing.assert_allclose(engine.generate(PROMPT, **kw).images, eager.generate(PROMPT, **kw).images,
                                   rtol=0, atol=1e-5)
    finally:
        torch._dynamo.reset()


# ------------------------------------------------------------------------------------------ GPU
@pytest.mark.cuda
@pytest.mark.parametrize("kind,nets,kw", [
    ("sd-turbo", (), dict(num_inference_steps=1)),
    ("sdxl-turbo", (), dict(num_inference_steps=4)),
    ("sd15", ("controlnet-sd",), dict(num_inference_steps=3, guidance_scale=5.0)),
    ("sd15", (), dict(num_inference_steps=4, guidance_scale=1.0)),
])
def test_cuda_graphs_match_eager_on_gpu(paths, kind, nets, kw):
    nets = [paths[n] for n in nets] or None
    eager = Engine.from_pretrained(paths[kind], controlnet=nets, device="cuda", dtype="fp16")
    engine = Engine.from_pretrained(paths[kind], controlnet=nets, device="cuda", dtype="fp16").enable_cuda_graphs()
    for seed in (0, 1, 1):
        args = dict(kw, seed=seed, output_type="np")
        if nets:
            args["control_image"] = _control(seed)
        want = eager.generate(PROMPT, **args).images
        got = engine.generate(PROMPT, **args)
        assert np.isfinite(got.images).all()
        # the same kernels on the same inputs; allow for a different cuBLAS algorithm under capture
        assert np.abs(got.images - want).max() < 2e-3, seed
        assert len(got.timings["unet"]) == len(eager.generate(PROMPT, **args).timings["unet"])
    comps, _ = engine._networks()
    assert comps.unet.num_graphs == 1


@pytest.mark.cuda
def test_cuda_graphs_survive_bad_input_on_gpu(paths):
    engine = Engine.from_pretrained(paths["sd-turbo"], device="cuda", dtype="fp16").enable_cuda_graphs()
    ok = engine.generate(PROMPT, seed=0, output_type="np").images
    with pytest.raises(ValueError):
        engine.generate(PROMPT, seed=0, height=30)
    np.testing.assert_array_equal(engine.generate(PROMPT, seed=0, output_type="np").images, ok)
