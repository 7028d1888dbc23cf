"""Command line: ``python -m ldm_engine generate ...`` (also installed as ``ldm-engine``).

    python -m ldm_engine generate --model stabilityai/sd-turbo --prompt "a cat" --out cat.png
    python -m ldm_engine generate --prompt "a red circle on a blue background"   # the built-in demo model
    python -m ldm_engine generate --model google/ddpm-cifar10-32 --steps 1000 --out ddpm.png  # no prompt

Writes the image(s) and prints a per-stage timing table. Bad arguments exit with status 2 and a
one-line message.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEMO_PROMPT = "a red circle on a blue background"


def _size(text: str) -> tuple[int, int]:
    """"WIDTHxHEIGHT" or a single number for a square -> (height, width)."""
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size must look like 512x512 (WIDTHxHEIGHT) or 512, got {text!r}") from None
    if len(parts) == 1:
        return parts[0], parts[0]
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"--size must look like 512x512 (WIDTHxHEIGHT) or 512, got {text!r}")
    return parts[1], parts[0]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ldm_engine", description="Fast latent-diffusion inference.")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate an image (text-to-image, img2img, inpainting or ControlNet)",
                       description="Generate image(s). Without --model, runs the built-in demo model (\"demo\": 64x64 "
                                   "colored shapes, prompts like 'a red circle on a blue background').")
    g.add_argument("--model", help="diffusers pipeline folder, single-file .safetensors checkpoint, or Hugging Face repo id "
                                   "(in the local cache), "
                                   "e.g. stabilityai/sd-turbo; omitted: the built-in demo model \"demo\"")
    g.add_argument("--prompt", default=None, help=f"text prompt (default with the demo model: {DEMO_PROMPT!r}; "
                                                  "none for unconditional models such as DDPM's)")
    g.add_argument("--negative-prompt", default=None)
    g.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model family's)")
    g.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale; <= 1 turns it off")
    g.add_argument("--size", type=_size, default=None, metavar="WxH", help="image size, e.g. 512x512")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--num-images", type=int, default=1, help="images per prompt (one batch)")
    g.add_argument("--image", type=Path, help="init image for img2img (or the image to inpaint, with --mask)")
    g.add_argument("--mask", type=Path, help="inpainting mask for --image: white is repainted, black kept")
    g.add_argument("--strength", type=float, default=None,
                   help="img2img / inpainting strength in (0, 1] (inpainting default 1.0)")
    g.add_argument("--controlnet", action="append", default=[], metavar="PATH",
                   help="ControlNet folder or repo id; repeat for multi-ControlNet")
    g.add_argument("--control-image", action="append", default=[], type=Path, metavar="IMG",
                   help="control image, one per --controlnet, in the same order")
    g.add_argument("--control-scale", action="append", default=[], type=float, metavar="S",
                   help="ControlNet conditioning scale (one, or one per --controlnet; default 1.0)")
    g.add_argument("--scheduler", default=None, help="sampler: euler, euler_a, ddim, ddpm, dpmpp_2m, "
                                                     "dpmpp_2m_karras, lcm, pndm (default: the model's own)")
    g.add_argument("--vae", default=None, metavar="PATH",
                   help="a VAE replacing the model's: folder / repo id (AutoencoderKL or AutoencoderTiny, e.g. "
                        "madebyollin/taesd) or the original taesd_encoder/decoder .safetensors")
    g.add_argument("--preview-vae", default=None, metavar="PATH", help="VAE decoding the --preview-dir images "
                                                                      "(default: the model's VAE, or --vae)")
    g.add_argument("--preview-dir", type=Path, default=None, metavar="DIR",
                   help="write a preview PNG after every step: DIR/step-000.png, ...")
    g.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="LoRA adapter (.safetensors, or a folder / cached repo id holding one) at SCALE (default 1); "
                        "repeat for several")
    g.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: CUDA when present)")
    g.add_argument("--dtype", default=None, help="fp16, bf16 or fp32 (default: fp16 on CUDA, fp32 on CPU)")
    g.add_argument("--vae-dtype", default=None, help="fp16, bf16 or fp32 for the VAE (default: --dtype, but fp32 "
                                                     "for SDXL's VAE under fp16; bf16 halves its cost)")
    g.add_argument("--backend", default="torch", choices=("torch", "onnxruntime", "tensorrt"))
    g.add_argument("--engine-dir", default=None, help="exported engines (for --backend onnxruntime/tensorrt)")
    g.add_argument("--out", type=Path, default=Path("out.png"), help="output PNG (several images: out-0.png, ...)")
    return parser


def format_timings(timings: dict) -> str:
    rows = [("text_encoder", timings.get("text_encoder", 0.0), "")]
    if timings.get("vae_encode"):
        rows.append(("vae_encode", timings["vae_encode"], ""))
    if timings.get("controlnet_hint"):
        rows.append(("controlnet_hint", timings["controlnet_hint"], "control images embedded, once"))
    for stage in ("controlnet", "unet"):
        steps = timings.get(stage) or []
        if steps:
            rows.append((stage, sum(steps), f"{len(steps)} step(s), {sum(steps) / len(steps):.1f} ms/step"))
    rows.append(("vae_decode", timings.get("vae_decode", 0.0), ""))
    rows.append(("total", timings.get("total", 0.0), "wall clock, incl. checks and image conversion"))
    lines = [f"{'stage':<16}{'ms':>10}  note", "-" * 60]
    lines += [f"{name:<16}{ms:>10.1f}  {note}".rstrip() for name, ms, note in rows]
    return "\n".join(lines)


def _open_image(path: Path):
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None


def _preview_writer(engine, folder: Path):
    """A generate() callback writing each step's preview to folder/step-NNN[-i].png (through the
    preview VAE, else the model's own VAE)."""
    if engine.preview_vae is None:
        engine.preview_vae = engine.components.vae
    folder.mkdir(parents=True, exist_ok=True)

    def write(step):
        images = step.preview()
        for i, img in enumerate(images):
            img.save(folder / (f"step-{step.index:03d}.png" if len(images) == 1 else f"step-{step.index:03d}-{i}.png"))

    return write


def _generate(args) -> int:
    from ldm_engine.engine import Engine

    demo = args.model is None
    if demo and (args.controlnet or args.backend != "torch"):
        raise ValueError("--controlnet and --backend need --model: the demo model has no ControlNet or export")
    controlnet = args.controlnet if len(args.controlnet) != 1 else args.controlnet[0]
    engine = Engine.from_pretrained("demo" if demo else args.model, device=args.device, dtype=args.dtype,
                                    backend=args.backend, controlnet=controlnet or None, scheduler=args.scheduler,
                                    engine_dir=args.engine_dir, vae=args.vae, preview_vae=args.preview_vae,
                                    vae_dtype=args.vae_dtype)
    unconditional = engine.family == "pixel"  # a DDPM / DDIM UNet2DModel: no prompt, no VAE
    controlnets = getattr(engine, "controlnets", ())
    if len(args.control_image) != len(controlnets) and not unconditional:
        raise ValueError(f"give one --control-image per --controlnet ({len(controlnets)}), "
                         f"got {len(args.control_image)}")
    if args.lora:
        if unconditional:
            raise ValueError("--lora applies to text-to-image models; this one is unconditional")
        from ldm_engine.loading.lora import parse_lora_spec

        for spec in args.lora:
            path, scale = parse_lora_spec(spec)
            engine.load_lora(path, scale=scale)
    control = [_open_image(p) for p in args.control_image]
    scales = args.control_scale or [1.0]
    height, width = args.size if args.size else (None, None)
    prompt = args.prompt if args.prompt is not None else (DEMO_PROMPT if demo else None)
    if prompt is None and not unconditional:
        raise ValueError("--prompt is required with --model (except for unconditional models such as DDPM's)")
    cond = {}  # unconditional models refuse conditioning that is given, so only pass what was
    if args.control_scale or not unconditional:
        cond["controlnet_conditioning_scale"] = scales[0] if len(scales) == 1 else scales
    if args.mask:
        cond["mask_image"] = _open_image(args.mask)
    if args.preview_dir:
        cond["callback"] = _preview_writer(engine, args.preview_dir)

    result = engine.generate(
        prompt, negative_prompt=args.negative_prompt, height=height, width=width,
        num_inference_steps=args.steps, guidance_scale=args.guidance, seed=args.seed,
        image=_open_image(args.image) if args.image else None, strength=args.strength,
        control_image=(control[0] if len(control) == 1 else control) or None,
        num_images_per_prompt=args.num_images, output_type="pil", **cond)

    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out] if len(result.images) == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix or '.png'}")
                                                   for i in range(len(result.images))]
    for img, path in zip(result.images, paths):
        img.save(path)

    w, h = result.images[0].size
    turbo = getattr(getattr(engine, "defaults", None), "turbo", False)
    print(f"model:   {engine.name}  ({engine.family}{', turbo' if turbo else ''}; "
          f"{engine.device}, {str(engine.dtype).replace('torch.', '')}, sampler {engine.scheduler})")
    print(f"prompt:  {'(unconditional)' if unconditional else repr(prompt)}  seed {result.seed}, {w}x{h}")
    if getattr(engine, "loras", None):
        print(f"loras:   {', '.join(f'{n} ({s:g})' for n, s in engine.loras.items())}")
    print(f"wrote:   {', '.join(str(p) for p in paths)}")
    print()
    print(format_timings(result.timings))
    if demo:
        print()
        print("NOTE: this was the built-in demo model (\"demo\", ldm_engine/data/demo): a 2.8M-parameter model trained\n"
              "on synthetic 64x64 pictures. It draws only prompts of the form\n"
              "  \"a {color} {circle|square|triangle} on a {color} background\"\n"
              "with colors red, green, blue, yellow, white, black (about 90 % of its pictures are fully right).\n"
              "For other prompts point --model at real weights, e.g.\n"
              "  python -m ldm_engine generate --model stabilityai/sd-turbo --prompt \"a cat\" --out cat.png\n"
              "(--model takes a diffusers pipeline folder, or a Hugging Face repo id already in the local cache).")
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "generate":
            return _generate(args)
    except (ValueError, FileNotFoundError) as e:
        # ldm_engine's input and checkpoint errors are ValueErrors naming the problem: one line, no traceback.
        print(f"error: {e}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
