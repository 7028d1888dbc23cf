"""End-to-end pipeline benchmark: ldm_engine against diffusers on the same random weights and device.

Models (the real architectures from ldm_engine/configs; random weights have the real cost):
    sd-turbo     SD2.1 layout, 512x512, 1 step, guidance 0 (Euler, trailing)
    sdxl-turbo   SDXL layout, 512x512, 1 step, guidance 0 (Euler ancestral, trailing)
    sd15         SD1.5 layout, 512x512, 25 steps, CFG 7.5 with a negative prompt (PNDM/PLMS: 26 U-Net calls)
    tiny         ldm_engine/configs/tiny (SD1 layout at toy size, 128x128, 2 steps, CFG): the CPU smoke check
    ddpm-cifar10 the DDPM paper's CIFAR-10 UNet2DModel (pixel space, no text encoder or VAE), 32x32,
                 1000 DDPM steps (1000 U-Net calls); by default only ldm_engine[torch] with and without
                 channels_last / CUDA graphs, against diffusers' DDPMPipeline. In --model all (run_gpu.sh all),
                 not in run_gpu.sh's session (SD-Turbo only)

The first run writes a diffusers-format folder per model (fp16 safetensors for GPU runs, fp32 for CPU
runs; seeded random init; the shipped CLIP vocabulary) under --weights-dir and reuses it afterwards. Both
ldm_engine (Engine.from_pretrained) and diffusers (from_pretrained) load that folder.

Variants, side by side on one device:
    ldm_engine[torch|triton|cuda]   Engine with the ops backend forced through LDM_ENGINE_BACKEND
                                    (an input a backend cannot take still falls back to torch)
    diffusers                       StableDiffusion(XL)Pipeline, eager
    diffusers+compile               the same with torch.compile on the U-Net and VAE decoder (--compile)
    ldm_engine[torch]+compile       Engine.compile(): torch.compile (fullgraph) on U-Net, ControlNets, VAE decoder (--compile)
    ldm_engine[torch|cuda]+graphs   Engine.enable_cuda_graphs(): every network call replayed from a CUDA graph (no compile)
    ...+channels_last[+graphs]      Engine.use_channels_last(): NHWC convolution weights and activations
    ldm_engine[torch|cuda]+tiny_vae[+graphs]  the VAE swapped for a random-weight tiny one (TAESD / TAESDXL
                                    architecture, ldm_engine.models.vae_tiny): full vs tiny decoder; its images
                                    differ from the reference's by design (another VAE)
    ...+subpixel                    Engine.use_subpixel_upsample(): every nearest-2x upsample + 3x3 conv as four
                                    2x2 phase convolutions (2.25x fewer FLOPs there); compare ldm_engine[torch]+subpixel
                                    with ldm_engine[torch], ldm_engine[cuda]+channels_last+subpixel+graphs with
                                    ldm_engine[cuda]+channels_last+graphs. TFLOP/s still counts the plain path's FLOPs

Per variant: per-stage latency (text encoder incl. tokenisation, U-Net per call, VAE decode; CUDA events),
end-to-end latency (host clock between two device synchronisations), medians of --runs after --warmup,
images/s, peak GPU memory, FLOP/s achieved against the bf16 matmul rate measured in the same run, and the
largest pixel difference against the reference variant (diffusers eager) as a sanity check.

    python benchmarks/bench_pipeline.py --model sd-turbo --device cuda --runs 10
    python benchmarks/bench_pipeline.py --model all --compile --json out.json --markdown out.md
    python benchmarks/bench_pipeline.py --tiny          # CPU smoke run, seconds
    python benchmarks/bench_pipeline.py --model sd-turbo --images-per-prompt 8 \
        --variants "ldm_engine[torch],ldm_engine[torch]+tiny_vae,ldm_engine[cuda]+tiny_vae+graphs"  # tiny-VAE targets
    python -m pytest benchmarks/bench_pipeline.py      # pytest-benchmark: tiny on CPU, full size on CUDA
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import gzip
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

# Quiet the Hugging Face libraries (progress bars, optional-dependency notes) before they are imported.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")   # everything is local; never reach for the network

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (benchmarks/common.py, importable whether run as a script or under pytest)

REPO_ROOT = common.REPO_ROOT
CONFIG_ROOT = REPO_ROOT / "ldm_engine" / "configs"
VOCAB_DIR = REPO_ROOT / "ldm_engine" / "data" / "clip"
FLOPS_FILE = Path(__file__).resolve().parent / "flops.json"
DEFAULT_WEIGHTS_DIR = Path(os.environ.get("LDM_BENCH_WEIGHTS", Path(tempfile.gettempdir()) / "ldm_engine_bench_weights"))

PROMPT = "a photograph of an astronaut riding a horse on the moon, highly detailed"
NEGATIVE_PROMPT = "blurry, low quality, deformed"
OPS_BACKENDS = ("torch", "triton", "cuda")
ENGINE_VARIANTS = tuple(f"ldm_engine[{b}]" for b in OPS_BACKENDS)
# Engine options as suffixes, applied to the shared engine for one variant and undone after it.
OPTION_VARIANTS = ("ldm_engine[torch]+graphs", "ldm_engine[cuda]+graphs",
                  "ldm_engine[torch]+channels_last", "ldm_engine[cuda]+channels_last",
                  "ldm_engine[torch]+channels_last+graphs", "ldm_engine[cuda]+channels_last+graphs")
TINY_VAE_VARIANTS = ("ldm_engine[torch]+tiny_vae", "ldm_engine[cuda]+tiny_vae",
                     "ldm_engine[torch]+tiny_vae+graphs", "ldm_engine[cuda]+tiny_vae+graphs")
# Sub-pixel upsampling: eager against ldm_engine[torch], and in the fastest configuration against
# ldm_engine[cuda]+channels_last+graphs.
SUBPIXEL_VARIANTS = ("ldm_engine[torch]+subpixel", "ldm_engine[cuda]+channels_last+subpixel+graphs")
COMPILED_VARIANTS = ("ldm_engine[torch]+compile", "diffusers+compile")
ALL_VARIANTS = (ENGINE_VARIANTS + ("diffusers",) + OPTION_VARIANTS + TINY_VAE_VARIANTS + SUBPIXEL_VARIANTS
                + COMPILED_VARIANTS)
# Run order inside one model: the new GPU kernels (which could poison the CUDA context) after the two
# baselines; the compiled variants last, since compilation is slow and may run out of the time budget
# (and Engine.compile() changes the shared engine in place). The newest options come just before them, so
# a time budget cuts them before any older row.
RUN_ORDER = ("ldm_engine[torch]", "diffusers", "ldm_engine[triton]", "ldm_engine[cuda]", *OPTION_VARIANTS,
             *TINY_VAE_VARIANTS, *SUBPIXEL_VARIANTS, *COMPILED_VARIANTS)
REFERENCE_VARIANT = "diffusers"


def _ops_backend_of(variant: str) -> str:
    """"ldm_engine[triton]" -> "triton" (also with "+compile", "+graphs", "+channels_last", ... suffixes)."""
    return variant[len("ldm_engine["):variant.index("]")]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    config_dir: str          # folder under ldm_engine/configs
    pipeline: str            # diffusers pipeline class
    height: int
    width: int
    steps: int
    guidance: float
    full_size: bool = True   # needs CUDA in the default modes
    images: int = 1          # images per call (num_images_per_prompt; --images-per-prompt)
    variants: tuple = ()     # the variants run without --variants (empty: all)

    @property
    def sdxl(self) -> bool:
        return self.pipeline == "StableDiffusionXLPipeline"

    @property
    def pixel(self) -> bool:
        """An unconditional pixel-space model (UNet2DModel, PixelEngine): no prompt, text encoder or VAE."""
        return self.pipeline == "DDPMPipeline"

    @property
    def cfg(self) -> bool:
        return self.guidance > 1.0


MODELS = {
    "sd-turbo": ModelSpec("sd-turbo", "sd-turbo", "StableDiffusionPipeline", 512, 512, 1, 0.0),
    "sdxl-turbo": ModelSpec("sdxl-turbo", "sdxl-turbo", "StableDiffusionXLPipeline", 512, 512, 1, 0.0),
    "sd15": ModelSpec("sd15", "sd15", "StableDiffusionPipeline", 512, 512, 25, 7.5),
    "tiny": ModelSpec("tiny", "tiny", "StableDiffusionPipeline", 128, 128, 2, 5.0, full_size=False),
    "ddpm-cifar10": ModelSpec("ddpm-cifar10", "ddpm-cifar10", "DDPMPipeline", 32, 32, 1000, 0.0,
                              variants=("ldm_engine[torch]", "diffusers", "ldm_engine[torch]+channels_last",
                                        "ldm_engine[torch]+graphs", "ldm_engine[torch]+channels_last+graphs")),
}
FULL_MODELS = tuple(n for n, s in MODELS.items() if s.full_size)


# ============================================================================ random-weight folders

def _component_json(config_dir: Path, name: str) -> dict:
    """Config of one component: ``<dir>/<name>.json`` (flat sets) or ``<dir>/<name>/config.json``."""
    for path in (config_dir / f"{name}.json", config_dir / name / "config.json"):
        if path.is_file():
            return json.loads(path.read_text())
    raise FileNotFoundError(f"no {name} config in {config_dir}")


def _scheduler_json(config_dir: Path) -> dict:
    for path in (config_dir / "scheduler_config.json", config_dir / "scheduler" / "scheduler_config.json"):
        if path.is_file():
            return json.loads(path.read_text())
    raise FileNotFoundError(f"no scheduler config in {config_dir}")


def _tokenizer_json(config_dir: Path, name: str) -> dict:
    """tokenizer_config.json of the set when it has one, else the standard CLIP-L one (pad <|endoftext|>)."""
    path = config_dir / f"{name}_config.json"
    if not path.is_file():
        path = config_dir / name / "tokenizer_config.json"
    if path.is_file():
        return json.loads(path.read_text())
    return {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
            "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
            "pad_token": "<|endoftext|>"}


def _write_tokenizer(folder: Path, config: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        with gzip.open(VOCAB_DIR / f"{name}.gz", "rb") as src:
            (folder / name).write_bytes(src.read())
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if k in config}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))


def _build_meta_models(spec: ModelSpec, configs: dict) -> dict:
    """ldm_engine's own models on the meta device (state-dict keys = diffusers / published CLIP keys)."""
    from ldm_engine.models.clip import CLIPTextConfig, CLIPTextModel
    from ldm_engine.models.unet import UNet2DConditionModel, UNetConfig
    from ldm_engine.models.unet_2d import UNet2DConfig, UNet2DModel
    from ldm_engine.models.vae import AutoencoderKL, VAEConfig

    with torch.device("meta"):
        if spec.pixel:
            return {"unet": UNet2DModel(UNet2DConfig.from_dict(configs["unet"]))}
        models = {
            "unet": UNet2DConditionModel(UNetConfig.from_dict(configs["unet"])),
            "vae": AutoencoderKL(VAEConfig.from_dict(configs["vae"])),
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_dict(configs["text_encoder"])),
        }
        if spec.sdxl:
            models["text_encoder_2"] = CLIPTextModel(CLIPTextConfig.from_dict(configs["text_encoder_2"]),
                                                     with_projection=True)
    return models


def _random_state_dict(model: torch.nn.Module, *, seed: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Random weights shaped like PyTorch's default init (uniform +-1/sqrt(fan_in) for Linear/Conv,
    N(0, 0.02) embeddings, norms ~1 / ~0): activations stay finite in fp16 at full depth, and nothing
    is zero (zeros can run faster than real data). Each tensor has its own seed, so the result does not
    depend on the order of keys."""
    from torch import nn

    out = {}
    for mod_name, mod in model.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            key = f"{mod_name}.{p_name}" if mod_name else p_name
            gen = torch.Generator(device).manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % 2**63)
            shape = tuple(p.shape)
            if isinstance(mod, (nn.Linear, nn.Conv2d, nn.Conv1d)):
                fan_in = math.prod(mod.weight.shape[1:])
                bound = 1.0 / math.sqrt(max(fan_in, 1))
                t = (torch.rand(shape, generator=gen, device=device) * 2.0 - 1.0) * bound
            elif isinstance(mod, (nn.GroupNorm, nn.LayerNorm)):
                noise = torch.randn(shape, generator=gen, device=device) * 0.02
                t = 1.0 + noise if p_name == "weight" else noise
            else:  # embeddings and any free parameter
                t = torch.randn(shape, generator=gen, device=device) * 0.02
            out[key] = t.to(dtype).cpu()
    expected = set(model.state_dict().keys())
    missing = expected - set(out)
    if missing:  # persistent buffers would need their own rule; none of the models has any today
        raise RuntimeError(f"no random-init rule for state-dict entries {sorted(missing)[:5]}")
    return out


def _model_index(spec: ModelSpec, scheduler_class: str) -> dict:
    index = {
        "_class_name": spec.pipeline,
        "_diffusers_version": common._version("diffusers") or "0.42.1",
        "_ldm_engine_random_weights": "written by benchmarks/bench_pipeline.py: random weights, real architecture",
        "scheduler": ["diffusers", scheduler_class],
    }
    if spec.pixel:
        return {**index, "unet": ["diffusers", "UNet2DModel"]}
    index.update({
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    })
    if spec.sdxl:
        index.update({"text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                      "tokenizer_2": ["transformers", "CLIPTokenizer"], "force_zeros_for_empty_prompt": True})
    else:
        index.update({"safety_checker": [None, None], "requires_safety_checker": False})
    return index


def _component_names(spec: ModelSpec) -> list[str]:
    if spec.pixel:
        return ["unet"]
    return ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if spec.sdxl else [])


def write_random_pipeline(spec: ModelSpec, root: Path = DEFAULT_WEIGHTS_DIR, *, dtype: torch.dtype = torch.float16,
                          seed: int = 0, device: torch.device | str | None = None, log=print) -> Path:
    """A diffusers pipeline folder of ``spec`` with seeded random weights; written once, then reused."""
    from safetensors.torch import save_file

    dtype_name = str(dtype).replace("torch.", "")
    folder = Path(root) / f"{spec.name}-random-seed{seed}-{dtype_name}"
    if (folder / ".complete").is_file():
        return folder
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    config_dir = CONFIG_ROOT / spec.config_dir
    t0 = time.perf_counter()
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    configs = {name: _component_json(config_dir, name) for name in _component_names(spec)}
    models = _build_meta_models(spec, configs)
    n_params = 0
    for i, (name, model) in enumerate(models.items()):
        sd = _random_state_dict(model, seed=seed * 101 + i, dtype=dtype, device=device)
        n_params += sum(t.numel() for t in sd.values())
        (tmp / name).mkdir()
        config = dict(configs[name])
        if name in ("unet", "vae"):
            unet_class = "UNet2DModel" if spec.pixel else "UNet2DConditionModel"
            config.setdefault("_class_name", unet_class if name == "unet" else "AutoencoderKL")
            weights = "diffusion_pytorch_model.safetensors"
        else:
            config["architectures"] = ["CLIPTextModelWithProjection" if name == "text_encoder_2" else "CLIPTextModel"]
            weights = "model.safetensors"
        (tmp / name / "config.json").write_text(json.dumps(config, indent=2))
        save_file(sd, str(tmp / name / weights), metadata={"format": "pt"})
        del sd

    scheduler = _scheduler_json(config_dir)
    (tmp / "scheduler").mkdir()
    (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    if not spec.pixel:
        _write_tokenizer(tmp / "tokenizer", _tokenizer_json(config_dir, "tokenizer"))
    if spec.sdxl:
        _write_tokenizer(tmp / "tokenizer_2", _tokenizer_json(config_dir, "tokenizer_2"))
    (tmp / "model_index.json").write_text(json.dumps(_model_index(spec, scheduler["_class_name"]), indent=2))
    (tmp / ".complete").write_text(f"{n_params} parameters, {dtype_name}, seed {seed}\n")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    log(f"[{spec.name}] wrote {n_params / 1e9:.3f} B random {dtype_name} parameters to {folder} "
        f"in {time.perf_counter() - t0:.1f} s")
    return folder


# ============================================================================ FLOP counts

def count_flops(spec: ModelSpec, configs: dict | None = None, *, height: int, width: int) -> dict:
    """FLOPs (2 x MAC; conv/mm/bmm as torch's FlopCounterMode counts them) of one batch-1 call of each
    network: the copied reference counts (benchmarks/flops.json) at their size, else counted now on
    the meta device with ldm_engine's own models (identical numbers, seconds on a CPU)."""
    ref = json.loads(FLOPS_FILE.read_text()).get(spec.name)
    if ref and (height, width) == (512, 512):
        out = {"unet": ref["unet_64x64"], "vae_decode": ref["vae_decode_512"],
               "text_encoders": [ref["text_encoder_77tok"]] + ([ref["text_encoder_2_77tok"]] if spec.sdxl else []),
               "source": "benchmarks/flops.json"}
        return out
    from torch.utils.flop_counter import FlopCounterMode

    if configs is None:
        config_dir = CONFIG_ROOT / spec.config_dir
        configs = {n: _component_json(config_dir, n) for n in _component_names(spec)}
    models = _build_meta_models(spec, configs)
    if spec.pixel:
        unet = models["unet"]
        with torch.device("meta"), FlopCounterMode(display=False) as fc:
            unet(torch.randn(1, unet.config.in_channels, height, width), torch.tensor(999))
        return {"unet": fc.get_total_flops(), "vae_decode": 0, "text_encoders": [],
                "source": "FlopCounterMode (meta)"}
    unet, vae = models["unet"], models["vae"]
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    with torch.device("meta"):
        x = torch.randn(1, unet.config.in_channels, height // f, width // f)
        ehs = torch.randn(1, 77, unet.config.cross_attention_dim)
        extra = {}
        if spec.sdxl:
            extra = {"text_embeds": torch.randn(1, models["text_encoder_2"].config.projection_dim),
                     "time_ids": torch.randn(1, 6)}
        with FlopCounterMode(display=False) as fc:
            unet(x, torch.tensor(999.0), ehs, **extra)
        unet_flops = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc:
            vae.decode(torch.randn(1, vae.config.latent_channels, height // f, width // f))
        vae_flops = fc.get_total_flops()
        te = []
        for name in ("text_encoder", "text_encoder_2"):
            if name in models:
                with FlopCounterMode(display=False) as fc:
                    models[name](torch.zeros(1, 77, dtype=torch.long))
                te.append(fc.get_total_flops())
    return {"unet": unet_flops, "vae_decode": vae_flops, "text_encoders": te, "source": "FlopCounterMode (meta)"}


def tiny_vae_config(levels: int):
    """The TAESD / TAESDXL architecture (ldm_engine.models.vae_tiny) with ``levels`` levels (4: TAESD itself;
    the toy model's VAE has 3)."""
    from ldm_engine.models.vae_tiny import TinyVAEConfig

    return TinyVAEConfig(encoder_block_out_channels=(64,) * levels, decoder_block_out_channels=(64,) * levels,
                         num_encoder_blocks=(1,) + (3,) * (levels - 1), num_decoder_blocks=(3,) * (levels - 1) + (1,))


def count_tiny_vae_flops(levels: int, *, height: int, width: int) -> dict:
    """FLOPs of one batch-1 tiny-VAE decode / encode at height x width, counted with FlopCounterMode on meta."""
    from torch.utils.flop_counter import FlopCounterMode

    from ldm_engine.models.vae_tiny import AutoencoderTiny

    f = 2 ** (levels - 1)
    with torch.device("meta"):
        vae = AutoencoderTiny(tiny_vae_config(levels))
        with FlopCounterMode(display=False) as fc:
            vae.decode(torch.randn(1, 4, height // f, width // f))
        decode = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc:
            vae.encode(torch.randn(1, 3, height, width))
    return {"vae_decode": decode, "vae_encode": fc.get_total_flops()}


def swap_in_tiny_vae(engine, *, seed: int = 0):
    """Replaces the engine's VAE with a random-weight tiny one of the same factor (default init from a
    fixed seed); returns what restore_vae() needs."""
    from ldm_engine.models.vae_tiny import AutoencoderTiny

    levels = len(engine.components.vae.config.block_out_channels)
    dtype = next(engine.components.unet.parameters()).dtype
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tiny = AutoencoderTiny(tiny_vae_config(levels)).to(engine.device, dtype).eval().requires_grad_(False)
    saved = engine.components.vae, engine.vae_dtype
    engine.components.vae, engine.vae_dtype = tiny, dtype  # fp16 on CUDA: no fp32 rule for the tiny VAE
    return saved


def restore_vae(engine, saved) -> None:
    engine.components.vae, engine.vae_dtype = saved


# ============================================================================ runners

class _StageRecorder:
    """Wraps bound methods so each call records a (start, end) mark: CUDA events (no sync) or host time."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.spans: dict[str, list] = {}

    def _mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def wrap(self, obj, attr: str, stage: str) -> None:
        inner = getattr(obj, attr)

        def timed(*args, **kwargs):
            start = self._mark()
            out = inner(*args, **kwargs)
            self.spans.setdefault(stage, []).append((start, self._mark()))
            return out

        setattr(obj, attr, timed)   # an instance attribute shadows the class's method

    def reset(self) -> None:
        self.spans = {}

    def ms(self, stage: str) -> list[float]:
        """Durations of ``stage``'s calls; call after a device synchronisation."""
        pairs = self.spans.get(stage, [])
        if self.cuda:
            return [s.elapsed_time(e) for s, e in pairs]
        return [(e - s) * 1000.0 for s, e in pairs]


def _dtype_name(dtype) -> str | None:
    return None if dtype is None else str(dtype).replace("torch.", "")


def _to_images(images) -> torch.Tensor:
    """Any output_type -> float32 CPU tensor (N, 3, H, W) in [0, 1]."""
    import numpy as np

    if isinstance(images, torch.Tensor):
        return images.detach().float().cpu()
    if isinstance(images, np.ndarray):
        return torch.from_numpy(images).float().permute(0, 3, 1, 2)
    return torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
                        for im in images])


@contextlib.contextmanager
def _env(name: str, value: str | None):
    old = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


class Runner:
    """One variant, callable: each call is one full generation, synchronised before and after."""

    variant: str

    def __init__(self, spec: ModelSpec, device: torch.device, *, seed: int = 0, output_type: str = "pt"):
        self.spec, self.device, self.seed, self.output_type = spec, device, seed, output_type
        self.records: list[dict] = []
        self.last_images = None
        self.load_s = 0.0
        self.weights_bytes = 0
        self.vae_dtype = None

    def __call__(self):
        common.synchronize(self.device)
        t0 = time.perf_counter()
        images, stages = self._generate()
        common.synchronize(self.device)
        stages["total"] = (time.perf_counter() - t0) * 1000.0
        stages = self._finish(stages)
        self.records.append(stages)
        self.last_images = images
        return images

    def _finish(self, stages: dict) -> dict:
        return stages

    def _generate(self):
        raise NotImplementedError

    def close(self) -> None:
        pass


class EngineRunner(Runner):
    """ldm_engine.Engine on one ops backend (LDM_ENGINE_BACKEND); several runners can share one engine."""

    def __init__(self, spec, device, engine, ops_backend: str, **kw):
        super().__init__(spec, device, **kw)
        self.engine, self.ops_backend = engine, ops_backend
        self.variant = f"ldm_engine[{ops_backend}]"
        self.vae_dtype = _dtype_name(getattr(engine, "vae_dtype", None))  # a pixel model has no VAE

    @staticmethod
    def load(folder: Path, device: torch.device, dtype: torch.dtype):
        from ldm_engine import Engine

        return Engine.from_pretrained(str(folder), device=device, dtype=dtype)

    def close(self) -> None:
        if self.variant.endswith("+graphs"):  # the engine is shared with the later variants
            self.engine.disable_cuda_graphs()
        if "+channels_last" in self.variant:
            self.engine.use_channels_last(False)
        if "+subpixel" in self.variant:
            self.engine.use_subpixel_upsample(False)
        if getattr(self, "saved_vae", None) is not None:
            restore_vae(self.engine, self.saved_vae)
            self.saved_vae = None
            self.vae_dtype = _dtype_name(self.engine.vae_dtype)

    def _generate(self):
        s = self.spec
        with _env("LDM_ENGINE_BACKEND", self.ops_backend):
            if s.pixel:  # PixelEngine: no prompt; its timings hold only the U-Net calls
                res = self.engine.generate(num_inference_steps=s.steps, num_images_per_prompt=s.images,
                                           seed=self.seed, output_type=self.output_type)
                return res.images, {"text_encoder": 0.0, "unet": list(res.timings["unet"]), "vae_decode": 0.0}
            res = self.engine.generate(PROMPT, negative_prompt=NEGATIVE_PROMPT if s.cfg else None,
                                       height=s.height, width=s.width, num_inference_steps=s.steps,
                                       num_images_per_prompt=s.images,
                                       guidance_scale=s.guidance, seed=self.seed, output_type=self.output_type)
        t = res.timings
        return res.images, {"text_encoder": t["text_encoder"], "unet": list(t["unet"]),
                            "vae_decode": t["vae_decode"]}


class DiffusersRunner(Runner):
    """The diffusers pipeline, eager or with torch.compile on the U-Net and VAE decoder."""

    def __init__(self, spec, device, folder: Path, dtype: torch.dtype, *, compile_mode: str | None = None, **kw):
        super().__init__(spec, device, **kw)
        import diffusers

        self.variant = "diffusers" if compile_mode is None else "diffusers+compile"
        t0 = time.perf_counter()
        diffusers.utils.logging.disable_progress_bar()
        cls = getattr(diffusers, spec.pipeline)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipe = cls.from_pretrained(str(folder), torch_dtype=dtype)
        pipe = pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        if compile_mode is not None:
            pipe.unet = torch.compile(pipe.unet, mode=compile_mode)
            if not spec.pixel:
                pipe.vae.decode = torch.compile(pipe.vae.decode, mode=compile_mode)
        self.recorder = _StageRecorder(device)
        self.recorder.wrap(pipe.unet, "forward", "unet")
        if not spec.pixel:  # DDPMPipeline: no text encoder, no VAE
            self.recorder.wrap(pipe, "encode_prompt", "text_encoder")  # tokenisation + encoders, as the engine's stage
            self.recorder.wrap(pipe.vae, "decode", "vae_decode")
        self.pipe = pipe
        self.load_s = time.perf_counter() - t0
        # diffusers' SDXL pipeline upcasts a force_upcast VAE to fp32 for decoding; the SD pipeline does not.
        upcast = spec.sdxl and dtype == torch.float16 and getattr(pipe.vae.config, "force_upcast", False)
        self.vae_dtype = None if spec.pixel else "float32" if upcast else _dtype_name(pipe.vae.dtype)

    def _generate(self):
        s = self.spec
        self.recorder.reset()
        if s.pixel:  # DDPMPipeline: output_type "pt" still returns numpy (converted by _to_images)
            out = self.pipe(batch_size=s.images, num_inference_steps=s.steps, output_type=self.output_type,
                            generator=torch.Generator("cpu").manual_seed(self.seed))
            return out.images, {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # per-call deprecation notes (upcast_vae) would flood the log
            out = self.pipe(PROMPT, negative_prompt=NEGATIVE_PROMPT if s.cfg else None, height=s.height,
                            width=s.width, num_inference_steps=s.steps, guidance_scale=s.guidance,
                            num_images_per_prompt=s.images,
                            generator=torch.Generator("cpu").manual_seed(self.seed), output_type=self.output_type)
        return out.images, {}

    def _finish(self, stages):
        # events are complete after Runner.__call__'s synchronisation
        r = self.recorder
        stages.update(text_encoder=sum(r.ms("text_encoder")), unet=r.ms("unet"), vae_decode=sum(r.ms("vae_decode")))
        return stages

    def close(self):
        self.pipe = None


# ============================================================================ measuring one model

def _gib(nbytes: float) -> float:
    return nbytes / 2**30


def _ops_backend_problem(name: str, device: torch.device) -> str | None:
    """None when the ops backend runs here (probed on a small attention and GroupNorm), else why not."""
    if name == "torch":
        return None
    if device.type != "cuda":
        return f"the {name} ops backend needs a CUDA device"
    from ldm_engine import ops

    try:
        q = torch.randn(1, 2, 64, 64, device=device, dtype=torch.float16)
        ops.attention(q, q, q, backend=name)
        x = torch.randn(1, 64, 8, 8, device=device, dtype=torch.float16)
        w = torch.ones(64, device=device, dtype=torch.float16)
        ops.group_norm_silu(x, w, w, 32, backend=name)
        torch.cuda.synchronize(device)
    except Exception as e:  # noqa: BLE001 - reported in the table
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    return None


def _diffusers_problem() -> str | None:
    import importlib.util

    if importlib.util.find_spec("diffusers") is None or importlib.util.find_spec("transformers") is None:
        return "diffusers/transformers not installed (pip install -e .[test], or carry their wheels)"
    return None


def summarize(spec: ModelSpec, runner: Runner, *, runs: int, flops: dict, batch: int) -> dict:
    """Medians over the last ``runs`` records (the warm-up calls come first)."""
    recs = runner.records[-runs:]
    unet_calls = len(recs[-1]["unet"]) if recs else 0
    st = {
        "text_encoder": common.stats(r["text_encoder"] for r in recs),
        "unet_per_call": common.stats(sum(r["unet"]) / max(len(r["unet"]), 1) for r in recs),
        "unet_all_calls": common.stats(sum(r["unet"]) for r in recs),
        "vae_decode": common.stats(r["vae_decode"] for r in recs),
        "total": common.stats(r["total"] for r in recs),
    }
    n_prompts = 2 if spec.cfg else 1  # CFG encodes the negative prompt too
    f_te = n_prompts * sum(flops["text_encoders"])
    f_unet = flops["unet"] * batch    # one U-Net call runs both CFG halves
    f_vae = flops["vae_decode"] * spec.images
    f_total = f_te + unet_calls * f_unet + f_vae

    def tflops(f, ms):
        return f / (ms * 1e-3) / 1e12 if ms and ms > 0 else None

    med = {k: v["median"] for k, v in st.items()}
    return {
        "stages_ms": st,
        "unet_calls": unet_calls,
        "unet_batch": batch,
        "images_per_s": 1000.0 * spec.images / med["total"] if med["total"] else None,
        "flops": {"text_encoder": f_te, "unet_call": f_unet, "vae_decode": f_vae, "total": f_total,
                  "source": flops["source"]},
        "tflops": {"text_encoder": tflops(f_te, med["text_encoder"]), "unet": tflops(f_unet, med["unet_per_call"]),
                   "vae_decode": tflops(f_vae, med["vae_decode"]), "total": tflops(f_total, med["total"])},
    }


class ModelBench:
    """Everything for one model on one device: weights folder, loaded networks, one Runner per variant."""

    def __init__(self, spec: ModelSpec, device: torch.device, *, weights_dir: Path = DEFAULT_WEIGHTS_DIR,
                 seed: int = 0, output_type: str = "pt", compile_mode: str = "default",
                 images_dir: Path | None = None, log=print):
        self.spec, self.device, self.seed, self.output_type = spec, device, seed, output_type
        self.images_dir = images_dir   # shares each variant's last images with later subprocesses
        self.compile_mode, self.log = compile_mode, log
        self.dtype = torch.float16 if device.type == "cuda" else torch.float32
        self.folder = write_random_pipeline(spec, weights_dir, dtype=self.dtype, seed=seed, device=device, log=log)
        self.flops = count_flops(spec, height=spec.height, width=spec.width)
        self.engine = None
        self.engine_base = 0
        self.engine_weights = None
        self.engine_load_s = None
        self.images: dict = {}   # variant -> last images (float32 CPU), for the cross-variant check

    def problem(self, variant: str) -> str | None:
        if variant.startswith("ldm_engine["):
            if variant.endswith("+graphs") and self.device.type != "cuda":
                return "CUDA graphs need a CUDA device"
            if "+tiny_vae" in variant and self.spec.pixel:
                return "a pixel-space model has no VAE"
            return _ops_backend_problem(_ops_backend_of(variant), self.device)
        return _diffusers_problem()

    def _alloc(self) -> int:
        return torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0

    def _free(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def runner(self, variant: str) -> tuple[Runner, int]:
        """(runner, memory allocated before its networks were loaded)."""
        kw = dict(seed=self.seed, output_type=self.output_type)
        if variant.startswith("ldm_engine["):
            if self.engine is None:
                self._free()
                self.engine_base = self._alloc()
                t0 = time.perf_counter()
                self.engine = EngineRunner.load(self.folder, self.device, self.dtype)
                self.engine_load_s = time.perf_counter() - t0
                self.engine_weights = self._alloc() - self.engine_base
            if variant.endswith("+compile"):
                self.engine.compile(mode=None if self.compile_mode == "default" else self.compile_mode)
            if "+channels_last" in variant:
                self.engine.use_channels_last()
            if "+subpixel" in variant:
                self.engine.use_subpixel_upsample()
            saved_vae = swap_in_tiny_vae(self.engine, seed=self.seed) if "+tiny_vae" in variant else None
            if variant.endswith("+graphs"):
                self.engine.enable_cuda_graphs()   # captured on the first call (the warm-up)
            r = EngineRunner(self.spec, self.device, self.engine, _ops_backend_of(variant), **kw)
            r.saved_vae = saved_vae
            r.variant = variant
            r.load_s = self.engine_load_s
            r.weights_bytes = self.engine_weights
            return r, self.engine_base
        self._free()
        base = self._alloc()
        r = DiffusersRunner(self.spec, self.device, self.folder, self.dtype,
                            compile_mode=self.compile_mode if variant == "diffusers+compile" else None, **kw)
        r.weights_bytes = self._alloc() - base
        return r, base

    def measure(self, variant: str, *, runs: int, warmup: int) -> dict:
        """One row: status, per-stage medians, memory, FLOP/s; the last images stay in self.images."""
        s = self.spec
        row = {"model": s.name, "variant": variant, "height": s.height, "width": s.width, "steps": s.steps,
               "images_per_call": s.images,
               "guidance": s.guidance, "dtype": str(self.dtype).replace("torch.", ""), "device": str(self.device),
               "runs": runs, "warmup": warmup}
        why = self.problem(variant)
        if why:
            return {**row, "status": "skipped", "reason": why}
        runner = None
        try:
            runner, base = self.runner(variant)
            t0 = time.perf_counter()
            runner()                                   # first call: cudnn/cuBLAS choices, compilation
            first_ms = (time.perf_counter() - t0) * 1000.0
            for _ in range(max(warmup - 1, 0)):
                runner()
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            for _ in range(runs):
                runner()
            peak = torch.cuda.max_memory_allocated(self.device) - base if self.device.type == "cuda" else None
            images = _to_images(runner.last_images)
            row.update(status="ok", first_call_ms=first_ms, load_s=runner.load_s, vae_dtype=runner.vae_dtype,
                       weights_gib=_gib(runner.weights_bytes) if self.device.type == "cuda" else None,
                       peak_gib=_gib(peak) if peak is not None else None,
                       finite=bool(torch.isfinite(images).all()),
                       **summarize(s, runner, runs=runs, flops=self.flops_for(variant), batch=(2 if s.cfg else 1) * s.images))
            self.images[variant] = images
            if self.images_dir is not None:
                torch.save(images, self._image_file(variant))
        except Exception as e:  # noqa: BLE001 - one broken variant must not hide the others
            import traceback

            row.update(status="error", reason=f"{type(e).__name__}: {e}"[:500])
            self.log(traceback.format_exc())
        finally:
            if runner is not None:
                runner.close()
            if variant.startswith("diffusers"):
                del runner
                self._free()
        return row

    def flops_for(self, variant: str) -> dict:
        """The model's FLOP counts; for +tiny_vae variants the tiny decoder's (counted on meta)."""
        if "+tiny_vae" not in variant:
            return self.flops
        levels = len(_component_json(CONFIG_ROOT / self.spec.config_dir, "vae")["block_out_channels"])
        tiny = count_tiny_vae_flops(levels, height=self.spec.height, width=self.spec.width)
        return {**self.flops, "vae_decode": tiny["vae_decode"], "source": self.flops["source"] + " + FlopCounterMode (tiny VAE)"}

    def _image_file(self, variant: str) -> Path:
        return self.images_dir / f"images-{self.spec.name}-{variant.replace('[', '_').replace(']', '')}.pt"

    def run(self, variants, *, runs: int, warmup: int, on_row=None) -> list[dict]:
        """Measures ``variants`` in RUN_ORDER; ``on_row(rows)`` after each (to save partial results)."""
        self.images = {}
        if self.images_dir is not None and REFERENCE_VARIANT not in variants:
            ref = self._image_file(REFERENCE_VARIANT)   # measured by an earlier subprocess
            if ref.is_file():
                self.images[REFERENCE_VARIANT] = torch.load(ref, weights_only=True)
        ordered = [v for v in RUN_ORDER if v in variants]
        rows = []
        for v in ordered:
            self.log(f"[{self.spec.name}] {v} ...")
            row = self.measure(v, runs=runs, warmup=warmup)
            msg = row.get("reason") or f"total {row['stages_ms']['total']['median']:.1f} ms"
            self.log(f"[{self.spec.name}] {v}: {row['status']} ({msg})")
            rows.append(row)
            add_differences(rows, self.images)
            if on_row is not None:
                on_row(rows)
        self.close()
        return rows

    def close(self):
        self.engine = None
        self._free()


def add_differences(rows: list[dict], images: dict) -> None:
    """max |pixel difference| (images in [0, 1]) of each variant against diffusers eager (else the first)."""
    ref = REFERENCE_VARIANT if REFERENCE_VARIANT in images else next(iter(images), None)
    for row in rows:
        img = images.get(row["variant"])
        if ref is None or img is None:
            continue
        row["reference"] = ref
        other = images[ref]
        row["max_abs_diff_vs_reference"] = (float((img - other).abs().max()) if img.shape == other.shape
                                            else None)


# ============================================================================ reporting

def add_ceiling_fractions(rows: list[dict], ceilings: dict | None) -> None:
    peak = (ceilings or {}).get("matmul_TFLOPs")
    for row in rows:
        if row.get("status") != "ok" or not peak:
            continue
        row["pct_of_matmul_ceiling"] = {k: (100.0 * v / peak if v else None) for k, v in row["tflops"].items()}
    by_model = {}
    for row in rows:
        if row.get("status") == "ok" and row["variant"] == REFERENCE_VARIANT:
            by_model[row["model"]] = row["stages_ms"]["total"]["median"]
    for row in rows:
        ref = by_model.get(row["model"])
        if row.get("status") == "ok" and ref:
            row["speedup_vs_diffusers"] = ref / row["stages_ms"]["total"]["median"]


HEADERS = ["model", "variant", "text enc ms", "unet ms/call", "unet calls x batch", "vae dec ms", "total ms",
           "img/s", "vs diffusers", "peak GiB", "TFLOP/s unet", "TFLOP/s vae", "TFLOP/s total", "% ceiling",
           "max abs diff vs ref", "vae dtype"]


def table_rows(rows: list[dict]) -> list[list]:
    out = []
    for r in rows:
        if r.get("status") != "ok":
            out.append([r["model"], f"{r['variant']} ({r.get('status')})"] + [None] * (len(HEADERS) - 2))
            continue
        st, tf = r["stages_ms"], r["tflops"]
        pct = (r.get("pct_of_matmul_ceiling") or {}).get("total")
        out.append([r["model"], r["variant"], st["text_encoder"]["median"], st["unet_per_call"]["median"],
                    f"{r['unet_calls']}x{r['unet_batch']}", st["vae_decode"]["median"], st["total"]["median"],
                    r["images_per_s"], r.get("speedup_vs_diffusers"), r.get("peak_gib"), tf["unet"], tf["vae_decode"],
                    tf["total"], pct, r.get("max_abs_diff_vs_reference"), r.get("vae_dtype")])
    return out


FORMATS = [None, None, ".2f", ".2f", None, ".2f", ".2f", ".2f", ".2f", ".2f", None, None, None, None, ".1e", None]


def render(rows: list[dict], env: dict | None, *, markdown: bool) -> str:
    head = common.environment_lines(env) if env else []
    c = (env or {}).get("ceilings")
    if c:
        head.append(f"ceilings (same run): copy {c['copy_GBps']:.0f} GB/s read+write; {c['matmul_dtype']} matmul "
                    f"{c['matmul_n']}^3 {c['matmul_TFLOPs']:.4g} TFLOP/s = 100 % ceiling")
    table = common.format_table(HEADERS, table_rows(rows), markdown=markdown, formats=FORMATS, left=2)
    reasons = [f"{r['model']} {r['variant']} {r.get('status')}: {r.get('reason', '')}" for r in rows
               if r.get("status") != "ok"]
    reasons += [f"{r['model']} {r['variant']}: NON-FINITE pixels in the output (NaN/inf)" for r in rows
                if r.get("status") == "ok" and r.get("finite") is False]
    if reasons:
        table += "\n\n" + "\n".join(("- " if markdown else "") + line for line in reasons)
    notes = ("medians; text enc includes tokenisation; unet ms/call is one U-Net call (both CFG halves); "
             "total is end to end between device syncs; FLOPs count conv/matmul only (2 x MAC); "
             "max abs diff = largest pixel difference in [0,1] against diffusers eager on the same weights and seed")
    if markdown:
        return "\n".join([*(f"- {h}" for h in head), "", table, "", f"_{notes}_", ""])
    return "\n".join([*head, "", table, "", notes])


# ============================================================================ command line

def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", nargs="+", default=None, help=f"{', '.join(MODELS)} or all (= {', '.join(FULL_MODELS)})")
    p.add_argument("--tiny", action="store_true", help="CPU smoke check: --model tiny --device cpu --runs 2 --warmup 1")
    p.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    p.add_argument("--runs", type=int, default=None, help="timed runs per variant (default 10; --tiny 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 3; --tiny 1)")
    p.add_argument("--variants", default=None,
                   help=f"comma list from {', '.join(ALL_VARIANTS)} (default: all but the +compile ones)")
    p.add_argument("--compile", action="store_true", help="add ldm_engine[torch]+compile and diffusers+compile (slow to compile)")
    p.add_argument("--compile-mode", default="default", help="torch.compile mode for the +compile variants")
    p.add_argument("--compile-models", default=None,
                   help="comma list: run the +compile variants only for these models (default: all with --compile)")
    p.add_argument("--weights-dir", type=Path, default=DEFAULT_WEIGHTS_DIR, help="where random-weight folders live")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images-per-prompt", type=int, default=1, metavar="N",
                   help="images per generate() call (one batch); img/s counts images (e.g. 8: SD-Turbo batch 8)")
    p.add_argument("--output-type", default="pt", choices=("pt", "np", "pil"))
    p.add_argument("--json", type=Path, help="write all rows + environment + ceilings here")
    p.add_argument("--markdown", type=Path, help="write the markdown table here")
    p.add_argument("--no-ceilings", action="store_true", help="skip measuring copy bandwidth / matmul rate")
    p.add_argument("--isolate", choices=("auto", "yes", "no"), default="auto",
                   help="one subprocess per model (auto: on CUDA with several models)")
    p.add_argument("--model-timeout", type=float, default=None, help="seconds per model subprocess")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds for the whole run: each model subprocess gets what is left (partial rows are "
                        "kept); models that no longer fit are reported as skipped")
    p.add_argument("--child-json", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--images-dir", type=Path, help=argparse.SUPPRESS)  # last images per variant, across children
    args = p.parse_args(argv)
    if args.tiny:
        args.model = args.model or ["tiny"]
        args.device = args.device or "cpu"
        args.runs = args.runs or 2
        args.warmup = args.warmup if args.warmup is not None else 1
    args.model = args.model or ["sd-turbo"]
    if "all" in args.model:
        args.model = list(FULL_MODELS)
    unknown = [m for m in args.model if m not in MODELS]
    if unknown:
        p.error(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)} or all")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.runs = args.runs or 10
    args.warmup = 3 if args.warmup is None else args.warmup
    args.variants_given = bool(args.variants)
    if args.variants:
        args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        bad = [v for v in args.variants if v not in ALL_VARIANTS]
        if bad:
            p.error(f"unknown variant(s) {bad}; choose from {', '.join(ALL_VARIANTS)}")
    else:
        args.variants = [v for v in ALL_VARIANTS if v not in COMPILED_VARIANTS]
    if args.compile:
        args.variants += [v for v in COMPILED_VARIANTS if v not in args.variants]
    args.compile_models = ([m.strip() for m in args.compile_models.split(",") if m.strip()]
                           if args.compile_models else None)
    return args


def _variants_for(args, model: str) -> list[str]:
    variants = list(args.variants)
    if args.compile_models is not None and model not in args.compile_models:
        variants = [v for v in variants if v not in COMPILED_VARIANTS]
    if MODELS[model].variants and not args.variants_given:  # the model's own default set (+ --compile's)
        variants = [v for v in variants if v in MODELS[model].variants or v in COMPILED_VARIANTS]
    return variants


def _child_argv(args, model: str, variants: list[str], child_json: Path, images_dir: Path) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--model", model, "--device", args.device,
            "--runs", str(args.runs), "--warmup", str(args.warmup), "--variants", ",".join(variants),
            "--compile-mode", args.compile_mode, "--weights-dir", str(args.weights_dir), "--seed", str(args.seed),
            "--images-per-prompt", str(args.images_per_prompt),
            "--output-type", args.output_type, "--isolate", "no", "--no-ceilings", "--child-json", str(child_json),
            "--images-dir", str(images_dir)]


def _jobs(args) -> list[tuple[str, list[str]]]:
    """(model, variants) per subprocess: every model's main variants first, then the slow compiled ones."""
    main = [(m, [v for v in _variants_for(args, m) if v not in COMPILED_VARIANTS]) for m in args.model]
    compiled = [(m, [v]) for m in args.model for v in COMPILED_VARIANTS if v in _variants_for(args, m)]
    return [(m, v) for m, v in main if v] + compiled


def _row_order(row: dict) -> tuple:
    model_rank = list(MODELS).index(row["model"]) if row.get("model") in MODELS else len(MODELS)
    variant = row.get("variant")
    return model_rank, RUN_ORDER.index(variant) if variant in RUN_ORDER else len(RUN_ORDER)


def _log(msg: str) -> None:
    print(msg, flush=True)


def main(argv=None) -> int:
    args = _parse(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        _log("SKIPPED: --device cuda, but torch sees no CUDA device. Full-size models need a GPU; "
             "for a CPU smoke check run: python benchmarks/bench_pipeline.py --tiny")
        return 0
    full_on_cpu = [m for m in args.model if MODELS[m].full_size and device.type != "cuda"]
    if full_on_cpu:
        _log(f"SKIPPED {', '.join(full_on_cpu)}: full-size models need CUDA (none used here: device {device}). "
             "For a CPU smoke check run: python benchmarks/bench_pipeline.py --tiny")
        args.model = [m for m in args.model if m not in full_on_cpu]
        if not args.model:
            return 0

    def bench(model: str, on_row=None) -> list[dict]:
        return ModelBench(dataclasses.replace(MODELS[model], images=args.images_per_prompt), device, weights_dir=args.weights_dir, seed=args.seed,
                          output_type=args.output_type, compile_mode=args.compile_mode, images_dir=args.images_dir,
                          log=_log).run(_variants_for(args, model), runs=args.runs, warmup=args.warmup, on_row=on_row)

    if args.child_json:  # one model, inside a subprocess of the parent run: rows only, saved after each variant
        done: list[dict] = []
        for m in args.model:
            done += bench(m, on_row=lambda rows: common.write_json(args.child_json, {"rows": done + rows}))
        common.write_json(args.child_json, {"rows": done})
        return 0

    t_start = time.monotonic()
    env = common.environment(device)
    if not args.no_ceilings:
        env["ceilings"] = common.measure_ceilings(device)
        c = env["ceilings"]
        _log(f"ceilings: copy {c['copy_GBps']:.0f} GB/s, {c['matmul_dtype']} matmul {c['matmul_TFLOPs']:.4g} TFLOP/s")
    isolate = args.isolate == "yes" or (args.isolate == "auto" and device.type == "cuda" and len(args.model) > 1)
    if args.time_budget is not None:
        isolate = True  # only a subprocess can be stopped at the deadline
    rows: list[dict] = []

    def save():
        add_ceiling_fractions(rows, env.get("ceilings"))
        if args.json:
            common.write_json(args.json, {"benchmark": "pipeline", "environment": env, "rows": rows,
                                          "prompt": PROMPT, "negative_prompt": NEGATIVE_PROMPT,
                                          "runs": args.runs, "warmup": args.warmup})
        if args.markdown:
            args.markdown.parent.mkdir(parents=True, exist_ok=True)
            args.markdown.write_text("## Pipeline benchmark\n\n" + render(rows, env, markdown=True))

    if not isolate:
        for m in args.model:
            rows += bench(m)
            save()
    else:
        images_dir = Path(tempfile.mkdtemp(prefix="ldm_bench_images_"))
        try:
            for m, variants in _jobs(args):
                timeout = args.model_timeout
                if args.time_budget is not None:
                    left = args.time_budget - (time.monotonic() - t_start) - 10.0
                    if left < 45.0:
                        rows += [{"model": m, "variant": v, "status": "skipped",
                                  "reason": f"out of time (--time-budget {args.time_budget:.0f} s)"} for v in variants]
                        save()
                        continue
                    timeout = left if timeout is None else min(timeout, left)
                child_json = images_dir / f"rows-{m}-{len(rows)}.json"
                try:
                    proc = subprocess.run(_child_argv(args, m, variants, child_json, images_dir), timeout=timeout)
                    failure = None if proc.returncode == 0 else f"subprocess exited with status {proc.returncode}"
                except subprocess.TimeoutExpired:
                    failure = f"timed out after {timeout:.0f} s"
                got = json.loads(child_json.read_text())["rows"] if child_json.is_file() else []
                rows += got
                if failure:
                    finished = {r["variant"] for r in got}
                    rows += [{"model": m, "variant": v, "status": "error",
                              "reason": f"{failure} (in this model's subprocess)"} for v in variants if v not in finished]
                rows.sort(key=_row_order)
                save()
        finally:
            shutil.rmtree(images_dir, ignore_errors=True)

    rows.sort(key=_row_order)
    save()
    print("\n" + render(rows, env, markdown=False), flush=True)
    bad = [r for r in rows if r.get("status") == "error"]
    return 1 if bad else 0


# ============================================================================ pytest-benchmark entry points
# `python -m pytest benchmarks/bench_pipeline.py` (benchmarks/ is outside the test suite's testpaths).
# Options from benchmarks/conftest.py: --bench-runs, --bench-warmup, --bench-models, --bench-weights-dir.

try:
    import pytest
except ImportError:  # script mode needs no pytest
    pytest = None

if pytest is not None:
    _CACHE: dict = {}

    def _bench_for(model: str, device: torch.device, opts) -> ModelBench:
        """One model's networks at a time (switching model frees the previous one)."""
        key = (model, str(device))
        if _CACHE.get("key") != key:
            old = _CACHE.pop("bench", None)
            if old is not None:
                old.close()
            _CACHE["bench"] = ModelBench(MODELS[model], device, weights_dir=opts["weights_dir"], log=_log)
            _CACHE["key"] = key
        return _CACHE["bench"]

    def _run_benchmark(benchmark, bench: ModelBench, variant: str, opts) -> None:
        pytest.importorskip("pytest_benchmark")
        why = bench.problem(variant)
        if why:
            pytest.skip(why)
        runner, base = bench.runner(variant)
        try:
            benchmark.pedantic(runner, rounds=opts["runs"], warmup_rounds=opts["warmup"], iterations=1)
            s = summarize(bench.spec, runner, runs=opts["runs"], flops=bench.flops_for(variant),
                          batch=(2 if bench.spec.cfg else 1) * bench.spec.images)
            benchmark.extra_info.update({
                "median_ms": {k: v["median"] for k, v in s["stages_ms"].items()},
                "unet_calls": s["unet_calls"], "tflops": s["tflops"], "vae_dtype": runner.vae_dtype,
            })
            images = _to_images(runner.last_images)
            assert torch.isfinite(images).all(), f"{variant} produced non-finite pixels"
            bench.images[variant] = images
            if variant != REFERENCE_VARIANT and REFERENCE_VARIANT in bench.images:
                diff = float((images - bench.images[REFERENCE_VARIANT]).abs().max())
                benchmark.extra_info["max_abs_diff_vs_diffusers"] = diff
        finally:
            runner.close()

    @pytest.mark.parametrize("variant", ["diffusers", "ldm_engine[torch]", "ldm_engine[torch]+tiny_vae"])
    def test_tiny_pipeline_cpu(benchmark, variant, bench_options):
        """CPU smoke benchmark at toy size: runs anywhere, in seconds."""
        _run_benchmark(benchmark, _bench_for("tiny", torch.device("cpu"), bench_options), variant, bench_options)

    _FULL_CASES = [(m, v) for m in FULL_MODELS for v in RUN_ORDER
                   if v not in COMPILED_VARIANTS and (not MODELS[m].variants or v in MODELS[m].variants)]

    @pytest.mark.cuda
    @pytest.mark.parametrize("model,variant", _FULL_CASES, ids=[f"{m}-{v}" for m, v in _FULL_CASES])
    def test_full_pipeline_cuda(benchmark, model, variant, bench_options):
        """Full-size random-weight models on the GPU (skipped without CUDA)."""
        if not torch.cuda.is_available():
            pytest.skip("full-size pipeline benchmarks need a CUDA GPU; none is visible to torch here")
        if model not in bench_options["models"]:
            pytest.skip(f"{model} not in --bench-models")
        _run_benchmark(benchmark, _bench_for(model, torch.device("cuda"), bench_options), variant, bench_options)


if __name__ == "__main__":
    sys.exit(main())
