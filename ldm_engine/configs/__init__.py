"""Default component configs for single-file checkpoints, which carry none (package data).

Each folder holds diffusers/transformers config.json contents named by component; see
README.md beside this file for where every value comes from.
"""

from __future__ import annotations

import json
from importlib import resources

# family -> folder used when a single file does not say more
SINGLE_FILE_DEFAULTS = {"sd1": "sd15", "sd2": "sd-turbo", "sd2-v": "sd21-v", "sdxl": "sdxl-turbo",
                        "controlnet-sd1": "controlnet-sd15-canny", "controlnet-sdxl": "controlnet-sdxl-canny"}


def default_config(folder: str, name: str) -> dict:
    """The JSON ``name`` (e.g. "unet.json") of default config ``folder`` (e.g. "sd15")."""
    path = resources.files(__name__).joinpath(folder, name)
    return json.loads(path.read_text(encoding="utf-8"))


def has_default_config(folder: str, name: str) -> bool:
    return resources.files(__name__).joinpath(folder, name).is_file()
