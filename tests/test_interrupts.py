"""Interruptions: a KeyboardInterrupt inside generate() leaves the engine usable, and an export
killed with SIGKILL at any point leaves nothing the loader accepts as complete; a rerun completes.

The interrupt is raised from inside a network (the U-Net's forward, patched to raise on a chosen
call): the same place a user's step callback would raise from, without depending on a callback
API. It is tested eagerly and on the graph path (RerunGraphs, the CPU stand-in of CUDA graphs)
both while a graph is being captured and while one is replayed.

The export is killed deterministically: a small driver runs ``ldm_engine.export``'s CLI in a
subprocess with one function wrapped to SIGKILL the process on its n-th call (the atomic rename of
every written file, the recording of an ONNX file in the manifest, the ONNX export itself), plus
one kill at a time offset.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_pipelines import tiny_pipeline

from ldm_engine import Engine
from ldm_engine.export.manifest import ExportDirError, read_manifest
from ldm_engine.export.runtime import load_exported_components
from ldm_engine.pipeline.cuda_graphs import RerunGraphs

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a castle in the fog"
KW = dict(num_inference_steps=3, seed=11, output_type="np", guidance_scale=2.0)


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return tiny_pipeline("sd15", tmp_path_factory.mktemp("tiny-interrupts"))


def _interrupt_unet_call(monkeypatch, engine: Engine, n: int) -> dict:
    """The engine's U-Net raises KeyboardInterrupt on its n-th call from now on (once)."""
    unet = engine.components.unet
    real = type(unet).forward
    state = {"calls": 0}

    def forward(self, *args, **kwargs):
        state["calls"] += 1
        if state["calls"] == n:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(unet), "forward", forward)
    return state


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
@pytest.mark.parametrize("when", [1, 2], ids=["first-call", "mid-loop"])
def test_keyboard_interrupt_in_generate_leaves_the_engine_usable(sd, monkeypatch, graphs, when):
    want = Engine.from_pretrained(sd).generate(PROMPT, **KW).images
    engine = Engine.from_pretrained(sd)
    if graphs:
        engine._install_graphs(RerunGraphs(), 8)
    # graphs: call 1 is the warm-up (the graph is never captured); call 3 is a replay of a captured graph
    n = when if not graphs else (1 if when == 1 else 3)
    state = _interrupt_unet_call(monkeypatch, engine, n)
    with pytest.raises(KeyboardInterrupt):
        engine.generate(PROMPT, **KW)
    assert state["calls"] == n
    for _ in range(2):  # the next calls give the uninterrupted image
        got = engine.generate(PROMPT, **KW).images
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    if graphs:
        assert engine._graphed[0].unet.num_graphs == 1


def test_exception_in_a_concurrent_thread_does_not_disturb_others(sd, monkeypatch):
    import threading

    engine = Engine.from_pretrained(sd)
    engine._install_graphs(RerunGraphs(), 8)
    want = engine.generate(PROMPT, **KW).images
    real = type(engine.components.unet).forward
    bad = threading.local()

    def forward(self, *args, **kwargs):
        if getattr(bad, "raise_", False):
            raise RuntimeError("boom")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(engine.components.unet), "forward", forward)
    results, errors = [], []

    def good():
        results.append(engine.generate(PROMPT, **KW).images)

    def failing():
        bad.raise_ = True
        try:
            engine.generate(PROMPT, **KW)
        except RuntimeError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=f) for f in (good, failing, good, failing)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(errors) == 2 and len(results) == 2
    for got in results:
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------- export

DRIVER = r"""
import os, signal, sys
point, n = sys.argv[1], int(sys.argv[2])
calls = [0]

def killing(fn):
    def wrapped(*a, **k):
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return fn(*a, **k)
    return wrapped

import ldm_engine.export.exporter as ex
if point == "rename":
    os.replace = killing(os.replace)          # before the n-th atomic rename: a .tmp-* file is left
elif point == "record":
    ex.record_file = killing(ex.record_file)  # between writing an ONNX file and recording it
elif point == "onnx":
    ex.export_onnx = killing(ex.export_onnx)  # as the n-th network's ONNX export starts
from ldm_engine.export.cli import main
sys.exit(main(sys.argv[3:]))
"""


def _export_cmd(sd: Path, out: Path, point: str = "none", n: int = 0) -> list[str]:
    return [sys.executable, "-c", DRIVER, point, str(n), str(sd), "--out", str(out), "--components",
            "vae_decoder,text_encoder", "--height", "32", "--width", "32", "--batch", "1", "--quiet"]


def _env():
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def _assert_refused(out: Path):
    with pytest.raises(ExportDirError):
        load_exported_components(out, backend="onnxruntime")
    if (out / "manifest.json").exists():
        assert read_manifest(out, require_complete=False)["complete"] is False


def test_export_killed_at_any_point_is_never_complete_and_a_rerun_completes(sd, tmp_path):
    out = tmp_path / "exp"
    # rename 1: the first (incomplete) manifest; rename 3: a side file; record 1: an ONNX file
    # written but not recorded; onnx 2: the second network's export starting
    for point, n in [("rename", 1), ("rename", 3), ("record", 1), ("onnx", 2)]:
        proc = subprocess.run(_export_cmd(sd, out, point, n), env=_env(), capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == -signal.SIGKILL, (point, n, proc.stderr[-2000:])
        _assert_refused(out)

    # killed at a time offset, while it runs
    proc = subprocess.Popen(_export_cmd(sd, out), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(out.glob("*.onnx")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    if proc.returncode == -signal.SIGKILL:  # (it may have finished just before the kill)
        _assert_refused(out)

    # a rerun completes and loads
    proc = subprocess.run(_export_cmd(sd, out), env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    comps, _ = load_exported_components(out, backend="onnxruntime")
    assert comps.vae.decode(torch.randn(1, 4, 16, 16)).shape == (1, 3, 32, 32)
    assert not list(out.glob(".tmp-*"))

    # re-exporting over a complete export and killed midway: no longer accepted as complete
    proc = subprocess.run(_export_cmd(sd, out, "onnx", 1), env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    _assert_refused(out)
    proc = subprocess.run(_export_cmd(sd, out), env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert read_manifest(out)["complete"] is True
