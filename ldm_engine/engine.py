"""Engine: text-to-image, img2img, inpainting and ControlNet generation for SD1.x/2.x, SDXL and
their Turbo variants.

    engine = Engine.from_pretrained("stabilityai/sd-turbo")
    result = engine.generate("a photo of a cat", seed=0)
    result.images[0].save("cat.png"); print(result.timings)

The pipeline follows the diffusers reference pipelines step by step (conditioning, latent
preparation, classifier-free guidance, ControlNet residuals, VAE decoding), so the same weights
and the same initial noise give the same image. Randomness: everything is drawn up front from a
CPU ``torch.Generator`` seeded with ``seed``, in diffusers' order (VAE posterior sample for
img2img -- none with a tiny VAE --, initial noise, the masked image's posterior for inpainting,
then one draw per step for stochastic samplers), so with the same seed the engine reproduces
``pipe(..., generator=torch.Generator().manual_seed(seed))``.
The denoising loop (ldm_engine.samplers.sample) does no host-device synchronisation.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ldm_engine.errors import BackendUnavailableError, InvalidInputError
from ldm_engine.pipeline import finite, inpaint, preview
from ldm_engine.pipeline.conditioning import encode_prompts
from ldm_engine.pipeline.controlnet import controlnet_residuals, prepare_controls
from ldm_engine.pipeline.defaults import (Defaults, model_defaults, read_model_index, vae_dtype_for,
                                          vae_needs_fp32)
from ldm_engine.pipeline.images import expand_batch, postprocess
from ldm_engine.pipeline.latents import check_vae_latent_channels, draws_posterior, image_latents
from ldm_engine.pipeline.network_options import NetworkOptions
from ldm_engine.pipeline.preview import check_callback
from ldm_engine.pipeline.request import Request, check_request
from ldm_engine.pipeline.timing import StageTimer

BACKENDS = ("torch", "onnxruntime", "tensorrt")
_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
           "half": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


@dataclass
class GenerateResult:
    images: Any                 # list[PIL.Image] | np.ndarray (N, H, W, 3) | torch.Tensor (N, 3, H, W)
    timings: dict = field(default_factory=dict)   # ms: text_encoder, vae_encode, controlnet_hint, controlnet[],
    #                                               unet[], vae_decode, total (see Engine.generate)
    seed: int | None = None     # the seed used (drawn at random when none was given)


def resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InvalidInputError(f"device {device!r} is not a valid torch device: {e}") from None


def resolve_dtype(dtype, device: torch.device, *, prefer_bf16: bool = False, what: str = "dtype") -> torch.dtype:
    """None -> fp16 on CUDA (bf16 when the model asks for upcast attention and the GPU has bf16), fp32 elsewhere."""
    if dtype is None:
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if prefer_bf16 and torch.cuda.is_bf16_supported() else torch.float16
    if isinstance(dtype, str):
        if dtype.lower() not in _DTYPES:
            raise InvalidInputError(f"{what} must be one of {sorted(set(_DTYPES))} or a torch dtype, got {dtype!r}")
        return _DTYPES[dtype.lower()]
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise InvalidInputError(f"{what} must be torch.float32, torch.float16 or torch.bfloat16, got {dtype!r}")
    return dtype


def _check_scheduler_name(name):
    from ldm_engine.samplers import SAMPLER_NAMES

    if name is not None and name not in SAMPLER_NAMES:
        raise InvalidInputError(f"scheduler must be None (the model's own) or one of {SAMPLER_NAMES}, got {name!r}")
    return name


def _module_dtype(module, fallback: torch.dtype) -> torch.dtype:
    if isinstance(module, torch.nn.Module):
        for p in module.parameters():
            return p.dtype
    return getattr(module, "dtype", fallback)


class Engine(NetworkOptions):
    """Holds the loaded networks; ``generate()`` runs the whole pipeline. Build with from_pretrained().

    Thread safety: one Engine may serve any number of threads calling ``generate()`` at once; each
    call gives the image it would give alone (tests/test_concurrency.py). Eager calls share only
    read-only weights and run fully in parallel. With ``enable_cuda_graphs()`` each network call
    holds the graphs' lock from copying its inputs in to cloning its outputs out (graphs have static
    buffers and share one memory pool), so network calls of different threads take turns while the
    rest overlaps. After ``compile(mode="reduce-overhead" / "max-autotune")`` (graphs managed by
    torch.compile, whose outputs the next replay overwrites) whole ``generate()`` calls take turns.
    Configure first, then share: ``compile()``, ``enable_cuda_graphs()`` / ``disable_cuda_graphs()``,
    ``use_channels_last()``, ``use_subpixel_upsample()`` and assigning ``scheduler`` must not run while
    other threads generate.
    An exception or KeyboardInterrupt inside ``generate()`` leaves the engine usable.
    """

    def __init__(self, components, controlnets: Sequence = (), *, device=None, dtype=None,
                 scheduler: str | None = None, name: str | None = None, model_index: dict | None = None,
                 preview_vae=None, vae_dtype=None):
        self.components = components
        self.controlnets = list(controlnets)
        self.device = resolve_device(device)
        # Without an explicit dtype, the networks' own dtype (components may come loaded in fp16).
        self.dtype = (resolve_dtype(dtype, self.device) if dtype is not None
                      else _module_dtype(components.unet, resolve_dtype(None, self.device)))
        self.family = components.family
        if self.family == "sdxl" and components.text_encoder_2 is None:
            raise InvalidInputError("an SDXL pipeline needs text_encoder_2 and tokenizer_2")
        unet_cfg, vae_cfg = components.unet.config, components.vae.config

        vae = components.vae
        if vae_dtype is not None:
            vae_dtype = resolve_dtype(vae_dtype, self.device, what="vae_dtype")
            if not isinstance(vae, torch.nn.Module):
                raise InvalidInputError("vae_dtype= needs the torch backend (an exported VAE has its dtype built in)")
        if isinstance(vae, torch.nn.Module):
            wanted = vae_dtype_for(self.family, vae_cfg, self.dtype, vae_dtype)
            if wanted != _module_dtype(vae, wanted):
                vae.to(wanted)
        self.vae_dtype = _module_dtype(vae, self.dtype)
        self.unet_dtype = _module_dtype(components.unet, self.dtype)
        self.vae_scale_factor = 2 ** (len(vae_cfg.block_out_channels) - 1)
        self.preview_vae = preview_vae  # step.preview() in callbacks (ldm_engine.pipeline.preview)
        check_vae_latent_channels(unet_cfg, vae, preview_vae)
        if self.dtype == torch.float16 and preview_vae is not None and vae_needs_fp32(self.family, preview_vae.config):
            preview_vae.to(torch.float32)
        self.latent_channels = vae_cfg.latent_channels
        self.inpainting_unet = unet_cfg.in_channels == 2 * vae_cfg.latent_channels + 1  # 9: + mask, masked image
        self.num_train_timesteps = int(components.scheduler_config.get("num_train_timesteps", 1000))

        for i, net in enumerate(self.controlnets):
            if net.config.cross_attention_dim != unet_cfg.cross_attention_dim:
                raise InvalidInputError(
                    f"controlnet[{i}] has cross_attention_dim {net.config.cross_attention_dim} but the model's U-Net "
                    f"has {unet_cfg.cross_attention_dim}: it belongs to another model family")

        self.name = name or str(components.source)
        self.model_index = model_index if model_index is not None else read_model_index(components.source)
        self.force_zeros_for_empty_prompt = bool(self.model_index.get("force_zeros_for_empty_prompt", True))
        self.defaults: Defaults = model_defaults(self.family, (self.name, components.source),
                                                 components.scheduler_config, self.model_index,
                                                 unet_cfg, self.vae_scale_factor)
        self.scheduler = scheduler
        self._init_network_options()
        self._lora_weights = None       # ldm_engine.pipeline.lora.LoraWeights, on the first load_lora()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, path_or_repo_id, *, device=None, dtype=None, backend: str = "torch",
                        controlnet=None, scheduler: str | None = None, engine_dir=None,
                        variant: str | None = None, config=None, prediction_type: str | None = None,
                        vae=None, preview_vae=None, vae_dtype=None) -> Engine:
        """Loads a pipeline: a diffusers folder, a Hugging Face cache snapshot (repo id), or a single-file checkpoint.
        Unconditional pixel-space models (DDPM / DDIM UNet2DModel) give a
        ldm_engine.pipeline.unconditional.PixelEngine, whose generate() takes no prompt.

        controlnet: a path / repo id, a loaded ControlNetModel, or a list of them (multi-ControlNet).
        scheduler: a name from ldm_engine.samplers.SAMPLER_NAMES, or None for the model's own.
        backend: "torch", or "onnxruntime" / "tensorrt" with ``engine_dir`` written by ldm_engine.export.
        config, prediction_type: for single-file checkpoints, which carry no config: a diffusers folder
        or repo id describing the architecture, and the prediction type ("epsilon" / "v_prediction").
        vae: replaces the model's VAE: a path, a cached repo id or a loaded module, full (AutoencoderKL,
        e.g. the fp16-fix SDXL VAE) or tiny (TAESD / TAESDXL: folder, or the original taesd_*.safetensors
        pair); see ldm_engine.loading.vae. preview_vae: a (tiny) VAE for step.preview() in callbacks.
        Either must have the U-Net's latent channels (else InvalidInputError).
        vae_dtype: the VAE's dtype ("bf16", "fp16", "fp32" or a torch dtype; torch backend). Default: the
        engine's, but fp32 for the SDXL VAE under fp16 (it overflows fp16, as diffusers); "bf16" runs
        that VAE at half the fp32 cost (see ldm_engine.pipeline.defaults.vae_dtype_for).
        """
        if backend not in BACKENDS:
            raise InvalidInputError(f"backend must be one of {BACKENDS}, got {backend!r}")
        from ldm_engine.pipeline.unconditional import PixelEngine

        if PixelEngine.handles(path_or_repo_id, backend=backend, engine_dir=engine_dir, config=config):
            if vae is not None or preview_vae is not None or vae_dtype is not None:
                raise InvalidInputError(f"{path_or_repo_id} is a pixel-space model: it has no VAE (vae=, "
                                        "preview_vae=, vae_dtype= do not apply)")
            return PixelEngine.from_pretrained(path_or_repo_id, device=device, dtype=dtype, backend=backend,
                                               engine_dir=engine_dir, controlnet=controlnet, scheduler=scheduler,
                                               variant=variant, config=config, prediction_type=prediction_type)
        _check_scheduler_name(scheduler)
        device = resolve_device(device)
        if backend == "torch":
            from ldm_engine.loading import load_controlnet, load_pipeline, load_vae

            dtype = resolve_dtype(dtype, device, prefer_bf16=_wants_upcast_attention(path_or_repo_id))
            comps = load_pipeline(path_or_repo_id, device=str(device), dtype=dtype, variant=variant,
                                  config=config, prediction_type=prediction_type)
            comps.vae = comps.vae if vae is None else load_vae(vae, device=device, dtype=dtype, family=comps.family)
            specs = controlnet if isinstance(controlnet, (list, tuple)) else ([] if controlnet is None else [controlnet])
            nets = [c.to(device=device, dtype=dtype) if isinstance(c, torch.nn.Module)
                    else load_controlnet(c, device=str(device), dtype=dtype) for c in specs]
        else:
            if engine_dir is None:
                raise InvalidInputError(f"backend={backend!r} needs engine_dir (a folder written by ldm_engine.export)")
            if vae is not None:
                raise InvalidInputError(f"vae= needs the torch backend; with backend={backend!r} export the "
                                        "model with the VAE wanted (python -m ldm_engine.export ... --vae PATH)")
            try:
                from ldm_engine.export.runtime import load_exported_components
            except ImportError as e:
                raise BackendUnavailableError(
                    f"backend {backend!r} is not available: ldm_engine.export.runtime cannot be imported ({e})") from None
            comps, nets = load_exported_components(engine_dir, backend=backend, device=device)
            if controlnet is None:
                nets = []  # as with the torch backend: ControlNets run only when asked for
            else:
                wanted = controlnet if isinstance(controlnet, (list, tuple)) else [controlnet]
                if len(wanted) != len(nets):
                    raise InvalidInputError(f"controlnet names {len(wanted)} network(s) but {engine_dir} holds "
                                            f"{len(nets)} exported ControlNet(s); export them together with the model")
            dtype = resolve_dtype(dtype, device)
        preview = None
        if preview_vae is not None:
            from ldm_engine.loading import load_vae

            preview = load_vae(preview_vae, device=device, dtype=dtype, family=comps.family)
        return cls(comps, nets, device=device, dtype=dtype, scheduler=scheduler, name=str(path_or_repo_id),
                   preview_vae=preview, vae_dtype=vae_dtype)

    @property
    def scheduler(self) -> str:
        """The sampler name used by generate(); assign a name from SAMPLER_NAMES (or None) to switch."""
        return self._scheduler

    @scheduler.setter
    def scheduler(self, name: str | None) -> None:
        from ldm_engine.samplers import default_sampler_name

        _check_scheduler_name(name)
        self._scheduler = name or default_sampler_name(self.components.scheduler_config)

    # ------------------------------------------------------------------ network options
    # compile(), use_channels_last(), enable_cuda_graphs() / disable_cuda_graphs(): NetworkOptions
    # (ldm_engine.pipeline.network_options), on the networks named here.
    def _torch_networks(self) -> list:
        """U-Net, VAE and ControlNets (the text encoders have no convolutions to re-lay)."""
        return [self.components.unet, self.components.vae, *self.controlnets]

    def _compile_networks(self, **options) -> None:
        """The U-Net, the ControlNets and the VAE decoder."""
        self.components.unet = torch.compile(self.components.unet, **options)
        self.controlnets = [torch.compile(net, **options) for net in self.controlnets]
        vae = self.components.vae
        vae.decode = torch.compile(vae.decode, **options)  # the instance attribute shadows the method

    def _graph_networks(self, wrap):
        """Text encoders, ControlNets, U-Net, VAE encoder and decoder: (components, controlnets)."""
        from ldm_engine.pipeline.cuda_graphs import Proxy

        c = self.components
        vae = Proxy(c.vae, encode=wrap(c.vae.encode, c.vae), decode=wrap(c.vae.decode, c.vae))
        comps = dataclasses.replace(
            c, unet=wrap(c.unet, c.unet), vae=vae, text_encoder=wrap(c.text_encoder, c.text_encoder),
            text_encoder_2=None if c.text_encoder_2 is None else wrap(c.text_encoder_2, c.text_encoder_2))
        return comps, [wrap(net, net) for net in self.controlnets]

    # ------------------------------------------------------------------ LoRA adapters
    def load_lora(self, path_or_repo_id, *, scale: float = 1.0, name: str | None = None) -> str:
        """Merges a LoRA adapter (kohya / A1111 / ComfyUI, diffusers / PEFT, LCM-LoRA; a ``.safetensors``
        file, or a folder / cached repo id holding ``pytorch_lora_weights.safetensors``) into the U-Net
        and text encoder weights, in place: no cost per step, no recompile, no graph recapture.
        Several may be active. Returns its name (the file's stem unless ``name``). An adapter that
        does not fit the model raises CheckpointError and changes nothing. The original weights of
        touched layers are kept in host memory. See ldm_engine.pipeline.lora."""
        return self._lora().load(path_or_repo_id, scale=scale, name=name)

    def set_lora_scales(self, scales: dict) -> None:
        """New scales for loaded adapters, ``{name: scale}`` (0 switches one off)."""
        self._lora().set_scales(scales)

    def unload_lora(self, name: str | None = None) -> None:
        """Removes one adapter, or all (then every weight is bitwise what it was before)."""
        self._lora().unload(name)

    @property
    def loras(self) -> dict:
        """{name: scale} of the loaded LoRA adapters."""
        return dict(self._lora_weights.scales) if self._lora_weights is not None else {}

    def _lora(self):
        if self._lora_weights is None:
            from ldm_engine.pipeline.lora import LoraWeights

            self._lora_weights = LoraWeights.for_components(self.components)
        return self._lora_weights

    def _networks(self):
        """(components, controlnets) that generate() calls: the graphed ones when graphs are on."""
        return self._graphed if self._graphed is not None else (self.components, self.controlnets)

    def __repr__(self) -> str:
        return (f"Engine({self.name!r}, family={self.family}{'-turbo' if self.defaults.turbo else ''}, "
                f"device={self.device}, dtype={self.dtype}, scheduler={self.scheduler}, "
                f"controlnets={len(self.controlnets)})")

    # ------------------------------------------------------------------ generation
    def generate(self, prompt, *, negative_prompt=None, height=None, width=None, num_inference_steps=None,
                 guidance_scale=None, seed=None, latents=None, image=None, strength=None, control_image=None,
                 controlnet_conditioning_scale=1.0, num_images_per_prompt=1, output_type="pil",
                 mask_image=None, callback=None) -> GenerateResult:
        """Generates images; every argument is checked before any network runs (ValueError / TypeError).

        prompt: str or list of str (one batch). negative_prompt: str (for all) or one per prompt; used only
            with guidance (guidance_scale > 1), otherwise ignored with a warning.
        height, width: pixels, multiples of the VAE factor (8 for real models). Default: the init image's
            size, else the first control image's, else the model's (see ldm_engine.pipeline.defaults).
        num_inference_steps, guidance_scale: default from the model family (turbo: 1 step, no guidance).
        seed: int in [0, 2**64); None draws one (returned as result.seed).
        latents: initial noise (batch, 4, height / f, width / f) on the engine's device; replaces the
            seeded draw (text-to-image and inpainting at strength 1.0: scaled by the sampler's init sigma;
            img2img and inpainting below 1.0: the noise added to the encoded image).
        image, strength: img2img; int(num_inference_steps * strength) steps are run (must be >= 1).
        mask_image: inpainting (with image): white (1) is repainted, black (0) kept; one mask for all, one
            per prompt or one per output image; strength defaults to 1.0 (start from pure noise). Inpainting
            models (9-channel U-Net) need it; other models blend the known region back after every step.
            See ldm_engine.pipeline.inpaint.
        control_image, controlnet_conditioning_scale: one image (and scale) per loaded ControlNet.
        num_images_per_prompt: images per prompt, in the same batch.
        output_type: "pil" (list), "np" (float32 (N, H, W, 3) in [0, 1]), "pt" ((N, 3, H, W) tensor),
            "latent" (the final latents, no VAE decode).
        callback: called after every step with a Step (index, timestep, latents, preview()); returning
            False stops early (the latents of that step are decoded as usual). See ldm_engine.pipeline.preview.
        Returns GenerateResult(images, timings in ms, seed). timings["unet"] (and ["controlnet"]) hold
        one entry per U-Net call (PNDM makes one call more than it has steps). timings["controlnet_hint"]:
        embedding the control images, done once per call before the first step and not part of the
        per-step ["controlnet"] entries (0.0 without ControlNets; exported ControlNets embed in every step).
        """
        t_start = time.perf_counter()
        args = check_request(self, prompt, negative_prompt, height, width, num_inference_steps, guidance_scale,
                             seed, latents, image, strength, control_image, controlnet_conditioning_scale,
                             num_images_per_prompt, output_type, mask_image)
        args.callback = check_callback(callback)
        with self._generate_lock(), torch.inference_mode():
            return self._run(args, t_start)

    def _run(self, a: Request, t_start: float) -> GenerateResult:
        (comps, nets), dev, timer = self._networks(), self.device, StageTimer(self.device)
        vae_cfg = comps.vae.config
        scale = vae_cfg.scaling_factor
        shift = getattr(vae_cfg, "shift_factor", None) or 0.0
        schedule, shape, n_prompts, n = a.schedule, a.shape, len(a.prompts), a.n
        # 1. Host-side inputs first: all randomness (on the CPU, in diffusers' order), the init and
        #    control images. They reach the device before any kernel is queued, since a host->device
        #    copy behind queued kernels makes the host wait for them.
        gen = torch.Generator("cpu").manual_seed(a.seed)

        def randn(shape_):
            return torch.randn(shape_, generator=gen, dtype=torch.float32).to(dev)

        f = self.vae_scale_factor
        pixels = post_noise = masked = mask = masked_noise = None
        use_image_latents = False  # img2img / inpainting below strength 1 / 4-channel inpainting
        if a.init is not None:
            pixels = a.init.to_tensor(a.height, a.width) * 2.0 - 1.0
            if a.mask is not None:  # inpainting: the masked image, the mask at latent size
                mask_px = a.mask.to_tensor(a.height, a.width)
                masked = inpaint.masked_pixels(pixels, mask_px, n_prompts, n)
                mask = expand_batch(inpaint.mask_latents(mask_px, f), n_prompts, n, "mask_image").to(dev)
            use_image_latents = a.mask is None or not self.inpainting_unet or a.strength < 1.0
            if use_image_latents and draws_posterior(comps.vae):  # a tiny VAE's encoder draws nothing (as diffusers)
                post_noise = randn((pixels.shape[0], shape[1], a.height // f, a.width // f))
            pixels = pixels.to(dev, self.vae_dtype)
        noise = a.latents.float() if a.latents is not None else randn(shape)
        if masked is not None:
            if draws_posterior(comps.vae):  # drawn even when unused (4-channel models), diffusers' order
                masked_noise = torch.randn((masked.shape[0], *shape[1:]), generator=gen, dtype=torch.float32).to(dev)
            if self.inpainting_unet:
                masked = masked.to(dev, self.vae_dtype)
        noises = None
        if schedule.needs_noise:  # one draw per step, like the diffusers schedulers' step()
            noises = torch.stack([torch.randn(shape, generator=gen) for _ in range(schedule.num_steps)]).to(dev)
        hints = [expand_batch(c.to_tensor(a.height, a.width), n_prompts, n, "control_image").to(dev, self.unet_dtype)
                 for c in a.controls]

        # 2. Text conditioning.
        m_text0 = timer.mark()
        cond = encode_prompts(comps, a.prompts, a.negatives, do_cfg=a.do_cfg, num_images_per_prompt=n,
                              height=a.height, width=a.width,
                              force_zeros_for_empty_prompt=self.force_zeros_for_empty_prompt,
                              dtype=self.unet_dtype, device=dev)
        m_text1 = timer.mark()

        # 3. Initial latents: noise, or (img2img) the encoded image noised to the first timestep;
        #    inpainting: the U-Net's extra input channels or the per-step blend (pipeline/inpaint.py).
        extra = blend = None
        if use_image_latents:
            z = expand_batch(image_latents(comps.vae, pixels, post_noise, scale, shift), n_prompts, n, "image")
        if mask is not None and self.inpainting_unet:
            mz = expand_batch(image_latents(comps.vae, masked, masked_noise, scale, shift), n_prompts, n, "image")
            extra = torch.cat([mask, mz], dim=1).to(self.unet_dtype)
            extra = torch.cat([extra, extra]) if a.do_cfg else extra
        elif mask is not None:
            blend = inpaint.blend_known(schedule, z, noise, mask)
        if pixels is not None and not (mask is not None and a.strength == 1.0):
            x = schedule.add_noise(z, noise)
        else:  # text-to-image, and inpainting at strength 1.0 (as diffusers): pure noise
            x = noise * schedule.init_noise_sigma
        m_enc = timer.mark()
        # Each control image embedded once, for every step and both guidance halves (pipeline/controlnet.py).
        controls = prepare_controls(nets, hints, a.scales, do_cfg=a.do_cfg, latent_size=shape[-2:])
        m_hint = timer.mark()

        # 4. Denoising loop.
        step_marks: list[tuple] = []
        model_fn = self._model_fn(comps.unet, controls, cond, a.guidance, a.do_cfg, timer, step_marks, extra)
        hook = preview.callback_hook(a.callback, schedule, preview.vae_decoder(self.preview_vae))
        x0 = preview.run_sampler(schedule, model_fn, x, noises, after_step=preview.compose(blend, hook))
        m_loop = timer.mark()

        if a.output_type == "latent":
            images = x0
        else:
            z = (x0 / scale + shift).to(self.vae_dtype)
            decoded = comps.vae.decode(z)
        m_dec = timer.mark()
        timer.wait(m_dec)
        if a.output_type != "latent":  # one NaN / Inf check after the loop (half VAE overflow -> fp32 decode)
            images = postprocess(finite.checked_decode(decoded, z, self.components.vae), a.output_type)
        else:
            finite.check_latents(x0)

        timings = {
            "text_encoder": timer.ms(m_text0, m_text1),
            "vae_encode": timer.ms(m_text1, m_enc) if a.init is not None else 0.0,
            "controlnet_hint": timer.ms(m_enc, m_hint) if self.controlnets else 0.0,
            "controlnet": [timer.ms(s0, s1) for s0, s1, _ in step_marks] if self.controlnets else [],
            "unet": [timer.ms(s1, s2) for _, s1, s2 in step_marks],
            "vae_decode": timer.ms(m_loop, m_dec) if a.output_type != "latent" else 0.0,
        }
        timings["total"] = (time.perf_counter() - t_start) * 1000.0
        return GenerateResult(images=images, timings=timings, seed=a.seed)

    def _model_fn(self, unet, controls, cond, guidance, do_cfg, timer, step_marks, extra=None):
        """model_fn(x, t) -> guided eps / v for the sampler: one U-Net call for both CFG halves.
        extra: channels appended to the U-Net's input only (inpainting models' mask and masked image)."""
        dtype = self.unet_dtype
        ehs, text_embeds, time_ids = cond.encoder_hidden_states, cond.text_embeds, cond.time_ids
        copy_output = self._copy_unet_output

        def model_fn(x, t):
            m0 = timer.mark()
            x_in = x.to(dtype)
            if do_cfg:
                x_in = torch.cat([x_in, x_in])
            down, mid = controlnet_residuals(controls, x_in, t, cond)
            m1 = timer.mark()
            u_in = x_in if extra is None else torch.cat([x_in, extra], dim=1)  # inpainting models: 9 channels
            out = unet(u_in, t, ehs, text_embeds=text_embeds, time_ids=time_ids,
                       down_block_additional_residuals=down, mid_block_additional_residual=mid)
            if do_cfg:
                uncond, cond_ = out.chunk(2)
                out = uncond + guidance * (cond_ - uncond)
            step_marks.append((m0, m1, timer.mark()))
            out = out.to(x.dtype)
            return out.clone() if copy_output and not do_cfg else out

        return model_fn


def _wants_upcast_attention(path_or_repo_id) -> bool:
    """True when the U-Net config asks for fp32 attention (SD2.1-768): bf16 is the safer half type there."""
    try:
        import json

        from ldm_engine.loading import resolve_model_path

        cfg = json.loads((resolve_model_path(path_or_repo_id) / "unet" / "config.json").read_text())
        return bool(cfg.get("upcast_attention"))
    except Exception:  # noqa: BLE001 - only a preference; loading reports real problems
        return False
