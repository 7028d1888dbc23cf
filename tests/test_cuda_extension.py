"""ldm_engine._C: import, device_info without a GPU, and the binding's input checks.

The checks must reject bad inputs with a Python error naming the problem before any launch. Most are
exercised without a GPU through fake objects exposing a __cuda_array_interface__ dict with a fake
pointer: a check that let them through would reach the device query (RuntimeError / ValueError
about the pointer) or, on a GPU, a launch on garbage.
"""

import pytest
import torch

from ldm_engine._cuda import device_info, extension

_C = extension()
pytestmark = pytest.mark.skipif(_C is None, reason="ldm_engine._C is not built (no nvcc at install time)")
HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (torch.cuda.is_available() is False)")

FAKE_PTR = 0x7F0000000000  # 16-byte aligned, never dereferenced
STREAM, DEVICE = 0, 0


class FakeArray:
    """An object exposing __cuda_array_interface__ (v2); strides in elements, converted to bytes."""

    def __init__(self, shape, typestr="<f2", strides=None, ptr=FAKE_PTR, readonly=False):
        itemsize = int(typestr[2:])
        self.__cuda_array_interface__ = {
            "shape": tuple(shape), "typestr": typestr, "version": 2, "data": (ptr, readonly),
            "strides": None if strides is None else tuple(s * itemsize for s in strides),
        }


def channels_last_strides(n, c, h, w):
    return (h * w * c, 1, w * c, c)


# A pointer check that cannot succeed here: no driver (RuntimeError) or, on a GPU, the fake pointer
# is not device memory (ValueError). Either way the call was refused before a launch.
REFUSED_AT_POINTER = (RuntimeError, ValueError)


def test_module_imports_and_lists_ops():
    for name in ("device_info", "group_norm_silu", "group_norm_silu_workspace_size", "attention", "attention_plan"):
        assert hasattr(_C, name), name


def test_device_info_without_or_with_gpu():
    info = device_info()
    assert info["extension"] is True
    assert info["built_for_archs"]
    assert isinstance(info["devices"], list)
    if HAS_CUDA:
        assert info["device_count"] >= 1 and info["devices"][0]["compute_capability"][0] >= 7
    else:
        assert info["device_count"] == 0
        assert info["error"]  # says why (no driver / no device)


# ------------------------------------------------------------------------------------------------
# GroupNorm binding
# ------------------------------------------------------------------------------------------------

TYPESTR_DTYPE = {"<f2": "float16", "<V2": "bfloat16", "<f4": "float32"}


def dtype_of(arr) -> str:
    return TYPESTR_DTYPE.get(arr.__cuda_array_interface__["typestr"], "float16") if hasattr(
        arr, "__cuda_array_interface__") else "float16"


def gn(x, y=None, weight=None, bias=None, workspace=None, groups=32, eps=1e-5, channels_last=False, dtype=None,
       param_dtype=None, sm_count=0):
    y = x if y is None else y
    dtype = dtype or dtype_of(x)
    param_dtype = param_dtype or (dtype_of(weight) if weight is not None else dtype)
    return _C.group_norm_silu(x, weight, bias, y, workspace, groups, eps, True, channels_last, STREAM, DEVICE,
                              dtype=dtype, param_dtype=param_dtype, sm_count=sm_count)


def ws_size(x, groups, channels_last, dtype=None, sm_count=0):
    return _C.group_norm_silu_workspace_size(x, groups, channels_last, dtype=dtype or dtype_of(x), sm_count=sm_count)


def test_gn_rejects_objects_without_cuda_array_interface():
    with pytest.raises(TypeError, match="__cuda_array_interface__"):
        gn(object())
    with pytest.raises(TypeError, match="CPU"):
        gn(torch.randn(1, 32, 4, 4))
    with pytest.raises(TypeError, match="y"):
        _C.group_norm_silu(FakeArray((1, 32, 4, 4)), None, None, None, None, 32, 1e-5, True, False, 0, 0,
                           dtype="float16", param_dtype="float16")


def test_gn_rejects_bad_dtype_and_mismatches():
    with pytest.raises(TypeError, match="<f8"):
        gn(FakeArray((1, 32, 4, 4), typestr="<f8"))
    with pytest.raises(TypeError, match="dtype"):
        gn(FakeArray((1, 32, 4, 4)), y=FakeArray((1, 32, 4, 4), typestr="<f4"))
    with pytest.raises(TypeError, match="weight"):  # declared float16 parameters, typestr float32
        gn(FakeArray((1, 32, 4, 4)), weight=FakeArray((32,), typestr="<f4"), param_dtype="float16")
    with pytest.raises(TypeError, match="weight.*neither"):  # bf16 parameters for fp16 x
        gn(FakeArray((1, 32, 4, 4)), weight=FakeArray((32,), typestr="<V2"), param_dtype="bfloat16")


def test_gn_rejects_bad_shapes():
    with pytest.raises(ValueError, match="shape"):
        gn(FakeArray((32,)))
    with pytest.raises(ValueError, match="divisible"):
        gn(FakeArray((1, 30, 4, 4)))
    with pytest.raises(ValueError, match="y: shape"):
        gn(FakeArray((1, 32, 4, 4)), y=FakeArray((1, 32, 4, 5)))
    with pytest.raises(ValueError, match="weight"):
        gn(FakeArray((1, 32, 4, 4)), weight=FakeArray((31,)))
    with pytest.raises(ValueError, match="channels_last"):
        gn(FakeArray((1, 32, 2, 2, 2)), channels_last=True)
    with pytest.raises(ValueError, match="num_groups"):
        gn(FakeArray((1, 32, 4, 4)), groups=0)
    with pytest.raises(ValueError, match="eps"):
        gn(FakeArray((1, 32, 4, 4)), eps=float("nan"))


def test_gn_rejects_bad_strides_and_alignment():
    # A transposed (non-dense) view is neither contiguous nor channels_last.
    with pytest.raises(ValueError, match="strides"):
        gn(FakeArray((1, 32, 4, 4), strides=(512, 1, 4, 128)))
    # channels_last strides passed without channels_last=True (and vice versa)
    with pytest.raises(ValueError, match="contiguous"):
        gn(FakeArray((2, 32, 4, 4), strides=channels_last_strides(2, 32, 4, 4)))
    with pytest.raises(ValueError, match="channels_last"):
        gn(FakeArray((2, 32, 4, 4)), channels_last=True)
    with pytest.raises(ValueError, match="aligned"):
        gn(FakeArray((1, 32, 4, 4), ptr=FAKE_PTR + 1))
    with pytest.raises(ValueError, match="contiguous"):
        gn(FakeArray((1, 32, 4, 4)), weight=FakeArray((32,), strides=(2,)))


def test_gn_workspace_size_and_checks():
    small = FakeArray((1, 320, 8, 8))  # fused plan: one CTA per group
    assert ws_size(small, 32, False) == 0
    big = FakeArray((1, 128, 512, 512))  # split plan (VAE decoder at 512 px)
    need = ws_size(big, 32, False)
    assert need > 0
    cl = FakeArray((1, 128, 512, 512), strides=channels_last_strides(1, 128, 512, 512))
    assert ws_size(cl, 32, True) > 0
    with pytest.raises(ValueError, match="workspace"):
        gn(big)
    with pytest.raises(ValueError, match="required"):
        gn(big, workspace=FakeArray((need - 1,), typestr="<f4"))
    with pytest.raises(TypeError, match="float32"):
        gn(big, workspace=FakeArray((need,), typestr="<f2"))
    with pytest.raises(ValueError, match="read-only"):
        gn(small, y=FakeArray((1, 320, 8, 8), readonly=True))


@pytest.mark.parametrize("shape,channels_last", [((1, 0, 3, 3), False), ((0, 32, 3, 3), False),
                                                   ((1, 32, 0, 5), False), ((2, 0, 64), True), ((1, 32, 3, 0), True)])
def test_gn_zero_size_needs_no_workspace_and_does_not_crash(shape, channels_last):
    # Zero-size arrays once reached ceil_div(0, 0) in group_norm_plan: SIGFPE, the interpreter died.
    strides = channels_last_strides(*shape) if channels_last and len(shape) == 4 else None
    x = FakeArray(shape, strides=strides, ptr=0)  # torch reports pointer 0 for empty tensors
    assert ws_size(x, 32, channels_last, sm_count=132) == 0
    try:  # nothing to launch: returns on a GPU; here only the device guard can fail (no driver)
        gn(x, groups=32, channels_last=channels_last, sm_count=132)
    except RuntimeError:
        assert not HAS_CUDA


@pytest.mark.parametrize("typestr", ["<f2", "<V2", "<f4"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "nlc"])
def test_gn_valid_fake_input_is_refused_only_at_the_pointer_check(typestr, layout):
    if layout == "channels_last":
        x = FakeArray((2, 64, 5, 7), typestr=typestr, strides=channels_last_strides(2, 64, 5, 7))
    elif layout == "nlc":
        x = FakeArray((2, 35, 64), typestr=typestr)
    else:
        x = FakeArray((2, 64, 5, 7), typestr=typestr)
    ws = FakeArray((1 << 20,), typestr="<f4")
    w = FakeArray((64,), typestr=typestr)
    with pytest.raises(REFUSED_AT_POINTER, match="pointer|memory"):
        gn(x, y=x, weight=w, bias=w, workspace=ws, groups=8, channels_last=layout != "contiguous")


# The dtype is declared by the caller, never inferred from the typestr alone: torch 2.5 / 2.6 report
# bfloat16 as "<f2" (float16's typestr), later versions as "<V2". Agreeing pairs pass every check up to
# the pointer query; any other pair is refused with a TypeError naming both.
AGREES = {("float16", "<f2"), ("bfloat16", "<V2"), ("bfloat16", "<f2"), ("float32", "<f4")}


@pytest.mark.parametrize("typestr", ["<f2", "<V2", "<f4"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_gn_declared_dtype_must_agree_with_typestr(dtype, typestr):
    x = FakeArray((2, 64, 5, 7), typestr=typestr)
    ws = FakeArray((1 << 20,), typestr="<f4")
    if (dtype, typestr) in AGREES:
        with pytest.raises(REFUSED_AT_POINTER, match="pointer|memory"):
            gn(x, workspace=ws, groups=8, dtype=dtype)
        assert ws_size(x, 8, False, dtype=dtype) >= 0
    else:
        with pytest.raises(TypeError, match=f"typestr '{typestr}' disagrees with the declared dtype {dtype}"):
            gn(x, workspace=ws, groups=8, dtype=dtype)
        with pytest.raises(TypeError, match="disagrees"):
            ws_size(x, 8, False, dtype=dtype)


def test_gn_dtype_names_are_checked():
    x = FakeArray((2, 64, 5, 7))
    with pytest.raises(TypeError, match="unknown dtype 'torch.float16'"):
        gn(x, groups=8, dtype="torch.float16")
    with pytest.raises(TypeError, match="weight/bias: unknown dtype"):
        gn(x, groups=8, param_dtype="half")
    with pytest.raises(TypeError):  # dtype is a required keyword
        _C.group_norm_silu(x, None, None, x, None, 8, 1e-5, True, False, 0, 0)


@pytest.mark.parametrize("typestr", ["<f2", "<V2"])
def test_gn_takes_float32_parameters_for_16_bit_x(typestr):
    x = FakeArray((2, 64, 5, 7), typestr=typestr)
    w = FakeArray((64,), typestr="<f4")
    ws = FakeArray((1 << 20,), typestr="<f4")
    dtype = TYPESTR_DTYPE[typestr]
    with pytest.raises(REFUSED_AT_POINTER, match="pointer|memory"):
        gn(x, weight=w, bias=w, workspace=ws, groups=8, dtype=dtype, param_dtype="float32")
    with pytest.raises(TypeError, match="weight: typestr '<f4' disagrees"):
        gn(x, weight=w, bias=w, workspace=ws, groups=8, dtype=dtype, param_dtype=dtype)


def test_gn_small_batch_takes_the_split_plan():
    """n * groups below the SM count -> the split plan (workspace) where a group is big enough to split."""
    x = FakeArray((1, 320, 64, 64))  # 32 groups of 40960 elements: fused when the SM count is unknown
    assert ws_size(x, 32, False, sm_count=0) == 0
    assert ws_size(x, 32, False, sm_count=32) == 0  # n * groups == SMs: fused
    assert ws_size(x, 32, False, sm_count=132) > 0
    assert ws_size(FakeArray((8, 320, 64, 64)), 32, False, sm_count=132) == 0  # 256 CTAs: fused
    assert ws_size(FakeArray((1, 1280, 8, 8)), 32, False, sm_count=132) == 0  # 2560-element groups: fused
    with pytest.raises(ValueError, match="sm_count"):
        gn(x, groups=32, sm_count=-1)


# ------------------------------------------------------------------------------------------------
# Attention binding
# ------------------------------------------------------------------------------------------------

def attn(q, k=None, v=None, o=None, workspace=None, scale=0.125, splits=1, dtype=None):
    k = q if k is None else k
    v = k if v is None else v
    o = q if o is None else o
    return _C.attention(q, k, v, o, workspace, scale, splits, STREAM, DEVICE, dtype=dtype or dtype_of(q))


def test_attention_rejects_non_arrays_and_dtypes():
    with pytest.raises(TypeError, match="q"):
        attn(object())
    with pytest.raises(TypeError, match="CPU"):
        attn(torch.randn(1, 1, 8, 64))
    with pytest.raises(TypeError, match="float32"):
        attn(FakeArray((1, 1, 8, 64), typestr="<f4"))
    with pytest.raises(TypeError, match="dtype"):
        attn(FakeArray((1, 1, 8, 64)), k=FakeArray((1, 1, 8, 64), typestr="<V2"))
    with pytest.raises(TypeError, match="<i8"):
        attn(FakeArray((1, 1, 8, 64), typestr="<i8"))


def test_attention_rejects_bad_shapes():
    q = FakeArray((2, 4, 77, 64))
    with pytest.raises(ValueError, match="4-D"):
        attn(FakeArray((4, 77, 64)))
    with pytest.raises(ValueError, match="head dim 96"):
        attn(FakeArray((1, 1, 8, 96)))
    with pytest.raises(ValueError, match="k: shape"):
        attn(q, k=FakeArray((2, 3, 77, 64)))
    with pytest.raises(ValueError, match="v: shape"):
        attn(q, k=FakeArray((2, 4, 10, 64)), v=FakeArray((2, 4, 11, 64)))
    with pytest.raises(ValueError, match="o: shape"):
        attn(q, o=FakeArray((2, 4, 76, 64)))
    with pytest.raises(ValueError, match="lengths"):
        attn(q, k=FakeArray((2, 4, 0, 64)))
    with pytest.raises(ValueError, match="65535"):
        attn(FakeArray((300, 300, 8, 64)))


def test_attention_rejects_bad_strides_alignment_and_arguments():
    with pytest.raises(ValueError, match="contiguous"):
        attn(FakeArray((1, 2, 8, 64), strides=(1024, 512, 1, 8)))  # head dim not contiguous
    with pytest.raises(ValueError, match="16 bytes"):
        attn(FakeArray((1, 2, 8, 40), strides=(2 * 8 * 44, 8 * 44, 44, 1)))  # row stride 88 bytes
    with pytest.raises(ValueError, match="16-byte"):
        attn(FakeArray((1, 2, 8, 64), ptr=FAKE_PTR + 8))
    with pytest.raises(ValueError, match="scale"):
        attn(FakeArray((1, 2, 8, 64)), scale=0.0)
    with pytest.raises(ValueError, match="num_splits"):
        attn(FakeArray((1, 2, 8, 64)), splits=0)
    with pytest.raises(ValueError, match="workspace"):
        attn(FakeArray((1, 2, 8, 64)), splits=2)
    with pytest.raises(ValueError, match="required"):
        attn(FakeArray((1, 2, 8, 64)), splits=2, workspace=FakeArray((10,), typestr="<f4"))
    with pytest.raises(ValueError, match="read-only"):
        attn(FakeArray((1, 2, 8, 64)), o=FakeArray((1, 2, 8, 64), readonly=True))


@pytest.mark.parametrize("d", [40, 64, 80, 128, 160, 512])
@pytest.mark.parametrize("typestr", ["<f2", "<V2"])
def test_attention_valid_fake_input_is_refused_only_at_the_pointer_check(d, typestr):
    # (B, L, H, D) storage viewed as (B, H, L, D), as the models pass it.
    b, h, l = 2, 3, 77
    q = FakeArray((b, h, l, d), typestr=typestr, strides=(l * h * d, d, h * d, 1))
    with pytest.raises(REFUSED_AT_POINTER, match="pointer|memory"):
        attn(q)


@pytest.mark.parametrize("typestr", ["<f2", "<V2", "<f4"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_attention_declared_dtype_must_agree_with_typestr(dtype, typestr):
    q = FakeArray((1, 2, 8, 64), typestr=typestr)
    if (dtype, typestr) in AGREES:
        with pytest.raises(REFUSED_AT_POINTER, match="pointer|memory"):
            attn(q, dtype=dtype)
    else:
        with pytest.raises(TypeError, match=f"q: typestr '{typestr}' disagrees with the declared dtype {dtype}"):
            attn(q, dtype=dtype)
        with pytest.raises(TypeError, match="disagrees"):
            _C.attention_plan(q, q, 0, dtype=dtype)
    with pytest.raises(TypeError, match="float32 is not supported"):
        attn(FakeArray((1, 2, 8, 64), typestr="<f4"), dtype="float32")
    with pytest.raises(TypeError, match="unknown dtype"):
        attn(q, dtype="bf16")


# ------------------------------------------------------------------------------------------------
# On a GPU: streams, graph capture, real tensors through the binding
# ------------------------------------------------------------------------------------------------

@pytest.mark.cuda
@needs_cuda
def test_gpu_ops_run_on_a_side_stream_and_in_a_cuda_graph():
    import ldm_engine.ops as ops
    from ldm_engine.ops.reference import attention_reference, group_norm_silu_reference

    x = torch.randn(2, 320, 64, 64, device="cuda", dtype=torch.float16)
    w = torch.randn(320, device="cuda", dtype=torch.float16)
    q = torch.randn(2, 5, 4096, 64, device="cuda", dtype=torch.float16)
    kv = torch.randn(2, 5, 77, 64, device="cuda", dtype=torch.float16)

    def run():
        return (ops.group_norm_silu(x, w, w, 32, backend="cuda"), ops.attention(q, kv, kv, backend="cuda"))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm-up (plans, lazy loading) outside the capture
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y, o = run()
    x.normal_()
    q.normal_()
    graph.replay()
    torch.cuda.synchronize()
    ref_y = group_norm_silu_reference(x, w, w, 32, out_dtype=torch.float32)
    ref_o = attention_reference(q, kv, kv, out_dtype=torch.float32)
    assert (y.float() - ref_y).abs().max().item() < 2e-2
    assert (o.float() - ref_o).abs().max().item() < 1e-2


@pytest.mark.cuda
@needs_cuda
def test_gpu_binding_rejects_host_pointer_and_wrong_device():
    x = torch.randn(1, 32, 4, 4, device="cuda", dtype=torch.float16)
    host = FakeArray((1, 32, 4, 4), ptr=torch.empty(512, dtype=torch.float16).pin_memory().data_ptr())
    kw = dict(dtype="float16", param_dtype="float16")
    with pytest.raises(ValueError, match="device memory|pointer"):
        _C.group_norm_silu(host, None, None, x, None, 8, 1e-5, True, False, 0, x.device.index, **kw)
    if torch.cuda.device_count() > 1:
        with pytest.raises(ValueError, match="cuda:"):
            _C.group_norm_silu(x, None, None, x, None, 8, 1e-5, True, False, 0, x.device.index + 1, **kw)


# ------------------------------------------------------------------------------------------------
# Build facts CI checks without a GPU: registers / spills per kernel, embedded PTX
# ------------------------------------------------------------------------------------------------

def _tools():
    import importlib.util as iu
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / "ptxas_report.py"
    spec = iu.spec_from_file_location("ptxas_report", path)
    mod = iu.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_ptxas_registers_and_spills():
    """Every kernel instantiation compiles for sm_80 without register spills; the attention configs
    built with __launch_bounds__(256, 2) (head dims <= 80) stay within 128 registers; and the table
    matches benchmarks/results/ptxas-kernels.md (regenerate it with `python tools/ptxas_report.py
    --write` after a kernel change, so that the diff shows register changes). ~15 s on 2 cores."""
    report = _tools()
    nvcc = report.nvcc_path()
    if nvcc is None:
        pytest.skip("nvcc not found")
    rows = report.compile_report(archs=("80",), nvcc=nvcc)
    assert len(rows) >= 50, "expected every instantiation of both .cu files"
    spills = [r for r in rows if r["spill_stores"] or r["spill_loads"] or r["stack"]]
    assert not spills, f"register spills / stack frames: {spills}"
    for r in rows:
        if "attn_fwd_kernel" in r["kernel"] and ", 2>>" in r["kernel"]:  # AttnCfg<..., MINB = 2>
            assert r["registers"] <= 128, r
    version, committed = report.read_table()
    if version != report.nvcc_version(nvcc):
        pytest.skip(f"committed table is for nvcc {version}; this is nvcc {report.nvcc_version(nvcc)}")
    mine = {(r["arch"], r["source"], r["kernel"]): r["registers"] for r in rows}
    theirs = {(r["arch"], r["source"], r["kernel"]): r["registers"] for r in committed if r["arch"] == "sm_80"}
    assert mine == theirs, ("ptxas registers differ from benchmarks/results/ptxas-kernels.md; rerun "
                            "`python tools/ptxas_report.py --write` and commit the table")


def test_extension_embeds_compute_90_ptx():
    """GPUs newer than the newest SASS in the build JIT-compile embedded PTX ("no kernel image" otherwise)."""
    import shutil
    import subprocess

    cuobjdump = shutil.which("cuobjdump")
    if cuobjdump is None:  # not in every toolkit install; Triton ships one
        try:
            import triton.backends.nvidia as tn
            from pathlib import Path

            candidate = Path(tn.__file__).parent / "bin" / "cuobjdump"
            cuobjdump = str(candidate) if candidate.exists() else None
        except ImportError:
            pass
    if cuobjdump is None:
        pytest.skip("cuobjdump not found")
    info = device_info()
    archs = [int(a) for a in info["built_for_archs"].replace(",", ";").split(";") if a.strip().isdigit()]
    if not archs:
        pytest.skip(f"unknown build architectures {info['built_for_archs']!r}")
    out = subprocess.run([cuobjdump, "--list-ptx", _C.__file__], capture_output=True, text=True)
    assert f"sm_{max(archs)}" in out.stdout + out.stderr, out.stdout + out.stderr
