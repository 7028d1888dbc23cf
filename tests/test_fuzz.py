"""Fuzzing (hypothesis) of what reads untrusted input: the safetensors header reader, single-file
family detection and key mapping, the tokenizer on arbitrary unicode, and both command lines.

Each harness states what may happen: a result, or one of the project's ValueError subclasses
(CheckpointError ...), or argparse's exit -- never another exception, a hang or a crash. The
default run is bounded (about 40 s in all on a 2-core CI machine); ``LDM_FUZZ_SCALE=K`` runs K times
as many examples per harness, randomised instead of derandomised (the long run, recorded in
benchmarks/results/2026-12-02-cpu-reliability.md). Every crash
found became a regression test: the ``@example`` lines below and tests/test_hostile_files.py.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ldm_engine.errors import CheckpointError
from ldm_engine.loading.safetensors_io import _parse_header

SCALE = int(os.environ.get("LDM_FUZZ_SCALE", "0"))


def fuzz_settings(n: int):
    return settings(max_examples=n * max(SCALE, 1), deadline=None, derandomize=not SCALE, database=None,
                    suppress_health_check=list(HealthCheck))


# ---------------------------------------------------------------------------------------------- safetensors

_DTYPE_NAMES = ["F32", "F16", "BF16", "I64", "U8", "BOOL", "F64", "X9", ""]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12)
tensor_entries = st.fixed_dictionaries(
    {"dtype": st.sampled_from(_DTYPE_NAMES) | json_values,
     "shape": st.lists(st.integers(-2, 2**40) | json_values, max_size=4) | json_values,
     "data_offsets": st.lists(st.integers(-8, 2**20), min_size=0, max_size=3) | json_values},
    optional={"extra": json_values})
headers = st.dictionaries(st.text(max_size=12), tensor_entries | json_values, max_size=5).map(
    lambda d: d) | st.builds(lambda d, m: {**d, "__metadata__": m},
                             st.dictionaries(st.text(max_size=5), tensor_entries, max_size=3), json_values)


def _check_header_bytes(raw: bytes, data: bytes) -> None:
    head = struct.pack("<Q", len(raw)) + raw
    size = len(head) + len(data)
    try:
        tensors, metadata, start = _parse_header(Path("fuzz.safetensors"), size, head)
    except CheckpointError as exc:
        assert "fuzz.safetensors" in str(exc)
        return
    assert isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    for info in tensors.values():  # whatever is accepted lies inside the file and has a consistent size
        assert start <= info.start <= info.end <= size
        numel = 1
        for s in info.shape:
            numel *= s
        assert info.end - info.start == numel * torch.empty((), dtype=info.dtype).element_size()


@fuzz_settings(120)
@given(headers, st.binary(max_size=64))
@example({"w": {"dtype": "F32", "shape": [float("inf")], "data_offsets": [0, 4]}}, b"\0" * 4)
@example({"__metadata__": {"a": 1}}, b"")
@example({"w": {"dtype": "F32", "shape": "12", "data_offsets": [0, 4]}}, b"\0" * 4)
def test_fuzz_safetensors_header_json(header, data):
    try:
        raw = json.dumps(header).encode()
    except ValueError:  # out-of-range float etc.
        return
    _check_header_bytes(raw, data)


@fuzz_settings(200)
@given(st.binary(max_size=200), st.binary(max_size=32))
@example(b"[" * 50_000 + b"]" * 50_000, b"")
@example(b'{"a": ' * 20_000 + b"1" + b"}" * 20_000, b"")
def test_fuzz_safetensors_header_bytes(raw, data):
    _check_header_bytes(raw, data)


@pytest.mark.parametrize("shape", [(), (7,), (4, 768, 1)])
def test_regression_unet_only_single_file_with_a_malformed_cross_attention_weight(shape):
    """Found while writing the family-detection harness: a U-Net-only single file whose attn2.to_k.weight had an empty shape made
    family detection fail with IndexError instead of the ValueError the loader turns into a
    CheckpointError."""
    from ldm_engine.loading.checkpoint_keys import detect_single_file_family

    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    with pytest.raises(ValueError, match="cross-attention width"):
        detect_single_file_family({key: shape})
    assert detect_single_file_family({key: (320, 768)}) == "sd1"


def test_fuzz_header_length_field():
    for n in (0, 1, 7, 2**63, 2**64 - 1, 100 * 1024 * 1024 + 1):
        head = struct.pack("<Q", n) + b"{}"
        with pytest.raises(CheckpointError):
            _parse_header(Path("x.safetensors"), len(head), head)


# ---------------------------------------------------------------------------------------------- single files

class FakeReader:
    """keys and shapes of a single-file checkpoint, without data: the loader must refuse it (or
    accept it) from the header alone."""

    def __init__(self, shapes: dict):
        self.path = Path("fuzz-model.safetensors")
        self.metadata = {}
        self._shapes = shapes

    def keys(self):
        return list(self._shapes)

    def shape(self, key):
        return tuple(self._shapes[key])

    def load(self, key, **kw):
        return torch.randn(self._shapes[key]) if all(s >= 0 for s in self._shapes[key]) else None

    def close(self):
        pass


@pytest.fixture(scope="module")
def single_file_template():
    from loading_fixtures import pipeline_to_single_file, tiny_pipeline_folder

    state = pipeline_to_single_file("sd1")
    return {k: tuple(v.shape) for k, v in state.items()}, tiny_pipeline_folder("sd1")


_SEGMENTS = ["model", "diffusion_model", "input_blocks", "0", "1", "2", "weight", "bias", "attn2", "to_k",
             "cond_stage_model", "transformer", "control_model", "first_stage_model", "conditioner",
             "embedders", "label_emb", "in_proj_weight", "x", ""]


def _mutations(template_keys):
    key = st.sampled_from(template_keys)
    new_key = st.lists(st.sampled_from(_SEGMENTS), min_size=1, max_size=6).map(".".join) | st.text(max_size=20)
    shape = st.lists(st.integers(0, 70), max_size=5).map(tuple)
    return st.lists(st.one_of(
        st.tuples(st.just("drop"), key, st.none()),
        st.tuples(st.just("reshape"), key, shape),
        st.tuples(st.just("add"), new_key, shape),
        st.tuples(st.just("rename"), key, new_key),
    ), max_size=6)


def _apply(shapes: dict, mutations) -> dict:
    shapes = dict(shapes)
    for op, key, arg in mutations:
        if op == "drop":
            shapes.pop(key, None)
        elif op in ("reshape", "add"):
            shapes[key] = arg
        elif op == "rename" and key in shapes:
            shapes[arg] = shapes.pop(key)
    return shapes


_PREFIXES = ["model.diffusion_model.", "control_model.", "cond_stage_model.transformer.", "cond_stage_model.model.",
             "conditioner.embedders.0.transformer.", "conditioner.embedders.0.model.", "conditioner.embedders.1.model.",
             "first_stage_model.", "", "model_ema."]
_SUFFIXES = ["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", "label_emb.0.0.weight", "input_hint_block.0.weight",
             "weight", "x.y"]


@fuzz_settings(300)
@given(st.dictionaries(
    st.tuples(st.sampled_from(_PREFIXES), st.sampled_from(_SUFFIXES) | st.text(max_size=10)).map("".join),
    st.lists(st.integers(0, 2048), max_size=4).map(tuple) | st.sampled_from([(320, 768), (320, 1024), (7,), ()]),
    max_size=6))
def test_fuzz_single_file_family_detection(shapes):
    from ldm_engine.loading.checkpoint_keys import detect_single_file_family

    try:
        family = detect_single_file_family(shapes)
    except ValueError:
        return
    assert family in ("sd1", "sd2", "sdxl", "controlnet")


@fuzz_settings(200)
@given(st.dictionaries(
    st.tuples(st.sampled_from(["control_model.", ""]), st.sampled_from(_SUFFIXES) | st.text(max_size=10)).map("".join),
    st.lists(st.integers(0, 2048), max_size=4).map(tuple) | st.sampled_from([(320, 1024), ()]), max_size=5),
    st.sampled_from(["control_model.", ""]))
@example({"control_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": ()}, "control_model.")
def test_fuzz_controlnet_default_config(shapes, prefix):
    """Regression (sibling of the family-detection crash): an empty attn2.to_k.weight shape raised IndexError."""
    from ldm_engine.loading.single_file import _controlnet_default_config

    config = _controlnet_default_config(shapes, prefix)
    assert isinstance(config, dict) and "block_out_channels" in config


def test_fuzz_single_file_detection_and_mapping(single_file_template, monkeypatch):
    from ldm_engine.loading import load_pipeline
    from ldm_engine.loading import single_file
    from ldm_engine.loading.checkpoint_keys import detect_single_file_family

    template, config = single_file_template
    keys = sorted(template)
    reader = {}
    monkeypatch.setattr(single_file, "open_weights", lambda path, **kw: reader["r"])

    @fuzz_settings(15)  # each example builds and checks a whole (tiny) pipeline: ~0.5 s
    @given(_mutations(keys))
    @example([("reshape", "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", ()),
              ("drop", "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight", None)])
    def run(mutations):
        shapes = _apply(template, mutations)
        try:
            family = detect_single_file_family(shapes)
        except ValueError:
            family = None
        assert family in (None, "sd1", "sd2", "sdxl", "controlnet")
        reader["r"] = FakeReader(shapes)
        try:
            load_pipeline(Path(__file__), config=config)  # a real path: resolve_model_path checks it exists
        except CheckpointError:
            pass

    run()


# ---------------------------------------------------------------------------------------------- tokenizer

@pytest.fixture(scope="module")
def tokenizers():
    from ldm_engine.tokenizer import CLIPTokenizer

    return CLIPTokenizer.default(), CLIPTokenizer.default(pad_token="!")


@pytest.mark.filterwarnings("ignore:CLIP can only handle")
@fuzz_settings(300)
@given(st.text(max_size=300) | st.lists(st.characters(), max_size=300).map("".join)
       | st.lists(st.characters(codec=None, exclude_categories=()), max_size=50).map("".join))
@example("\u0130" * 100)                 # lower-cases to two code points
@example("<|endoftext|>" * 80)
@example("\x00\ud7ff\ufeff\u200b\U0010ffff")
@example("!" * 500)
@example("a \ud800 b")                    # a lone surrogate: found by the long run (TypeError from tokenizers)
def test_fuzz_tokenizer_unicode(tokenizers, text):
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: not text; a ValueError naming the problem
        for tok in tokenizers:
            with pytest.raises(ValueError, match="lone surrogate"):
                tok([text])
            with pytest.raises(ValueError, match="lone surrogate"):
                tok.encode(text)
        return
    for tok in tokenizers:
        ids = tok([text, text[::-1]])
        assert ids.dtype == torch.long and ids.shape == (2, tok.model_max_length)
        assert int(ids.min()) >= 0 and int(ids.max()) < tok.vocab_size
        assert ids[0, 0].item() == tok.bos_token_id
        tok.decode(tok.encode(text))


@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
def test_regression_lone_surrogate_prompt_is_an_input_error(field):
    """Found by the long fuzz run: generate("\\ud800") failed inside the tokenizers library with a
    TypeError; it is now an InvalidInputError before any network runs."""
    from ldm_engine.errors import InvalidInputError
    from ldm_engine.pipeline.demo import build_tiny_engine

    engine = build_tiny_engine()
    kw = {"prompt": "a cat", "negative_prompt": None, field: ["ok", "bad \udfff"] if field == "prompt" else "\ud800"}
    with pytest.raises(InvalidInputError, match="lone surrogate"):
        engine.generate(kw.pop("prompt"), guidance_scale=2.0, num_inference_steps=1, height=32, width=32, **kw)


# ---------------------------------------------------------------------------------------------- command lines

class Reached(Exception):
    """The arguments were accepted and the command got as far as loading a model."""


_GEN_OPTIONS = ["--model", "--prompt", "--negative-prompt", "--steps", "--guidance", "--size", "--seed",
                "--num-images", "--image", "--strength", "--controlnet", "--control-image", "--control-scale",
                "--scheduler", "--device", "--dtype", "--backend", "--engine-dir", "--out", "--help", "-h",
                "--mask", "--vae", "--preview-vae", "--preview-dir", "--lora"]
_EXPORT_OPTIONS = ["--out", "--format", "--components", "--height", "--width", "--batch", "--dtype",
                   "--controlnet", "--device", "--opset", "--overwrite", "--verify", "--trt-typing",
                   "--workspace", "--timing-cache", "--quiet", "--vae", "--lora"]
_VALUES = st.sampled_from(["0", "-1", "1", "512", "8x8", "1x2x3", "nan", "inf", "1e400", "cpu", "cuda:7", "fp16",
                           "torch", "unet", "16:32:64", "64:32:16", "a:b", "", "x" * 300, "\x00", "é", "-",
                           "--", "/nonexistent", "."]) | st.text(max_size=12)


def _argv(options, head):
    token = st.sampled_from(options) | _VALUES
    return st.tuples(head, st.lists(token, max_size=8)).map(lambda t: [*t[0], *t[1]])


def _run_cli(main, argv) -> None:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
        except Reached:
            return
    assert code in (0, 2), (argv, code, err.getvalue()[-500:])
    if code == 2:
        assert "error" in err.getvalue().lower() and "Traceback" not in err.getvalue()


def test_fuzz_generate_cli(monkeypatch, tmp_path):
    from ldm_engine import cli
    from ldm_engine.engine import Engine
    from ldm_engine.pipeline import demo

    def reached(*a, **k):
        raise Reached

    monkeypatch.setattr(Engine, "from_pretrained", classmethod(reached))
    monkeypatch.setattr(demo, "build_tiny_engine", reached)
    monkeypatch.chdir(tmp_path)

    @fuzz_settings(100)
    @given(_argv(_GEN_OPTIONS, st.sampled_from([["generate"], [], ["gen"], ["generate", "--model"]])))
    def run(argv):
        _run_cli(cli.main, argv)

    run()


def test_fuzz_export_cli(monkeypatch, tmp_path):
    from ldm_engine.export import cli

    def reached(*a, **k):
        raise Reached

    monkeypatch.setattr(cli, "export_model", reached)
    monkeypatch.chdir(tmp_path)

    @fuzz_settings(100)
    @given(_argv(_EXPORT_OPTIONS, st.sampled_from([["model"], [], ["model", "--out", "o"]])))
    def run(argv):
        _run_cli(cli.main, argv)

    run()
