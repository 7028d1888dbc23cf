"""Shared test setup: markers that skip, with a reason, what this machine cannot run."""

import importlib.util
import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter. triton.jit picks interpreted or
# compiled when a kernel module is imported, so this must be set before any test imports one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


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
