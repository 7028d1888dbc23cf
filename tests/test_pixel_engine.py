"""Unconditional pixel-space models (DDPM / DDIM): loading every source, and the same images as
diffusers' DDPMPipeline / DDIMPipeline with the same seed (fp32 CPU, tiny random UNet2DModels)."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ldm_engine import Engine
from ldm_engine.errors import CheckpointError, InvalidInputError
from ldm_engine.pipeline.unconditional import PixelEngine
from model_utils import rel_err
from pixel_fixtures import TINY, diffusers_unet, save_pipeline, unet_inputs

IMAGE_TOL = 1e-3


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Hundreds of tiny U-Net calls: one intra-op thread is several times faster than two on a
    loaded 2-core CI machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folders(one_thread, tmp_path_factory):
    root = tmp_path_factory.mktemp("pixel")
    return {(kind, p): save_pipeline(kind, root, pipeline=p, seed=2)
            for kind in TINY for p in ("DDPMPipeline", "DDIMPipeline")}


def reference(folder, pipeline, seed, batch, **kw):
    import diffusers

    pipe = getattr(diffusers, pipeline).from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe(batch_size=batch, generator=torch.Generator().manual_seed(seed), output_type="np", **kw).images


@pytest.mark.parametrize("kind", sorted(TINY))
def test_ddpm_matches_diffusers_pipeline(folders, kind):
    folder = folders[(kind, "DDPMPipeline")]
    engine = Engine.from_pretrained(folder, device="cpu")
    assert isinstance(engine, PixelEngine) and engine.scheduler == "ddpm"
    ours = engine.generate(num_inference_steps=50, seed=11, num_images_per_prompt=2, output_type="np")
    ref = reference(folder, "DDPMPipeline", 11, 2, num_inference_steps=50)
    assert ours.images.shape == ref.shape and ours.seed == 11 and len(ours.timings["unet"]) == 50
    assert np.abs(ours.images - ref).max() <= IMAGE_TOL
    assert np.abs(ours.images[0] - ours.images[1]).max() > 0.1  # the batch's images differ


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("kind", sorted(TINY))
def test_ddim_matches_diffusers_pipeline(folders, kind, eta):
    folder = folders[(kind, "DDIMPipeline")]
    engine = Engine.from_pretrained(folder, device="cpu")
    assert engine.scheduler == "ddim"
    ours = engine.generate(num_inference_steps=10, seed=5, eta=eta, num_images_per_prompt=2, output_type="np")
    ref = reference(folder, "DDIMPipeline", 5, 2, num_inference_steps=10, eta=eta)
    assert np.abs(ours.images - ref).max() <= IMAGE_TOL
    # the DDPM folder sampled with scheduler="ddim" is DDIMPipeline on the same weights
    ddpm_folder = folders[(kind, "DDPMPipeline")]
    other = Engine.from_pretrained(ddpm_folder).generate(scheduler="ddim", num_inference_steps=10, seed=5, eta=eta,
                                                         num_images_per_prompt=2, output_type="np")
    assert np.abs(other.images - reference(ddpm_folder, "DDIMPipeline", 5, 2, num_inference_steps=10,
                                           eta=eta)).max() <= IMAGE_TOL


def _unet_output(engine, kind):
    x, t = unet_inputs(kind)
    with torch.no_grad():
        return engine.components.unet(x, t), diffusers_unet(kind, seed=2)(x, t).sample


@pytest.mark.parametrize("layout", ["unet+scheduler", "component", "single_file+config", "single_file+folder",
                                    "old_attention_names", "hf_cache"])
def test_sources(folders, tmp_path, monkeypatch, layout):
    kind = "attn"
    src = folders[(kind, "DDPMPipeline")]
    config = None
    if layout == "unet+scheduler":
        path = tmp_path / "m"
        shutil.copytree(src / "unet", path / "unet")
        shutil.copytree(src / "scheduler", path / "scheduler")
    elif layout == "component":
        path = src / "unet"
    elif layout in ("single_file+config", "single_file+folder", "old_attention_names"):
        path = tmp_path / "unet.safetensors"
        state = diffusers_unet(kind, seed=2).state_dict()
        if layout == "old_attention_names":  # diffusers < 0.14: query/key/value/proj_attn
            old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
            renamed = {}
            for k, v in state.items():
                for new, name in old.items():
                    if ".attentions." in k and f".{new}." in k:
                        k = k.replace(f".{new}.", f".{name}.")
                renamed[k] = v
            assert renamed.keys() != state.keys()
            state = renamed
        save_file({k: v.contiguous() for k, v in state.items()}, path)
        config = (json.loads((src / "unet" / "config.json").read_text()) if layout != "single_file+folder"
                  else src)
    else:
        pytest.importorskip("huggingface_hub")
        from test_loading import fake_cache

        fake_cache(tmp_path / "hub", "tiny-org/tiny-ddpm", src)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
        path = "tiny-org/tiny-ddpm"
    engine = Engine.from_pretrained(path, config=config)
    assert isinstance(engine, PixelEngine)
    assert rel_err(*_unet_output(engine, kind)) <= 1e-4
    assert engine.scheduler == "ddpm"


def test_single_file_without_config_matches_packaged_config_or_says_pass_config(tmp_path):
    from ldm_engine.loading.pixel import load_pixel_pipeline

    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in diffusers_unet("attn").state_dict().items()}, path)
    assert PixelEngine.handles(path)
    with pytest.raises(CheckpointError, match="config="):
        Engine.from_pretrained(path)
    # a real layout (CIFAR-10, built on meta and saved with zeros) needs no config
    from diffusers import UNet2DModel

    from ldm_engine.configs import default_config

    cfg = default_config("ddpm-cifar10", "unet.json")
    ref = UNet2DModel(**{k: v for k, v in cfg.items() if not k.startswith("_")})
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, tmp_path / "cifar.safetensors")
    comps = load_pixel_pipeline(tmp_path / "cifar.safetensors")
    assert comps.unet.config.block_out_channels == (128, 256, 256, 256) and comps.pipeline == "DDPMPipeline"


def test_bad_inputs_are_clear_errors_and_engine_keeps_working(folders):
    engine = Engine.from_pretrained(folders[("plain", "DDIMPipeline")])
    first = engine.generate(num_inference_steps=3, seed=1, output_type="pt").images
    with pytest.raises(InvalidInputError, match="unconditional"):
        engine.generate("a photo of a cat")
    with pytest.raises(InvalidInputError, match="guidance_scale"):
        engine.generate(guidance_scale=7.5)
    with pytest.raises(InvalidInputError, match="eta"):
        engine.generate(scheduler="ddpm", eta=0.5)
    with pytest.raises(InvalidInputError, match="height"):
        engine.generate(height=10)  # 3 levels: multiples of 4
    with pytest.raises(InvalidInputError, match="scheduler"):
        engine.generate(scheduler="lcm")
    with pytest.raises(InvalidInputError, match="latent"):
        engine.generate(output_type="latent")
    with pytest.raises(InvalidInputError, match="ControlNet"):
        Engine.from_pretrained(folders[("plain", "DDIMPipeline")], controlnet="x")
    for vae_arg in ("vae", "preview_vae", "vae_dtype"):
        with pytest.raises(InvalidInputError, match=f"no VAE .*{vae_arg}="):
            Engine.from_pretrained(folders[("plain", "DDIMPipeline")], **{vae_arg: "bf16"})
    again = engine.generate(num_inference_steps=3, seed=1, output_type="pt").images
    assert torch.equal(first, again) and first.shape == (1, 3, 8, 12)
    # other sizes and samplers run (fully convolutional), PIL output
    out = engine.generate(num_inference_steps=4, seed=0, height=16, width=8, scheduler="dpmpp_2m")
    assert out.images[0].size == (8, 16)
    latents = torch.randn(2, 3, 8, 12)
    a = engine.generate(num_inference_steps=3, latents=latents, num_images_per_prompt=2, output_type="pt").images
    b = engine.generate(num_inference_steps=3, latents=latents, num_images_per_prompt=2, output_type="pt").images
    assert torch.equal(a, b)


def test_cli_generates_without_prompt(folders, tmp_path, capsys):
    from PIL import Image

    from ldm_engine.cli import main

    model = str(folders[("plain", "DDPMPipeline")])
    out = tmp_path / "ddpm.png"
    assert main(["generate", "--model", model, "--steps", "3", "--seed", "4", "--out", str(out)]) == 0
    assert "(unconditional)" in capsys.readouterr().out
    expected = Engine.from_pretrained(model).generate(num_inference_steps=3, seed=4).images[0]
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(expected))
    for extra, words in ((["--prompt", "a cat"], "unconditional"), (["--guidance", "5"], "guidance_scale")):
        assert main(["generate", "--model", model, "--steps", "2", "--out", str(out), *extra]) == 2
        assert words in capsys.readouterr().err


def test_stable_diffusion_sources_are_not_pixel_models(tmp_path):
    from loading_fixtures import pipeline_to_single_file, tiny_pipeline_folder

    from ldm_engine.loading.pixel import is_pixel_model

    assert not is_pixel_model(tiny_pipeline_folder("sd1"))
    save_file({k: v.contiguous() for k, v in pipeline_to_single_file("sd1").items()}, tmp_path / "sd.safetensors")
    assert not is_pixel_model(tmp_path / "sd.safetensors")
    assert not is_pixel_model(tmp_path / "missing-folder") and not is_pixel_model("no-org/no-such-model")


def test_compiled_unet_is_one_graph_and_gives_the_same_images(folders):
    engine = Engine.from_pretrained(folders[("attn", "DDIMPipeline")])
    eager = engine.generate(num_inference_steps=3, seed=2, num_images_per_prompt=2, output_type="pt").images
    compiled = engine.compile(backend="aot_eager").generate(num_inference_steps=3, seed=2, num_images_per_prompt=2,
                                                            output_type="pt").images
    assert (compiled - eager).abs().max() <= 1e-5


def test_learned_variance_unet_is_refused():
    from ldm_engine.loading.pixel import PixelComponents
    from ldm_engine.models.unet_2d import UNet2DConfig, UNet2DModel

    unet = UNet2DModel(UNet2DConfig.from_dict({**TINY["plain"], "out_channels": 6}))
    with pytest.raises(InvalidInputError, match="learned-variance"):
        PixelEngine(PixelComponents(unet=unet, scheduler_config={"_class_name": "DDPMScheduler"}, source="x"))
