"""LoRA adapters (Engine.load_lora / set_lora_scales / unload_lora) against diffusers' load_lora_weights
+ set_adapters on the same tiny weights (tests/tiny_pipelines.py), fp32 on the CPU, images <= 1e-3.

Adapter files are made here: kohya-format files written by the test (module names taken from the
diffusers models; ldm/sgm names from tests/loading_fixtures.unet_to_ldm, not from ldm_engine's
tables), PEFT-format files written by diffusers' own save_lora_weights. Restores are checked
bitwise against the weights before the first load.
"""

from __future__ import annotations

import random
import warnings

import numpy as np
import pytest
import torch
from loading_fixtures import unet_to_ldm
from safetensors.torch import load_file, save_file
from tiny_pipelines import tiny_pipeline

from ldm_engine import Engine
from ldm_engine.errors import CheckpointError, InvalidInputError
from ldm_engine.loading.lora import parse_lora_spec

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
TOL = 1e-3
PROMPT = "a watercolor fox in the snow"
ATTN = ("to_q", "to_k", "to_v", "to_out.0")
TE = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-lora")
    return {k: tiny_pipeline(k, root) for k in ("sd15", "sdxl")}


@pytest.fixture(scope="module")
def pipes(paths):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = {"sd15": diffusers.StableDiffusionPipeline.from_pretrained(paths["sd15"]),
               "sdxl": diffusers.StableDiffusionXLPipeline.from_pretrained(paths["sdxl"])}
    for p in out.values():
        p.set_progress_bar_config(disable=True)
    return out


def _state(engine) -> dict:
    c = engine.components
    nets = {"unet": c.unet, "te": c.text_encoder, "te2": c.text_encoder_2}
    return {f"{n}.{k}": v.detach().clone() for n, net in nets.items() if net is not None
            for k, v in getattr(net, "_orig_mod", net).state_dict().items()}


def _assert_bitwise(engine, base: dict):
    now = _state(engine)
    assert now.keys() == base.keys()
    bad = [k for k in base if not torch.equal(now[k], base[k])]
    assert not bad, f"{len(bad)} weights differ from the base, e.g. {bad[:3]}"


def _factors(gen, out_dim, in_shape, rank, kernel=()):
    down = torch.randn((rank, *in_shape, *kernel), generator=gen) / (np.prod(in_shape) * np.prod(kernel or (1,))) ** 0.5
    up = torch.randn((out_dim, rank, *((1, 1) if kernel else ())), generator=gen) * (0.6 / rank ** 0.5)
    return down, up


def _layers(model):
    """(name, Linear / Conv2d) of a diffusers / transformers model, also after PEFT wrapped its layers
    (peft_folder and load_lora_weights leave LoraLayer wrappers around the base layers)."""
    for name, m in model.named_modules():
        if ".base_layer" in name or ".lora_" in name:
            continue
        m = getattr(m, "base_layer", m)
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            yield name, m


def kohya_file(path, pipe, *, seed, rank=4, ldm=False, conv=False, text=True, ff=True, alpha=None):
    """A kohya-ss style adapter: attention (+ feed-forward, proj) linears, optional LoCon 3x3 convs
    of the resnets, and the text encoder(s); each layer with an alpha (scale alpha / rank).

    alpha None: rank / 2 for every layer, as trainers write them. (diffusers 0.42 maps per-layer kohya
    alphas of attention and text-encoder layers to names that match no module and falls back on the
    most common alpha, so comparisons with it use one alpha for all layers;
    test_kohya_alpha_scales_the_update checks alphas on their own.)"""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    targets = []
    for name, m in _layers(pipe.unet):
        lin = isinstance(m, torch.nn.Linear) and (name.endswith(ATTN) or (ff and name.endswith(("ff.net.2", "proj_in"))))
        cnv = conv and isinstance(m, torch.nn.Conv2d) and "resnets" in name and name.endswith(("conv1", "conv2"))
        if lin or cnv:
            targets.append(("lora_unet", name, m))
    if ldm:  # ldm / sgm module names, from the test's own converter
        config = dict(pipe.unet.config)
        renamed = unet_to_ldm({f"{n}.weight": None for _, n, _ in targets}, config)
        ldm_names = {n: k[:-len(".weight")] for n, k in zip([n for _, n, _ in targets], renamed)}
        targets = [(p, ldm_names[n], m) for p, n, m in targets]
    if text:
        encoders = [("lora_te", pipe.text_encoder)] if getattr(pipe, "text_encoder_2", None) is None else \
            [("lora_te1", pipe.text_encoder), ("lora_te2", pipe.text_encoder_2)]
        for prefix, te in encoders:
            for name, m in _layers(te):
                if isinstance(m, torch.nn.Linear) and name.endswith(TE):
                    full = name if name.startswith("text_model.") else "text_model." + name
                    targets.append((prefix, full, m))
    for prefix, name, m in targets:
        key = f"{prefix}_{name.replace('.', '_')}"
        if isinstance(m, torch.nn.Conv2d):
            down, up = _factors(gen, m.out_channels, (m.in_channels,), rank, m.kernel_size)
        else:
            down, up = _factors(gen, m.out_features, (m.in_features,), rank)
        tensors[f"{key}.lora_down.weight"] = down
        tensors[f"{key}.lora_up.weight"] = up
        tensors[f"{key}.alpha"] = torch.tensor(float(rank / 2 if alpha is None else alpha))
    assert any("to_q" in n for _, n, _ in targets) and conv == any(isinstance(m, torch.nn.Conv2d) for _, _, m in targets)
    save_file(tensors, str(path))
    return path


def peft_folder(folder, pipe, *, seed, rank=4, alpha=6, text=True):
    """A diffusers / PEFT adapter, written by diffusers' save_lora_weights (with its metadata)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    ucfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(ATTN) + ["conv1"], init_lora_weights=False)
    tcfg = LoraConfig(r=rank, lora_alpha=alpha / 2, target_modules=["q_proj", "v_proj", "fc1"], init_lora_weights=False)
    nets = {"unet": (pipe.unet, ucfg)}
    if text:
        nets["text_encoder"] = (pipe.text_encoder, tcfg)
        if getattr(pipe, "text_encoder_2", None) is not None:
            nets["text_encoder_2"] = (pipe.text_encoder_2, tcfg)
    kw = {}
    for name, (module, cfg) in nets.items():
        module.add_adapter(cfg, adapter_name="_tmp")
        with torch.no_grad():  # smaller updates than PEFT's random init (kaiming on both factors)
            for n, p in module.named_parameters():
                if "lora_B" in n:
                    p.mul_(0.05)
        kw[f"{name}_lora_layers"] = {k: v.detach().clone() for k, v in
                                     get_peft_model_state_dict(module, adapter_name="_tmp").items()}
        kw[f"{name}_lora_adapter_metadata"] = cfg.to_dict()
        (getattr(module, "delete_adapters", None) or module.delete_adapter)("_tmp")
    type(pipe).save_lora_weights(str(folder), **kw)
    return folder


def _run_both(pipe, engine, adapters, *, steps=2, guidance=3.0, scheduler=None, seed=0):
    """adapters: list of (file, name, scale), loaded into both; returns (reference, ours)."""
    pipe.unload_lora_weights()
    for path, name, _ in adapters:
        pipe.load_lora_weights(str(path), adapter_name=name)
    if adapters:
        pipe.set_adapters([a[1] for a in adapters], [a[2] for a in adapters])
    lat = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(seed + 100))
    saved = pipe.scheduler
    if scheduler is not None:
        pipe.scheduler = scheduler[0].from_config(pipe.scheduler.config)
        engine.scheduler = scheduler[1]
    try:
        kw = dict(num_inference_steps=steps, guidance_scale=guidance, latents=lat, height=32, width=32)
        ref = pipe(PROMPT, generator=torch.Generator().manual_seed(seed), output_type="np", **kw).images
        ours = engine.generate(PROMPT, seed=seed, output_type="np", **kw).images
    finally:
        pipe.scheduler = saved
        pipe.unload_lora_weights()
    diff = np.abs(ours - ref).max()
    assert diff <= TOL, f"max abs diff {diff:.2e}"
    return ref, ours


def _image(engine, seed=0, **kw):
    lat = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(seed + 100))
    args = dict(dict(num_inference_steps=2, guidance_scale=3.0, latents=lat, output_type="np", height=32, width=32), **kw)
    return engine.generate(PROMPT, seed=seed, **args).images


# ----------------------------------------------------------------------------- against diffusers
def test_kohya_locon_with_text_encoder_one_adapter(paths, pipes, tmp_path):
    pipe, engine = pipes["sd15"], Engine.from_pretrained(paths["sd15"])
    base_state, base = _state(engine), _image(engine)
    f = kohya_file(tmp_path / "style.safetensors", pipe, seed=1, conv=True)
    assert engine.load_lora(f, scale=0.8) == "style"
    assert engine.loras == {"style": 0.8}
    _, ours = _run_both(pipe, engine, [(f, "style", 0.8)])
    assert np.abs(ours - base).max() > 1e-2  # the adapter changes the image
    engine.unload_lora()
    assert engine.loras == {}
    _assert_bitwise(engine, base_state)
    np.testing.assert_array_equal(_image(engine), base)


def test_two_adapters_ldm_names_and_peft_with_scales(paths, pipes, tmp_path):
    pipe, engine = pipes["sd15"], Engine.from_pretrained(paths["sd15"])
    base_state = _state(engine)
    # diffusers 0.42 misreads ldm names (input_blocks...) of models other than the real SDXL: it gets the
    # same tensors under diffusers names (a twin file)
    a = kohya_file(tmp_path / "ldm.safetensors", pipe, seed=2, ldm=True, conv=True)
    a_ref = kohya_file(tmp_path / "ldm-twin.safetensors", pipe, seed=2, conv=True)
    b = peft_folder(tmp_path / "peft", pipe, seed=3)
    assert engine.load_lora(a, scale=0.7, name="a") == "a"
    assert engine.load_lora(b, scale=-0.5) == "pytorch_lora_weights"
    _run_both(pipe, engine, [(a_ref, "a", 0.7), (b / "pytorch_lora_weights.safetensors", "pytorch_lora_weights", -0.5)])
    engine.set_lora_scales({"a": 0.0, "pytorch_lora_weights": 1.2})
    _run_both(pipe, engine, [(b / "pytorch_lora_weights.safetensors", "b", 1.2)], seed=1)
    engine.unload_lora("pytorch_lora_weights")
    engine.set_lora_scales({"a": 0.3})
    _run_both(pipe, engine, [(a_ref, "a", 0.3)], seed=2)
    engine.unload_lora("a")
    _assert_bitwise(engine, base_state)


def test_sdxl_kohya_sgm_names_te1_te2_and_peft(paths, pipes, tmp_path):
    pipe, engine = pipes["sdxl"], Engine.from_pretrained(paths["sdxl"])
    base_state = _state(engine)
    a = kohya_file(tmp_path / "xl.safetensors", pipe, seed=4, ldm=True, conv=True)
    a_ref = kohya_file(tmp_path / "xl-twin.safetensors", pipe, seed=4, conv=True)
    b = peft_folder(tmp_path / "xl-peft", pipe, seed=5)
    engine.load_lora(a, scale=0.9)
    engine.load_lora(b, name="b", scale=0.6)
    _run_both(pipe, engine, [(a_ref, "xl", 0.9), (b / "pytorch_lora_weights.safetensors", "b", 0.6)])
    engine.unload_lora()
    _assert_bitwise(engine, base_state)


def test_lcm_lora_with_the_lcm_sampler(paths, pipes, tmp_path):
    # LCM-LoRA files are kohya-style with diffusers module names over attention, ff and resnet convs
    pipe, engine = pipes["sd15"], Engine.from_pretrained(paths["sd15"], scheduler="lcm")
    f = kohya_file(tmp_path / "lcm.safetensors", pipe, seed=6, conv=True, text=False)
    engine.load_lora(f)
    _run_both(pipe, engine, [(f, "lcm", 1.0)], steps=4, guidance=1.0,
              scheduler=(diffusers.LCMScheduler, "lcm"))


def test_kohya_alpha_scales_the_update(paths, pipes, tmp_path):
    """alpha / rank multiplies the update: alpha = rank / 4 is the same adapter as up factors / 4 without alpha."""
    engine = Engine.from_pretrained(paths["sd15"])
    f = kohya_file(tmp_path / "a.safetensors", pipes["sd15"], seed=12, conv=True, alpha=1.0)
    tensors = load_file(str(f))
    same = {k: (v / 4 if k.endswith("lora_up.weight") else v) for k, v in tensors.items() if not k.endswith(".alpha")}
    save_file(same, str(tmp_path / "b.safetensors"))
    engine.load_lora(f, scale=0.7)
    a = _image(engine)
    engine.unload_lora()
    engine.load_lora(tmp_path / "b.safetensors", scale=0.7)
    np.testing.assert_allclose(_image(engine), a, rtol=0, atol=1e-5)


def test_older_diffusers_formats_equal_peft(paths, pipes, tmp_path):
    """diffusers' earlier savers: ``.lora.down/.lora.up``, attention-processor ``to_q_lora`` keys and the text
    encoders' ``lora_linear_layer`` (no alphas: folded into the up factors here) give the PEFT file's images."""
    engine = Engine.from_pretrained(paths["sd15"])
    folder = peft_folder(tmp_path / "p", pipes["sd15"], seed=17)
    old = {}
    for k, v in load_file(str(folder / "pytorch_lora_weights.safetensors")).items():
        component = k.split(".")[0]
        module, _, part = k.rpartition(".lora_")
        side = "up" if part == "B.weight" else "down"
        t = v * (6 / 4 if component == "unet" else 3 / 4) if side == "up" else v  # peft_folder: alpha 6 / 3, rank 4
        if component == "unet" and module.endswith(ATTN):
            head, name = (module[:-len(".to_out.0")], "to_out") if module.endswith("to_out.0") else module.rsplit(".", 1)
            old[f"{head}.processor.{name}_lora.{side}.weight"] = t
        elif component == "unet":
            old[f"{module}.lora.{side}.weight"] = t
        else:
            old[f"{module.replace('text_encoder.', 'text_encoder.text_model.', 1)}.lora_linear_layer.{side}.weight"] = t
    save_file(old, str(tmp_path / "old.safetensors"))
    base = _image(engine)
    engine.load_lora(folder, scale=0.8)
    want = _image(engine)
    engine.unload_lora()
    engine.load_lora(tmp_path / "old.safetensors", scale=0.8)
    np.testing.assert_allclose(_image(engine), want, rtol=0, atol=1e-5)
    assert np.abs(want - base).max() > 1e-2


# ----------------------------------------------------------------------------- all or nothing
def test_foreign_and_broken_adapters_are_refused_and_change_nothing(paths, pipes, tmp_path):
    engine = Engine.from_pretrained(paths["sd15"])
    ok = kohya_file(tmp_path / "ok.safetensors", pipes["sd15"], seed=7)
    engine.load_lora(ok, scale=0.5)
    before_state, before = _state(engine), _image(engine)

    xl = kohya_file(tmp_path / "xl.safetensors", pipes["sdxl"], seed=8, ldm=True)
    with pytest.raises(CheckpointError, match="does not fit") as e:
        engine.load_lora(xl)
    assert "lora_" in str(e.value)  # names the offending keys

    good = load_file(str(ok))
    bad_cases = {
        "unknown": dict(good, **{"lora_unet_no_such_layer.lora_down.weight": torch.randn(4, 32),
                                 "lora_unet_no_such_layer.lora_up.weight": torch.randn(32, 4)}),
        "loha": dict(good, **{"lora_unet_mid_block_attentions_0_proj_in.hada_w1_a": torch.randn(32, 4)}),
        "half": {k: v for k, v in good.items() if not k.endswith("to_q.lora_up.weight")},
        "shape": {k: (v[:, :-1].contiguous() if k.endswith("to_k.lora_down.weight") else v) for k, v in good.items()},
        "nan": {k: (torch.full_like(v, float("nan")) if k.endswith("to_v.lora_up.weight") else v)
                for k, v in good.items()},
        "twice": dict(good, **{"unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight":
                               good["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"].clone()}),
    }
    needles = {"unknown": "no_such_layer", "loha": "hada_w1_a", "half": "up factor is missing",
               "shape": "do not fit", "nan": "non-finite", "twice": "the same down tensor"}
    for case, tensors in bad_cases.items():
        save_file(tensors, str(tmp_path / f"{case}.safetensors"))
        with pytest.raises(CheckpointError, match=needles[case]):
            engine.load_lora(tmp_path / f"{case}.safetensors")
    (tmp_path / "trunc.safetensors").write_bytes(ok.read_bytes()[:200])
    with pytest.raises(CheckpointError):
        engine.load_lora(tmp_path / "trunc.safetensors")
    (tmp_path / "x.ckpt").write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointError, match="pickle"):
        engine.load_lora(tmp_path / "x.ckpt")
    with pytest.raises(InvalidInputError, match="already loaded"):
        engine.load_lora(ok)
    with pytest.raises(InvalidInputError, match="finite"):
        engine.load_lora(ok, name="again", scale=float("inf"))
    with pytest.raises(InvalidInputError, match="no LoRA adapter named"):
        engine.set_lora_scales({"ok": 1.0, "nope": 1.0})
    with pytest.raises(InvalidInputError, match="no LoRA adapter named"):
        engine.unload_lora("nope")

    assert engine.loras == {"ok": 0.5}
    _assert_bitwise(engine, before_state)
    np.testing.assert_array_equal(_image(engine), before)


def test_exported_networks_refuse_adapters(paths):
    engine = Engine.from_pretrained(paths["sd15"])
    engine.components.unet = object()  # stands for an exported network's wrapper
    with pytest.raises(InvalidInputError, match="torch backend"):
        engine.load_lora("style.safetensors")
    assert engine.loras == {}


def test_random_swap_sequences_end_bitwise_at_base(paths, pipes, tmp_path):
    engine = Engine.from_pretrained(paths["sd15"])
    base_state = _state(engine)
    files = [kohya_file(tmp_path / "k0.safetensors", pipes["sd15"], seed=9, conv=True, rank=2, ff=False, text=False),
             kohya_file(tmp_path / "k1.safetensors", pipes["sd15"], seed=10, ldm=True, rank=3, ff=False),
             peft_folder(tmp_path / "p2", pipes["sd15"], seed=11, rank=2)]
    rng = random.Random(0)
    for _ in range(100):
        op = rng.choice(("load", "load", "scale", "unload", "unload_all"))
        loaded = engine.loras
        if op == "load":
            i = rng.randrange(3)
            if f"n{i}" not in loaded:
                engine.load_lora(files[i], name=f"n{i}", scale=rng.choice((1.0, 0.0, -0.7, rng.uniform(-2, 2))))
        elif op == "scale" and loaded:
            engine.set_lora_scales({n: rng.choice((0.0, 1.0, rng.uniform(-2, 2))) for n in loaded if rng.random() < .7})
        elif op == "unload" and loaded:
            engine.unload_lora(rng.choice(sorted(loaded)))
        elif op == "unload_all":
            engine.unload_lora()
    engine.unload_lora()
    _assert_bitwise(engine, base_state)
    assert not engine._lora_weights._originals  # no host copies left


def test_parse_lora_spec():
    assert parse_lora_spec("a.safetensors") == ("a.safetensors", 1.0)
    assert parse_lora_spec("a.safetensors:0.6") == ("a.safetensors", 0.6)
    assert parse_lora_spec("C:/x/a.safetensors:-1") == ("C:/x/a.safetensors", -1.0)
    assert parse_lora_spec("C:/x/a.safetensors") == ("C:/x/a.safetensors", 1.0)
    with pytest.raises(ValueError):
        parse_lora_spec("a.safetensors:nan")


# ----------------------------------------------------------------------------- fast paths keep working
def _conv_weights(engine):
    return {n: p for n, p in engine.components.unet.named_parameters() if p.dim() == 4}


def test_channels_last_and_cuda_graph_stand_in_no_recapture(paths, pipes, tmp_path):
    """In-place merges keep every weight's storage and memory format: the graphs (CPU stand-in of
    tests/test_cuda_graphs.py, which drops its graphs when weights move) replay without capturing
    again, and the images follow the adapter."""
    from ldm_engine.pipeline.cuda_graphs import RerunGraphs

    f = kohya_file(tmp_path / "k.safetensors", pipes["sd15"], seed=13, conv=True)
    eager = Engine.from_pretrained(paths["sd15"])
    engine = Engine.from_pretrained(paths["sd15"]).use_channels_last()
    graphs = RerunGraphs()
    engine._install_graphs(graphs, 8)
    base_state, base = _state(engine), _image(engine)
    captured = graphs.captures
    ptrs = {n: p.data_ptr() for n, p in engine.components.unet.named_parameters()}
    engine.load_lora(f, scale=0.9)
    eager.load_lora(f, scale=0.9)
    for scale in (0.9, -0.4):
        eager.set_lora_scales({"k": scale})
        engine.set_lora_scales({"k": scale})
        got = _image(engine)
        np.testing.assert_allclose(got, _image(eager), rtol=0, atol=1e-5)
        assert np.abs(got - base).max() > 1e-2
    assert graphs.captures == captured, "swapping adapters must not capture graphs again"
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in _conv_weights(engine).values())
    assert ptrs == {n: p.data_ptr() for n, p in engine.components.unet.named_parameters()}
    engine.unload_lora()
    _assert_bitwise(engine, base_state)
    np.testing.assert_array_equal(_image(engine), base)
    assert graphs.captures == captured


def test_compiled_engine_does_not_recompile_across_swaps(paths, pipes, tmp_path):
    compiles = []

    def counting_backend(gm, example_inputs):
        compiles.append(len(gm.graph.nodes))
        return gm.forward

    f = kohya_file(tmp_path / "k.safetensors", pipes["sd15"], seed=14, conv=True)
    torch._dynamo.reset()
    try:
        eager = Engine.from_pretrained(paths["sd15"])
        engine = Engine.from_pretrained(paths["sd15"]).compile(backend=counting_backend)
        base = _image(engine, output_type="latent")
        n = len(compiles)
        assert n >= 1
        for scale in (1.0, 0.5):
            for e in (engine, eager):
                if e.loras:
                    e.set_lora_scales({"k": scale})
                else:
                    e.load_lora(f, scale=scale)
            got = _image(engine, output_type="latent")
            torch.testing.assert_close(got, _image(eager, output_type="latent"), rtol=0, atol=1e-4)
            assert (got - base).abs().max() > 1e-2
        engine.unload_lora()
        torch.testing.assert_close(_image(engine, output_type="latent"), base, rtol=0, atol=0)
        assert len(compiles) == n, "adapter swaps must not recompile"
    finally:
        torch._dynamo.reset()


# ----------------------------------------------------------------------------- command lines
def test_export_bakes_adapters_into_the_networks(paths, pipes, tmp_path):
    pytest.importorskip("onnxruntime")
    from ldm_engine.export import cli as export_cli
    from ldm_engine.export.manifest import read_manifest
    from ldm_engine.export.runtime import load_exported_components

    f = kohya_file(tmp_path / "te.safetensors", pipes["sd15"], seed=15)
    out = tmp_path / "exp"
    assert export_cli.main([str(paths["sd15"]), "--out", str(out), "--components", "text_encoder", "--height", "32",
                            "--width", "32", "--batch", "1", "--lora", f"{f}:0.6", "--quiet"]) == 0
    assert read_manifest(out)["loras"] == [{"file": str(f), "scale": 0.6}]
    comps, _ = load_exported_components(out, backend="onnxruntime", device="cpu")
    engine = Engine.from_pretrained(paths["sd15"])
    ids = engine.components.tokenizer([PROMPT])
    with torch.inference_mode():
        base = engine.components.text_encoder(ids)[0]
        engine.load_lora(f, scale=0.6)
        want = engine.components.text_encoder(ids)[0]
    got = comps.text_encoder(ids)[0]
    assert (want - base).abs().max() > 1e-2
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_cli_lora_option(paths, pipes, tmp_path, capsys):
    from PIL import Image

    from ldm_engine.cli import main

    f = kohya_file(tmp_path / "style.safetensors", pipes["sd15"], seed=16)
    args = ["generate", "--model", str(paths["sd15"]), "--prompt", PROMPT, "--steps", "2", "--size", "32",
            "--device", "cpu"]
    assert main(args + ["--out", str(tmp_path / "base.png")]) == 0
    assert main(args + ["--lora", f"{f}:0.8", "--out", str(tmp_path / "lora.png")]) == 0
    assert "style (0.8)" in capsys.readouterr().out
    a, b = (np.asarray(Image.open(tmp_path / n), dtype=np.float32) for n in ("base.png", "lora.png"))
    assert np.abs(a - b).max() > 2
    assert main(args + ["--lora", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "x.png")]) == 2
    assert "missing.safetensors" in capsys.readouterr().err


# ----------------------------------------------------------------------------- GPU (written, not yet run on one)
@pytest.mark.cuda
def test_real_cuda_graphs_follow_adapters_on_gpu(paths, pipes, tmp_path):
    f = kohya_file(tmp_path / "k.safetensors", pipes["sd15"], seed=18, conv=True)
    eager = Engine.from_pretrained(paths["sd15"], device="cuda", dtype="fp16")
    engine = Engine.from_pretrained(paths["sd15"], device="cuda", dtype="fp16").use_channels_last().enable_cuda_graphs()
    base_state = _state(engine)

    def image(e):
        lat = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(100)).to("cuda")
        return e.generate(PROMPT, seed=0, num_inference_steps=2, guidance_scale=3.0, latents=lat, height=32, width=32,
                          output_type="np").images

    base = image(engine)
    comps, _ = engine._networks()
    captured = list(comps.unet._entries.values())  # the U-Net's captured graphs
    for e in (engine, eager):
        e.load_lora(f, scale=0.8)
    for scale in (0.8, -0.5):
        for e in (engine, eager):
            e.set_lora_scales({"k": scale})
        got = image(engine)
        np.testing.assert_allclose(got, image(eager), rtol=0, atol=5e-3)
        assert np.abs(got - base).max() > 1e-2
    assert list(comps.unet._entries.values()) == captured, "adapter swaps must not capture the U-Net again"
    engine.unload_lora()
    _assert_bitwise(engine, {k: v.cuda() for k, v in base_state.items()})
    np.testing.assert_array_equal(image(engine), base)
