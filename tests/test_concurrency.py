"""One Engine shared by many threads (the thread-safety contract in Engine's docstring).

The graph path runs with RerunGraphs, the CPU stand-in of CUDA graphs that keeps their discipline
(static inputs copied in, outputs written into the captured tensors and cloned out), so a call
that reads another thread's inputs or outputs gives a wrong image here too. 8 threads, mixed
requests (text-to-image and img2img, ControlNet scales, guidance on and off, two sizes), each
compared with the same request run alone. A control run with the lock removed shows that the test
sees races when there are any.
"""

from __future__ import annotations

import contextlib
import importlib.util
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from tiny_pipelines import tiny_pipeline

from ldm_engine import Engine
from ldm_engine.pipeline.cuda_graphs import RerunGraphs

THREADS = 8
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def one_intra_op_thread():
    """8 Python threads on a 2-core machine: torch's own intra-op threads would only oversubscribe it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
PROMPTS = ["a lighthouse on a cliff", "a bowl of ramen, studio light", "an owl in the snow", "red bicycle"]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-threads")
    return tiny_pipeline("sd15", root), tiny_pipeline("controlnet-sd", root)


def _image(seed: int, h: int, w: int) -> np.ndarray:
    return np.random.default_rng(seed).random((h, w, 3), dtype=np.float32)


def requests() -> list[tuple[str, dict]]:
    """Mixed requests: two sizes, text-to-image and img2img, guidance on / off, several scales."""
    out = []
    for i in range(THREADS):
        h, w = (32, 32) if i % 2 == 0 else (24, 40)
        kw = dict(seed=100 + i, height=h, width=w, num_inference_steps=2, output_type="np",
                  guidance_scale=(1.0, 3.0)[i // 2 % 2], control_image=_image(i, h, w),
                  controlnet_conditioning_scale=(0.5, 1.0, 0.8)[i % 3])
        if i % 4 >= 2:  # img2img
            kw.update(image=_image(50 + i, h, w), strength=1.0)
        out.append((PROMPTS[i % len(PROMPTS)], kw))
    return out


def run_concurrently(engine: Engine, reqs) -> list:
    results: list = [None] * len(reqs)
    errors: list = []
    barrier = threading.Barrier(THREADS)

    def worker(k: int):
        try:
            barrier.wait()
            for j in range(k, len(reqs), THREADS):
                prompt, kw = reqs[j]
                results[j] = engine.generate(prompt, **kw).images
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    return results


def _mismatches(got, want) -> list[int]:
    return [i for i, (g, w) in enumerate(zip(got, want)) if g is None or not np.allclose(g, w, rtol=0, atol=1e-6)]


@pytest.fixture(scope="module")
def graphed(paths):
    sd, cn = paths
    engine = Engine.from_pretrained(sd, controlnet=cn)
    graphs = RerunGraphs()
    engine._install_graphs(graphs, 32)
    reqs = requests()
    serial = [engine.generate(p, **kw).images for p, kw in reqs]  # also captures every signature
    return engine, graphs, reqs, serial


def test_threads_share_a_graphed_engine(graphed):
    engine, graphs, reqs, serial = graphed
    for img in serial:
        assert np.isfinite(img).all() and img.std() > 1e-3
    assert len({img.shape for img in serial}) == 2
    captures = graphs.captures
    got = run_concurrently(engine, reqs)
    assert _mismatches(got, serial) == []
    assert graphs.captures == captures, "concurrent calls of known shapes must replay, not capture"


class _SlowReplays(RerunGraphs):
    """Widens the window between a call's input copy and its replay, where a race would strike."""

    def capture(self, run, device):
        out, replay = super().capture(run, device)

        def slow_replay():
            time.sleep(0.002)
            replay()

        return out, slow_replay


def test_without_the_lock_threads_would_see_each_others_buffers(paths):
    """The control experiment: the same test with the graphs' lock replaced by a no-op fails, so the
    test above can fail."""
    sd, cn = paths
    engine = Engine.from_pretrained(sd, controlnet=cn)
    graphs = _SlowReplays()
    engine._install_graphs(graphs, 32)
    reqs = requests()
    serial = [engine.generate(p, **kw).images for p, kw in reqs]
    graphs.lock = contextlib.nullcontext()
    assert _mismatches(run_concurrently(engine, reqs), serial), "no race seen without the lock"
    graphs.lock = threading.RLock()
    assert _mismatches(run_concurrently(engine, reqs), serial) == []


# ---------------------------------------------------------------------------------------------- soak

def _soak_module():
    spec = importlib.util.spec_from_file_location("ldm_soak", ROOT / "benchmarks" / "soak.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_soak_20s():
    """benchmarks/soak.py in its CI form: 4 threads x 20 s of mixed requests (text-to-image, img2img,
    ControlNet, guidance on / off, two sizes) on one graphed engine (RerunGraphs)."""
    report = _soak_module().soak(threads=4, seconds=20, graphs=True)
    assert report["errors"] == 0, report["first_errors"]
    assert report["mismatches"] == 0 and report["calls"] >= 20
    assert report["rss_growth_mb"] < 20


@pytest.mark.cuda
def test_gpu_soak_memory_flat_with_graphs():
    """On a GPU: 1,000 calls from 4 threads with CUDA graphs; allocated memory must stay flat."""
    report = _soak_module().soak(threads=4, calls=1000, device="cuda", graphs=True)
    assert report["errors"] == 0 and report["mismatches"] == 0, report["first_errors"]
    assert report["gpu_allocated_growth_mb"] < 8 and report["gpu_reserved_growth_mb"] < 64
    assert report["rss_growth_mb"] < 50


@pytest.mark.parametrize("graph_mode", [False, True])
def test_compile_graph_modes_serialise_generate(paths, monkeypatch, graph_mode):
    """compile(mode="reduce-overhead" / "max-autotune") sets _copy_unet_output; torch.compile's own
    CUDA graphs overwrite their outputs on the next replay, so whole generate() calls take turns then
    (and only then)."""
    sd, _ = paths
    engine = Engine.from_pretrained(sd)
    engine._copy_unet_output = graph_mode
    state = {"now": 0, "max": 0}
    lock = threading.Lock()

    def run(args, t_start):
        with lock:
            state["now"] += 1
            state["max"] = max(state["max"], state["now"])
        time.sleep(0.05)
        with lock:
            state["now"] -= 1

    monkeypatch.setattr(engine, "_run", run)
    threads = [threading.Thread(target=engine.generate, args=("a cat",), kwargs=dict(num_inference_steps=1))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    if graph_mode:
        assert state["max"] == 1
    else:
        assert state["max"] > 1
