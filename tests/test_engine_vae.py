"""Engine with a swapped-in VAE (tiny TAESD-style or a second full AutoencoderKL) and per-step callbacks,
against diffusers' pipelines built with the same VAE (tiny random weights, fp32, CPU).

Tolerance as tests/test_engine.py: max abs diff <= 1e-3 on output_type="np" images. Each swap also
checks that the image differs from the one the model's own VAE gives, so ignoring vae= cannot pass.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from model_utils import randomize_
from tiny_pipelines import _vae, tiny_pipeline

from ldm_engine import Engine
from ldm_engine.errors import CheckpointError, InvalidInputError
from ldm_engine.loading import load_vae

diffusers = pytest.importorskip("diffusers")
TOL = 1e-3
PROMPT = "a watercolour fox in the snow"
# 2 levels like the tiny pipelines' VAE (factor 2: 32 px <-> 16 latents), 8 channels.
TINY_VAE = dict(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                num_encoder_blocks=(1, 2), num_decoder_blocks=(2, 1))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny-vae")


@pytest.fixture(scope="module")
def paths(root):
    return {k: tiny_pipeline(k, root) for k in ("sd-turbo", "sdxl-turbo")}


def _tiny_vae_module(seed=7):
    vae = diffusers.AutoencoderTiny(**TINY_VAE).eval()
    randomize_(vae, seed)
    return vae


@pytest.fixture(scope="module")
def taesd(root):
    """(diffusers module, its saved folder)."""
    vae = _tiny_vae_module()
    vae.save_pretrained(root / "taesd")
    return vae, root / "taesd"


@pytest.fixture(scope="module")
def full_vae(root):
    torch.manual_seed(99)  # another full VAE than the pipelines' own
    vae = _vae(0.18215, force_upcast=False)
    vae.save_pretrained(root / "vae-b")
    return vae, root / "vae-b"


def _pipe(cls, path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = cls.from_pretrained(path, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _compare(pipe, engine, *, seed=0, **kw):
    ref = pipe(generator=torch.Generator().manual_seed(seed), output_type="np", **kw).images
    ours = engine.generate(seed=seed, output_type="np", **kw).images
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= TOL, f"max abs diff {np.abs(ours - ref).max():.2e}"
    assert ours.std() > 0.02
    return ours


def _latents(seed=123, batch=1):
    return torch.randn(batch, 4, 16, 16, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def init_image():
    rng = np.random.default_rng(1)
    return Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8))


# ------------------------------------------------------------------------------------ tiny VAE
def test_sd_turbo_tiny_vae_folder_and_module(paths, taesd):
    module, folder = taesd
    pipe = _pipe(diffusers.StableDiffusionPipeline, paths["sd-turbo"], vae=module)
    engine = Engine.from_pretrained(paths["sd-turbo"], vae=folder)
    assert type(engine.components.vae).__name__ == "AutoencoderTiny"
    lat = _latents()
    kw = dict(prompt=PROMPT, num_inference_steps=1, guidance_scale=0.0, latents=lat)
    ours = _compare(pipe, engine, **kw)
    again = Engine.from_pretrained(paths["sd-turbo"], vae=module).generate(seed=0, output_type="np", **kw).images
    np.testing.assert_allclose(again, ours, atol=1e-6)
    own = Engine.from_pretrained(paths["sd-turbo"]).generate(seed=0, output_type="np", **kw).images
    assert np.abs(own - ours).max() > 1e-2


def test_sdxl_turbo_tiny_vae_ancestral_same_seed(paths, taesd):
    module, folder = taesd
    pipe = _pipe(diffusers.StableDiffusionXLPipeline, paths["sdxl-turbo"], vae=module)
    engine = Engine.from_pretrained(paths["sdxl-turbo"], vae=folder)
    _compare(pipe, engine, seed=4, prompt=PROMPT, num_inference_steps=3, guidance_scale=0.0)


def test_img2img_tiny_vae_encoder_draws_nothing(paths, taesd, init_image):
    # diffusers' retrieve_latents takes AutoencoderTiny's latents as they are: the add_noise draw is
    # the generator's first; drawing a posterior sample first (as for AutoencoderKL) would differ.
    module, folder = taesd
    pipe = _pipe(diffusers.StableDiffusionImg2ImgPipeline, paths["sd-turbo"], vae=module)
    engine = Engine.from_pretrained(paths["sd-turbo"], vae=folder)
    ours = _compare(pipe, engine, seed=3, prompt=PROMPT, image=init_image, strength=0.5,
                    num_inference_steps=2, guidance_scale=0.0)
    assert ours.shape == (1, 32, 40, 3)


def test_sdxl_img2img_tiny_vae(paths, taesd, init_image):
    module, folder = taesd
    pipe = _pipe(diffusers.StableDiffusionXLImg2ImgPipeline, paths["sdxl-turbo"], vae=module)
    engine = Engine.from_pretrained(paths["sdxl-turbo"], vae=folder)
    _compare(pipe, engine, seed=6, prompt=PROMPT, image=init_image, strength=0.5, num_inference_steps=4,
             guidance_scale=0.0)


# ------------------------------------------------------------------------------- full VAE swap
def test_second_full_vae_txt2img_and_img2img(paths, full_vae, init_image):
    module, folder = full_vae
    engine = Engine.from_pretrained(paths["sd-turbo"], vae=folder)
    pipe = _pipe(diffusers.StableDiffusionPipeline, paths["sd-turbo"], vae=module)
    kw = dict(prompt=PROMPT, num_inference_steps=1, guidance_scale=0.0, latents=_latents(5))
    ours = _compare(pipe, engine, **kw)
    own = Engine.from_pretrained(paths["sd-turbo"]).generate(seed=0, output_type="np", **kw).images
    assert np.abs(own - ours).max() > 1e-2
    pipe = _pipe(diffusers.StableDiffusionImg2ImgPipeline, paths["sd-turbo"], vae=module)
    _compare(pipe, engine, seed=8, prompt=PROMPT, image=init_image, strength=0.5, num_inference_steps=2,
             guidance_scale=0.0)


# ----------------------------------------------------------------------- original TAESD files
def _write_original_taesd(module, folder, name="taesd"):
    """The original TAESD layout, from a diffusers AutoencoderTiny: the inverse of the loader's mapping."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    sd = module.state_dict()
    enc = {k[len("encoder.layers."):]: v for k, v in sd.items() if k.startswith("encoder.layers.")}
    dec = {}
    for k, v in sd.items():
        if k.startswith("decoder.layers."):
            index, rest = k[len("decoder.layers."):].split(".", 1)
            dec[f"{int(index) + 1}.{rest}"] = v  # the original decoder's layer 0 is its Clamp
    save_file({k: v.contiguous() for k, v in enc.items()}, str(folder / f"{name}_encoder.safetensors"))
    save_file({k: v.contiguous() for k, v in dec.items()}, str(folder / f"{name}_decoder.safetensors"))
    return folder


def test_original_taesd_files_load_equal(tmp_path, taesd):
    module, _ = taesd
    folder = _write_original_taesd(module, tmp_path / "orig", "taesdxl")
    x = torch.rand(1, 3, 20, 12, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z = torch.randn(1, 4, 6, 5, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want_enc, want_dec = module.encode(x).latents, module.decode(z).sample
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(tmp_path / "tiny.safetensors"))
    for spec in (folder, folder / "taesdxl_decoder.safetensors", folder / "taesdxl_encoder.safetensors",
                 tmp_path / "tiny.safetensors"):
        vae = load_vae(spec)  # the files carry no config: levels, blocks and widths come from the tensor names
        with torch.no_grad():
            got_enc, _ = vae.encode(x)
            got_dec = vae.decode(z)
        torch.testing.assert_close(got_enc, want_enc, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_dec, want_dec, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def taesd_full_arch():
    vae = diffusers.AutoencoderTiny().eval()  # the real TAESD architecture (64 channels, 4 levels)
    randomize_(vae, 11)
    return vae


def test_original_taesd_full_architecture_and_combined_file(tmp_path, taesd_full_arch):
    from safetensors.torch import save_file

    module = taesd_full_arch
    folder = _write_original_taesd(module, tmp_path / "full")
    combined = {}
    for side in ("encoder", "decoder"):
        from safetensors.torch import load_file
        combined.update({f"{side}.{k}": v for k, v in load_file(str(folder / f"taesd_{side}.safetensors")).items()})
    save_file(combined, str(tmp_path / "taesd_combined.safetensors"))
    save_file({f"vae.{k}": v.contiguous() for k, v in module.state_dict().items()},
              str(tmp_path / "taesd_diffusers_names.safetensors"))  # one file, diffusers names, a prefix
    z = torch.randn(1, 4, 5, 3, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = module.decode(z).sample
    for spec in (folder / "taesd_encoder.safetensors", tmp_path / "taesd_combined.safetensors",
                 tmp_path / "taesd_diffusers_names.safetensors"):
        with torch.no_grad():
            got = load_vae(spec).decode(z)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------- bad input
def test_wrong_latent_channels(paths, tmp_path):
    wide = diffusers.AutoencoderTiny(**dict(TINY_VAE, latent_channels=16))
    with pytest.raises(InvalidInputError, match="16 latent channels"):
        Engine.from_pretrained(paths["sd-turbo"], vae=wide)
    with pytest.raises(InvalidInputError, match="preview_vae has 16"):
        Engine.from_pretrained(paths["sd-turbo"], preview_vae=wide)


def test_vae_path_that_is_not_a_vae(paths, tmp_path):
    with pytest.raises(CheckpointError, match="not a VAE"):
        Engine.from_pretrained(paths["sd-turbo"], vae=paths["sd-turbo"] / "unet")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a VAE"):
        load_vae(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="refusing to load a pickle"):
        load_vae(_write_pickle(tmp_path))
    with pytest.raises(InvalidInputError, match="not a VAE"):
        load_vae(torch.nn.Linear(2, 2))
    from safetensors.torch import save_file

    save_file({"encoder.down.0.block.0.conv1.weight": torch.randn(2, 2, 3, 3)}, str(tmp_path / "kl.safetensors"))
    with pytest.raises(CheckpointError, match="carries no config"):
        load_vae(tmp_path / "kl.safetensors")  # a single-file full VAE needs the pipeline's family
    with pytest.raises(CheckpointError, match="does not match"):
        load_vae(tmp_path / "kl.safetensors", family="sd2")  # the family's real VAE config: one wrong tensor
    save_file({"1.weight": torch.randn(8, 4, 3, 3)}, str(tmp_path / "taesd_decoder.safetensors"))
    with pytest.raises(CheckpointError, match="taesd_encoder.safetensors"):
        load_vae(tmp_path / "taesd_decoder.safetensors")  # half a pair


def _write_pickle(tmp_path):
    path = tmp_path / "taesd_decoder.pth"
    torch.save({"1.weight": torch.zeros(1)}, path)
    return path


# ---------------------------------------------------------------------------- callbacks
@pytest.fixture(scope="module")
def previewing(paths, taesd):
    return Engine.from_pretrained(paths["sd-turbo"], preview_vae=taesd[1])


def test_callback_steps_match_diffusers_and_preview(paths, previewing, taesd):
    pipe = _pipe(diffusers.StableDiffusionPipeline, paths["sd-turbo"])
    ref_steps = []

    def on_step_end(p, i, t, kw):
        ref_steps.append((i, float(t), kw["latents"].clone()))
        return kw

    lat = _latents(9)
    pipe(PROMPT, num_inference_steps=3, guidance_scale=0.0, latents=lat, output_type="np",
         callback_on_step_end=on_step_end)
    steps = []
    previewing.generate(PROMPT, num_inference_steps=3, guidance_scale=0.0, latents=lat,
                        callback=lambda s: steps.append((s, s.latents.clone(), s.preview())))
    assert [s.index for s, _, _ in steps] == [0, 1, 2] and all(s.num_steps == 3 for s, _, _ in steps)
    for (s, latents, images), (i, t, ref) in zip(steps, ref_steps):
        assert s.timestep == pytest.approx(t)
        torch.testing.assert_close(latents, ref, rtol=1e-4, atol=1e-4)
        assert isinstance(images[0], Image.Image) and images[0].size == (32, 32)
    # the preview is the tiny VAE's decode of those latents (scaling_factor 1.0)
    with torch.no_grad():
        want = (taesd[0].decode(steps[-1][1]).sample * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(steps[-1][0].preview("np"), want, atol=1e-5)


def test_callback_returning_false_stops_early(previewing):
    seen = []
    kw = dict(num_inference_steps=4, guidance_scale=0.0, seed=2)

    def stop_after_two(step):
        seen.append(step.index)
        return step.index < 1

    stopped = previewing.generate(PROMPT, output_type="latent", callback=stop_after_two, **kw).images
    assert seen == [0, 1]
    kept = []
    full = previewing.generate(PROMPT, output_type="latent", callback=lambda s: kept.append(s.latents.clone()), **kw)
    torch.testing.assert_close(stopped, kept[1])
    assert (full.images - stopped).abs().max() > 1e-3
    image = previewing.generate(PROMPT, callback=stop_after_two, **kw).images  # decoded by the model's VAE
    assert len(image) == 1 and image[0].size == (32, 32)


def test_preview_without_preview_vae_and_raising_callback(paths):
    engine = Engine.from_pretrained(paths["sd-turbo"])
    before = engine.generate(PROMPT, num_inference_steps=2, seed=0, output_type="np").images
    with pytest.raises(InvalidInputError, match="preview_vae"):
        engine.generate(PROMPT, num_inference_steps=2, seed=0, callback=lambda s: s.preview())

    def boom(step):
        raise RuntimeError("user callback failed")

    with pytest.raises(RuntimeError, match="user callback failed"):
        engine.generate(PROMPT, num_inference_steps=2, seed=0, callback=boom)
    with pytest.raises(TypeError, match="callback must be callable"):
        engine.generate(PROMPT, callback="print")
    after = engine.generate(PROMPT, num_inference_steps=2, seed=0, output_type="np").images
    np.testing.assert_array_equal(after, before)


def test_no_callback_no_hook(monkeypatch, previewing):
    from ldm_engine import samplers

    seen = []
    real = samplers.sample
    monkeypatch.setattr(samplers, "sample", lambda *a, **k: seen.append(k.get("after_step")) or real(*a, **k))
    previewing.generate(PROMPT, num_inference_steps=1, seed=0, output_type="latent")
    assert seen == [None]


# ------------------------------------------------------------------------------------ CLI
def test_cli_vae_and_preview_dir(paths, taesd, tmp_path, capsys):
    from ldm_engine.cli import main

    out, previews = tmp_path / "img.png", tmp_path / "steps"
    rc = main(["generate", "--model", str(paths["sd-turbo"]), "--prompt", PROMPT, "--steps", "2", "--device", "cpu",
               "--vae", str(taesd[1]), "--preview-dir", str(previews), "--out", str(out), "--seed", "1"])
    assert rc == 0, capsys.readouterr().err
    assert sorted(p.name for p in previews.iterdir()) == ["step-000.png", "step-001.png"]
    last, final = (np.asarray(Image.open(p)) for p in (previews / "step-001.png", out))
    np.testing.assert_array_equal(last, final)  # the last step's preview decodes the final latents (same VAE)
    # the built-in demo model (no --model) is a real pipeline folder: it takes another VAE too
    assert main(["generate", "--prompt", PROMPT, "--vae", str(taesd[1]), "--out", str(out)]) == 0


# ---------------------------------------------------------------------------------- export
def test_export_tiny_vae_and_run_onnxruntime(paths, taesd, tmp_path, init_image):
    """--vae: the tiny VAE's encoder (one output, the latents) and decoder exported, verified in ONNX Runtime,
    and the onnxruntime backend gives the torch backend's images (text-to-image and img2img)."""
    pytest.importorskip("onnxruntime")
    from ldm_engine.export.exporter import ExportOptions, export_model

    out = tmp_path / "export"
    opts = ExportOptions(height=(32, 32, 48), width=(32, 40, 48), batch=(1, 1, 2), progress=False, verify=True,
                         vae=str(taesd[1]))
    manifest = export_model(str(paths["sd-turbo"]), out, opts, log=lambda *a: None)
    enc = manifest["networks"]["vae_encoder"]
    assert [o["name"] for o in enc["contract"]["outputs"]] == ["latent"]
    for net in ("vae_encoder", "vae_decoder"):  # ONNX Runtime (CPU) against the torch module
        assert manifest["networks"][net]["verify"]["max_rel_err"] <= 1e-4
    e_torch = Engine.from_pretrained(paths["sd-turbo"], vae=taesd[1])
    e_ort = Engine.from_pretrained(paths["sd-turbo"], backend="onnxruntime", engine_dir=out)
    assert not e_ort.components.vae.latent_distribution
    for kw in (dict(num_inference_steps=1), dict(image=init_image, strength=0.5, num_inference_steps=2)):
        a = e_torch.generate(PROMPT, guidance_scale=0.0, seed=2, output_type="np", **kw).images
        b = e_ort.generate(PROMPT, guidance_scale=0.0, seed=2, output_type="np", **kw).images
        assert np.abs(a - b).max() <= TOL and a.std() > 0.02
    with pytest.raises(InvalidInputError, match="torch backend"):
        Engine.from_pretrained(paths["sd-turbo"], backend="onnxruntime", engine_dir=out, vae=taesd[1])


def test_fp16_keeps_tiny_vae_in_fp16_on_sdxl(paths, taesd):
    # The SDXL rule (force_upcast: decode in fp32) is for the full VAE; TAESDXL runs in fp16.
    own = Engine.from_pretrained(paths["sdxl-turbo"], dtype="fp16", device="cpu")
    tiny = Engine.from_pretrained(paths["sdxl-turbo"], dtype="fp16", device="cpu", vae=taesd[1], preview_vae=taesd[1])
    assert own.vae_dtype == torch.float32
    assert tiny.vae_dtype == torch.float16 and tiny.preview_vae.dtype == torch.float16


@pytest.mark.cuda
def test_cuda_fp16_tiny_vae(paths, taesd):
    engine = Engine.from_pretrained(paths["sd-turbo"], device="cuda", dtype="fp16", vae=taesd[1])
    ref = Engine.from_pretrained(paths["sd-turbo"], device="cpu", vae=taesd[1])
    kw = dict(prompt=PROMPT, num_inference_steps=1, guidance_scale=0.0, latents=_latents(3), output_type="np")
    a = engine.generate(**{**kw, "latents": kw["latents"].cuda()}).images
    b = ref.generate(**kw).images
    assert engine.vae_dtype == torch.float16 and np.isfinite(a).all()
    assert np.abs(a - b).max() < 2e-2


def test_cuda_graph_discipline_with_tiny_vae_img2img(paths, taesd, init_image):
    # The tiny encoder returns (latents, None): the graph wrapper keeps the None (CPU stand-in of the capture).
    from ldm_engine.pipeline.cuda_graphs import RerunGraphs

    eager = Engine.from_pretrained(paths["sd-turbo"], vae=taesd[1])
    engine = Engine.from_pretrained(paths["sd-turbo"], vae=taesd[1])
    graphs = RerunGraphs()
    engine._install_graphs(graphs, 8)
    for seed in (3, 4):
        kw = dict(image=init_image, strength=0.5, num_inference_steps=2, seed=seed, output_type="np")
        np.testing.assert_allclose(engine.generate(PROMPT, **kw).images, eager.generate(PROMPT, **kw).images,
                                   rtol=0, atol=1e-6)
    assert graphs.captures == 4  # text encoder, tiny VAE encoder, U-Net, tiny VAE decoder


def test_vae_repo_id_in_local_cache(taesd, tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    import shutil

    rev = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--madebyollin--taesd"
    shutil.copytree(taesd[1], repo / "snapshots" / rev)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    vae = load_vae("madebyollin/taesd")
    z = torch.randn(1, 4, 3, 5, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(vae.decode(z), taesd[0].decode(z).sample, rtol=1e-5, atol=1e-5)


def test_sdxl_second_full_vae(paths, root):
    torch.manual_seed(98)
    vae = _vae(0.13025, force_upcast=True)  # SDXL-style config, other weights than the pipeline's
    vae.save_pretrained(root / "vae-xl")
    pipe = _pipe(diffusers.StableDiffusionXLPipeline, paths["sdxl-turbo"], vae=vae)
    engine = Engine.from_pretrained(paths["sdxl-turbo"], vae=root / "vae-xl")
    _compare(pipe, engine, seed=9, prompt=PROMPT, num_inference_steps=2, guidance_scale=0.0)
