"""Engine.generate() end to end against the diffusers pipelines, on tiny random-weight models.

Both sides load the same folders (tests/tiny_pipelines.py) and run in fp32 on the CPU with the same
initial latents and the same seed; the engine draws its noise in diffusers' order, so stochastic
samplers and img2img (VAE posterior sample + add_noise) match too. Tolerance: max abs diff <= 1e-3
on output_type="np" images. Each group also checks that the feature under test changes the image,
so a pipeline that ignored it could not pass.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_pipelines import tiny_pipeline

from ldm_engine import Engine
from ldm_engine.errors import InvalidInputError

diffusers = pytest.importorskip("diffusers")
TOL = 1e-3
PROMPT = "a photo of an astronaut riding a horse"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="module")
def paths(root):
    kinds = ("sd15", "sd-turbo", "sdxl", "sdxl-turbo", "controlnet-sd", "controlnet-sd-2", "controlnet-sdxl")
    return {k: tiny_pipeline(k, root) for k in kinds}


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _load(cls, path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _quiet(cls.from_pretrained(path, **kw))


@pytest.fixture(scope="module")
def sd_turbo(paths):
    return _load(diffusers.StableDiffusionPipeline, paths["sd-turbo"]), Engine.from_pretrained(paths["sd-turbo"])


@pytest.fixture(scope="module")
def sd15(paths):
    return _load(diffusers.StableDiffusionPipeline, paths["sd15"]), Engine.from_pretrained(paths["sd15"])


@pytest.fixture(scope="module")
def sdxl_turbo(paths):
    return _load(diffusers.StableDiffusionXLPipeline, paths["sdxl-turbo"]), Engine.from_pretrained(paths["sdxl-turbo"])


def _latents(engine, batch=1, height=32, width=32, seed=123):
    g = torch.Generator().manual_seed(seed)
    f = engine.vae_scale_factor
    return torch.randn(batch, 4, height // f, width // f, generator=g)


def _compare(pipe, engine, *, seed=0, scheduler=None, **kw):
    """Runs both with the same arguments (and sampler, when given); returns (reference, ours) np images."""
    saved = pipe.scheduler, engine.scheduler
    try:
        if scheduler is not None:
            diff_cls, name = scheduler
            pipe.scheduler = diff_cls.from_config(pipe.scheduler.config)
            engine.scheduler = name
        # diffusers' ControlNet pipelines call the control image `image`
        ref_kw = {("image" if k == "control_image" else k): v for k, v in kw.items()}
        ref = pipe(generator=torch.Generator().manual_seed(seed), output_type="np", **ref_kw).images
        ours = engine.generate(seed=seed, output_type="np", **kw).images
    finally:
        pipe.scheduler, engine.scheduler = saved
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= TOL, f"max abs diff {np.abs(ours - ref).max():.2e}"
    assert ours.std() > 0.02  # not a flat / saturated image
    return ref, ours


# ----------------------------------------------------------------------------- SD-Turbo style
@pytest.mark.parametrize("steps", [1, 4])
def test_sd_turbo_euler_trailing(sd_turbo, steps):
    pipe, engine = sd_turbo
    assert engine.scheduler == "euler" and engine.defaults.turbo
    lat = _latents(engine)
    _compare(pipe, engine, prompt=PROMPT, num_inference_steps=steps, guidance_scale=0.0, latents=lat)


def test_sd_turbo_batch_of_prompts_and_images_per_prompt(sd_turbo):
    pipe, engine = sd_turbo
    lat = _latents(engine, batch=4)
    ref, ours = _compare(pipe, engine, prompt=["a red cube", "a blue sphere"], num_images_per_prompt=2,
                         num_inference_steps=2, guidance_scale=0.0, latents=lat)
    assert ours.shape[0] == 4
    assert np.abs(ours[0] - ours[2]).max() > 1e-2  # the two prompts lead to different images


# ----------------------------------------------------------------------------- SDXL-Turbo style
def test_sdxl_turbo_one_step(sdxl_turbo):
    pipe, engine = sdxl_turbo
    assert engine.scheduler == "euler_a" and engine.defaults.turbo
    _compare(pipe, engine, prompt=PROMPT, num_inference_steps=1, guidance_scale=0.0, latents=_latents(engine))


def test_sdxl_turbo_four_steps_deterministic_sampler(sdxl_turbo):
    pipe, engine = sdxl_turbo
    sched = (diffusers.EulerDiscreteScheduler, "euler")
    _compare(pipe, engine, scheduler=sched, prompt=PROMPT, num_inference_steps=4, guidance_scale=0.0,
             latents=_latents(engine))


def test_sdxl_turbo_four_steps_ancestral_same_seed(sdxl_turbo):
    # Euler ancestral adds fresh noise each step: equal only because noise is drawn in diffusers' order.
    pipe, engine = sdxl_turbo
    sched = (diffusers.EulerAncestralDiscreteScheduler, "euler_a")
    _, a = _compare(pipe, engine, scheduler=sched, seed=7, prompt=PROMPT, num_inference_steps=4,
                    guidance_scale=0.0, latents=_latents(engine))
    b = engine.generate(PROMPT, seed=8, num_inference_steps=4, guidance_scale=0.0,
                        latents=_latents(engine), output_type="np").images
    assert np.abs(a - b).max() > 1e-2  # the step noise matters


def test_sdxl_cfg_negative_prompt_and_zeroed_uncond(paths):
    pipe = _load(diffusers.StableDiffusionXLPipeline, paths["sdxl"])
    engine = Engine.from_pretrained(paths["sdxl"])
    assert not engine.defaults.turbo and engine.force_zeros_for_empty_prompt
    lat = _latents(engine)
    _, with_neg = _compare(pipe, engine, prompt=PROMPT, negative_prompt="blurry", num_inference_steps=3,
                           guidance_scale=5.0, latents=lat)
    # No negative prompt: force_zeros_for_empty_prompt -> zero unconditional embeddings, as diffusers.
    _, zeroed = _compare(pipe, engine, prompt=PROMPT, num_inference_steps=3, guidance_scale=5.0, latents=lat)
    assert np.abs(with_neg - zeroed).max() > 1e-2


# ----------------------------------------------------------------------------- SD1.5 style with CFG
@pytest.mark.parametrize("scheduler", [("DDIMScheduler", "ddim"), ("PNDMScheduler", "pndm"),
                                       ("DPMSolverMultistepScheduler", "dpmpp_2m")])
def test_sd15_cfg_negative_prompt(sd15, scheduler):
    pipe, engine = sd15
    sched = (getattr(diffusers, scheduler[0]), scheduler[1])
    lat = _latents(engine)
    _, ours = _compare(pipe, engine, scheduler=sched, prompt=PROMPT, negative_prompt="low quality, blurry",
                       num_inference_steps=5, guidance_scale=7.5, latents=lat)
    plain = engine.generate(PROMPT, num_inference_steps=5, guidance_scale=7.5, latents=lat, output_type="np").images
    assert np.abs(ours - plain).max() > 1e-2  # the negative prompt is used


# ----------------------------------------------------------------------------- img2img
@pytest.fixture(scope="module")
def init_image():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))


@pytest.mark.parametrize("steps", [2, 4])
def test_img2img_sd_turbo_strength_half(paths, init_image, steps):
    pipe = _load(diffusers.StableDiffusionImg2ImgPipeline, paths["sd-turbo"])
    engine = Engine.from_pretrained(paths["sd-turbo"])
    _, ours = _compare(pipe, engine, seed=3, prompt=PROMPT, image=init_image, strength=0.5,
                       num_inference_steps=steps, guidance_scale=0.0)
    assert ours.shape == (1, 40, 48, 3)  # the init image's size
    stronger = engine.generate(PROMPT, image=init_image, strength=1.0, num_inference_steps=steps,
                               guidance_scale=0.0, seed=3, output_type="np").images
    assert np.abs(ours - stronger).max() > 1e-2


def test_img2img_sd15_cfg(paths, init_image):
    pipe = _load(diffusers.StableDiffusionImg2ImgPipeline, paths["sd15"])
    engine = Engine.from_pretrained(paths["sd15"])
    _compare(pipe, engine, seed=5, prompt=PROMPT, negative_prompt="dark", image=init_image, strength=0.5,
             num_inference_steps=4, guidance_scale=7.5)


def test_img2img_sdxl_turbo(paths, init_image, sdxl_turbo):
    pipe = _load(diffusers.StableDiffusionXLImg2ImgPipeline, paths["sdxl-turbo"])
    _compare(pipe, sdxl_turbo[1], seed=6, prompt=PROMPT, image=init_image, strength=0.5,
             num_inference_steps=4, guidance_scale=0.0)


def test_img2img_image_formats_agree(paths, init_image):
    engine = Engine.from_pretrained(paths["sd-turbo"])
    arr = np.asarray(init_image)
    kw = dict(strength=0.5, num_inference_steps=2, seed=1, output_type="np")
    a = engine.generate(PROMPT, image=init_image, **kw).images
    b = engine.generate(PROMPT, image=arr, **kw).images
    c = engine.generate(PROMPT, image=torch.from_numpy(arr).permute(2, 0, 1).float() / 255, **kw).images
    np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(a, c, atol=1e-6)


# ----------------------------------------------------------------------------- ControlNet
@pytest.fixture(scope="module")
def hints():
    rng = np.random.default_rng(1)
    return (Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)),
            Image.fromarray(rng.integers(0, 256, (48, 48), dtype=np.uint8)))  # grayscale, resized


def test_controlnet_scale_half(paths, hints):
    net = diffusers.ControlNetModel.from_pretrained(paths["controlnet-sd"])
    pipe = _load(diffusers.StableDiffusionControlNetPipeline, paths["sd15"], controlnet=net)
    engine = Engine.from_pretrained(paths["sd15"], controlnet=paths["controlnet-sd"])
    _, ours = _compare(pipe, engine, seed=1, prompt=PROMPT, control_image=hints[0], controlnet_conditioning_scale=0.5,
                       num_inference_steps=3, guidance_scale=7.5)
    assert ours.shape == (1, 24, 40, 3)  # the control image's size
    off = engine.generate(PROMPT, control_image=hints[0], controlnet_conditioning_scale=0.0, seed=1,
                          num_inference_steps=3, guidance_scale=7.5, output_type="np")
    assert np.abs(ours - off.images).max() > 1e-2
    # one entry per U-Net call: PNDM (this model's sampler) makes one extra call
    assert len(off.timings["controlnet"]) == len(off.timings["unet"]) == 4


def test_global_pool_controlnet_guess_mode_like_diffusers(paths, hints, tmp_path):
    # global_pool_conditions (shuffle-type nets): diffusers runs such a net on the conditional half
    # only and gives the unconditional half zero residuals.
    net = diffusers.ControlNetModel.from_pretrained(paths["controlnet-sd"])
    net.register_to_config(global_pool_conditions=True)
    net.save_pretrained(tmp_path / "pooled")
    pipe = _load(diffusers.StableDiffusionControlNetPipeline, paths["sd15"], controlnet=net)
    engine = Engine.from_pretrained(paths["sd15"], controlnet=tmp_path / "pooled")
    kw = dict(prompt=PROMPT, height=32, width=32, num_inference_steps=2, guidance_scale=7.5)
    ref = pipe(image=hints[0], generator=torch.Generator().manual_seed(4), output_type="np", **kw).images
    ours = engine.generate(control_image=hints[0], seed=4, output_type="np", **kw).images
    assert np.abs(ours - ref).max() <= TOL


def test_two_controlnets(paths, hints):
    nets = [diffusers.ControlNetModel.from_pretrained(paths[k]) for k in ("controlnet-sd", "controlnet-sd-2")]
    pipe = _load(diffusers.StableDiffusionControlNetPipeline, paths["sd15"], controlnet=nets)
    engine = Engine.from_pretrained(paths["sd15"], controlnet=[paths["controlnet-sd"], paths["controlnet-sd-2"]])
    kw = dict(prompt=PROMPT, height=32, width=32, num_inference_steps=3, guidance_scale=7.5)
    ref = pipe(image=list(hints), controlnet_conditioning_scale=[0.5, 0.8], generator=torch.Generator().manual_seed(2),
               output_type="np", **kw).images
    ours = engine.generate(control_image=list(hints), controlnet_conditioning_scale=[0.5, 0.8], seed=2,
                           output_type="np", **kw).images
    assert np.abs(ours - ref).max() <= TOL
    only_first = engine.generate(control_image=list(hints), controlnet_conditioning_scale=[0.5, 0.0], seed=2,
                                 output_type="np", **kw).images
    assert np.abs(ours - only_first).max() > 1e-2


def test_sdxl_controlnet(paths, hints):
    net = diffusers.ControlNetModel.from_pretrained(paths["controlnet-sdxl"])
    pipe = _load(diffusers.StableDiffusionXLControlNetPipeline, paths["sdxl"], controlnet=net)
    engine = Engine.from_pretrained(paths["sdxl"], controlnet=paths["controlnet-sdxl"])
    _compare(pipe, engine, seed=4, prompt=PROMPT, negative_prompt="blurry", control_image=hints[0],
             controlnet_conditioning_scale=0.5, num_inference_steps=3, guidance_scale=5.0)


def test_controlnet_without_guidance_ancestral_sampler(paths, hints):
    net = diffusers.ControlNetModel.from_pretrained(paths["controlnet-sd"])
    pipe = _load(diffusers.StableDiffusionControlNetPipeline, paths["sd15"], controlnet=net)
    engine = Engine.from_pretrained(paths["sd15"], controlnet=paths["controlnet-sd"])
    sched = (diffusers.EulerAncestralDiscreteScheduler, "euler_a")
    kw = dict(prompt=PROMPT, controlnet_conditioning_scale=0.8, num_inference_steps=3, guidance_scale=1.0,
              height=32, width=32)
    _, ours = _compare(pipe, engine, scheduler=sched, seed=3, control_image=hints[1], **kw)
    _, other = _compare(pipe, engine, scheduler=sched, seed=3, control_image=hints[0], **kw)
    assert np.abs(ours - other).max() > 1e-2  # the control image is used


def test_controlnet_img2img_like_diffusers(paths, hints, init_image):
    net = diffusers.ControlNetModel.from_pretrained(paths["controlnet-sd"])
    pipe = _load(diffusers.StableDiffusionControlNetImg2ImgPipeline, paths["sd15"], controlnet=net)
    pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    engine = Engine.from_pretrained(paths["sd15"], controlnet=paths["controlnet-sd"], scheduler="dpmpp_2m")
    kw = dict(prompt=PROMPT, negative_prompt="dark", image=init_image, strength=0.6, num_inference_steps=5,
              guidance_scale=6.0, controlnet_conditioning_scale=0.7, height=32, width=32, output_type="np")
    ref = pipe(control_image=hints[0], generator=torch.Generator().manual_seed(8), **kw).images
    ours = engine.generate(control_image=hints[0], seed=8, **kw).images
    assert np.abs(ours - ref).max() <= TOL, f"max abs diff {np.abs(ours - ref).max():.2e}"
    other = engine.generate(control_image=hints[1], seed=8, **kw).images
    assert np.abs(ours - other).max() > 1e-2


@pytest.fixture(scope="module")
def pooled_controlnet(paths, root):
    """controlnet-sd-2 as a global-pool (guess mode) ControlNet."""
    net = diffusers.ControlNetModel.from_pretrained(paths["controlnet-sd-2"])
    net.register_to_config(global_pool_conditions=True)
    net.save_pretrained(root / "controlnet-pooled")
    return root / "controlnet-pooled"


@pytest.mark.parametrize("steps,guidance,scheduler", [(1, 1.0, "euler"), (3, 7.5, "pndm"), (2, 4.0, "euler_a")])
def test_each_control_image_is_embedded_once_per_generate(paths, hints, pooled_controlnet, steps, guidance,
                                                         scheduler):
    """One hint embedding per ControlNet per generate(), on the un-duplicated batch, whatever the number
    of steps and guidance; a normal and a guess-mode ControlNet together."""
    engine = Engine.from_pretrained(paths["sd15"], controlnet=[paths["controlnet-sd"], pooled_controlnet],
                                    scheduler=scheduler)
    embedded, net_calls, handles = [[], []], [0, 0], []
    for i, net in enumerate(engine.controlnets):
        handles.append(net.controlnet_cond_embedding.register_forward_hook(
            lambda m, args, out, i=i: embedded[i].append(args[0].shape[0])))
        handles.append(net.register_forward_hook(lambda *_, i=i: net_calls.__setitem__(i, net_calls[i] + 1)))
    try:
        for seed in (1, 2):
            embedded[:], net_calls[:] = [[], []], [0, 0]
            r = engine.generate(PROMPT, control_image=list(hints), num_images_per_prompt=2, num_inference_steps=steps,
                                guidance_scale=guidance, height=32, width=32, seed=seed, output_type="latent")
            calls = len(r.timings["unet"])
            assert embedded == [[2], [2]], embedded      # once each, batch 2 (not 4 with guidance)
            assert net_calls == [calls, calls] and calls >= steps
            assert r.timings["controlnet_hint"] > 0 and len(r.timings["controlnet"]) == calls
    finally:
        for h in handles:
            h.remove()


def test_controlnet_without_embed_hint_gets_the_pixels_every_step(paths, hints):
    """A network without embed_hint (an exported ONNX / TensorRT ControlNet takes pixels) gets the control
    image in every call, doubled for guidance: the same images as the hint embedded once."""
    engine = Engine.from_pretrained(paths["sd15"], controlnet=paths["controlnet-sd"])
    net, batches = engine.controlnets[0], []

    class PixelsOnly:
        config = net.config

        def __call__(self, *args, **kwargs):
            batches.append(kwargs["controlnet_cond"].shape)
            return net(*args, **kwargs)

    pixels_only = Engine(engine.components, [PixelsOnly()], scheduler=engine.scheduler)
    kw = dict(control_image=hints[0], num_inference_steps=2, guidance_scale=5.0, height=32, width=32, seed=3,
              output_type="np")
    r = pixels_only.generate(PROMPT, **kw)
    assert batches == [(2, 3, 32, 32)] * len(r.timings["unet"])
    np.testing.assert_allclose(r.images, engine.generate(PROMPT, **kw).images, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- engine behaviour
def test_seed_reproducible_and_latents_override(sd_turbo):
    _, engine = sd_turbo
    kw = dict(num_inference_steps=2, output_type="np")
    a = engine.generate(PROMPT, seed=11, **kw)
    b = engine.generate(PROMPT, seed=11, **kw)
    c = engine.generate(PROMPT, seed=12, **kw)
    assert a.seed == 11 and np.array_equal(a.images, b.images)
    assert np.abs(a.images - c.images).max() > 1e-2
    # latents replace the seeded initial noise
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(11))
    d = engine.generate(PROMPT, seed=99, latents=noise, **kw)
    np.testing.assert_array_equal(d.images, a.images)
    assert engine.generate(PROMPT, **kw).seed is not None  # a random seed is reported


def test_defaults_by_family(paths, sd_turbo, sd15, sdxl_turbo):
    turbo = sd_turbo[1]
    assert turbo.defaults.turbo and turbo.defaults.num_inference_steps == 1
    assert turbo.defaults.guidance_scale == 0.0 and (turbo.defaults.height, turbo.defaults.width) == (32, 32)
    r = turbo.generate(PROMPT, seed=0)
    assert len(r.timings["unet"]) == 1 and r.images[0].size == (32, 32)
    assert sdxl_turbo[1].defaults.turbo and sdxl_turbo[1].defaults.num_inference_steps == 1
    d = sd15[1].defaults
    assert not d.turbo and (d.num_inference_steps, d.guidance_scale) == (25, 7.5)
    d = Engine.from_pretrained(paths["sdxl"]).defaults
    assert not d.turbo and (d.num_inference_steps, d.guidance_scale) == (30, 5.0)
    # turbo needs both the trailing schedule and the name; an explicit model_index hint wins
    comps = dataclasses.replace(turbo.components, source="/models/my-model")
    assert not Engine(comps, name="my-model").defaults.turbo
    assert Engine(comps, name="someone/my-turbo").defaults.turbo
    hinted = Engine(comps, name="x", model_index={"_ldm_engine_defaults": {"turbo": False, "num_inference_steps": 3}})
    assert not hinted.defaults.turbo and hinted.defaults.num_inference_steps == 3
    # turbo img2img: just enough steps for one denoising step
    assert turbo.defaults.img2img_steps(0.5) == 2 and turbo.defaults.img2img_steps(0.3) == 4


def test_guidance_at_most_one_runs_conditional_branch_only(sd15):
    _, engine = sd15
    batches = []
    handle = engine.components.unet.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    try:
        engine.generate(PROMPT, guidance_scale=1.0, num_inference_steps=1, seed=0, output_type="np")
        engine.generate(PROMPT, guidance_scale=1.5, num_inference_steps=1, seed=0, output_type="np")
    finally:
        handle.remove()
    assert batches == [1, 2]


def test_output_types_and_timings(sd_turbo):
    _, engine = sd_turbo
    kw = dict(num_inference_steps=3, seed=5)
    pil = engine.generate(PROMPT, **kw)
    arr = engine.generate(PROMPT, output_type="np", **kw)
    pt = engine.generate(PROMPT, output_type="pt", **kw)
    assert isinstance(pil.images, list) and pil.images[0].mode == "RGB" and pil.images[0].size == (32, 32)
    assert arr.images.shape == (1, 32, 32, 3) and 0 <= arr.images.min() and arr.images.max() <= 1
    assert pt.images.shape == (1, 3, 32, 32) and pt.images.dtype == torch.float32
    np.testing.assert_array_equal(np.asarray(pil.images[0]), (arr.images[0] * 255).round().astype(np.uint8))
    np.testing.assert_allclose(pt.images.permute(0, 2, 3, 1).numpy(), arr.images)
    t = arr.timings
    assert set(t) >= {"text_encoder", "controlnet", "unet", "vae_decode", "total"}
    assert len(t["unet"]) == 3 and t["controlnet"] == [] and t["controlnet_hint"] == 0.0
    assert all(v >= 0 for v in [t["text_encoder"], t["vae_decode"], *t["unet"]])
    assert t["total"] >= t["text_encoder"] + sum(t["unet"]) + t["vae_decode"]
    lat = engine.generate(PROMPT, output_type="latent", **kw).images
    assert lat.shape == (1, 4, 16, 16)


def test_fp16_runs_vae_in_fp32_when_force_upcast(paths, sdxl_turbo):
    engine = Engine.from_pretrained(paths["sdxl-turbo"], dtype="fp16")
    assert engine.unet_dtype == torch.float16 and engine.vae_dtype == torch.float32
    kw = dict(seed=0, num_inference_steps=2, guidance_scale=2.0, output_type="np")
    half = engine.generate(PROMPT, **kw).images
    full = sdxl_turbo[1].generate(PROMPT, **kw).images
    assert np.isfinite(half).all() and np.abs(half - full).max() < 0.05


def test_fp16_keeps_sd_vae_in_fp16_despite_force_upcast(paths):
    # SD1/SD2 VAE configs say force_upcast too, but diffusers' SD pipelines ignore it: so do we.
    engine = Engine.from_pretrained(paths["sd-turbo"], dtype="fp16")
    assert engine.components.vae.config.force_upcast
    assert engine.unet_dtype == torch.float16 and engine.vae_dtype == torch.float16


def test_vae_dtype_bf16_replaces_the_fp32_upcast(paths, sdxl_turbo):
    """vae_dtype="bf16": the SDXL VAE runs in bf16 (fp32's range: no fp16 overflow) instead of fp32; the
    images stay within bf16's rounding of the fp32 decode of the same latents."""
    kw = dict(seed=0, num_inference_steps=2, guidance_scale=2.0)
    engine = Engine.from_pretrained(paths["sdxl-turbo"], dtype="fp16", vae_dtype="bf16")
    assert engine.unet_dtype == torch.float16 and engine.vae_dtype == torch.bfloat16
    assert {p.dtype for p in engine.components.vae.parameters()} == {torch.bfloat16}
    latents = engine.generate(PROMPT, output_type="latent", **kw).images
    images = engine.generate(PROMPT, output_type="pt", **kw).images
    vae = copy.deepcopy(engine.components.vae).float()
    scale = vae.config.scaling_factor
    with torch.no_grad():  # the fp32 decode of the same latents, and torch's own bf16 error on it
        ref = (vae.decode(latents / scale) / 2 + 0.5).clamp(0, 1)
        bf16_ref = (vae.to(torch.bfloat16).decode((latents / scale).bfloat16()).float() / 2 + 0.5).clamp(0, 1)
    err, own_err = (images - ref).abs().max().item(), (bf16_ref - ref).abs().max().item()
    assert 0 < own_err and err <= 2 * own_err + 1e-3, (err, own_err)
    # an explicit vae_dtype wins over the fp32 rule, and over the engine dtype
    assert Engine.from_pretrained(paths["sdxl-turbo"], dtype="fp16", vae_dtype=torch.float16).vae_dtype == \
        torch.float16
    assert Engine.from_pretrained(paths["sd-turbo"], vae_dtype="bf16").vae_dtype == torch.bfloat16


@pytest.mark.parametrize("bad, match", [("int8", "vae_dtype must be one of"), (torch.int32, "vae_dtype must be"),
                                        (3, "vae_dtype must be")])
def test_vae_dtype_errors(paths, bad, match):
    with pytest.raises(InvalidInputError, match=match):
        Engine.from_pretrained(paths["sd-turbo"], vae_dtype=bad)


@pytest.mark.cuda
def test_cuda_fp16_tiny(paths):
    engine = Engine.from_pretrained(paths["sdxl-turbo"], device="cuda")
    assert engine.dtype == torch.float16 and engine.vae_dtype == torch.float32  # force_upcast
    r = engine.generate(PROMPT, seed=0, num_inference_steps=2, output_type="np")
    assert np.isfinite(r.images).all() and len(r.timings["unet"]) == 2
    r2 = engine.generate(PROMPT, seed=0, num_inference_steps=2, output_type="np")
    np.testing.assert_array_equal(r.images, r2.images)
