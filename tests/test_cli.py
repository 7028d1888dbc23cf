"""`python -m ldm_engine generate`: the built-in demo model run (the README's main job), real-model runs on tiny
pipelines (text-to-image, img2img, ControlNet), the timing table, and bad arguments (exit status 2)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny_pipelines import tiny_pipeline

from ldm_engine.cli import format_timings, main

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from demo_shapes import classify  # noqa: E402


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny")


def test_demo_model_subprocess(tmp_path):
    """No --model: the built-in demo model draws the default prompt's colors (a red circle on a blue background),
    PNG, timing table, and a note saying what the model is and how to use real weights."""
    out = tmp_path / "demo.png"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ldm_engine", "generate", "--out", str(out), "--device", "cpu"],
                          capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    img = Image.open(out)
    assert img.size == (64, 64) and img.mode == "RGB"
    fg, _, bg = classify(img)  # colors; the shape is checked over many prompts in tests/test_demo_model.py
    assert (fg, bg) == ("red", "blue")
    text = proc.stdout
    for stage in ("text_encoder", "unet", "vae_decode", "total"):
        assert stage in text
    assert "built-in demo model" in text and "--model" in text and "RANDOM" not in text
    assert elapsed < 60  # seconds on CI's 2 cores; typically ~3 s


def test_demo_is_deterministic(tmp_path, capsys):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    assert main(["generate", "--out", str(a), "--seed", "3", "--device", "cpu"]) == 0
    assert main(["generate", "--out", str(b), "--seed", "3", "--device", "cpu"]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))


def test_model_text_to_image_with_options(root, tmp_path, capsys):
    out = tmp_path / "cat.png"
    rc = main(["generate", "--model", str(tiny_pipeline("sd-turbo", root)), "--prompt", "a cat",
               "--size", "48x32", "--steps", "2", "--seed", "1", "--scheduler", "euler_a",
               "--num-images", "2", "--out", str(out)])
    assert rc == 0
    assert Image.open(tmp_path / "cat-0.png").size == (48, 32)  # WIDTHxHEIGHT
    assert Image.open(tmp_path / "cat-1.png").size == (48, 32)
    text = capsys.readouterr().out
    assert "2 step(s)" in text and "euler_a" in text and "turbo" in text and "RANDOM" not in text


def test_model_img2img_and_controlnet(root, tmp_path, capsys):
    rng = np.random.default_rng(0)
    init, hint = tmp_path / "init.png", tmp_path / "hint.png"
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(init)
    Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(hint)
    model = str(tiny_pipeline("sd15", root))
    out = tmp_path / "i2i.png"
    assert main(["generate", "--model", model, "--prompt", "a dog", "--image", str(init), "--strength", "0.5",
                 "--steps", "4", "--guidance", "6", "--negative-prompt", "blurry", "--out", str(out)]) == 0
    assert Image.open(out).size == (40, 40)
    assert "vae_encode" in capsys.readouterr().out
    out = tmp_path / "cn.png"
    assert main(["generate", "--model", model, "--prompt", "a dog", "--controlnet",
                 str(tiny_pipeline("controlnet-sd", root)), "--control-image", str(hint),
                 "--control-scale", "0.5", "--steps", "2", "--out", str(out)]) == 0
    assert Image.open(out).size == (32, 32)
    assert "controlnet" in capsys.readouterr().out


@pytest.mark.parametrize("argv,words", [
    (["--size", "33x32"], ["width", "multiple of 4"]),
    (["--size", "big"], ["--size"]),
    (["--steps", "0"], ["num_inference_steps"]),
    (["--guidance", "-2"], ["guidance_scale"]),
    (["--scheduler", "karras"], ["scheduler"]),
    (["--strength", "0.5"], ["strength", "image"]),
    (["--control-image", "x.png"], ["--control-image"]),
    (["--controlnet", "x"], ["--controlnet"]),
    (["--image", "does-not-exist.png"], ["does-not-exist.png"]),
])
def test_bad_arguments_exit_2(tmp_path, capsys, argv, words):
    with pytest.raises(SystemExit) if argv[1] == "big" else _no_raise():
        rc = main(["generate", "--device", "cpu", "--out", str(tmp_path / "x.png"), *argv])
        assert rc == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err, err
    assert not (tmp_path / "x.png").exists()


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_format_timings():
    table = format_timings({"text_encoder": 1.5, "vae_encode": 0.0, "controlnet_hint": 4.0, "controlnet": [1.0, 3.0],
                            "unet": [10.0, 20.0], "vae_decode": 5.0, "total": 50.0})
    assert "controlnet" in table and "2 step(s), 2.0 ms/step" in table
    assert "controlnet_hint        4.0" in table
    assert "unet" in table and "15.0 ms/step" in table and "vae_encode" not in table
    assert table.splitlines()[-1].split()[:2] == ["total", "50.0"]
