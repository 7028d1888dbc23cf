"""Loading a VAE on its own, to swap it into a pipeline (``Engine.from_pretrained(..., vae=...)``).

Accepted, each for AutoencoderKL (full) or AutoencoderTiny (TAESD / TAESDXL):
- a loaded module: ldm_engine's own, or diffusers' ``AutoencoderKL`` / ``AutoencoderTiny`` (its
  weights copied into ldm_engine's module of the same config);
- a diffusers component folder (``config.json`` whose ``_class_name`` is ``AutoencoderKL`` or
  ``AutoencoderTiny`` + weights), a pipeline folder (its ``vae/``), or a repo id in the local
  Hugging Face cache resolving to either;
- the original TAESD files: ``taesd_encoder.safetensors`` / ``taesd_decoder.safetensors`` (or
  the ``taesdxl_*`` pair): either file (the other is looked for beside it) or their folder; a
  combined ``encoder.N`` / ``decoder.N`` state dict;
- one ``.safetensors`` full VAE (ldm ``encoder.down.i`` or diffusers names, optionally with the
  ``first_stage_model.`` / ``vae.`` prefix), with the default VAE config of the pipeline's family.
Pickle files are refused as everywhere else; problems raise CheckpointError (bad arguments
InvalidInputError).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ldm_engine.errors import CheckpointError, InvalidInputError
from ldm_engine.loading import checkpoint_keys as keys
from ldm_engine.loading.build import LoadPlan, normalize_dtype_device, open_weights
from ldm_engine.loading.components import assemble, read_json, vae_factory

VAE_CLASSES = ("AutoencoderKL", "AutoencoderTiny")
_TAESD_SIDES = ("encoder", "decoder")


def is_vae_module(module) -> bool:
    from ldm_engine.models.vae import AutoencoderKL
    from ldm_engine.models.vae_tiny import AutoencoderTiny

    return isinstance(module, (AutoencoderKL, AutoencoderTiny))


def load_vae(spec, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
             family: str | None = None, allow_pickle: bool = False) -> nn.Module:
    """A VAE from ``spec`` (see the module docstring), on ``device`` in ``dtype``. ``family``
    ("sd1" / "sd2" / "sdxl") picks the default config of a single-file full VAE."""
    dtype, device = normalize_dtype_device(dtype, device)
    if isinstance(spec, nn.Module):
        return _from_module(spec).to(device=device, dtype=dtype).eval().requires_grad_(False)
    if not isinstance(spec, (str, os.PathLike)):
        raise InvalidInputError(f"vae must be a path, a cached repo id or a loaded VAE module, "
                                f"got {type(spec).__name__}")
    from ldm_engine.loading.hub import resolve_model_path

    path = resolve_model_path(spec)
    if path.is_dir():
        return _from_folder(path, device, dtype, family, allow_pickle)
    return _from_file(path, device, dtype, family, allow_pickle)


def _from_module(module: nn.Module) -> nn.Module:
    if is_vae_module(module):
        return module
    name = type(module).__name__
    config = getattr(module, "config", None)
    if name not in VAE_CLASSES or config is None:
        raise InvalidInputError(f"vae: a {name} is not a VAE (expected ldm_engine's or diffusers' "
                                f"{' / '.join(VAE_CLASSES)})")
    model = vae_factory(dict(config, _class_name=name), f"vae ({name} module)")()
    model.load_state_dict(module.state_dict(), strict=True)
    return model


def _from_folder(path: Path, device, dtype, family, allow_pickle) -> nn.Module:
    if (path / "config.json").is_file():
        config = read_json(path / "config.json")
        cls = config.get("_class_name")
        if cls not in VAE_CLASSES:
            raise CheckpointError(f"{path}: not a VAE folder: its config.json describes {cls or 'no _class_name'} "
                                  f"(expected {' or '.join(VAE_CLASSES)})")
        from ldm_engine.loading.diffusers_folder import load_diffusers_component

        return load_diffusers_component(path, "vae", device=device, dtype=dtype, allow_pickle=allow_pickle)
    if (path / "vae" / "config.json").is_file():  # a pipeline folder: its VAE
        return _from_folder(path / "vae", device, dtype, family, allow_pickle)
    pair = _taesd_pair_in(path)
    if pair is not None:
        return _load_taesd(pair, device, dtype, allow_pickle)
    raise CheckpointError(f"{path}: not a VAE: no config.json (diffusers AutoencoderKL / AutoencoderTiny folder), "
                          "no vae/ subfolder and no taesd*_encoder / taesd*_decoder .safetensors pair")


def _taesd_pair_in(folder: Path) -> dict[str, Path] | None:
    files = sorted(folder.glob("*.safetensors"))
    pair = {side: [f for f in files if f.stem.endswith(f"_{side}")] for side in _TAESD_SIDES}
    if all(len(found) == 1 for found in pair.values()):
        return {side: found[0] for side, found in pair.items()}
    return None


def _sibling(path: Path, side: str) -> Path:
    other = "decoder" if side == "encoder" else "encoder"
    if side not in path.name:
        raise CheckpointError(f"{path}: an original TAESD {side} file whose name does not say '{side}'; "
                              f"cannot find its {other}: pass the folder holding both files")
    twin = path.with_name(path.name.replace(side, other))
    if not twin.is_file():
        raise CheckpointError(f"{path}: a TAESD {side} file, but its {other} ({twin.name}) is not beside it")
    return twin


def _from_file(path: Path, device, dtype, family, allow_pickle) -> nn.Module:
    reader = open_weights(path, allow_pickle=allow_pickle)
    try:
        names = reader.keys()
        if keys.is_taesd_layout(names):  # one half of the original pair
            side = "encoder" if "0.weight" in names else "decoder"
            reader.close()
            return _load_taesd({side: path, ("decoder" if side == "encoder" else "encoder"): _sibling(path, side)},
                               device, dtype, allow_pickle)
        if all(keys.is_taesd_layout(names, f"{side}.") for side in _TAESD_SIDES):
            plan = LoadPlan("vae", [])
            for side in _TAESD_SIDES:
                plan.add([reader], keys.taesd_mapper(side), f"{side}.")
            shapes = {side: {k[len(side) + 1:]: reader.shape(k) for k in names if k.startswith(f"{side}.")}
                      for side in _TAESD_SIDES}
            config = taesd_config(shapes["encoder"], shapes["decoder"], str(path))
            return _assemble_taesd(plan, [reader], config, device, dtype)
        prefix = next((p for p in keys.VAE_PREFIXES if any(k.startswith(p) for k in names)), "")
        inner = [k[len(prefix):] for k in names if k.startswith(prefix)]
        if any(k.startswith("encoder.layers.") for k in inner):  # diffusers AutoencoderTiny names
            shapes = {side: {} for side in _TAESD_SIDES}  # in the original numbering, for taesd_config
            for k in inner:
                side, _, rest = k.partition(".layers.")
                index, _, tail = rest.partition(".")
                if side in shapes and index.isdigit():
                    shapes[side][f"{int(index) + keys.TAESD_LAYER_OFFSET[side]}.{tail}"] = reader.shape(prefix + k)
            config = taesd_config(shapes["encoder"], shapes["decoder"], str(path))
            mapper = keys.diffusers_vae_key
        elif any(k.startswith(("encoder.down.", "encoder.down_blocks.")) for k in inner):
            config = _family_vae_config(path, family)
            ldm = any(k.startswith("encoder.down.") for k in inner)
            mapper = keys.table_mapper(keys.vae_ldm_table(config)) if ldm else keys.diffusers_vae_key
        else:
            raise CheckpointError(f"{path}: not a VAE checkpoint (no TAESD, diffusers or ldm VAE keys; "
                                  f"first keys: {', '.join(sorted(names)[:5])})")
        plan = LoadPlan("vae", []).add([reader], mapper, prefix,
                                       skip=lambda k: k.startswith(keys.IGNORED_TOP_LEVEL_PREFIXES))
    except BaseException:
        reader.close()
        raise
    return assemble({"vae": (vae_factory(config, str(path)), plan)}, dtype=dtype, device=device,
                    readers=[reader])["vae"]


def _family_vae_config(path: Path, family: str | None) -> dict:
    from ldm_engine.configs import SINGLE_FILE_DEFAULTS, default_config

    if family not in ("sd1", "sd2", "sdxl"):
        raise CheckpointError(f"{path}: a single-file VAE carries no config; load it with a pipeline "
                              "(Engine.from_pretrained(..., vae=...)) so that the family's default is used, "
                              "or use a diffusers VAE folder")
    return dict(default_config(SINGLE_FILE_DEFAULTS[family], "vae.json"), _class_name="AutoencoderKL")


def _load_taesd(files: dict[str, Path], device, dtype, allow_pickle) -> nn.Module:
    readers = []
    try:
        plan, shapes = LoadPlan("vae", []), {}
        for side in _TAESD_SIDES:
            reader = open_weights(files[side], allow_pickle=allow_pickle)
            readers.append(reader)
            if not keys.is_taesd_layout(reader.keys()):
                raise CheckpointError(f"{files[side]}: not an original TAESD {side} file (keys are not "
                                      "nn.Sequential indices)")
            plan.add([reader], keys.taesd_mapper(side))
            shapes[side] = {k: reader.shape(k) for k in reader.keys()}
        config = taesd_config(shapes["encoder"], shapes["decoder"], str(files["decoder"]))
    except BaseException:
        for r in readers:
            r.close()
        raise
    return _assemble_taesd(plan, readers, config, device, dtype)


def _levels(shapes: dict, first: int, skip_last: bool) -> list[int]:
    """Residual blocks per level of an original TAESD Sequential: a plain conv (``i.weight``) closes
    (decoder) or opens (encoder) a level, ``i.conv.*`` keys are a block."""
    indices = sorted({int(k.split(".", 1)[0]) for k in shapes})
    indices = [i for i in indices if i > first]
    if skip_last:
        indices = indices[:-1]  # the encoder's final conv to the latent channels
    counts, n = [], 0
    for i in indices:
        if f"{i}.conv.0.weight" in shapes:
            n += 1
        elif f"{i}.weight" in shapes:
            counts.append(n)
            n = 0
    counts.append(n)
    return counts


def taesd_config(encoder: dict, decoder: dict, source: str) -> dict:
    """The AutoencoderTiny config of an original TAESD pair, read from its tensor names and shapes
    (``{key: shape}`` of each file): widths, latent channels, levels and blocks per level."""
    from ldm_engine.models.vae_tiny import TAESD_CONFIG

    if "0.weight" not in encoder or "1.weight" not in decoder:
        raise CheckpointError(f"{source}: not an original TAESD pair (no encoder 0.weight / decoder 1.weight)")
    enc_levels = _levels(encoder, 0, skip_last=True)
    dec_levels = _levels(decoder, 1, skip_last=False)
    dec_levels = dec_levels[:-1] if dec_levels and dec_levels[-1] == 0 else dec_levels
    width_e, width_d = encoder["0.weight"][0], decoder["1.weight"][0]
    return dict(TAESD_CONFIG.to_dict(), _class_name="AutoencoderTiny", latent_channels=decoder["1.weight"][1],
                encoder_block_out_channels=[width_e] * len(enc_levels), num_encoder_blocks=enc_levels,
                decoder_block_out_channels=[width_d] * len(dec_levels), num_decoder_blocks=dec_levels)


def _assemble_taesd(plan: LoadPlan, readers, config: dict, device, dtype) -> nn.Module:
    source = ", ".join(str(s) for s in plan.sources)
    try:
        factory = vae_factory(config, source)
    except BaseException:
        for r in readers:
            r.close()
        raise
    return assemble({"vae": (factory, plan)}, dtype=dtype, device=device, readers=readers,
                    hint="The architecture of original TAESD files is read from their tensor names.")["vae"]
