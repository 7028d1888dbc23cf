"""TensorRT: the plain-Python parts (cache keys, cached-engine checks, atomic writes, optimization
profiles from the contracts) run everywhere; building and running engines needs the tensorrt package
and a CUDA GPU and is skipped, with the reason, where `import tensorrt` fails."""

from __future__ import annotations

import json
import os

import pytest
import torch

from ldm_engine.export import contracts as C
from ldm_engine.export.manifest import (atomic_path, atomic_write_bytes, atomic_write_json, clean_stale_temporaries,
                                        key_mismatch, sha256_file, tensorrt_cache_key)
from ldm_engine.export.tensorrt_build import cached_engine, plan_paths

KEY_ARGS = dict(network="unet", weights_sha256="a" * 64, onnx_sha256="b" * 64,
                input_shapes={"sample": ((1, 4, 32, 32), (2, 4, 64, 64), (8, 4, 128, 128))},
                precision="fp16", tensorrt_version="10.8.0", compute_capability=(9, 0),
                builder_options={"typing": "strong", "workspace_gib": None})


def test_cache_key_covers_every_input():
    key = tensorrt_cache_key(**KEY_ARGS)
    assert key == tensorrt_cache_key(**KEY_ARGS) and len(key["id"]) == 64
    assert key["compute_capability"] == "9.0"
    changes = {"network": "vae_decoder", "weights_sha256": "c" * 64, "onnx_sha256": "d" * 64,
               "input_shapes": {"sample": ((1, 4, 32, 32),) * 3}, "precision": "bf16",
               "tensorrt_version": "10.9.0", "compute_capability": (8, 9),
               "builder_options": {"typing": "weak", "workspace_gib": None}}
    ids = {key["id"]}
    for field, value in changes.items():
        other = tensorrt_cache_key(**dict(KEY_ARGS, **{field: value}))
        assert key_mismatch(other, key) == [field]
        ids.add(other["id"])
    assert len(ids) == len(changes) + 1


def _fake_built(tmp_path, key, payload=b"serialized engine bytes"):
    """What build_engine leaves on disk: the plan and its sidecar (written here without TensorRT)."""
    plan, sidecar = plan_paths(tmp_path, key["network"], key["id"])
    atomic_write_bytes(plan, payload)
    atomic_write_json(sidecar, {"key": key, "file": plan.name, "size": plan.stat().st_size,
                                "sha256": sha256_file(plan)})
    return plan, sidecar


def test_cached_engine_reused_only_when_everything_matches(tmp_path):
    key = tensorrt_cache_key(**KEY_ARGS)
    assert cached_engine(tmp_path, "unet", key) == (None, "no engine built yet")
    plan, sidecar = _fake_built(tmp_path, key)
    assert cached_engine(tmp_path, "unet", key) == (plan, "")
    assert plan.name == f"unet.{key['id'][:16]}.plan"

    newer = tensorrt_cache_key(**dict(KEY_ARGS, tensorrt_version="10.9.0", compute_capability=(8, 9)))
    found, why = cached_engine(tmp_path, "unet", newer)
    assert found is None and "tensorrt_version changed" in why and "compute_capability changed" in why

    data = plan.read_bytes()
    plan.write_bytes(data[:-1] + b"X")  # same size, different content
    found, why = cached_engine(tmp_path, "unet", key)
    assert found is None and "corrupt" in why
    plan.write_bytes(data[:5])
    assert "corrupt" in cached_engine(tmp_path, "unet", key)[1]
    plan.unlink()
    assert "missing" in cached_engine(tmp_path, "unet", key)[1]
    sidecar.write_text("{")
    assert "unreadable" in cached_engine(tmp_path, "unet", key)[1]


def test_atomic_writes_leave_nothing_on_failure(tmp_path):
    target = tmp_path / "engine.plan"
    atomic_write_bytes(target, b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half of a new engine")
            raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["engine.plan"]
    # a crash (no cleanup at all) leaves only .tmp-* files, which the next export removes
    (tmp_path / ".tmp-engine.plan.abc").write_bytes(b"junk")
    clean_stale_temporaries(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["engine.plan"]
    atomic_write_json(tmp_path / "k.json", {"b": 1, "a": [1, 2]})
    assert json.loads((tmp_path / "k.json").read_text()) == {"a": [1, 2], "b": 1}


UNET = {"in_channels": 4, "out_channels": 4, "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
        "cross_attention_dim": 2048, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816}
VAE = {"block_out_channels": [128, 256, 512, 512], "latent_channels": 4, "in_channels": 3, "out_channels": 3}


def test_optimization_profiles_from_contracts():
    profile = C.ShapeProfile(batch=(1, 2, 4), height=(512, 768, 1024), width=(256, 512, 1024))
    unet = C.unet_contract(UNET, vae_scale=8, dtype="fp16", with_residuals=True)
    shapes = unet.profile_shapes(profile)
    assert shapes["sample"] == ((1, 4, 64, 32), (4, 4, 96, 64), (8, 4, 128, 128))  # CFG doubles opt and max
    assert shapes["timestep"] == ((1,), (4,), (8,))
    assert shapes["text_embeds"] == ((1, 1280), (4, 1280), (8, 1280))
    assert shapes["time_ids"] == ((1, 6), (4, 6), (8, 6))
    assert shapes["encoder_hidden_states"][2] == (8, 77, 2048)
    # 12 down residuals (conv_in, 2 per block, 3 downsamplers) + mid, at 1/1 .. 1/8 of the latent
    residuals = [n for n in unet.input_names if n.startswith("down_residual_")]
    assert len(residuals) == 12 and unet.input_names[-1] == "mid_residual"
    assert shapes["mid_residual"] == ((1, 1280, 8, 4), (4, 1280, 12, 8), (8, 1280, 16, 16))
    assert unet.dynamic_axes()["down_residual_11"] == {0: "B", 2: "H/8", 3: "W/8"}

    dec = C.vae_decoder_contract(VAE, dtype="fp32")
    assert dec.profile_shapes(profile)["latent"] == ((1, 4, 64, 32), (2, 4, 96, 64), (4, 4, 128, 128))
    assert dec.output_shapes({"B": 1, "H": 13, "W": 9})["image"] == (1, 3, 104, 72)
    enc = C.vae_encoder_contract(VAE)
    assert enc.bind({"image": (2, 3, 104, 72)}) == {"B": 2, "H": 13, "W": 9}
    with pytest.raises(C.ContractError, match="not a multiple of 8"):
        enc.bind({"image": (2, 3, 100, 72)})

    static = C.ShapeProfile(batch=1, height=512, width=512)
    assert static.is_static and not profile.is_static
    lo, opt, hi = C.vae_decoder_contract(VAE).profile_shapes(static)["latent"]
    assert lo == opt == hi == (1, 4, 64, 64)
    ranges = unet.symbol_ranges(profile)
    with pytest.raises(C.ContractError, match="outside the exported range"):
        unet.check_in_profile({"B": 9, "H": 64, "W": 64}, ranges)


def test_contract_json_round_trip():
    for contract in (C.unet_contract(UNET, vae_scale=8, with_residuals=True), C.vae_encoder_contract(VAE),
                     C.text_encoder_contract({"hidden_size": 1280, "projection_dim": 1280}, with_projection=True)):
        again = C.Contract.from_json(json.loads(json.dumps(contract.to_json())))
        assert again == contract


def test_import_error_says_why():
    try:
        import tensorrt  # noqa: F401
        pytest.skip("tensorrt is installed here")
    except ImportError:
        pass
    from ldm_engine.errors import BackendUnavailableError
    from ldm_engine.export.tensorrt_build import import_tensorrt

    with pytest.raises(BackendUnavailableError, match="TensorRT is not installed"):
        import_tensorrt()


# ---------------------------------------------------------------------------------------------------
# Real TensorRT (GPU machines with the tensorrt package only)

@pytest.fixture(scope="module")
def trt():
    try:
        import tensorrt
    except ImportError as e:
        pytest.skip(f"import tensorrt failed ({e}); TensorRT engines cannot be built or run here")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA GPU; torch sees none")
    return tensorrt


@pytest.fixture(scope="module")
def trt_export(trt, tmp_path_factory):
    from tiny_pipelines import tiny_pipeline

    from ldm_engine.export.exporter import ExportOptions, export_model

    root = tmp_path_factory.mktemp("trt")
    model, cn = tiny_pipeline("sd-turbo", root), tiny_pipeline("controlnet-sd", root)
    out = root / "engines"
    opts = ExportOptions(fmt="tensorrt", dtype="fp32", device="cuda", controlnets=(str(cn),),
                         height=(32, 32, 64), width=(32, 48, 64), batch=(1, 1, 2), progress=False)
    manifest = export_model(str(model), out, opts, log=lambda *a: None)
    return model, cn, out, manifest


@pytest.mark.tensorrt  # the trt fixture also skips without a GPU, saying so
def test_tensorrt_engines_match_torch(trt_export):
    from ldm_engine import Engine

    model, cn, out, manifest = trt_export
    assert all("tensorrt" in e for e in manifest["networks"].values())
    e_torch = Engine.from_pretrained(str(model), device="cuda", dtype=torch.float32, controlnet=str(cn))
    e_trt = Engine.from_pretrained(str(model), backend="tensorrt", engine_dir=out, device="cuda",
                                   dtype=torch.float32, controlnet=str(cn))
    control = torch.rand(1, 3, 32, 48)
    for kw in (dict(guidance_scale=0.0), dict(guidance_scale=3.0, negative_prompt="x"),
               dict(image=torch.rand(1, 3, 32, 48), strength=0.5, guidance_scale=2.0)):
        a = e_torch.generate("a cat", height=32, width=48, seed=1, num_inference_steps=2, control_image=control,
                             output_type="pt", **kw).images
        b = e_trt.generate("a cat", height=32, width=48, seed=1, num_inference_steps=2, control_image=control,
                           output_type="pt", **kw).images
        # TensorRT may use TF32 for fp32 convolutions and matmuls
        assert float((a.float() - b.float()).abs().max()) < 2e-2


@pytest.mark.tensorrt  # the trt fixture also skips without a GPU, saying so
def test_tensorrt_cache_reuse_and_refusal(trt_export):
    from ldm_engine.export.exporter import ExportOptions, export_model
    from ldm_engine.export.runtime import load_exported_components
    from ldm_engine.export.tensorrt_build import TensorRTError

    model, cn, out, manifest = trt_export
    plan = out / manifest["networks"]["vae_decoder"]["tensorrt"]["plan"]
    mtime = plan.stat().st_mtime_ns
    opts = ExportOptions(fmt="tensorrt", dtype="fp32", device="cuda", controlnets=(str(cn),),
                         height=(32, 32, 64), width=(32, 48, 64), batch=(1, 1, 2), progress=False)
    export_model(str(model), out, opts, log=lambda *a: None)
    assert plan.stat().st_mtime_ns == mtime  # same key: not rebuilt
    assert os.path.exists(out / "timing.cache")

    comps, _ = load_exported_components(out, backend="tensorrt", device="cuda")
    with pytest.raises(ValueError, match="outside the exported range"):
        comps.vae.decode(torch.randn(1, 4, 64, 64, device="cuda"))  # 128 px > 64 px max

    sidecar = out / "vae_decoder.plan.json"
    info = json.loads(sidecar.read_text())
    manifest_now = json.loads((out / "manifest.json").read_text())
    manifest_now["networks"]["vae_decoder"]["tensorrt"]["key"]["tensorrt_version"] = "0.0.1"
    atomic_write_json(out / "manifest.json", manifest_now)
    with pytest.raises(TensorRTError, match="does not match this machine"):
        load_exported_components(out, backend="tensorrt", device="cuda")
    assert info["file"] == plan.name
