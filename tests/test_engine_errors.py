"""Bad input to Engine.generate() / Engine.from_pretrained(): a clear ValueError / TypeError that names
the argument, raised before any network runs, and the engine still works afterwards."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_pipelines import tiny_pipeline

from ldm_engine import Engine
from ldm_engine.errors import BackendUnavailableError, InvalidInputError

PROMPT = "a watercolor fox"
VALID = dict(num_inference_steps=2, seed=0, output_type="np")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny")


class CallCounter:
    """Counts forward calls of the engine's networks: a rejected call must not reach any of them."""

    def __init__(self, engine):
        comps = engine.components
        modules = [comps.text_encoder, comps.unet, comps.vae, *engine.controlnets]
        self.calls = 0
        self.handles = [m.register_forward_pre_hook(self._hit) for m in modules]
        # the VAE is used through encode()/decode(), not forward()
        comps.vae.encode = self._wrap(comps.vae.encode)
        comps.vae.decode = self._wrap(comps.vae.decode)

    def _hit(self, *_):
        self.calls += 1

    def _wrap(self, fn):
        def wrapped(*a, **k):
            self.calls += 1
            return fn(*a, **k)
        return wrapped


@pytest.fixture(scope="module")
def engine(root):
    eng = Engine.from_pretrained(tiny_pipeline("sd-turbo", root))
    eng.counter = CallCounter(eng)
    return eng


@pytest.fixture(scope="module")
def baseline(engine):
    return engine.generate(PROMPT, **VALID).images


def _rgb(h=32, w=32):
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8))


BAD_CALLS = [
    # (id, kwargs for generate, exception, words the message must contain)
    ("height-not-multiple", dict(height=33), InvalidInputError, ["height", "multiple of 2"]),
    ("width-not-multiple", dict(width=31), InvalidInputError, ["width", "multiple of 2"]),
    ("height-too-small", dict(height=0), InvalidInputError, ["height", "[2, 4096]"]),
    ("width-too-large", dict(width=8192), InvalidInputError, ["width", "[2, 4096]"]),
    ("height-negative", dict(height=-32), InvalidInputError, ["height"]),
    ("height-float", dict(height=32.0), TypeError, ["height", "int"]),
    ("steps-zero", dict(num_inference_steps=0), InvalidInputError, ["num_inference_steps", "[1, 1000]"]),
    ("steps-negative", dict(num_inference_steps=-3), InvalidInputError, ["num_inference_steps"]),
    ("steps-too-many", dict(num_inference_steps=1001), InvalidInputError, ["num_inference_steps", "[1, 1000]"]),
    ("steps-float", dict(num_inference_steps=2.5), TypeError, ["num_inference_steps", "int"]),
    ("guidance-nan", dict(guidance_scale=math.nan), InvalidInputError, ["guidance_scale", ">= 0"]),
    ("guidance-negative", dict(guidance_scale=-1.0), InvalidInputError, ["guidance_scale", ">= 0"]),
    ("guidance-inf", dict(guidance_scale=math.inf), InvalidInputError, ["guidance_scale", "finite"]),
    ("guidance-str", dict(guidance_scale="7"), TypeError, ["guidance_scale"]),
    ("strength-zero", dict(image=_rgb(), strength=0.0), InvalidInputError, ["strength", "(0, 1]"]),
    ("strength-above-one", dict(image=_rgb(), strength=1.5), InvalidInputError, ["strength", "(0, 1]"]),
    ("strength-negative", dict(image=_rgb(), strength=-0.2), InvalidInputError, ["strength", "(0, 1]"]),
    ("strength-nan", dict(image=_rgb(), strength=math.nan), InvalidInputError, ["strength", "(0, 1]"]),
    ("strength-without-image", dict(strength=0.5), InvalidInputError, ["strength", "image"]),
    ("steps-times-strength-below-one", dict(image=_rgb(), strength=0.4, num_inference_steps=2),
     InvalidInputError, ["num_inference_steps * strength", ">= 1"]),
    ("negative-prompt-length", dict(negative_prompt=["a", "b"]), InvalidInputError, ["negative_prompt", "2", "1"]),
    ("negative-prompt-type", dict(negative_prompt=3), TypeError, ["negative_prompt"]),
    ("negative-prompt-item-type", dict(negative_prompt=[None]), TypeError, ["negative_prompt[0]"]),
    ("control-image-without-controlnet", dict(control_image=_rgb()), InvalidInputError,
     ["control_image", "no ControlNet"]),
    ("image-mode-cmyk", dict(image=_rgb().convert("CMYK"), strength=1.0), InvalidInputError,
     ["image", "mode", "CMYK"]),
    ("image-mode-float", dict(image=Image.new("F", (32, 32)), strength=1.0), InvalidInputError, ["image", "mode"]),
    ("image-4-channels", dict(image=np.zeros((32, 32, 4), np.uint8), strength=1.0), InvalidInputError,
     ["image", "channels"]),
    ("image-tensor-5d", dict(image=torch.zeros(1, 1, 3, 32, 32), strength=1.0), InvalidInputError,
     ["image", "shape"]),
    ("image-values-out-of-range", dict(image=torch.full((3, 32, 32), 2.0), strength=1.0), InvalidInputError,
     ["image", "[0, 1]"]),
    ("image-int32", dict(image=np.zeros((32, 32, 3), np.int32), strength=1.0), InvalidInputError,
     ["image", "dtype"]),
    ("image-type", dict(image="cat.png", strength=1.0), TypeError, ["image"]),
    ("image-batch-mismatch", dict(image=[_rgb(), _rgb(), _rgb()], strength=1.0), InvalidInputError,
     ["image", "3 images"]),
    ("latents-shape", dict(latents=torch.zeros(1, 4, 8, 8)), InvalidInputError, ["latents", "(1, 4, 16, 16)"]),
    ("latents-dtype", dict(latents=torch.zeros(1, 4, 16, 16, dtype=torch.int64)), InvalidInputError,
     ["latents", "floating"]),
    ("latents-device", dict(latents=torch.zeros(1, 4, 16, 16, device="meta")), InvalidInputError,
     ["latents", "device"]),
    ("latents-type", dict(latents=np.zeros((1, 4, 16, 16), np.float32)), TypeError, ["latents", "Tensor"]),
    ("latents-nan", dict(latents=torch.randn(1, 4, 16, 16).index_fill_(2, torch.tensor([3]), float("nan"))),
     InvalidInputError, ["latents", "NaN"]),
    ("num-images-zero", dict(num_images_per_prompt=0), InvalidInputError, ["num_images_per_prompt"]),
    ("output-type", dict(output_type="jpeg"), InvalidInputError, ["output_type", "pil"]),
    ("seed-negative", dict(seed=-1), InvalidInputError, ["seed"]),
    ("seed-type", dict(seed="42"), TypeError, ["seed"]),
    ("controlnet-scale-type", dict(controlnet_conditioning_scale="big"), TypeError,
     ["controlnet_conditioning_scale"]),
]


@pytest.mark.parametrize("kwargs,exc,words", [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
def test_bad_argument_is_rejected_early_and_engine_still_works(engine, baseline, kwargs, exc, words):
    call = dict(VALID, **kwargs)
    before = engine.counter.calls
    with pytest.raises(exc) as info:
        engine.generate(PROMPT, **call)
    assert isinstance(info.value, (ValueError, TypeError))
    for word in words:
        assert word in str(info.value), f"{word!r} not in message: {info.value}"
    assert engine.counter.calls == before, "a network ran before the argument check"
    np.testing.assert_array_equal(engine.generate(PROMPT, **VALID).images, baseline)


@pytest.mark.parametrize("prompt,exc", [(5, TypeError), (None, TypeError), (["ok", 3], TypeError),
                                        ([], InvalidInputError), ({"a": 1}, TypeError)])
def test_bad_prompt(engine, baseline, prompt, exc):
    with pytest.raises(exc, match="prompt"):
        engine.generate(prompt, **VALID)
    np.testing.assert_array_equal(engine.generate(PROMPT, **VALID).images, baseline)


def test_unknown_scheduler_name(root, engine, baseline):
    path = tiny_pipeline("sd-turbo", root)
    with pytest.raises(InvalidInputError, match="scheduler.*euler_a"):
        Engine.from_pretrained(path, scheduler="k_lms")
    with pytest.raises(InvalidInputError, match="scheduler"):
        engine.scheduler = "Euler"
    assert engine.scheduler == "euler"
    np.testing.assert_array_equal(engine.generate(PROMPT, **VALID).images, baseline)


def test_bad_backend_dtype_device(root):
    path = tiny_pipeline("sd-turbo", root)
    with pytest.raises(InvalidInputError, match="backend"):
        Engine.from_pretrained(path, backend="tflite")
    with pytest.raises(InvalidInputError, match="engine_dir"):
        Engine.from_pretrained(path, backend="onnxruntime")
    with pytest.raises(InvalidInputError, match="dtype"):
        Engine.from_pretrained(path, dtype="int8")
    with pytest.raises(InvalidInputError, match="device"):
        Engine.from_pretrained(path, device="gpu0")


def test_missing_exported_backend_is_reported(root, monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "ldm_engine.export.runtime", None)  # import fails
    with pytest.raises(BackendUnavailableError, match="onnxruntime"):
        Engine.from_pretrained(tiny_pipeline("sd-turbo", root), backend="onnxruntime", engine_dir=tmp_path)


@pytest.fixture(scope="module")
def cn_engine(root):
    eng = Engine.from_pretrained(tiny_pipeline("sd15", root),
                                 controlnet=[tiny_pipeline("controlnet-sd", root), tiny_pipeline("controlnet-sd-2", root)])
    eng.counter = CallCounter(eng)
    return eng


CN_BAD = [
    ("missing", dict(), ["control_image is required", "2 ControlNet"]),
    ("one-for-two", dict(control_image=_rgb()), ["control_image", "one image per ControlNet (2)"]),
    ("three-for-two", dict(control_image=[_rgb()] * 3), ["control_image", "(2)", "3"]),
    ("scale-count", dict(control_image=[_rgb(), _rgb()], controlnet_conditioning_scale=[0.5]),
     ["controlnet_conditioning_scale", "1 entries", "2 ControlNet"]),
    ("scale-nan", dict(control_image=[_rgb(), _rgb()], controlnet_conditioning_scale=[0.5, math.nan]),
     ["controlnet_conditioning_scale", "finite"]),
    ("hint-bad-shape", dict(control_image=[_rgb(), np.zeros((32, 32, 2), np.uint8)]), ["control_image[1]", "channels"]),
    ("hint-bad-mode", dict(control_image=[_rgb(), Image.new("I;16", (32, 32))]), ["control_image[1]", "mode"]),
]


@pytest.mark.parametrize("kwargs,words", [c[1:] for c in CN_BAD], ids=[c[0] for c in CN_BAD])
def test_controlnet_inputs(cn_engine, kwargs, words):
    ok = dict(VALID, control_image=[_rgb(), _rgb()], guidance_scale=3.0)
    expected = cn_engine.generate(PROMPT, **ok).images
    before = cn_engine.counter.calls
    with pytest.raises(InvalidInputError) as info:
        cn_engine.generate(PROMPT, **dict(VALID, guidance_scale=3.0, **kwargs))
    for word in words:
        assert word in str(info.value), f"{word!r} not in message: {info.value}"
    assert cn_engine.counter.calls == before
    np.testing.assert_array_equal(cn_engine.generate(PROMPT, **ok).images, expected)


def test_controlnet_of_another_family_is_rejected(root):
    with pytest.raises(InvalidInputError, match="cross_attention_dim"):
        Engine.from_pretrained(tiny_pipeline("sd15", root), controlnet=tiny_pipeline("controlnet-sdxl", root))
