"""Single-file original checkpoints (ldm / sgm layout).

The test writes the original layout from a tiny diffusers pipeline with its own inverse mapping
(loading_fixtures.py); then diffusers' from_single_file (offline, given the diffusers folder as
config) and ldm_engine must load the same weights: module outputs are compared with each other
and with the pipeline they came from (fp32, CPU, relative error <= 1e-4).
"""

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
import safetensors.torch as st  # noqa: E402

from loading_fixtures import (  # noqa: E402
    assert_controlnet_matches, assert_same_weights, assert_text_encoder_matches, assert_unet_matches,
    assert_vae_matches,
    clip_to_ldm, clip_to_open_clip, controlnet_to_single_file, pipeline_to_single_file, tiny_controlnet,
    tiny_controlnet_folder, tiny_pipeline, tiny_pipeline_folder, unet_to_ldm, vae_to_ldm,
)

from ldm_engine.configs import default_config  # noqa: E402
from ldm_engine.errors import CheckpointError  # noqa: E402
from ldm_engine.loading import load_controlnet, load_pipeline  # noqa: E402
from ldm_engine.loading import checkpoint_keys as keys  # noqa: E402
from ldm_engine.loading.build import InMemoryTensors, LoadPlan, build_empty, check_plan  # noqa: E402
from ldm_engine.loading.components import (  # noqa: E402
    controlnet_factory, text_encoder_factory, unet_factory, vae_factory,
)
from ldm_engine.loading.single_file import _default_configs, _prediction_type  # noqa: E402


@pytest.fixture
def offline(monkeypatch):
    """diffusers must not reach the network: env var, and huggingface_hub's import-time constant."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def write(tmp_path, name, state, metadata=None):
    path = tmp_path / name
    st.save_file(state, path, metadata=metadata)
    return path


CASES = {  # case -> (family, sd2 text prefix)
    "sd1": ("sd1", None),
    "sd2-ldm": ("sd2", "cond_stage_model.model."),
    "sd2-sgm": ("sd2", "conditioner.embedders.0.model."),
    "sdxl": ("sdxl", None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_single_file_pipeline_matches_diffusers_from_single_file(tmp_path, offline, case):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    family, prefix = CASES[case]
    folder = tiny_pipeline_folder(family)
    path = write(tmp_path, f"{case}.safetensors", pipeline_to_single_file(family, sd2_prefix=prefix or ""))
    ref_cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    ref = ref_cls.from_single_file(str(path), config=str(folder), local_files_only=True)
    ours = load_pipeline(path, config=folder)
    original = tiny_pipeline(family)

    assert ours.family == family and ours.source == str(path)
    # Outputs against diffusers' own conversion of the file ...
    assert_unet_matches(ours.unet, ref.unet, family)
    assert_vae_matches(ours.vae, ref.vae)
    assert_text_encoder_matches(ours.text_encoder, ref.text_encoder)
    if family == "sdxl":
        assert_text_encoder_matches(ours.text_encoder_2, ref.text_encoder_2)
    # ... and bit-exact weights against the pipeline the file was written from.
    for name in ("unet", "vae", "text_encoder") + (("text_encoder_2",) if family == "sdxl" else ()):
        assert_same_weights(getattr(ours, name), getattr(original, name))
    assert ours.tokenizer.pad_token_id == (0 if family == "sd2" else 49407)
    if family == "sdxl":
        assert ours.tokenizer_2.pad_token_id == 0


def test_controlnet_single_file_matches_diffusers_from_single_file(tmp_path, offline):
    from diffusers import ControlNetModel

    path = write(tmp_path, "cn.safetensors", controlnet_to_single_file("sd1"))
    ref = ControlNetModel.from_single_file(str(path), config=str(tiny_controlnet_folder("sd1")), local_files_only=True)
    ours = load_controlnet(path, config=tiny_controlnet_folder("sd1"))
    assert_controlnet_matches(ours, ref, "sd1")
    assert_same_weights(ours, tiny_controlnet("sd1"))


def test_controlnet_single_file_unprefixed_fp16_and_sdxl(tmp_path):
    # ComfyUI-style fp16 re-uploads drop the control_model. prefix.
    state = {k: v.half() for k, v in controlnet_to_single_file("sd1", prefix="").items()}
    ours = load_controlnet(write(tmp_path, "cn16.safetensors", state), config=tiny_controlnet_folder("sd1"))
    assert_same_weights(ours, tiny_controlnet("sd1"), cast=torch.float16)
    # diffusers has no ldm-layout converter for SDXL ControlNets (it leaves label_emb unloaded),
    # so the SDXL case is checked against the original model only.
    path = write(tmp_path, "cnxl.safetensors", controlnet_to_single_file("sdxl"))
    ours = load_controlnet(path, config=tiny_controlnet_folder("sdxl") / "config.json")
    assert_same_weights(ours, tiny_controlnet("sdxl"))  # outputs: see test_loading's ControlNet folder test


def test_controlnet_single_file_in_diffusers_layout(tmp_path):
    net = tiny_controlnet("sdxl")
    path = write(tmp_path, "diffusers_layout.safetensors", {k: v.contiguous() for k, v in net.state_dict().items()})
    ours = load_controlnet(path, config=dict(net.config))
    assert_same_weights(ours, net)


def test_pickle_single_file_loads_only_with_allow_pickle(tmp_path):
    path = tmp_path / "sd1.ckpt"
    torch.save({"state_dict": pipeline_to_single_file("sd1"), "global_step": 1}, path)
    with pytest.raises(CheckpointError, match="refusing to load a pickle"):
        load_pipeline(path, config=tiny_pipeline_folder("sd1"))
    ours = load_pipeline(path, config=tiny_pipeline_folder("sd1"), allow_pickle=True)
    for name in ("unet", "vae", "text_encoder"):
        assert_same_weights(getattr(ours, name), getattr(tiny_pipeline("sd1"), name))


# ---- errors ----------------------------------------------------------------------------------------

def test_single_file_mismatches_name_the_file_with_original_key_names(tmp_path):
    state = pipeline_to_single_file("sd2")
    del state["model.diffusion_model.out.2.bias"]
    state["model.diffusion_model.input_blocks.1.1.bogus.weight"] = torch.zeros(2)
    state["cond_stage_model.model.transformer.resblocks.3.ln_1.weight"] = torch.zeros(32)  # 2 layers + 1 extra is the limit
    state["first_stage_model.quant_conv.weight"] = torch.zeros(8, 8, 3, 3)
    path = write(tmp_path, "bad.safetensors", state)
    with pytest.raises(CheckpointError) as err:
        load_pipeline(path, config=tiny_pipeline_folder("sd2"))
    msg = str(err.value)
    assert msg.startswith(str(path))
    assert "missing tensors (1):\n      conv_out.bias" in msg
    assert "model.diffusion_model.input_blocks.1.1.bogus.weight (as down_blocks.0.attentions.0.bogus.weight)" in msg
    assert "cond_stage_model.model.transformer.resblocks.3.ln_1.weight" in msg
    assert "quant_conv.weight: checkpoint [8, 8, 3, 3]" in msg and "model [8, 8, 1, 1]" in msg


def test_single_file_with_other_architecture_than_default_suggests_config(tmp_path):
    # The tiny file against the real SD1.5 default configs: one error, with the config= hint.
    path = write(tmp_path, "tiny_sd1.safetensors", pipeline_to_single_file("sd1"))
    with pytest.raises(CheckpointError) as err:
        load_pipeline(path)
    msg = str(err.value)
    assert "missing tensors" in msg and "tensors with the wrong shape" in msg and "pass config=" in msg


def test_unrecognised_single_files(tmp_path):
    lora = write(tmp_path, "lora.safetensors", {"lora_unet_down_blocks_0.alpha": torch.ones(())})
    with pytest.raises(CheckpointError, match="not a checkpoint ldm_engine can load"):
        load_pipeline(lora)
    cn = write(tmp_path, "cn.safetensors", controlnet_to_single_file("sd1"))
    with pytest.raises(CheckpointError, match="load_controlnet"):
        load_pipeline(cn)
    with pytest.raises(CheckpointError, match="not a ControlNet checkpoint"):
        load_controlnet(lora)


def test_family_detection_from_keys():
    def shapes(*names, width=768):
        return {n: ((320, width) if n.endswith("attn2.to_k.weight") else (1,)) for n in names}

    u = "model.diffusion_model."
    assert keys.detect_single_file_family(shapes(u + "x", "cond_stage_model.transformer.text_model.x")) == "sd1"
    assert keys.detect_single_file_family(shapes(u + "x", "cond_stage_model.model.ln_final.weight")) == "sd2"
    assert keys.detect_single_file_family(shapes(u + "x", "conditioner.embedders.0.model.ln_final.weight")) == "sd2"
    assert keys.detect_single_file_family(shapes(u + "label_emb.0.0.weight", "conditioner.embedders.0.transformer.x",
                                                 "conditioner.embedders.1.model.x")) == "sdxl"
    assert keys.detect_single_file_family(shapes("control_model.input_hint_block.0.weight")) == "controlnet"
    assert keys.detect_single_file_family(shapes(u + "a.attn2.to_k.weight", width=1024)) == "sd2"  # U-Net only
    with pytest.raises(ValueError, match="refiner"):
        keys.detect_single_file_family(shapes(u + "label_emb.0.0.weight", "conditioner.embedders.0.model.x"))


def test_prediction_type_defaults_and_overrides():
    # SD2 epsilon vs v cannot be read from the weights: sgm layout (SD-Turbo) -> epsilon,
    # ldm layout (SD 2.x as published) -> SD2.1-768-v, like diffusers.
    assert _default_configs("sd2", sgm_layout=True, prediction=None)["scheduler"]["prediction_type"] == "epsilon"
    v = _default_configs("sd2", sgm_layout=False, prediction=None)
    assert v["scheduler"]["prediction_type"] == "v_prediction" and v["unet"]["upcast_attention"] is True
    assert _default_configs("sd2", sgm_layout=False, prediction="epsilon")["scheduler"]["prediction_type"] == "epsilon"
    assert _prediction_type(None, {"modelspec.prediction_type": "v"}) == "v_prediction"
    assert _prediction_type("epsilon", {"modelspec.prediction_type": "v"}) == "epsilon"
    assert _prediction_type(None, {}) is None


def test_prediction_type_argument_and_metadata_reach_the_scheduler_config(tmp_path):
    path = write(tmp_path, "v.safetensors", pipeline_to_single_file("sd1"), metadata={"modelspec.prediction_type": "v"})
    assert load_pipeline(path, config=tiny_pipeline_folder("sd1")).scheduler_config["prediction_type"] == "v_prediction"
    comps = load_pipeline(path, config=tiny_pipeline_folder("sd1"), prediction_type="epsilon")
    assert comps.scheduler_config["prediction_type"] == "epsilon"


# ---- the real architectures: every tensor of the default configs is mapped -------------------------

def _plan_for(model, ldm_state: dict, mapper, prefix=""):
    reader = InMemoryTensors(path="real-size", tensors={prefix + k: v for k, v in ldm_state.items()})
    return check_plan(LoadPlan("x", []).add([reader], mapper, prefix), model)


def _meta_state(model):
    return {k: v for k, v in model.state_dict().items()}


@pytest.mark.parametrize("folder", ["sd15", "sd-turbo", "sd21-v", "sdxl-turbo"])
def test_default_config_ldm_tables_cover_the_real_architectures(folder):
    """Real-size models on the meta device: their state dict written in ldm/sgm names (the test's
    own inverse mapping) maps back to every parameter with the right shape."""
    unet_cfg = default_config(folder, "unet.json")
    unet = build_empty(unet_factory(unet_cfg, folder))
    result = _plan_for(unet, unet_to_ldm(_meta_state(unet), unet_cfg), keys.table_mapper(keys.unet_ldm_table(unet_cfg)))
    assert not result, result
    vae_cfg = default_config(folder, "vae.json")
    vae = build_empty(vae_factory(vae_cfg, folder))
    ldm_vae = vae_to_ldm(_meta_state(vae), len(vae_cfg["block_out_channels"]))
    assert not _plan_for(vae, ldm_vae, keys.table_mapper(keys.vae_ldm_table(vae_cfg)))
    te_cfg = default_config(folder, "text_encoder.json")
    te = build_empty(text_encoder_factory(te_cfg, folder, with_projection=False))
    if te_cfg["hidden_act"] == "gelu":  # OpenCLIP ViT-H: 24 stored layers for the 23 used
        state = clip_to_open_clip(_meta_state(te), extra_layer=True)
        assert not _plan_for(te, state, keys.open_clip_mapper(te_cfg["num_hidden_layers"], keep_projection=False))
    else:
        assert not _plan_for(te, clip_to_ldm(_meta_state(te)), keys.clip_key)
    if folder == "sdxl-turbo":
        te2_cfg = default_config(folder, "text_encoder_2.json")
        te2 = build_empty(text_encoder_factory(te2_cfg, folder, with_projection=True))
        state = clip_to_open_clip(_meta_state(te2), extra_layer=False)
        assert not _plan_for(te2, state, keys.open_clip_mapper(32, keep_projection=True))


@pytest.mark.parametrize("folder", ["controlnet-sd15-canny", "controlnet-sdxl-canny"])
def test_default_controlnet_ldm_tables_cover_the_real_architectures(folder):
    cfg = default_config(folder, "config.json")
    net = build_empty(controlnet_factory(cfg, folder))
    result = _plan_for(net, unet_to_ldm(_meta_state(net), cfg, controlnet=True),
                       keys.table_mapper(keys.controlnet_ldm_table(cfg)), prefix="control_model.")
    assert not result, result
