"""Shared test setup: markers that skip, with a reason, what this machine cannot run."""

import importlib.util
import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter. triton.jit picks interpreted or
# compiled when a kernel module is imported, so this must be set before any test imports one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# LDM_ENGINE_FAILURES_NOW=1 (benchmarks/run_gpu.sh sets it): print each failure's test and its error message as
# soon as it happens, not only in the final summary -- a GPU session cut off by its time limit still tells
# which tests failed and why. With pytest-xdist this runs in the controller, which receives every report.
_FAILURES_NOW_LIMIT = 300
_failures_now = {"config": None, "count": 0}


def pytest_configure(config):
    _failures_now["config"] = config


def pytest_runtest_logreport(report):
    if not report.failed or os.environ.get("LDM_ENGINE_FAILURES_NOW") != "1":
        return
    _failures_now["count"] += 1
    if _failures_now["count"] > _FAILURES_NOW_LIMIT:
        return
    text = report.longreprtext.splitlines()
    errors = [ln[1:].strip() for ln in text if ln.startswith("E ")]  # the first is the exception's message
    reason = (errors[0] if errors else (text[-1] if text else ""))[:300]
    tr = _failures_now["config"].pluginmanager.get_plugin("terminalreporter")
    if tr is not None:
        tr.write_line(f"\nFAILED-NOW [{report.when}] {report.nodeid}: {reason}")


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    has_trt = importlib.util.find_spec("tensorrt") is not None
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU; none is visible to torch here")
    skip_trt = pytest.mark.skip(reason="needs the tensorrt package (import tensorrt failed)")
    for item in items:
        if not has_cuda and ("cuda" in item.keywords or "triton_gpu" in item.keywords):
            item.add_marker(skip_cuda)
        if not has_trt and "tensorrt" in item.keywords:
            item.add_marker(skip_trt)
