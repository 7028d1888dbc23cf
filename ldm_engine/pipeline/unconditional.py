"""Unconditional pixel-space generation: the DDPM paper's models (a diffusers ``UNet2DModel`` on
pixels, no VAE, no text).

    engine = Engine.from_pretrained("google/ddpm-cifar10-32")      # -> PixelEngine
    result = engine.generate(num_inference_steps=1000, seed=0)     # DDPM: the paper's Algorithm 2
    result = engine.generate(scheduler="ddim", num_inference_steps=50, eta=0.0, seed=0)

Same seed, same images as diffusers' ``DDPMPipeline`` / ``DDIMPipeline`` called with
``generator=torch.Generator().manual_seed(seed)`` and ``batch_size=num_images_per_prompt``: the
initial image is drawn first, then (stochastic samplers: DDPM, DDIM with eta > 0, Euler ancestral)
one noise per step, all from one CPU generator in that order, before the loop runs.
"""

from __future__ import annotations

import dataclasses
import secrets
import time

import torch

from ldm_engine.errors import InvalidInputError
from ldm_engine.pipeline import validation as check
from ldm_engine.pipeline.images import postprocess
from ldm_engine.pipeline.network_options import NetworkOptions
from ldm_engine.pipeline.request import MAX_SIZE
from ldm_engine.pipeline.timing import StageTimer

DEFAULT_STEPS = 50        # DDIMPipeline's default; "ddpm" runs every training timestep (DDPMPipeline's 1000)
# generate() arguments of the text-to-image Engine that an unconditional model cannot use.
_CONDITIONING = ("negative_prompt", "guidance_scale", "image", "strength", "control_image",
                 "controlnet_conditioning_scale", "mask_image", "callback")


class PixelEngine(NetworkOptions):
    """Holds an unconditional UNet2DModel and its scheduler config; ``generate()`` samples images.

    compile(), use_channels_last() and enable_cuda_graphs() act on the U-Net as the latent Engine's
    do on its networks (ldm_engine.pipeline.network_options); DDPM's 1000 U-Net calls per image
    are where graph replay saves the most host time.
    """

    def __init__(self, components, *, device=None, dtype=None, scheduler: str | None = None, name: str | None = None):
        from ldm_engine.engine import _module_dtype, resolve_device, resolve_dtype

        self.components = components
        self.device = resolve_device(device)
        self.dtype = (resolve_dtype(dtype, self.device) if dtype is not None
                      else _module_dtype(components.unet, resolve_dtype(None, self.device)))
        self.family = "pixel"
        self.name = name or str(components.source)
        cfg = components.unet.config
        if cfg.out_channels != cfg.in_channels:
            raise InvalidInputError(f"{self.name}: the U-Net predicts {cfg.out_channels} channels for a {cfg.in_channels}-"
                                    f"channel image (a learned-variance model?); only noise / v / sample prediction "
                                    f"of the image's own channels is supported")
        self.size_multiple = 2 ** (len(cfg.block_out_channels) - 1)
        size = cfg.sample_size or 32
        self.height, self.width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        self.num_train_timesteps = int(components.scheduler_config.get("num_train_timesteps", 1000))
        self.scheduler = scheduler
        self._init_network_options()

    @staticmethod
    def handles(path_or_repo_id, *, backend: str = "torch", engine_dir=None, config=None) -> bool:
        """Whether Engine.from_pretrained(...) with these arguments names an unconditional pixel model."""
        if backend != "torch":
            if engine_dir is None:
                return False
            try:
                from ldm_engine.export.pixel import is_pixel_export
            except ImportError:  # the Engine reports the unavailable backend
                return False
            return is_pixel_export(engine_dir)
        from ldm_engine.loading.pixel import is_pixel_model

        return is_pixel_model(path_or_repo_id, config)

    @classmethod
    def from_pretrained(cls, path_or_repo_id, *, device=None, dtype=None, scheduler: str | None = None,
                        variant: str | None = None, config=None, backend: str = "torch", engine_dir=None,
                        controlnet=None, prediction_type: str | None = None):
        """See ldm_engine.loading.pixel for the sources; Engine.from_pretrained calls this for them.
        prediction_type ("epsilon" / "v_prediction" / "sample") overrides the scheduler config's."""
        from ldm_engine.engine import resolve_device, resolve_dtype

        if controlnet is not None:
            raise InvalidInputError(f"{path_or_repo_id} is an unconditional pixel model: ControlNets do not apply")
        if prediction_type not in (None, "epsilon", "v_prediction", "sample"):
            raise InvalidInputError(f"prediction_type must be 'epsilon', 'v_prediction' or 'sample', "
                                    f"got {prediction_type!r}")
        cls._check_sampler(scheduler)
        device = resolve_device(device)
        if backend != "torch":
            from ldm_engine.export.pixel import load_exported_pixel_components

            comps = load_exported_pixel_components(engine_dir, backend=backend, device=device)
        else:
            from ldm_engine.loading.pixel import load_pixel_pipeline

            comps = load_pixel_pipeline(path_or_repo_id, device=str(device), dtype=resolve_dtype(dtype, device),
                                        variant=variant, config=config)
        if prediction_type is not None:
            comps.scheduler_config = {**comps.scheduler_config, "prediction_type": prediction_type}
        return cls(comps, device=device, dtype=dtype, scheduler=scheduler, name=str(path_or_repo_id))

    @property
    def scheduler(self) -> str:
        """The default sampler of generate(): the model's own (ddpm / ddim), or a name assigned here."""
        return self._scheduler

    @scheduler.setter
    def scheduler(self, name: str | None) -> None:
        from ldm_engine.samplers import default_sampler_name

        self._scheduler = self._check_sampler(name) or default_sampler_name(self.components.scheduler_config)

    @staticmethod
    def _check_sampler(name):
        from ldm_engine.samplers import SAMPLER_NAMES

        allowed = tuple(n for n in SAMPLER_NAMES if n != "lcm")  # LCM needs a consistency-distilled model
        if name is not None and name not in allowed:
            raise InvalidInputError(f"scheduler must be None (the model's own) or one of {allowed} for an "
                                    f"unconditional pixel model, got {name!r}")
        return name

    # compile(), use_channels_last(), enable_cuda_graphs() / disable_cuda_graphs(): NetworkOptions
    # (ldm_engine.pipeline.network_options) on the one network, the U-Net.
    def _torch_networks(self) -> list:
        return [self.components.unet]

    def _compile_networks(self, **options) -> None:
        self.components.unet = torch.compile(self.components.unet, **options)

    def _graph_networks(self, wrap):
        unet = self.components.unet
        return dataclasses.replace(self.components, unet=wrap(unet, unet))

    def _networks(self):
        """The components generate() calls: the graphed ones when graphs are on."""
        return self._graphed if self._graphed is not None else self.components

    def __repr__(self) -> str:
        return (f"PixelEngine({self.name!r}, {self.height}x{self.width}, device={self.device}, dtype={self.dtype}, "
                f"scheduler={self.scheduler})")

    def generate(self, prompt=None, *, num_inference_steps=None, seed=None, num_images_per_prompt=1,
                 output_type="pil", scheduler=None, eta=0.0, height=None, width=None, latents=None, **unused):
        """Samples ``num_images_per_prompt`` images; every argument is checked before the U-Net runs.

        prompt: must be None -- the model is unconditional (as are negative_prompt, guidance_scale,
            image, control_image...: a clear InvalidInputError when given).
        scheduler: a sampler name for this call (default: ``self.scheduler``, the model's own).
        num_inference_steps: default num_train_timesteps (1000) for "ddpm", 50 otherwise.
        eta: DDIM's eta in [0, 1] ("ddim" only): 0 deterministic, 1 DDPM-like noise.
        height, width: pixels, multiples of 2 ** (number of U-Net levels - 1); default the model's sample_size.
        latents: the initial noise (N, C, height, width) on the engine's device, instead of the seeded draw.
        output_type: "pil", "np" (float32 (N, H, W, 3) in [0, 1]) or "pt" ((N, 3, H, W) in [0, 1]).
        Returns ldm_engine.engine.GenerateResult(images, timings {"unet": [ms per step], "total"}, seed).
        """
        from ldm_engine.engine import GenerateResult
        from ldm_engine.samplers import build_schedule, sample

        t_start = time.perf_counter()
        if prompt is not None:
            raise InvalidInputError(f"{self.name} is an unconditional model (a pixel-space UNet2DModel): it takes no "
                                    f"prompt; call generate() without one")
        given = sorted(k for k, v in unused.items() if v is not None and k in _CONDITIONING)
        unknown = sorted(k for k in unused if k not in _CONDITIONING)
        if unknown:
            raise TypeError(f"generate() got unexpected keyword argument(s) {', '.join(unknown)}")
        if given:
            raise InvalidInputError(f"{', '.join(given)}: an unconditional model has no conditioning or guidance")
        name = self._check_sampler(scheduler) or self.scheduler
        n = check.check_int("num_images_per_prompt", num_images_per_prompt, 1)
        output_type = check.check_output_type(output_type)
        if output_type == "latent":
            raise InvalidInputError("output_type 'latent': a pixel-space model has no latents; use 'pt'")
        seed = check.check_seed(seed)
        if num_inference_steps is None:
            steps = self.num_train_timesteps if name == "ddpm" else DEFAULT_STEPS
        else:
            steps = check.check_int("num_inference_steps", num_inference_steps, 1, self.num_train_timesteps)
        m = self.size_multiple
        height = self.height if height is None else check.check_size("height", height, m, m, MAX_SIZE)
        width = self.width if width is None else check.check_size("width", width, m, m, MAX_SIZE)
        shape = (n, self.components.unet.config.in_channels, height, width)
        if latents is not None:
            latents = check.check_latents(latents, shape, self.device)
        try:
            schedule = build_schedule(name, self.components.scheduler_config, steps, device=self.device, eta=eta)
        except ValueError as e:
            raise InvalidInputError(str(e)) from None
        seed = secrets.randbits(63) if seed is None else seed

        with self._generate_lock(), torch.inference_mode():
            # all randomness first, in diffusers' order: the initial image, then one draw per step
            gen = torch.Generator("cpu").manual_seed(seed)
            noise = latents.float() if latents is not None else torch.randn(shape, generator=gen).to(self.device)
            noises = None
            if schedule.needs_noise:
                noises = torch.stack([torch.randn(shape, generator=gen) for _ in range(schedule.num_steps)])
                noises = noises.to(self.device)
            timer, marks = StageTimer(self.device), []
            unet, dtype, copy_output = self._networks().unet, self.dtype, self._copy_unet_output

            def model_fn(x, t):
                m0 = timer.mark()
                out = unet(x.to(dtype), t).to(x.dtype)
                marks.append((m0, timer.mark()))
                return out.clone() if copy_output else out

            x0 = sample(schedule, model_fn, noise * schedule.init_noise_sigma, noises)
            end = timer.mark()
            timer.wait(end)
            images = postprocess(x0, output_type)
        timings = {"unet": [timer.ms(a, b) for a, b in marks], "total": (time.perf_counter() - t_start) * 1000.0}
        return GenerateResult(images=images, timings=timings, seed=seed)
