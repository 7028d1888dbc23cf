"""Benchmarks of ldm_engine.ops (group_norm_silu, attention): every backend against torch eager; and the
VAE decoder's upsample convs (nearest 2x + 3x3 conv) plain against sub-pixel (Upsample2D.subpixel).

Script mode (prints one table per op; writes JSON with --json):

    python benchmarks/bench_ops.py                      # all shapes, fp16, backends torch/triton/cuda
    python benchmarks/bench_ops.py --op attention --dtype bf16 --json benchmarks/results/h100_attn.json

pytest-benchmark mode (a few representative shapes):

    pytest benchmarks/bench_ops.py --benchmark-only

Shapes are those of the SD-Turbo U-Net and VAE decoder at 512 px (batch 1, no guidance) and of
SDXL at 1024 px; SD1.5's head dims (40/80/160) are listed as well. Times are device times of CUDA-
graph replays (many calls per graph, rotating among input copies that together exceed L2, so
small tensors are not timed out of cache), median over repeats. Ceilings are measured in the same
run: device-to-device copy bandwidth (bytes read + written) and the bf16 matmul rate (8192^3).
GroupNorm moves 2 * numel * itemsize bytes (one read, one write); attention does 4 * B * H * Lq * Lk * D
FLOPs. Upsample rows (fp16 unless --dtype says otherwise, contiguous and channels_last): "plain" is
F.interpolate + 3x3 conv, "subpixel" the module's sub-pixel path with its phase weights derived inside
the graph (as in the engine's CUDA graphs), "subpixel-cached" the same from precomputed phase weights
(as eager calls run); TFLOP/s counts the plain path's 2 * 9 * C^2 * 4HW FLOPs for all three (an effective
rate). Skips cleanly without CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from dataclasses import dataclass, field

import pytest
import torch

# ------------------------------------------------------------------------------------------------
# Shapes
# ------------------------------------------------------------------------------------------------
# GroupNorm: (label, (N, C, H, W)); 32 groups everywhere.
GN_SHAPES = [
    ("sd-turbo unet 64x64 c320", (1, 320, 64, 64)),
    ("sd-turbo unet 64x64 c960 (up)", (1, 960, 64, 64)),
    ("sd-turbo unet 32x32 c640", (1, 640, 32, 32)),
    ("sd-turbo unet 16x16 c1280", (1, 1280, 16, 16)),
    ("sd-turbo unet 8x8 c1280", (1, 1280, 8, 8)),
    ("sd-turbo unet 8x8 c2560 (up)", (1, 2560, 8, 8)),
    ("vae dec 512px 64x64 c512", (1, 512, 64, 64)),
    ("vae dec 512px 128x128 c512", (1, 512, 128, 128)),
    ("vae dec 512px 256x256 c512", (1, 512, 256, 256)),
    ("vae dec 512px 256x256 c256", (1, 256, 256, 256)),
    ("vae dec 512px 512x512 c256", (1, 256, 512, 512)),
    ("vae dec 512px 512x512 c128", (1, 128, 512, 512)),
    ("sdxl unet 128x128 c320", (1, 320, 128, 128)),
    ("sdxl unet 64x64 c640", (1, 640, 64, 64)),
    ("sdxl unet 32x32 c1280", (1, 1280, 32, 32)),
    ("sdxl vae dec 1024px 256x256 c512", (1, 512, 256, 256)),
    ("sdxl vae dec 1024px 512x512 c512", (1, 512, 512, 512)),
    ("sdxl vae dec 1024px 1024x1024 c128", (1, 128, 1024, 1024)),
]

# Attention: (label, B, H, Lq, Lk, D)
ATTN_SHAPES = [
    ("sd-turbo self 64x64", 1, 5, 4096, 4096, 64),
    ("sd-turbo self 32x32", 1, 10, 1024, 1024, 64),
    ("sd-turbo self 16x16", 1, 20, 256, 256, 64),
    ("sd-turbo self 8x8", 1, 20, 64, 64, 64),
    ("sd-turbo cross 64x64", 1, 5, 4096, 77, 64),
    ("sd-turbo cross 32x32", 1, 10, 1024, 77, 64),
    ("sd-turbo cross 16x16", 1, 20, 256, 77, 64),
    ("sd1.5 self 64x64 d40", 1, 8, 4096, 4096, 40),
    ("sd1.5 self 32x32 d80", 1, 8, 1024, 1024, 80),
    ("sd1.5 self 16x16 d160", 1, 8, 256, 256, 160),
    ("sd1.5 cross 64x64 d40", 1, 8, 4096, 77, 40),
    ("vae mid 512px d512", 1, 1, 4096, 4096, 512),
    ("sdxl self 64x64", 1, 10, 4096, 4096, 64),
    ("sdxl self 32x32", 1, 20, 1024, 1024, 64),
    ("sdxl cross 64x64", 1, 10, 4096, 77, 64),
    ("sdxl cross 32x32", 1, 20, 1024, 77, 64),
    ("sdxl vae mid 1024px d512", 1, 1, 16384, 16384, 512),
]

# Upsample2D (nearest 2x + 3x3 conv): (label, (N, C, H, W) input) of the SD VAE decoder at 512 px.
UPSAMPLE_SHAPES = [
    ("vae dec 512px c512 64->128", (1, 512, 64, 64)),
    ("vae dec 512px c512 128->256", (1, 512, 128, 128)),
    ("vae dec 512px c256 256->512", (1, 256, 256, 256)),
]
UPSAMPLE_PATHS = ("plain", "subpixel", "subpixel-cached")

BACKENDS = ("torch", "triton", "cuda")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
L2_FLUSH_BYTES = 256 << 20  # input copies cycled per graph add up to at least this


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------
def time_graph(run, n_inputs: int, calls_per_graph: int = 20, repeats: int = 15) -> float:
    """Median device microseconds per call of run(i), i cycling over n_inputs, via CUDA-graph replay.

    Falls back to event timing of eager calls when capture fails (reported the same way)."""
    for i in range(max(n_inputs, 2)):  # warm-up: autotuning, plans, lazy module loading
        run(i % n_inputs)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph = None
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run(0)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for j in range(calls_per_graph):
                run(j % n_inputs)
        graph.replay()
        torch.cuda.synchronize()
    except Exception:  # noqa: BLE001 -- not capturable: time eagerly
        graph = None
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start.record()
        if graph is not None:
            graph.replay()
        else:
            for j in range(calls_per_graph):
                run(j % n_inputs)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0 / calls_per_graph)
    return statistics.median(times)


def measure_ceilings() -> dict:
    """Device-to-device copy bandwidth (GB/s, read + write) and bf16 matmul rate (TFLOP/s)."""
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    copy_us = time_graph(lambda i: dst.copy_(src), 1, calls_per_graph=5, repeats=10)
    del src, dst
    m = 8192
    a = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    mm_us = time_graph(lambda i: torch.matmul(a, b), 1, calls_per_graph=5, repeats=10)
    return {"copy_gbps": 2 * n / copy_us / 1e3, "bf16_matmul_tflops": 2 * m ** 3 / mm_us / 1e6}


# ------------------------------------------------------------------------------------------------
# Runs
# ------------------------------------------------------------------------------------------------
@dataclass
class Row:
    op: str
    label: str
    shape: tuple
    backend: str
    us: float | None = None
    rate: float | None = None  # GB/s (group norm) or TFLOP/s (attention)
    pct_ceiling: float | None = None
    speedup_vs_torch: float | None = None
    max_err_vs_torch: float | None = None
    error: str | None = field(default=None)


def _n_copies(bytes_per_set: int) -> int:
    return max(1, min(16, -(-L2_FLUSH_BYTES // max(bytes_per_set, 1))))


def _measure(row: Row, run, copies: int, base: dict, *, is_base: bool, work: float, per_us: float, ceiling: float,
             calls_per_graph: int = 20) -> Row:
    """Fills ``row`` from run(i): the error against the base row's output, the median device us, the rate
    (work / us / per_us), % of ``ceiling`` and the speedup over the base row; ``is_base`` rows set
    ``base``. A failure is recorded in the row."""
    try:
        out = run(0)
        if is_base:
            base["out"] = out.float()
        elif base.get("out") is not None:
            row.max_err_vs_torch = (out.float() - base["out"]).abs().max().item()
        row.us = time_graph(run, copies, calls_per_graph=calls_per_graph)
        row.rate = work / row.us / per_us
        row.pct_ceiling = 100 * row.rate / ceiling
        if is_base:
            base["us"] = row.us
        if base.get("us"):
            row.speedup_vs_torch = base["us"] / row.us
    except Exception as exc:  # noqa: BLE001 -- report, keep going
        row.error = f"{type(exc).__name__}: {exc}"[:160]
    return row


def bench_group_norm(dtype, backends, ceilings, shapes=GN_SHAPES, layout="contiguous"):
    import ldm_engine.ops as ops

    rows = []
    for label, shape in shapes:
        n, c = shape[:2]
        nbytes = 2 * torch.Size(shape).numel() * torch.tensor([], dtype=dtype).element_size()
        copies = _n_copies(nbytes // 2)
        xs = [torch.randn(shape, device="cuda", dtype=dtype) for _ in range(copies)]
        if layout == "channels_last":
            xs = [x.contiguous(memory_format=torch.channels_last) for x in xs]
        w = torch.randn(c, device="cuda", dtype=dtype)
        b = torch.randn(c, device="cuda", dtype=dtype)
        base = {}
        for backend in backends:
            rows.append(_measure(Row("group_norm_silu", label, shape, backend),
                                 lambda i: ops.group_norm_silu(xs[i], w, b, 32, backend=backend), copies, base,
                                 is_base=backend == "torch", work=nbytes, per_us=1e3, ceiling=ceilings["copy_gbps"]))
        del xs
        torch.cuda.empty_cache()
    return rows


def bench_attention(dtype, backends, ceilings, shapes=ATTN_SHAPES):
    import ldm_engine.ops as ops

    rows = []
    for label, b, h, lq, lk, d in shapes:
        flops = 4 * b * h * lq * lk * d
        set_bytes = (b * h * (lq + 2 * lk) * d) * torch.tensor([], dtype=dtype).element_size()
        copies = _n_copies(set_bytes)
        # (B, L, H, D) storage seen as (B, H, L, D): what the models pass.
        sets = [tuple(torch.randn(b, length, h, d, device="cuda", dtype=dtype).transpose(1, 2)
                      for length in (lq, lk, lk)) for _ in range(copies)]
        base = {}
        for backend in backends:
            rows.append(_measure(Row("attention", label, (b, h, lq, lk, d), backend),
                                 lambda i: ops.attention(*sets[i], backend=backend), copies, base,
                                 is_base=backend == "torch", work=flops, per_us=1e6,
                                 ceiling=ceilings["bf16_matmul_tflops"], calls_per_graph=10 if flops > 1e11 else 20))
        del sets
        torch.cuda.empty_cache()
    return rows


def bench_upsample(dtype, ceilings, shapes=UPSAMPLE_SHAPES):
    """Plain vs sub-pixel Upsample2D per shape and layout; "x torch" is the speedup over "plain"."""
    from ldm_engine.models.layers import Upsample2D, set_subpixel_upsample, subpixel_conv, subpixel_weights

    rows = []
    for label, shape in shapes:
        n, c, h, w = shape
        flops = 2 * 9 * c * c * 4 * h * w * n
        for layout in ("contiguous", "channels_last"):
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            up = Upsample2D(c).to("cuda", dtype).to(memory_format=fmt).eval()
            copies = _n_copies(n * c * h * w * 5 * torch.tensor([], dtype=dtype).element_size())  # in + 4x out
            xs = [torch.randn(shape, device="cuda", dtype=dtype).contiguous(memory_format=fmt) for _ in range(copies)]
            phase_w, phase_b = subpixel_weights(up.conv.weight, up.conv.bias)
            runs = {"plain": lambda i: up(xs[i]), "subpixel": lambda i: up(xs[i]),
                    "subpixel-cached": lambda i: subpixel_conv(xs[i], phase_w, phase_b)}
            base = {}
            for path in UPSAMPLE_PATHS:
                set_subpixel_upsample(up, path == "subpixel")
                with torch.no_grad():
                    rows.append(_measure(Row("upsample_conv", f"{label} {layout}", shape, path), runs[path], copies,
                                         base, is_base=path == "plain", work=flops, per_us=1e6,
                                         ceiling=ceilings["bf16_matmul_tflops"], calls_per_graph=10))
            del xs, up
            torch.cuda.empty_cache()
    return rows


def print_table(rows, unit):
    head = f"{'shape':42s} {'backend':15s} {'median us':>10s} {unit:>9s} {'% ceil':>7s} {'x torch':>8s} {'err':>9s}"
    print(head)
    print("-" * len(head))
    last = None
    for r in rows:
        label = r.label if r.label != last else ""
        last = r.label
        if r.error:
            print(f"{label:42s} {r.backend:15s} {r.error}")
            continue
        err = f"{r.max_err_vs_torch:9.2e}" if r.max_err_vs_torch is not None else ""
        spd = f"{r.speedup_vs_torch:8.2f}" if r.speedup_vs_torch is not None else ""
        print(f"{label:42s} {r.backend:15s} {r.us:10.1f} {r.rate:9.1f} {r.pct_ceiling:7.1f} {spd:>8s} {err:>9s}")


def environment() -> dict:
    from ldm_engine._cuda import device_info

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        commit = ""
    env = {"commit": commit, "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "gpu": torch.cuda.get_device_name(), "capability": torch.cuda.get_device_capability(),
           "ldm_engine_C": {k: v for k, v in device_info().items() if k != "devices"}}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--op", choices=["all", "group_norm_silu", "attention", "upsample"], default="all")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp16")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--layout", choices=["contiguous", "channels_last"], default="contiguous",
                        help="GroupNorm input memory format")
    parser.add_argument("--filter", default="", help="only shapes whose label contains this")
    parser.add_argument("--json", help="write rows, ceilings and environment here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_ops: CUDA is not available; nothing to measure.")
        return 0
    dtype = DTYPES[args.dtype]
    backends = [b for b in args.backends.split(",") if b]
    env = environment()
    print(f"# {env['gpu']} (sm_{''.join(map(str, env['capability']))}), torch {env['torch']}, "
          f"triton {env['triton']}, commit {env['commit'][:12]}, dtype {args.dtype}")
    ceilings = measure_ceilings()
    print(f"# ceilings: copy {ceilings['copy_gbps']:.0f} GB/s (read + write), "
          f"bf16 matmul {ceilings['bf16_matmul_tflops']:.0f} TFLOP/s")
    result = {"environment": env, "ceilings": ceilings, "dtype": args.dtype, "rows": []}
    if args.op in ("all", "group_norm_silu"):
        shapes = [s for s in GN_SHAPES if args.filter in s[0]]
        print(f"\n## group_norm_silu (32 groups, SiLU, {args.layout}): GB/s and % of copy bandwidth")
        rows = bench_group_norm(dtype, backends, ceilings, shapes, args.layout)
        print_table(rows, "GB/s")
        result["rows"] += [r.__dict__ for r in rows]
    if args.op in ("all", "attention"):
        if dtype == torch.float32:
            print("\n## attention: skipped for fp32 (the GPU backends take fp16 / bf16)")
        else:
            shapes = [s for s in ATTN_SHAPES if args.filter in s[0]]
            print("\n## attention (non-causal): TFLOP/s and % of the bf16 matmul rate")
            rows = bench_attention(dtype, backends, ceilings, shapes)
            print_table(rows, "TFLOP/s")
            result["rows"] += [r.__dict__ for r in rows]
    if args.op in ("all", "upsample"):  # last: the session's time limit cuts it first
        shapes = [s for s in UPSAMPLE_SHAPES if args.filter in s[0]]
        print("\n## upsample conv (nearest 2x + 3x3): plain vs sub-pixel; TFLOP/s of the plain path's FLOPs")
        rows = bench_upsample(dtype, ceilings, shapes)
        print_table(rows, "TFLOP/s")
        result["rows"] += [r.__dict__ for r in rows]
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1, default=str)
    return 0


# ------------------------------------------------------------------------------------------------
# pytest-benchmark
# ------------------------------------------------------------------------------------------------
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _synced(fn):
    def run():
        out = fn()
        torch.cuda.synchronize()
        return out
    return run


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 320, 64, 64), (1, 1280, 8, 8), (1, 128, 512, 512)], ids=str)
def test_bench_group_norm_silu(benchmark, backend, shape):
    import ldm_engine.ops as ops

    x = torch.randn(shape, device="cuda", dtype=torch.float16)
    w = torch.randn(shape[1], device="cuda", dtype=torch.float16)
    try:
        ops.group_norm_silu(x, w, w, 32, backend=backend)
    except ValueError as exc:
        pytest.skip(str(exc))
    benchmark(_synced(lambda: ops.group_norm_silu(x, w, w, 32, backend=backend)))


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 5, 4096, 4096, 64), (1, 5, 4096, 77, 64), (1, 8, 1024, 1024, 80),
                                   (1, 1, 4096, 4096, 512)], ids=str)
def test_bench_attention(benchmark, backend, shape):
    import ldm_engine.ops as ops

    b, h, lq, lk, d = shape
    q = torch.randn(b, lq, h, d, device="cuda", dtype=torch.float16).transpose(1, 2)
    k = torch.randn(b, lk, h, d, device="cuda", dtype=torch.float16).transpose(1, 2)
    v = torch.randn(b, lk, h, d, device="cuda", dtype=torch.float16).transpose(1, 2)
    try:
        ops.attention(q, k, v, backend=backend)
    except ValueError as exc:
        pytest.skip(str(exc))
    benchmark(_synced(lambda: ops.attention(q, k, v, backend=backend)))


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("subpixel", [False, True], ids=["plain", "subpixel"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_bench_upsample(benchmark, subpixel, layout):
    from ldm_engine.models.layers import Upsample2D, set_subpixel_upsample

    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    up = Upsample2D(512).to("cuda", torch.float16).to(memory_format=fmt).eval()
    set_subpixel_upsample(up, subpixel)
    x = torch.randn(1, 512, 64, 64, device="cuda", dtype=torch.float16).contiguous(memory_format=fmt)
    with torch.no_grad():
        benchmark(_synced(lambda: up(x)))

if __name__ == "__main__":
    sys.exit(main())
