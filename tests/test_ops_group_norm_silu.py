"""ldm_engine.ops.group_norm_silu: every backend against the fp32 reference.

Tolerance (as flash-attention's tests): err(backend) <= 2 * err(torch's own low-precision result)
+ a small atol, errors being max |out - fp32 reference|. On CPU the Triton kernels run in Triton's
interpreter (small shapes reaching every code path: fused / split plans, multi-slice merges, tails,
each layout); the full SD shape grid and the CUDA backend run only on a GPU (``@pytest.mark.cuda``).
"""

import importlib.util
import math
import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():  # must precede the first import of triton's kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

import ldm_engine.ops as ops  # noqa: E402
from ldm_engine.errors import BackendUnavailableError, InvalidInputError  # noqa: E402
from ldm_engine.ops.reference import group_norm_silu_reference  # noqa: E402
from triton_aot_utils import run_triton_aot  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (torch.cuda.is_available() is False)")

ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def seed_of(*key) -> int:
    """A seed stable across processes (hash() of str is salted per process)."""
    return zlib.crc32(repr(key).encode())


def make_input(shape, layout, dtype, device, seed):
    """layout: "contiguous" | "channels_last" (4-D) | "nlc" (shape given as (N, C, L), stored (N, L, C))."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    n, c = shape[:2]
    # Per-channel offsets and scales: group statistics far from (0, 1) exercise the variance path.
    x = torch.randn(shape, generator=g) * (0.5 + torch.rand(c, generator=g)).view(1, c, *([1] * (len(shape) - 2)))
    x = x + 3 * torch.randn(c, generator=g).view(1, c, *([1] * (len(shape) - 2)))
    w = 1 + 0.5 * torch.randn(c, generator=g)
    b = 0.5 * torch.randn(c, generator=g)
    x, w, b = (t.to(device=device, dtype=dtype) for t in (x, w, b))
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "nlc":
        x = x.flatten(2).transpose(1, 2).contiguous()
    return x, w, b


def poison_allocator(like: torch.Tensor):
    """Fill the caching allocator's next blocks with NaN, so outputs a kernel fails to write show up."""
    if like.is_cuda:
        torch.full((2 * like.numel() + 4096,), float("nan"), dtype=torch.float32, device=like.device)


def assert_matches(out, x, w, b, groups, silu, layout, extra_atol=0.0):
    nlc = layout == "nlc"
    ref = group_norm_silu_reference(x, w, b, groups, silu=silu, channels_last_3d=nlc, out_dtype=torch.float32)
    assert out.shape == x.shape and out.dtype == x.dtype
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last), "channels_last format lost"
    else:
        assert out.is_contiguous()
    err = (out.float() - ref).abs().max().item()
    lowp = ops.group_norm_silu(x, w, b, groups, silu=silu, backend="torch")  # torch's own, in x's dtype
    base = (lowp.float() - ref).abs().max().item()
    bound = 2 * base + ATOL[x.dtype] + extra_atol
    assert math.isfinite(err) and err <= bound, f"max err {err:.3g} > bound {bound:.3g} (torch's own {base:.3g})"


# ------------------------------------------------------------------------------------------------
# CPU: torch and reference backends, dispatch, errors
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "nlc"])
@pytest.mark.parametrize("shape,groups", [((1, 320, 8, 8), 32), ((3, 512, 9, 7), 32), ((2, 64, 97, 63), 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_backend_matches_reference(shape, groups, layout, dtype):
    x, w, b = make_input(shape, layout, dtype, "cpu", seed=seed_of((shape, layout)))
    for silu in (True, False):
        out = ops.group_norm_silu(x, w, b, groups, silu=silu, backend="torch")
        ref = group_norm_silu_reference(x, w, b, groups, silu=silu, channels_last_3d=layout == "nlc",
                                        out_dtype=torch.float32)
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        assert (out.float() - ref).abs().max().item() <= tol * max(1.0, ref.abs().max().item())
        if layout == "channels_last":
            assert out.is_contiguous(memory_format=torch.channels_last)


def test_reference_backend_and_no_affine():
    x, _, _ = make_input((2, 32, 5, 3), "contiguous", torch.float32, "cpu", seed=1)
    a = ops.group_norm_silu(x, None, None, 8, backend="reference")
    t = ops.group_norm_silu(x, None, None, 8, backend="torch")
    assert torch.allclose(a, t, atol=1e-5)


def test_reference_is_independent_of_torch():
    """The reference must be able to disagree: a wrong group count gives a different answer."""
    x, w, b = make_input((1, 16, 4, 4), "contiguous", torch.float32, "cpu", seed=2)
    ref = group_norm_silu_reference(x, w, b, 4)
    assert not torch.allclose(ref, ops.group_norm_silu(x, w, b, 2, backend="torch"), atol=1e-3)
    assert torch.allclose(ref, ops.group_norm_silu(x, w, b, 4, backend="torch"), atol=1e-5)


def test_bad_inputs_raise_value_errors():
    x = torch.randn(2, 30, 4, 4)
    with pytest.raises(InvalidInputError, match="divisible"):
        ops.group_norm_silu(x, None, None, 4)
    with pytest.raises(InvalidInputError, match="weight"):
        ops.group_norm_silu(x, torch.ones(31), None, 3)
    with pytest.raises(InvalidInputError, match="num_groups"):
        ops.group_norm_silu(x, None, None, 0)
    with pytest.raises(InvalidInputError, match="unknown backend"):
        ops.group_norm_silu(x, None, None, 3, backend="tpu")


def test_explicit_gpu_backend_on_cpu_tensor_names_the_problem(monkeypatch):
    monkeypatch.delenv("LDM_ENGINE_BACKEND", raising=False)
    x = torch.randn(1, 32, 4, 4)
    with pytest.raises(BackendUnavailableError, match="cuda"):
        ops.group_norm_silu(x, None, None, 8, backend="cuda")


def test_env_backend_falls_back_to_torch_for_unsupported_input(monkeypatch):
    monkeypatch.setenv("LDM_ENGINE_BACKEND", "cuda")
    x = torch.randn(1, 32, 4, 4)  # CPU tensor: cuda cannot take it; the env choice is only a preference
    out = ops.group_norm_silu(x, None, None, 8)
    assert torch.allclose(out, ops.group_norm_silu(x, None, None, 8, backend="torch"))
    monkeypatch.setenv("LDM_ENGINE_BACKEND", "nonsense")
    with pytest.raises(InvalidInputError, match="LDM_ENGINE_BACKEND"):
        ops.group_norm_silu(x, None, None, 8)


class FakeGnExt:
    """Records what ops._cuda_backend hands ldm_engine._C (CPU tensors; nothing launches)."""

    def __init__(self, need_ws=0):
        self.seen, self.need_ws, self.size_calls = {}, need_ws, 0

    def group_norm_silu_workspace_size(self, x, num_groups, channels_last, *, dtype, sm_count):
        self.size_calls += 1
        self.seen.update(ws_x=x, ws_dtype=dtype, ws_sm_count=sm_count)
        return self.need_ws

    def group_norm_silu(self, x, w, b, y, ws, num_groups, eps, silu, channels_last, stream, device, *, dtype,
                        param_dtype, sm_count, check_pointers):
        self.seen.update(x=x, w=w, b=b, y=y, ws=ws, dtype=dtype, param_dtype=param_dtype, sm_count=sm_count,
                         check_pointers=check_pointers)


@pytest.fixture
def fake_gn_ext(monkeypatch):
    from ldm_engine.ops import _cuda_backend

    ext = FakeGnExt()
    monkeypatch.setattr(_cuda_backend, "extension", lambda: ext)
    monkeypatch.setattr(_cuda_backend, "_stream_and_device", lambda t: (0, 0))
    monkeypatch.setattr(_cuda_backend, "_sm_count", lambda device: 132)
    monkeypatch.setattr(_cuda_backend, "_gn_workspace", {})
    return ext


def test_cuda_backend_passes_tensors_without_grad(fake_gn_ext):
    """torch refuses __cuda_array_interface__ on tensors that require grad (nn.Parameter weights; a
    custom op receives them unchanged), so the cuda backend must hand _C detached tensors."""
    from ldm_engine.ops import _cuda_backend

    gn = torch.nn.GroupNorm(8, 32)  # weight and bias require grad
    x = torch.randn(1, 32, 4, 4, requires_grad=True)
    _cuda_backend.group_norm_silu(x, gn.weight, gn.bias, 8, 1e-5, True, False)
    for name in ("ws_x", "x", "w", "b", "y"):
        assert not fake_gn_ext.seen[name].requires_grad, name


@pytest.mark.parametrize("dtype,name", [(torch.float16, "float16"), (torch.bfloat16, "bfloat16"),
                                        (torch.float32, "float32")])
def test_cuda_backend_declares_dtypes_and_keeps_fp32_parameters(fake_gn_ext, dtype, name):
    """The dtype goes to _C by name (torch 2.5 / 2.6 report bf16's typestr as "<f2"); fp32 weight and
    bias reach the kernels as they are (no rounding to x's dtype, no cast, no allocation)."""
    from ldm_engine.ops import _cuda_backend

    x = torch.randn(2, 32, 3, 5).to(dtype)
    w, b = torch.rand(32) + 0.5, torch.randn(32)  # float32, as nn.GroupNorm keeps them under autocast
    _cuda_backend.group_norm_silu(x, w, b, 8, 1e-5, True, False)
    seen = fake_gn_ext.seen
    assert seen["dtype"] == seen["ws_dtype"] == name
    assert seen["param_dtype"] == "float32"
    assert seen["w"].data_ptr() == w.data_ptr() and seen["b"].data_ptr() == b.data_ptr()
    assert seen["sm_count"] == seen["ws_sm_count"] == 132
    assert seen["check_pointers"] is True  # CPU tensors: _C must query (and refuse) them
    # parameters in x's dtype pass unchanged too; a mixed pair or a third dtype becomes float32
    _cuda_backend.group_norm_silu(x, w.to(dtype), b.to(dtype), 8, 1e-5, True, False)
    assert seen["param_dtype"] == name and seen["w"].dtype == dtype
    _cuda_backend.group_norm_silu(x, w.double(), None, 8, 1e-5, True, False)
    assert seen["param_dtype"] == "float32" and seen["w"].dtype == torch.float32 and seen["b"] is None
    _cuda_backend.group_norm_silu(x, None, None, 8, 1e-5, True, False)
    assert seen["param_dtype"] == name and seen["w"] is None


def test_cuda_backend_caches_the_workspace_size(fake_gn_ext):
    from ldm_engine.ops import _cuda_backend

    x = torch.randn(1, 32, 4, 4, dtype=torch.float16)
    for _ in range(3):
        _cuda_backend.group_norm_silu(x, None, None, 8, 1e-5, True, False)
    assert fake_gn_ext.size_calls == 1
    _cuda_backend.group_norm_silu(torch.randn(1, 32, 4, 5, dtype=torch.float16), None, None, 8, 1e-5, True, False)
    assert fake_gn_ext.size_calls == 2


def test_default_is_torch_until_measured():
    # No GPU run of the triton / cuda backends is recorded yet (see _DEFAULT_ORDER in ldm_engine/ops).
    assert ops.default_backend_order("cpu") == ("torch",)
    assert ops.default_backend_order("cuda") == ("torch",)


# ------------------------------------------------------------------------------------------------
# Triton: interpreter on CPU (small shapes, every path), compiled on a GPU
# ------------------------------------------------------------------------------------------------
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"

# (shape as (N, C, *spatial), groups, layout, plan, n_splits, block_s)
TRITON_CASES = [
    ((2, 64, 5, 7), 8, "contiguous", "fused", None, None),
    ((2, 64, 5, 7), 8, "channels_last", "fused", None, None),
    ((2, 64, 35), 8, "nlc", "fused", None, None),
    ((1, 48, 9, 11), 4, "contiguous", "fused", None, None),       # cg = 12: padded channel block
    ((2, 32, 5, 7), 4, "contiguous", "split", 3, 8),              # 3 slices, ragged last block
    ((1, 16, 5, 7), 4, "channels_last", "split", 5, 4),
    ((2, 32, 35), 4, "nlc", "split", 4, 8),
    ((1, 40, 13, 3), 4, "contiguous", "split", None, None),       # default split heuristics
    ((2, 8, 6), 8, "contiguous", "split", 2, 4),                  # cg = 1, 3-D (N, C, L)
]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: f"{c[2]}-{c[3]}-{'x'.join(map(str, c[0]))}")
def test_triton_kernel_paths(case, dtype):
    from ldm_engine.kernels.group_norm_silu import group_norm_silu as triton_gn

    shape, groups, layout, plan, n_splits, block_s = case
    x, w, b = make_input(shape, layout, dtype, TRITON_DEVICE, seed=seed_of(case))
    # The interpreter converts fp32 -> bf16 by truncation (GPUs round to nearest): allow 1 more ulp.
    slack = 0.0
    # Without a weight the public op cannot tell (N, L, C) from (N, C, L): no-affine only for NC* layouts.
    variants = ((True, True), (False, True)) + (((True, False),) if layout != "nlc" else ())
    for silu, affine in variants:
        ww, bb = (w, b) if affine else (None, None)
        if INTERPRET and dtype == torch.bfloat16:
            ref = group_norm_silu_reference(x, ww, bb, groups, silu=silu, channels_last_3d=layout == "nlc",
                                            out_dtype=torch.float32)
            slack = ref.abs().max().item() * 2.0 ** -7
        out = triton_gn(x, ww, bb, groups, 1e-5, silu, layout == "nlc", plan=plan, n_splits=n_splits, block_s=block_s)
        assert_matches(out, x, ww, bb, groups, silu, layout, extra_atol=slack)


@needs_triton
def test_triton_channels_last_loads_are_vectorised():
    """Channels per group is a compile-time constant, so channels_last / (N, L, C) groups load 16 bytes
    at a time (sm_80 PTX, ahead of time, no GPU): 16 channels of fp16 per group -> ld.global.v4.b32."""
    loads, _ = run_triton_aot("--gn-loads", "16")
    assert "ld.global.v4.b32" in loads, loads


@needs_triton
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "nlc"])
def test_triton_backend_through_ops(layout):
    x, w, b = make_input((2, 32, 6, 5), layout, torch.float16, TRITON_DEVICE, seed=7)
    out = ops.group_norm_silu(x, w, b, 8, backend="triton")
    assert_matches(out, x, w, b, 8, True, layout)


@needs_triton
def test_triton_custom_op_opcheck_and_compile():
    """The registered op passes torch.library.opcheck and traces as one node under torch.compile."""
    x, w, b = make_input((1, 16, 3, 5), "channels_last", torch.float32, TRITON_DEVICE, seed=3)
    op = torch.ops.ldm_engine.group_norm_silu_triton.default
    torch.library.opcheck(op, (x, w, b, 4, 1e-5, True, False),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))

    def f(t):
        return ops.group_norm_silu(t, w, b, 4, backend="triton") * 2

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    assert torch.allclose(compiled(x), f(x), atol=1e-6)


# ------------------------------------------------------------------------------------------------
# GPU: the full SD shape grid, all backends
# ------------------------------------------------------------------------------------------------
GPU_CHANNELS = [320, 640, 1280, 512]
GPU_SPATIAL = [(8, 8), (16, 16), (32, 32), (64, 64), (128, 128), (97, 63)]


def _gpu_backends():
    return [pytest.param(name, marks=[pytest.mark.cuda, needs_cuda]) for name in ("torch", "triton", "cuda")]


@pytest.mark.parametrize("backend", _gpu_backends())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "nlc"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("hw", GPU_SPATIAL, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("channels", GPU_CHANNELS)
def test_gpu_backend_matches_reference(backend, dtype, layout, batch, hw, channels):
    if backend == "triton" and not HAS_TRITON:
        pytest.skip("triton is not installed")
    x, w, b = make_input((batch, channels, *hw), layout, dtype, "cuda", seed=seed_of((channels, hw, batch, layout)))
    silu = (channels + hw[0] + batch) % 3 != 0  # silu off on a third of the grid
    poison_allocator(x)
    out = ops.group_norm_silu(x, w, b, 32, silu=silu, backend=backend)
    assert_matches(out, x, w, b, 32, silu, layout)


@pytest.mark.cuda
@needs_cuda
def test_gpu_triton_split_apply_grid_beyond_65535_blocks():
    """The apply kernel's (group, spatial block) grid is 1-D: more than 65535 spatial blocks work."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    from ldm_engine.kernels.group_norm_silu import group_norm_silu as triton_gn

    x, w, b = make_input((1, 2, 70_000 * 16), "contiguous", torch.float16, "cuda", seed=5)
    out = triton_gn(x, w, b, 2, 1e-5, True, False, plan="split", block_s=16)
    assert_matches(out, x, w, b, 2, True, "contiguous")
