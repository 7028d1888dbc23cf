"""torch -> ONNX for each network, driven by its contract.

Uses the TorchScript exporter (``torch.onnx.export(..., dynamo=False)``): it traces the module once
and turns shape arithmetic into ONNX Shape ops, which is what dynamic batch and resolution need,
and it handles the U-Nets' shape-dependent upsampling without graph breaks. The project's fused ops
are forced to their "torch" backend while exporting (F.group_norm / F.silu / SDPA), so the graph
holds only standard ONNX operators; this is checked after every export.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .contracts import Contract, ContractError
from .manifest import publish, sha256_file

ONNX_MAX_PROTO = 2 * 1024 ** 3   # protobuf's hard limit; larger models keep weights in a .data file
DEFAULT_OPSET = 17
STANDARD_DOMAINS = {"", "ai.onnx"}


class ExportError(RuntimeError):
    """An ONNX export produced something unusable (non-standard ops, checker failure)."""


@contextlib.contextmanager
def torch_ops_backend():
    """Run ldm_engine.ops on its plain-PyTorch backend (F.group_norm / F.silu / SDPA), which export
    as standard ONNX; the Triton / CUDA custom ops would not."""
    from ldm_engine import ops

    old = os.environ.get("LDM_ENGINE_BACKEND")
    os.environ["LDM_ENGINE_BACKEND"] = "torch"
    ctx = contextlib.nullcontext()
    for name in ("use_backend", "backend_scope", "force_backend"):  # the kernels helper's API, if any
        fn = getattr(ops, name, None)
        if callable(fn):
            ctx = fn("torch")
            break
    try:
        with ctx:
            yield
    finally:
        if old is None:
            os.environ.pop("LDM_ENGINE_BACKEND", None)
        else:
            os.environ["LDM_ENGINE_BACKEND"] = old


@contextlib.contextmanager
def causal_sdpa_as_mask():
    """The TorchScript exporter builds SDPA's causal mask in fp32 and adds it to the scores, which
    leaves fp16 graphs (CLIP) with mixed-type LayerNorm inputs that ONNX Runtime refuses. While
    exporting, causal attention gets an explicit additive mask in the scores' own dtype instead."""
    original = F.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        if is_causal and attn_mask is None:
            n_q, n_k = query.shape[-2], key.shape[-2]
            keep = torch.ones(n_q, n_k, dtype=torch.bool, device=query.device).tril()
            attn_mask = torch.zeros(n_q, n_k, dtype=query.dtype, device=query.device).masked_fill(
                ~keep, float("-inf"))
            is_causal = False
        return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                        scale=scale, **kw)

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


# -- adapters: flat positional tensors in, flat tuple out, in contract order --------------------

class ExportAdapter(nn.Module):
    """Wraps a model so that its forward takes the contract's inputs positionally and returns the
    contract's outputs as a flat tuple."""

    def __init__(self, model: nn.Module, contract: Contract):
        super().__init__()
        self.model = model
        self.kind = contract.kind
        self.names = contract.input_names

    def forward(self, *tensors):
        x = dict(zip(self.names, tensors))
        kind, m = self.kind, self.model
        added = {k: x[k] for k in ("text_embeds", "time_ids") if k in x}
        if kind == "text_encoder":
            out = m(x["input_ids"])
            return out.last_hidden_state, out.penultimate_hidden_state, out.pooled
        if kind == "vae_decoder":
            return (m.decode(x["latent"]),)
        if kind == "vae_encoder":
            mean, logvar = m.encode(x["image"])
            return (mean,) if logvar is None else (mean, logvar)  # a tiny VAE: (latents, None)
        if kind in ("unet", "unet_controlnet"):
            res = {}
            if kind == "unet_controlnet":
                down = [x[n] for n in self.names if n.startswith("down_residual_")]
                res = {"down_block_additional_residuals": down,
                       "mid_block_additional_residual": x["mid_residual"]}
            return (m(x["sample"], x["timestep"], x["encoder_hidden_states"], **added, **res),)
        if kind == "unet_2d":
            return (m(x["sample"], x["timestep"]),)
        if kind == "controlnet":
            down, mid = m(x["sample"], x["timestep"], x["encoder_hidden_states"], x["controlnet_cond"],
                          conditioning_scale=x["conditioning_scale"], **added)
            return (*down, mid)
        raise ContractError(f"unknown network kind {kind!r}")


def run_torch(model: nn.Module, contract: Contract, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The reference: the torch module called through the same adapter as the export."""
    with torch.no_grad(), torch_ops_backend():
        return ExportAdapter(model, contract)(*inputs)


# -- export ---------------------------------------------------------------------------------------

def _param_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def export_onnx(model: nn.Module, contract: Contract, path: str | os.PathLike, *, symbols: dict[str, int],
                opset: int = DEFAULT_OPSET, device: str | torch.device = "cpu",
                external_data_threshold: int = ONNX_MAX_PROTO - (64 << 20)) -> dict:
    """Export ``model`` (already in the contract's dtype, on ``device``) to ``path``.

    Writes ``path`` and, for models over the threshold, ``path + ".data"`` (all weights in one
    file). Both appear atomically: everything is written in a temporary folder first and renamed.
    Returns {"onnx": name, "onnx_data": name or None}.
    """
    import onnx

    if opset < 17:
        raise ValueError(f"opset {opset} is too old: ldm_engine exports opset 17 or newer")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    inputs = contract.sample_inputs(symbols, device=device, generator=torch.Generator().manual_seed(0))
    adapter = ExportAdapter(model, contract).eval()
    big = _param_bytes(model) > external_data_threshold
    data_name = path.name + ".data"

    tmpdir = Path(tempfile.mkdtemp(prefix=f".tmp-{path.stem}-", dir=path.parent))
    try:
        raw = tmpdir / "raw.onnx"
        with torch.no_grad(), torch_ops_backend(), causal_sdpa_as_mask(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)  # the TorchScript exporter's notice
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)  # shape asserts in forward()
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")  # constant-folding notes
            torch.onnx.export(
                adapter, inputs, str(raw), dynamo=False, opset_version=opset,
                input_names=contract.input_names, output_names=contract.output_names,
                dynamic_axes=contract.dynamic_axes(), do_constant_folding=True)
        proto = onnx.load(str(raw), load_external_data=True)
        _check_standard_ops(proto, contract)
        final_tmp = tmpdir / "final"
        final_tmp.mkdir()
        if big:
            onnx.save_model(proto, str(final_tmp / path.name), save_as_external_data=True,
                            all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
        else:
            onnx.save_model(proto, str(final_tmp / path.name))
        del proto
        # by path (works with external data); full_check also runs strict type/shape inference
        onnx.checker.check_model(str(final_tmp / path.name), full_check=True)
        # rename the weights first, then the graph: a graph never points at missing weights
        for f in final_tmp.iterdir():
            publish(f)
        if big:
            os.replace(final_tmp / data_name, path.parent / data_name)
        else:
            (path.parent / data_name).unlink(missing_ok=True)
        os.replace(final_tmp / path.name, path)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return {"onnx": path.name, "onnx_data": data_name if big else None}


def _check_standard_ops(proto, contract: Contract):
    custom = sorted({f"{n.domain}::{n.op_type}" for n in proto.graph.node if n.domain not in STANDARD_DOMAINS})
    if custom:
        raise ExportError(f"{contract.network}: the exported graph has non-standard ops {custom}; the export must "
                          f"run with ldm_engine.ops on its 'torch' backend")
    names_in = [i.name for i in proto.graph.input]
    if names_in != contract.input_names:
        raise ExportError(f"{contract.network}: exported inputs {names_in} differ from the contract "
                          f"{contract.input_names} (an input the model ignores is dropped by the exporter)")


def onnx_files_sha256(directory: Path, info: dict) -> dict[str, str]:
    out = {info["onnx"]: sha256_file(directory / info["onnx"])}
    if info.get("onnx_data"):
        out[info["onnx_data"]] = sha256_file(directory / info["onnx_data"])
    return out
