"""ldm_engine.models.clip against transformers' CLIPTextModel / CLIPTextModelWithProjection."""

import zlib
from pathlib import Path

import pytest
import torch

from ldm_engine.models.clip import CLIPTextConfig, CLIPTextModel, CLIPTextOutput

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parent.parent
BOS, EOS = 49406, 49407


def real_config_path(name: str, filename: str) -> Path:
    for root in (REPO / "ldm_engine" / "configs", REPO.parent / "shared" / "configs"):
        if (root / name / filename).is_file():
            return root / name / filename
    pytest.skip(f"{name}/{filename} is in neither ldm_engine/configs nor ../shared/configs")


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


def prompt_ids(generator, lengths, *, pad_id, vocab_size=49408, total=77):
    """Token ids laid out like a tokenizer's output: bos, words, eos, then padding."""
    rows = []
    for n in lengths:
        words = torch.randint(1, min(vocab_size, 49406), (n,), generator=generator).tolist()
        row = [BOS] + words[: total - 2] + [EOS]  # a tokenizer truncates keeping the eos
        rows.append(row + [pad_id] * (total - len(row)))
    return torch.tensor(rows)


def tiny_config(**overrides) -> dict:
    d = dict(vocab_size=49408, hidden_size=48, intermediate_size=80, projection_dim=40, num_hidden_layers=3,
             num_attention_heads=3, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
             bos_token_id=0, eos_token_id=2, pad_token_id=1)
    d.update(overrides)
    return d


def reference_and_ours(config_dict: dict, with_projection: bool, seed: int):
    """A transformers model with every parameter random and non-zero, and ours with the same weights."""
    hf_config = transformers.CLIPTextConfig(**config_dict)
    hf_config._attn_implementation = "eager"  # an attention path independent of our SDPA call
    hf_cls = transformers.CLIPTextModelWithProjection if with_projection else transformers.CLIPTextModel
    torch.manual_seed(seed)
    hf = hf_cls(hf_config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "layer_norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.3 * torch.randn_like(p) + 0.05)  # offset: no entry is exactly zero
    state = hf.state_dict()
    if not with_projection:  # transformers 5.x CLIPTextModel has no "text_model." prefix
        state = {"text_model." + k: v for k, v in state.items()}
    ours = CLIPTextModel(CLIPTextConfig.from_dict(config_dict), with_projection=with_projection).eval()
    ours.load_state_dict(state, strict=True)
    return hf, ours


CASES = [
    # (config overrides, with_projection, pad id): legacy eos 2 (every SD checkpoint) and eos 49407
    (dict(hidden_act="quick_gelu"), False, EOS),               # CLIP-L style, SD1.5
    (dict(hidden_act="gelu", num_hidden_layers=2), False, 0),  # OpenCLIP-H style, pads with "!"
    (dict(hidden_act="gelu", hidden_size=64, num_attention_heads=4), True, 0),  # bigG + projection
    (dict(hidden_act="quick_gelu", eos_token_id=49407, bos_token_id=49406), False, EOS),
    (dict(hidden_act="gelu", eos_token_id=49407, bos_token_id=49406), True, 0),
    (dict(hidden_act="quick_gelu", eos_token_id=49407, bos_token_id=49406, num_hidden_layers=1), True, EOS),
]


@pytest.mark.parametrize("overrides,with_projection,pad_id", CASES)
def test_matches_transformers(overrides, with_projection, pad_id):
    config_dict = tiny_config(**overrides)
    seed = zlib.crc32(repr((sorted(overrides.items()), with_projection, pad_id)).encode())
    hf, ours = reference_and_ours(config_dict, with_projection, seed)
    generator = torch.Generator().manual_seed(seed)
    input_ids = prompt_ids(generator, [0, 5, 30, 75, 90], pad_id=pad_id)  # empty, short, full, truncated
    with torch.no_grad():
        expected = hf(input_ids, output_hidden_states=True)
        got = ours(input_ids)
    assert isinstance(got, CLIPTextOutput)
    assert got.last_hidden_state.shape == (5, 77, config_dict["hidden_size"])
    assert rel_err(got.last_hidden_state, expected.last_hidden_state) <= 1e-4
    assert rel_err(got.penultimate_hidden_state, expected.hidden_states[-2]) <= 1e-4
    expected_pooled = expected.text_embeds if with_projection else expected.pooler_output
    assert got.pooled.shape == expected_pooled.shape
    assert rel_err(got.pooled, expected_pooled) <= 1e-4


@pytest.mark.parametrize("eos_token_id", [2, 500])
def test_pooled_eos_position_rule(eos_token_id):
    """Legacy configs (eos 2) pool at the largest id; others at the first eos_token_id. Here the two
    rules pick different positions, so using the wrong one fails."""
    config_dict = tiny_config(vocab_size=1000, eos_token_id=eos_token_id, hidden_act="gelu")
    hf, ours = reference_and_ours(config_dict, False, seed=eos_token_id)
    input_ids = torch.tensor([[1, 900, 7, 500, 500, 3, 950, 0], [1, 500, 999, 998, 2, 2, 2, 500]])
    with torch.no_grad():
        expected = hf(input_ids).pooler_output
        got = ours(input_ids)
    assert rel_err(got.pooled, expected) <= 1e-4
    position = [6, 2] if eos_token_id == 2 else [3, 1]
    torch.testing.assert_close(got.pooled, got.last_hidden_state[[0, 1], position])


def test_state_dict_keys_are_the_published_names():
    config_dict = tiny_config(num_hidden_layers=2)
    hf_plain = transformers.CLIPTextModel(transformers.CLIPTextConfig(**config_dict))
    hf_proj = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**config_dict))
    with torch.device("meta"):
        plain = CLIPTextModel(CLIPTextConfig.from_dict(config_dict))
        proj = CLIPTextModel(CLIPTextConfig.from_dict(config_dict), with_projection=True)
    assert set(plain.state_dict()) == {"text_model." + k for k in hf_plain.state_dict()}
    assert set(proj.state_dict()) == set(hf_proj.state_dict())
    assert "text_projection.weight" in proj.state_dict() and "text_projection.bias" not in proj.state_dict()
    assert "text_model.encoder.layers.1.self_attn.q_proj.weight" in plain.state_dict()


@pytest.mark.parametrize("name,filename,with_projection,params,hidden_act,layers", [
    ("sd-turbo", "text_encoder.json", False, 340_387_840, "gelu", 23),
    ("sd15", "text_encoder.json", False, 123_060_480, "quick_gelu", 12),
    ("sdxl-turbo", "text_encoder_2.json", True, 694_659_840, "gelu", 32),
])
def test_real_configs_build_on_meta(name, filename, with_projection, params, hidden_act, layers):
    config = CLIPTextConfig.from_json(real_config_path(name, filename))
    assert (config.hidden_act, config.num_hidden_layers, config.eos_token_id) == (hidden_act, layers, 2)
    with torch.device("meta"):
        model = CLIPTextModel(config, with_projection=with_projection)
    assert sum(p.numel() for p in model.parameters()) == params
    assert all(p.is_meta for p in model.parameters())
    assert list(model.buffers()) == []  # nothing that assign-loading would leave on meta
    out = model(torch.zeros(2, 77, dtype=torch.long, device="meta"))
    pooled_dim = config.projection_dim if with_projection else config.hidden_size
    assert out.last_hidden_state.shape == out.penultimate_hidden_state.shape == (2, 77, config.hidden_size)
    assert out.pooled.shape == (2, pooled_dim)


def test_assign_loading_from_meta():
    config_dict = tiny_config(num_hidden_layers=2)
    hf, reference = reference_and_ours(config_dict, True, seed=3)
    with torch.device("meta"):
        model = CLIPTextModel(CLIPTextConfig.from_dict(config_dict), with_projection=True)
    model.load_state_dict(reference.state_dict(), assign=True, strict=True)
    ids = prompt_ids(torch.Generator().manual_seed(0), [4, 11], pad_id=0)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).pooled, reference(ids).pooled)


def test_config_from_dict():
    config = CLIPTextConfig.from_dict({"hidden_size": 64, "num_attention_heads": 4, "_name_or_path": "x",
                                       "architectures": ["CLIPTextModel"], "torch_dtype": "float16"})
    assert config.hidden_size == 64 and config.hidden_act == "quick_gelu" and config.eos_token_id == 49407
    nested = CLIPTextConfig.from_dict({"text_config": {"hidden_size": 32, "num_attention_heads": 2}})
    assert nested.hidden_size == 32
    with pytest.raises(ValueError, match="hidden_act"):
        CLIPTextConfig.from_dict({"hidden_act": "swish2"})
    with pytest.raises(ValueError, match="divisible"):
        CLIPTextConfig.from_dict({"hidden_size": 50, "num_attention_heads": 4})
    with pytest.raises(TypeError, match="config must be a dict"):
        CLIPTextConfig.from_dict([("hidden_size", 3)])


def test_bad_input_ids():
    model = CLIPTextModel(CLIPTextConfig(**tiny_config(vocab_size=100, num_hidden_layers=1)))
    with pytest.raises(TypeError, match="integer"):
        model(torch.zeros(1, 77))
    with pytest.raises(TypeError, match="input_ids"):
        model([[1, 2, 3]])
    with pytest.raises(ValueError, match="at most 77"):
        model(torch.zeros(1, 78, dtype=torch.long))
    with pytest.raises(ValueError, match="shape"):
        model(torch.zeros(77, dtype=torch.long))


@pytest.mark.parametrize("name", ["quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh"])
def test_activations_match_transformers(name):
    """Exact GELU and its tanh form differ by < 1e-3: too little for the model-level tolerance."""
    from transformers.activations import ACT2FN

    from ldm_engine.models.clip import _ACTIVATIONS

    x = torch.linspace(-8, 8, 4001, dtype=torch.float64)
    torch.testing.assert_close(_ACTIVATIONS[name](x), ACT2FN[name](x), rtol=1e-12, atol=1e-12)
