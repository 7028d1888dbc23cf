"""The build step as a function: ``export_model(MODEL, OUT, ...)`` (the CLI is a thin layer on it).

Order of work: validate every option, check the output directory, load the model, hash the weights,
then write. The manifest is written first as "complete": false and rewritten as complete only at the
end, so an interrupted export is never loaded.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ldm_engine.pipeline.defaults import vae_needs_fp32

from . import contracts as C
from .contracts import ContractError, ShapeProfile
from .manifest import (MANIFEST, ExportDirError, atomic_write_json, check_same_model,
                       clean_stale_temporaries, new_manifest, record_file, sha256_json, weights_hash)
from .onnx_export import DEFAULT_OPSET, export_onnx, run_torch
from .progress import Progress

FORMATS = ("onnx", "tensorrt")
EXPORT_DTYPES = ("fp32", "fp16", "bf16")


class ExportOptionError(ValueError):
    """A bad option of the export (found before any work starts)."""


@dataclass
class ExportOptions:
    fmt: str = "onnx"
    components: tuple[str, ...] | None = None     # None: all that apply
    batch: tuple[int, int, int] | None = None      # images per prompt batch; None: 1:1:4
    height: tuple[int, int, int] | None = None     # pixels; None: 256 (or less) : native : 1024 (or more)
    width: tuple[int, int, int] | None = None
    dtype: str | None = None                       # None: fp16 on cuda, fp32 on cpu
    controlnets: tuple[str, ...] = ()
    device: str = "cpu"
    opset: int = DEFAULT_OPSET
    overwrite: bool = False
    typing: str = "strong"                         # TensorRT: strong (ONNX carries precision) | weak
    workspace_gib: float | None = None
    timing_cache: str | None = None                # default: OUT/timing.cache
    verify: bool = False                           # run each ONNX file in ONNX Runtime against torch
    vae: str | None = None                         # a VAE replacing the model's (e.g. TAESD), as Engine's vae=
    loras: tuple[tuple[str, float], ...] = ()      # LoRA adapters (file, scale) baked into the weights
    progress: bool = True


def resolve_options(opts: ExportOptions) -> ExportOptions:
    """Check everything that can be checked without loading the model; fills the defaults."""
    o = dataclasses.replace(opts)
    if o.fmt not in FORMATS:
        raise ExportOptionError(f"--format must be one of {', '.join(FORMATS)}, got {o.fmt!r}")
    if o.device not in ("cpu", "cuda") and not str(o.device).startswith("cuda:"):
        raise ExportOptionError(f"--device must be cpu or cuda, got {o.device!r}")
    if str(o.device).startswith("cuda") and not torch.cuda.is_available():
        raise ExportOptionError("--device cuda: torch sees no CUDA GPU here; use --device cpu")
    if o.dtype is None:
        o.dtype = "fp16" if str(o.device).startswith("cuda") else "fp32"
    if o.dtype not in EXPORT_DTYPES:
        raise ExportOptionError(f"--dtype must be one of {', '.join(EXPORT_DTYPES)}, got {o.dtype!r}")
    if o.fmt == "onnx" and o.dtype == "bf16":
        raise ExportOptionError("--dtype bf16 with --format onnx: ONNX Runtime has no bf16 kernels for these "
                                "networks (CPU) and its IO binding no bf16 type; use fp16/fp32, or --format tensorrt")
    if o.opset < 17:
        raise ExportOptionError(f"--opset {o.opset}: ldm_engine exports opset 17 or newer")
    if o.typing not in ("strong", "weak"):
        raise ExportOptionError(f"--trt-typing must be strong or weak, got {o.typing!r}")
    if o.workspace_gib is not None and o.workspace_gib <= 0:
        raise ExportOptionError(f"--workspace must be positive, got {o.workspace_gib}")

    o.controlnets = tuple(o.controlnets or ())
    if o.components is None:
        comps = ["unet", "vae_decoder", "vae_encoder", "text_encoder"] + (["controlnet"] if o.controlnets else [])
    else:
        comps = [c.strip() for c in o.components if c.strip()]
        unknown = [c for c in comps if c not in C.NETWORK_KINDS]
        if unknown or not comps:
            raise ExportOptionError(f"--components: unknown {', '.join(map(repr, unknown)) or 'empty list'}; "
                                    f"choose from {', '.join(C.NETWORK_KINDS)}")
        if len(set(comps)) != len(comps):
            raise ExportOptionError(f"--components lists a component twice: {','.join(comps)}")
    if "controlnet" in comps and not o.controlnets:
        raise ExportOptionError("--components controlnet needs --controlnet PATH (the ControlNet to export)")
    if o.controlnets and "controlnet" not in comps:
        raise ExportOptionError("--controlnet given, but 'controlnet' is not in --components")
    o.components = tuple(comps)
    try:  # ranges checked now with placeholders for the ones that default to the model's native size
        ShapeProfile(batch=o.batch or (1, 1, 4), height=o.height or (512,) * 3, width=o.width or (512,) * 3)
    except ContractError as e:
        raise ExportOptionError(f"--{str(e)}") from None

    if o.fmt == "tensorrt":
        from .tensorrt_build import import_tensorrt

        try:
            import_tensorrt()
        except ValueError as e:
            raise ExportOptionError(f"--format tensorrt: {e}") from e
        if not torch.cuda.is_available():
            raise ExportOptionError("--format tensorrt needs a CUDA GPU (TensorRT builds for the GPU it runs on)")
        if o.typing == "weak" and o.dtype == "fp32":
            o.typing = "strong"
    return o


def _resolve_source(model: str) -> Path:
    from ldm_engine.loading import resolve_model_path

    return Path(resolve_model_path(model))


def _config_dict(config) -> dict:
    if hasattr(config, "to_dict"):
        return config.to_dict()
    if dataclasses.is_dataclass(config):
        return dataclasses.asdict(config)
    return dict(vars(config))


def _save_tokenizer(tok, folder: Path):
    """vocab.json + merges.txt + tokenizer_config.json that CLIPTokenizer.from_pretrained reads back."""
    folder.mkdir(parents=True, exist_ok=True)
    tok._tokenizer.model.save(str(folder))  # the tokenizers library's BPE model writes vocab.json, merges.txt
    atomic_write_json(folder / "tokenizer_config.json", {
        "pad_token": tok.pad_token, "bos_token": tok.bos_token, "eos_token": tok.eos_token,
        "unk_token": tok.unk_token, "model_max_length": tok.model_max_length})


@dataclass
class _Job:
    network: str
    module: torch.nn.Module
    contract: C.Contract
    what: str
    source: str | None = None


def _plan_jobs(comps, controlnets, o: ExportOptions) -> list[_Job]:
    f = C.vae_scale_factor(comps.vae.config)
    te2 = comps.text_encoder_2
    text_embeds_dim = int(te2.config.projection_dim) if te2 is not None else 1280
    seq = int(comps.text_encoder.config.max_position_embeddings)
    vae_dtype = o.dtype
    if o.dtype == "fp16" and vae_needs_fp32(comps.family, comps.vae.config):
        vae_dtype = "fp32"  # the SDXL VAE overflows in fp16
    jobs = []
    wanted = set(o.components)
    if "text_encoder" in wanted:
        jobs.append(_Job("text_encoder", comps.text_encoder,
                         C.text_encoder_contract(comps.text_encoder.config, dtype=o.dtype,
                                                 with_projection=comps.text_encoder.with_projection),
                         "text encoder: input_ids -> last_hidden_state, penultimate_hidden_state, pooled"))
        if te2 is not None:
            jobs.append(_Job("text_encoder_2", te2,
                             C.text_encoder_contract(te2.config, network="text_encoder_2", dtype=o.dtype,
                                                     with_projection=te2.with_projection),
                             "second text encoder (SDXL, with projection)"))
    kw = dict(vae_scale=f, dtype=o.dtype, seq_len=seq, text_embeds_dim=text_embeds_dim)
    if "unet" in wanted:
        jobs.append(_Job("unet", comps.unet, C.unet_contract(comps.unet.config, **kw), "U-Net: noise prediction"))
    if "controlnet" in wanted:
        jobs.append(_Job("unet_controlnet", comps.unet, C.unet_contract(comps.unet.config, with_residuals=True, **kw),
                         "U-Net taking ControlNet residuals"))
        for i, cn in enumerate(controlnets):
            jobs.append(_Job(f"controlnet_{i}", cn,
                             C.controlnet_contract(cn.config, network=f"controlnet_{i}", **kw),
                             f"ControlNet {i}: residuals for the U-Net ({o.controlnets[i]})",
                             source=str(o.controlnets[i])))
    if "vae_decoder" in wanted:
        jobs.append(_Job("vae_decoder", comps.vae, C.vae_decoder_contract(comps.vae.config, dtype=vae_dtype),
                         "VAE decoder: unscaled latents -> image in [-1, 1]"))
    if "vae_encoder" in wanted:
        jobs.append(_Job("vae_encoder", comps.vae, C.vae_encoder_contract(comps.vae.config, dtype=vae_dtype),
                         "VAE encoder: image -> unscaled latents" if C.is_tiny_vae(comps.vae.config)
                         else "VAE encoder: image -> unscaled latent mean, logvar"))
    return jobs


def make_profile(comps, o: ExportOptions) -> ShapeProfile:
    """The shape profile: the options, with defaults around the model's native resolution."""
    f = C.vae_scale_factor(comps.vae.config)
    size = comps.unet.config.sample_size or 64
    native = [int(v) * f for v in (size if isinstance(size, (tuple, list)) else (size, size))]

    def around(n):
        return (min(256, n), n, max(1024, n))

    return ShapeProfile(batch=o.batch or (1, 1, 4), height=o.height or around(native[0]),
                        width=o.width or around(native[-1]))


def _check_model_against_options(comps, controlnets, o: ExportOptions, profile: ShapeProfile):
    f = C.vae_scale_factor(comps.vae.config)
    for name in ("height", "width"):
        bad = [v for v in getattr(profile, name) if v % f]
        if bad:
            raise ExportOptionError(f"--{name}: {bad[0]} px is not a multiple of this model's VAE factor {f}")
    for i, cn in enumerate(controlnets):
        ucfg, ccfg = comps.unet.config, cn.config
        if tuple(ucfg.block_out_channels) != tuple(ccfg.block_out_channels) or \
                C.residual_layout(ucfg) != C.residual_layout(ccfg):
            raise ExportOptionError(f"--controlnet {o.controlnets[i]}: its blocks {tuple(ccfg.block_out_channels)} do "
                                    f"not match the U-Net's {tuple(ucfg.block_out_channels)} (another model family?)")
        if getattr(ccfg, "global_pool_conditions", False):
            raise ExportOptionError(f"--controlnet {o.controlnets[i]}: global_pool_conditions ControlNets are not "
                                    f"supported by the exporter")
        hd = getattr(ccfg, "hint_downscale", f)
        if hd != f:
            raise ExportOptionError(f"--controlnet {o.controlnets[i]}: its hint embedding downsamples {hd}x, the VAE "
                                    f"{f}x")


def export_model(model: str, out: str | os.PathLike, options: ExportOptions | None = None, *, log=print) -> dict:
    """Export ``model`` (a path or cached Hub id, as load_pipeline takes) into ``out``; returns the manifest."""
    o = resolve_options(options or ExportOptions())
    out = Path(out)
    source = _resolve_source(model)
    from ldm_engine.loading.pixel import is_pixel_model

    if is_pixel_model(source):  # unconditional DDPM UNet2DModel: export/pixel.py
        from .pixel import export_pixel_model

        return export_pixel_model(source, out, o, requested_components=(options or ExportOptions()).components,
                                  log=log)
    old = check_same_model(out, str(source), overwrite=o.overwrite)    # before loading anything

    from ldm_engine.loading import load_controlnet, load_pipeline

    # loaded in fp32, then each network cast to its own dtype: a VAE kept in fp32 under fp16
    # (force_upcast) gets the checkpoint's full-precision weights
    with Progress("loading the model", enabled=o.progress):
        comps = load_pipeline(str(source), device=o.device, dtype=torch.float32)
        if o.vae is not None:
            from ldm_engine.loading import load_vae
            from ldm_engine.pipeline.latents import check_vae_latent_channels

            comps.vae = load_vae(o.vae, device=o.device, dtype=torch.float32, family=comps.family)
            check_vae_latent_channels(comps.unet.config, comps.vae)
        controlnets = [load_controlnet(p, device=o.device, dtype=torch.float32) for p in o.controlnets]
        if o.loras:  # merged in fp32 before anything is hashed or traced
            from ldm_engine.pipeline.lora import bake_loras

            bake_loras(comps, o.loras)
    profile = make_profile(comps, o)
    _check_model_against_options(comps, controlnets, o, profile)
    # typing="weak": ONNX in fp32, TensorRT gets the precision as builder flags
    jobs = _plan_jobs(comps, controlnets, dataclasses.replace(o, dtype="fp32") if o.typing == "weak" else o)
    for job in jobs:
        job.module.to(C.DTYPES[job.contract.dtype]).eval()

    with Progress("hashing weights", enabled=o.progress):
        hashes = {}
        for job in jobs:
            hashes[job.network] = hashes.get(job.network) or weights_hash(
                job.module if job.contract.kind not in ("vae_decoder", "vae_encoder") else _vae_part(job))
        pipeline_hash = sha256_json({"unet": weights_hash(comps.unet), "vae": weights_hash(comps.vae),
                                     "text_encoder": weights_hash(comps.text_encoder),
                                     "text_encoder_2": weights_hash(comps.text_encoder_2)
                                     if comps.text_encoder_2 is not None else None})

    out.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(out)
    manifest = new_manifest(source=str(source), source_sha256=pipeline_hash, family=comps.family, fmt=o.fmt,
                            dtype=o.dtype, profile=profile.to_json(), device=str(o.device), opset=o.opset)
    manifest["loras"] = [{"file": str(f), "scale": s} for f, s in o.loras]
    atomic_write_json(out / MANIFEST, manifest)  # incomplete: nothing loads this directory until the end

    _write_side_files(out, comps, controlnets, manifest)
    for job in jobs:
        symbols = job.contract.default_trace_symbols(profile)
        with Progress(f"{job.network}: ONNX export", enabled=o.progress):
            info = export_onnx(job.module, job.contract, out / f"{job.network}.onnx", symbols=symbols,
                               opset=o.opset, device=o.device)
        entry = {"contract": job.contract.to_json(), "what": job.what, "weights_sha256": hashes[job.network],
                 "onnx": info["onnx"], "onnx_data": info["onnx_data"],
                 "input_shapes": {k: [list(s) for s in v] for k, v in job.contract.profile_shapes(profile).items()}}
        record_file(manifest, out, info["onnx"], f"ONNX graph of {job.network}: {job.what}")
        if info["onnx_data"]:
            record_file(manifest, out, info["onnx_data"], f"external weights of {info['onnx']}")
        entry["onnx_sha256"] = manifest["files"][info["onnx"]]["sha256"]
        manifest["networks"][job.network] = entry
        if job.contract.kind == "controlnet":
            manifest["controlnets"].append(job.network)
            entry["source"] = job.source  # so a loader can check the order / identity of ControlNets

    if o.verify:  # after all exports: it moves modules to the CPU
        for job in jobs:
            manifest["networks"][job.network]["verify"] = _verify_onnx(
                job, out / manifest["networks"][job.network]["onnx"], job.contract.default_trace_symbols(profile), log)

    if o.fmt == "tensorrt":
        from .tensorrt_build import build_engine

        timing_cache = o.timing_cache or str(out / "timing.cache")
        for job in jobs:
            entry = manifest["networks"][job.network]
            plan, key = build_engine(out / entry["onnx"], job.contract, profile, out,
                                     weights_sha256=entry["weights_sha256"], onnx_sha256=entry["onnx_sha256"],
                                     precision=_precision(job, o), typing=o.typing, timing_cache=timing_cache,
                                     workspace_gib=o.workspace_gib, progress=o.progress)
            entry["tensorrt"] = {"plan": plan.name, "key": key}
            record_file(manifest, out, plan.name, f"TensorRT engine of {job.network} ({key['precision']}, "
                                                  f"TensorRT {key['tensorrt_version']}, sm {key['compute_capability']})")
            record_file(manifest, out, f"{job.network}.plan.json", f"cache key and sha256 of {plan.name}")
        if Path(timing_cache).exists() and Path(timing_cache).parent == out:
            record_file(manifest, out, Path(timing_cache).name, "TensorRT timing cache (speeds up rebuilds)")

    _remove_superseded(out, old, manifest)
    manifest["complete"] = True
    atomic_write_json(out / MANIFEST, manifest)
    log(f"exported {', '.join(j.network for j in jobs)} to {out}")
    return manifest


def _precision(job: _Job, o: ExportOptions) -> str:
    """The engine's precision: the ONNX dtype (strong typing), or the requested one (weak typing),
    except for a VAE planned in fp32 (see vae_needs_fp32)."""
    if o.typing == "strong":
        return job.contract.dtype
    if job.contract.kind.startswith("vae") and job.contract.dtype == "fp32":
        return "fp32"
    return o.dtype


def _vae_part(job: _Job) -> torch.nn.Module:
    """The half of the VAE a network uses (the decoder's hash must not change with the encoder)."""
    vae = job.module
    parts = ("decoder", "post_quant_conv") if job.contract.kind == "vae_decoder" else ("encoder", "quant_conv")
    holder = torch.nn.Module()
    for p in parts:
        if getattr(vae, p, None) is not None:
            holder.add_module(p, getattr(vae, p))
    return holder


def _write_side_files(out: Path, comps, controlnets, manifest: dict):
    configs = out / "configs"
    configs.mkdir(exist_ok=True)
    side = {"unet": comps.unet.config, "vae": comps.vae.config, "text_encoder": comps.text_encoder.config}
    if comps.text_encoder_2 is not None:
        side["text_encoder_2"] = comps.text_encoder_2.config
    for i, cn in enumerate(controlnets):
        side[f"controlnet_{i}"] = cn.config
    for name, cfg in side.items():
        atomic_write_json(configs / f"{name}.json", _config_dict(cfg))
        record_file(manifest, out, f"configs/{name}.json", f"model config of {name}")
    atomic_write_json(configs / "scheduler_config.json", dict(comps.scheduler_config))
    model_index = Path(comps.source) / "model_index.json"
    if model_index.is_file():  # the Engine reads pipeline flags from it (force_zeros_for_empty_prompt, hints)
        atomic_write_json(out / "model_index.json", json.loads(model_index.read_text()))
        record_file(manifest, out, "model_index.json", "the source pipeline's model_index.json")
    record_file(manifest, out, "configs/scheduler_config.json", "scheduler config (diffusers scheduler_config.json)")
    for name, tok in (("tokenizer", comps.tokenizer), ("tokenizer_2", comps.tokenizer_2)):
        if tok is None:
            continue
        if (out / name).exists():
            shutil.rmtree(out / name)
        _save_tokenizer(tok, out / name)
        for f in sorted((out / name).iterdir()):
            record_file(manifest, out, f"{name}/{f.name}", f"{name} file")


def _remove_superseded(out: Path, old: dict | None, manifest: dict):
    """Files of a previous export of this model that the new one no longer uses."""
    if not old:
        return
    for rel in old.get("files", {}):
        if rel not in manifest["files"]:
            path = out / rel
            if path.is_file() and path.resolve().is_relative_to(out.resolve()):
                path.unlink()


def _verify_onnx(job: _Job, path: Path, symbols: dict, log) -> dict:
    """ONNX Runtime (CPU) vs the torch module on fresh random inputs."""
    import onnxruntime as ort

    if job.contract.dtype != "fp32":
        return {"skipped": f"{job.contract.dtype} graphs are checked on the GPU runtime, not ONNX Runtime CPU"}
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    cpu = job.module.to("cpu") if next(job.module.parameters()).device.type != "cpu" else job.module
    inputs = job.contract.sample_inputs(symbols, generator=torch.Generator().manual_seed(1))
    ref = run_torch(cpu, job.contract, inputs)
    got = sess.run(None, {n: t.numpy() for n, t in zip(job.contract.input_names, inputs)})
    errs = {name: float((torch.from_numpy(g) - r).norm() / r.norm().clamp_min(1e-12))
            for name, g, r in zip(job.contract.output_names, got, ref)}
    worst = max(errs.values())
    log(f"{job.network}: ONNX Runtime vs torch, max relative error {worst:.2e}")
    return {"max_rel_err": worst, "symbols": symbols}


__all__ = ["ExportOptions", "ExportOptionError", "export_model", "resolve_options", "FORMATS", "EXPORT_DTYPES",
           "ExportDirError", "ContractError"]
