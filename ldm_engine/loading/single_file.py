"""Single-file original checkpoints (ldm / sgm layout): SD1.x, SD2.x / SD-Turbo, SDXL /
SDXL-Turbo pipelines, and ControlNets. The family is detected from the keys; architectures come
from ldm_engine/configs (or from a diffusers folder given as ``config=``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ldm_engine.configs import SINGLE_FILE_DEFAULTS, default_config, has_default_config
from ldm_engine.errors import CheckpointError
from ldm_engine.loading import checkpoint_keys as keys
from ldm_engine.loading.build import LoadPlan, open_weights
from ldm_engine.loading.components import (
    PAD_TOKENS, Components, assemble, controlnet_factory, default_tokenizer, family_from_unet_config,
    folder_tokenizer, read_json, read_scheduler_config, text_encoder_factory, unet_factory, vae_factory,
)

_PREDICTION_TYPES = {"epsilon": "epsilon", "eps": "epsilon", "v": "v_prediction", "v_prediction": "v_prediction"}
_CONFIG_HINT = ("If the checkpoint's architecture differs from the default for its family, pass "
                "config=<a diffusers folder or repo id with the matching unet/ vae/ text_encoder/ configs>.")


def _prediction_type(requested: str | None, metadata: dict) -> str | None:
    value = requested if requested is not None else (metadata or {}).get("modelspec.prediction_type")
    if value is None:
        return None
    if value not in _PREDICTION_TYPES:
        if requested is not None:
            raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {requested!r}")
        return None  # unknown metadata value: ignore it
    return _PREDICTION_TYPES[value]


def _configs_from_folder(config: Any, family: str, source: str) -> dict[str, Any]:
    """unet/vae/text encoder/scheduler configs (and tokenizers) from a diffusers folder."""
    from ldm_engine.loading.hub import resolve_model_path

    root = resolve_model_path(config)
    out: dict[str, Any] = {"unet": read_json(root / "unet" / "config.json"),
                           "vae": read_json(root / "vae" / "config.json"),
                           "text_encoder": read_json(root / "text_encoder" / "config.json")}
    folder_family = family_from_unet_config(out["unet"], str(root / "unet" / "config.json"), out["text_encoder"])
    if folder_family != family:
        raise CheckpointError(f"{source}: the checkpoint is {family} but config={root} describes {folder_family}")
    if family == "sdxl":
        out["text_encoder_2"] = read_json(root / "text_encoder_2" / "config.json")
    sched = root / "scheduler" / "scheduler_config.json"
    if sched.is_file():
        out["scheduler"] = read_scheduler_config(sched)
    for name in ("tokenizer", "tokenizer_2"):
        if (root / name).is_dir():
            out[name] = folder_tokenizer(root / name)
    return out


def _default_configs(family: str, sgm_layout: bool, prediction: str | None) -> dict[str, Any]:
    if family == "sd2":
        # v-prediction cannot be read from the weights: sgm-layout SD2 files are SD-Turbo style
        # (epsilon); ldm-layout ones are SD 2.x as published, defaulting (like diffusers) to 2.1-768-v.
        want_v = prediction == "v_prediction" if prediction is not None else not sgm_layout
        folder = SINGLE_FILE_DEFAULTS["sd2-v" if want_v else "sd2"]
    else:
        folder = SINGLE_FILE_DEFAULTS[family]
    out = {"unet": default_config(folder, "unet.json"), "vae": default_config(folder, "vae.json"),
           "text_encoder": default_config(folder, "text_encoder.json"),
           "scheduler": default_config(folder, "scheduler_config.json")}
    if has_default_config(folder, "text_encoder_2.json"):
        out["text_encoder_2"] = default_config(folder, "text_encoder_2.json")
    return out


def _first_prefix(shapes, prefixes) -> str:
    for p in prefixes:
        if any(k.startswith(p) for k in shapes):
            return p
    return prefixes[0]


def load_single_file_pipeline(path: Path, *, device: torch.device, dtype: torch.dtype, config: Any = None,
                              prediction_type: str | None = None, allow_pickle: bool = False) -> Components:
    reader = open_weights(path, allow_pickle=allow_pickle)
    try:
        shapes = {k: reader.shape(k) for k in reader.keys()}
        try:
            family = keys.detect_single_file_family(shapes)
        except ValueError as exc:
            raise CheckpointError(f"{path}: not a checkpoint ldm_engine can load: {exc}") from None
        if family == "controlnet":
            raise CheckpointError(f"{path}: this is a ControlNet checkpoint; load it with load_controlnet()")
        prediction = _prediction_type(prediction_type, reader.metadata)
        text_prefix = {"sd1": keys.SD1_TEXT_PREFIX, "sdxl": keys.SDXL_TEXT_PREFIX,
                       "sd2": _first_prefix(shapes, keys.SD2_TEXT_PREFIXES)}[family]
        sgm_layout = text_prefix.startswith("conditioner.")
        if config is not None:
            cfgs = _configs_from_folder(config, family, str(path))
            cfgs.setdefault("scheduler", _default_configs(family, sgm_layout, prediction)["scheduler"])
        else:
            cfgs = _default_configs(family, sgm_layout, prediction)
        in_channels = keys.unet_in_channels(shapes)  # 9 for inpainting checkpoints: the weights decide
        if in_channels is not None and in_channels != cfgs["unet"].get("in_channels", 4):
            cfgs["unet"] = dict(cfgs["unet"], in_channels=in_channels)
        scheduler_config = dict(cfgs["scheduler"])
        if prediction is not None:
            scheduler_config["prediction_type"] = prediction

        source = str(path)
        vae_prefix = _first_prefix(shapes, keys.VAE_PREFIXES)
        specs = {
            "unet": (unet_factory(cfgs["unet"], source),
                     LoadPlan("unet", []).add([reader], keys.table_mapper(keys.unet_ldm_table(cfgs["unet"])),
                                              keys.UNET_PREFIX)),
            "vae": (vae_factory(cfgs["vae"], source),
                    LoadPlan("vae", []).add([reader], keys.table_mapper(keys.vae_ldm_table(cfgs["vae"])), vae_prefix,
                                            skip=lambda k: k.startswith(keys.IGNORED_TOP_LEVEL_PREFIXES))),
        }
        te_layers = int(cfgs["text_encoder"].get("num_hidden_layers", 12))
        te_mapper = keys.clip_key if family in ("sd1", "sdxl") else keys.open_clip_mapper(te_layers, keep_projection=False)
        specs["text_encoder"] = (text_encoder_factory(cfgs["text_encoder"], source, with_projection=False),
                                 LoadPlan("text_encoder", []).add([reader], te_mapper, text_prefix))
        if family == "sdxl":
            te2_layers = int(cfgs["text_encoder_2"].get("num_hidden_layers", 32))
            specs["text_encoder_2"] = (
                text_encoder_factory(cfgs["text_encoder_2"], source, with_projection=True),
                LoadPlan("text_encoder_2", []).add(
                    [reader], keys.open_clip_mapper(te2_layers, keep_projection=True), keys.SDXL_TEXT2_PREFIX))
    except BaseException:
        reader.close()
        raise
    models = assemble(specs, dtype=dtype, device=device, readers=[reader], hint=_CONFIG_HINT)

    pads = PAD_TOKENS[family]
    tok = cfgs.get("tokenizer") or default_tokenizer(pads[0])
    tok2 = (cfgs.get("tokenizer_2") or default_tokenizer(pads[1])) if family == "sdxl" else None
    return Components(
        family=family, unet=models["unet"], vae=models["vae"], text_encoder=models["text_encoder"],
        tokenizer=tok, text_encoder_2=models.get("text_encoder_2"), tokenizer_2=tok2,
        scheduler_config=scheduler_config, source=str(path),
        configs={k: v for k, v in cfgs.items() if k in ("unet", "vae", "text_encoder", "text_encoder_2")},
    )


# ---- ControlNet ----------------------------------------------------------------------------

def _controlnet_default_config(shapes: dict, prefix: str) -> dict:
    sdxl = f"{prefix}label_emb.0.0.weight" in shapes or f"{prefix}add_embedding.linear_1.weight" in shapes
    config = default_config(SINGLE_FILE_DEFAULTS["controlnet-sdxl" if sdxl else "controlnet-sd1"], "config.json")
    if not sdxl:
        k = keys.first_key_with_suffix(shapes, prefix, "attn2.to_k.weight")
        if k is not None and tuple(shapes[k])[-1:] == (1024,):  # an SD2.x ControlNet: SD2's attention layout
            sd2 = default_config(SINGLE_FILE_DEFAULTS["sd2"], "unet.json")
            for name in ("cross_attention_dim", "attention_head_dim", "use_linear_projection"):
                config[name] = sd2[name]
    return config


def load_controlnet_file(path: Path, *, device: torch.device, dtype: torch.dtype, config: Any = None,
                         allow_pickle: bool = False):
    """A ControlNet stored as one file, in ldm layout (``control_model.*`` or unprefixed
    ``input_hint_block.*``) or in diffusers layout (``controlnet_cond_embedding.*``)."""
    reader = open_weights(path, allow_pickle=allow_pickle)
    try:
        shapes = {k: reader.shape(k) for k in reader.keys()}
        if any(k.startswith(keys.CONTROLNET_PREFIX) for k in shapes):
            layout, prefix = "ldm", keys.CONTROLNET_PREFIX
        elif "input_hint_block.0.weight" in shapes:
            layout, prefix = "ldm", ""
        elif "controlnet_cond_embedding.conv_in.weight" in shapes:
            layout, prefix = "diffusers", ""
        else:
            raise CheckpointError(f"{path}: not a ControlNet checkpoint (no control_model.*, input_hint_block.* "
                                  "or controlnet_cond_embedding.* tensors)")
        if isinstance(config, dict):
            cfg = config
        elif config is not None:
            from ldm_engine.loading.hub import resolve_model_path
            root = resolve_model_path(config)
            cfg = read_json(root / "config.json" if root.is_dir() else root)
        elif layout == "diffusers" and (path.parent / "config.json").is_file():
            cfg = read_json(path.parent / "config.json")
        else:
            cfg = _controlnet_default_config(shapes, prefix)
        mapper = keys.table_mapper(keys.controlnet_ldm_table(cfg)) if layout == "ldm" else keys.diffusers_key
        plan = LoadPlan("controlnet", []).add([reader], mapper, prefix)
        specs = {"controlnet": (controlnet_factory(cfg, str(path)), plan)}
    except BaseException:
        reader.close()
        raise
    return assemble(specs, dtype=dtype, device=device, readers=[reader], hint=_CONFIG_HINT)["controlnet"]

