"""generate() with one ControlNet: the real SD1.5 U-Net and ControlNet (canny) architectures, random weights.

Measures what a ControlNet adds per generate(): end-to-end latency (host clock, output_type="latent" so
the unchanged VAE decode does not drown the difference), the process CPU time (with --threads 1: the
work done, which time-sharing with other jobs hardly changes; wall time on a busy CPU does), the per-step ControlNet and U-Net times from
result.timings, and the hint embedding alone (ControlNetConditioningEmbedding on one control image).
Uses only the public API, so the same script measures any commit (PYTHONPATH=<checkout>).

    python benchmarks/bench_controlnet.py --size 256 --steps 3 --runs 3 --call-ab   # CPU, fp32, CFG 7.5, Euler
    python benchmarks/bench_controlnet.py --threads 1 --runs 5 --generate-ab      # once vs every step, one process
    python benchmarks/bench_controlnet.py --size 512 --device cuda --dtype fp16 --runs 10
    python benchmarks/bench_controlnet.py --tiny --size 256 --steps 3 --runs 10  # embedding-heavy toy (upper bound)

The first run writes the random-weight folders (benchmarks/bench_pipeline.write_random_pipeline, and the
ControlNet from ldm_engine/configs/controlnet-sd15-canny) under --weights-dir and reuses them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_pipeline as bp  # noqa: E402
import common  # noqa: E402

CONTROLNET_CONFIG = bp.CONFIG_ROOT / "controlnet-sd15-canny" / "config.json"
# --tiny: the toy pipeline (VAE factor 4) with a ControlNet of its U-Net's shape whose hint embedding has
# the SD1.5 embedding's full-resolution widths (16, 32, 96): the embedding is most of the ControlNet's cost.
TINY_CONTROLNET = dict(conditioning_channels=3, conditioning_embedding_out_channels=[16, 32, 96],
                       controlnet_conditioning_channel_order="rgb", global_pool_conditions=False)


def controlnet_config(tiny: bool) -> tuple[str, dict]:
    if not tiny:
        return "controlnet-sd15", json.loads(CONTROLNET_CONFIG.read_text())
    unet = json.loads((bp.CONFIG_ROOT / "tiny" / "unet" / "config.json").read_text())
    drop = ("_class_name", "sample_size", "out_channels", "up_block_types")
    return "controlnet-tiny", {**{k: v for k, v in unet.items() if k not in drop}, **TINY_CONTROLNET}


def write_random_controlnet(root: Path, *, dtype: torch.dtype, seed: int = 0, tiny: bool = False) -> Path:
    """A diffusers ControlNet folder (the canny config, or --tiny's) with seeded random weights (written once)."""
    from safetensors.torch import save_file

    from ldm_engine.models.controlnet import ControlNetConfig, ControlNetModel

    name, config = controlnet_config(tiny)
    folder = Path(root) / f"{name}-random-seed{seed}-{str(dtype).replace('torch.', '')}"
    if (folder / ".complete").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        model = ControlNetModel(ControlNetConfig.from_dict(config))
    # Random everywhere, the zero convs included: zeros could run faster than real weights.
    sd = bp._random_state_dict(model, seed=seed * 101 + 7, dtype=dtype, device=torch.device("cpu"))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file(sd, str(folder / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    (folder / ".complete").write_text("random weights\n")
    return folder


def hint_embedding_ms(net, size: int, device, dtype, runs: int) -> float:
    hint = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    emb = net.controlnet_cond_embedding
    with torch.inference_mode():
        return min(common.time_ms(lambda: emb(hint), device, warmup=1, runs=runs))


def controlnet_call_ab_ms(engine, size: int, device, dtype, runs: int) -> dict | None:
    """One guided step's ControlNet call (batch 2) with the hint as pixels (embedded inside the call, as
    every step did before hint_features) and as features embedded beforehand, alternating, best of
    ``runs`` each: the per-step saving, measured in one process. None on commits without embed_hint."""
    net = engine.controlnets[0]
    if not hasattr(net, "embed_hint"):
        return None
    g = torch.Generator().manual_seed(2)
    h = size // engine.vae_scale_factor
    x = torch.randn(2, 4, h, h, generator=g).to(device, dtype)
    ehs = torch.randn(2, 77, net.config.cross_attention_dim, generator=g).to(device, dtype)
    pixels = torch.rand(2, 3, size, size, generator=g).to(device, dtype)
    t = torch.tensor(500.0, device=device)
    ms = {"pixels": [], "features": []}
    with torch.inference_mode():
        features = net.embed_hint(pixels)
        calls = {"pixels": lambda: net(x, t, ehs, pixels), "features": lambda: net(x, t, ehs, hint_features=features)}
        for call in calls.values():  # warm-up: the pixel path's batch-2 embedding is new to this process
            call()
        for _ in range(runs):
            for name, call in calls.items():
                ms[name] += common.time_ms(call, device, warmup=0, runs=1)
    return {name: min(v) for name, v in ms.items()}


class _PixelsOnly:
    """A ControlNet seen without embed_hint: prepare_controls hands it the pixels, so every call embeds
    the hint again, on the guidance-doubled batch (the engine's path before embed_hint; still the one
    of exported ControlNets)."""

    def __init__(self, net):
        self.net, self.config = net, net.config

    def __call__(self, *args, **kwargs):
        return self.net(*args, **kwargs)


def generate_ab_ms(engine, kw: dict, runs: int) -> dict | None:
    """generate() with each hint embedded once vs in every ControlNet call, alternating in this process
    (so both see the same machine), best / median of ``runs`` each, wall and process CPU ms.
    None on commits without pipeline/controlnet.py."""
    try:
        import ldm_engine.engine as engine_module
        once = engine_module.prepare_controls
    except AttributeError:
        return None

    def every_step(nets, *args, **kwargs):
        return once([_PixelsOnly(n) for n in nets], *args, **kwargs)

    ms = {name: {"wall": [], "cpu": []} for name in ("once", "every_step")}
    try:
        for _ in range(runs):
            for name, prepare in (("once", once), ("every_step", every_step)):
                engine_module.prepare_controls = prepare
                t0, c0 = time.perf_counter(), time.process_time()
                engine.generate(bp.PROMPT, **kw)
                ms[name]["wall"].append((time.perf_counter() - t0) * 1000.0)
                ms[name]["cpu"].append((time.process_time() - c0) * 1000.0)
    finally:
        engine_module.prepare_controls = once
    return ms


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--scheduler", default="euler", help="euler: one U-Net call per step")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--weights-dir", type=Path, default=bp.DEFAULT_WEIGHTS_DIR)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's); 1 makes "
                   "the process CPU time a measure of work that other load on a shared machine hardly changes")
    p.add_argument("--generate-ab", action="store_true", help="CPU: also alternate generate() with the hint "
                   "embedded once and in every step (this commit's engine with the old per-step path), --runs each")
    p.add_argument("--tiny", action="store_true", help="the toy pipeline with an embedding-heavy ControlNet (see "
                   "TINY_CONTROLNET): where the per-step embedding dominates; not a real model")
    p.add_argument("--call-ab", action="store_true", help="also time one ControlNet call with the hint as pixels "
                   "vs as embedded features (needs ControlNetModel.embed_hint)")
    args = p.parse_args(argv)

    import ldm_engine
    from ldm_engine import Engine

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    spec = bp.MODELS["tiny" if args.tiny else "sd15"]
    folder = bp.write_random_pipeline(spec, args.weights_dir, dtype=dtype, device="cpu")
    cn_folder = write_random_controlnet(args.weights_dir, dtype=dtype, tiny=args.tiny)
    engine = Engine.from_pretrained(str(folder), controlnet=str(cn_folder), device=device, dtype=dtype,
                                    scheduler=args.scheduler)
    control = torch.rand(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
    kw = dict(negative_prompt=bp.NEGATIVE_PROMPT, height=args.size, width=args.size, control_image=control,
              num_inference_steps=args.steps, guidance_scale=args.guidance, seed=0, output_type="latent")

    engine.generate(bp.PROMPT, **kw)  # warm-up (allocator, oneDNN / cuDNN algorithm choice)
    totals, cpu, cn_steps, unet_steps, others = [], [], [], [], []
    for _ in range(args.runs):
        common.synchronize(device)
        t0, c0 = time.perf_counter(), time.process_time()
        res = engine.generate(bp.PROMPT, **kw)
        common.synchronize(device)
        totals.append((time.perf_counter() - t0) * 1000.0)
        cpu.append((time.process_time() - c0) * 1000.0)
        cn_steps.append(res.timings["controlnet"])
        unet_steps.append(res.timings["unet"])
        others.append({k: v for k, v in res.timings.items() if k not in ("controlnet", "unet")})
    embed_ms = hint_embedding_ms(engine.controlnets[0], args.size, device, dtype, args.runs)
    call_ab = controlnet_call_ab_ms(engine, args.size, device, dtype, args.runs) if args.call_ab else None
    gen_ab = generate_ab_ms(engine, kw, args.runs) if args.generate_ab and device.type == "cpu" else None

    out = {
        "ldm_engine": str(Path(ldm_engine.__file__).parent), "commit": common.git_commit(
            Path(ldm_engine.__file__).resolve().parent.parent),
        "model": "tiny" if args.tiny else "sd15", "device": str(device), "dtype": args.dtype, "threads": torch.get_num_threads(), "size": args.size,
        "steps": args.steps, "guidance": args.guidance, "scheduler": args.scheduler,
        "total_ms": totals, "total_best_ms": min(totals), "total_median_ms": statistics.median(totals),
        "process_cpu_ms": cpu, "process_cpu_best_ms": min(cpu),
        "controlnet_step_ms": cn_steps, "unet_step_ms": unet_steps, "other_timings_ms": others,
        "hint_embedding_ms_best": embed_ms, "controlnet_call_best_ms": call_ab,
        "generate_ab_ms": gen_ab,
    }
    print(f"{'tiny' if args.tiny else 'sd15'} + ControlNet; ldm_engine from {out['ldm_engine']} ({out['commit'].get('commit', '?')[:7]}), {device}, {args.dtype}, "
          f"{out['threads']} threads, {args.size}x{args.size}, {args.steps} steps, CFG {args.guidance}")
    print(f"generate() total ms: best {min(totals):.0f}, median {statistics.median(totals):.0f}  "
          f"(runs: {', '.join(f'{t:.0f}' for t in totals)})")
    print(f"generate() process CPU ms: best {min(cpu):.0f}, median {statistics.median(cpu):.0f}  "
          f"(runs: {', '.join(f'{t:.0f}' for t in cpu)})")
    best = min(range(len(totals)), key=totals.__getitem__)
    extra = others[best]
    print(f"  best run: controlnet per step {[round(v) for v in cn_steps[best]]} ms, "
          f"unet per step {[round(v) for v in unet_steps[best]]} ms, other {{"
          + ", ".join(f"{k}: {v:.0f}" for k, v in extra.items()) + "}")
    print(f"hint embedding alone (1 image): {embed_ms:.1f} ms best of {args.runs}")
    if call_ab:
        print(f"one guided ControlNet call (batch 2), best of {args.runs}: hint as pixels {call_ab['pixels']:.0f} ms, "
              f"as features {call_ab['features']:.0f} ms")
    if gen_ab:
        for name, v in gen_ab.items():
            print(f"generate() with the hint embedded {name.replace('_', ' ')}: wall best {min(v['wall']):.0f} / "
                  f"median {statistics.median(v['wall']):.0f} ms, CPU best {min(v['cpu']):.0f} / "
                  f"median {statistics.median(v['cpu']):.0f} ms")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
