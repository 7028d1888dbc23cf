"""pytest options for the benchmarks (``python -m pytest benchmarks/bench_pipeline.py``).

benchmarks/ is outside the test suite's testpaths, so ``python -m pytest tests`` never loads this file.
"""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


def pytest_addoption(parser):
    g = parser.getgroup("ldm_engine benchmarks")
    g.addoption("--bench-runs", type=int, default=5, help="timed rounds per benchmark (default 5)")
    g.addoption("--bench-warmup", type=int, default=2, help="untimed rounds first (default 2)")
    g.addoption("--bench-models", default="sd-turbo,sdxl-turbo,sd15",
                help="full-size models for the CUDA benchmarks (comma list)")
    g.addoption("--bench-weights-dir", default=None,
                help="folder for the random-weight pipelines (default $LDM_BENCH_WEIGHTS or /tmp/ldm_engine_bench_weights)")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")


@pytest.fixture(scope="session")
def bench_options(request):
    from bench_pipeline import DEFAULT_WEIGHTS_DIR

    opt = request.config.getoption
    weights = opt("--bench-weights-dir") or os.environ.get("LDM_BENCH_WEIGHTS") or DEFAULT_WEIGHTS_DIR
    return {"runs": opt("--bench-runs"), "warmup": opt("--bench-warmup"), "weights_dir": Path(weights),
            "models": [m.strip() for m in opt("--bench-models").split(",") if m.strip()]}
