"""torch.compile sees every network as one graph (fullgraph=True: no graph breaks), and a compiled
Engine gives the eager Engine's images. Compiled with the aot_eager backend to stay fast on CPU:
graph capture is what is under test here, not inductor's code generation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_pipelines import tiny_pipeline

from ldm_engine import Engine

PROMPT = "a red bicycle leaning on a wall"


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-compile")
    return {k: tiny_pipeline(k, root) for k in ("sdxl-turbo", "sd15", "controlnet-sd")}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("kind,controlnet", [("sdxl-turbo", None), ("sd15", "controlnet-sd")])
def test_compiled_engine_matches_eager(paths, kind, controlnet):
    nets = [paths[controlnet]] if controlnet else None
    kw = dict(seed=5, num_inference_steps=2, guidance_scale=3.0, output_type="np", height=32, width=48)
    if controlnet:
        gen = np.random.default_rng(0)
        kw["control_image"] = gen.random((32, 48, 3), dtype=np.float32)
    eager = Engine.from_pretrained(paths[kind], controlnet=nets).generate(PROMPT, **kw).images
    engine = Engine.from_pretrained(paths[kind], controlnet=nets).compile(backend="aot_eager")
    compiled = engine.generate(PROMPT, **kw).images
    assert np.isfinite(compiled).all() and compiled.std() > 1e-3
    np.testing.assert_allclose(compiled, eager, rtol=0, atol=1e-5)
    # a second call (another seed) reuses the graphs
    again = engine.generate(PROMPT, **{**kw, "seed": 6}).images
    assert np.abs(again - compiled).max() > 1e-3


def test_compile_rejects_exported_backends(paths):
    engine = Engine.from_pretrained(paths["sdxl-turbo"])
    engine.components.unet = object()  # stands for an exported network's wrapper
    with pytest.raises(ValueError, match="torch backend"):
        engine.compile()
