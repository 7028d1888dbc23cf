"""ldm_engine.samplers against diffusers 0.42.1 schedulers configured from the same scheduler config.

For every sampler x config x step count we compare timesteps, sigmas, init_noise_sigma, then run the
diffusers loop with a deterministic fake model and check (a) each of our steps fed diffusers' own
inputs (teacher forcing) and (b) our whole `sample()` loop against diffusers' final latents.
Stochastic samplers get the same noise: diffusers' randn_tensor is patched to return our noises[i].
"""

import json
import math
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import (  # noqa: E402
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    PNDMScheduler,
)
from diffusers.schedulers import (  # noqa: E402
    scheduling_ddpm,
    scheduling_euler_ancestral_discrete,
    scheduling_lcm,
)

from ldm_engine import samplers as S  # noqa: E402

diffusers.utils.logging.set_verbosity_error()  # from_config warns about every foreign key
# diffusers 0.42.1 calls np.array(tensor), which numpy 2 flags; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

REPO = Path(__file__).resolve().parents[1]
STEPS = (1, 2, 4, 7, 25)
SHAPE = (2, 4, 5, 7)
EXACT_TOL = 1e-6  # vs diffusers evaluated in float64 (its float32 constants), relative to the result
LOOP_TOL = 2e-6  # our float32 loop vs diffusers' float64 loop: float32 rounding over up to 26 steps
F32_TOL = 1e-5  # vs diffusers in float32, relative to the operands' magnitude: its formulas cancel
#                 terms up to ~15x larger than the latents (e.g. x - sigma*eps at sigma=14.6)

REFERENCE = {
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "ddpm": (DDPMScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler,
                 dict(algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=False)),
    "dpmpp_2m_karras": (DPMSolverMultistepScheduler,
                        dict(algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True)),
    "lcm": (LCMScheduler, {}),
    "pndm": (PNDMScheduler, dict(skip_prk_steps=True)),
}
UNSUPPORTED_PREDICTION = {("euler_a", "sample"), ("pndm", "sample")}


def shared_config(name: str, file: str = "scheduler_config.json") -> Path:
    for base in (REPO / "ldm_engine" / "configs", REPO.parent / "shared" / "configs"):
        if (base / name / file).exists():
            return base / name / file
    pytest.skip(f"{name}/{file} not found under ldm_engine/configs or ../shared/configs")


def load_config(name: str) -> dict:
    return json.loads(shared_config(name).read_text())


def variant(base: str, **changes) -> dict:
    return {**load_config(base), **changes}


# name -> (base config, changes); resolved lazily so a missing file skips instead of failing collection
CONFIGS = {"sd15": ("sd15", {}), "sd-turbo": ("sd-turbo", {}), "sdxl-turbo": ("sdxl-turbo", {})}
for _spacing in ("leading", "trailing", "linspace"):
    for _pred in ("epsilon", "v_prediction", "sample"):
        CONFIGS[f"{_spacing}-{_pred}"] = ("sd15", dict(timestep_spacing=_spacing, prediction_type=_pred))


class FakeModel:
    """Deterministic stand-in for the U-Net: 0.3 * x + sin(t / 100) * C, in the dtype of x."""

    def __init__(self, shape=SHAPE):
        self.c = torch.randn(shape, generator=torch.Generator().manual_seed(1))

    def __call__(self, x, t):
        wave = torch.sin(torch.as_tensor(t, dtype=torch.float64) / 100)
        return 0.3 * x + wave.to(x.dtype) * self.c.to(x.dtype)


def rel_err(a: torch.Tensor, b: torch.Tensor, *scale: torch.Tensor) -> float:
    """max |a - b| over the largest magnitude among b and `scale`."""
    norm = max(t.double().abs().max().item() for t in (b, *scale))
    return (a.double() - b.double()).abs().max().item() / max(norm, 1e-30)


class Reference:
    """A diffusers scheduler driven the way its (img2img) pipelines drive it."""

    def __init__(self, name, cfg, steps, strength=None):
        cls, forced = REFERENCE[name]
        self.name, self.sched = name, cls.from_config(cfg, **forced)
        self.sched.set_timesteps(steps)
        self.timesteps, self.begin = self.sched.timesteps, 0
        if strength is not None:  # StableDiffusionImg2ImgPipeline.get_timesteps
            self.begin = max(steps - min(int(steps * strength), steps), 0) * self.sched.order
            self.timesteps = self.timesteps[self.begin:]
            if hasattr(self.sched, "set_begin_index"):
                self.sched.set_begin_index(self.begin)

    def step(self, out, t, x):
        return self.sched.step(out, t, x, **({"eta": 0.0} if self.name == "ddim" else {})).prev_sample


def patch_noise(monkeypatch, noises, current):
    """diffusers' stochastic schedulers draw randn_tensor(shape, dtype=...): hand them noises[i]."""
    def fake_randn(shape, generator=None, device=None, dtype=None, layout=None):
        return noises[current["i"]].to(dtype)
    for module in (scheduling_euler_ancestral_discrete, scheduling_ddpm, scheduling_lcm):
        monkeypatch.setattr(module, "randn_tensor", fake_randn)


def check_against_reference(name, cfg, steps, monkeypatch, strength=None):
    gen = torch.Generator().manual_seed(steps)
    x_T, x0, noise0 = (torch.randn(SHAPE, generator=gen) for _ in range(3))
    sched = S.build_schedule(name, cfg, steps, strength=strength)
    sched64 = S.build_schedule(name, cfg, steps, strength=strength)  # its own multistep history
    n = sched.num_steps
    noises = torch.randn((n, *SHAPE), generator=gen)
    current = {"i": 0}
    patch_noise(monkeypatch, noises, current)
    ref, ref64, loop64 = (Reference(name, cfg, steps, strength) for _ in range(3))

    assert sched.timesteps.dtype == ref.timesteps.dtype
    assert torch.equal(sched.timesteps, ref.timesteps), (sched.timesteps, ref.timesteps)
    assert n == len(ref.timesteps)
    assert sched.init_noise_sigma == pytest.approx(float(ref.sched.init_noise_sigma), rel=1e-7)
    assert sched.prediction_type == ref.sched.config.prediction_type
    if name in ("euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras"):
        assert torch.equal(sched.sigmas, ref.sched.sigmas[ref.begin:])
    if strength is None:
        start, ref_start = x_T * sched.init_noise_sigma, x_T * ref.sched.init_noise_sigma
    else:
        start, ref_start = sched.add_noise(x0, noise0), ref.sched.add_noise(x0, noise0, ref.timesteps[:1])
        assert rel_err(sched.add_noise(x0.double(), noise0.double()),
                       ref64.sched.add_noise(x0.double(), noise0.double(), ref.timesteps[:1])) <= EXACT_TOL
    assert rel_err(start, ref_start) <= F32_TOL

    # Teacher forcing: each of our steps gets diffusers' own x and model output.
    model, x, x64 = FakeModel(), ref_start, start.double()
    for i, t in enumerate(ref.timesteps):
        current["i"] = i
        x_in = ref.sched.scale_model_input(x, t)
        assert rel_err(sched.scale_model_input(x, i), x_in) <= EXACT_TOL, f"scale_model_input, step {i}"
        out = model(x_in, t)
        x_next = ref.step(out, t, x)
        if i + 1 < n:  # inpainting re-noises the known region to the next timestep after each step
            want = ref.sched.add_noise(x0, noise0, ref.timesteps[i + 1:i + 2])
            assert rel_err(sched.add_noise(x0, noise0, i + 1), want) <= F32_TOL, f"add_noise to step {i + 1}"
        # float64: same math as diffusers' on its float32 constants -> ~exact
        ref64.sched.scale_model_input(x.double(), t)
        want = ref64.step(out.double(), t, x.double())
        err = rel_err(sched64.step(i, out.double(), x.double(), noises[i].double()), want)
        assert err <= EXACT_TOL, f"float64 step {i}/{n}: relative error {err:.2e}"
        err = rel_err(sched.step(i, out, x, noises[i]), x_next, x)
        assert err <= F32_TOL, f"float32 step {i}/{n}: relative error {err:.2e}"
        # the float64 diffusers loop, for the whole-loop check
        x64 = loop64.step(model(loop64.sched.scale_model_input(x64, t), t), t, x64)
        x = x_next

    ours = S.sample(sched, model, start, noises if sched.needs_noise else None)
    ours64 = S.sample(sched, model, start.double(), noises.double() if sched.needs_noise else None)
    err = rel_err(ours64, x64)
    assert err <= EXACT_TOL, f"float64 loop vs float64 diffusers: relative error {err:.2e}"
    err = rel_err(ours, x64)
    assert err <= LOOP_TOL, f"whole loop vs float64 diffusers: relative error {err:.2e}"
    err = rel_err(ours, x, start)
    assert err <= F32_TOL, f"whole loop vs float32 diffusers: relative error {err:.2e}"
    return sched


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("name", S.SAMPLER_NAMES)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_matches_diffusers(config, name, steps, monkeypatch):
    base, changes = CONFIGS[config]
    cfg = variant(base, **changes)
    if (name, cfg["prediction_type"]) in UNSUPPORTED_PREDICTION:
        with pytest.raises(ValueError, match="prediction_type"):
            S.build_schedule(name, cfg, steps)
        return
    check_against_reference(name, cfg, steps, monkeypatch)


# Settings the shipped configs do not exercise, on the SD1.5 config.
SPECIAL = [
    ("ddim", dict(clip_sample=True, clip_sample_range=0.5)),
    ("ddim", dict(set_alpha_to_one=True, beta_schedule="linear", beta_start=0.0001, beta_end=0.02)),
    ("ddim", dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5)),
    ("ddim", dict(beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing")),
    ("ddpm", dict(clip_sample=True, clip_sample_range=0.7, timestep_spacing="trailing")),
    ("ddpm", dict(variance_type="fixed_small_log")),
    ("ddpm", dict(variance_type="fixed_large", timestep_spacing="linspace")),
    ("ddpm", dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5)),
    ("lcm", dict(clip_sample=True, clip_sample_range=0.5, set_alpha_to_one=False)),
    ("lcm", dict(original_inference_steps=30, timestep_scaling=5.0)),
    ("pndm", dict(set_alpha_to_one=True, beta_schedule="linear", beta_start=0.0001, beta_end=0.02)),
    ("euler", dict(use_karras_sigmas=True)),
    ("euler", dict(use_karras_sigmas=True, sigma_min=0.1, sigma_max=10.0, timestep_spacing="leading")),
    ("euler", dict(final_sigmas_type="sigma_min", timestep_spacing="leading")),
    ("euler", dict(timestep_type="continuous", prediction_type="v_prediction")),
    ("euler", dict(_use_default_values=["timestep_spacing"], timestep_spacing="trailing")),
    ("ddim", dict(_use_default_values=["timestep_spacing"], timestep_spacing="trailing")),
    ("dpmpp_2m", dict(final_sigmas_type="sigma_min", lower_order_final=False)),
    ("dpmpp_2m", dict(solver_type="heun", timestep_spacing="leading")),
    ("dpmpp_2m", dict(euler_at_final=True, final_sigmas_type="sigma_min", prediction_type="v_prediction")),
    ("dpmpp_2m", dict(lambda_min_clipped=-5.1, timestep_spacing="trailing")),
    ("dpmpp_2m", dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5,
                      prediction_type="sample")),
    ("dpmpp_2m_karras", dict(sigma_min=0.1, sigma_max=10.0)),
    ("dpmpp_2m_karras", dict(solver_type="heun", prediction_type="v_prediction")),
] + [
    (name, dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing"))
    for name in ("euler", "euler_a", "ddim", "ddpm", "dpmpp_2m", "lcm")
]


@pytest.mark.parametrize("steps", (4, 25))
@pytest.mark.parametrize("name,changes", SPECIAL, ids=[f"{n}-{'-'.join(c)}" for n, c in SPECIAL])
def test_special_settings(name, changes, steps, monkeypatch):
    check_against_reference(name, variant("sd15", **changes), steps, monkeypatch)


@pytest.mark.parametrize("name", ["euler", "euler_a", "ddim", "ddpm", "dpmpp_2m", "pndm"])
def test_trailing_spacing_with_extra_timestep(name, monkeypatch):
    # np.arange(1000, 0, -1000/61) has 62 entries: diffusers then runs 62 steps; so do we.
    sched = check_against_reference(name, variant("sd15", timestep_spacing="trailing"), 61, monkeypatch)
    assert sched.num_steps == 62 + (name == "pndm")


@pytest.mark.parametrize("steps,strength", [(2, 0.5), (4, 0.5), (4, 0.25), (25, 0.3), (3, 1.0)])
@pytest.mark.parametrize("name", S.SAMPLER_NAMES)
@pytest.mark.parametrize("config", ["sd-turbo", "sdxl-turbo", "sd15", "leading-v_prediction"])
def test_img2img_matches_diffusers(config, name, steps, strength, monkeypatch):
    base, changes = CONFIGS[config]
    check_against_reference(name, variant(base, **changes), steps, monkeypatch, strength=strength)


@pytest.mark.parametrize("model", ["sd-turbo", "sdxl-turbo"])
def test_published_turbo_timesteps(model):
    cfg = load_config(model)
    # published turbo timesteps (from the project's shared config set, copied beside the tests)
    expected = json.loads((Path(__file__).parent / "data" / "scheduler_timesteps.json").read_text())[model]
    name = S.default_sampler_name(cfg)
    assert name == {"sd-turbo": "euler", "sdxl-turbo": "euler_a"}[model]
    for steps in (1, 2, 3, 4):
        sched = S.build_schedule(name, cfg, steps)
        want = expected[str(steps)]
        assert sched.timesteps.tolist() == want["timesteps"]
        assert sched.sigmas.tolist() == pytest.approx(want["sigmas"], abs=1e-5)
        assert sched.init_noise_sigma == pytest.approx(want["init_noise_sigma"], rel=1e-7)
        assert sched.sigmas[0].item() == pytest.approx(expected["sigma_at_999"], rel=1e-7)
    for key, want in expected.items():
        if key.startswith("img2img_"):
            steps, strength = key[len("img2img_steps"):].split("_strength")
            sched = S.build_schedule(name, cfg, int(steps), strength=float(strength))
            assert sched.timesteps.tolist() == want, key


def test_one_step_turbo_is_x_minus_sigma_eps():
    for model in ("sd-turbo", "sdxl-turbo"):
        cfg = load_config(model)
        sched = S.build_schedule(S.default_sampler_name(cfg), cfg, 1)
        assert not sched.needs_noise  # sigma_next = 0: no ancestral noise at the last step
        x = torch.randn(SHAPE)
        eps = torch.randn(SHAPE)
        sigma = sched.init_noise_sigma
        got = S.sample(sched, lambda x_in, t: eps, x)
        torch.testing.assert_close(got, x - sigma * eps, rtol=1e-6, atol=1e-5)


def test_default_sampler_name():
    names = {
        "EulerDiscreteScheduler": "euler", "EulerAncestralDiscreteScheduler": "euler_a",
        "DDIMScheduler": "ddim", "DDPMScheduler": "ddpm", "DPMSolverMultistepScheduler": "dpmpp_2m",
        "LCMScheduler": "lcm", "PNDMScheduler": "pndm",
    }
    for cls, name in names.items():
        assert S.default_sampler_name({"_class_name": cls}) == name
    karras = {"_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True}
    assert S.default_sampler_name(karras) == "dpmpp_2m_karras"
    assert S.default_sampler_name(load_config("sd15")) == "pndm"
    with pytest.raises(ValueError, match="UniPCMultistepScheduler"):
        S.default_sampler_name({"_class_name": "UniPCMultistepScheduler"})


def test_needs_noise():
    cfg = load_config("sd15")
    assert S.build_schedule("euler_a", cfg, 4).needs_noise
    assert S.build_schedule("ddpm", cfg, 4).needs_noise
    assert S.build_schedule("lcm", cfg, 4).needs_noise
    assert not S.build_schedule("lcm", cfg, 1).needs_noise
    for name in ("euler", "ddim", "dpmpp_2m", "dpmpp_2m_karras", "pndm"):
        assert not S.build_schedule(name, cfg, 4).needs_noise


def test_bad_arguments():
    cfg = load_config("sd15")
    with pytest.raises(ValueError, match="sampler name 'heun'"):
        S.build_schedule("heun", cfg, 4)
    for steps in (0, -3):
        with pytest.raises(ValueError, match="num_inference_steps"):
            S.build_schedule("euler", cfg, steps)
    with pytest.raises(TypeError, match="num_inference_steps"):
        S.build_schedule("euler", cfg, 2.5)
    for strength in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="strength"):
            S.build_schedule("euler", cfg, 4, strength=strength)
    with pytest.raises(ValueError, match=r"num_inference_steps \* strength"):
        S.build_schedule("euler", cfg, 2, strength=0.4)
    with pytest.raises(ValueError, match="original_inference_steps"):
        S.build_schedule("lcm", cfg, 51)
    with pytest.raises(ValueError, match="variance_type"):
        S.build_schedule("ddpm", {**cfg, "variance_type": "learned_range"}, 4)
    with pytest.raises(ValueError, match="timestep_spacing"):
        S.build_schedule("ddim", {**cfg, "timestep_spacing": "karras"}, 4)
    with pytest.raises(TypeError, match="scheduler_config"):
        S.build_schedule("ddim", "sd15", 4)


def test_noises_validated():
    sched = S.build_schedule("euler_a", load_config("sdxl-turbo"), 4)
    x = torch.randn(SHAPE)
    model = FakeModel()
    with pytest.raises(ValueError, match="noises"):
        S.sample(sched, model, x)
    with pytest.raises(ValueError, match="noises"):
        S.sample(sched, model, x, torch.randn(3, *SHAPE))
    with pytest.raises(ValueError, match="noise"):
        sched.step(0, model(x, sched.timesteps[0]), x)


@pytest.mark.parametrize("name", S.SAMPLER_NAMES)
def test_loop_never_reads_tensor_values(name):
    # Meta tensors have no data: any .item(), data-dependent branch or value lookup would raise.
    cfg = {**load_config("sd15"), "thresholding": name in ("ddim", "dpmpp_2m")}
    sched = S.build_schedule(name, cfg, 7, device="meta")
    x = torch.empty(SHAPE, device="meta")
    noises = torch.empty((sched.num_steps, *SHAPE), device="meta")
    seen = []

    def model(x_in, t):
        seen.append(t.device.type)
        return x_in * 0.5

    out = S.sample(sched, model, x, noises)
    assert out.shape == SHAPE and out.device.type == "meta" and seen == ["meta"] * sched.num_steps


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["euler_a", "dpmpp_2m", "pndm"])
def test_loop_captures_in_cuda_graph(name):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    cfg = load_config("sd15")
    sched = S.build_schedule(name, cfg, 7, device="cuda")
    model = FakeModel((2, 4, 8, 8))
    model.c = model.c.cuda()
    x = torch.randn(2, 4, 8, 8, device="cuda")
    noises = torch.randn(sched.num_steps, 2, 4, 8, 8, device="cuda")
    eager = S.sample(sched, model, x, noises)
    static_x = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up outside the graph
        S.sample(sched, model, static_x, noises)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = S.sample(sched, model, static_x, noises)
    graph.replay()
    torch.testing.assert_close(static_out, eager, rtol=1e-5, atol=1e-5)
    static_x.copy_(x * 2)
    graph.replay()
    torch.testing.assert_close(static_out, S.sample(sched, model, x * 2, noises), rtol=1e-5, atol=1e-5)
    assert math.isfinite(static_out.abs().max().item())


@pytest.mark.parametrize("eta", [0.5, 1.0])
@pytest.mark.parametrize("clip", [False, True])
def test_ddim_eta_matches_diffusers(eta, clip):
    """DDIMScheduler.step(eta=...) with the same variance noise, step by step and over the loop."""
    cfg = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001, beta_end=0.02,
               clip_sample=clip, set_alpha_to_one=False)
    ref = DDIMScheduler(**cfg)
    ref.set_timesteps(12)
    sched = S.build_schedule("ddim", cfg, 12, eta=eta)
    assert sched.needs_noise and torch.equal(sched.timesteps, ref.timesteps)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(SHAPE, generator=gen)
    noises = torch.randn((12, *SHAPE), generator=gen)
    model, ours = FakeModel(), x
    for i, t in enumerate(ref.timesteps):
        out = model(x, t)
        x_next = ref.step(out, t, x, eta=eta, variance_noise=noises[i]).prev_sample
        assert rel_err(sched.step(i, out, x, noises[i]), x_next, x) <= F32_TOL
        x = x_next
    assert rel_err(S.sample(sched, model, ours, noises), x) <= F32_TOL
    assert not S.build_schedule("ddim", cfg, 12, eta=0.0).needs_noise


@pytest.mark.parametrize("name,eta", [("ddim", -0.1), ("ddim", 1.5), ("ddim", "1"), ("ddpm", 0.5)])
def test_eta_is_checked(name, eta):
    with pytest.raises(ValueError, match="eta"):
        S.build_schedule(name, {"_class_name": "DDIMScheduler"}, 10, eta=eta)
