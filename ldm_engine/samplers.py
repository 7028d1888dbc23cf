"""Samplers: diffusers' discrete schedulers, precomputed on the host.

`build_schedule(name, scheduler_config, steps)` reads a diffusers scheduler_config.json the way
`<Scheduler>.from_config(config)` does (numeric settings from the config, algorithm from `name`) and
turns it into a `Schedule` whose per-step coefficients are plain Python floats. `sample()` then runs
each step as a few elementwise tensor ops: no host-device sync, no data-dependent branches, static
shapes -- the loop can be captured in a CUDA graph.

The scalar math mirrors diffusers 0.42.1 in float32 (same formulas, same order), so results match
EulerDiscrete, EulerAncestralDiscrete, DDIM (eta=0), DDPM, DPMSolverMultistep (dpmsolver++, order 2),
LCM and PNDM (PLMS, skip_prk_steps) to float32 rounding.

All tensor math runs in the dtype of the latents given to `sample()`: pass float32 latents and let
`model_fn` cast to the model's dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable, NamedTuple

import numpy as np
import torch

SAMPLER_NAMES = ("euler", "euler_a", "ddim", "ddpm", "dpmpp_2m", "dpmpp_2m_karras", "lcm", "pndm")

_CLASS_TO_NAME = {
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_a",
    "DDIMScheduler": "ddim",
    "DDPMScheduler": "ddpm",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
    "LCMScheduler": "lcm",
    "PNDMScheduler": "pndm",
}

# The __init__ defaults of each diffusers class: from_config fills keys the config lacks with these.
_BETAS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
              trained_betas=None, prediction_type="epsilon", steps_offset=0)
_CLIP = dict(clip_sample=True, clip_sample_range=1.0, thresholding=False,
             dynamic_thresholding_ratio=0.995, sample_max_value=1.0, rescale_betas_zero_snr=False)
_DEFAULTS = {
    "euler": dict(_BETAS, interpolation_type="linear", use_karras_sigmas=False, use_exponential_sigmas=False,
                  use_beta_sigmas=False, sigma_min=None, sigma_max=None, timestep_spacing="linspace",
                  timestep_type="discrete", rescale_betas_zero_snr=False, final_sigmas_type="zero"),
    "euler_a": dict(_BETAS, timestep_spacing="linspace", rescale_betas_zero_snr=False),
    "ddim": dict(_BETAS, **_CLIP, set_alpha_to_one=True, timestep_spacing="leading"),
    "ddpm": dict(_BETAS, **_CLIP, variance_type="fixed_small", timestep_spacing="leading"),
    # sigma_min/sigma_max are not DPMSolver arguments, but from_config keeps them in its config and
    # the Karras conversion reads them.
    "dpmpp_2m": dict(_BETAS, **_CLIP, solver_type="midpoint", lower_order_final=True, euler_at_final=False,
                     use_exponential_sigmas=False, use_beta_sigmas=False, use_lu_lambdas=False,
                     use_flow_sigmas=False, final_sigmas_type="zero", lambda_min_clipped=-math.inf,
                     variance_type=None, timestep_spacing="linspace", use_dynamic_shifting=False,
                     sigma_min=None, sigma_max=None),
    "lcm": dict(_BETAS, **_CLIP, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                original_inference_steps=50, set_alpha_to_one=True, timestep_spacing="leading",
                timestep_scaling=10.0),
    "pndm": dict(_BETAS, set_alpha_to_one=False, timestep_spacing="leading"),
}
for _k in ("clip_sample", "clip_sample_range"):  # DPMSolver has no clipping arguments
    del _DEFAULTS["dpmpp_2m"][_k]
_DEFAULTS["lcm"]["clip_sample"] = False
_DEFAULTS["dpmpp_2m_karras"] = _DEFAULTS["dpmpp_2m"]
# What the sampler name fixes regardless of the config (the "algorithm").
_FORCED = {
    "dpmpp_2m": dict(algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=False),
    "dpmpp_2m_karras": dict(algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True),
    "pndm": dict(skip_prk_steps=True),
}
_PREDICTIONS = {
    "euler": ("epsilon", "v_prediction", "sample"),
    "euler_a": ("epsilon", "v_prediction"),
    "pndm": ("epsilon", "v_prediction"),
}


def default_sampler_name(scheduler_config: dict) -> str:
    """Our sampler name for the scheduler class a diffusers scheduler_config.json names."""
    cls = scheduler_config.get("_class_name")
    if cls not in _CLASS_TO_NAME:
        raise ValueError(f"scheduler_config: unsupported scheduler _class_name {cls!r}; "
                         f"supported: {sorted(_CLASS_TO_NAME)}")
    name = _CLASS_TO_NAME[cls]
    if name == "dpmpp_2m" and scheduler_config.get("use_karras_sigmas"):
        return "dpmpp_2m_karras"
    return name


# --------------------------------------------------------------------------------------------------
# Schedule


class _Lin(NamedTuple):
    """x_next = x·c.x + out·c.out [+ clip(x·c.x0_x + out·c.x0_out)·c.x0] [+ noise·c.noise]."""
    x: float
    out: float
    noise: float = 0.0
    x0: float = 0.0
    x0_x: float = 0.0
    x0_out: float = 0.0


class _Dpm(NamedTuple):
    """Denoised d = x·c.d_x + out·c.d_out; x_next = x·c.x + d·c.d + (d - d_prev)·c.dd."""
    d_x: float
    d_out: float
    x: float
    d: float
    dd: float


class _Plms(NamedTuple):
    """eps = Σ w·e over the last model outputs + out·c.w_out; x_next = base·c.x + eps·c.eps.

    base is x, or (second call of the first step) the latents the first step started from."""
    append: bool
    weights: tuple
    w_out: float
    from_start: bool
    save_start: bool
    x: float
    eps: float


@dataclass(eq=False)
class Schedule:
    """A sampler with every per-step constant resolved; see `sample()` for the loop."""

    name: str
    timesteps: torch.Tensor
    init_noise_sigma: float
    prediction_type: str
    sigmas: torch.Tensor | None  # float32 (num_steps + 1,) for sigma-based samplers, else None
    _input_scale: tuple  # per step divisor of scale_model_input (None: identity)
    _coefs: tuple
    _advance: Callable
    _noise_coefs: tuple  # add_noise to timesteps[i]: x0*a + noise*b, one (a, b) per step
    _clip: Callable | None = None
    _state: dict = field(default_factory=dict, repr=False)

    @property
    def num_steps(self) -> int:
        return len(self._coefs)

    @property
    def needs_noise(self) -> bool:
        """True when some step adds fresh noise (ancestral / stochastic samplers)."""
        return any(self._uses_noise(i) for i in range(self.num_steps))

    def scale_model_input(self, x: torch.Tensor, i: int) -> torch.Tensor:
        d = self._input_scale[i]
        return x if d is None else x / d

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, i: int = 0) -> torch.Tensor:
        """Noise clean latents to timesteps[i], as the diffusers scheduler's add_noise() does there
        (i = 0: img2img's start; inpainting re-noises the known region to each next timestep)."""
        a, b = self._noise_coefs[i]
        return x0 * a + noise * b

    def reset(self) -> None:
        """Forget the multistep history kept by `step()`."""
        self._state = {}

    def step(self, i: int, model_output: torch.Tensor, x: torch.Tensor, noise: torch.Tensor | None = None):
        """One step from x at step i to the next latents; step 0 resets the multistep history."""
        if i == 0:
            self.reset()
        if noise is None and self._uses_noise(i):
            raise ValueError(f"noise: step {i} of sampler {self.name!r} needs a noise tensor")
        return self._advance(self, self._coefs[i], x, model_output, noise, self._state)

    def _uses_noise(self, i: int) -> bool:
        c = self._coefs[i]
        return isinstance(c, _Lin) and c.noise != 0.0


def sample(schedule: Schedule, model_fn, x: torch.Tensor, noises: torch.Tensor | None = None, *,
           after_step=None) -> torch.Tensor:
    """Run the whole loop: model_fn(scale_model_input(x, i), timesteps[i]) -> eps / v / x0.

    after_step(i, x, out): called after step i with the new latents and that step's model output;
    returns the latents the loop goes on with (e.g. inpainting blends the known region back, a
    preview callback passes them through). It may raise to end the loop early.
    """
    if noises is not None and tuple(noises.shape) != (schedule.num_steps, *x.shape):
        raise ValueError(f"noises must have shape {(schedule.num_steps, *x.shape)}, got {tuple(noises.shape)}")
    if noises is None and schedule.needs_noise:
        raise ValueError(f"noises: sampler {schedule.name!r} is stochastic; pass noises of shape "
                         f"{(schedule.num_steps, *x.shape)}")
    state = {}
    for i, c in enumerate(schedule._coefs):
        out = model_fn(schedule.scale_model_input(x, i), schedule.timesteps[i])
        x = schedule._advance(schedule, c, x, out, None if noises is None else noises[i], state)
        if after_step is not None:
            x = after_step(i, x, out)
    return x


# Step functions: short tensor expressions over precomputed floats. Branches test only host constants.

def _advance_lin(s: Schedule, c: _Lin, x, out, noise, state):
    x_next = x * c.x + out * c.out
    if c.x0:
        x_next = x_next + s._clip(x * c.x0_x + out * c.x0_out) * c.x0
    if c.noise:
        x_next = x_next + noise * c.noise
    return x_next


def _advance_dpm(s: Schedule, c: _Dpm, x, out, noise, state):
    d = x * c.d_x + out * c.d_out
    if s._clip is not None:
        d = s._clip(d)
    x_next = x * c.x + d * c.d
    if c.dd:  # the difference first, as diffusers does: d and d_prev nearly cancel
        x_next = x_next + (d - state["d"]) * c.dd
    state["d"] = d
    return x_next


def _advance_plms(s: Schedule, c: _Plms, x, out, noise, state):
    ets = state.setdefault("ets", [])
    if c.save_start:
        state["start"] = x
    if c.append:
        ets.append(out)
        del ets[:-4]
    eps = out * c.w_out if c.w_out else None
    for w, e in zip(c.weights, ets[-len(c.weights):]):
        eps = e * w if eps is None else eps + e * w
    base = state["start"] if c.from_start else x
    return base * c.x + eps * c.eps


# --------------------------------------------------------------------------------------------------
# Config handling

MAX_TRAIN_TIMESTEPS = 100_000  # diffusers' models use 1000; tables of this length are allocated


def check_scheduler_config(cfg) -> None:
    """ValueError when a scheduler_config.json's numbers are of the wrong type or out of range:
    called when a pipeline is loaded, before any table is allocated from them. (The class name is
    checked later: a pipeline with an unsupported scheduler may still run with another sampler.)"""
    if not isinstance(cfg, dict):
        raise ValueError(f"scheduler_config must be a JSON object, got {type(cfg).__name__}")

    def number(key, lo, hi, *, integer=False):
        v = cfg.get(key)
        ok = isinstance(v, int) if integer else isinstance(v, (int, float))
        if v is not None and (not ok or isinstance(v, bool) or not lo <= v <= hi):
            raise ValueError(f"scheduler_config: {key} must be {'an int' if integer else 'a number'} "
                             f"in [{lo}, {hi}], got {str(v)[:60]}")

    number("num_train_timesteps", 1, MAX_TRAIN_TIMESTEPS, integer=True)
    n = cfg.get("num_train_timesteps", 1000)
    number("steps_offset", 0, n - 1, integer=True)
    number("original_inference_steps", 1, n, integer=True)
    for key in ("beta_start", "beta_end"):
        number(key, 0.0, 1.0)
    betas = cfg.get("trained_betas")
    if betas is not None and not (isinstance(betas, list) and len(betas) == n and all(
            isinstance(b, (int, float)) and not isinstance(b, bool) and 0.0 <= b < 1.0 for b in betas)):
        raise ValueError(f"scheduler_config: trained_betas must be None or num_train_timesteps ({n}) numbers "
                         "in [0, 1)")


def _resolve_config(name: str, cfg: dict) -> SimpleNamespace:
    if not isinstance(cfg, dict):
        raise TypeError(f"scheduler_config must be a dict, got {type(cfg).__name__}")
    use_default = set(cfg.get("_use_default_values", ()))  # from_config ignores these keys' values
    c = {k: (cfg[k] if k in cfg and k not in use_default else v) for k, v in _DEFAULTS[name].items()}
    c.update(_FORCED.get(name, {}))
    c = SimpleNamespace(**c)
    if c.beta_schedule not in ("linear", "scaled_linear", "squaredcos_cap_v2") and c.trained_betas is None:
        raise ValueError(f"scheduler_config: beta_schedule {c.beta_schedule!r} is not supported")
    if name != "lcm" and c.timestep_spacing not in ("linspace", "leading", "trailing"):
        raise ValueError(f"scheduler_config: timestep_spacing {c.timestep_spacing!r} is not supported")
    allowed = _PREDICTIONS.get(name, ("epsilon", "v_prediction", "sample"))
    if c.prediction_type not in allowed:
        raise ValueError(f"scheduler_config: prediction_type {c.prediction_type!r} is not supported by "
                         f"sampler {name!r} (supported: {allowed})")
    return c


def _unsupported(c: SimpleNamespace, name: str, **expected) -> None:
    for key, ok in expected.items():
        if getattr(c, key) != ok:
            raise ValueError(f"scheduler_config: {key}={getattr(c, key)!r} is not supported by sampler {name!r}")


def _cosine_betas(n: int) -> torch.Tensor:
    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return torch.tensor([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)],
                        dtype=torch.float32)


def _zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale betas so the last timestep has zero SNR (arXiv 2305.08891, algorithm 1)."""
    sqrt_ab = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    ab = sqrt_ab**2
    return 1 - torch.cat([ab[0:1], ab[1:] / ab[:-1]])


def _alphas_cumprod(c: SimpleNamespace, pin_terminal: bool = False) -> torch.Tensor:
    n = c.num_train_timesteps
    if c.trained_betas is not None:
        betas = torch.tensor(c.trained_betas, dtype=torch.float32)
    elif c.beta_schedule == "linear":
        betas = torch.linspace(c.beta_start, c.beta_end, n, dtype=torch.float32)
    elif c.beta_schedule == "scaled_linear":
        betas = torch.linspace(c.beta_start**0.5, c.beta_end**0.5, n, dtype=torch.float32) ** 2
    else:
        betas = _cosine_betas(n)
    rescale = getattr(c, "rescale_betas_zero_snr", False)
    if rescale:
        betas = _zero_terminal_snr(betas)
    ac = torch.cumprod(1.0 - betas, dim=0)
    if rescale and pin_terminal:  # the sigma-based schedulers keep the last sigma finite
        ac[-1] = 2**-24
    return ac


def _spaced(c: SimpleNamespace, n: int, dtype) -> np.ndarray:
    """Descending timesteps per timestep_spacing (diffusers' numpy expressions, same rounding)."""
    N = c.num_train_timesteps
    if c.timestep_spacing == "linspace":
        if dtype == np.float32:  # Euler keeps fractional timesteps
            return np.linspace(0, N - 1, n, dtype=np.float32)[::-1].copy()
        return np.linspace(0, N - 1, n).round()[::-1].copy().astype(dtype)
    if c.timestep_spacing == "leading":
        return (np.arange(0, n) * (N // n)).round()[::-1].copy().astype(dtype) + dtype(c.steps_offset)
    return np.round(np.arange(N, 0, -N / n)).astype(dtype) - dtype(1)


def _sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each sigma: linear interpolation in log-sigma."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return ((1 - w) * low + w * (low + 1)).reshape(sigmas.shape)


def _karras(c: SimpleNamespace, sigma_lo: float, sigma_hi: float, n: int) -> np.ndarray:
    lo = c.sigma_min if c.sigma_min is not None else sigma_lo
    hi = c.sigma_max if c.sigma_max is not None else sigma_hi
    rho = 7.0
    ramp = np.linspace(0, 1, n)
    return (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho


def _final_sigma(c: SimpleNamespace, ac: torch.Tensor) -> float:
    if c.final_sigmas_type == "zero":
        return 0
    if c.final_sigmas_type == "sigma_min":
        return ((1 - ac[0]) / ac[0]) ** 0.5
    raise ValueError(f"scheduler_config: final_sigmas_type {c.final_sigmas_type!r} is not supported")


def _x0_coefs(pred: str, sqrt_a, sqrt_b) -> tuple:
    """x0 = x*p + out*q for alphas-based samplers (sqrt of alpha_prod_t and 1 - alpha_prod_t)."""
    if pred == "epsilon":
        return 1 / sqrt_a, -sqrt_b / sqrt_a
    if pred == "v_prediction":
        return sqrt_a, -sqrt_b
    return 0.0, 1.0


def _f(t) -> float:
    return float(t)


# --------------------------------------------------------------------------------------------------
# Builders: each returns the schedule of the first `n` steps; build_schedule slices it for img2img.


def _build_euler(c, n, begin, ancestral: bool):
    name = "euler_a" if ancestral else "euler"
    if not ancestral:
        _unsupported(c, name, interpolation_type="linear", use_exponential_sigmas=False, use_beta_sigmas=False)
    ac = _alphas_cumprod(c, pin_terminal=True)
    timesteps = _spaced(c, n, np.float32)
    train_sigmas = (((1 - ac) / ac) ** 0.5).numpy()
    sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)
    if not ancestral and c.use_karras_sigmas:
        sigmas = _karras(c, float(sigmas[-1]), float(sigmas[0]), n)
        timesteps = _sigma_to_t(sigmas, np.log(train_sigmas))
    last = 0.0 if ancestral else _final_sigma(c, ac)
    sigmas = torch.from_numpy(np.concatenate([sigmas, [last]]).astype(np.float32))
    if not ancestral and c.timestep_type == "continuous" and c.prediction_type == "v_prediction":
        timesteps = torch.Tensor([0.25 * s.log() for s in sigmas[:-1]])
    else:
        timesteps = torch.from_numpy(timesteps.astype(np.float32))
    init = sigmas.max()
    if c.timestep_spacing not in ("linspace", "trailing"):
        init = (init**2 + 1) ** 0.5
    coefs, scales = [], []
    for k in range(begin, len(timesteps)):  # trailing spacing can yield n + 1 timesteps
        sigma, sigma_next = sigmas[k], sigmas[k + 1]
        scales.append(_f((sigma**2 + 1) ** 0.5))
        s = _f(sigma)
        if c.prediction_type == "epsilon":  # x0 = x*p + out*q
            p, q = 1.0, -s
        elif c.prediction_type == "v_prediction":
            p, q = 1 / _f(sigma**2 + 1), _f(-sigma / (sigma**2 + 1) ** 0.5)
        else:
            p, q = 0.0, 1.0
        noise = 0.0
        if ancestral:
            up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
            down = (sigma_next**2 - up**2) ** 0.5
            dt, noise = _f(down - sigma), _f(up)
        else:
            dt = _f(sigma_next - sigma)
        # x + dt * (x - x0) / sigma
        coefs.append(_Lin(x=1 + dt * (1 - p) / s, out=-dt * q / s, noise=noise))
    return dict(timesteps=timesteps[begin:], sigmas=sigmas[begin:], init_noise_sigma=_f(init),
                input_scale=scales, coefs=coefs, advance=_advance_lin,
                noise_coefs=[(1.0, _f(sigmas[k])) for k in range(begin, len(timesteps))])


def _build_ddim(c, n, begin):
    ac = _alphas_cumprod(c)
    final = torch.tensor(1.0) if c.set_alpha_to_one else ac[0]
    timesteps = _spaced(c, n, np.int64)
    ratio = c.num_train_timesteps // n
    coefs = []
    for t in timesteps[begin:].tolist():
        a = ac[t]
        a_prev = ac[t - ratio] if t - ratio >= 0 else final
        b = 1 - a
        p, q = _x0_coefs(c.prediction_type, _f(a**0.5), _f(b**0.5))
        if c.prediction_type == "epsilon":  # the direction term uses the (unclipped) eps estimate
            ex, eo = 0.0, 1.0
        elif c.prediction_type == "v_prediction":
            ex, eo = _f(b**0.5), _f(a**0.5)
        else:
            ex, eo = 1 / _f(b**0.5), -_f(a**0.5) / _f(b**0.5)
        std = torch.tensor(0.0)
        if c.eta:  # sigma_t = eta * sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev)), DDIM eq. 16
            std = c.eta * ((1 - a_prev) / b * (1 - a / a_prev)) ** 0.5
        direction = _f((1 - a_prev - std**2) ** 0.5)
        coefs.append(_lin_with_x0(c, direction * ex, direction * eo, _f(a_prev**0.5), p, q, noise=_f(std)))
    return _alpha_schedule(c, ac, timesteps, begin, coefs)


def _lin_with_x0(c, x, out, x0, p, q, noise=0.0) -> _Lin:
    """x*x + out*out + x0*x0 with x0 = x*p + out*q: folded unless x0 is clipped."""
    if c.clip_sample or c.thresholding:
        return _Lin(x=x, out=out, noise=noise, x0=x0, x0_x=p, x0_out=q)
    return _Lin(x=x + x0 * p, out=out + x0 * q, noise=noise)


def _alpha_schedule(c, ac, timesteps, begin, coefs, **extra):
    noise_coefs = [(_f(ac[t] ** 0.5), _f((1 - ac[t]) ** 0.5)) for t in timesteps[begin:].tolist()]
    return dict(dict(timesteps=torch.from_numpy(timesteps[begin:].astype(np.int64)), sigmas=None,
                     init_noise_sigma=1.0, input_scale=[None] * len(coefs), coefs=coefs,
                     advance=_advance_lin, noise_coefs=noise_coefs), **extra)


def _build_ddpm(c, n, begin):
    if c.variance_type not in ("fixed_small", "fixed_small_log", "fixed_large"):
        raise ValueError(f"scheduler_config: variance_type {c.variance_type!r} is not supported by sampler 'ddpm'")
    ac = _alphas_cumprod(c)
    one = torch.tensor(1.0)
    timesteps = _spaced(c, n, np.int64)
    coefs = []
    for k in range(begin, len(timesteps)):
        t = int(timesteps[k])
        prev_t = int(timesteps[k + 1]) if k + 1 < len(timesteps) else -1
        a = ac[t]
        a_prev = ac[prev_t] if prev_t >= 0 else one
        b, b_prev = 1 - a, 1 - a_prev
        cur_alpha = a / a_prev
        cur_beta = 1 - cur_alpha
        p, q = _x0_coefs(c.prediction_type, _f(a**0.5), _f(b**0.5))
        x0_coef = _f(a_prev**0.5 * cur_beta / b)
        x_coef = _f(cur_alpha**0.5 * b_prev / b)
        std = 0.0
        if t > 0:
            var = torch.clamp((1 - a_prev) / (1 - a) * cur_beta, min=1e-20)
            if c.variance_type == "fixed_small":
                std = _f(var**0.5)
            elif c.variance_type == "fixed_small_log":
                std = _f(torch.exp(0.5 * torch.log(var)))
            else:
                std = _f(cur_beta**0.5)
        coefs.append(_lin_with_x0(c, x_coef, 0.0, x0_coef, p, q, noise=std))
    return _alpha_schedule(c, ac, timesteps, begin, coefs)


def _build_lcm(c, n, begin):
    orig = c.original_inference_steps
    N = c.num_train_timesteps
    if orig > N:
        raise ValueError(f"scheduler_config: original_inference_steps {orig} > num_train_timesteps {N}")
    if n > orig:
        raise ValueError(f"num_inference_steps {n} cannot exceed the LCM's original_inference_steps {orig}")
    ac = _alphas_cumprod(c)
    final = torch.tensor(1.0) if c.set_alpha_to_one else ac[0]
    origin = (np.asarray(list(range(1, orig + 1))) * (N // orig) - 1)[::-1].copy()
    timesteps = origin[np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)]
    coefs = []
    for k in range(begin, n):
        t = torch.tensor(int(timesteps[k]))
        prev_t = int(timesteps[k + 1]) if k + 1 < n else int(t)
        a = ac[t]
        a_prev = ac[prev_t] if prev_t >= 0 else final
        p, q = _x0_coefs(c.prediction_type, _f(a.sqrt()), _f((1 - a).sqrt()))
        scaled = t * c.timestep_scaling
        c_skip = _f(0.5**2 / (scaled**2 + 0.5**2))
        c_out = _f(scaled / (scaled**2 + 0.5**2) ** 0.5)
        # denoised = x0*c_out + x*c_skip; then re-noised to the next timestep except at the last step
        keep, noise = (_f(a_prev.sqrt()), _f((1 - a_prev).sqrt())) if k != n - 1 else (1.0, 0.0)
        coefs.append(_lin_with_x0(c, c_skip * keep, 0.0, c_out * keep, p, q, noise=noise))
    return _alpha_schedule(c, ac, timesteps, begin, coefs)


def _build_pndm(c, n, begin):
    ac = _alphas_cumprod(c)
    final = torch.tensor(1.0) if c.set_alpha_to_one else ac[0]
    N, ratio = c.num_train_timesteps, c.num_train_timesteps // n
    ascending = _spaced(c, n, np.float64)[::-1]
    plms = np.concatenate([ascending[:-1], ascending[-2:-1], ascending[-1:]])[::-1].astype(np.int64)
    coefs = []
    for counter, t in enumerate(plms[begin:].tolist()):
        prev_t = t - ratio
        if counter == 1:  # second half of the first step: redo it from the start sample
            prev_t, t = t, t + ratio
        combo = {0: ((1.0,), 0.0), 1: ((0.5,), 0.5), 2: ((-0.5, 1.5), 0.0),
                 3: ((5 / 12, -16 / 12, 23 / 12), 0.0)}.get(counter, ((-9 / 24, 37 / 24, -59 / 24, 55 / 24), 0.0))
        a = ac[t]
        a_prev = ac[prev_t] if prev_t >= 0 else final
        b, b_prev = 1 - a, 1 - a_prev
        x_c = _f((a_prev / a) ** 0.5)
        eps_c = -_f(a_prev - a) / _f(a * b_prev**0.5 + (a * b * a_prev) ** 0.5)
        if c.prediction_type == "v_prediction":  # eps = sqrt(a)*v + sqrt(b)*x, applied to the combination
            x_c, eps_c = x_c + eps_c * _f(b**0.5), eps_c * _f(a**0.5)
        coefs.append(_Plms(append=counter != 1, weights=combo[0], w_out=combo[1], from_start=counter == 1,
                           save_start=counter == 0, x=x_c, eps=eps_c))
    return _alpha_schedule(c, ac, plms, begin, coefs, advance=_advance_plms)


def _dpm_alpha_sigma(sigma):
    alpha = 1 / (sigma**2 + 1) ** 0.5
    return alpha, sigma * alpha


def _dpm_lambda(sigma):
    alpha, s = _dpm_alpha_sigma(sigma)
    return torch.log(alpha) - torch.log(s)


def _dpm_sigmas(c, ac, n):
    _unsupported(c, "dpmpp_2m", use_exponential_sigmas=False, use_beta_sigmas=False, use_lu_lambdas=False,
                 use_flow_sigmas=False, use_dynamic_shifting=False, variance_type=None)
    N = c.num_train_timesteps
    lambdas = torch.log(torch.sqrt(ac)) - torch.log(torch.sqrt(1 - ac))
    last = int(N - torch.searchsorted(torch.flip(lambdas, [0]), c.lambda_min_clipped))
    if c.timestep_spacing == "linspace":
        timesteps = np.linspace(0, last - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
    elif c.timestep_spacing == "leading":
        timesteps = (np.arange(0, n + 1) * (last // (n + 1))).round()[::-1][:-1].copy().astype(np.int64)
        timesteps += c.steps_offset
    else:
        timesteps = np.arange(last, 0, -N / n).round().copy().astype(np.int64) - 1
    sigmas = (((1 - ac) / ac) ** 0.5).numpy()
    if c.use_karras_sigmas:
        flipped = np.flip(sigmas).copy()
        karras = _karras(c, flipped[-1].item(), flipped[0].item(), n)
        timesteps = _sigma_to_t(karras, np.log(sigmas))
        if c.beta_schedule != "squaredcos_cap_v2":
            timesteps = timesteps.round()
        sigmas = karras
    else:
        sigmas = np.interp(timesteps, np.arange(0, len(sigmas)), sigmas)
    sigmas = np.concatenate([sigmas, [_final_sigma(c, ac)]]).astype(np.float32)
    return torch.from_numpy(timesteps).to(torch.int64), torch.from_numpy(sigmas)


def _build_dpm(c, n, begin):
    solver_type = "midpoint" if c.solver_type in ("logrho", "bh1", "bh2") else c.solver_type
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"scheduler_config: solver_type {c.solver_type!r} is not supported")
    ac = _alphas_cumprod(c, pin_terminal=True)
    timesteps, sigmas = _dpm_sigmas(c, ac, n)
    n = len(timesteps)
    coefs = []
    for k in range(begin, n):
        alpha_s, sigma_s = _dpm_alpha_sigma(sigmas[k])
        alpha_t, sigma_t = _dpm_alpha_sigma(sigmas[k + 1])
        if c.prediction_type == "epsilon":  # denoised = x*d_x + out*d_out
            d_x, d_out = 1 / _f(alpha_s), -_f(sigma_s) / _f(alpha_s)
        elif c.prediction_type == "v_prediction":
            d_x, d_out = _f(alpha_s), -_f(sigma_s)
        else:
            d_x, d_out = 0.0, 1.0
        h = _dpm_lambda(sigmas[k + 1]) - _dpm_lambda(sigmas[k])
        phi = alpha_t * (torch.exp(-h) - 1.0)
        final = k == n - 1 and (c.euler_at_final or (c.lower_order_final and n < 15)
                                or c.final_sigmas_type == "zero")
        if k == begin or final:  # first order: no usable history yet, or the final step
            coefs.append(_Dpm(d_x, d_out, x=_f(sigma_t / sigma_s), d=-_f(phi), dd=0.0))
            continue
        r0 = (_dpm_lambda(sigmas[k]) - _dpm_lambda(sigmas[k - 1])) / h
        if solver_type == "midpoint":  # D1 = (d - d_prev) / r0
            g = -_f(0.5 * phi) * _f(1.0 / r0)
        else:
            g = _f(alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)) * _f(1.0 / r0)
        coefs.append(_Dpm(d_x, d_out, x=_f(sigma_t / sigma_s), d=-_f(phi), dd=g))
    noise_coefs = [tuple(_f(v) for v in _dpm_alpha_sigma(sigmas[k])) for k in range(begin, n)]
    return dict(timesteps=timesteps[begin:], sigmas=sigmas[begin:], init_noise_sigma=1.0,
                input_scale=[None] * len(coefs), coefs=coefs, advance=_advance_dpm, noise_coefs=noise_coefs)


_BUILDERS = {
    "euler": lambda c, n, b: _build_euler(c, n, b, ancestral=False),
    "euler_a": lambda c, n, b: _build_euler(c, n, b, ancestral=True),
    "ddim": _build_ddim,
    "ddpm": _build_ddpm,
    "dpmpp_2m": _build_dpm,
    "dpmpp_2m_karras": _build_dpm,
    "lcm": _build_lcm,
    "pndm": _build_pndm,
}


def _make_clip(c: SimpleNamespace) -> Callable | None:
    if getattr(c, "thresholding", False):
        ratio, max_value = c.dynamic_thresholding_ratio, c.sample_max_value
        return lambda x0: _dynamic_threshold(x0, ratio, max_value)
    if getattr(c, "clip_sample", False):
        r = c.clip_sample_range
        return lambda x0: x0.clamp(-r, r)
    return None


def _dynamic_threshold(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Imagen's dynamic thresholding: clamp each sample to its `ratio` quantile of |x0|, rescale."""
    flat = x0.float().reshape(x0.shape[0], -1)
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)
    return (flat.clamp(-s, s) / s).reshape(x0.shape).to(x0.dtype)


def _first_step(n: int, strength: float | None) -> int:
    """Index of the first step kept for img2img, as diffusers' get_timesteps() computes it."""
    if strength is None:
        return 0
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength!r}")
    kept = min(int(n * strength), n)
    if kept < 1:
        raise ValueError(f"num_inference_steps * strength = {n} * {strength} keeps {kept} steps; "
                         f"it must be >= 1 (int(num_inference_steps * strength) steps are run)")
    return n - kept


def build_schedule(name: str, scheduler_config: dict, num_inference_steps: int, *,
                   strength: float | None = None, device=None, eta: float = 0.0) -> Schedule:
    """Resolve sampler `name` on a diffusers scheduler config for `num_inference_steps` steps.

    strength (img2img): keep the last int(num_inference_steps * strength) steps, as diffusers'
    img2img pipelines do; `add_noise` then noises clean latents to the first kept timestep.
    eta ("ddim" only, in [0, 1]): DDIMScheduler.step's eta; 0 is deterministic DDIM, 1 adds DDPM-like
    noise at every step (a stochastic schedule: `needs_noise`).
    """
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be a number in [0, 1], got {eta!r}")
    if eta and name != "ddim":
        raise ValueError(f"eta applies to the 'ddim' sampler only, not {name!r}")
    if name not in SAMPLER_NAMES:
        raise ValueError(f"unknown sampler name {name!r}; choose one of {SAMPLER_NAMES}")
    n = num_inference_steps
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"num_inference_steps must be an int, got {type(n).__name__}")
    c = _resolve_config(name, scheduler_config)
    c.eta = float(eta)
    if not 1 <= n <= c.num_train_timesteps:
        raise ValueError(f"num_inference_steps must be in [1, {c.num_train_timesteps}], got {n}")
    begin = _first_step(int(n), strength)
    try:
        with np.errstate(divide="ignore", invalid="ignore"):
            b = _BUILDERS[name](c, int(n), begin)
    except IndexError:  # e.g. "leading" spacing + steps_offset=1 at n = num_train_timesteps reaches t = N
        raise ValueError(
            f"num_inference_steps={n} is too many for sampler {name!r} with timestep_spacing="
            f"{getattr(c, 'timestep_spacing', None)!r} and steps_offset={getattr(c, 'steps_offset', 0)}: the "
            f"schedule reaches a timestep >= num_train_timesteps ({c.num_train_timesteps}); use fewer steps") from None
    return Schedule(name=name, timesteps=b["timesteps"].to(device), init_noise_sigma=b["init_noise_sigma"],
                    prediction_type=c.prediction_type, sigmas=b["sigmas"], _input_scale=tuple(b["input_scale"]),
                    _coefs=tuple(b["coefs"]), _advance=b["advance"], _noise_coefs=tuple(b["noise_coefs"]),
                    _clip=_make_clip(c))
