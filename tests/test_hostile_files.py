"""Malformed and hostile files: every one ends in a CheckpointError / ExportDirError (ValueError
subclasses) naming the file and the problem, before anything larger than the file is allocated.

Weights (.safetensors headers nested thousands of levels deep, bad ``__metadata__``), configs whose
sizes disagree with the weights (a million channels: compared on the meta device, nothing allocated),
tokenizer files (replaced on disk, corrupt, merges the tokenizers library would panic on), scheduler
configs, single-file checkpoints, ControlNets and exported-engine manifests.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tiny_pipelines import tiny_pipeline

from ldm_engine.errors import CheckpointError
from ldm_engine.export.manifest import ExportDirError, atomic_write_json, new_manifest, read_manifest
from ldm_engine.loading import load_controlnet, load_pipeline
from ldm_engine.loading.safetensors_io import SafetensorsFile
from ldm_engine.tokenizer import CLIPTokenizer

DEEP = 100_000  # levels of nesting: far beyond Python's recursion limit


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("hostile")


@pytest.fixture(scope="module")
def sd(root):
    return tiny_pipeline("sd-turbo", root)


@pytest.fixture(scope="module")
def controlnet(root):
    return tiny_pipeline("controlnet-sd", root)


def copy_of(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def write_raw(path: Path, header: bytes, data: bytes = b"") -> Path:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


# ---------------------------------------------------------------------------------------------- weights

@pytest.mark.parametrize("header", [
    b"[" * DEEP + b"]" * DEEP,
    b'{"w": ' + b'{"a": ' * DEEP + b"1" + b"}" * DEEP + b"}",
    b'{"__metadata__": ' + b"[" * DEEP + b"]" * DEEP + b"}",
], ids=["list", "tensor-entry", "metadata"])
def test_deeply_nested_header_is_a_checkpoint_error(tmp_path, header):
    path = write_raw(tmp_path / "deep.safetensors", header)
    with pytest.raises(CheckpointError, match="nested too deeply") as exc:
        SafetensorsFile(path)
    assert str(path) in str(exc.value)


@pytest.mark.parametrize("metadata, why", [
    ({"format": 1}, "int for 'format'"),
    ({"a": {"b": "c"}}, "dict for 'a'"),
    (["format", "pt"], "got list"),
    ("pt", "got str"),
])
def test_metadata_must_map_strings_to_strings(tmp_path, metadata, why):
    t = torch.randn(3, 5)
    header = {"__metadata__": metadata, "w": {"dtype": "F32", "shape": [3, 5], "data_offsets": [0, 60]}}
    path = write_raw(tmp_path / "meta.safetensors", json.dumps(header).encode(), t.numpy().tobytes())
    with pytest.raises(CheckpointError, match="__metadata__ must map strings to strings") as exc:
        SafetensorsFile(path)
    assert why in str(exc.value)
    # the valid form is accepted, and an absent or empty one too
    header["__metadata__"] = {"format": "pt"}
    write_raw(path, json.dumps(header).encode(), t.numpy().tobytes())
    with SafetensorsFile(path) as f:
        assert f.metadata == {"format": "pt"} and torch.equal(f.load("w"), t)


@pytest.mark.parametrize("entry", [
    {"dtype": "F32", "shape": [float("inf")], "data_offsets": [0, 4]},
    {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]},
    {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]},
    {"dtype": "F32", "shape": [2**62, 2**62], "data_offsets": [0, 4]},
    {"dtype": "F32", "shape": "1", "data_offsets": "04"},
], ids=["inf-dim", "list-dtype", "three-offsets", "huge-shape", "strings"])
def test_malformed_tensor_entries(tmp_path, entry):
    path = write_raw(tmp_path / "bad.safetensors", json.dumps({"w": entry}).encode(), b"\0" * 8)
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        SafetensorsFile(path)


def test_deep_header_in_a_pipeline_folder_names_the_file(sd, tmp_path):
    folder = copy_of(sd, tmp_path)
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    write_raw(weights, b"[" * DEEP + b"]" * DEEP)
    with pytest.raises(CheckpointError, match="nested too deeply") as exc:
        load_pipeline(folder)
    assert str(weights) in str(exc.value)


def test_deep_header_in_single_file_and_controlnet(tmp_path):
    for name in ("model.safetensors", "control.safetensors"):
        write_raw(tmp_path / name, b'{"x": ' + b"[" * DEEP + b"]" * DEEP + b"}")
    with pytest.raises(CheckpointError, match="nested too deeply"):
        load_pipeline(tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="nested too deeply"):
        load_controlnet(tmp_path / "control.safetensors")


# ---------------------------------------------------------------------------------------------- configs

def _no_big_allocation(monkeypatch):
    """Fails the test if weights are read (materialised) although the config disagrees with them:
    the comparison must happen on the meta device. (Before, building the model from such a config
    already tried to allocate terabytes.)"""
    import ldm_engine.loading.components as components

    def guarded(model, plan, **kw):
        raise AssertionError(f"{plan.component}: weights were read although the config disagrees")

    monkeypatch.setattr(components, "materialize", guarded)


@pytest.mark.parametrize("component, change", [
    ("unet", dict(block_out_channels=[2**20, 2**20])),
    ("unet", dict(cross_attention_dim=2**20)),
    ("vae", dict(block_out_channels=[2**20, 2**20])),
    ("text_encoder", dict(hidden_size=2**20, intermediate_size=2**22)),
    ("text_encoder", dict(vocab_size=2**40)),
])
def test_config_sizes_are_checked_against_the_weights_before_allocating(sd, tmp_path, monkeypatch, component, change):
    folder = copy_of(sd, tmp_path)
    edit_json(folder / component / "config.json", **change)
    _no_big_allocation(monkeypatch)
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError) as exc:
        load_pipeline(folder)
    assert time.perf_counter() - t0 < 30
    msg = str(exc.value)
    assert "does not match" in msg or "unsupported" in msg, msg
    assert str(folder) in msg


def test_controlnet_config_sizes_are_checked_before_allocating(controlnet, tmp_path, monkeypatch):
    folder = copy_of(controlnet, tmp_path)
    edit_json(folder / "config.json", block_out_channels=[2**20, 2**20])
    _no_big_allocation(monkeypatch)
    with pytest.raises(CheckpointError, match="does not match") as exc:
        load_controlnet(folder)
    assert str(folder) in str(exc.value)


@pytest.mark.parametrize("change", [
    dict(block_out_channels="abc"),
    dict(layers_per_block=-3),
    dict(block_out_channels=[32, None]),
])
def test_config_of_the_wrong_type_is_a_checkpoint_error(sd, tmp_path, change):
    folder = copy_of(sd, tmp_path)
    edit_json(folder / "unet" / "config.json", **change)
    with pytest.raises(CheckpointError) as exc:
        load_pipeline(folder)
    assert "unet" in str(exc.value)


@pytest.mark.parametrize("raw", [b"[" * DEEP + b"]" * DEEP, b"\xff\xfe{}", b"[1, 2]"], ids=["deep", "not-utf8", "list"])
def test_unreadable_configs(sd, tmp_path, raw):
    folder = copy_of(sd, tmp_path)
    (folder / "unet" / "config.json").write_bytes(raw)
    with pytest.raises(CheckpointError) as exc:
        load_pipeline(folder)
    assert str(folder / "unet" / "config.json") in str(exc.value)


@pytest.mark.parametrize("change, match", [
    (dict(num_train_timesteps=10**12), "num_train_timesteps"),
    (dict(num_train_timesteps="1000"), "num_train_timesteps"),
    (dict(beta_end=float("nan")), "beta_end"),
    (dict(trained_betas=[0.5] * 3), "trained_betas"),
    (dict(steps_offset=10**9), "steps_offset"),
])
def test_scheduler_config_numbers(sd, tmp_path, change, match):
    folder = copy_of(sd, tmp_path)
    edit_json(folder / "scheduler" / "scheduler_config.json", **change)
    with pytest.raises(CheckpointError, match=match) as exc:
        load_pipeline(folder)
    assert "scheduler_config.json" in str(exc.value)


# ---------------------------------------------------------------------------------------------- tokenizers

def test_tokenizer_replaced_on_disk_is_read_again(sd, tmp_path):
    folder = copy_of(sd / "tokenizer", tmp_path)
    prompt = "a red fox"
    before = CLIPTokenizer.from_pretrained(folder)(prompt)
    vocab_path = folder / "vocab.json"
    vocab = json.loads(vocab_path.read_text())
    # swap the ids of two of the prompt's tokens: a different (valid) vocabulary of the same size
    vocab["red</w>"], vocab["fox</w>"] = vocab["fox</w>"], vocab["red</w>"]
    tmp = folder / "vocab.new"
    tmp.write_text(json.dumps(vocab))
    os.replace(tmp, vocab_path)  # as a download tool replaces a file
    after = CLIPTokenizer.from_pretrained(folder)(prompt)
    assert not torch.equal(before, after)
    assert after[0, 2].item() == before[0, 3].item() and after[0, 3].item() == before[0, 2].item()

    # a corrupt file written over the good one (in place, same name) is noticed, not served from cache
    vocab_path.write_text(vocab_path.read_text()[: 1000])
    with pytest.raises(ValueError, match="not valid JSON"):
        CLIPTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("vocab, merges, match", [
    ({"a": 0, "b": 1, "<|startoftext|>": 2, "<|endoftext|>": 3}, [("a", "b")], "not in the vocabulary"),
    ({"a": 0, "b": 1, "<|startoftext|>": 2, "<|endoftext|>": 3}, [("a", "c")], "not in the vocabulary"),
    ({"a": -1, "b": 1, "<|startoftext|>": 2, "<|endoftext|>": 3}, [], "integer ids"),
    ({"a": 2**40, "b": 1, "<|startoftext|>": 2, "<|endoftext|>": 3}, [], "integer ids"),
    ({"a": True, "b": 1, "<|startoftext|>": 2, "<|endoftext|>": 3}, [], "integer ids"),
])
def test_vocab_and_merges_the_tokenizers_library_would_panic_on(vocab, merges, match):
    # ("a", "b") whose result "ab" is no token makes tokenizers' BPE panic (a BaseException)
    with pytest.raises(ValueError, match=match):
        CLIPTokenizer(vocab, merges)


@pytest.mark.parametrize("name, text", [
    ("vocab.json", "[" * DEEP + "]" * DEEP),
    ("vocab.json", "\xff\xfe garbage"),
    ("merges.txt", "#version: 0.2\nnot-a-token other\n"),
    ("tokenizer_config.json", "{" + '"a": {' * DEEP + "}" * DEEP + "}"),
    ("tokenizer_config.json", '{"pad_token": [1, 2]}'),
    ("added_tokens.json", '{"zzz": "x"}'),
])
def test_corrupt_tokenizer_files_in_a_pipeline(sd, tmp_path, name, text):
    folder = copy_of(sd, tmp_path)
    (folder / "tokenizer" / name).write_bytes(text.encode("latin-1"))
    with pytest.raises(CheckpointError) as exc:
        load_pipeline(folder)
    assert "tokenizer" in str(exc.value)


# ---------------------------------------------------------------------------------------------- manifests

def _manifest(**changes) -> dict:
    m = new_manifest(source="/models/x", source_sha256="0" * 64, family="sd2", fmt="onnx", dtype="fp32",
                     profile={"batch": [1, 1, 1]}, device="cpu", opset=17)
    m["complete"] = True
    m.update(changes)
    return m


@pytest.mark.parametrize("content, match", [
    ("[" * DEEP + "]" * DEEP, "nested too deeply"),
    ("[1, 2, 3]", "not a JSON object"),
    ("null", "not a JSON object"),
    (_manifest(complete="yes"), "incomplete export"),
    (_manifest(networks=[]), "'networks'"),
    (_manifest(networks={"unet": 3}), "'networks'"),
    (_manifest(files={"unet.onnx": {"size": "12", "sha256": "x"}}), "int 'size'"),
    (_manifest(files={"../../etc/passwd": {"size": 1, "sha256": "x"}}), "outside the directory"),
    (_manifest(files=[]), "'files'"),
    (_manifest(networks={"unet": {"onnx": "elsewhere.onnx"}}), "not listed"),
    (_manifest(controlnets=["nope"]), "'controlnets'"),
    (_manifest(source="x"), "'source'"),
])
def test_hostile_manifests(tmp_path, content, match):
    path = tmp_path / "manifest.json"
    if isinstance(content, dict):
        atomic_write_json(path, content)
    else:
        path.write_text(content)
    with pytest.raises(ExportDirError, match=match):
        read_manifest(tmp_path)
    # the well-formed manifest is accepted
    atomic_write_json(path, _manifest())
    assert read_manifest(tmp_path)["family"] == "sd2"


def test_single_file_with_a_bad_metadata_and_a_truncated_tensor(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.randn(8, 4, 3, 3)}, path,
              metadata={"format": "pt"})
    data = path.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + header_len])
    header["__metadata__"] = {"format": ["pt"]}
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + header_len:])
    with pytest.raises(CheckpointError, match="__metadata__"):
        load_pipeline(path)
    path.write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match="truncated"):
        load_pipeline(path)


@pytest.mark.parametrize("shard", ["../../outside.safetensors", "/etc/passwd", ["a"], 5, ""])
def test_sharded_index_names_only_files_next_to_it(sd, tmp_path, shard):
    folder = copy_of(sd, tmp_path)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.unlink()
    (folder / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {"conv_in.weight": shard}}))
    with pytest.raises(CheckpointError, match="weight_map must map tensor names to shard file names"):
        load_pipeline(folder)
