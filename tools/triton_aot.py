"""Ahead-of-time compiles of the Triton kernels for sm_80 / sm_90, without a GPU: do they fit?

    python tools/triton_aot.py                  # every attention autotune config, both archs (~15 min)
    python tools/triton_aot.py --quick          # the first (default) config per head dim
    python tools/triton_aot.py --quick --head-dim 160 --dtype float16   # what CI runs (~30 s)
    python tools/triton_aot.py --json out.json

For each (head dim, dtype, config, arch) Triton lowers the kernel to a cubin (its bundled ptxas), and
we read the shared memory it needs (``metadata.shared``) and ptxas' spill report. A config fails
when it needs more shared memory than the architecture's per-block opt-in limit or spills registers.
Must run with TRITON_INTERPRET unset (the interpreter has nothing to compile); the tests call it in a
subprocess. tests/test_ops_attention.py::test_triton_configs_fit_* run it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

# Opt-in shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin).
SMEM_LIMIT = {80: 166_912, 90: 232_448}
HEAD_DIMS = (40, 64, 80, 128, 160, 512)
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def _attention_signature(d: int, dtype: str):
    from ldm_engine.kernels.attention import head_dim_pieces

    ptr = "*" + {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}[dtype]
    d0, d1 = head_dim_pieces(d)
    names = ["Q", "K", "V", "O", "qk_scale", "Lq", "Lk", "H",
             "sqb", "sqh", "sql", "sqd", "skb", "skh", "skl", "skd", "svb", "svh", "svl", "svd",
             "sob", "soh", "sol", "sod"]
    sig = {n: ptr for n in names[:4]}
    sig["qk_scale"] = "fp32"
    sig.update({n: "i32" for n in names[5:]})
    # what a JIT call sees for (B, L, H, D) storage: head-dim strides of 1 become constants, and the
    # pointers and other strides are multiples of 16 (bytes / elements), which Triton specialises on
    consts = {"sqd": 1, "skd": 1, "svd": 1, "sod": 1, "D": d, "D0": d0, "D1": d1}
    div16 = [names.index(n) for n in ("Q", "K", "V", "O", "sqb", "sqh", "sql", "skb", "skh", "skl",
                                       "svb", "svh", "svl", "sob", "soh", "sol")]
    attrs = {(i,): [["tt.divisibility", 16]] for i in div16}
    return sig, consts, attrs


def compile_attention(d: int, dtype: str, cfg, cc: int) -> dict:
    """Compile one config for compute capability cc; returns shared memory, registers, spills."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ldm_engine.kernels import attention as mod

    sig, consts, attrs = _attention_signature(d, dtype)
    kw = dict(cfg.kwargs)
    consts.update(BLOCK_M=kw["BLOCK_M"], BLOCK_N=kw["BLOCK_N"], D_SPLIT=kw["D_SPLIT"],
                  IEEE_FP32=dtype == "float32")
    for name in consts:
        sig[name] = "constexpr"
    src = ASTSource(mod._attn_fwd_kernel, signature=sig, constexprs=consts, attrs=attrs)
    triton.knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(log):
        k = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                           options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    text = log.getvalue()
    spills = [int(a) + int(b) for a, b in _SPILL.findall(text)]
    regs = [int(r) for r in _REGS.findall(text)]
    shared = int(k.metadata.shared)
    row = {"d": d, "dtype": dtype, "arch": f"sm_{cc}", "config": kw, "num_warps": cfg.num_warps,
           "num_stages": cfg.num_stages, "shared": shared, "limit": SMEM_LIMIT[cc],
           "registers": max(regs) if regs else None, "spill_bytes": sum(spills) if spills else None,
           "seconds": round(time.perf_counter() - t0, 2)}
    row["fits"] = shared <= SMEM_LIMIT[cc] and row["spill_bytes"] == 0
    return row


def gn_channels_last_loads(cg: int, dtype: str = "float16", cc: int = 80) -> list[str]:
    """The global load instructions of the fused GroupNorm kernel for channels_last input (channel
    stride 1, CG channels per group): with CG a compile-time constant, 16-byte ``ld.global.v4.b32``
    when CG is a multiple of 8 (16-bit types), instead of one element per load."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ldm_engine.kernels import group_norm_silu as mod

    fn = mod._gn_fused_kernel
    names = fn.arg_names
    ptr = "*" + {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}[dtype]
    sig = {n: "i32" for n in names}
    sig.update({n: ptr for n in ("x_ptr", "w_ptr", "b_ptr", "y_ptr")}, eps="fp32")
    consts = dict(CG=cg, HAS_W=True, HAS_B=True, SILU=True, BLOCK_C=triton.next_power_of_2(cg), BLOCK_S=256,
                  stride_c=1)
    sig.update({n: "constexpr" for n in consts})
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in ("x_ptr", "w_ptr", "b_ptr", "y_ptr", "stride_n",
                                                                      "stride_s")}
    k = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", cc, 32), options={"num_warps": 8})
    return sorted(set(re.findall(r"ld\.global[\w.]*", k.asm["ptx"])))


def attention_jobs(quick: bool, dtypes=("float16", "bfloat16"), archs=(80, 90), head_dims=HEAD_DIMS):
    from ldm_engine.kernels.attention import configs_for

    for d in head_dims:
        for dtype in dtypes:
            cfgs = configs_for(d, dtype == "float32")
            if quick:
                cfgs = cfgs[:1]
            for cfg in cfgs:
                for cc in archs:
                    yield d, dtype, cfg, cc


def main(argv=None) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET: the interpreter compiles nothing", file=sys.stderr)
        return 2
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the first (default) config per head dim only")
    ap.add_argument("--dtype", action="append", help="float16 / bfloat16 / float32 (default: the 16-bit ones)")
    ap.add_argument("--arch", action="append", type=int, help="80 and/or 90 (default both)")
    ap.add_argument("--head-dim", action="append", type=int, help=f"default: {HEAD_DIMS}")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--gn-loads", type=int, metavar="CG",
                    help="instead: print the GroupNorm channels_last load instructions for CG channels per group")
    args = ap.parse_args(argv)
    os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="ldm-aot-"))  # ptxas must run
    if args.gn_loads:
        loads = gn_channels_last_loads(args.gn_loads, (args.dtype or ["float16"])[0], (args.arch or [80])[0])
        print(json.dumps(loads))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(loads, f)
        return 0
    rows = []
    for d, dtype, cfg, cc in attention_jobs(args.quick, tuple(args.dtype or ("float16", "bfloat16")),
                                            tuple(args.arch or (80, 90)), tuple(args.head_dim or HEAD_DIMS)):
        row = compile_attention(d, dtype, cfg, cc)
        rows.append(row)
        print(f"d={d:4d} {dtype:9s} {row['arch']} {row['config']} w={row['num_warps']} s={row['num_stages']}: "
              f"smem {row['shared']:7d} / {row['limit']} regs {row['registers']} spill {row['spill_bytes']} "
              f"{'ok' if row['fits'] else 'DOES NOT FIT'} ({row['seconds']} s)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0 if all(r["fits"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
