"""NaN / Inf output: a half-precision VAE overflow is decoded again in fp32 (one warning), anything
else raises NonFiniteOutputError naming the stage, and the engine keeps working afterwards.

On CPU the overflow is provoked with a forward hook on the VAE decoder's last convolution that
writes Inf into its output when it runs in bf16 (what an fp16 SDXL VAE does on its own); the fp32
copy of the VAE carries the same hook but, running in fp32, stays finite.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from tiny_pipelines import tiny_pipeline

from ldm_engine import Engine
from ldm_engine.errors import NonFiniteOutputError
from ldm_engine.pipeline.images import postprocess

PROMPT = "a watercolor of a harbour"
KW = dict(num_inference_steps=2, seed=7)


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return tiny_pipeline("sd15", tmp_path_factory.mktemp("tiny-nonfinite"))


def _overflow_in(dtypes):
    def hook(module, args, out):
        if out.dtype in dtypes:
            out = out.clone()
            out[:, :, 1::3, 2::5] = float("inf")
            out[0, 0, 0, 0] = float("nan")
            return out
    return hook


def test_half_vae_overflow_is_decoded_again_in_fp32(sd):
    engine = Engine.from_pretrained(sd, dtype=torch.bfloat16)
    vae = engine.components.vae
    assert engine.vae_dtype == torch.bfloat16
    latents = engine.generate(PROMPT, output_type="latent", **KW).images
    # reference: the same latents through an independent fp32 copy of the VAE
    ref_vae = copy.deepcopy(vae).float()
    cfg = vae.config
    want = postprocess(ref_vae.decode((latents / cfg.scaling_factor).to(torch.bfloat16).float()), "np")

    handle = vae.decoder.conv_out.register_forward_hook(_overflow_in((torch.bfloat16,)))
    try:
        with pytest.warns(RuntimeWarning, match="decoding again in float32"):
            got = engine.generate(PROMPT, output_type="np", **KW).images
        assert np.isfinite(got).all() and got.std() > 1e-3
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
        with warnings.catch_warnings():  # warned once per VAE
            warnings.simplefilter("error")
            again = engine.generate(PROMPT, output_type="np", **KW).images
        np.testing.assert_array_equal(again, got)
    finally:
        handle.remove()
    plain = engine.generate(PROMPT, output_type="np", **KW).images
    assert np.isfinite(plain).all() and np.abs(plain - want).max() < 0.05  # bf16 decode, close to fp32


def test_vae_non_finite_in_fp32_too_raises_naming_the_vae(sd):
    engine = Engine.from_pretrained(sd, dtype=torch.bfloat16)
    vae = engine.components.vae
    handle = vae.decoder.conv_out.register_forward_hook(_overflow_in((torch.bfloat16, torch.float32)))
    try:
        with pytest.warns(RuntimeWarning), pytest.raises(NonFiniteOutputError, match="VAE decoder .* float32 too"):
            engine.generate(PROMPT, output_type="np", **KW)
    finally:
        handle.remove()
    assert np.isfinite(engine.generate(PROMPT, output_type="np", **KW).images).all()  # still usable


def test_fp32_vae_non_finite_raises(sd):
    engine = Engine.from_pretrained(sd)
    handle = engine.components.vae.decoder.conv_out.register_forward_hook(_overflow_in((torch.float32,)))
    try:
        with pytest.raises(NonFiniteOutputError, match="VAE decoder produced NaN or Inf pixels in fp32"):
            engine.generate(PROMPT, output_type="pil", **KW)
    finally:
        handle.remove()


@pytest.mark.parametrize("output_type", ["latent", "np"])
def test_non_finite_latents_name_the_denoising_loop(sd, monkeypatch, output_type):
    engine = Engine.from_pretrained(sd)
    unet = engine.components.unet
    real_forward = unet.forward

    def nan_forward(*args, **kwargs):
        out = real_forward(*args, **kwargs)
        return out * float("nan")

    monkeypatch.setattr(unet, "forward", nan_forward)
    with pytest.raises(NonFiniteOutputError, match="denoising loop"):
        engine.generate(PROMPT, output_type=output_type, **KW)
    monkeypatch.undo()
    assert np.isfinite(engine.generate(PROMPT, output_type="np", **KW).images).all()
