"""Soak test: one engine shared by N threads for T seconds (or a fixed number of calls) of mixed
requests on the tiny demo model, reporting calls, errors, mismatches against serial twins and
memory growth.

    python benchmarks/soak.py                                  # 4 threads x 20 s on the CPU (the CI run)
    python benchmarks/soak.py --threads 8 --calls 500          # RSS growth over 500 generate() calls
    python benchmarks/soak.py --device cuda --graphs --calls 1000   # GPU: memory flat with CUDA graphs

Requests: a fixed set of templates mixing text-to-image and img2img, guidance on and off, two
sizes, and ControlNet (a second engine over the same networks plus a seeded random ControlNet). Each
template is run once serially first (its *serial twin*, which also warms up every shape); the
threads then pick templates at random and every result is compared with its twin (max abs
difference <= --atol). ``--graphs`` installs CUDA graphs (on CPU their stand-in, RerunGraphs, with
the same static-buffer discipline), the path where concurrent calls could see each other's buffers.

Memory: RSS (from /proc/self/statm) after the serial twins and a warm-up round, and at the end; on
CUDA also torch.cuda.memory_allocated / memory_reserved. Exit status 1 when there were errors,
mismatches, or growth over --max-rss-growth-mb / --max-gpu-growth-mb. ``--json`` writes the report.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPTS = ["a lighthouse at dusk", "a bowl of ramen, studio light", "an owl in the snow", "a red bicycle", ""]


def rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # not Linux: peak RSS is the best we have
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_engines(device: str, graphs: bool):
    """(plain engine, ControlNet engine) over the same tiny demo networks."""
    from ldm_engine.engine import Engine
    from ldm_engine.models.controlnet import ControlNetConfig, ControlNetModel
    from ldm_engine.pipeline.demo import TINY_CONFIG_DIR, build_tiny_engine

    plain = build_tiny_engine(device=device, dtype="fp32")
    unet_cfg = json.loads((TINY_CONFIG_DIR / "unet" / "config.json").read_text())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        net = ControlNetModel(ControlNetConfig.from_dict(dict(unet_cfg, conditioning_embedding_out_channels=[16, 32, 64])))
        for p in net.parameters():  # no zero convolutions: the ControlNet must change the image
            if p.dim() > 1:
                torch.nn.init.normal_(p, 0.0, 0.05)
    net = net.to(device).eval().requires_grad_(False)
    control = Engine(plain.components, [net], device=device, dtype="fp32", name="tiny + ControlNet")
    if graphs:
        for engine in (plain, control):
            if engine.device.type == "cuda":
                engine.enable_cuda_graphs(max_graphs=16)
            else:
                from ldm_engine.pipeline.cuda_graphs import RerunGraphs

                engine._install_graphs(RerunGraphs(), 16)
    return plain, control


def templates(steps: int) -> list[tuple[str, str, dict]]:
    """(engine: "plain" | "control", prompt, generate() kwargs): mixed requests, two sizes."""
    out = []
    rng = np.random.default_rng(0)
    for i in range(8):
        h, w = (32, 32) if i % 2 == 0 else (32, 48)
        kw = dict(seed=1000 + i, height=h, width=w, num_inference_steps=steps, output_type="np",
                  guidance_scale=(1.0, 4.0)[i // 2 % 2])
        if i % 4 == 3:
            kw.update(image=rng.random((h, w, 3), dtype=np.float32), strength=0.75 if steps >= 2 else 1.0)
        kind = "control" if i % 3 == 2 else "plain"
        if kind == "control":
            kw.update(control_image=rng.random((h, w, 3), dtype=np.float32), controlnet_conditioning_scale=0.8)
        out.append((kind, PROMPTS[i % len(PROMPTS)], kw))
    return out


def soak(*, threads: int = 4, seconds: float = 20.0, calls: int | None = None, device: str = "cpu",
         graphs: bool = False, steps: int = 2, atol: float = 1e-5, seed: int = 0, log=print) -> dict:
    """Runs the soak and returns the report (see the module docstring)."""
    plain, control = build_engines(device, graphs)
    engines = {"plain": plain, "control": control}
    reqs = templates(steps)
    twins = [engines[k].generate(p, **kw).images for k, p, kw in reqs]
    for _ in range(2):  # warm-up: allocator pools, graph captures, lazy initialisation
        for k, p, kw in reqs:
            engines[k].generate(p, **kw)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
    rss0 = rss_mb()
    gpu0 = (torch.cuda.memory_allocated(), torch.cuda.memory_reserved()) if cuda else None

    lock = threading.Lock()
    stats = {"calls": 0, "errors": 0, "mismatches": 0, "max_abs_diff": 0.0}
    trace = [(0, round(rss0, 1))]  # (calls so far, RSS MB): growth that levels off is the allocator, not a leak
    every = max(1, (calls or 500) // 10)
    errors: list[str] = []
    stop_at = time.monotonic() + seconds
    budget = [calls]

    def take() -> bool:
        with lock:
            if budget[0] is not None:
                if budget[0] <= 0:
                    return False
                budget[0] -= 1
                return True
        return time.monotonic() < stop_at

    def worker(k: int):
        rng = random.Random(seed * 1000 + k)
        while take():
            i = rng.randrange(len(reqs))
            kind, prompt, kw = reqs[i]
            try:
                got = engines[kind].generate(prompt, **kw).images
                diff = float(np.abs(got - twins[i]).max())
                bad = not diff <= atol
            except Exception as exc:  # noqa: BLE001 - counted and reported
                with lock:
                    stats["calls"] += 1
                    stats["errors"] += 1
                    errors.append(f"{type(exc).__name__}: {exc}"[:300])
                continue
            with lock:
                stats["calls"] += 1
                stats["mismatches"] += bad
                stats["max_abs_diff"] = max(stats["max_abs_diff"], diff)
                if stats["calls"] % every == 0:
                    trace.append((stats["calls"], round(rss_mb(), 1)))

    t0 = time.perf_counter()
    pool = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    wall = time.perf_counter() - t0
    if cuda:
        torch.cuda.synchronize()
    report = dict(stats, threads=threads, device=device, graphs=graphs, steps=steps, wall_s=round(wall, 2),
                  calls_per_s=round(stats["calls"] / wall, 2) if wall else 0.0,
                  rss_start_mb=round(rss0, 1), rss_end_mb=round(rss_mb(), 1), rss_trace=trace, first_errors=errors[:5],
                  torch=torch.__version__, torch_threads=torch.get_num_threads())
    report["rss_growth_mb"] = round(report["rss_end_mb"] - report["rss_start_mb"], 1)
    if cuda:
        alloc, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
        report.update(gpu_allocated_growth_mb=round((alloc - gpu0[0]) / 2**20, 1),
                      gpu_reserved_growth_mb=round((reserved - gpu0[1]) / 2**20, 1), gpu=torch.cuda.get_device_name())
    log(format_report(report))
    return report


def format_report(r: dict) -> str:
    rows = [("threads", r["threads"]), ("device", f"{r['device']}{' + graphs' if r['graphs'] else ''}"),
            ("calls", r["calls"]), ("calls/s", r["calls_per_s"]), ("errors", r["errors"]),
            ("mismatches", f"{r['mismatches']} (max abs diff {r['max_abs_diff']:.2e})"),
            ("RSS MB", f"{r['rss_start_mb']} -> {r['rss_end_mb']} ({r['rss_growth_mb']:+} MB)"),
            ("RSS trace", " ".join(f"{n}:{mb}" for n, mb in r["rss_trace"]))]
    if "gpu_allocated_growth_mb" in r:
        rows.append(("GPU MB growth", f"allocated {r['gpu_allocated_growth_mb']:+}, reserved {r['gpu_reserved_growth_mb']:+}"))
    lines = [f"{k:<14}{v}" for k, v in rows]
    lines += [f"error: {e}" for e in r["first_errors"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--seconds", type=float, default=20.0, help="run time (ignored with --calls)")
    p.add_argument("--calls", type=int, default=None, help="run exactly this many generate() calls in all")
    p.add_argument("--device", default="cpu")
    p.add_argument("--graphs", action="store_true", help="CUDA graphs (RerunGraphs stand-in on CPU)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--atol", type=float, default=1e-5)
    p.add_argument("--max-rss-growth-mb", type=float, default=20.0)
    p.add_argument("--max-gpu-growth-mb", type=float, default=8.0)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("SKIPPED: --device cuda but no CUDA GPU is visible to torch")
        return 0
    r = soak(threads=args.threads, seconds=args.seconds, calls=args.calls, device=args.device, graphs=args.graphs,
             steps=args.steps, atol=args.atol)
    if args.json:
        args.json.write_text(json.dumps(r, indent=2) + "\n")
    ok = (r["errors"] == 0 and r["mismatches"] == 0 and r["rss_growth_mb"] < args.max_rss_growth_mb
          and r.get("gpu_allocated_growth_mb", 0.0) < args.max_gpu_growth_mb)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
