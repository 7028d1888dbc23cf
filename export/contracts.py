"""Each exported network's contract, declared once: input/output names, dtypes, symbolic (dynamic)
axes, min/opt/max shapes, and sample inputs. The ONNX exporter, the TensorRT builder, the manifest
and the runtime wrappers all read these objects (the runtime from their JSON form in manifest.json).

Shapes are written with three symbols: ``B`` (the network's batch), ``H`` and ``W`` (latent height and
width). Pixel sizes are ``f*H`` with f the VAE scale factor, U-Net/ControlNet residuals at level k are
``H/2^k`` (ceil: a stride-2 3x3 conv with padding 1 gives ceil(n/2)).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

import torch

__all__ = [
    "Dim", "TensorSpec", "Contract", "ShapeProfile", "ContractError", "NETWORK_KINDS",
    "text_encoder_contract", "unet_contract", "vae_decoder_contract", "vae_encoder_contract",
    "controlnet_contract", "residual_layout", "DTYPES", "unet_2d_contract",
]

# Networks a user can ask for on the command line ("text_encoder" covers text_encoder_2 too, and
# "controlnet" brings the U-Net variant with residual inputs, "unet_controlnet").
NETWORK_KINDS = ("unet", "vae_decoder", "vae_encoder", "text_encoder", "controlnet")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
          "int64": torch.int64, "int32": torch.int32}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class ContractError(ValueError):
    """Shapes or dtypes that the exported network cannot take."""


def dtype_name(dtype: torch.dtype | str) -> str:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ContractError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
        return dtype
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise ContractError(f"dtype {dtype} is not supported by the exported networks") from None


_DIM_RE = re.compile(r"^(?:(\d+)\*)?([A-Z])(?:/(\d+))?$")


@dataclass(frozen=True)
class Dim:
    """``mul * sym`` or ``ceil(sym / div)``; a symbolic axis of an exported tensor."""

    sym: str
    mul: int = 1
    div: int = 1

    def __str__(self) -> str:
        s = self.sym
        if self.mul != 1:
            s = f"{self.mul}*{s}"
        if self.div != 1:
            s = f"{s}/{self.div}"
        return s

    @classmethod
    def parse(cls, text: str) -> "Dim":
        m = _DIM_RE.match(text)
        if not m:
            raise ContractError(f"bad dimension expression {text!r}")
        return cls(m.group(2), int(m.group(1) or 1), int(m.group(3) or 1))

    def eval(self, value: int) -> int:
        return -(-(value * self.mul) // self.div)


def _dim_to_json(d):
    return d if isinstance(d, int) else str(d)


def _dim_from_json(d):
    return d if isinstance(d, int) else Dim.parse(d)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dims: tuple  # of int | Dim
    dtype: str   # key of DTYPES

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def shape(self, symbols: dict[str, int]) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else d.eval(symbols[d.sym]) for d in self.dims)

    def to_json(self) -> dict:
        return {"name": self.name, "dims": [_dim_to_json(d) for d in self.dims], "dtype": self.dtype}

    @classmethod
    def from_json(cls, d: dict) -> "TensorSpec":
        return cls(d["name"], tuple(_dim_from_json(x) for x in d["dims"]), d["dtype"])


def _parse_range(value, what: str) -> tuple[int, int, int]:
    if isinstance(value, int):
        return (value, value, value)
    value = tuple(int(v) for v in value)
    if len(value) == 1:
        return value * 3
    if len(value) == 2:
        return (value[0], value[0], value[1])
    if len(value) != 3:
        raise ContractError(f"{what}: expected MIN:OPT:MAX, got {value}")
    return value


@dataclass(frozen=True)
class ShapeProfile:
    """What the exported networks must accept: images per prompt-batch and pixel sizes (min, opt, max).

    Networks that classifier-free guidance doubles (U-Net, ControlNet, text encoders) accept a batch
    of ``batch.min`` to ``2 * batch.max`` and are tuned for ``2 * batch.opt``.
    """

    batch: tuple[int, int, int] = (1, 1, 4)
    height: tuple[int, int, int] = (256, 512, 1024)
    width: tuple[int, int, int] = (256, 512, 1024)

    def __post_init__(self):
        for name in ("batch", "height", "width"):
            object.__setattr__(self, name, _parse_range(getattr(self, name), name))
        self.validate()

    def validate(self, multiple: int = 8):
        for name in ("batch", "height", "width"):
            lo, opt, hi = getattr(self, name)
            if lo < 1:
                raise ContractError(f"{name}: values must be positive, got {lo}:{opt}:{hi}")
            if not lo <= opt <= hi:
                raise ContractError(f"{name}: need MIN <= OPT <= MAX, got {lo}:{opt}:{hi}")
        for name in ("height", "width"):
            bad = [v for v in getattr(self, name) if v % multiple]
            if bad:
                raise ContractError(f"{name}: {bad[0]} px is not a multiple of {multiple}")

    @property
    def is_static(self) -> bool:
        return all(r[0] == r[2] for r in (self.batch, self.height, self.width))

    def to_json(self) -> dict:
        return {"batch": list(self.batch), "height": list(self.height), "width": list(self.width)}

    @classmethod
    def from_json(cls, d: dict) -> "ShapeProfile":
        return cls(tuple(d["batch"]), tuple(d["height"]), tuple(d["width"]))


@dataclass
class Contract:
    """One exported network: its tensors and how its symbols map to the shape profile."""

    network: str                 # file stem and manifest key: unet, unet_controlnet, text_encoder_2, controlnet_0 ...
    kind: str                    # unet | unet_controlnet | vae_decoder | vae_encoder | text_encoder | controlnet
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dtype: str                   # the network's float dtype
    vae_scale_factor: int = 8
    cfg_batch: bool = False      # batch doubled by classifier-free guidance
    extra: dict = field(default_factory=dict)

    # -- shapes --------------------------------------------------------------------------------
    def symbol_ranges(self, profile: ShapeProfile) -> dict[str, tuple[int, int, int]]:
        f = self.vae_scale_factor
        b = profile.batch
        if self.cfg_batch:
            b = (b[0], 2 * b[1], 2 * b[2])
        return {"B": b, "H": tuple(v // f for v in profile.height), "W": tuple(v // f for v in profile.width)}

    def profile_shapes(self, profile: ShapeProfile) -> dict[str, tuple[tuple[int, ...], ...]]:
        """{input name: (min shape, opt shape, max shape)} -- TensorRT optimization profile."""
        ranges = self.symbol_ranges(profile)
        out = {}
        for spec in self.inputs:
            out[spec.name] = tuple(spec.shape({s: r[i] for s, r in ranges.items()}) for i in range(3))
        return out

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        axes = {}
        for spec in self.inputs + self.outputs:
            dyn = {i: str(d) for i, d in enumerate(spec.dims) if not isinstance(d, int)}
            if dyn:
                axes[spec.name] = dyn
        return axes

    def bind(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
        """Symbol values from actual input shapes; raises ContractError naming any mismatch."""
        for spec in self.inputs:
            if spec.name not in shapes:
                raise ContractError(f"{self.network}: missing input {spec.name!r}")
            if len(shapes[spec.name]) != len(spec.dims):
                raise ContractError(f"{self.network}: input {spec.name!r} must have {len(spec.dims)} dims "
                                    f"{self._dims_text(spec)}, got shape {tuple(shapes[spec.name])}")
        symbols: dict[str, int] = {}
        # plain symbols first (B, H, W), then symbols seen only scaled (the pixel-sized vae_encoder input)
        for plain in (True, False):
            for spec in self.inputs:
                for d, n in zip(spec.dims, shapes[spec.name]):
                    if not isinstance(d, Dim) or d.sym in symbols or d.div != 1 or (d.mul == 1) != plain:
                        continue
                    if n % d.mul:
                        raise ContractError(f"{self.network}: input {spec.name!r} size {n} is not a multiple "
                                            f"of {d.mul} {self._dims_text(spec)}")
                    symbols[d.sym] = n // d.mul
        for spec in self.inputs:
            shape, expected = tuple(shapes[spec.name]), spec.shape(symbols)
            if shape != expected:
                raise ContractError(f"{self.network}: input {spec.name!r} has shape {shape}, expected "
                                    f"{expected} {self._dims_text(spec)}")
        return symbols

    def check_in_profile(self, symbols: dict[str, int], ranges: dict[str, tuple[int, int, int]]):
        names = {"B": "batch", "H": "latent height", "W": "latent width"}
        for s, v in symbols.items():
            lo, _, hi = ranges[s]
            if not lo <= v <= hi:
                raise ContractError(f"{self.network}: {names.get(s, s)} {v} is outside the exported range "
                                    f"[{lo}, {hi}]; re-export with a wider --batch/--height/--width")

    def output_shapes(self, symbols: dict[str, int]) -> dict[str, tuple[int, ...]]:
        return {spec.name: spec.shape(symbols) for spec in self.outputs}

    @staticmethod
    def _dims_text(spec: TensorSpec) -> str:
        return "(" + ", ".join(str(d) for d in spec.dims) + ")"

    # -- sample inputs -------------------------------------------------------------------------
    def sample_inputs(self, symbols: dict[str, int], *, device="cpu", generator: torch.Generator | None = None,
                      dtype_override: str | None = None) -> tuple[torch.Tensor, ...]:
        """Random inputs of the right shapes and dtypes, in the order of ``inputs``."""
        out = []
        for spec in self.inputs:
            shape = spec.shape(symbols)
            dtype = spec.torch_dtype
            if spec.name == "input_ids":
                vocab = int(self.extra.get("vocab_size", 49408))
                out.append(torch.randint(0, vocab, shape, generator=generator).to(device))
            elif spec.name == "timestep":
                out.append((torch.rand(shape, generator=generator) * 999).to(device, dtype))
            elif spec.name == "controlnet_cond":
                out.append(torch.rand(shape, generator=generator).to(device, dtype))
            elif spec.name == "time_ids":
                base = torch.tensor([512.0, 512.0, 0.0, 0.0, 512.0, 512.0])[: shape[-1]]
                out.append(base.expand(shape).contiguous().to(device, dtype))
            else:
                x = torch.randn(shape, generator=generator)
                out.append(x.to(device, torch.float32 if dtype_override == "fp32" else dtype))
        return tuple(out)

    def default_trace_symbols(self, profile: ShapeProfile | None = None) -> dict[str, int]:
        """Shapes to trace the export at. Every ONNX axis is dynamic whatever the trace shape, so it
        is small (cheap on a CPU even for SDXL) but not degenerate: batch 2, distinct height and
        width, at least 2 at the deepest U-Net level (1/8) -- no axis can pass for a constant."""
        return {"B": 2, "H": 16, "W": 24}

    # -- JSON ----------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {"network": self.network, "kind": self.kind, "dtype": self.dtype,
                "vae_scale_factor": self.vae_scale_factor, "cfg_batch": self.cfg_batch,
                "inputs": [s.to_json() for s in self.inputs], "outputs": [s.to_json() for s in self.outputs],
                "extra": self.extra}

    @classmethod
    def from_json(cls, d: dict) -> "Contract":
        return cls(network=d["network"], kind=d["kind"], dtype=d["dtype"],
                   vae_scale_factor=int(d["vae_scale_factor"]), cfg_batch=bool(d["cfg_batch"]),
                   inputs=tuple(TensorSpec.from_json(s) for s in d["inputs"]),
                   outputs=tuple(TensorSpec.from_json(s) for s in d["outputs"]), extra=dict(d.get("extra", {})))

    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [s.name for s in self.outputs]


# ------------------------------------------------------------------------------------------------
# Builders, one per network kind. They take the model config objects (dataclasses whose field names
# are the diffusers / transformers config keys) and read nothing else.

B, H, W = Dim("B"), Dim("H"), Dim("W")


def _cfg(config, name, default=None):
    return getattr(config, name, default) if not isinstance(config, dict) else config.get(name, default)


def is_tiny_vae(vae_config) -> bool:
    """AutoencoderTiny (TAESD): its encoder gives the latents themselves, no mean / logvar."""
    return _cfg(vae_config, "encoder_block_out_channels") is not None


def vae_scale_factor(vae_config) -> int:
    return 2 ** (len(_cfg(vae_config, "block_out_channels")) - 1)


def text_encoder_contract(config, *, network="text_encoder", dtype="fp32", with_projection=False) -> Contract:
    seq = int(_cfg(config, "max_position_embeddings", 77))
    hidden = int(_cfg(config, "hidden_size"))
    pooled = int(_cfg(config, "projection_dim")) if with_projection else hidden
    d = dtype_name(dtype)
    return Contract(
        network=network, kind="text_encoder", dtype=d, cfg_batch=True,
        inputs=(TensorSpec("input_ids", (B, seq), "int64"),),
        outputs=(TensorSpec("last_hidden_state", (B, seq, hidden), d),
                 TensorSpec("penultimate_hidden_state", (B, seq, hidden), d),
                 TensorSpec("pooled", (B, pooled), d)),
        extra={"vocab_size": int(_cfg(config, "vocab_size", 49408)), "with_projection": bool(with_projection)},
    )


def _as_list(v, n):
    return list(v) if isinstance(v, (list, tuple)) else [v] * n


def residual_layout(config) -> list[tuple[int, int]]:
    """(channels, downsampling factor) of each ControlNet residual the U-Net takes: the conv_in output,
    each resnet of each down block, each downsampler, and last the mid block."""
    channels = list(_cfg(config, "block_out_channels"))
    layers = _as_list(_cfg(config, "layers_per_block", 2), len(channels))
    out = [(channels[0], 1)]
    for i, c in enumerate(channels):
        out += [(c, 2 ** i)] * int(layers[i])
        if i < len(channels) - 1:
            out.append((c, 2 ** (i + 1)))
    out.append((channels[-1], 2 ** (len(channels) - 1)))
    return out


def _residual_specs(config, dtype, prefix="down_residual_") -> tuple[TensorSpec, ...]:
    layout = residual_layout(config)
    specs = [TensorSpec(f"{prefix}{i}", (B, c, Dim("H", div=k), Dim("W", div=k)), dtype)
             for i, (c, k) in enumerate(layout[:-1])]
    c, k = layout[-1]
    specs.append(TensorSpec("mid_residual", (B, c, Dim("H", div=k), Dim("W", div=k)), dtype))
    return tuple(specs)


def _added_cond_specs(config, dtype, text_embeds_dim) -> tuple[TensorSpec, ...]:
    """SDXL-style ``text_time`` conditioning: pooled text embeds and the micro-conditioning ids."""
    if _cfg(config, "addition_embed_type") != "text_time":
        return ()
    total = int(_cfg(config, "projection_class_embeddings_input_dim"))
    per_id = int(_cfg(config, "addition_time_embed_dim"))
    n_ids = (total - text_embeds_dim) // per_id
    if n_ids <= 0 or text_embeds_dim + n_ids * per_id != total:
        raise ContractError(f"projection_class_embeddings_input_dim={total} does not split into pooled text "
                            f"embeds of {text_embeds_dim} and time ids of {per_id} each")
    return (TensorSpec("text_embeds", (B, text_embeds_dim), dtype), TensorSpec("time_ids", (B, n_ids), dtype))


def _context_dim(config) -> int:
    cad = _cfg(config, "cross_attention_dim")
    if isinstance(cad, (list, tuple)):
        if len(set(cad)) != 1:
            raise ContractError(f"per-block cross_attention_dim {cad} is not supported by the exporter")
        cad = cad[0]
    return int(cad)


def unet_contract(config, *, vae_scale: int, dtype="fp32", seq_len=77, text_embeds_dim=1280,
                  with_residuals=False) -> Contract:
    """``sample`` has the U-Net's in_channels: 4 (latents), or 9 for inpainting U-Nets (latents, mask,
    masked-image latents, concatenated by the engine), with 4 output channels either way."""
    d = dtype_name(dtype)
    c_in, c_out = int(_cfg(config, "in_channels")), int(_cfg(config, "out_channels"))
    inputs = (TensorSpec("sample", (B, c_in, H, W), d),
              TensorSpec("timestep", (B,), "fp32"),
              TensorSpec("encoder_hidden_states", (B, seq_len, _context_dim(config)), d))
    inputs += _added_cond_specs(config, d, text_embeds_dim)
    if with_residuals:
        inputs += _residual_specs(config, d)
    return Contract(network="unet_controlnet" if with_residuals else "unet",
                    kind="unet_controlnet" if with_residuals else "unet", dtype=d, vae_scale_factor=vae_scale,
                    cfg_batch=True, inputs=inputs, outputs=(TensorSpec("out_sample", (B, c_out, H, W), d),))


def controlnet_contract(config, *, vae_scale: int, dtype="fp32", seq_len=77, text_embeds_dim=1280,
                        network="controlnet_0") -> Contract:
    d = dtype_name(dtype)
    c_in = int(_cfg(config, "in_channels"))
    c_cond = int(_cfg(config, "conditioning_channels", 3))
    f = vae_scale
    inputs = (TensorSpec("sample", (B, c_in, H, W), d),
              TensorSpec("timestep", (B,), "fp32"),
              TensorSpec("encoder_hidden_states", (B, seq_len, _context_dim(config)), d),
              TensorSpec("controlnet_cond", (B, c_cond, Dim("H", mul=f), Dim("W", mul=f)), d),
              TensorSpec("conditioning_scale", (1,), "fp32"))
    inputs += _added_cond_specs(config, d, text_embeds_dim)
    return Contract(network=network, kind="controlnet", dtype=d, vae_scale_factor=f, cfg_batch=True,
                    inputs=inputs, outputs=_residual_specs(config, d))


def vae_decoder_contract(config, *, dtype="fp32") -> Contract:
    d = dtype_name(dtype)
    f = vae_scale_factor(config)
    lat, out = int(_cfg(config, "latent_channels")), int(_cfg(config, "out_channels", 3))
    return Contract(network="vae_decoder", kind="vae_decoder", dtype=d, vae_scale_factor=f,
                    inputs=(TensorSpec("latent", (B, lat, H, W), d),),
                    outputs=(TensorSpec("image", (B, out, Dim("H", mul=f), Dim("W", mul=f)), d),))


def vae_encoder_contract(config, *, dtype="fp32") -> Contract:
    d = dtype_name(dtype)
    f = vae_scale_factor(config)
    lat, c_in = int(_cfg(config, "latent_channels")), int(_cfg(config, "in_channels", 3))
    outputs = ((TensorSpec("latent", (B, lat, H, W), d),) if is_tiny_vae(config)  # TAESD: no distribution
               else (TensorSpec("mean", (B, lat, H, W), d), TensorSpec("logvar", (B, lat, H, W), d)))
    return Contract(network="vae_encoder", kind="vae_encoder", dtype=d, vae_scale_factor=f,
                    inputs=(TensorSpec("image", (B, c_in, Dim("H", mul=f), Dim("W", mul=f)), d),), outputs=outputs)


def unet_2d_contract(config, *, dtype="fp32") -> Contract:
    """The unconditional pixel-space U-Net (DDPM UNet2DModel): H and W are pixels (no VAE, factor 1)
    and must divide by 2^(levels - 1); no text input, no guidance (batch not doubled)."""
    d = dtype_name(dtype)
    c_in, c_out = int(_cfg(config, "in_channels")), int(_cfg(config, "out_channels"))
    multiple = 2 ** (len(_cfg(config, "block_out_channels")) - 1)
    return Contract(network="unet_2d", kind="unet_2d", dtype=d, vae_scale_factor=1,
                    inputs=(TensorSpec("sample", (B, c_in, H, W), d), TensorSpec("timestep", (B,), "fp32")),
                    outputs=(TensorSpec("out_sample", (B, c_out, H, W), d),), extra={"size_multiple": multiple})


def required_multiple(unet_config, vae_config) -> int:
    """Pixel sizes must divide by this: the VAE factor times the U-Net's total downsampling, so that
    every residual / skip connection has an exact size at every resolution of a dynamic range."""
    f = vae_scale_factor(vae_config)
    levels = len(_cfg(unet_config, "block_out_channels")) - 1
    return max(8, f * 2 ** levels)


def replace(contract: Contract, **kw) -> Contract:
    return dataclasses.replace(contract, **kw)

