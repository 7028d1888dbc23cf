"""Per-call Python overhead of ``ldm_engine.ops`` dispatch (group_norm_silu, attention).

Each op runs on tiny tensors (GroupNorm-SiLU: x (1, 32, 4, 4), 8 groups; attention: q/k/v (1, 1, 4, 8)),
so the kernels themselves cost little and what ``ldm_engine.ops`` adds in Python shows up clearly. Every
row calls the op ``--calls`` times in a loop, best of ``--repeats`` loops (the rows are interleaved
across repeats so drift hits all of them alike), and reports microseconds per call; the *overhead*
column is that minus the ``direct`` row (``F.group_norm`` + ``F.silu`` /
``F.scaled_dot_product_attention`` called by hand, i.e. what the "torch" backend runs).

Rows (each ends in the "torch" backend, so only dispatch differs):

- ``direct``: the torch calls without ldm_engine;
- ``ops default``: ``backend=None`` with ``LDM_ENGINE_BACKEND`` unset (the default order);
- ``ops env=torch``: ``LDM_ENGINE_BACKEND=torch``;
- ``ops backend="torch"``: the explicit argument;
- ``ops env=cuda -> torch`` (CPU tensors only): a preference the input cannot take, so the fallback path.

On CUDA the times are host times of an asynchronous loop (one synchronisation at the end of each loop),
which is what the dispatch costs the CPU side of an eager U-Net call. Runs on CPU or CUDA (CUDA tensors
when available), in a few seconds:

    python benchmarks/bench_dispatch.py
    python benchmarks/bench_dispatch.py --calls 20000 --repeats 5 --json dispatch.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (benchmarks/common.py)

sys.path.insert(1, str(common.REPO_ROOT))
from ldm_engine import ops  # noqa: E402

ENV = "LDM_ENGINE_BACKEND"


def _cases(device: torch.device) -> dict:
    """op -> list of (row label, env value or None, callable)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 32, 4, 4, generator=g).to(device)
    w = torch.rand(32, generator=g).add_(0.5).to(device)
    b = torch.randn(32, generator=g).to(device)
    q, k, v = (torch.randn(1, 1, 4, 8, generator=g).to(device) for _ in range(3))
    gn = [
        ("direct", None, lambda: F.silu(F.group_norm(x, 8, w, b, 1e-5))),
        ("ops default", None, lambda: ops.group_norm_silu(x, w, b, 8, 1e-5)),
        ("ops env=torch", "torch", lambda: ops.group_norm_silu(x, w, b, 8, 1e-5)),
        ('ops backend="torch"', None, lambda: ops.group_norm_silu(x, w, b, 8, 1e-5, backend="torch")),
    ]
    attn = [
        ("direct", None, lambda: F.scaled_dot_product_attention(q, k, v)),
        ("ops default", None, lambda: ops.attention(q, k, v)),
        ("ops env=torch", "torch", lambda: ops.attention(q, k, v)),
        ('ops backend="torch"', None, lambda: ops.attention(q, k, v, backend="torch")),
    ]
    if device.type == "cpu":  # the cuda backend never takes CPU tensors: LDM_ENGINE_BACKEND=cuda falls back
        gn.append(("ops env=cuda -> torch", "cuda", lambda: ops.group_norm_silu(x, w, b, 8, 1e-5)))
        attn.append(("ops env=cuda -> torch", "cuda", lambda: ops.attention(q, k, v)))
    return {"group_norm_silu": gn, "attention": attn}


def _loop_us(fn, calls: int, device: torch.device) -> float:
    """Microseconds per call of ``calls`` back-to-back calls (host clock, one sync at the end)."""
    common.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    common.synchronize(device)
    return (time.perf_counter() - t0) / calls * 1e6


def _set_env(value: str | None) -> None:
    if value is None:
        os.environ.pop(ENV, None)
    else:
        os.environ[ENV] = value


def measure(device: torch.device, calls: int, repeats: int) -> list[dict]:
    saved = os.environ.get(ENV)
    rows = []
    try:
        for op, cases in _cases(device).items():
            times = {label: [] for label, _, _ in cases}
            for label, env, fn in cases:  # warm-up (first-call costs, caches)
                _set_env(env)
                _loop_us(fn, min(calls, 500), device)
            for _ in range(repeats):
                for label, env, fn in cases:
                    _set_env(env)
                    times[label].append(_loop_us(fn, calls, device))
            direct = min(times["direct"])
            for label, env, _ in cases:
                s = common.stats(times[label])
                rows.append({"op": op, "row": label, "env": env, "us_per_call": s["min"],
                             "median_us": s["median"], "overhead_us": s["min"] - direct,
                             "ratio": s["min"] / direct})
    finally:
        _set_env(saved)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--calls", type=int, default=20000, help="calls per timed loop (default 20000)")
    parser.add_argument("--repeats", type=int, default=5, help="timed loops per row; the best counts (default 5)")
    parser.add_argument("--json", help="write the rows and the environment here")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    env = common.environment(device)
    t0 = time.perf_counter()
    rows = measure(device, args.calls, args.repeats)
    elapsed = time.perf_counter() - t0

    print("\n".join(common.environment_lines(env)))
    print(f"device {device}; {args.calls} calls per loop, best of {args.repeats}; "
          f"GroupNorm-SiLU x (1, 32, 4, 4) 8 groups, attention q/k/v (1, 1, 4, 8), float32\n")
    print(common.format_table(
        ["op", "row", "us/call (best)", "us/call (median)", "overhead us", "x direct"],
        [[r["op"], r["row"], r["us_per_call"], r["median_us"], r["overhead_us"], r["ratio"]] for r in rows],
        formats=[None, None, ".2f", ".2f", ".2f", ".2f"], left=2))
    print(f"\n({elapsed:.1f} s)")
    if args.json:
        common.write_json(args.json, {"environment": env, "device": str(device), "calls": args.calls,
                                      "repeats": args.repeats, "seconds": elapsed, "rows": rows})
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
