"""``python -m ldm_engine.export MODEL --out DIR [options]``: the build step's command line."""

from __future__ import annotations

import argparse
import sys

from ldm_engine.loading.lora import parse_lora_spec

from .contracts import NETWORK_KINDS
from .exporter import EXPORT_DTYPES, FORMATS, ExportOptionError, ExportOptions, export_model

DESCRIPTION = """\
Export a latent-diffusion model's networks to ONNX (and build TensorRT engines from them) so that
ldm_engine can run them with backend="onnxruntime" or backend="tensorrt":

  python -m ldm_engine.export stabilityai/sd-turbo --out sd-turbo-onnx
  python -m ldm_engine.export ./sdxl --out sdxl-trt --format tensorrt --device cuda --dtype fp16 \\
      --height 1024 --width 1024 --batch 1

  Engine.from_pretrained("stabilityai/sd-turbo", backend="onnxruntime", engine_dir="sd-turbo-onnx")

DIR receives one file per network (unet.onnx, vae_decoder.onnx, ...; with --format tensorrt also
<network>.<key>.plan engines), the model and scheduler configs, the tokenizers, and manifest.json
(versions, shapes, sha256 and purpose of every file, hash of the source weights)."""

EPILOG = """\
Shapes: U-Net, ControlNet and text encoders accept a batch of MIN to 2*MAX (classifier-free
guidance doubles it). ONNX files accept any size; TensorRT engines only the given ranges, tuned for
OPT (static when MIN = OPT = MAX, the fastest case).
Rerunning the export into the same DIR replaces its files; TensorRT engines whose cache key (weights,
shapes, precision, TensorRT version, GPU) still matches are reused, stale ones are rebuilt."""


def parse_range(text: str, what: str) -> tuple[int, int, int]:
    parts = text.split(":")
    if len(parts) not in (1, 3):
        raise argparse.ArgumentTypeError(f"{what}: expected N or MIN:OPT:MAX, got {text!r}")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what}: expected integers, got {text!r}") from None
    if len(values) == 1:
        values = values * 3
    lo, opt, hi = values
    if lo < 1:
        raise argparse.ArgumentTypeError(f"{what}: values must be positive, got {text!r}")
    if not lo <= opt <= hi:
        raise argparse.ArgumentTypeError(f"{what}: need MIN <= OPT <= MAX, got {text!r}")
    if what != "batch":
        bad = [v for v in values if v % 8]
        if bad:
            raise argparse.ArgumentTypeError(f"{what}: {bad[0]} px is not a multiple of 8")
    return values


def parse_components(text: str) -> tuple[str, ...]:
    items = tuple(c.strip() for c in text.split(","))
    unknown = [c for c in items if c not in NETWORK_KINDS]
    if unknown or not any(items):
        raise argparse.ArgumentTypeError(f"unknown component(s) {', '.join(map(repr, unknown)) or '(empty)'}; "
                                         f"choose from {','.join(NETWORK_KINDS)}")
    return items


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ldm_engine.export", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL",
                   help="diffusers model folder, single-file checkpoint, or Hub id already in the local cache")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output directory (created; must be empty, new, or hold an earlier export of this model)")
    p.add_argument("--format", default="onnx", choices=FORMATS,
                   help="onnx: ONNX files for ONNX Runtime; tensorrt: ONNX files plus TensorRT engines built for "
                        "this machine's GPU (needs the tensorrt package and a CUDA GPU). Default: onnx")
    p.add_argument("--components", type=parse_components, default=None, metavar="LIST",
                   help=f"comma-separated networks to export, from {','.join(NETWORK_KINDS)} "
                        f"(text_encoder includes SDXL's second one; controlnet also exports a U-Net variant taking "
                        f"ControlNet residuals). Default: all, controlnet only with --controlnet")
    p.add_argument("--height", type=lambda s: parse_range(s, "height"), default=None, metavar="MIN:OPT:MAX",
                   help="image heights in pixels, multiples of 8 (or one value N: static). "
                        "Default: 256:NATIVE:1024 with NATIVE the model's own resolution")
    p.add_argument("--width", type=lambda s: parse_range(s, "width"), default=None, metavar="MIN:OPT:MAX",
                   help="image widths in pixels, like --height")
    p.add_argument("--batch", type=lambda s: parse_range(s, "batch"), default=None, metavar="MIN:OPT:MAX",
                   help="images per prompt batch (or one value N: static). Default: 1:1:4")
    p.add_argument("--dtype", default=None, choices=EXPORT_DTYPES,
                   help="precision of the exported networks. Default: fp16 with --device cuda, else fp32. bf16 only "
                        "with --format tensorrt. A VAE whose config says force_upcast (SDXL) stays fp32 under fp16")
    p.add_argument("--controlnet", action="append", default=[], metavar="PATH",
                   help="a ControlNet (folder, file or cached Hub id) to export with the model; repeat for several")
    p.add_argument("--vae", default=None, metavar="PATH",
                   help="a VAE exported instead of the model's (folder, file or cached Hub id; e.g. TAESD / TAESDXL, "
                        "as Engine.from_pretrained(vae=...)); the exported vae_decoder / vae_encoder are then its")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="a LoRA adapter (.safetensors, or a folder / cached Hub id holding pytorch_lora_weights."
                        "safetensors) baked into the exported U-Net and text encoders at SCALE (default 1); "
                        "repeat for several")
    p.add_argument("--device", default="cpu",
                   help="where the model runs while exporting: cpu or cuda (cuda:N). Default: cpu")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset, 17 or newer. Default: 17")
    p.add_argument("--overwrite", action="store_true",
                   help="allow DIR to hold files of another model (they are replaced)")
    p.add_argument("--verify", action="store_true",
                   help="after exporting, run each fp32 ONNX file in ONNX Runtime (CPU) against the torch module on "
                        "random inputs and record the relative error in the manifest")
    p.add_argument("--trt-typing", default="strong", choices=("strong", "weak"), dest="typing",
                   help="TensorRT precision mode: strong (default): the ONNX file carries --dtype and TensorRT keeps "
                        "it; weak: ONNX in fp32, TensorRT may use --dtype per layer (BuilderFlag.FP16/BF16; "
                        "TensorRT 10 only, deprecated since 10.12)")
    p.add_argument("--workspace", type=float, default=None, metavar="GIB",
                   help="TensorRT builder workspace limit in GiB. Default: TensorRT's (the GPU's memory)")
    p.add_argument("--timing-cache", default=None, metavar="FILE",
                   help="TensorRT timing cache file, read and updated (default: DIR/timing.cache)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p


def options_from_args(args: argparse.Namespace) -> ExportOptions:
    return ExportOptions(fmt=args.format, components=args.components, batch=args.batch, height=args.height,
                         width=args.width, dtype=args.dtype, controlnets=tuple(args.controlnet), device=args.device,
                         opset=args.opset, overwrite=args.overwrite, typing=args.typing,
                         workspace_gib=args.workspace, timing_cache=args.timing_cache, verify=args.verify,
                         progress=not args.quiet, vae=args.vae,
                         loras=tuple(parse_lora_spec(s) for s in args.lora))


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        export_model(args.model, args.out, options_from_args(args),
                     log=(lambda *a, **k: None) if args.quiet else print)
    except (ExportOptionError, ValueError, FileNotFoundError) as e:
        # bad options, another model's DIR, unloadable checkpoint: a message, not a traceback
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
