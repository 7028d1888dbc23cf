"""Engine.use_channels_last(): the same images as the contiguous layout, and activations really in
channels_last (so the layout propagates through every block rather than being converted back)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_pipelines import tiny_pipeline

from ldm_engine import Engine

PROMPT = "an old map of a harbour town"


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-cl")
    return {k: tiny_pipeline(k, root) for k in ("sd15", "sd-turbo", "sdxl-turbo", "controlnet-sd")}


def _control(seed: int, size=(32, 48)) -> np.ndarray:
    return np.random.default_rng(seed).random((*size, 3), dtype=np.float32)


@pytest.mark.parametrize("kind,nets,kw", [
    ("sd-turbo", (), dict(num_inference_steps=2, height=32, width=48)),
    ("sdxl-turbo", (), dict(num_inference_steps=2, guidance_scale=3.0, height=48, width=32)),
    ("sd15", ("controlnet-sd",), dict(num_inference_steps=2, guidance_scale=4.0, control_image=_control(0))),
    ("sd-turbo", (), dict(num_inference_steps=4, strength=0.5, image=_control(1, (40, 40)))),
])
def test_channels_last_gives_the_same_images(paths, kind, nets, kw):
    nets = [paths[n] for n in nets] or None
    base = Engine.from_pretrained(paths[kind], controlnet=nets)
    engine = Engine.from_pretrained(paths[kind], controlnet=nets).use_channels_last()
    for seed in (0, 1):
        want = base.generate(PROMPT, seed=seed, output_type="np", **kw).images
        got = engine.generate(PROMPT, seed=seed, output_type="np", **kw).images
        assert np.isfinite(got).all() and got.std() > 1e-3
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)


def test_activations_stay_channels_last(paths):
    engine = Engine.from_pretrained(paths["sd15"], controlnet=[paths["controlnet-sd"]]).use_channels_last()
    unet = engine.components.unet
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    seen = []

    def record(module, args, out):
        seen.append((type(module).__name__, out.is_contiguous(memory_format=torch.channels_last)))

    convs = [m for net in (unet, engine.components.vae.decoder, engine.controlnets[0])
             for m in net.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    handles = [m.register_forward_hook(record) for m in convs]
    try:
        engine.generate(PROMPT, seed=0, num_inference_steps=1, control_image=_control(2), output_type="np")
    finally:
        for h in handles:
            h.remove()
    assert seen and all(cl for _, cl in seen), [n for n, cl in seen if not cl][:5]

    engine.use_channels_last(False)
    assert unet.conv_in.weight.is_contiguous()


def test_channels_last_needs_the_torch_backend(paths):
    engine = Engine.from_pretrained(paths["sd-turbo"])
    engine.components.unet = object()  # stands for an exported network's wrapper
    with pytest.raises(ValueError, match="torch backend"):
        engine.use_channels_last()
