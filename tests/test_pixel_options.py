"""PixelEngine's network options (shared with the latent Engine, ldm_engine.pipeline.network_options):
use_channels_last(), compile(), enable_cuda_graphs() / disable_cuda_graphs().

Reference: the same PixelEngine eager, contiguous, on the same tiny random UNet2DModels (fp32 CPU).
The CUDA-graph path runs on CPU through RerunGraphs, the stand-in that keeps the graphs' discipline
(inputs copied into static tensors, outputs written back into the captured ones and cloned), as in
test_cuda_graphs.py; the real capture runs in the tests marked ``cuda``. compile() uses the aot_eager
backend here: inductor's C++ code generation takes minutes for one tiny U-Net on this 2-core machine
(graph capture, fullgraph=True, is what is under test); the GPU test compiles with inductor.
"""

from __future__ import annotations

import pytest
import torch

from ldm_engine import Engine
from ldm_engine.errors import InvalidInputError
from ldm_engine.pipeline.cuda_graphs import RerunGraphs
from pixel_fixtures import save_pipeline


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two tiny models; the module's tests run on one intra-op thread (faster for tiny U-Nets on a
    loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("pixel-options")
    yield {(kind, p): save_pipeline(kind, root, pipeline=p, seed=7)
           for kind, p in (("attn", "DDPMPipeline"), ("plain", "DDIMPipeline"))}
    torch.set_num_threads(threads)


def _images(engine, **kw):
    return engine.generate(output_type="pt", **kw).images


# Samplers: DDPM (a noise draw per step), DDIM deterministic and with eta 1, and PNDM, which keeps past
# U-Net outputs as they come out of the network (fp32: no cast), so an aliased graph output would show.
CASES = {
    "attn-ddpm": (("attn", "DDPMPipeline"), dict(num_inference_steps=4)),
    "plain-ddim": (("plain", "DDIMPipeline"), dict(num_inference_steps=3)),
    "attn-ddim-eta1": (("attn", "DDPMPipeline"), dict(scheduler="ddim", eta=1.0, num_inference_steps=3)),
    "plain-pndm": (("plain", "DDIMPipeline"), dict(scheduler="pndm", num_inference_steps=4)),
}


# ------------------------------------------------------------------------------------- channels_last
@pytest.mark.parametrize("case", ["attn-ddpm", "plain-ddim"])
def test_channels_last_gives_the_same_images(folders, case):
    folder, kw = CASES[case]
    base = Engine.from_pretrained(folders[folder])
    engine = Engine.from_pretrained(folders[folder]).use_channels_last()
    for seed in (0, 1):
        want = _images(base, seed=seed, num_images_per_prompt=2, **kw)
        got = _images(engine, seed=seed, num_images_per_prompt=2, **kw)
        assert got.std() > 1e-2
        torch.testing.assert_close(got, want, rtol=0, atol=2e-5)


@pytest.mark.parametrize("kind", ["attn", "plain"])
def test_every_3x3_convolution_runs_channels_last(folders, kind):
    folder = next(f for (k, _), f in folders.items() if k == kind)
    engine = Engine.from_pretrained(folder).use_channels_last()
    unet = engine.components.unet
    convs = [m for m in unet.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    seen = []

    def record(module, args, out):
        seen.append((type(module).__name__, out.is_contiguous(memory_format=torch.channels_last)))

    handles = [m.register_forward_hook(record) for m in convs]
    try:
        engine.generate(num_inference_steps=1, seed=0, output_type="pt")
    finally:
        for h in handles:
            h.remove()
    assert len(seen) == len(convs) and all(cl for _, cl in seen), [n for n, cl in seen if not cl][:5]

    engine.use_channels_last(False)
    assert unet.conv_in.weight.is_contiguous()


# ------------------------------------------------------------------------------------------ compile
@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_engine_gives_the_same_images(folders, fresh_dynamo):
    folder, kw = CASES["attn-ddpm"]
    eager = Engine.from_pretrained(folders[folder])
    engine = Engine.from_pretrained(folders[folder]).compile(backend="aot_eager")  # fullgraph: a break fails
    assert isinstance(engine.components.unet, torch._dynamo.eval_frame.OptimizedModule)
    for seed in (2, 3):
        got = _images(engine, seed=seed, num_images_per_prompt=2, **kw)
        torch.testing.assert_close(got, _images(eager, seed=seed, num_images_per_prompt=2, **kw), rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------- CUDA graphs
def _graphed(engine, max_graphs: int = 8) -> RerunGraphs:
    graphs = RerunGraphs()
    engine._install_graphs(graphs, max_graphs)
    return graphs


def assert_graphed_matches_eager(folder, kw, graphs_class=RerunGraphs):
    """Three calls (new seeds, then a new batch size) on one graphed engine equal the eager engine's
    images; the U-Net is captured once per shape and replayed for every step."""
    eager = Engine.from_pretrained(folder)
    engine = Engine.from_pretrained(folder)
    graphs = graphs_class()
    engine._install_graphs(graphs, 8)
    for i, call in enumerate([dict(seed=1), dict(seed=2), dict(seed=3, num_images_per_prompt=2)]):
        replays = graphs.replays
        got = _images(engine, **kw, **call)
        torch.testing.assert_close(got, _images(eager, **kw, **call), rtol=0, atol=1e-6, msg=lambda m: f"{call}: {m}")
        assert graphs.replays - replays == kw["num_inference_steps"] + (kw.get("scheduler") == "pndm")
        assert graphs.captures == (1 if i < 2 else 2), "same shapes must replay, not capture again"


@pytest.mark.parametrize("case", list(CASES))
def test_graphed_engine_matches_eager_over_calls(folders, case):
    folder, kw = CASES[case]
    assert_graphed_matches_eager(folders[folder], kw)


class _StaleReplays(RerunGraphs):
    """A broken backend: replays leave the captured outputs as they were (as if the static inputs
    had not been refreshed before the replay)."""

    def capture(self, run, device):
        out, replay = super().capture(run, device)

        def stale():
            self.replays += 1

        return out, stale


def test_the_graph_comparison_catches_stale_replays(folders):
    folder, kw = CASES["plain-ddim"]
    with pytest.raises(AssertionError, match="seed"):
        assert_graphed_matches_eager(folders[folder], kw, graphs_class=_StaleReplays)


def test_graph_errors_and_disable(folders, fresh_dynamo):
    folder, kw = CASES["plain-ddim"]
    engine = Engine.from_pretrained(folders[folder], device="cpu")
    with pytest.raises(InvalidInputError, match=r"^enable_cuda_graphs\(\) needs a CUDA device; this engine runs on cpu$"):
        engine.enable_cuda_graphs()
    want = _images(engine, seed=4, **kw)
    _graphed(engine)
    with pytest.raises(InvalidInputError, match="replays CUDA graphs itself"):
        engine.compile(mode="reduce-overhead")
    # compile() after the graphs: the graphs wrap the compiled U-Net from then on
    engine.compile(backend="aot_eager")
    assert engine._networks().unet.owner is engine.components.unet
    torch.testing.assert_close(_images(engine, seed=4, **kw), want, rtol=0, atol=1e-5)
    engine.disable_cuda_graphs()
    assert engine._networks() is engine.components
    torch.testing.assert_close(_images(engine, seed=4, **kw), want, rtol=0, atol=1e-5)


def test_options_need_the_torch_backend(folders):
    engine = Engine.from_pretrained(folders[("plain", "DDIMPipeline")])
    unet = engine.components.unet
    engine.components.unet = lambda x, t: unet(x, t)  # stands for an exported network's wrapper (not a module)
    for option in (engine.compile, engine.use_channels_last, engine.enable_cuda_graphs):
        with pytest.raises(InvalidInputError, match="needs the torch backend"):
            option()


# ---------------------------------------------------------------------------------------------- GPU
@pytest.mark.cuda
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_graphs_match_eager_on_gpu(folders, channels_last):
    folder = folders[("attn", "DDPMPipeline")]
    eager = Engine.from_pretrained(folder, device="cuda", dtype="fp16")
    engine = Engine.from_pretrained(folder, device="cuda", dtype="fp16")
    if channels_last:
        eager.use_channels_last()
        engine.use_channels_last()
    engine.enable_cuda_graphs()
    for seed in (0, 1, 1):
        kw = dict(seed=seed, num_inference_steps=20, num_images_per_prompt=2)
        want, got = _images(eager, **kw), _images(engine, **kw)
        assert torch.isfinite(got).all()
        # the same kernels on the same inputs; allow for a different cuDNN / cuBLAS algorithm under capture
        assert (got - want).abs().max() < 2e-3, seed
    assert engine._networks().unet.num_graphs == 1


@pytest.mark.cuda
def test_inductor_compile_and_graphs_on_gpu(folders, fresh_dynamo):
    folder, kw = CASES["attn-ddpm"]
    want = _images(Engine.from_pretrained(folder, device="cuda"), seed=5, **kw)
    engine = Engine.from_pretrained(folder, device="cuda").compile().enable_cuda_graphs()
    for _ in range(2):
        assert (_images(engine, seed=5, **kw) - want).abs().max() < 1e-3
