"""TensorRT engines from the exported ONNX files, written against TensorRT's documented Python API
(10.x; 11 where noted). Thin on purpose: parse ONNX, one optimization profile from the contract,
precision, timing cache, progress bar, cache key, atomic write.

Precision: by default the network is *strongly typed*: the ONNX file carries the precision
(exported in fp16 / bf16 / fp32) and TensorRT keeps it -- the mode TensorRT recommends since 10.12
deprecated weak typing, and the only one in TensorRT 11. ``typing="weak"`` instead builds an fp32
ONNX with BuilderFlag.FP16 / BF16, letting TensorRT choose per layer (TensorRT 10 only).

This module imports ``tensorrt`` only inside functions: importing it costs nothing where TensorRT
is absent (it cannot be installed on the project's CI machines; see README).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .contracts import Contract, ShapeProfile
from .manifest import (atomic_write_bytes, atomic_write_json, key_mismatch, sha256_file,
                       tensorrt_cache_key)
from .progress import Progress


class TensorRTError(RuntimeError):
    """A TensorRT build or engine load failed; the message says why and what to do."""


def import_tensorrt():
    """The tensorrt module, or a BackendUnavailableError that says how to get it."""
    try:
        import tensorrt as trt
    except ImportError as e:
        from ldm_engine.errors import BackendUnavailableError

        raise BackendUnavailableError(
            f"TensorRT is not installed ({e}). Install NVIDIA's `tensorrt` Python package (10.x or newer, "
            f"matching your CUDA) on a machine with an NVIDIA GPU, or use --format onnx / "
            f"backend='onnxruntime'") from e
    major = int(trt.__version__.split(".")[0])
    if major < 10:
        from ldm_engine.errors import BackendUnavailableError

        raise BackendUnavailableError(f"TensorRT {trt.__version__} is too old: ldm_engine needs 10 or newer")
    return trt


def compute_capability(device_index: int = 0) -> tuple[int, int]:
    import torch

    if not torch.cuda.is_available():
        from ldm_engine.errors import BackendUnavailableError

        raise BackendUnavailableError("TensorRT needs a CUDA GPU, and torch sees none")
    return torch.cuda.get_device_capability(device_index)


def make_logger(trt, verbose=False):
    return trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)


def _progress_monitor_class(trt):
    class BarMonitor(trt.IProgressMonitor):
        """TensorRT reports phases (nested) and steps; the top-level phase drives the bar."""

        def __init__(self, bar: Progress):
            trt.IProgressMonitor.__init__(self)
            self.bar = bar
            self.top = None

        def phase_start(self, phase_name, parent_phase, num_steps):
            if parent_phase is None and self.top is None:
                self.top = phase_name
                self.bar.update(0, total=num_steps, note=phase_name)
            else:
                self.bar.update(0, note=phase_name)

        def step_complete(self, phase_name, step):
            if phase_name == self.top:
                self.bar.update(1)
            return True  # False would cancel the build

        def phase_finish(self, phase_name):
            if phase_name == self.top:
                self.top = None

    return BarMonitor


def plan_paths(out_dir: Path, network: str, key_id: str) -> tuple[Path, Path]:
    return out_dir / f"{network}.{key_id[:16]}.plan", out_dir / f"{network}.plan.json"


def cached_engine(out_dir: Path, network: str, expected_key: dict) -> tuple[Path | None, str]:
    """(plan path, "") when a cached engine matches the key and its sha256, else (None, why not)."""
    _, sidecar = plan_paths(out_dir, network, expected_key["id"])
    if not sidecar.exists():
        return None, "no engine built yet"
    try:
        info = json.loads(sidecar.read_text())
        stored_key, plan = info["key"], out_dir / info["file"]
    except (OSError, ValueError, KeyError) as e:
        return None, f"unreadable {sidecar.name} ({e})"
    diff = key_mismatch(stored_key, expected_key)
    if diff:
        return None, "stale engine: " + ", ".join(f"{k} changed" for k in diff)
    if not plan.exists():
        return None, f"{plan.name} is missing"
    if plan.stat().st_size != info.get("size") or sha256_file(plan) != info.get("sha256"):
        return None, f"{plan.name} is corrupt (size/sha256 differ from {sidecar.name})"
    return plan, ""


def build_engine(onnx_path: str | os.PathLike, contract: Contract, profile: ShapeProfile, out_dir: str | os.PathLike,
                 *, weights_sha256: str, onnx_sha256: str | None = None, precision: str | None = None,
                 typing: str = "strong", timing_cache: str | os.PathLike | None = None,
                 workspace_gib: float | None = None, device_index: int = 0, verbose=False, progress=True) -> tuple[Path, dict]:
    """Build (or reuse from the cache) the engine of one network; returns (plan path, cache key)."""
    trt = import_tensorrt()
    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    precision = precision or contract.dtype
    if typing not in ("strong", "weak"):
        raise ValueError(f"typing must be 'strong' or 'weak', got {typing!r}")
    if typing == "weak" and contract.dtype != "fp32":
        raise ValueError("typing='weak' builds from an fp32 ONNX file (TensorRT then picks fp16/bf16 per layer)")
    shapes = contract.profile_shapes(profile)
    onnx_sha256 = onnx_sha256 or sha256_file(onnx_path)
    key = tensorrt_cache_key(
        network=contract.network, weights_sha256=weights_sha256, onnx_sha256=onnx_sha256, input_shapes=shapes,
        precision=precision, tensorrt_version=trt.__version__,
        compute_capability=compute_capability(device_index),
        builder_options={"typing": typing, "workspace_gib": workspace_gib})
    plan, why = cached_engine(out_dir, contract.network, key)
    if plan is not None:
        print(f"{contract.network}: TensorRT engine {plan.name} is up to date", flush=True)
        return plan, key
    print(f"{contract.network}: building a TensorRT engine ({why})", flush=True)

    logger = make_logger(trt, verbose)
    builder = trt.Builder(logger)
    flags = 0
    if typing == "strong" and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # external data is found next to the file
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TensorRTError(f"TensorRT's ONNX parser rejected {onnx_path.name}: {errors}")

    config = builder.create_builder_config()
    if workspace_gib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if typing == "weak":
        if not hasattr(trt.BuilderFlag, "FP16"):
            raise TensorRTError(f"TensorRT {trt.__version__} has no weak typing (BuilderFlag.FP16/BF16); "
                                f"use --trt-typing strong")
        if precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        elif precision == "bf16":
            config.set_flag(trt.BuilderFlag.BF16)

    opt_profile = builder.create_optimization_profile()
    dynamic_inputs = {network.get_input(i).name for i in range(network.num_inputs)
                      if any(d < 0 for d in network.get_input(i).shape)}
    for name, (lo, opt, hi) in shapes.items():
        if name in dynamic_inputs:
            opt_profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(opt_profile)

    cache_bytes = b""
    if timing_cache and Path(timing_cache).exists():
        cache_bytes = Path(timing_cache).read_bytes()
    cache = config.create_timing_cache(cache_bytes)
    if cache is None and cache_bytes:  # unreadable cache file: start a fresh one (it is rewritten below)
        print(f"{contract.network}: ignoring the unreadable timing cache {timing_cache}", flush=True)
        cache = config.create_timing_cache(b"")
    config.set_timing_cache(cache, ignore_mismatch=False)  # a cache from another GPU/version is not reused

    with Progress(f"{contract.network}: TensorRT build", enabled=progress) as bar:
        monitor = None
        if hasattr(trt, "IProgressMonitor") and hasattr(config, "progress_monitor"):
            monitor = _progress_monitor_class(trt)(bar)
            config.progress_monitor = monitor  # must outlive the build: kept referenced here
        serialized = builder.build_serialized_network(network, config)
        del monitor
    if serialized is None:
        raise TensorRTError(f"TensorRT failed to build {contract.network} (see the TensorRT log above)")

    if timing_cache:
        atomic_write_bytes(timing_cache, memoryview(config.get_timing_cache().serialize()))
    plan, sidecar = plan_paths(out_dir, contract.network, key["id"])
    atomic_write_bytes(plan, memoryview(serialized))
    old = None
    if sidecar.exists():
        try:
            old = json.loads(sidecar.read_text()).get("file")
        except (OSError, ValueError):
            old = None
    atomic_write_json(sidecar, {"key": key, "file": plan.name, "size": plan.stat().st_size,
                                "sha256": sha256_file(plan)})
    if old and old != plan.name:
        (out_dir / old).unlink(missing_ok=True)  # the stale engine, now superseded
    return plan, key


# -- runtime side -----------------------------------------------------------------------------------

def load_engine(plan: Path, sidecar_key: dict, *, device_index: int = 0, verbose=False):
    """Deserialize a plan after checking it was built by this TensorRT for this GPU architecture.
    Returns (runtime, engine); refuses a mismatched or corrupt engine with a clear message."""
    trt = import_tensorrt()
    here = {"tensorrt_version": trt.__version__,
            "compute_capability": "{}.{}".format(*compute_capability(device_index))}
    diff = [f"{k}: built for {sidecar_key.get(k)}, this machine has {v}"
            for k, v in here.items() if sidecar_key.get(k) != v]
    if diff:
        raise TensorRTError(f"{plan.name} does not match this machine ({'; '.join(diff)}); rebuild it with "
                            f"`python -m ldm_engine.export ... --format tensorrt`")
    runtime = trt.Runtime(make_logger(trt, verbose))
    engine = runtime.deserialize_cuda_engine(plan.read_bytes())
    if engine is None:
        raise TensorRTError(f"TensorRT could not deserialize {plan} (corrupt or incompatible); rebuild it")
    return runtime, engine


def trt_to_torch_dtype(trt, dt):
    import torch

    table = {}
    for trt_name, torch_dtype in (("FLOAT", torch.float32), ("HALF", torch.float16), ("BF16", torch.bfloat16),
                                  ("INT32", torch.int32), ("INT64", torch.int64), ("INT8", torch.int8),
                                  ("BOOL", torch.bool)):
        if hasattr(trt.DataType, trt_name):
            table[getattr(trt.DataType, trt_name)] = torch_dtype
    if dt not in table:
        raise TensorRTError(f"TensorRT tensor type {dt} has no torch equivalent here")
    return table[dt]
