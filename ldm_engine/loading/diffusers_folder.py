"""diffusers-format folders: ``model_index.json`` plus ``unet/ vae/ text_encoder/ tokenizer/
scheduler/`` (and ``text_encoder_2/ tokenizer_2/`` for SDXL); weights as single files, sharded
index files, or ``variant`` files such as ``*.fp16.safetensors``. Also ControlNet folders
(``config.json`` + weights)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from ldm_engine.errors import CheckpointError
from ldm_engine.loading import checkpoint_keys as keys
from ldm_engine.loading.build import LoadPlan, open_weights, pickle_refusal
from ldm_engine.loading.components import (
    PAD_TOKENS, Components, assemble, controlnet_factory, default_tokenizer, family_from_unet_config,
    folder_tokenizer, read_json, read_scheduler_config, text_encoder_factory, unet_factory, vae_factory,
)

WEIGHT_STEMS = ("diffusion_pytorch_model", "model")  # diffusers, transformers
PICKLE_WEIGHTS = ("diffusion_pytorch_model.bin", "pytorch_model.bin")
FALLBACK_VARIANT = "fp16"


def is_diffusers_pipeline_folder(path: Path) -> bool:
    return path.is_dir() and ((path / "model_index.json").is_file() or (path / "unet" / "config.json").is_file())


def _index_shards(index_path: Path) -> list[Path]:
    index = read_json(index_path, "sharded-weights index")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: sharded-weights index has no weight_map")
    names = list(weight_map.values())
    bad = next((n for n in names if not isinstance(n, str) or n in ("", ".", "..") or Path(n).name != n), None)
    if any(not isinstance(n, str) for n in names) or bad is not None:
        # shards are files next to the index: no other types, no paths (e.g. "../../elsewhere")
        raise CheckpointError(f"{index_path}: weight_map must map tensor names to shard file names in the "
                              f"same folder, got {str(bad)[:100]!r}")
    shards = [index_path.parent / name for name in dict.fromkeys(names)]
    absent = [s.name for s in shards if not s.is_file()]
    if absent:
        raise CheckpointError(f"{index_path}: the index lists shard files that are missing: "
                              f"{', '.join(absent[:20])} (an incomplete download?)")
    return shards


def _candidates(stem: str, variant: str | None) -> tuple[list[str], list[str]]:
    if variant is None:
        return [f"{stem}.safetensors"], [f"{stem}.safetensors.index.json"]
    # diffusers/transformers put the variant before the last suffix of the index name.
    return [f"{stem}.{variant}.safetensors"], [f"{stem}.safetensors.index.{variant}.json",
                                               f"{stem}.{variant}.safetensors.index.json"]


def find_weight_files(folder: Path, variant: str | None, *, allow_pickle: bool = False) -> tuple[list[Path], str | None]:
    """The weight file(s) of one component folder and the variant they are. ``variant=None``
    prefers the plain files and falls back to the fp16 variant; an explicit variant falls back
    to the plain files for a component that lacks it (as diffusers does)."""
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: component folder not found")
    variants = [None, FALLBACK_VARIANT] if variant is None else [variant, None]
    looked = []
    for v in variants:
        for stem in WEIGHT_STEMS:
            singles, indexes = _candidates(stem, v)
            for name in singles:
                looked.append(name)
                if (folder / name).is_file():
                    return [folder / name], v
            for name in indexes:
                looked.append(name)
                if (folder / name).is_file():
                    return _index_shards(folder / name), v
    for name in PICKLE_WEIGHTS:
        if (folder / name).is_file():
            if allow_pickle:
                return [folder / name], None
            raise pickle_refusal(folder / name)
    present = sorted(p.name for p in folder.iterdir())
    raise CheckpointError(f"{folder}: no weights found (looked for {', '.join(looked)}); "
                          f"the folder holds: {', '.join(present) or 'nothing'}")


def _component_plan(name: str, folder: Path, mapper, variant, allow_pickle, readers, used_variants) -> LoadPlan:
    files, used = find_weight_files(folder, variant, allow_pickle=allow_pickle)
    used_variants[name] = used
    opened = []
    for f in files:
        r = open_weights(f, allow_pickle=allow_pickle)
        readers.append(r)
        opened.append(r)
    return LoadPlan(name, []).add(opened, mapper)


def _check_variant_found(root: Path, variant: str | None, used: dict[str, str | None]) -> None:
    if variant is None:
        return
    if all(v != variant for v in used.values()):
        raise CheckpointError(f"{root}: no {variant!r} variant weights in any component "
                              f"(looked for *.{variant}.safetensors); use variant=None for the plain files")
    plain = [name for name, v in used.items() if v != variant]
    if plain:
        warnings.warn(f"{root}: no {variant!r} variant for {', '.join(plain)}; using the plain weights",
                      stacklevel=3)


def _text_encoder_has_projection(model_index: dict, name: str, folder: Path, config: dict) -> bool:
    entry = model_index.get(name)
    if isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1]:
        return entry[1] == "CLIPTextModelWithProjection"
    return _lists_projection(config)


def _lists_projection(config: dict) -> bool:
    architectures = config.get("architectures")
    return isinstance(architectures, list) and "CLIPTextModelWithProjection" in architectures


def load_diffusers_pipeline(root: Path, *, device: torch.device, dtype: torch.dtype,
                            variant: str | None = None, allow_pickle: bool = False) -> Components:
    model_index = read_json(root / "model_index.json", "model_index") if (root / "model_index.json").is_file() else {}
    unet_config = read_json(root / "unet" / "config.json")
    te_config_path = root / "text_encoder" / "config.json"
    family = family_from_unet_config(unet_config, str(root / "unet" / "config.json"),
                                     read_json(te_config_path) if te_config_path.is_file() else None)
    if family == "sdxl" and not (root / "text_encoder").is_dir():
        raise CheckpointError(f"{root}: an SDXL pipeline without text_encoder/ (an SDXL refiner?) "
                              "is not supported")
    vae_config = read_json(root / "vae" / "config.json")
    scheduler_config = read_scheduler_config(root / "scheduler" / "scheduler_config.json")

    encoders = ["text_encoder"] + (["text_encoder_2"] if family == "sdxl" else [])
    readers: list = []
    used: dict[str, str | None] = {}
    try:
        specs = {
            "unet": (unet_factory(unet_config, str(root / "unet")),
                     _component_plan("unet", root / "unet", keys.diffusers_key, variant, allow_pickle, readers, used)),
            "vae": (vae_factory(vae_config, str(root / "vae")),
                    _component_plan("vae", root / "vae", keys.diffusers_vae_key, variant, allow_pickle, readers, used)),
        }
        configs = {"unet": unet_config, "vae": vae_config}
        for name in encoders:
            cfg = read_json(root / name / "config.json")
            projection = _text_encoder_has_projection(model_index, name, root / name, cfg)
            specs[name] = (text_encoder_factory(cfg, str(root / name), with_projection=projection),
                           _component_plan(name, root / name, keys.clip_key, variant, allow_pickle, readers, used))
            configs[name] = cfg
        _check_variant_found(root, variant, used)
    except BaseException:
        for r in readers:
            r.close()
        raise
    models = assemble(specs, dtype=dtype, device=device, readers=readers)

    tokenizers = []
    for i, name in enumerate(["tokenizer", "tokenizer_2"][:len(encoders)]):
        folder = root / name
        tokenizers.append(folder_tokenizer(folder) if folder.is_dir() else default_tokenizer(PAD_TOKENS[family][i]))
    return Components(
        family=family, unet=models["unet"], vae=models["vae"],
        text_encoder=models["text_encoder"], tokenizer=tokenizers[0],
        text_encoder_2=models.get("text_encoder_2"), tokenizer_2=tokenizers[1] if len(tokenizers) > 1 else None,
        scheduler_config=scheduler_config, source=str(root), configs=configs,
    )


def load_diffusers_controlnet(folder: Path, *, device: torch.device, dtype: torch.dtype,
                              variant: str | None = None, allow_pickle: bool = False):
    return load_diffusers_component(folder, "controlnet", device=device, dtype=dtype, variant=variant,
                                    allow_pickle=allow_pickle)


_COMPONENT_KINDS = {"unet": (unet_factory, keys.diffusers_key), "vae": (vae_factory, keys.diffusers_vae_key),
                    "controlnet": (controlnet_factory, keys.diffusers_key)}


def load_diffusers_component(folder: Path, kind: str, *, device: torch.device, dtype: torch.dtype,
                             variant: str | None = None, allow_pickle: bool = False):
    """One model from its diffusers/transformers folder (config.json + weights): kind "unet",
    "vae", "controlnet" or "text_encoder" (projection if the config says CLIPTextModelWithProjection)."""
    config = read_json(folder / "config.json")
    if kind == "text_encoder":
        projection = _lists_projection(config)
        factory, mapper = text_encoder_factory(config, str(folder), with_projection=projection), keys.clip_key
    elif kind in _COMPONENT_KINDS:
        make, mapper = _COMPONENT_KINDS[kind]
        factory = make(config, str(folder))
    else:
        raise ValueError(f"kind must be one of unet, vae, text_encoder, controlnet; got {kind!r}")
    readers: list = []
    used: dict[str, str | None] = {}
    try:
        plan = _component_plan(kind, folder, mapper, variant, allow_pickle, readers, used)
        _check_variant_found(folder, variant, used)
    except BaseException:
        for r in readers:
            r.close()
        raise
    return assemble({kind: (factory, plan)}, dtype=dtype, device=device, readers=readers)[kind]
