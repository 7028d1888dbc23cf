"""Loading diffusers folders (plain, fp16 variant, sharded), Hugging Face cache repo ids, the
safetensors reader, and every loading error. Reference: the diffusers / transformers modules the
folders were saved from (fp32, CPU, relative error <= 1e-4)."""

import json
import os
import shutil
import sys

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
import safetensors.torch as st  # noqa: E402

from loading_fixtures import (  # noqa: E402
    assert_controlnet_matches, assert_text_encoder_matches, assert_unet_matches, assert_vae_matches,
    make_unet, tiny_controlnet, tiny_controlnet_folder, tiny_pipeline, tiny_pipeline_folder,
    write_tokenizer,
)

from ldm_engine.errors import CheckpointError  # noqa: E402
from ldm_engine.loading import Components, load_controlnet, load_pipeline, resolve_model_path  # noqa: E402
from ldm_engine.loading.safetensors_io import SafetensorsFile  # noqa: E402

UNET_FILE = "unet/diffusion_pytorch_model.safetensors"


def copy_folder(family: str, tmp_path, name="pipe"):
    dst = tmp_path / name
    shutil.copytree(tiny_pipeline_folder(family), dst)
    return dst


def prompts_ids(hf_tok, ours, prompts):
    want = hf_tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ours(prompts), want)


# ---- diffusers folders ------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_diffusers_folder_matches_reference(family):
    folder = tiny_pipeline_folder(family)
    pipe = tiny_pipeline(family)
    comps = load_pipeline(folder)
    assert isinstance(comps, Components)
    assert comps.family == family and comps.source == str(folder)
    assert comps.scheduler_config["_class_name"] == "EulerDiscreteScheduler"
    assert_unet_matches(comps.unet, pipe.unet, family)
    assert_vae_matches(comps.vae, pipe.vae)
    assert_text_encoder_matches(comps.text_encoder, pipe.text_encoder)
    prompts = ["a photo of an astronaut, riding a horse!", ""]
    prompts_ids(pipe.tokenizer, comps.tokenizer, prompts)
    if family == "sdxl":
        assert comps.text_encoder_2.with_projection
        assert_text_encoder_matches(comps.text_encoder_2, pipe.text_encoder_2)
        prompts_ids(pipe.tokenizer_2, comps.tokenizer_2, prompts)
        assert comps.tokenizer_2.pad_token_id == 0  # "!"
    else:
        assert comps.text_encoder_2 is None and comps.tokenizer_2 is None
    # Everything real, frozen, on the requested device: no meta tensor left behind.
    for model in (comps.unet, comps.vae, comps.text_encoder):
        assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
        assert not any(p.requires_grad for p in model.parameters())


def test_fp16_dtype_and_tokenizer_folder_with_vocab_files(tmp_path):
    folder = copy_folder("sd2", tmp_path)
    shutil.rmtree(folder / "tokenizer")  # transformers 5 wrote tokenizer.json; use vocab.json + merges.txt
    write_tokenizer(folder / "tokenizer", "!")
    comps = load_pipeline(folder, dtype=torch.float16)
    for model in (comps.unet, comps.vae, comps.text_encoder):
        assert {p.dtype for p in model.parameters()} == {torch.float16}
    assert comps.tokenizer.pad_token_id == 0
    ref = tiny_pipeline("sd2").unet.state_dict()
    assert torch.equal(comps.unet.state_dict()["conv_in.weight"], ref["conv_in.weight"].half())


def test_fp16_variant_preferred_plain_and_fallback(tmp_path):
    folder = copy_folder("sd1", tmp_path)
    other = make_unet("sd1", seed=7).half()
    other.save_pretrained(folder / "unet", variant="fp16")  # next to the plain file
    want_plain = tiny_pipeline("sd1").unet.state_dict()
    want_fp16 = {k: v.float() for k, v in other.state_dict().items()}

    def loaded_unet(**kw):
        return load_pipeline(folder, **kw).unet.state_dict()

    got = loaded_unet()  # variant=None prefers the plain file
    assert all(torch.equal(got[k], want_plain[k]) for k in want_plain)
    with pytest.warns(UserWarning, match="no 'fp16' variant for vae, text_encoder; using the plain weights"):
        got = loaded_unet(variant="fp16")  # components without the variant fall back (as in diffusers)
    assert all(torch.equal(got[k], want_fp16[k]) for k in want_fp16)
    with pytest.raises(CheckpointError, match=r"no 'bf16' variant weights in any component"):
        load_pipeline(folder, variant="bf16")
    (folder / UNET_FILE).unlink()  # only the fp16 variant left: variant=None falls back to it
    got = loaded_unet()
    assert all(torch.equal(got[k], want_fp16[k]) for k in want_fp16)


def test_sharded_and_sharded_variant_weights(tmp_path):
    folder = copy_folder("sdxl", tmp_path)
    pipe = tiny_pipeline("sdxl")
    shutil.rmtree(folder / "unet")
    pipe.unet.half().save_pretrained(folder / "unet", variant="fp16", max_shard_size="200KB")
    pipe.unet.float()
    shutil.rmtree(folder / "text_encoder_2")
    pipe.text_encoder_2.save_pretrained(folder / "text_encoder_2", max_shard_size="1MB")
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors.index.fp16.json").is_file()
    assert (folder / "text_encoder_2" / "model.safetensors.index.json").is_file()
    comps = load_pipeline(folder)
    assert_text_encoder_matches(comps.text_encoder_2, pipe.text_encoder_2)
    got, want = comps.unet.state_dict(), pipe.unet.state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k].half().float()) for k in want)
    # A shard the index names but the folder lacks: a clear error, not a KeyError.
    index = json.loads((folder / "text_encoder_2" / "model.safetensors.index.json").read_text())
    (folder / "text_encoder_2" / sorted(set(index["weight_map"].values()))[-1]).unlink()
    with pytest.raises(CheckpointError, match="shard files that are missing"):
        load_pipeline(folder)


@pytest.mark.parametrize("style", ["prefixed", "bare"])
def test_text_encoder_with_and_without_text_model_prefix(tmp_path, style):
    folder = copy_folder("sd1", tmp_path)
    path = folder / "text_encoder" / "model.safetensors"
    state = st.load_file(path)
    # transformers >= 5.6 saves CLIPTextModel without the prefix; published files have it.
    assert not any(k.startswith("text_model.") for k in state)
    if style == "prefixed":
        state = {"text_model." + k: v for k, v in state.items()}
        state["text_model.embeddings.position_ids"] = torch.arange(77)[None]  # old transformers saved it
    st.save_file(state, path)
    comps = load_pipeline(folder)
    assert_text_encoder_matches(comps.text_encoder, tiny_pipeline("sd1").text_encoder)


def test_text_encoder_with_both_prefix_styles_is_an_error(tmp_path):
    folder = copy_folder("sd1", tmp_path)
    path = folder / "text_encoder" / "model.safetensors"
    state = st.load_file(path)
    state["text_model.final_layer_norm.weight"] = state["final_layer_norm.weight"].clone()
    st.save_file(state, path)
    with pytest.raises(CheckpointError, match="duplicate of"):
        load_pipeline(folder)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_controlnet_folder_matches_reference(family):
    net = load_controlnet(tiny_controlnet_folder(family))
    assert_controlnet_matches(net, tiny_controlnet(family), family)


# ---- Hugging Face cache ---------------------------------------------------------------------

def fake_cache(root, repo_id, source):
    rev = "0123456789abcdef0123456789abcdef01234567"
    repo = root / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(source, repo / "snapshots" / rev)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    return repo / "snapshots" / rev


def test_repo_id_resolves_to_local_cache_snapshot(tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    cache = tmp_path / "hub"
    snapshot = fake_cache(cache, "tiny-org/tiny-sd", tiny_pipeline_folder("sd2"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HOME", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    assert resolve_model_path("tiny-org/tiny-sd") == snapshot
    assert load_pipeline("tiny-org/tiny-sd").family == "sd2"
    # HF_HOME/hub is the cache when HF_HUB_CACHE is unset.
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    assert resolve_model_path("tiny-org/tiny-sd") == snapshot
    snapshot_cn = fake_cache(cache, "tiny-org/tiny-controlnet", tiny_controlnet_folder("sd1"))
    assert load_controlnet("tiny-org/tiny-controlnet") is not None and snapshot_cn.is_dir()


def test_repo_id_not_in_cache_says_where_it_looked_and_how_to_download(tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(CheckpointError) as err:
        load_pipeline("nobody-org/no-such-model")
    msg = str(err.value)
    assert str(tmp_path / "empty-cache" / "models--nobody-org--no-such-model") in msg
    assert "hf download nobody-org/no-such-model" in msg and "huggingface-cli download" in msg


def test_repo_id_without_huggingface_hub_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails
    with pytest.raises(CheckpointError, match="pip install huggingface_hub"):
        resolve_model_path("some-org/some-model")


def test_nonexistent_path(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_pipeline(tmp_path / "missing" / "model.safetensors")
    with pytest.raises(CheckpointError, match="no such file"):
        load_controlnet(str(tmp_path / "nope.safetensors"))


def test_bad_arguments():
    with pytest.raises(TypeError, match="dtype"):
        load_pipeline("x", dtype="int8")
    with pytest.raises(TypeError):
        resolve_model_path(12)
    with pytest.raises(ValueError, match="prediction_type"):
        load_pipeline("x", prediction_type="sample")


# ---- mismatches and corrupt files ---------------------------------------------------------------

def test_missing_unexpected_and_wrong_shape_tensors_in_one_error(tmp_path):
    folder = copy_folder("sd1", tmp_path)
    unet_path = folder / UNET_FILE
    state = st.load_file(unet_path)
    del state["conv_in.bias"]
    state["down_blocks.0.extra.weight"] = torch.zeros(3)
    state["conv_out.weight"] = torch.zeros(4, 32, 1, 1)
    st.save_file(state, unet_path)
    vae_path = folder / "vae" / "diffusion_pytorch_model.safetensors"
    vae_state = st.load_file(vae_path)
    del vae_state["decoder.conv_out.bias"]
    st.save_file(vae_state, vae_path)

    with pytest.raises(CheckpointError) as err:
        load_pipeline(folder)
    msg = str(err.value)
    assert str(unet_path) in msg and str(vae_path) in msg
    assert "missing tensors (1):\n      conv_in.bias" in msg
    assert "unexpected tensors (1):\n      down_blocks.0.extra.weight" in msg
    assert "conv_out.weight: checkpoint [4, 32, 1, 1], model [4, 32, 3, 3]" in msg
    assert "decoder.conv_out.bias" in msg  # the VAE's problem is in the same error


def test_mismatch_listing_shows_first_20_and_a_count(tmp_path):
    folder = copy_folder("sd1", tmp_path)
    unet_path = folder / UNET_FILE
    state = st.load_file(unet_path)
    dropped = sorted(state)[:25]
    for k in dropped:
        del state[k]
    st.save_file(state, unet_path)
    with pytest.raises(CheckpointError) as err:
        load_pipeline(folder)
    msg = str(err.value)
    assert "missing tensors (25)" in msg and "... and 5 more" in msg
    assert sum(k in msg.split() for k in dropped) == 20


@pytest.mark.parametrize("cut", ["data", "header"])
def test_truncated_safetensors_file(tmp_path, cut):
    folder = copy_folder("sd1", tmp_path)
    path = folder / UNET_FILE
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if cut == "data" else data[:100])
    with pytest.raises(CheckpointError, match="truncated") as err:
        load_pipeline(folder)
    assert str(path) in str(err.value)


def test_random_bytes_and_bad_header_files(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match="not a valid safetensors file") as err:
        load_pipeline(junk)
    assert str(junk) in str(err.value)
    bad_json = tmp_path / "badjson.safetensors"
    bad_json.write_bytes((10).to_bytes(8, "little") + b"{not json}" + b"\0" * 16)
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_pipeline(bad_json)
    wrong_offsets = tmp_path / "offsets.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
    wrong_offsets.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 16)
    with pytest.raises(CheckpointError, match="should span 16 bytes"):
        SafetensorsFile(wrong_offsets)
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="only 3 bytes"):
        load_pipeline(tiny)


def test_pickle_files_are_refused_without_unpickling(tmp_path, monkeypatch):
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, ckpt)

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load must not be called")

    monkeypatch.setattr(torch, "load", no_unpickling)
    for bad in (ckpt, tmp_path / "model.bin", tmp_path / "model.pth", tmp_path / "model.pt"):
        if bad != ckpt:
            shutil.copy(ckpt, bad)
        with pytest.raises(CheckpointError, match="refusing to load a pickle") as err:
            load_pipeline(bad)
        assert "safetensors.torch.save_file" in str(err.value) and "allow_pickle=True" in str(err.value)
    with pytest.raises(CheckpointError, match="refusing"):
        load_controlnet(ckpt)


def test_diffusers_folder_with_only_bin_weights_is_refused(tmp_path):
    folder = copy_folder("sd1", tmp_path)
    unet_file = folder / UNET_FILE
    unet_file.rename(folder / "unet" / "diffusion_pytorch_model.bin")  # content does not matter: never read
    with pytest.raises(CheckpointError, match="refusing to load a pickle"):
        load_pipeline(folder)


def test_not_a_model_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither a diffusers pipeline folder"):
        load_pipeline(tmp_path / "empty")


# ---- the safetensors reader ---------------------------------------------------------------------

@pytest.mark.parametrize("io", ["read", "mmap"])
def test_reader_casts_floats_keeps_ints_and_returns_owned_tensors(tmp_path, io):
    g = torch.Generator().manual_seed(0)
    tensors = {"f16": torch.randn(3, 5, generator=g).half(), "bf16": torch.randn(7, generator=g).bfloat16(),
               "f32": torch.randn(2, 2, 3, generator=g), "i64": torch.arange(6).reshape(2, 3),
               "empty": torch.zeros(0, 4), "big": torch.randn(300, 257, generator=g)}
    path = tmp_path / "t.safetensors"
    st.save_file(tensors, path, metadata={"modelspec.prediction_type": "v"})
    with SafetensorsFile(path, io=io) as f:
        assert f.metadata == {"modelspec.prediction_type": "v"}
        assert sorted(f.keys()) == sorted(tensors)
        got = {k: f.load(k, dtype=torch.float32) for k in f.keys()}
        same = f.load("f16")
        half = f.load("big", dtype=torch.float16)
    for k, v in tensors.items():
        assert got[k].shape == v.shape
        assert got[k].dtype == (torch.int64 if k == "i64" else torch.float32)
        assert torch.equal(got[k], v.to(got[k].dtype))
    assert same.dtype == torch.float16 and torch.equal(same, tensors["f16"])
    assert torch.equal(half, tensors["big"].half())
    got["big"].add_(1)  # owned, writable memory, valid after the file is closed
    assert torch.equal(got["big"], tensors["big"] + 1)


@pytest.mark.cuda
def test_load_to_cuda_in_fp16_matches_cpu_load():
    folder = tiny_pipeline_folder("sdxl")
    gpu = load_pipeline(folder, device="cuda", dtype=torch.float16)
    cpu = load_pipeline(folder, dtype=torch.float16)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        got, want = getattr(gpu, name).state_dict(), getattr(cpu, name).state_dict()
        assert all(t.device.type == "cuda" for t in got.values())
        assert all(torch.equal(got[k].cpu(), want[k]) for k in want)
