"""`python -m ldm_engine.export`: option parsing and validation (errors before any work), the output
directory rules, the manifest, and loading what it wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_pipelines import tiny_pipeline

from ldm_engine.errors import BackendUnavailableError
from ldm_engine.export import cli
from ldm_engine.export.manifest import (ExportDirError, atomic_write_json, new_manifest, read_manifest,
                                        sha256_file, verify_files)
from ldm_engine.export.runtime import load_exported_components
from ldm_engine.tokenizer import CLIPTokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    return tiny_pipeline("sd15", tmp_path_factory.mktemp("tiny-cli"))


@pytest.fixture
def no_loading(monkeypatch):
    """Fails the test if the model would be loaded: option errors must come before any work."""
    import ldm_engine.loading as loading

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the options were rejected")

    monkeypatch.setattr(loading, "load_pipeline", refuse)
    monkeypatch.setattr(loading, "load_controlnet", refuse)


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([str(a) for a in args])
    return exc.value.code, capsys.readouterr().err


def test_help_documents_every_option(capsys):
    parser = cli.build_parser()
    for action in parser._actions:
        assert action.help, f"option {action.option_strings or action.dest} has no help text"
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for opt in ("--out", "--format", "--components", "--height", "--width", "--batch", "--dtype", "--controlnet",
                "--device", "--opset", "--overwrite", "--verify", "--trt-typing", "--workspace", "--timing-cache"):
        assert opt in text
    for name in ("unet", "vae_decoder", "vae_encoder", "text_encoder", "controlnet", "MIN:OPT:MAX", "manifest.json"):
        assert name in text


@pytest.mark.parametrize("text,expected", [("512", (512, 512, 512)), ("256:512:1024", (256, 512, 1024)),
                                           ("64:64:64", (64, 64, 64))])
def test_parse_range_accepts(text, expected):
    assert cli.parse_range(text, "height") == expected


@pytest.mark.parametrize("args,message", [
    (["--height", "512:256:1024"], "MIN <= OPT <= MAX"),
    (["--width", "0:8:8"], "positive"),
    (["--height", "500"], "not a multiple of 8"),
    (["--width", "256:516:1024"], "516 px is not a multiple of 8"),
    (["--height", "256:512"], "MIN:OPT:MAX"),
    (["--batch", "a:b:c"], "integers"),
    (["--batch", "4:2:1"], "MIN <= OPT <= MAX"),
    (["--components", "unet,vae"], "unknown component(s) 'vae'"),
    (["--components", "unet,unet"], "twice"),
    (["--dtype", "bf16"], "bf16 with --format onnx"),
    (["--dtype", "int8"], "invalid choice"),
    (["--format", "tensorrt"], "tensorrt"),
    (["--format", "openvino"], "invalid choice"),
    (["--components", "controlnet"], "needs --controlnet"),
    (["--controlnet", "somewhere", "--components", "unet"], "'controlnet' is not in --components"),
    (["--opset", "13"], "opset 17 or newer"),
    (["--device", "tpu"], "cpu or cuda"),
])
def test_bad_options_fail_before_any_work(args, message, tmp_path, capsys, no_loading):
    out = tmp_path / "out"
    code, err = run_cli(["some-model", "--out", out, *args], capsys)
    assert code == 2
    assert message in err, err
    assert not out.exists()


def test_cuda_device_without_gpu(tmp_path, capsys, no_loading):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code, err = run_cli(["m", "--out", tmp_path / "o", "--device", "cuda"], capsys)
    assert code == 2 and "no CUDA GPU" in err


def test_tensorrt_absent_message(tmp_path, capsys, no_loading):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("tensorrt is installed here")
    except ImportError:
        pass
    code, err = run_cli(["m", "--out", tmp_path / "o", "--format", "tensorrt"], capsys)
    assert code == 2 and "TensorRT is not installed" in err


def test_refuses_another_models_directory(tiny_sd, tmp_path, capsys, no_loading):
    out = tmp_path / "out"
    other = new_manifest(source="/models/some-other-model", source_sha256="ab" * 32, family="sd1", fmt="onnx",
                         dtype="fp32", profile={}, device="cpu", opset=17)
    atomic_write_json(out / "manifest.json", other)
    code, err = run_cli([tiny_sd, "--out", out], capsys)
    assert code == 2 and "holds exports of another model" in err and "/models/some-other-model" in err

    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    code, err = run_cli([tiny_sd, "--out", stranger], capsys)
    assert code == 2 and "not an ldm_engine export directory" in err
    assert (stranger / "notes.txt").read_text() == "mine"


def test_cli_exports_loads_and_reexports(tiny_sd, tmp_path):
    """The real command in a subprocess, then the manifest, loading, a partial re-export."""
    out = tmp_path / "exp"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "ldm_engine.export", str(tiny_sd), "--out", str(out), "--components",
           "vae_decoder,text_encoder", "--height", "16:32:64", "--width", "32", "--batch", "1:2:2", "--verify"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "vae_decoder: ONNX export" in proc.stderr  # progress output
    assert "max relative error" in proc.stdout

    manifest = read_manifest(out)
    assert manifest["complete"] and set(manifest["networks"]) == {"vae_decoder", "text_encoder"}
    assert manifest["profile"] == {"batch": [1, 2, 2], "height": [16, 32, 64], "width": [32, 32, 32]}
    assert manifest["networks"]["vae_decoder"]["verify"]["max_rel_err"] < 1e-4
    assert manifest["networks"]["text_encoder"]["input_shapes"]["input_ids"] == [[1, 77], [4, 77], [4, 77]]
    for rel, info in manifest["files"].items():
        assert sha256_file(out / rel) == info["sha256"], rel
    assert (out / "model_index.json").exists() and (out / "tokenizer" / "merges.txt").exists()

    comps, nets = load_exported_components(out, backend="onnxruntime", device="cpu")
    source_tok = CLIPTokenizer.from_pretrained(tiny_sd / "tokenizer")
    prompts = ["a photo of a cat, 4k", "<|endoftext|> weird   SPACING!"]
    assert nets == [] and torch.equal(comps.tokenizer(prompts), source_tok(prompts))
    assert comps.tokenizer.pad_token_id == source_tok.pad_token_id
    assert comps.vae.decode(torch.randn(1, 4, 8, 16)).shape == (1, 3, 16, 32)
    with pytest.raises(BackendUnavailableError, match="vae_encoder was not exported"):
        comps.vae.encode(torch.randn(1, 3, 16, 32))
    with pytest.raises(BackendUnavailableError, match="unet was not exported"):
        comps.unet(torch.randn(1, 4, 8, 8), 1, torch.randn(1, 77, 32))

    # same model again, fewer components: the text encoder's files go away
    assert cli.main([str(tiny_sd), "--out", str(out), "--components", "vae_decoder", "--quiet"]) == 0
    manifest2 = read_manifest(out)
    assert set(manifest2["networks"]) == {"vae_decoder"}
    assert not (out / "text_encoder.onnx").exists() and (out / "vae_decoder.onnx").exists()
    assert not list(out.glob(".tmp-*"))


def test_incomplete_or_damaged_exports_are_refused(tiny_sd, tmp_path):
    out = tmp_path / "exp"
    assert cli.main([str(tiny_sd), "--out", str(out), "--components", "vae_decoder", "--quiet"]) == 0
    manifest = read_manifest(out)

    onnx_file = out / "vae_decoder.onnx"
    data = onnx_file.read_bytes()
    onnx_file.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ExportDirError, match="truncated"):
        load_exported_components(out, backend="onnxruntime")
    onnx_file.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, one bit flipped
    with pytest.raises(ExportDirError, match="sha256"):
        verify_files(out, manifest, full_hash=True)
    onnx_file.write_bytes(data)

    manifest["complete"] = False  # what an interrupted export leaves
    atomic_write_json(out / "manifest.json", manifest)
    with pytest.raises(ExportDirError, match="incomplete export"):
        load_exported_components(out, backend="onnxruntime")

    (out / "manifest.json").write_text("{not json")
    with pytest.raises(ExportDirError, match="corrupt"):
        load_exported_components(out, backend="onnxruntime")
    with pytest.raises(ExportDirError, match="no manifest.json"):
        load_exported_components(tmp_path, backend="onnxruntime")
    with pytest.raises(ValueError, match="backend must be one of"):
        load_exported_components(out, backend="openvino")


def test_engine_backend_errors(tiny_sd, tmp_path):
    from ldm_engine import Engine

    out = tmp_path / "exp"
    assert cli.main([str(tiny_sd), "--out", str(out), "--components", "vae_decoder", "--quiet"]) == 0
    json.loads((out / "manifest.json").read_text())
    with pytest.raises(ValueError, match="engine_dir"):
        Engine.from_pretrained(str(tiny_sd), backend="onnxruntime")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="tensorrt|TensorRT|cuda"):
            load_exported_components(out, backend="tensorrt", device="cpu")
