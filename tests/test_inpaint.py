"""Inpainting (generate(image=, mask_image=, strength=)) against diffusers' inpaint pipelines.

Both sides load the same tiny random-weight folders (tests/tiny_pipelines.py: "sd15-inpaint" has a
9-channel U-Net) and run fp32 on the CPU from the same seed; the engine draws its random numbers in
diffusers' order (image posterior, initial noise, masked-image posterior, per-step noise), so the
images match to <= 1e-3. Each group also checks that the mask matters, so a pipeline that ignored it
could not pass. Then: mask parsing, bad input, meta tensors (no host sync), 9-channel single files,
and the exported 9-channel U-Net in ONNX Runtime.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_pipelines import tiny_pipeline

from ldm_engine import Engine
from ldm_engine.errors import InvalidInputError
from ldm_engine.pipeline.inpaint import parse_mask

diffusers = pytest.importorskip("diffusers")
TOL = 1e-3
PROMPT = "a photo of an astronaut riding a horse"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny")


def _load(cls, path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = cls.from_pretrained(path, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def inpaint9(root):
    path = tiny_pipeline("sd15-inpaint", root)
    return _load(diffusers.StableDiffusionInpaintPipeline, path), Engine.from_pretrained(path)


@pytest.fixture(scope="module")
def sd15(root):
    path = tiny_pipeline("sd15", root)
    return _load(diffusers.StableDiffusionInpaintPipeline, path), Engine.from_pretrained(path)


def _image(seed, size=(32, 32)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[0], size[1], 3), dtype=np.uint8))


def _mask(seed, size=(32, 32), box=(8, 24, 4, 20)):
    """float32 (H, W) in [0, 1]: a box plus scattered grey values on both sides of 0.5."""
    rng = np.random.default_rng(seed)
    m = np.zeros(size, np.float32)
    y0, y1, x0, x1 = (round(v * size[0] / 32) if i < 2 else round(v * size[1] / 32) for i, v in enumerate(box))
    m[y0:y1, x0:x1] = 1.0
    spots = rng.random(size) < 0.15
    m[spots] = rng.random(int(spots.sum())).astype(np.float32)
    return m


def _pil_mask(seed, size=(32, 32), **kw):
    """An RGB PIL mask (the luminance path), channels slightly different."""
    m = (_mask(seed, size, **kw) * 255).astype(np.uint8)
    return Image.fromarray(np.stack([m, np.clip(m.astype(int) + 3, 0, 255).astype(np.uint8), m], -1))


def _compare(pipe, engine, *, seed=0, scheduler=None, **kw):
    saved = pipe.scheduler, engine.scheduler
    try:
        if scheduler is not None:
            cls, name = scheduler
            pipe.scheduler = cls.from_config(pipe.scheduler.config)
            engine.scheduler = name
        ref = pipe(generator=torch.Generator().manual_seed(seed), output_type="np", **kw).images
        ours = engine.generate(seed=seed, output_type="np", **kw).images
    finally:
        pipe.scheduler, engine.scheduler = saved
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= TOL, f"max abs diff {np.abs(ours - ref).max():.2e}"
    assert ours.std() > 0.02
    return ours


# ------------------------------------------------------------------------------ 9-channel models
@pytest.mark.parametrize("strength", [1.0, 0.75])
def test_inpainting_model_matches_diffusers(inpaint9, strength):
    pipe, engine = inpaint9
    assert engine.inpainting_unet and engine.latent_channels == 4
    kw = dict(prompt=PROMPT, negative_prompt="blurry, low quality", image=_image(0), strength=strength,
              num_inference_steps=4, guidance_scale=6.0, height=32, width=32)
    a = _compare(pipe, engine, mask_image=_pil_mask(1), **kw)
    b = engine.generate(mask_image=_pil_mask(2, box=(0, 16, 16, 32)), seed=0, output_type="np", **kw).images
    assert np.abs(a - b).max() > 1e-2  # the mask is used


def test_inpainting_batch_of_two_prompts_with_two_masks(inpaint9):
    pipe, engine = inpaint9
    masks = [_mask(3, (48, 40))[..., None], _mask(4, (48, 40), box=(0, 32, 16, 32))[..., None]]  # resized: nearest
    out = _compare(pipe, engine, prompt=["a red cube", "a blue sphere"], image=_image(5), mask_image=masks,
                   num_inference_steps=3, guidance_scale=4.0, height=32, width=32)
    assert out.shape[0] == 2 and np.abs(out[0] - out[1]).max() > 1e-2


def test_inpainting_model_with_controlnet(root):
    path, cn_path = tiny_pipeline("sd15-inpaint", root), tiny_pipeline("controlnet-sd", root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = diffusers.ControlNetModel.from_pretrained(cn_path)
    pipe = _load(diffusers.StableDiffusionControlNetInpaintPipeline, path, controlnet=net)
    engine = Engine.from_pretrained(path, controlnet=cn_path)
    kw = dict(prompt=PROMPT, image=_image(6), mask_image=_pil_mask(7), num_inference_steps=3,
              guidance_scale=5.0, height=32, width=32, controlnet_conditioning_scale=0.8)
    a = _compare(pipe, engine, control_image=_image(8), **kw)
    b = engine.generate(control_image=_image(9), seed=0, output_type="np", **kw).images
    assert np.abs(a - b).max() > 1e-2  # the ControlNet is used


def test_sdxl_inpainting_model_matches_diffusers(root):
    path = tiny_pipeline("sdxl-inpaint", root)
    pipe = _load(diffusers.StableDiffusionXLInpaintPipeline, path)
    engine = Engine.from_pretrained(path)
    assert engine.family == "sdxl" and engine.inpainting_unet
    out = _compare(pipe, engine, prompt=PROMPT, negative_prompt="blurry", image=_image(40), mask_image=_pil_mask(41),
                   strength=1.0, num_inference_steps=3, guidance_scale=5.0, height=32, width=32,
                   num_images_per_prompt=2)
    assert out.shape[0] == 2 and np.abs(out[0] - out[1]).max() > 1e-3


# ------------------------------------------------------------------------------ 4-channel models
@pytest.mark.parametrize("scheduler,strength", [
    (None, 0.6),                                                   # PNDM (the model's own)
    ((diffusers.EulerAncestralDiscreteScheduler, "euler_a"), 1.0),  # stochastic: per-step noise after the rest
    ((diffusers.DPMSolverMultistepScheduler, "dpmpp_2m"), 0.75),
], ids=["pndm", "euler_a", "dpmpp_2m"])
def test_masked_img2img_matches_diffusers(sd15, scheduler, strength):
    pipe, engine = sd15
    assert not engine.inpainting_unet
    kw = dict(prompt=PROMPT, negative_prompt="blurry", image=_image(10), strength=strength,
              num_inference_steps=4, guidance_scale=5.0, height=32, width=32)
    a = _compare(pipe, engine, scheduler=scheduler, mask_image=_pil_mask(11), **kw)
    if scheduler is None:
        b = engine.generate(mask_image=_pil_mask(12, box=(16, 32, 0, 32)), seed=0, output_type="np", **kw).images
        assert np.abs(a - b).max() > 1e-2


def test_masked_img2img_sdxl_matches_diffusers(root):
    path = tiny_pipeline("sdxl", root)
    pipe = _load(diffusers.StableDiffusionXLInpaintPipeline, path)
    engine = Engine.from_pretrained(path)
    out = _compare(pipe, engine, prompt=PROMPT, image=_image(13), mask_image=torch.from_numpy(_mask(14))[None],
                   strength=0.7, num_inference_steps=4, guidance_scale=5.0, height=32, width=32,
                   num_images_per_prompt=2)
    assert out.shape[0] == 2 and np.abs(out[0] - out[1]).max() > 1e-3


def test_masked_img2img_keeps_the_known_region_latents(sd15):
    """After the last step the known region is the encoded image itself: two seeds differ only inside."""
    _, engine = sd15
    mask = _mask(15)
    kw = dict(image=_image(16), mask_image=mask, num_inference_steps=3, guidance_scale=1.0, output_type="latent")
    a = engine.generate(PROMPT, seed=1, **kw).images
    c = engine.generate("another prompt", seed=1, **kw).images
    known = torch.nn.functional.interpolate(torch.from_numpy(mask >= 0.5).float()[None, None], size=(16, 16)) == 0
    known = known.expand_as(a)
    assert torch.equal(a[known], c[known]) and not torch.allclose(a[~known], c[~known])


# ------------------------------------------------------------------------------ masks
def test_mask_parsing_layouts_and_luminance():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
    # RGB -> luminance as PIL's "L" (to rounding), for PIL, arrays and tensors
    want = np.asarray(Image.fromarray(rgb).convert("L"), np.float32) / 255
    from_pil = parse_mask(Image.fromarray(rgb)).to_tensor(20, 24)
    assert torch.equal(from_pil[0, 0], torch.from_numpy(want >= 0.5).float())
    lum = parse_mask(rgb).tensor[0, 0].numpy()
    assert np.abs(lum - want).max() <= 1 / 255
    rgba = np.concatenate([rgb, rng.integers(0, 256, (20, 24, 1), dtype=np.uint8)], -1)
    assert torch.equal(parse_mask(rgba).tensor, parse_mask(rgb).tensor)  # alpha ignored
    t = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    assert torch.allclose(parse_mask(t).tensor[0, 0], torch.from_numpy(lum), atol=1e-6)
    # one channel: (H, W), (H, W, 1), (1, H, W), (N, 1, H, W), bool; binarised at 0.5 after resizing
    gray = rng.random((20, 24)).astype(np.float32)
    for m in (gray, gray[..., None], torch.from_numpy(gray)[None], torch.from_numpy(gray)[None, None]):
        assert torch.equal(parse_mask(m).tensor[0, 0], torch.from_numpy(gray))
    assert torch.equal(parse_mask(gray > 0.3).tensor[0, 0], torch.from_numpy(gray > 0.3).float())
    big = parse_mask(gray).to_tensor(40, 48)
    assert big.shape == (1, 1, 40, 48) and set(big.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(big[0, 0, ::2, ::2], torch.from_numpy(gray >= 0.5).float())
    assert parse_mask([gray, gray]).batch_size == 2 and parse_mask([Image.fromarray(rgb)] * 3).batch_size == 3


@pytest.mark.parametrize("mask,exc,words", [
    (torch.full((1, 32, 32), 1.5), InvalidInputError, ["mask_image", "[0, 1]"]),
    (np.full((32, 32), -0.1, np.float32), InvalidInputError, ["mask_image", "[0, 1]"]),
    (np.full((32, 32), np.nan, np.float32), InvalidInputError, ["mask_image", "[0, 1]"]),
    (np.zeros((32, 32, 2), np.float32), InvalidInputError, ["mask_image", "channels"]),
    (torch.zeros(1, 1, 1, 32, 32), InvalidInputError, ["mask_image", "shape"]),
    (np.zeros((32, 32), np.int32), InvalidInputError, ["mask_image", "dtype"]),
    ("mask.png", TypeError, ["mask_image"]),
    ([], InvalidInputError, ["mask_image", "empty"]),
])
def test_bad_masks(mask, exc, words):
    with pytest.raises(exc) as info:
        parse_mask(mask)
    assert all(w in str(info.value) for w in words), str(info.value)


class _Calls:
    def __init__(self, engine):
        self.n = 0
        for m in (engine.components.unet, engine.components.text_encoder, engine.components.vae):
            m.register_forward_pre_hook(self._hit)
        vae = engine.components.vae
        for name in ("encode", "decode"):
            setattr(vae, name, self._wrap(getattr(vae, name)))

    def _hit(self, *_):
        self.n += 1

    def _wrap(self, fn):
        def wrapped(*a, **k):
            self.n += 1
            return fn(*a, **k)
        return wrapped


@pytest.fixture(scope="module")
def counted(root):
    cache = {}

    def get(kind):
        if kind not in cache:
            engine = Engine.from_pretrained(tiny_pipeline(kind, root))
            cache[kind] = engine, _Calls(engine)
        return cache[kind]

    return get


@pytest.mark.parametrize("kind,kwargs,words", [
    ("sd15", dict(mask_image=_mask(0)), ["mask_image", "image="]),
    ("sd15-inpaint", dict(), ["inpainting model", "mask_image"]),
    ("sd15-inpaint", dict(image=_image(0)), ["inpainting model", "mask_image"]),
    ("sd15", dict(image=_image(0), mask_image=torch.full((32, 32), 2.0)), ["mask_image", "[0, 1]"]),
    ("sd15", dict(image=_image(0), mask_image=[_mask(0)] * 3), ["mask_image", "3 images"]),
    ("sd15", dict(image=[_image(0)] * 3, mask_image=_mask(0)), ["image", "3 images"]),
    ("sd15", dict(image=_image(0), mask_image=_mask(0), strength=0.2), ["num_inference_steps * strength"]),
])
def test_bad_inpainting_input_is_rejected_before_any_network(counted, kind, kwargs, words):
    engine, calls = counted(kind)
    before = calls.n
    with pytest.raises(InvalidInputError) as info:
        engine.generate(["a", "b"], num_inference_steps=2, output_type="latent", **kwargs)
    assert all(w in str(info.value) for w in words), str(info.value)
    assert calls.n == before
    ok = dict(image=_image(1), mask_image=_mask(1)) if kind == "sd15-inpaint" else {}
    assert engine.generate("a", num_inference_steps=1, output_type="latent", **ok).images.shape == (1, 4, 16, 16)


# ------------------------------------------------------------------------------ no host sync
@pytest.mark.parametrize("kind,strength", [("sd15-inpaint", 1.0), ("sd15-inpaint", 0.7), ("sd15", 0.8)])
def test_inpainting_runs_on_meta_tensors(root, kind, strength):
    from ldm_engine.loading import load_pipeline

    comps = load_pipeline(tiny_pipeline(kind, root))
    for m in (comps.unet, comps.vae, comps.text_encoder):
        m.to("meta")
    engine = Engine(comps, device="meta", scheduler="euler_a")
    out = engine.generate(PROMPT, image=_image(0), mask_image=_mask(0), strength=strength, num_inference_steps=3,
                          guidance_scale=3.0, num_images_per_prompt=2, output_type="latent")
    assert out.images.is_meta and out.images.shape == (2, 4, 16, 16)


# ------------------------------------------------------------------------------ loading / export
def test_single_file_inpainting_checkpoint_is_detected_by_conv_in(tmp_path):
    """An ldm-layout file whose conv_in takes 9 channels loads as an inpainting U-Net even when the
    config folder says 4; outputs match diffusers' U-Net built with in_channels=9."""
    import safetensors.torch as st
    from diffusers import UNet2DConditionModel
    from loading_fixtures import pipeline_to_single_file, tiny_pipeline_folder

    from ldm_engine.loading import load_pipeline

    state = pipeline_to_single_file("sd1")
    key = "model.diffusion_model.input_blocks.0.0.weight"
    g = torch.Generator().manual_seed(0)
    c0, _, k, _ = state[key].shape
    state[key] = torch.randn(c0, 9, k, k, generator=g) * 0.1
    path = tmp_path / "sd1-inpainting.safetensors"
    st.save_file(state, path)
    folder = tiny_pipeline_folder("sd1")
    ours = load_pipeline(path, config=folder)
    assert ours.unet.config.in_channels == 9
    assert torch.equal(ours.unet.conv_in.weight, state[key])

    ref = UNet2DConditionModel.from_pretrained(folder / "unet", in_channels=9, low_cpu_mem_usage=False,
                                               ignore_mismatched_sizes=True)
    ref_state = ref.state_dict()
    ref_state["conv_in.weight"] = state[key]
    ref_state.update({k: v for k, v in ours.unet.state_dict().items() if k in ref_state and k != "conv_in.weight"})
    ref.load_state_dict(ref_state)
    x = torch.randn(2, 9, 12, 20, generator=g)
    ctx = torch.randn(2, 7, ref.config.cross_attention_dim, generator=g)
    t = torch.tensor([3.0, 721.0])
    with torch.no_grad():
        want, got = ref(x, t, ctx).sample, ours.unet(x, t, ctx)
    assert float((got - want).abs().max() / want.abs().max()) <= 1e-4


def test_exported_inpainting_unet_runs_in_onnxruntime(root, tmp_path):
    """The 9-channel U-Net exports with a 9-channel ``sample`` contract; an engine whose U-Net is the
    ONNX Runtime session inpaints like the torch one."""
    pytest.importorskip("onnxruntime")
    from ldm_engine.export.exporter import ExportOptions, export_model
    from ldm_engine.export.runtime import load_exported_components

    path = tiny_pipeline("sd15-inpaint", root)
    opts = ExportOptions(components=("unet",), height=(16, 32, 64), width=(16, 32, 64), batch=(1, 1, 2),
                         progress=False, overwrite=True)
    manifest = export_model(str(path), tmp_path, opts, log=lambda *a: None)
    sample = manifest["networks"]["unet"]["contract"]["inputs"][0]
    assert sample["name"] == "sample" and sample["dims"][1] == 9
    exported, _ = load_exported_components(tmp_path, backend="onnxruntime", device="cpu")
    e_torch = Engine.from_pretrained(path)
    e_ort = Engine(dataclasses.replace(e_torch.components, unet=exported.unet), name=str(path))
    assert e_ort.inpainting_unet
    kw = dict(prompt=["a tree", "a dog"], image=_image(20, (32, 48)), mask_image=_mask(21, (32, 48)), strength=0.8,
              num_inference_steps=3, guidance_scale=3.0, seed=4, output_type="np")
    a, b = e_torch.generate(**kw).images, e_ort.generate(**kw).images
    assert a.shape == (2, 32, 48, 3) and np.abs(a - b).max() <= TOL


# ------------------------------------------------------------------------------ CLI
def test_cli_inpaint(root, tmp_path, capsys):
    from ldm_engine.cli import main

    init, mask, out = tmp_path / "init.png", tmp_path / "mask.png", tmp_path / "out.png"
    _image(30, (40, 40)).save(init)
    _pil_mask(31, (40, 40)).convert("L").save(mask)
    model = tiny_pipeline("sd15-inpaint", root)
    argv = ["generate", "--model", str(model), "--prompt", "a dog", "--image", str(init), "--mask", str(mask),
            "--strength", "0.9", "--steps", "3", "--seed", "2", "--out", str(out)]
    assert main(argv) == 0
    assert "vae_encode" in capsys.readouterr().out
    want = Engine.from_pretrained(model).generate("a dog", image=Image.open(init), mask_image=Image.open(mask),
                                                  strength=0.9, num_inference_steps=3, seed=2).images[0]
    np.testing.assert_array_equal(np.asarray(Image.open(out)), np.asarray(want))
    assert main(["generate", "--model", str(model), "--prompt", "a dog", "--mask", str(mask),
                 "--out", str(tmp_path / "x.png")]) == 2
    assert "mask_image needs image=" in capsys.readouterr().err

