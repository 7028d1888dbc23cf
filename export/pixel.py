"""Export and runtime of unconditional pixel-space models (DDPM / DDIM UNet2DModel): one network,
``unet_2d.onnx`` (``sample``, ``timestep`` -> ``out_sample``; H and W in pixels), plus
``configs/unet.json`` and ``configs/scheduler_config.json``; the manifest's family is "pixel".

``export_model`` hands such models to ``export_pixel_model``; ``Engine.from_pretrained(...,
backend="onnxruntime", engine_dir=DIR)`` gives a PixelEngine whose U-Net runs in ONNX Runtime.
TensorRT engines are not built for them yet.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import contracts as C
from .contracts import ShapeProfile
from .manifest import (MANIFEST, ExportDirError, atomic_write_json, check_same_model, clean_stale_temporaries,
                       new_manifest, read_manifest, record_file, sha256_json, weights_hash)

FAMILY = "pixel"
NETWORK = "unet_2d"


def is_pixel_export(engine_dir) -> bool:
    try:
        return read_manifest(engine_dir, require_complete=False).get("family") == FAMILY
    except (ExportDirError, OSError, TypeError):
        return False


def _profile(config, o) -> ShapeProfile:
    size = config.sample_size or 32
    native = [int(v) for v in (size if isinstance(size, (tuple, list)) else (size, size))]

    def around(n):
        return (min(64, n), n, max(512, n))

    return ShapeProfile(batch=o.batch or (1, 1, 4), height=o.height or around(native[0]),
                        width=o.width or around(native[-1]))


def export_pixel_model(source: Path, out: Path, o, *, requested_components=None, log=print) -> dict:
    """The pixel-model branch of exporter.export_model (options already resolved; the components the
    user asked for, if any, in ``requested_components``)."""
    from ldm_engine.loading.pixel import load_pixel_pipeline

    from .exporter import ExportOptionError, _config_dict, _verify_onnx, _Job
    from .onnx_export import export_onnx

    if o.fmt != "onnx":
        raise ExportOptionError("--format tensorrt: pixel-space (DDPM) models are exported as ONNX only for now")
    if requested_components is not None and set(requested_components) - {"unet"}:
        raise ExportOptionError(f"--components: an unconditional pixel model has only its U-Net ('unet'), got "
                                f"{','.join(requested_components)}")
    if o.controlnets:
        raise ExportOptionError("--controlnet: an unconditional pixel model takes no ControlNet")
    old = check_same_model(out, str(source), overwrite=o.overwrite)
    comps = load_pixel_pipeline(source, device=o.device, dtype=torch.float32)
    cfg = comps.unet.config
    profile = _profile(cfg, o)
    multiple = 2 ** (len(cfg.block_out_channels) - 1)
    for name in ("height", "width"):
        bad = [v for v in getattr(profile, name) if v % multiple]
        if bad:
            raise ExportOptionError(f"--{name}: {bad[0]} px is not a multiple of {multiple} (this U-Net's "
                                    f"2^(levels - 1))")
    contract = C.unet_2d_contract(cfg, dtype=o.dtype)
    unet = comps.unet.to(C.DTYPES[o.dtype]).eval()
    weights = weights_hash(unet)

    out.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(out)
    manifest = new_manifest(source=str(source), source_sha256=sha256_json({"unet": weights}), family=FAMILY,
                            fmt=o.fmt, dtype=o.dtype, profile=profile.to_json(), device=str(o.device), opset=o.opset)
    atomic_write_json(out / MANIFEST, manifest)
    (out / "configs").mkdir(exist_ok=True)
    atomic_write_json(out / "configs" / "unet.json", _config_dict(cfg))
    atomic_write_json(out / "configs" / "scheduler_config.json", dict(comps.scheduler_config))
    record_file(manifest, out, "configs/unet.json", "model config of the UNet2DModel")
    record_file(manifest, out, "configs/scheduler_config.json", "scheduler config (diffusers scheduler_config.json)")

    # trace at a small non-degenerate size: batch 2, distinct height and width, >= 2 at the deepest level
    symbols = {"B": 2, "H": 2 * multiple, "W": 3 * multiple}
    info = export_onnx(unet, contract, out / f"{NETWORK}.onnx", symbols=symbols, opset=o.opset, device=o.device)
    what = "pixel-space U-Net: noisy image, timestep -> noise prediction"
    record_file(manifest, out, info["onnx"], f"ONNX graph of {NETWORK}: {what}")
    if info["onnx_data"]:
        record_file(manifest, out, info["onnx_data"], f"external weights of {info['onnx']}")
    manifest["networks"][NETWORK] = {
        "contract": contract.to_json(), "what": what, "weights_sha256": weights, "onnx": info["onnx"],
        "onnx_data": info["onnx_data"], "onnx_sha256": manifest["files"][info["onnx"]]["sha256"],
        "input_shapes": {k: [list(s) for s in v] for k, v in contract.profile_shapes(profile).items()}}
    if o.verify:
        job = _Job(NETWORK, unet, contract, what)
        manifest["networks"][NETWORK]["verify"] = _verify_onnx(job, out / info["onnx"], symbols, log)
    if old:
        for rel in old.get("files", {}):
            path = out / rel
            if rel not in manifest["files"] and path.is_file() and path.resolve().is_relative_to(out.resolve()):
                path.unlink()
    manifest["complete"] = True
    atomic_write_json(out / MANIFEST, manifest)
    log(f"exported {NETWORK} to {out}")
    return manifest


class ExportedUNet2D:
    """``unet(sample, timestep) -> noise prediction`` on an exported ``unet_2d`` network."""

    def __init__(self, session, config):
        self.session, self.config = session, config
        self.dtype, self.device = session.contract.outputs[0].torch_dtype, session.device

    def __call__(self, sample, timestep):
        from .runtime import _batch_timestep

        t = _batch_timestep(timestep, sample.shape[0], self.device)
        return self.session({"sample": sample, "timestep": t})["out_sample"]

    forward = __call__

    def eval(self):
        return self


def load_exported_pixel_components(engine_dir, *, backend: str = "onnxruntime", device="cpu"):
    """PixelComponents whose U-Net runs the exported ``unet_2d`` network."""
    from ldm_engine.loading.pixel import PixelComponents
    from ldm_engine.models.unet_2d import UNet2DConfig

    from .runtime import BACKENDS, _read_json, _session

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    engine_dir = Path(engine_dir)
    device = torch.device(device)
    manifest = read_manifest(engine_dir)
    if manifest.get("family") != FAMILY or NETWORK not in manifest["networks"]:
        raise ExportDirError(f"{engine_dir}: not an export of a pixel-space (DDPM) model")
    config = UNet2DConfig.from_dict(_read_json(engine_dir / "configs" / "unet.json"))
    session = _session(engine_dir, manifest, NETWORK, backend, device)
    scheduler_config = _read_json(engine_dir / "configs" / "scheduler_config.json")
    return PixelComponents(unet=ExportedUNet2D(session, config), scheduler_config=scheduler_config,
                           source=str(engine_dir))


__all__ = ["export_pixel_model", "load_exported_pixel_components", "is_pixel_export", "ExportedUNet2D"]
