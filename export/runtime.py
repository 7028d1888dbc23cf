"""Run exported networks behind the torch modules' call signatures.

``load_exported_components(engine_dir, backend=..., device=...)`` returns the loading package's
``Components`` with wrappers in place of the U-Net, VAE, text encoders (and a list of ControlNet
wrappers), so that ``Engine.generate()`` runs unchanged on ONNX Runtime or TensorRT.

Every call binds torch tensors by device pointer (ONNX Runtime IO binding; TensorRT
``set_tensor_address`` + ``execute_async_v3`` on torch's current stream): inputs and outputs stay
torch tensors on ``device``, with no host copies between stages on a GPU.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .contracts import Contract, ContractError, ShapeProfile, is_tiny_vae
from .manifest import ExportDirError, read_manifest, verify_files

BACKENDS = ("onnxruntime", "tensorrt")


def _backend_error(msg):
    from ldm_engine.errors import BackendUnavailableError

    return BackendUnavailableError(msg)


# -- sessions: one exported network, dict of tensors in -> dict of tensors out -------------------

class _Session:
    def __init__(self, contract: Contract, ranges: dict, device: torch.device, *, enforce_ranges: bool):
        self.contract, self.ranges, self.device = contract, ranges, device
        self.enforce_ranges = enforce_ranges

    def __call__(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        c = self.contract
        prepared = {}
        for spec in c.inputs:
            t = inputs[spec.name]
            prepared[spec.name] = t.to(device=self.device, dtype=spec.torch_dtype).contiguous()
        symbols = c.bind({k: tuple(v.shape) for k, v in prepared.items()})
        if self.enforce_ranges:
            c.check_in_profile(symbols, self.ranges)
        outputs = {spec.name: torch.empty(spec.shape(symbols), dtype=spec.torch_dtype, device=self.device)
                   for spec in c.outputs}
        self._execute(prepared, outputs)
        return outputs

    def _execute(self, inputs, outputs):
        raise NotImplementedError


def _numpy_type(dtype: torch.dtype):
    import numpy as np

    table = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64, torch.int32: np.int32}
    if dtype not in table:
        raise _backend_error(f"ONNX Runtime IO binding has no element type for {dtype} (bf16 exports are for "
                             f"TensorRT); export with --dtype fp16 or fp32")
    return table[dtype]


class OnnxRuntimeSession(_Session):
    def __init__(self, path: Path, contract: Contract, ranges: dict, device: torch.device):
        super().__init__(contract, ranges, device, enforce_ranges=False)  # ONNX axes are fully dynamic
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise _backend_error(f"backend='onnxruntime' needs the onnxruntime package ({e})") from e
        for spec in contract.inputs + contract.outputs:
            _numpy_type(spec.torch_dtype)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        if device.type == "cpu":
            # idle ORT workers would otherwise spin between calls, starving torch's threads
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.run_options = ort.RunOptions()
        if device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise _backend_error("device='cuda' with backend='onnxruntime' needs the onnxruntime-gpu package "
                                     "(CUDAExecutionProvider is not available in this onnxruntime)")
            index = device.index if device.index is not None else torch.cuda.current_device()
            self.device = torch.device("cuda", index)
            stream = torch.cuda.current_stream(self.device).cuda_stream
            # run on torch's stream: ORT kernels are ordered after the torch ops that made the inputs
            providers = [("CUDAExecutionProvider", {"device_id": index, "user_compute_stream": str(stream),
                                                    "has_user_compute_stream": "1"}), "CPUExecutionProvider"]
            self.run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")
            self._dev = ("cuda", index)
        elif device.type == "cpu":
            providers = ["CPUExecutionProvider"]
            self._dev = ("cpu", 0)
        else:
            raise _backend_error(f"backend='onnxruntime' runs on 'cpu' or 'cuda', not {device}")
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        names = [i.name for i in self.session.get_inputs()]
        if names != contract.input_names:
            raise ExportDirError(f"{path.name}: inputs {names} differ from the manifest's contract "
                                 f"{contract.input_names}; export again")

    def _execute(self, inputs, outputs):
        binding = self.session.io_binding()
        kind, index = self._dev
        for name, t in inputs.items():
            binding.bind_input(name, kind, index, _numpy_type(t.dtype), list(t.shape), t.data_ptr())
        for name, t in outputs.items():
            binding.bind_output(name, kind, index, _numpy_type(t.dtype), list(t.shape), t.data_ptr())
        self.session.run_with_iobinding(binding, self.run_options)


class TensorRTSession(_Session):
    def __init__(self, plan: Path, key: dict, contract: Contract, ranges: dict, device: torch.device):
        super().__init__(contract, ranges, device, enforce_ranges=True)
        from .tensorrt_build import import_tensorrt, load_engine, trt_to_torch_dtype

        trt = import_tensorrt()
        if device.type != "cuda":
            raise _backend_error("backend='tensorrt' needs device='cuda'")
        index = device.index if device.index is not None else torch.cuda.current_device()
        self.device = torch.device("cuda", index)
        with torch.cuda.device(index):
            self.runtime, self.engine = load_engine(plan, key, device_index=index)
            self.context = self.engine.create_execution_context()
        io = {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            io[name] = (self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT,
                        trt_to_torch_dtype(trt, self.engine.get_tensor_dtype(name)))
        for spec, is_input in [(s, True) for s in contract.inputs] + [(s, False) for s in contract.outputs]:
            if spec.name not in io or io[spec.name] != (is_input, spec.torch_dtype):
                raise ExportDirError(f"{plan.name}: tensor {spec.name!r} is {io.get(spec.name)} in the engine, the "
                                     f"contract says ({is_input}, {spec.torch_dtype}); rebuild the engine")

    def _execute(self, inputs, outputs):
        ctx = self.context
        from .tensorrt_build import TensorRTError

        for name, t in inputs.items():
            if not ctx.set_input_shape(name, tuple(t.shape)):
                raise TensorRTError(f"{self.contract.network}: TensorRT rejected shape {tuple(t.shape)} for {name!r}")
            ctx.set_tensor_address(name, t.data_ptr())
        for name, t in outputs.items():
            ctx.set_tensor_address(name, t.data_ptr())
        # torch's current stream: ordered after the ops that produced the inputs, and the caching
        # allocator keeps these tensors' memory until work queued on this stream is done
        stream = torch.cuda.current_stream(self.device)
        if not ctx.execute_async_v3(stream.cuda_stream):
            raise TensorRTError(f"{self.contract.network}: TensorRT execute_async_v3 failed")


# -- wrappers with the torch modules' signatures -------------------------------------------------

class _Missing:
    """Stands in for a network that was not exported; says so when called."""

    def __init__(self, network: str, engine_dir: Path, config=None):
        self.network, self.engine_dir, self.config = network, engine_dir, config

    def __call__(self, *args, **kwargs):
        raise _backend_error(f"{self.network} was not exported to {str(self.engine_dir)!r}; export it with "
                             f"`python -m ldm_engine.export MODEL --out DIR --components ...,{self.network}`")


class _Wrapper:
    def __init__(self, config, dtype: torch.dtype, device: torch.device):
        self.config, self.dtype, self.device = config, dtype, device

    def eval(self):
        return self

    def requires_grad_(self, requires_grad: bool = True):
        return self


def _batch_timestep(timestep, batch: int, device) -> torch.Tensor:
    t = timestep if torch.is_tensor(timestep) else torch.tensor(timestep)
    if t.dim() > 1 or (t.dim() == 1 and t.shape[0] not in (1, batch)):
        raise ValueError(f"timestep must be 0-d or of shape ({batch},) or (1,), got {tuple(t.shape)}")
    return t.to(device=device, dtype=torch.float32).reshape(-1).expand(batch)


def _added_inputs(contract: Contract, text_embeds, time_ids, network: str) -> dict:
    wants = "text_embeds" in contract.input_names
    if wants and (text_embeds is None or time_ids is None):
        raise ValueError(f"{network} (SDXL-style, addition_embed_type='text_time') needs text_embeds and time_ids")
    if not wants and (text_embeds is not None or time_ids is not None):
        raise ValueError(f"text_embeds/time_ids given, but the exported {network} has no SDXL added conditioning")
    return {"text_embeds": text_embeds, "time_ids": time_ids} if wants else {}


class ExportedTextEncoder(_Wrapper):
    """``text_encoder(input_ids) -> CLIPTextOutput(last_hidden_state, penultimate_hidden_state, pooled)``."""

    def __init__(self, session: _Session, config, with_projection: bool):
        super().__init__(config, session.contract.outputs[0].torch_dtype, session.device)
        self.session, self.with_projection = session, with_projection

    def __call__(self, input_ids: torch.Tensor):
        from ldm_engine.models.clip import CLIPTextOutput

        if not torch.is_tensor(input_ids) or input_ids.dtype.is_floating_point:
            raise TypeError("input_ids must be an integer torch.Tensor")
        out = self.session({"input_ids": input_ids})
        return CLIPTextOutput(out["last_hidden_state"], out["penultimate_hidden_state"], out["pooled"])

    forward = __call__


class ExportedUNet(_Wrapper):
    """The U-Net; ControlNet residuals go to the ``unet_controlnet`` variant (exported alongside)."""

    def __init__(self, config, plain: _Session | None, with_residuals: _Session | None):
        any_session = plain or with_residuals
        super().__init__(config, any_session.contract.outputs[0].torch_dtype, any_session.device)
        self.plain, self.with_residuals = plain, with_residuals

    def __call__(self, sample, timestep, encoder_hidden_states, *, text_embeds=None, time_ids=None,
                 down_block_additional_residuals=None, mid_block_additional_residual=None):
        if (down_block_additional_residuals is None) != (mid_block_additional_residual is None):
            raise ValueError("ControlNet residuals: pass both down_block_additional_residuals and "
                             "mid_block_additional_residual, or neither")
        use_res = down_block_additional_residuals is not None
        session = self.with_residuals if use_res else self.plain
        if session is None:
            need = "unet_controlnet (exported with --controlnet)" if use_res else "unet"
            raise _backend_error(f"the export directory has no {need} network")
        c = session.contract
        inputs = {"sample": sample, "timestep": _batch_timestep(timestep, sample.shape[0], self.device),
                  "encoder_hidden_states": encoder_hidden_states,
                  **_added_inputs(c, text_embeds, time_ids, "U-Net")}
        if use_res:
            names = [n for n in c.input_names if n.startswith("down_residual_")]
            if len(down_block_additional_residuals) != len(names):
                raise ValueError(f"down_block_additional_residuals has {len(down_block_additional_residuals)} "
                                 f"tensors, this U-Net takes {len(names)}")
            inputs.update(zip(names, down_block_additional_residuals))
            inputs["mid_residual"] = mid_block_additional_residual
        return session(inputs)["out_sample"]

    forward = __call__


class ExportedControlNet(_Wrapper):
    def __init__(self, session: _Session, config):
        super().__init__(config, session.contract.outputs[0].torch_dtype, session.device)
        self.session = session

    def __call__(self, sample, timestep, encoder_hidden_states, controlnet_cond, *, conditioning_scale=1.0,
                 text_embeds=None, time_ids=None):
        c = self.session.contract
        scale = conditioning_scale if torch.is_tensor(conditioning_scale) else torch.tensor(float(conditioning_scale))
        inputs = {"sample": sample, "timestep": _batch_timestep(timestep, sample.shape[0], self.device),
                  "encoder_hidden_states": encoder_hidden_states, "controlnet_cond": controlnet_cond,
                  "conditioning_scale": scale.reshape(1), **_added_inputs(c, text_embeds, time_ids, "ControlNet")}
        out = self.session(inputs)
        names = c.output_names
        return tuple(out[n] for n in names[:-1]), out[names[-1]]

    forward = __call__


class ExportedVAE(_Wrapper):
    """``encode(x) -> (mean, logvar)`` (a tiny VAE: ``(latents, None)``), ``decode(z) -> image``; either
    may be absent (not exported)."""

    def __init__(self, config, decoder: _Session | None, encoder: _Session | None, engine_dir: Path):
        any_session = decoder or encoder
        super().__init__(config, any_session.contract.inputs[0].torch_dtype, any_session.device)
        self.decoder, self.encoder, self.engine_dir = decoder, encoder, engine_dir
        self.latent_distribution = not is_tiny_vae(config)  # see ldm_engine.pipeline.latents

    @property
    def downscale(self) -> int:
        return (self.decoder or self.encoder).contract.vae_scale_factor

    def encode(self, x):
        if self.encoder is None:
            return _Missing("vae_encoder", self.engine_dir)()
        out = self.encoder({"image": x})
        if "latent" in out:
            return out["latent"], None
        return out["mean"], out["logvar"]

    def decode(self, z):
        if self.decoder is None:
            return _Missing("vae_decoder", self.engine_dir)()
        return self.decoder({"latent": z})["image"]


# -- loading ---------------------------------------------------------------------------------------

def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ExportDirError(f"{path} is missing or unreadable ({e}); export again") from e
    except RecursionError:
        raise ExportDirError(f"{path} is corrupt (JSON nested too deeply); export again") from None
    if not isinstance(data, dict):
        raise ExportDirError(f"{path} is corrupt (not a JSON object); export again")
    return data


def load_config(engine_dir: Path, kind: str, name: str):
    """The model config object saved by the exporter (configs/<name>.json)."""
    data = _read_json(engine_dir / "configs" / f"{name}.json")
    if kind == "unet":
        from ldm_engine.models.unet import UNetConfig as cls
    elif kind == "vae" and "encoder_block_out_channels" in data:
        from ldm_engine.models.vae_tiny import TinyVAEConfig as cls
    elif kind == "vae":
        from ldm_engine.models.vae import VAEConfig as cls
    elif kind == "text_encoder":
        from ldm_engine.models.clip import CLIPTextConfig as cls
    elif kind == "controlnet":
        from ldm_engine.models.controlnet import ControlNetConfig as cls
    else:
        raise ValueError(kind)
    try:
        return cls.from_dict(data)
    except (TypeError, ValueError) as e:
        raise ExportDirError(f"{engine_dir / 'configs' / f'{name}.json'}: unusable config ({e}); export again") from None


def _session(engine_dir: Path, manifest: dict, network: str, backend: str, device: torch.device) -> _Session:
    entry = manifest["networks"][network]
    contract = Contract.from_json(entry["contract"])
    profile = ShapeProfile.from_json(manifest["profile"])
    ranges = contract.symbol_ranges(profile)
    if backend == "onnxruntime":
        files = [entry["onnx"]] + ([entry["onnx_data"]] if entry.get("onnx_data") else [])
        verify_files(engine_dir, manifest, relpaths=files)
        return OnnxRuntimeSession(engine_dir / entry["onnx"], contract, ranges, device)
    trt_entry = entry.get("tensorrt")
    if not trt_entry:
        raise ExportDirError(f"{engine_dir} has no TensorRT engine for {network} (exported with --format "
                             f"{manifest['format']}); build one with --format tensorrt")
    verify_files(engine_dir, manifest, relpaths=[trt_entry["plan"]],
                 full_hash=os.environ.get("LDM_ENGINE_VERIFY_EXPORTS") == "1")
    return TensorRTSession(engine_dir / trt_entry["plan"], trt_entry["key"], contract, ranges, device)


def load_tokenizer(engine_dir: Path, name: str):
    from ldm_engine.tokenizer import CLIPTokenizer

    folder = engine_dir / name
    if not folder.is_dir():
        raise ExportDirError(f"{folder} is missing; export again")
    return CLIPTokenizer.from_pretrained(folder)


def load_exported_components(engine_dir: str | os.PathLike, *, backend: str = "onnxruntime",
                             device: str | torch.device = "cpu"):
    """(Components, [controlnet wrappers]) for an export directory written by ``python -m ldm_engine.export``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    engine_dir = Path(engine_dir)
    device = torch.device(device)
    manifest = read_manifest(engine_dir)
    nets = manifest["networks"]

    def session(name):
        return _session(engine_dir, manifest, name, backend, device) if name in nets else None

    family = manifest["family"]
    unet_config = load_config(engine_dir, "unet", "unet")
    vae_config = load_config(engine_dir, "vae", "vae")
    plain, with_res = session("unet"), session("unet_controlnet")
    unet = ExportedUNet(unet_config, plain, with_res) if (plain or with_res) else _Missing("unet", engine_dir, unet_config)
    dec, enc = session("vae_decoder"), session("vae_encoder")
    vae = ExportedVAE(vae_config, dec, enc, engine_dir) if (dec or enc) else _Missing("vae_decoder", engine_dir, vae_config)

    def text_encoder(name):
        config = load_config(engine_dir, "text_encoder", name) if (engine_dir / "configs" / f"{name}.json").exists() else None
        if config is None:
            return None
        s = session(name)
        if s is None:
            return _Missing(name, engine_dir, config)
        return ExportedTextEncoder(s, config, bool(s.contract.extra.get("with_projection")))

    te, te2 = text_encoder("text_encoder"), text_encoder("text_encoder_2")
    tok = load_tokenizer(engine_dir, "tokenizer")
    tok2 = load_tokenizer(engine_dir, "tokenizer_2") if te2 is not None else None
    scheduler_config = _read_json(engine_dir / "configs" / "scheduler_config.json")
    try:
        from ldm_engine.samplers import check_scheduler_config
        check_scheduler_config(scheduler_config)
    except ValueError as e:
        raise ExportDirError(f"{engine_dir / 'configs' / 'scheduler_config.json'}: {e}; export again") from None

    from ldm_engine.loading import Components

    comps = Components(family=family, unet=unet, vae=vae, text_encoder=te, tokenizer=tok, text_encoder_2=te2,
                       tokenizer_2=tok2, scheduler_config=scheduler_config, source=str(engine_dir))
    controlnets = []
    for name in manifest.get("controlnets", []):
        config = load_config(engine_dir, "controlnet", name)
        controlnets.append(ExportedControlNet(session(name), config))
    return comps, controlnets


__all__ = ["load_exported_components", "OnnxRuntimeSession", "TensorRTSession", "ExportedUNet", "ExportedVAE",
           "ExportedTextEncoder", "ExportedControlNet", "BACKENDS", "ContractError"]
