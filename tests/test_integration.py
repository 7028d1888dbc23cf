"""Integration checks across loading, models, samplers and Engine.generate() that the per-component
parity tests (all fp32, one component at a time) cannot see:

* reduced precision end to end (bf16 and fp16 on the CPU: torch 2.13 has CPU kernels for both) for
  SD1-, SD2/Turbo- and SDXL-style tiny models with CFG, img2img and (multi-)ControlNet: no dtype
  mismatch, no NaN, close to the fp32 run, latents kept in fp32, the fp16 VAE upcast (force_upcast);
* a single-file checkpoint generates exactly the image of the same weights in a diffusers folder;
* the engine after errors (a failure in the middle of the loop, bad inputs), seeds, latents override,
  batches of prompts x num_images_per_prompt (rows independent of their batch-mates);
* hygiene: eval mode, nothing left on meta, no grads, generate under inference_mode;
* no host-device synchronisation anywhere from the text encoder to the end of the loop: the whole
  pipeline runs with every network on the meta device, where .item(), bool(t), .cpu() etc. raise.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_pipelines import tiny_pipeline

from ldm_engine import Engine
from ldm_engine.loading import load_controlnet, load_pipeline

pytest.importorskip("diffusers")
PROMPT = "a photo of an astronaut riding a horse"
HALF_DTYPES = [torch.bfloat16, torch.float16]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-integration")
    kinds = ("sd15", "sd-turbo", "sdxl", "sdxl-turbo", "controlnet-sd", "controlnet-sd-2", "controlnet-sdxl")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {k: tiny_pipeline(k, root) for k in kinds}


@pytest.fixture(scope="module")
def engines(paths):
    """engines(kind, dtype, *controlnet_kinds) -> a cached Engine."""
    cache = {}

    def get(kind, dtype=torch.float32, *nets):
        key = (kind, dtype, nets)
        if key not in cache:
            cache[key] = Engine.from_pretrained(paths[kind], dtype=dtype, controlnet=[paths[n] for n in nets] or None)
        return cache[key]

    return get


def _image(seed, size, mode="RGB"):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)


# Each case exercises the conditioning paths a GPU user hits in fp16/bf16.
CASES = {
    # SD1: CFG with a negative prompt, two ControlNets (residuals summed), PNDM.
    "sd15-cfg-2controlnets": ("sd15", ("controlnet-sd", "controlnet-sd-2"), dict(
        negative_prompt="blurry", guidance_scale=5.0, num_inference_steps=2,
        control_image=[_image(1, (32, 32)), _image(2, (48, 40), "L")], controlnet_conditioning_scale=[0.6, 0.8])),
    # SD2/Turbo: linear projections, force_upcast VAE, img2img (VAE encode) with CFG, Euler trailing.
    "sd-turbo-img2img-cfg": ("sd-turbo", (), dict(
        image=_image(3, (40, 32)), strength=0.5, num_inference_steps=4, guidance_scale=2.0)),  # 2 steps run
    # SDXL: two text encoders, pooled text_embeds + time_ids (also into the ControlNet), zeroed
    # unconditional embeddings, img2img and ControlNet together, force_upcast VAE.
    "sdxl-img2img-controlnet-cfg": ("sdxl", ("controlnet-sdxl",), dict(
        image=_image(4, (32, 32)), strength=0.7, num_inference_steps=3, guidance_scale=4.0,  # 2 steps run
        control_image=_image(5, (32, 32)), height=32, width=32)),
}


@pytest.fixture(scope="module")
def fp32_images(engines):
    cache = {}

    def get(case):
        if case not in cache:
            kind, nets, kw = CASES[case]
            cache[case] = engines(kind, torch.float32, *nets).generate(PROMPT, seed=7, output_type="np", **kw).images
        return cache[case]

    return get


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", list(CASES))
def test_reduced_precision_end_to_end_close_to_fp32(engines, fp32_images, case, dtype):
    kind, nets, kw = CASES[case]
    ref = fp32_images(case)
    engine = engines(kind, dtype, *nets)
    comps = engine.components
    assert engine.unet_dtype == dtype and comps.unet.dtype == dtype
    assert comps.text_encoder.dtype == dtype
    assert all(next(n.parameters()).dtype == dtype for n in engine.controlnets)
    # diffusers' rule: only the SDXL pipelines run the VAE in fp32, when fp16 and the VAE config says force_upcast
    # (SD1/SD2 configs carry force_upcast too, by default, and diffusers' SD pipelines ignore it).
    upcast = dtype == torch.float16 and engine.family == "sdxl" and comps.vae.config.force_upcast
    assert engine.vae_dtype == (torch.float32 if upcast else dtype)
    assert {p.dtype for p in comps.vae.parameters()} == {engine.vae_dtype}

    out = engine.generate(PROMPT, seed=7, output_type="np", **kw).images
    assert out.shape == ref.shape and out.dtype == np.float32
    assert np.isfinite(out).all()
    diff = np.abs(out - ref)
    assert diff.mean() < 0.02 and diff.max() < 0.15, (diff.mean(), diff.max())
    assert diff.max() > 0  # the half-precision path really ran


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=["bf16", "fp16"])
def test_half_precision_latents_stay_fp32_and_vae_upcast(engines, dtype, monkeypatch):
    import ldm_engine.samplers as samplers

    engine = engines("sdxl-turbo", dtype)
    # The sampler state stays fp32 in every step (diffusers keeps it in the model dtype); only the
    # networks' inputs are cast.
    seen = []
    sample = samplers.sample

    def spy_sample(schedule, model_fn, x, noises=None, **kw):
        def spy_fn(x_in, t):
            out = model_fn(x_in, t)
            seen.append((x_in.dtype, out.dtype))
            return out
        return sample(schedule, spy_fn, x, noises, **kw)

    monkeypatch.setattr(samplers, "sample", spy_sample)
    lat = engine.generate(PROMPT, seed=0, num_inference_steps=2, output_type="latent").images
    assert seen == [(torch.float32, torch.float32)] * 2
    assert lat.dtype == torch.float32 and torch.isfinite(lat).all()
    monkeypatch.undo()
    seen = []
    vae = engine.components.vae
    orig = vae.decode
    vae.decode = lambda z: seen.append(z.dtype) or orig(z)
    try:
        engine.generate(PROMPT, seed=0, num_inference_steps=1, output_type="np")
    finally:
        del vae.decode
    assert seen == [torch.float32 if dtype == torch.float16 else dtype]  # force_upcast only for fp16


def test_preloaded_controlnet_module_follows_engine_dtype(paths):
    net = load_controlnet(paths["controlnet-sd"])  # fp32
    engine = Engine.from_pretrained(paths["sd15"], dtype=torch.bfloat16, controlnet=net)
    out = engine.generate(PROMPT, seed=0, num_inference_steps=1, control_image=_image(0, (32, 32)), output_type="np")
    assert np.isfinite(out.images).all()


def test_engine_from_fp16_components_upcasts_force_upcast_vae(paths):
    comps = load_pipeline(paths["sdxl-turbo"], dtype=torch.float16)
    assert comps.vae.config.force_upcast
    assert Engine(comps).vae_dtype == torch.float32


# ------------------------------------------------------------------------------ single file
@pytest.mark.parametrize("family,dtype", [("sd1", torch.float32), ("sd2", torch.bfloat16), ("sdxl", torch.float32)])
def test_single_file_checkpoint_generates_the_folder_image(family, dtype):
    import loading_fixtures as lf
    from safetensors.torch import save_file

    folder = lf.tiny_pipeline_folder(family)
    file = lf.scratch_dir("integration") / f"{family}.safetensors"
    save_file(lf.pipeline_to_single_file(family), str(file))
    # Engine.from_pretrained(file) takes the family's real architecture; the tiny one needs config=.
    single = Engine.from_pretrained(file, config=folder, dtype=dtype)
    assert single.family == family
    from_folder = Engine.from_pretrained(folder, dtype=dtype)
    kw = dict(seed=3, num_inference_steps=1, guidance_scale=3.0, negative_prompt="low quality",
              height=32, width=40, output_type="np")
    a = from_folder.generate(PROMPT, **kw).images
    b = single.generate(PROMPT, **kw).images
    assert np.isfinite(a).all() and a.std() > 1e-3
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------ robustness
def test_engine_survives_a_failure_mid_loop_and_bad_inputs(engines):
    engine = engines("sd15", torch.float32, "controlnet-sd")
    hint = _image(9, (32, 32))
    kw = dict(seed=21, num_inference_steps=2, guidance_scale=4.0, control_image=hint, output_type="np")
    before = engine.generate(PROMPT, **kw).images

    net = engine.controlnets[0]
    calls = []

    def failing_forward(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected failure in step 2")
        return type(net).forward(net, *args, **kwargs)

    net.forward = failing_forward
    try:
        with pytest.raises(RuntimeError, match="injected"):
            engine.generate(PROMPT, **kw)
    finally:
        del net.forward
    assert len(calls) == 2

    bad = [dict(control_image=_image(9, (32, 32), "CMYK")), dict(control_image=[hint, hint, hint]),
           dict(control_image=np.full((32, 32, 3), np.nan, np.float32)),
           dict(num_inference_steps=1000),  # leading spacing + steps_offset 1 would reach t = 1000
           dict(latents=torch.randn(1, 4, 8, 8))]
    for change in bad:
        with pytest.raises((ValueError, TypeError)):
            engine.generate(PROMPT, **{**kw, **change})
    np.testing.assert_array_equal(engine.generate(PROMPT, **kw).images, before)


def test_seeds_and_latents_override(engines):
    engine = engines("sdxl", torch.float32)
    kw = dict(num_inference_steps=1, guidance_scale=3.0, output_type="np")
    a = engine.generate(PROMPT, seed=5, **kw).images
    np.testing.assert_array_equal(engine.generate(PROMPT, seed=5, **kw).images, a)
    assert np.abs(engine.generate(PROMPT, seed=6, **kw).images - a).max() > 1e-2
    # txt2img with a deterministic sampler: the seed's first draw is the initial noise.
    f = engine.vae_scale_factor
    noise = torch.randn(1, 4, engine.defaults.height // f, engine.defaults.width // f,
                        generator=torch.Generator().manual_seed(5))
    np.testing.assert_array_equal(engine.generate(PROMPT, seed=123, latents=noise, **kw).images, a)


@pytest.mark.parametrize("kind,nets", [("sd15", ("controlnet-sd",)), ("sdxl", ())])
def test_prompt_list_times_images_per_prompt(engines, kind, nets):
    """Batch (prompts x images) rows: distinct noise per image, and each row is exactly the image its
    prompt, negative prompt and noise give alone (catches repeat vs repeat_interleave mix-ups)."""
    engine = engines(kind, torch.float32, *nets)
    prompts, negatives, n = ["a red cube", "a blue sphere on grass"], ["dark", "noisy, blurry"], 2
    extra = dict(control_image=_image(11, (32, 32))) if nets else {}
    kw = dict(num_inference_steps=1, guidance_scale=4.0, height=32, width=32, output_type="np", **extra)
    f = engine.vae_scale_factor
    # The seed's first draw is the whole batch's initial noise (deterministic sampler, txt2img).
    noise = torch.randn(len(prompts) * n, 4, 32 // f, 32 // f, generator=torch.Generator().manual_seed(8))
    batch = engine.generate(prompts, negative_prompt=negatives, num_images_per_prompt=n, seed=8, **kw).images
    assert batch.shape == (4, 32, 32, 3)
    for i in range(len(prompts) * n):
        for j in range(i):
            assert np.abs(batch[i] - batch[j]).max() > 1e-2, (i, j)
    for i in range(len(prompts) * n):
        p = i // n
        alone = engine.generate(prompts[p], negative_prompt=negatives[p], latents=noise[i:i + 1], **kw).images
        np.testing.assert_allclose(alone[0], batch[i], atol=2e-4, err_msg=f"row {i}")


# ------------------------------------------------------------------------------ hygiene
def test_loaded_models_are_eval_materialised_frozen_and_run_under_inference_mode(engines, monkeypatch):
    engine = engines("sdxl", torch.bfloat16, "controlnet-sdxl")
    c = engine.components
    modules = {"unet": c.unet, "vae": c.vae, "text_encoder": c.text_encoder, "text_encoder_2": c.text_encoder_2,
               "controlnet": engine.controlnets[0]}
    for name, m in modules.items():
        assert not any(x.training for x in m.modules()), name
        tensors = list(m.parameters()) + list(m.buffers())
        assert tensors and not any(t.is_meta for t in tensors), name
        assert not any(p.requires_grad for p in m.parameters()), name

    seen = []
    unet_cls = type(c.unet)
    orig = unet_cls.forward

    def spy(self, *args, **kwargs):
        seen.append((torch.is_inference_mode_enabled(), torch.is_grad_enabled()))
        return orig(self, *args, **kwargs)

    monkeypatch.setattr(unet_cls, "forward", spy)
    engine.generate(PROMPT, seed=0, num_inference_steps=1, control_image=_image(0, (32, 32)), output_type="np")
    assert seen == [(True, False)]


# ------------------------------------------------------------------------------ no host sync
@pytest.mark.parametrize("kind,nets,scheduler,extra", [
    ("sdxl", ("controlnet-sdxl",), None, dict(image=_image(1, (32, 32)), strength=0.7,
                                              control_image=_image(2, (32, 32)))),
    ("sd15", ("controlnet-sd", "controlnet-sd-2"), "dpmpp_2m",
     dict(control_image=[_image(3, (32, 32)), _image(4, (32, 32))], controlnet_conditioning_scale=[0.5, 1.0])),
    ("sd15", (), "pndm", {}),
    ("sdxl-turbo", (), "euler_a", {}),
])
def test_pipeline_runs_on_meta_tensors_so_it_never_syncs(paths, kind, nets, scheduler, extra):
    """With every network on the meta device, any host sync (.item(), bool(tensor), .cpu(), .tolist(),
    data-dependent shapes) between the text encoder and the end of the denoising loop raises."""
    comps = load_pipeline(paths[kind])
    controlnets = [load_controlnet(paths[n]) for n in nets]
    for m in (comps.unet, comps.vae, comps.text_encoder, comps.text_encoder_2, *controlnets):
        if m is not None:
            m.to("meta")
    engine = Engine(comps, controlnets, device="meta", scheduler=scheduler)
    out = engine.generate(PROMPT, seed=0, num_inference_steps=3, guidance_scale=3.0, num_images_per_prompt=2,
                          output_type="latent", **extra)
    assert out.images.is_meta and out.images.shape == (2, 4, 16, 16)
    assert len(out.timings["unet"]) >= (2 if "image" in extra else 3)  # PNDM: one extra U-Net call


@pytest.mark.cuda
def test_cuda_denoising_loop_has_no_sync(paths, monkeypatch):
    import ldm_engine.samplers as samplers

    engine = Engine.from_pretrained(paths["sdxl"], device="cuda", controlnet=paths["controlnet-sdxl"])
    orig = samplers.sample

    def strict_sample(*args, **kwargs):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return orig(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(samplers, "sample", strict_sample)
    out = engine.generate(PROMPT, seed=0, num_inference_steps=3, guidance_scale=4.0,
                          control_image=_image(0, (32, 32)), output_type="np")
    assert np.isfinite(out.images).all()
