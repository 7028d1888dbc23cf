"""ONNX export of every network of every family (tiny random-weight models), checked with
onnx.checker and run in ONNX Runtime (CPU) against the torch modules; then Engine.generate() on the
onnxruntime backend against the torch backend."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from tiny_pipelines import tiny_pipeline

from ldm_engine import Engine
from ldm_engine.export import contracts as C
from ldm_engine.export.exporter import ExportOptions, export_model
from ldm_engine.export.manifest import read_manifest, verify_files
from ldm_engine.export.onnx_export import ExportError, _check_standard_ops, export_onnx, run_torch
from ldm_engine.export.runtime import load_exported_components
from ldm_engine.loading import load_controlnet, load_pipeline

# (pipeline, ControlNets exported with it): SD1-, SD2- and SDXL-style, ControlNet SD (two of them:
# multi-ControlNet) and SDXL
FAMILIES = [("sd15", ()), ("sd-turbo", ("controlnet-sd", "controlnet-sd-2")), ("sdxl", ("controlnet-sdxl",))]
EXPECTED = {
    "sd15": {"text_encoder", "unet", "vae_decoder", "vae_encoder"},
    "sd-turbo": {"text_encoder", "unet", "unet_controlnet", "controlnet_0", "controlnet_1", "vae_decoder",
                 "vae_encoder"},
    "sdxl": {"text_encoder", "text_encoder_2", "unet", "unet_controlnet", "controlnet_0", "vae_decoder",
             "vae_encoder"},
}


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture(scope="module", params=FAMILIES, ids=[f[0] for f in FAMILIES])
def exported(request, tiny_root, tmp_path_factory):
    kind, cn_kinds = request.param
    model = tiny_pipeline(kind, tiny_root)
    cn = [str(tiny_pipeline(k, tiny_root)) for k in cn_kinds]
    out = tmp_path_factory.mktemp(f"export-{kind}")
    # latent sizes 8..48 (tiny VAE: 2x), batch 1..3
    opts = ExportOptions(controlnets=tuple(cn), height=(16, 32, 96), width=(16, 32, 96),
                         batch=(1, 1, 3), progress=False, overwrite=True)
    manifest = export_model(str(model), out, opts, log=lambda *a: None)
    return kind, model, cn, out, manifest


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def test_exported_networks_match_torch(exported):
    """Each network's ONNX file passes onnx.checker and, in ONNX Runtime, matches the torch module
    within 1e-4 at shapes other than the traced ones (odd sizes, batch 3)."""
    kind, model, cn, out, manifest = exported
    assert set(manifest["networks"]) == EXPECTED[kind]
    comps = load_pipeline(model)
    modules = {"text_encoder": comps.text_encoder, "text_encoder_2": comps.text_encoder_2, "unet": comps.unet,
               "unet_controlnet": comps.unet, "vae_decoder": comps.vae, "vae_encoder": comps.vae}
    for i, path in enumerate(cn):
        modules[f"controlnet_{i}"] = load_controlnet(path)
    gen = torch.Generator().manual_seed(123)
    for name, entry in manifest["networks"].items():
        path = out / entry["onnx"]
        onnx.checker.check_model(str(path))
        proto = onnx.load(str(path))
        assert proto.opset_import[0].version >= 17
        assert all(n.domain in ("", "ai.onnx") for n in proto.graph.node), name
        contract = C.Contract.from_json(entry["contract"])
        assert [i.name for i in proto.graph.input] == contract.input_names
        assert [o.name for o in proto.graph.output] == contract.output_names
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for symbols in ({"B": 3, "H": 13, "W": 9}, {"B": 1, "H": 8, "W": 22}):
            inputs = contract.sample_inputs(symbols, generator=gen)
            ref = run_torch(modules[name], contract, inputs)
            got = session.run(None, {n: t.numpy() for n, t in zip(contract.input_names, inputs)})
            assert len(got) == len(ref) == len(contract.outputs)
            for spec, g, r in zip(contract.outputs, got, ref):
                assert g.shape == tuple(r.shape) == spec.shape(symbols), (name, spec.name)
                err = _rel(torch.from_numpy(g), r)
                assert err <= 1e-4, f"{name}.{spec.name} at {symbols}: relative error {err:.2e}"


def test_manifest_describes_every_file(exported):
    kind, model, cn, out, manifest = exported
    on_disk = read_manifest(out)
    assert on_disk == json.loads(json.dumps(manifest))
    verify_files(out, on_disk, full_hash=True)
    assert on_disk["complete"] and on_disk["format"] == "onnx" and on_disk["dtype"] == "fp32"
    assert on_disk["versions"]["torch"] == torch.__version__ and on_disk["versions"]["onnxruntime"]
    assert len(on_disk["source"]["sha256"]) == 64
    assert all(info["what"] and len(info["sha256"]) == 64 for info in on_disk["files"].values())
    for name, entry in on_disk["networks"].items():
        assert entry["onnx"] in on_disk["files"] and len(entry["weights_sha256"]) == 64
        assert entry["input_shapes"]["sample" if "sample" in entry["input_shapes"] else
                                     next(iter(entry["input_shapes"]))]
    unet = on_disk["networks"]["unet"]["input_shapes"]["sample"]
    # batch 1..3 images doubled by guidance; 16..96 px -> latent 8..48
    assert unet == [[1, 4, 8, 8], [2, 4, 16, 16], [6, 4, 48, 48]]
    for sub in ("configs/unet.json", "configs/vae.json", "configs/scheduler_config.json", "tokenizer/vocab.json"):
        assert sub in on_disk["files"], sub


def _compare(e_torch, e_ort, cases, label):
    for i, kw in enumerate(cases):
        a = e_torch.generate(**kw, height=32, width=48, seed=11 + i, output_type="pt").images
        b = e_ort.generate(**kw, height=32, width=48, seed=11 + i, output_type="pt").images
        assert a.shape == b.shape and a.std() > 0.01
        diff = float((a - b).abs().max())
        assert diff <= 1e-3, f"{label} case {i}: max abs difference {diff:.2e}"


def test_engine_onnxruntime_matches_torch(exported):
    """Same images from backend="onnxruntime" as from backend="torch": text-to-image with and
    without guidance, image-to-image, and ControlNet where the family has one."""
    kind, model, cn, out, manifest = exported
    g = torch.Generator().manual_seed(7)
    init = torch.rand(1, 3, 32, 48, generator=g)
    cases = [
        dict(prompt="a red cube", num_inference_steps=2, guidance_scale=0.0),
        dict(prompt=["a red cube", "two dogs"], negative_prompt="blurry", num_inference_steps=2, guidance_scale=4.0),
        dict(prompt="a tree", image=init, strength=0.6, num_inference_steps=3, guidance_scale=2.0),
    ]
    comps, nets = load_exported_components(out, backend="onnxruntime", device="cpu")
    assert len(nets) == len(cn) and manifest["controlnets"] == [f"controlnet_{i}" for i in range(len(cn))]
    assert [manifest["networks"][n]["source"] for n in manifest["controlnets"]] == cn
    e_torch = Engine.from_pretrained(str(model))
    e_ort = Engine(comps, [], name=str(model))  # the plain U-Net, even where a ControlNet was exported
    assert e_ort.family == e_torch.family and e_ort.scheduler == e_torch.scheduler
    _compare(e_torch, e_ort, cases, kind)
    if cn:
        control = [torch.rand(1, 3, 32, 48, generator=g) for _ in cn]
        e_torch = Engine.from_pretrained(str(model), controlnet=cn)
        e_ort = Engine.from_pretrained(str(model), backend="onnxruntime", engine_dir=out, controlnet=cn)
        scales = [0.7, 1.2][: len(cn)]
        cn_cases = [dict(case, control_image=control if len(cn) > 1 else control[0],
                         controlnet_conditioning_scale=scales if len(cn) > 1 else scales[0]) for case in cases[1:]]
        _compare(e_torch, e_ort, cn_cases, f"{kind}+{len(cn)} ControlNet(s)")


def test_runtime_wrappers_validate_and_cast(exported):
    kind, model, cn, out, manifest = exported
    comps, _ = load_exported_components(out, backend="onnxruntime", device="cpu")
    unet = comps.unet
    assert unet.dtype == torch.float32 and unet.device == torch.device("cpu")
    assert unet.config.in_channels == 4 and comps.vae.config.latent_channels == 4
    ctx = 64 if kind == "sdxl" else 32
    x = torch.randn(2, 4, 12, 10, dtype=torch.float64)
    ehs = torch.randn(2, 77, ctx)
    extra = {"text_embeds": torch.randn(2, 32), "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2)} \
        if kind == "sdxl" else {}
    # a 0-d int timestep and a (N,) float one give the same result; fp64 input is cast
    a = unet(x, torch.tensor(500), ehs, **extra)
    b = unet(x.float(), torch.full((2,), 500.0), ehs, **extra)
    assert a.shape == (2, 4, 12, 10) and a.dtype == torch.float32
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        unet(x, 10, torch.randn(2, 77, ctx + 1), **extra)
    if kind == "sdxl":
        with pytest.raises(ValueError, match="text_embeds"):
            unet(x, 10, ehs)
    else:
        with pytest.raises(ValueError, match="text_embeds"):
            unet(x, 10, ehs, text_embeds=torch.randn(2, 32), time_ids=torch.randn(2, 6))
    mean, logvar = comps.vae.encode(torch.randn(1, 3, 18, 26))
    assert mean.shape == logvar.shape == (1, 4, 9, 13)
    assert comps.vae.decode(mean).shape == (1, 3, 18, 26)
    ids = comps.tokenizer(["hello there", "x"])
    out_te = comps.text_encoder(ids)
    assert out_te.last_hidden_state.shape == (2, 77, 32) and out_te.pooled.shape == (2, 32)
    with pytest.raises(TypeError):
        comps.text_encoder(ids.float())


def test_check_standard_ops_rejects_custom_domains():
    contract = C.vae_decoder_contract({"block_out_channels": [8, 8], "latent_channels": 4, "out_channels": 3})
    node = onnx.helper.make_node("GroupNormSilu", ["latent"], ["image"], domain="ldm_engine")
    graph = onnx.helper.make_graph([node], "g", [onnx.helper.make_tensor_value_info("latent", 1, None)],
                                   [onnx.helper.make_tensor_value_info("image", 1, None)])
    with pytest.raises(ExportError, match="ldm_engine::GroupNormSilu"):
        _check_standard_ops(onnx.helper.make_model(graph), contract)


def test_external_data_and_fp16(tiny_root, tmp_path):
    """Large models keep their weights in one .data file (forced here with a zero threshold); an
    fp16 export has fp16 inputs/outputs/weights and passes the checker."""
    comps = load_pipeline(tiny_pipeline("sd15", tiny_root))
    vae = comps.vae
    contract = C.vae_decoder_contract(vae.config)
    info = export_onnx(vae, contract, tmp_path / "vae_decoder.onnx", symbols={"B": 2, "H": 8, "W": 8},
                       external_data_threshold=0)
    assert info["onnx_data"] == "vae_decoder.onnx.data"
    assert (tmp_path / "vae_decoder.onnx.data").stat().st_size > (tmp_path / "vae_decoder.onnx").stat().st_size
    onnx.checker.check_model(str(tmp_path / "vae_decoder.onnx"))
    session = ort.InferenceSession(str(tmp_path / "vae_decoder.onnx"), providers=["CPUExecutionProvider"])
    z = torch.randn(1, 4, 7, 11)
    ref = vae.decode(z)
    got = torch.from_numpy(session.run(None, {"latent": z.numpy()})[0])
    assert _rel(got, ref) <= 1e-4
    assert not list(tmp_path.glob(".tmp-*"))
    mask = os.umask(0)
    os.umask(mask)
    for f in ("vae_decoder.onnx", "vae_decoder.onnx.data"):  # shippable: not owner-only temp-file modes
        assert (tmp_path / f).stat().st_mode & 0o777 == 0o666 & ~mask

    half = C.vae_decoder_contract(vae.config, dtype="fp16")
    export_onnx(vae.half(), half, tmp_path / "half.onnx", symbols={"B": 2, "H": 8, "W": 8})
    proto = onnx.load(str(tmp_path / "half.onnx"))
    onnx.checker.check_model(proto)
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in proto.graph.initializer)


def test_sdxl_vae_stays_fp32_under_fp16(tiny_root):
    from ldm_engine.export.exporter import _plan_jobs, resolve_options

    comps = load_pipeline(tiny_pipeline("sdxl", tiny_root))
    assert comps.vae.config.force_upcast
    jobs = {j.network: j.contract.dtype for j in _plan_jobs(comps, [], resolve_options(ExportOptions(dtype="fp16")))}
    assert jobs["vae_decoder"] == jobs["vae_encoder"] == "fp32"
    assert jobs["unet"] == jobs["text_encoder_2"] == "fp16"


def test_io_binding_writes_into_torch_tensors(exported):
    """The session binds torch tensors by pointer: outputs are fresh torch tensors, inputs untouched."""
    kind, model, cn, out, manifest = exported
    comps, _ = load_exported_components(out, backend="onnxruntime", device="cpu")
    session = comps.vae.decoder
    z = torch.randn(2, 4, 5, 7)
    z_copy = z.clone()
    res = session({"latent": z})
    assert set(res) == {"image"} and res["image"].shape == (2, 3, 10, 14)
    torch.testing.assert_close(z, z_copy)
    ref = session.session.run(None, {"latent": z.numpy()})[0]
    np.testing.assert_allclose(res["image"].numpy(), ref, rtol=0, atol=0)


def test_export_forces_the_torch_ops_backend(monkeypatch):
    """GPU backends of ldm_engine.ops are custom ops that ONNX cannot hold: export runs on "torch"."""
    from ldm_engine.export.onnx_export import torch_ops_backend

    monkeypatch.setenv("LDM_ENGINE_BACKEND", "cuda")
    with torch_ops_backend():
        assert os.environ["LDM_ENGINE_BACKEND"] == "torch"
    assert os.environ["LDM_ENGINE_BACKEND"] == "cuda"
    monkeypatch.delenv("LDM_ENGINE_BACKEND")
    with torch_ops_backend():
        assert os.environ["LDM_ENGINE_BACKEND"] == "torch"
    assert "LDM_ENGINE_BACKEND" not in os.environ


def test_fp16_text_encoders_export_and_run(tiny_root, tmp_path):
    """fp16 graphs type-check strictly (onnx full_check, e.g. causal attention masks in fp16) and
    run in ONNX Runtime close to the fp32 torch model."""
    model = tiny_pipeline("sdxl", tiny_root)
    manifest = export_model(str(model), tmp_path, ExportOptions(dtype="fp16", components=("text_encoder",),
                                                               progress=False), log=lambda *a: None)
    assert {n: e["contract"]["dtype"] for n, e in manifest["networks"].items()} == \
        {"text_encoder": "fp16", "text_encoder_2": "fp16"}
    comps, _ = load_exported_components(tmp_path, backend="onnxruntime")
    ref = load_pipeline(model)
    ids = comps.tokenizer(["a photo of a cat", "a dog"])
    for name in ("text_encoder", "text_encoder_2"):
        onnx.checker.check_model(str(tmp_path / f"{name}.onnx"), full_check=True)
        got, want = getattr(comps, name)(ids), getattr(ref, name)(ids)
        for g, w in zip(got, want):
            assert g.dtype == torch.float16 and _rel(g, w) < 5e-3, name
