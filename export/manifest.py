"""manifest.json of an export directory, content hashes, TensorRT cache keys and atomic file writes.

Plain Python (no TensorRT, no GPU), so all of it is tested on CPU.

Layout of an export directory::

    DIR/manifest.json            written last; "complete": false while an export is running
    DIR/<network>.onnx[.data]    ONNX files (+ external weights when over 2 GB)
    DIR/<network>.<key16>.plan   TensorRT engines, named by their cache key
    DIR/<network>.plan.json      the engine's full cache key and sha256 (reuse without the manifest)
    DIR/configs/*.json           model configs, scheduler config
    DIR/tokenizer[_2]/           tokenizer files
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import tempfile
from pathlib import Path

import torch

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_CHUNK = 1 << 22


class ExportDirError(ValueError):
    """An export directory that cannot be used: missing, incomplete, another model's, or corrupt."""


# -- atomic writes ---------------------------------------------------------------------------------

@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yields a temporary path next to ``path``; on success it is fsynced and renamed over ``path``,
    on error it is removed. A crash leaves at most a ``.tmp-*`` file that nothing loads."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}.", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        publish(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def publish(path: str | os.PathLike):
    """Give a file the permissions of a normally created one (mkstemp makes them owner-only), so
    that exports can be shipped and read by other users."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def atomic_write_bytes(path, data: bytes | memoryview):
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def atomic_write_json(path, obj):
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def clean_stale_temporaries(directory: str | os.PathLike):
    """Remove ``.tmp-*`` leftovers of an interrupted export."""
    for p in Path(directory).glob(".tmp-*"):
        if p.is_file():
            p.unlink(missing_ok=True)


# -- hashes ----------------------------------------------------------------------------------------

def sha256_file(path: str | os.PathLike, progress=None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            if progress is not None:
                progress(len(chunk))
    return h.hexdigest()


def sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def weights_hash(module: torch.nn.Module) -> str:
    """sha256 over (name, dtype, shape, bytes) of every parameter and buffer, in name order: the same
    weights give the same hash whatever file format or device they came from."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach()
        h.update(f"{name}|{str(t.dtype)}|{tuple(t.shape)}\n".encode())
        t = t.to("cpu").contiguous()
        if t.dtype == torch.bfloat16:  # numpy has no bf16: hash the raw bits
            t = t.view(torch.int16)
        h.update(memoryview(t.numpy()).cast("B"))
    return h.hexdigest()


# -- versions and keys -----------------------------------------------------------------------------

def _version(module_name: str) -> str | None:
    try:
        mod = __import__(module_name)
    except Exception:
        return None
    return getattr(mod, "__version__", "unknown")


def tool_versions() -> dict:
    import ldm_engine

    return {"ldm_engine": ldm_engine.__version__, "torch": torch.__version__, "onnx": _version("onnx"),
            "onnxruntime": _version("onnxruntime"), "python": platform.python_version()}


def tensorrt_cache_key(*, network: str, weights_sha256: str, onnx_sha256: str, input_shapes: dict,
                       precision: str, tensorrt_version: str, compute_capability: tuple[int, int] | str,
                       builder_options: dict | None = None) -> dict:
    """Everything a TensorRT engine depends on. Two builds with equal keys are interchangeable; any
    difference (new weights, other shapes, another TensorRT or GPU architecture) means rebuild."""
    if isinstance(compute_capability, (tuple, list)):
        compute_capability = f"{compute_capability[0]}.{compute_capability[1]}"
    key = {
        "network": network,
        "weights_sha256": weights_sha256,
        "onnx_sha256": onnx_sha256,
        "input_shapes": {k: [list(s) for s in v] for k, v in sorted(input_shapes.items())},
        "precision": precision,
        "tensorrt_version": str(tensorrt_version),
        "compute_capability": str(compute_capability),
        "builder_options": builder_options or {},
    }
    key["id"] = sha256_json(key)
    return key


def key_mismatch(stored: dict, expected: dict) -> list[str]:
    """Names of the cache-key fields that differ (empty: the engine matches)."""
    fields = [k for k in expected if k != "id"]
    return [k for k in fields if stored.get(k) != expected.get(k)]


# -- the manifest ----------------------------------------------------------------------------------

def new_manifest(*, source: str, source_sha256: str, family: str, fmt: str, dtype: str, profile: dict,
                 device: str, opset: int) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "complete": False,
        "source": {"path": source, "sha256": source_sha256},
        "family": family,
        "format": fmt,
        "dtype": dtype,
        "profile": profile,
        "export_device": device,
        "opset": opset,
        "versions": tool_versions(),
        "networks": {},
        "controlnets": [],
        "files": {},
    }


def record_file(manifest: dict, directory: str | os.PathLike, relpath: str, what: str, sha256: str | None = None):
    path = Path(directory) / relpath
    manifest["files"][relpath] = {"what": what, "size": path.stat().st_size,
                                  "sha256": sha256 or sha256_file(path)}


def read_manifest(directory: str | os.PathLike, *, require_complete=True) -> dict:
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise ExportDirError(f"export directory {str(directory)!r} does not exist")
    if not path.is_file():
        raise ExportDirError(f"{str(directory)!r} has no {MANIFEST}: not an ldm_engine export directory "
                             f"(create one with `python -m ldm_engine.export MODEL --out {directory}`)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ExportDirError(f"{path} is unreadable or corrupt ({e}); export again") from e
    except RecursionError:
        raise ExportDirError(f"{path} is corrupt (JSON nested too deeply); export again") from None
    if not isinstance(manifest, dict):
        raise ExportDirError(f"{path} is corrupt (not a JSON object); export again")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ExportDirError(f"{path}: unsupported manifest format {str(manifest.get('format_version'))[:40]!r} "
                             f"(this ldm_engine reads version {FORMAT_VERSION}); export again")
    if require_complete and manifest.get("complete") is not True:
        raise ExportDirError(f"{str(directory)!r} holds an incomplete export (interrupted or failed); run the "
                             f"export again")
    _check_structure(path, manifest)
    return manifest


def _check_structure(path: Path, manifest: dict) -> None:
    """The fields the loader indexes, with the types it expects (a tampered or hand-edited manifest
    gives an ExportDirError, not a KeyError / TypeError deep in the runtime)."""
    def bad(why: str) -> ExportDirError:
        return ExportDirError(f"{path} is corrupt ({why}); export again")

    source = manifest.get("source")
    if not isinstance(source, dict) or not isinstance(source.get("path"), str):
        raise bad("'source' must be an object with a 'path'")
    for key in ("family", "format"):
        if not isinstance(manifest.get(key), str):
            raise bad(f"{key!r} must be a string")
    if not isinstance(manifest.get("profile"), dict):
        raise bad("'profile' must be an object")
    networks, files = manifest.get("networks"), manifest.get("files")
    if not isinstance(networks, dict) or not all(isinstance(v, dict) for v in networks.values()):
        raise bad("'networks' must map names to objects")
    controlnets = manifest.get("controlnets", [])
    if not isinstance(controlnets, list) or not all(isinstance(c, str) and c in networks for c in controlnets):
        raise bad("'controlnets' must list names of exported networks")
    if not isinstance(files, dict):
        raise bad("'files' must be an object")
    for rel, info in files.items():
        if not (isinstance(info, dict) and isinstance(info.get("size"), int) and not isinstance(info["size"], bool)
                and isinstance(info.get("sha256"), str)):
            raise bad(f"entry {rel[:100]!r} of 'files' needs an int 'size' and a str 'sha256'")
        if rel.startswith(("/", "\\")) or ".." in Path(rel).parts:
            raise bad(f"'files' names a path outside the directory ({rel[:100]!r})")
    for name, entry in networks.items():
        for key in ("onnx", "onnx_data"):
            rel = entry.get(key)
            if rel is not None and rel != "" and (not isinstance(rel, str) or rel not in files):
                raise bad(f"network {name[:60]!r}: its {key} file is not listed in 'files'")


def verify_files(directory: str | os.PathLike, manifest: dict, *, relpaths=None, full_hash=False):
    """Check that the listed files exist with the recorded size (and sha256 when full_hash)."""
    directory = Path(directory)
    for rel, info in manifest["files"].items():
        if relpaths is not None and rel not in relpaths:
            continue
        path = directory / rel
        if not path.resolve().is_relative_to(directory.resolve()):  # a tampered manifest
            raise ExportDirError(f"{directory}: manifest names a file outside the directory ({rel!r})")
        if not path.is_file():
            raise ExportDirError(f"{path} is listed in the manifest but missing; export again")
        size = path.stat().st_size
        if size != info["size"]:
            raise ExportDirError(f"{path} has {size} bytes, the manifest says {info['size']}: the file is "
                                 f"truncated or was replaced; export again")
        if full_hash and sha256_file(path) != info["sha256"]:
            raise ExportDirError(f"{path} does not match its sha256 in the manifest (corrupt); export again")


def check_same_model(directory: str | os.PathLike, source: str, source_sha256: str | None = None, *,
                     overwrite: bool = False) -> dict | None:
    """Refuse an output directory that holds another model's exports (unless overwrite).

    Called before any work with the resolved source path only (same path: same model, maybe with new
    weights, whose stale files the export replaces); a different path is accepted when the weights hash
    is known and equal (the model was moved or copied)."""
    directory = Path(directory)
    if overwrite or not directory.exists():
        return None
    if not (directory / MANIFEST).exists():
        if any(p for p in directory.iterdir() if not p.name.startswith(".tmp-")):
            raise ExportDirError(f"--out {str(directory)!r} is not empty and is not an ldm_engine export "
                                 f"directory; choose an empty or new directory (or pass --overwrite)")
        return None
    old = read_manifest(directory, require_complete=False)
    same_path = os.path.realpath(old["source"]["path"]) == os.path.realpath(source)
    same_hash = source_sha256 is not None and old["source"].get("sha256") == source_sha256
    if not (same_path or same_hash):
        raise ExportDirError(
            f"--out {str(directory)!r} holds exports of another model ({old['source']['path']}, weights "
            f"sha256 {str(old['source'].get('sha256'))[:12]}...); choose another directory or pass --overwrite")
    return old
