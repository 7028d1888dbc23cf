"""Fused attention projections (models/layers.Attention): self-attention Q/K/V in one GEMM, cross-
attention K/V in one, with to_q / to_k / to_v kept as diffusers-keyed parameters that are row views of
the fused tensor.

Every check compares the fused forward with the unfused one (``unfuse_projections()``: separate GEMMs
on the parameters themselves), after writing new values into the parameters the way LoRA does
(``param.copy_``): a fused tensor that no longer shares the parameters' memory gives a different
output there. Each path that gives parameters new storage (loading with assign=True, Module.to /
half / to_empty / channels_last, deepcopy, pickling, the fp32 VAE fallback) is checked that way.
"""

from __future__ import annotations

import collections
import copy
import io

import pytest
import torch
from model_utils import randomize_, rel_err
from tiny_pipelines import tiny_pipeline

from ldm_engine import Engine
from ldm_engine.models.layers import Attention, SpatialSelfAttention, TransformerBlock
from ldm_engine.models.unet import UNet2DConditionModel, UNetConfig
from ldm_engine.models.vae import AutoencoderKL, VAEConfig

TOL = 1e-5  # fused vs separate GEMMs: fp32 rounding (other summation blocking) only
# a tiny SDXL-like U-Net: self- and cross-attention, several heads, context dim != channels
UNET = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=24,
            attention_head_dim=(2, 4), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), use_linear_projection=True)
VAE = dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, latent_channels=4,
           down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)


def attentions(model: torch.nn.Module) -> list[Attention]:
    found = [m for m in model.modules() if isinstance(m, Attention)]
    assert found, f"{type(model).__name__} has no Attention"
    return found


def assert_fused(model: torch.nn.Module) -> None:
    """Every Attention is fused and its projections' weights / biases are the fused tensor's rows."""
    for m in attentions(model):
        assert m.projections_fused
        linears = [m.to_k, m.to_v] if m.is_cross_attention else [m.to_q, m.to_k, m.to_v]
        inner = m.heads * m.head_dim
        fused_w, fused_b = m._fused_weight, m._fused_bias
        assert fused_w.shape == (inner * len(linears), linears[0].in_features)
        for i, lin in enumerate(linears):
            assert lin.weight.data_ptr() == fused_w[i * inner].data_ptr()
            assert lin.weight.is_contiguous() and lin.weight.shape == (inner, lin.in_features)
            if lin.bias is None:
                assert fused_b is None
            else:
                assert lin.bias.data_ptr() == fused_b[i * inner:].data_ptr()


def set_fused(model: torch.nn.Module, fused: bool) -> None:
    for m in attentions(model):
        m.fuse_projections() if fused else m.unfuse_projections()


def merge_like_lora(model: torch.nn.Module, seed: int) -> None:
    """New values into every q/k/v weight and bias the way LoRA merges (``param.copy_``)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in attentions(model):
            for lin in (m.to_q, m.to_k, m.to_v):
                for p in (t for t in (lin.weight, lin.bias) if t is not None):
                    p.copy_(p + 0.3 * torch.randn(p.shape, generator=gen).to(p.dtype) * p.float().std().to(p.dtype))


def assert_fused_equals_unfused(model: torch.nn.Module, call, tol: float = TOL) -> None:
    """``call()`` with the fused projections equals ``call()`` with separate GEMMs on the parameters;
    the model is left fused."""
    assert_fused(model)
    with torch.no_grad():
        fused = call()
        set_fused(model, False)
        unfused = call()
        set_fused(model, True)
    assert rel_err(fused.float(), unfused.float()) <= tol


def tiny_unet(seed: int = 0) -> UNet2DConditionModel:
    model = UNet2DConditionModel(UNetConfig.from_dict(UNET)).eval()
    randomize_(model, seed)
    return model


def unet_call(model, seed: int = 1, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 9, 7, generator=gen).to(dtype)
    ctx = torch.randn(2, 11, UNET["cross_attention_dim"], generator=gen).to(dtype)
    t = torch.tensor([999.0, 21.0])
    return lambda: model(x, t, ctx)


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    model = AutoencoderKL(VAEConfig.from_dict(VAE)).eval()
    randomize_(model, seed)
    return model


def vae_call(model, seed: int = 1, dtype=torch.float32):
    z = torch.randn(1, 4, 5, 6, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return lambda: model.decode(z)


# ------------------------------------------------------------------------------ forward

def test_fused_forward_runs_one_gemm_and_equals_separate_gemms(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    self_attn, cross = Attention(48, 3, 16), Attention(48, 3, 16, context_dim=20)
    spatial = SpatialSelfAttention(32, groups=8, eps=1e-6, head_dim=16)  # biases, 2 heads
    for m in (self_attn, cross, spatial):
        randomize_(m, 1)
    x, ctx, img = torch.randn(2, 13, 48, generator=gen), torch.randn(2, 7, 20, generator=gen), \
        torch.randn(2, 32, 5, 3, generator=gen)
    gemms = []
    real_linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda a, w, b=None: gemms.append(tuple(w.shape))
                        or real_linear(a, w, b))
    for module, call, fused_gemms in ((self_attn, lambda: self_attn(x), [(144, 48), (48, 48)]),
                                      (cross, lambda: cross(x, ctx), [(48, 48), (96, 20), (48, 48)]),
                                      (spatial, lambda: spatial(img), [(96, 32), (32, 32)])):
        gemms.clear()
        with torch.no_grad():
            call()
        assert gemms == fused_gemms
        assert_fused_equals_unfused(module, call)
        merge_like_lora(module, 2)
        assert_fused_equals_unfused(module, call)
    gemms.clear()
    with torch.no_grad():
        self_attn.unfuse_projections()
        self_attn(x)
    assert gemms == [(48, 48)] * 4  # unfused: q, k, v, out


def test_split_layout_suits_every_attention_backend(monkeypatch):
    """q, k, v handed to ops.attention: (B, H, L, D), unit-stride head dim, and (fp16, the real head
    dims) aligned as the "cuda" backend requires, so it neither copies nor falls back."""
    from ldm_engine import ops
    from ldm_engine.ops._cuda_backend import aligned

    seen = []
    monkeypatch.setattr(ops, "attention", lambda q, k, v, scale=None: seen.append((q, k, v)) or q.clone())
    gen = torch.Generator().manual_seed(0)
    for heads, head_dim, ctx_dim in ((5, 64, 1024), (10, 64, 2048), (8, 40, 768), (8, 80, 768), (8, 160, 768)):
        dim = heads * head_dim
        block = TransformerBlock(dim, heads, head_dim, ctx_dim).half().eval()
        x = torch.randn(2, 6, dim, generator=gen).half()
        ctx = torch.randn(2, 5, ctx_dim, generator=gen).half()
        seen.clear()
        with torch.no_grad():
            block(x, ctx)
        assert len(seen) == 2
        for (q, k, v), lk in zip(seen, (6, 5)):
            assert q.shape == (2, heads, 6, head_dim) and k.shape == v.shape == (2, heads, lk, head_dim)
            assert all(t.stride(-1) == 1 and aligned(t) for t in (q, k, v))
    vae_attn = SpatialSelfAttention(512, groups=32, eps=1e-6).half()
    seen.clear()
    with torch.no_grad():
        vae_attn(torch.randn(1, 512, 3, 4, generator=gen).half())
    assert all(aligned(t) and t.shape == (1, 1, 12, 512) for t in seen[0])


def test_gradients_reach_the_projection_parameters():
    gen = torch.Generator().manual_seed(0)
    attn = Attention(24, 2, 12, context_dim=10)
    x, ctx = torch.randn(2, 5, 24, generator=gen), torch.randn(2, 3, 10, generator=gen)
    attn(x, ctx).square().sum().backward()
    fused_grads = [p.grad.clone() for p in (attn.to_q.weight, attn.to_k.weight, attn.to_v.weight)]
    attn.zero_grad()
    attn.unfuse_projections()
    attn(x, ctx).square().sum().backward()
    for got, p in zip(fused_grads, (attn.to_q.weight, attn.to_k.weight, attn.to_v.weight)):
        torch.testing.assert_close(got, p.grad, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ state dicts, building, loading

def test_state_dict_is_diffusers_and_nothing_else_is_registered():
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.UNet2DConditionModel(**UNET)
    ours = tiny_unet()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert not list(ours.buffers())
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    # a load from diffusers' model writes into the rows (a plain load copies in place): still fused
    ours.load_state_dict(ref.state_dict())
    assert_fused(ours)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(3)
        x, ctx = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 5, 24, generator=gen)
        assert rel_err(ours(x, 10.0, ctx), ref(x, 10.0, ctx).sample) <= 1e-4


def test_meta_build_and_assign_load():
    source = tiny_unet(seed=4)
    with torch.device("meta"):
        model = UNet2DConditionModel(UNetConfig.from_dict(UNET)).eval()
    assert all(m._fused_weight.is_meta for m in attentions(model))
    model.load_state_dict(source.state_dict(), assign=True)
    assert_fused(model)
    call, ref = unet_call(model), unet_call(source)
    with torch.no_grad():
        torch.testing.assert_close(call(), ref(), rtol=0, atol=0)
    merge_like_lora(model, 5)
    assert_fused_equals_unfused(model, call)
    # a partial load leaves meta and real tensors side by side: unfused (separate GEMMs), no error
    with torch.device("meta"):
        partial = Attention(16, 2, 8)
    partial.load_state_dict({"to_q.weight": torch.randn(16, 16)}, strict=False, assign=True)
    assert not partial.projections_fused


def test_every_loader_fuses(tmp_path_factory):
    """diffusers folders (U-Net, VAE, ControlNet), a single file, a pixel U-Net and the demo model."""
    from loading_fixtures import pipeline_to_single_file, tiny_pipeline_folder
    from pixel_fixtures import save_pipeline
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("fused-loaders")
    engine = Engine.from_pretrained(tiny_pipeline("sd15", root), controlnet=[tiny_pipeline("controlnet-sd", root)])
    nets = [engine.components.unet, engine.components.vae, *engine.controlnets]
    single = root / "sd1.safetensors"
    save_file(pipeline_to_single_file("sd1"), str(single))
    nets += [Engine.from_pretrained(single, config=tiny_pipeline_folder("sd1")).components.unet]
    nets += [Engine.from_pretrained(save_pipeline("attn", root)).components.unet]
    nets += [Engine.from_pretrained("demo").components.unet]
    for net in nets:
        assert_fused(net)
    unet = engine.components.unet
    merge_like_lora(unet, 6)
    gen = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 6, 6, generator=gen), torch.randn(1, 77, unet.config.cross_attention_dim, generator=gen)
    assert_fused_equals_unfused(unet, lambda: unet(x, torch.tensor([500.0]), ctx))


# ------------------------------------------------------------------------------ paths that give parameters new storage

def _pickled(model):
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def _to_empty_then_load(model):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.to_empty(device="cpu")  # fresh uninitialised storage, then a plain (copying) load into it
    model.load_state_dict(state)
    return model


CONVERSIONS = {  # name -> (conversion, dtype of the result, its output vs the fp32 original's)
    "to_float64": (lambda m: m.to(torch.float64), torch.float64, TOL),
    "half_then_float": (lambda m: m.half().float(), torch.float32, 5e-3),  # weights rounded to fp16
    "to_bfloat16": (lambda m: m.to(dtype=torch.bfloat16), torch.bfloat16, 3e-2),
    "channels_last": (lambda m: m.to(memory_format=torch.channels_last), torch.float32, TOL),
    "to_empty_then_load": (_to_empty_then_load, torch.float32, TOL),
    "deepcopy": (copy.deepcopy, torch.float32, TOL),
    "pickle": (_pickled, torch.float32, TOL),
}


@pytest.mark.parametrize("conversion", list(CONVERSIONS))
def test_conversions_keep_the_views(conversion):
    convert, dtype, tol = CONVERSIONS[conversion]
    model = tiny_unet(seed=7)
    with torch.no_grad():
        before = unet_call(model)().to(dtype)
    original_q = model.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight.detach().clone()
    converted = convert(model)
    call = unet_call(converted, dtype=dtype)
    with torch.no_grad():
        assert rel_err(call().to(dtype), before) <= tol
    merge_like_lora(converted, 8)
    assert_fused_equals_unfused(converted, call, TOL if dtype != torch.bfloat16 else tol)
    if converted is not model:  # a copy shares nothing with its original
        q = model.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight
        torch.testing.assert_close(q, original_q, rtol=0, atol=0)
        assert_fused(model)


def test_parameter_objects_survive_conversions():
    """LoRA keeps the Parameter objects it merges into: fusing keeps them (``.data`` is repointed)."""
    model = tiny_unet()
    params = dict(model.named_parameters())
    model.to(torch.float64).to(memory_format=torch.channels_last).float()
    assert all(p is params[n] for n, p in model.named_parameters())
    assert_fused(model)


def test_fp32_vae_fallback_copy():
    from ldm_engine.pipeline.finite import fp32_copy

    vae = tiny_vae().half()
    assert_fused(vae)
    twin = fp32_copy(vae)
    assert next(twin.parameters()).dtype == torch.float32
    merge_like_lora(twin, 9)
    assert_fused_equals_unfused(twin, vae_call(twin))
    assert_fused_equals_unfused(vae, vae_call(vae, dtype=torch.float16), tol=2e-3)


def test_engine_channels_last_then_merge(tmp_path_factory):
    engine = Engine.from_pretrained(tiny_pipeline("sd15", tmp_path_factory.mktemp("fused-cl"))).use_channels_last()
    unet = engine.components.unet
    assert_fused(unet)
    merge_like_lora(unet, 10)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 6, 6, generator=gen).to(memory_format=torch.channels_last)
    ctx = torch.randn(1, 77, unet.config.cross_attention_dim, generator=gen)
    assert_fused_equals_unfused(unet, lambda: unet(x, torch.tensor([500.0]), ctx))


# ------------------------------------------------------------------------------ LoRA, compile, ONNX

def test_lora_merge_and_unload_through_the_fused_tensor(tmp_path_factory, tmp_path):
    """A kohya adapter on every q/k/v: the fused rows equal W0 + scale * alpha / rank * up @ down
    (computed here in float64), forward follows it, and unloading restores them bitwise."""
    from safetensors.torch import save_file

    engine = Engine.from_pretrained(tiny_pipeline("sd15", tmp_path_factory.mktemp("fused-lora")))
    unet = engine.components.unet
    gen = torch.Generator().manual_seed(11)
    rank, alpha, scale = 4, 3.0, 0.7
    tensors, expected = {}, {}
    for name, m in unet.named_modules():
        if name.endswith(("to_q", "to_k", "to_v")):
            key = "lora_unet_" + name.replace(".", "_")
            down = torch.randn(rank, m.in_features, generator=gen) / m.in_features ** 0.5
            up = torch.randn(m.out_features, rank, generator=gen) * 0.3
            tensors |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                        f"{key}.alpha": torch.tensor(alpha)}
            expected[name] = m.weight.double() + scale * alpha / rank * (up.double() @ down.double())
    base = {n: m._fused_weight.clone() for n, m in unet.named_modules() if isinstance(m, Attention)}
    save_file(tensors, str(tmp_path / "qkv.safetensors"))
    engine.load_lora(tmp_path / "qkv.safetensors", scale=scale)
    assert_fused(unet)
    for name, m in unet.named_modules():
        if isinstance(m, Attention):
            inner = m.heads * m.head_dim
            names = ["to_k", "to_v"] if m.is_cross_attention else ["to_q", "to_k", "to_v"]
            for i, lin in enumerate(names):
                rows = m._fused_weight[i * inner:(i + 1) * inner].double()
                torch.testing.assert_close(rows, expected[f"{name}.{lin}"], rtol=0, atol=1e-6)
    x, ctx = torch.randn(1, 4, 6, 6, generator=gen), torch.randn(1, 77, unet.config.cross_attention_dim, generator=gen)
    assert_fused_equals_unfused(unet, lambda: unet(x, torch.tensor([500.0]), ctx))
    engine.unload_lora()
    for name, m in unet.named_modules():
        if isinstance(m, Attention):
            assert torch.equal(m._fused_weight, base[name])


def test_compiled_module_follows_in_place_writes_without_recompiling():
    torch._dynamo.reset()
    compiles = []

    def counting_inductor(gm, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        compiles.append(1)
        return compile_fx(gm, example_inputs)

    try:
        model = tiny_unet(seed=12)
        compiled = torch.compile(model, fullgraph=True, backend=counting_inductor)
        call = unet_call(model)
        ccall = unet_call(compiled)
        with torch.no_grad():
            assert rel_err(ccall(), call()) <= 1e-5
            merge_like_lora(model, 13)
            got = ccall()
            set_fused(model, False)
            assert rel_err(got, call()) <= 1e-5  # the separate GEMMs on the merged parameters
        assert len(compiles) == 1
    finally:
        torch._dynamo.reset()


def test_onnx_export_has_one_matmul_for_the_fused_projections(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from ldm_engine.export import contracts as C
    from ldm_engine.export.onnx_export import export_onnx

    model = tiny_unet(seed=14)
    contract = C.unet_contract(model.config, vae_scale=8, seq_len=11)
    counts, protos = {}, {}
    for fused in (True, False):
        set_fused(model, fused)
        path = tmp_path / f"unet-{fused}.onnx"
        export_onnx(model, contract, path, symbols={"B": 1, "H": 8, "W": 8})
        protos[fused] = proto = onnx.load(str(path))
        counts[fused] = collections.Counter(n.op_type for n in proto.graph.node)
    set_fused(model, True)
    n_self = sum(not m.is_cross_attention for m in attentions(model))
    n_cross = len(attentions(model)) - n_self
    assert counts[False]["MatMul"] - counts[True]["MatMul"] == 2 * n_self + n_cross
    # the fused weights are initializers (external-data capable), not Constant nodes baked into the graph
    for n in protos[True].graph.node:
        if n.op_type == "Constant":
            assert all(onnx.numpy_helper.to_array(a.t).size < 64 for a in n.attribute if a.name == "value")
    session = ort.InferenceSession(str(tmp_path / "unet-True.onnx"), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(15)
    x, ctx = torch.randn(2, 4, 5, 7, generator=gen), torch.randn(2, 11, UNET["cross_attention_dim"], generator=gen)
    t = torch.tensor([999.0, 3.0])
    got = session.run(None, {"sample": x.numpy(), "timestep": t.numpy(), "encoder_hidden_states": ctx.numpy()})[0]
    with torch.no_grad():
        assert rel_err(torch.from_numpy(got), model(x, t, ctx)) <= 1e-4
