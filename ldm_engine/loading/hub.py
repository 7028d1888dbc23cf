"""Resolve a local path or a Hugging Face repo id (``org/name``) to a local path, offline.

Repo ids are looked up in the local Hugging Face cache through huggingface_hub's own cache
functions (an optional dependency, imported only when a repo id is given); nothing is ever
downloaded here.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ldm_engine.errors import CheckpointError

# Models shipped inside the package, by name: checked before local paths and the HF cache
# (a local folder of the same name is reached as "./demo").
BUILTIN_MODELS = {"demo": Path(__file__).resolve().parents[1] / "data" / "demo"}

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_repo_id(text: str) -> bool:
    return bool(_REPO_ID.match(text)) and not text.endswith((".safetensors", ".ckpt", ".bin", ".pt", ".pth"))


def hf_cache_dir() -> Path:
    """The hub cache, honouring HF_HUB_CACHE / HF_HOME as set *now* (huggingface_hub reads them
    once at import time, and callers may set them later)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    try:
        from huggingface_hub import constants
        return Path(constants.HF_HUB_CACHE)
    except ImportError:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        return Path(xdg) / "huggingface" / "hub"


def resolve_model_path(path_or_repo_id: str | os.PathLike, *, revision: str | None = None) -> Path:
    """A local file or folder: a built-in model's folder for its name (``"demo"``, see BUILTIN_MODELS),
    ``path_or_repo_id`` itself when it exists, else the snapshot of that repo id in the local Hugging
    Face cache. Never uses the network."""
    if not isinstance(path_or_repo_id, (str, os.PathLike)):
        raise TypeError(f"expected a path or a repo id string, got {type(path_or_repo_id).__name__}")
    text = os.fspath(path_or_repo_id)
    if not text:
        raise CheckpointError("empty model path")
    if text in BUILTIN_MODELS:
        if not BUILTIN_MODELS[text].is_dir():
            raise CheckpointError(f"built-in model {text!r}: {BUILTIN_MODELS[text]} is missing from this install")
        return BUILTIN_MODELS[text]
    path = Path(text).expanduser()
    if path.exists():
        return path
    if not looks_like_repo_id(text):
        raise CheckpointError(f"{text}: no such file or directory")

    cache = hf_cache_dir()
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        raise CheckpointError(
            f"{text!r} is not a local path; it looks like a Hugging Face repo id, and resolving one "
            "needs the optional huggingface_hub package (pip install huggingface_hub), or pass the "
            "local path of the model folder or file.") from None
    try:
        snapshot = snapshot_download(text, revision=revision, cache_dir=cache, local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError) as exc:
        folder = cache / ("models--" + text.replace("/", "--"))
        raise CheckpointError(
            f"{text!r} is neither a local path nor a model in the local Hugging Face cache "
            f"(looked for {folder}; cache directory from HF_HUB_CACHE / HF_HOME). ldm_engine never "
            f"downloads; fetch it first with `hf download {text}` (or `huggingface-cli download "
            f"{text}`), then retry. ({type(exc).__name__})") from None
    return Path(snapshot)
