"""Shared helpers for ldm_engine's benchmarks (bench_pipeline.py, bench_ops.py, run_gpu.sh).

Generic on purpose: nothing here knows about models or kernels.

- ``environment(device)``: GPU, driver, torch / CUDA / Triton / diffusers / transformers versions, git commit.
- ``measure_ceilings(device)``: the two ceilings of METHOD.md measured in the same run -- device-to-device
  copy bandwidth (bytes read + bytes written) and a large bf16 matrix product (TFLOP/s) on random data.
- ``time_ms(fn, device, warmup, runs)``: per-run milliseconds, CUDA events on a GPU, perf_counter on CPU.
- ``stats(values)``, ``format_table(headers, rows, markdown=...)``, ``write_json(path, payload)``,
  ``results_dir(...)``.

Command line (used by run_gpu.sh; works on CPU too):
    python benchmarks/common.py env --device cuda --ceilings --json env.json --markdown env.md
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_ROOT = REPO_ROOT / "benchmarks" / "results"
COMMIT_ENV = "LDM_ENGINE_GIT_COMMIT"   # set where the checkout has no .git (e.g. a copied working tree)
# Written by `run_gpu.sh prepare` next to the carried wheels, for device machines that get no .git.
COMMIT_FILE = REPO_ROOT / ".whl" / "COMMIT"


# ------------------------------------------------------------------------------------------ metadata

def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _run(cmd: Sequence[str], cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit(repo: Path = REPO_ROOT) -> dict:
    """{"commit", "dirty", "source"}; LDM_ENGINE_GIT_COMMIT wins when set (copies without .git)."""
    env = os.environ.get(COMMIT_ENV)
    if env:
        return {"commit": env, "dirty": None, "source": COMMIT_ENV}
    commit = _run(["git", "rev-parse", "HEAD"], repo)
    if commit is None:
        try:  # "<hash> [dirty]" as `run_gpu.sh prepare` wrote it where git was available
            fields = COMMIT_FILE.read_text().split()
            return {"commit": fields[0], "dirty": "dirty" in fields[1:], "source": str(COMMIT_FILE.relative_to(repo))}
        except (OSError, IndexError, ValueError):
            return {"commit": "unknown", "dirty": None, "source": f"no git repository; set {COMMIT_ENV}"}
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"], repo)
    return {"commit": commit, "dirty": bool(status), "source": "git"}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_info(device: torch.device) -> dict:
    if device.type != "cuda":
        return {}
    idx = device.index if device.index is not None else torch.cuda.current_device()
    p = torch.cuda.get_device_properties(idx)
    info = {
        "name": p.name,
        "capability": f"{p.major}.{p.minor}",
        "multiprocessors": p.multi_processor_count,
        "memory_gib": round(p.total_memory / 2**30, 2),
        "l2_cache_mib": round(getattr(p, "L2_cache_size", 0) / 2**20, 1) or None,
    }
    smi = _run(["nvidia-smi", f"--id={idx}", "--query-gpu=driver_version,clocks.max.sm,power.limit",
                "--format=csv,noheader"])
    if smi:
        fields = [f.strip() for f in smi.split(",")]
        info["driver"] = fields[0]
        info["max_sm_clock"] = fields[1] if len(fields) > 1 else None
        info["power_limit"] = fields[2] if len(fields) > 2 else None
    else:
        info["driver"] = None
    return info


def environment(device: torch.device | str = "cpu") -> dict:
    """Everything a result needs to be reproduced: machine, versions, commit, time."""
    device = torch.device(device)
    env = {
        "time_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": str(device),
        "gpu": gpu_info(device),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "triton": _version("triton"),
        "diffusers": _version("diffusers"),
        "transformers": _version("transformers"),
        "ldm_engine": _version("ldm_engine"),
        "git": git_commit(),
    }
    try:  # whether the CUDA extension was built (and for which archs): says which op backends can run
        from ldm_engine._cuda import device_info

        info = device_info()
        env["ldm_engine_C"] = {k: v for k, v in info.items() if isinstance(v, (str, int, float, bool))}
    except Exception as e:  # noqa: BLE001 - metadata only
        env["ldm_engine_C"] = {"error": repr(e)}
    return env


def environment_lines(env: dict) -> list[str]:
    """A few human lines for the top of a results table."""
    gpu = env.get("gpu") or {}
    git = env.get("git") or {}
    commit = git.get("commit", "unknown")
    dirty = " (+ uncommitted changes)" if git.get("dirty") else ""
    lines = []
    if gpu:
        lines.append(f"GPU: {gpu.get('name')} (sm_{gpu.get('capability', '?').replace('.', '')}, "
                     f"{gpu.get('multiprocessors')} SMs, {gpu.get('memory_gib')} GiB), driver {gpu.get('driver')}")
    else:
        lines.append(f"CPU: {env.get('cpu')} ({env.get('cpu_count')} threads visible)")
    lines.append(f"torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), triton {env.get('triton')}, "
                 f"diffusers {env.get('diffusers')}, transformers {env.get('transformers')}, "
                 f"python {env.get('python')}")
    lines.append(f"ldm_engine commit {commit}{dirty}; {env.get('time_utc')}")
    return lines


# ------------------------------------------------------------------------------------------ timing

def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device | str, *, warmup: int = 3, runs: int = 10) -> list[float]:
    """Milliseconds of each of ``runs`` calls of ``fn`` after ``warmup`` calls.

    CUDA: events recorded around each call (no host sync inside the timed region; one sync at the end).
    CPU: perf_counter around each call.
    """
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    synchronize(device)
    if device.type == "cuda":
        pairs = []
        for _ in range(runs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            pairs.append((start, end))
        torch.cuda.synchronize(device)
        return [s.elapsed_time(e) for s, e in pairs]
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000.0)
    return out


def stats(values: Iterable[float]) -> dict:
    v = [float(x) for x in values]
    if not v:
        return {"n": 0, "median": math.nan, "min": math.nan, "max": math.nan, "mean": math.nan, "stdev": math.nan}
    return {"n": len(v), "median": statistics.median(v), "min": min(v), "max": max(v),
            "mean": statistics.fmean(v), "stdev": statistics.stdev(v) if len(v) > 1 else 0.0}


# ------------------------------------------------------------------------------------------ ceilings

def _copy_bandwidth(device: torch.device, nbytes: int, runs: int) -> dict:
    n = nbytes // 2
    src = torch.randn(n, device=device, dtype=torch.float32).to(torch.float16)  # random, never zeros
    dst = torch.empty_like(src)
    ms = stats(time_ms(lambda: dst.copy_(src), device, warmup=3, runs=runs))["median"]
    moved = 2 * src.numel() * src.element_size()  # read + write
    return {"copy_bytes": src.numel() * src.element_size(), "copy_ms": ms, "copy_GBps": moved / (ms * 1e-3) / 1e9}


def _matmul_rate(device: torch.device, n: int, dtype: torch.dtype, runs: int) -> dict:
    a = torch.randn(n, n, device=device, dtype=torch.float32).to(dtype)
    b = torch.randn(n, n, device=device, dtype=torch.float32).to(dtype)
    ms = stats(time_ms(lambda: a @ b, device, warmup=3, runs=runs))["median"]
    return {"matmul_n": n, "matmul_dtype": str(dtype).replace("torch.", ""), "matmul_ms": ms,
            "matmul_TFLOPs": 2.0 * n ** 3 / (ms * 1e-3) / 1e12}


def measure_ceilings(device: torch.device | str, *, copy_bytes: int | None = None, matmul_n: int | None = None,
                     runs: int = 20) -> dict:
    """Device-to-device copy bandwidth and dense matrix-product rate, measured now on ``device``.

    GPU: 2 GiB copied (far beyond L2), 8192^3 bf16 product. CPU (smoke runs): 256 MiB, 1024^3 fp32.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    copy_bytes = copy_bytes or (2 * 2**30 if cuda else 256 * 2**20)
    matmul_n = matmul_n or (8192 if cuda else 1024)
    dtype = torch.bfloat16 if cuda else torch.float32
    out = {"device": str(device)}
    out.update(_copy_bandwidth(device, copy_bytes, runs if cuda else 5))
    out.update(_matmul_rate(device, matmul_n, dtype, runs if cuda else 5))
    if cuda:
        torch.cuda.empty_cache()
    return out


# ------------------------------------------------------------------------------------------ output

def _cell(v, fmt: str | None = None) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return format(v, fmt) if fmt else (f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}")
    return str(v)


def format_table(headers: Sequence[str], rows: Sequence[Sequence], *, markdown: bool = False,
                 formats: Sequence[str | None] | None = None, left: int = 1) -> str:
    """Fixed-width text table (default) or a GitHub markdown table. Floats: ``formats[i]`` or 3 significant
    digits; None/NaN print as "-". The first ``left`` columns are left-aligned, the rest right-aligned."""
    formats = list(formats or [None] * len(headers))
    cells = [[_cell(v, formats[i] if i < len(formats) else None) for i, v in enumerate(r)] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(headers) + " |",
                 "|" + "|".join("---" if i < left else "---:" for i in range(len(headers))) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in cells]
        return "\n".join(lines)
    widths = [max([len(str(h))] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def fmt_row(r):
        return "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()

    return "\n".join([fmt_row(headers), "  ".join("-" * w for w in widths)] + [fmt_row(r) for r in cells])


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None  # JSON has no NaN/inf
    if isinstance(obj, (torch.dtype, torch.device, Path)):
        return str(obj)
    return obj


def write_json(path: str | os.PathLike, payload: dict) -> Path:
    """Writes ``payload`` (NaN -> null) atomically; creates parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_jsonable(payload), indent=2) + "\n")
    tmp.replace(path)
    return path


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "unknown"


def results_dir(device: torch.device | str = "cpu") -> Path:
    """``$OUT`` when set (device machine), else benchmarks/results/<date>-<gpu or cpu>."""
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"])
    device = torch.device(device)
    name = gpu_info(device).get("name", "gpu") if device.type == "cuda" else "cpu"
    return RESULTS_ROOT / f"{_dt.date.today().isoformat()}-{slug(name)}"


def _pytest_outcome(log: Path) -> str | None:
    """The final "N passed, M failed ... in Xs" line of a pytest log (or why there is none)."""
    lines = log.read_text(errors="replace").splitlines()
    for line in reversed(lines):
        if re.search(r"\b(passed|failed|error|errors|skipped|deselected|no tests ran)\b", line) and " in " in line:
            return line.strip("= ").strip()
    tail = [ln for ln in lines if ln.strip()][-1:] or ["(empty log)"]
    return f"no pytest summary line (killed at its time limit?); last line: {tail[0][:200]}"


def write_summary(folder: Path) -> Path:
    """summary.md: environment, test outcomes (*.log with a pytest summary), then every other *.md table."""
    folder = Path(folder)
    parts = ["# ldm_engine GPU run", ""]
    env_path = folder / "env.json"
    if env_path.is_file():
        env = json.loads(env_path.read_text())
        parts += [f"- {ln}" for ln in environment_lines(env)]
        c = env.get("ceilings")
        if c:
            parts.append(f"- ceilings: copy {c['copy_GBps']:.0f} GB/s (read+write), {c['matmul_dtype']} matmul "
                         f"{c['matmul_n']}^3 {c['matmul_TFLOPs']:.4g} TFLOP/s")
        parts.append("")
    tests = [(p.name, _pytest_outcome(p)) for p in sorted(folder.glob("tests*.log"))]
    if tests:
        parts += ["## Tests", ""] + [f"- `{name}`: {outcome}" for name, outcome in tests] + [""]
    for md in sorted(folder.glob("*.md")):
        if md.name != "summary.md":
            parts += [md.read_text().rstrip(), ""]
    out = folder / "summary.md"
    out.write_text("\n".join(parts))
    return out


# ------------------------------------------------------------------------------------------ CLI

def _main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    e = sub.add_parser("env", help="print (and save) the environment and, with --ceilings, the device ceilings")
    e.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    e.add_argument("--ceilings", action="store_true", help="measure copy bandwidth and matmul rate")
    e.add_argument("--json", type=Path, help="write the environment (and ceilings) as JSON here")
    e.add_argument("--markdown", type=Path, help="write a short markdown summary here")
    sub.add_parser("results-dir", help="print the default results folder for this machine")
    s = sub.add_parser("summary", help="write DIR/summary.md from DIR/env.json, pytest logs and *.md tables")
    s.add_argument("dir", type=Path)
    args = parser.parse_args(argv)
    if args.command == "results-dir":
        print(results_dir("cuda" if torch.cuda.is_available() else "cpu"))
        return 0
    if args.command == "summary":
        print(write_summary(args.dir))
        return 0
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    env = environment(device)
    lines = environment_lines(env)
    if args.ceilings:
        c = measure_ceilings(device)
        env["ceilings"] = c
        lines.append(f"ceilings: copy {c['copy_GBps']:.0f} GB/s (read+write, {c['copy_bytes'] / 2**30:.2f} GiB), "
                     f"{c['matmul_dtype']} matmul {c['matmul_n']}^3 {c['matmul_TFLOPs']:.4g} TFLOP/s")
    print("\n".join(lines))
    if args.json:
        write_json(args.json, env)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text("\n".join(f"- {ln}" for ln in lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
