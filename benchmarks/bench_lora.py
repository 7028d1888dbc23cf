"""LoRA adapters on an SD1.5-size U-Net: time to load, to switch between adapters, to unload; host memory.

The U-Net is the real SD1.5 architecture (ldm_engine/configs/sd15/unet.json) with random weights;
the adapters are kohya-format files of rank ``--rank`` (default 64) over every attention projection
(attn1 / attn2 to_q, to_k, to_v, to_out.0: 128 layers), written to a temporary folder. Rows (wall
clock with a device synchronisation after each call, best / median of ``--runs``):

- ``load``: ``LoraWeights.load`` (read + check the file, keep the originals, merge) of a fresh adapter;
- ``switch``: ``set_lora_scales({a: 0, b: 1})`` then back, with both adapters loaded -- the
  operation a server runs between two requests (target on a GPU: <= 20 ms);
- ``scale``: one adapter to a new scale;
- ``unload``: ``unload()`` of both (all originals written back).

Host memory: the bytes of kept originals (``host_bytes``) and the process RSS growth over the run.
The same code path as ``Engine.load_lora`` (which only adds the text encoders):

    python benchmarks/bench_lora.py                       # CPU, fp32
    python benchmarks/bench_lora.py --device cuda --dtype fp16 --runs 20 --json lora.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (benchmarks/common.py)

sys.path.insert(1, str(common.REPO_ROOT))
from ldm_engine.models.unet import UNet2DConditionModel, UNetConfig  # noqa: E402
from ldm_engine.pipeline.lora import LoraWeights  # noqa: E402

ATTN = ("to_q", "to_k", "to_v", "to_out.0")


def build_unet(device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    config = json.loads((common.REPO_ROOT / "ldm_engine" / "configs" / "sd15" / "unet.json").read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel(UNetConfig.from_dict(config))
    unet = unet.to_empty(device=device).to(dtype)
    g = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0.0, 0.02, generator=g)
    return unet.eval()


def write_adapter(path: Path, unet: torch.nn.Module, rank: int, seed: int) -> Path:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, m in unet.named_modules():
        if isinstance(m, torch.nn.Linear) and name.endswith(ATTN) and ".attn" in name:
            key = "lora_unet_" + name.replace(".", "_")
            tensors[f"{key}.lora_down.weight"] = torch.randn(rank, m.in_features, generator=g).half() * 0.01
            tensors[f"{key}.lora_up.weight"] = torch.randn(m.out_features, rank, generator=g).half() * 0.01
            tensors[f"{key}.alpha"] = torch.tensor(float(rank) / 2)
    save_file(tensors, str(path))
    return path


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _timed(fn, device: torch.device) -> float:
    common.synchronize(device)
    t0 = time.perf_counter()
    fn()
    common.synchronize(device)
    return (time.perf_counter() - t0) * 1000.0


def measure(device: torch.device, dtype: torch.dtype, rank: int, runs: int) -> dict:
    unet = build_unet(device, dtype)
    with tempfile.TemporaryDirectory() as tmp:
        a = write_adapter(Path(tmp) / "a.safetensors", unet, rank, 1)
        b = write_adapter(Path(tmp) / "b.safetensors", unet, rank, 2)
        file_mb = a.stat().st_size / 2**20
        weights = LoraWeights({"unet": unet, "text_encoder": None, "text_encoder_2": None})
        rss0 = _rss_bytes()
        times = {"load": [], "switch": [], "scale": [], "unload": []}
        layers = 0
        for i in range(runs + 1):  # the first round warms up (allocator, file cache)
            t_load = _timed(lambda: weights.load(a, name="a"), device)
            weights.load(b, name="b", scale=0.0)
            layers = len(weights.adapters["a"].layers)
            t_switch = [_timed(lambda: weights.set_scales({"a": 0.0, "b": 1.0}), device),
                        _timed(lambda: weights.set_scales({"a": 1.0, "b": 0.0}), device)]
            t_scale = _timed(lambda: weights.set_scales({"a": 0.5}), device)
            host = weights.host_bytes
            t_unload = _timed(lambda: weights.unload(), device)
            if i:
                times["load"].append(t_load)
                times["switch"] += t_switch
                times["scale"].append(t_scale)
                times["unload"].append(t_unload)
        rss_growth = _rss_bytes() - rss0
    return {"times": {k: common.stats(v) for k, v in times.items()}, "layers": layers, "file_mb": file_mb,
            "host_bytes": host, "rss_growth_bytes": rss_growth}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=("fp32", "fp16", "bf16"),
                        help="U-Net weights (default: fp16 on CUDA, fp32 on CPU)")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", help="write the results and the environment here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
        args.dtype or ("fp16" if device.type == "cuda" else "fp32")]
    env = common.environment(device)
    r = measure(device, dtype, args.rank, args.runs)
    print("\n".join(common.environment_lines(env)))
    print(f"SD1.5 U-Net (random weights, {str(dtype).replace('torch.', '')}) on {device}; rank-{args.rank} adapters "
          f"over {r['layers']} attention layers ({r['file_mb']:.1f} MiB file each); {args.runs} runs\n")
    rows = [[name, s["min"], s["median"], s["max"]] for name, s in r["times"].items()]
    print(common.format_table(["operation", "ms (best)", "ms (median)", "ms (max)"], rows,
                              formats=[None, ".1f", ".1f", ".1f"]))
    print(f"\nkept originals (host): {r['host_bytes'] / 2**20:.1f} MiB; "
          f"process RSS growth over the run: {r['rss_growth_bytes'] / 2**20:.1f} MiB")
    if args.json:
        common.write_json(args.json, {"environment": env, "device": str(device), "dtype": str(dtype),
                                      "rank": args.rank, "runs": args.runs, **r})
        print(f"wrote {args.json}")
    return 0


def test_bench_lora_switch_tiny_rank(benchmark):
    """pytest-benchmark entry (``python -m pytest benchmarks/bench_lora.py``): one switch, rank 8."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    unet = build_unet(device, torch.float16 if device.type == "cuda" else torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        weights = LoraWeights({"unet": unet, "text_encoder": None, "text_encoder_2": None})
        weights.load(write_adapter(Path(tmp) / "a.safetensors", unet, 8, 1), name="a")
        weights.load(write_adapter(Path(tmp) / "b.safetensors", unet, 8, 2), name="b", scale=0.0)
        state = {"a": 1.0}

        def switch():
            state["a"], b = 1.0 - state["a"], state["a"]
            weights.set_scales({"a": state["a"], "b": b})
            common.synchronize(device)

        benchmark(switch)
        weights.unload()


if __name__ == "__main__":
    sys.exit(main())
