"""Noise schedulers as data: DDIM, DPM-Solver++ 2M, LCM (multistep consistency sampling) and Euler with every
per-step coefficient precomputed on the host, so a sampler is a loop over a pure `step`. `make_schedule(...,
length=L)` pads the per-step arrays to a fixed length L and says in `count` how many steps are real: the step count,
strength, Karras sigmas and DDIM eta are then all data, and the compiled loop (pia_jax.sampling.loop: a `fori_loop`
with a dynamic trip count) compiles once per scheduler kind and shape, whatever they are.

The parity target is diffusers' DDIMScheduler, DPMSolverMultistepScheduler, LCMScheduler and EulerDiscreteScheduler
(same config keys, same timesteps, same float32 formulas; tests/test_schedulers.py runs them). Sampling convention:
sample = alpha·x0 + sigma·ε at every step (Euler's σ-scaled samples are mapped onto it, see EulerSchedule).
Not implemented (`SchedulerConfig` rejects their settings where it has the key): dynamic thresholding,
zero-terminal-SNR rescaling, trained betas, learned variance, SDE and third-order solvers, exponential/beta/lu/flow sigmas, Euler's churn and fractional
timesteps (linspace spacing, Karras sigmas), LCM's custom timesteps and guidance embedding (`timestep_cond`).
"""

import dataclasses
import functools
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

# The scheduler's config is data stored with a model (config.json), so it is defined beside the model configs.
from pia_jax.models.config import PIA_DDIM, SCHEDULER_PRESETS, SchedulerConfig  # noqa: F401
from pia_jax.models.config import SCHEDULER_KINDS as KINDS


def to_dict(config: SchedulerConfig) -> dict:
    return dataclasses.asdict(config)


def from_dict(data: dict) -> SchedulerConfig:
    return SchedulerConfig(**data)


def _torch_linspace(start: float, end: float, n: int) -> np.ndarray:
    """torch.linspace(..., dtype=float32) to the bit: torch's CPU kernel fills the first half from `start` and the
    second from `end`, each value one fused multiply-add (exact in float64, then rounded once)."""
    start, end = np.float32(start), np.float32(end)
    step = np.float64((end - start) / np.float32(n - 1))
    i = np.arange(n)
    first = np.float64(start) + step * i[: n // 2]
    second = np.float64(end) - step * (n - 1 - i[n // 2:])
    return np.concatenate([first, second]).astype(np.float32)


@functools.lru_cache(maxsize=32)
def alphas_cumprod(config: SchedulerConfig) -> np.ndarray:
    """ᾱ_t for t = 0 .. num_train_timesteps-1, float32 exactly as diffusers computes it (read-only, cached)."""
    n = config.num_train_timesteps
    if config.beta_schedule == "linear":
        betas = _torch_linspace(config.beta_start, config.beta_end, n)
    elif config.beta_schedule == "scaled_linear":
        betas = _torch_linspace(config.beta_start ** 0.5, config.beta_end ** 0.5, n) ** 2
    else:  # squaredcos_cap_v2 (GLIDE's cosine schedule), computed in Python floats
        def alpha_bar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)], np.float32)
    out = np.cumprod((np.float32(1) - betas).astype(np.float64)).astype(np.float32)  # torch accumulates in float64
    out.setflags(write=False)
    return out


def _timesteps(config: SchedulerConfig, kind: str, n: int) -> np.ndarray:
    """diffusers' `set_timesteps(n)` spacings (DPM-Solver spaces n+1 points and drops the last, except 'trailing')."""
    T, spacing = config.num_train_timesteps, config.timestep_spacing
    m = n + (kind == "dpmpp_2m")
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, m).round()[::-1][:n]
    elif spacing == "leading":
        ts = (np.arange(m) * (T // m)).round()[::-1][:n] + config.steps_offset
    else:
        ts = np.round(np.arange(T, 0, -T / n)) - 1
    return ts.astype(np.int64)


def _karras_timesteps(config: SchedulerConfig, sigmas: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Karras et al. (2022) sigmas (rho 7) between the training extremes, and the fractional timesteps they sit at
    (interpolated in log sigma), as diffusers computes both."""
    rho = 7.0
    lo, hi = sigmas[0].item() ** (1 / rho), sigmas[-1].item() ** (1 / rho)
    karras = (hi + np.linspace(0, 1, n) * (lo - hi)) ** rho
    log_sigmas = np.log(sigmas)
    log_sigma = np.log(np.maximum(karras, 1e-10))
    low = np.cumsum(log_sigma - log_sigmas[:, None] >= 0, axis=0).argmax(axis=0).clip(max=len(sigmas) - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    t = (1 - w) * low + w * (low + 1)
    if config.beta_schedule != "squaredcos_cap_v2":
        t = t.round()
    return karras, t.astype(np.int64)


def _pytree(*meta):
    """Registers a dataclass as a pytree: its arrays are leaves, the `meta` fields static (part of jit's cache key)."""
    def register(cls):
        data = [f.name for f in dataclasses.fields(cls) if f.name not in meta]
        return jax.tree_util.register_dataclass(cls, data_fields=data, meta_fields=list(meta))
    return register


@_pytree("prediction_type", "clip", "stochastic")
@dataclass(frozen=True)
class DDIMSchedule:
    """Per-step (S,) arrays; x_prev = alpha_prev·x0 + direction·ε + std·noise. The first `count` entries are the
    steps taken; any further ones are padding (copies of the last step) that a sampler never runs."""
    timesteps: jax.Array   # int32, the model's timestep input
    alpha: jax.Array       # sqrt(ᾱ_t)
    sigma: jax.Array       # sqrt(1 - ᾱ_t)
    alpha_prev: jax.Array  # sqrt(ᾱ_prev), ᾱ_prev = 1 (or ᾱ_0) after the last step
    direction: jax.Array   # sqrt(1 - ᾱ_prev - std²)
    std: jax.Array         # η · sqrt((1-ᾱ_prev)/(1-ᾱ_t) · (1 - ᾱ_t/ᾱ_prev))
    count: jax.Array       # int32 scalar: the number of steps taken
    prediction_type: str = "epsilon"
    clip: float | None = None
    # Whether `step` adds std·noise (and so needs noise). True for eta > 0, and always for padded schedules, so
    # that eta is data there: with eta = 0, std = 0 and x + 0·noise = x exactly.
    stochastic: bool = False


@_pytree("prediction_type")
@dataclass(frozen=True)
class DPMSchedule:
    """Per-step (S,) arrays; x_next = ratio·x - phi·x0 + c1·(x0 - x0_prev) (DPM-Solver++ in its data form)."""
    timesteps: jax.Array  # int32, the model's timestep input
    alpha: jax.Array      # 1/sqrt(1+σ²), σ = sqrt((1-ᾱ)/ᾱ) this step's noise level (at its timestep, or Karras')
    sigma: jax.Array      # σ·alpha
    ratio: jax.Array      # sigma_next / sigma
    phi: jax.Array        # alpha_next·(exp(-h) - 1), h = λ_next - λ, λ = log(alpha/sigma)
    c1: jax.Array         # weight of the second-order difference; 0 on first-order steps
    count: jax.Array      # int32 scalar: the number of steps taken (the first `count` entries; the rest padding)
    prediction_type: str = "epsilon"


@_pytree("prediction_type", "clip")
@dataclass(frozen=True)
class LCMSchedule:
    """Per-step (S,) arrays; x_prev = alpha_prev·denoised + sigma_prev·noise with denoised = c_skip·x + c_out·x0, the
    consistency model's boundary-condition parametrization (c_skip -> 1, c_out -> 0 as t -> 0). Every step but the
    last draws fresh noise; the last has alpha_prev = 1 and sigma_prev = 0, so it returns `denoised` exactly (1·d +
    0·noise = d), as diffusers' LCMScheduler does."""
    timesteps: jax.Array   # int32, the model's timestep input
    alpha: jax.Array       # sqrt(ᾱ_t)
    sigma: jax.Array       # sqrt(1 - ᾱ_t)
    c_skip: jax.Array      # σ_data² / ((t·scaling)² + σ_data²), σ_data = 0.5
    c_out: jax.Array       # t·scaling / sqrt((t·scaling)² + σ_data²)
    alpha_prev: jax.Array  # sqrt(ᾱ) at the next step's timestep; 1 after the last step
    sigma_prev: jax.Array  # sqrt(1 - ᾱ) there; 0 after the last step
    count: jax.Array       # int32 scalar: the number of steps taken (the first `count` entries; the rest padding)
    prediction_type: str = "epsilon"
    clip: float | None = None
    stochastic = True  # not a field: the sampler always passes step noise (loop.denoise reads this)


@_pytree("prediction_type")
@dataclass(frozen=True)
class EulerSchedule:
    """Per-step (S,) arrays for diffusers' EulerDiscreteScheduler, in our convention x = alpha·x0 + sigma·ε.

    diffusers' Euler works on z = x0 + σ·ε with σ = sqrt((1-ᾱ)/ᾱ): the model sees scale_model_input(z) = z/sqrt(1+σ²),
    which is our x (alpha = 1/sqrt(1+σ²), sigma = σ·alpha); its step is z_next = z + (σ_next - σ)·(z - x̂0)/σ. With
    z = x/alpha, (z - x̂0)/σ is exactly the ε that x0_eps gives for any prediction type, so z_next = x̂0 + σ_next·ε and
    x_next = z_next/sqrt(1+σ_next²) = alpha_next·x̂0 + sigma_next·ε: Euler is DDIM (eta 0) on its own σ grid. After
    the last step σ_next = 0 (final_sigmas_type 'zero'), alpha_next = 1, and x = z, the latents diffusers decodes.
    The start differs: diffusers draws z = init_noise_sigma·noise, where init_noise_sigma is σ_max for 'trailing'
    (not sqrt(1+σ_max²) as for 'leading'), so the first x is init_scale·noise = σ_max/sqrt(1+σ_max²)·noise =
    sqrt(1-ᾱ_999)·noise, not noise (`initial_noise`)."""
    timesteps: jax.Array   # int32, the model's timestep input
    alpha: jax.Array       # 1/sqrt(1+σ²)
    sigma: jax.Array       # σ·alpha
    alpha_next: jax.Array  # the same at the next σ (1 at σ = 0)
    sigma_next: jax.Array
    init_scale: jax.Array  # float32 scalar: the first latents are init_scale·noise (when not starting from an image)
    count: jax.Array       # int32 scalar: the number of steps taken
    prediction_type: str = "epsilon"


Schedule = DDIMSchedule | DPMSchedule | LCMSchedule | EulerSchedule


def check_steps(config: SchedulerConfig, num_inference_steps: int, strength: float = 1.0, kind: str = "ddim") -> int:
    """Raises ValueError unless `num_inference_steps` and `strength` leave at least one step of scheduler `kind`;
    returns the index of the first step taken (diffusers' `get_timesteps`: the last int(steps·strength) steps are
    kept; LCM instead takes all its steps from the first int(original steps·strength) original steps)."""
    n = num_inference_steps
    if not 0 < n <= config.num_train_timesteps:
        raise ValueError(f"steps must be in [1, {config.num_train_timesteps}] (the model's training timesteps), "
                         f"got {n}")
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    if kind == "lcm":
        original = config.original_inference_steps
        if n > int(original * strength):
            raise ValueError(f"lcm takes its {n} steps from the first int({original} * strength {strength}) = "
                             f"{int(original * strength)} of its {original} original steps: lower --steps or raise "
                             "--strength (original_inference_steps is in the model's config.json)")
        return 0
    if kind == "euler" and (config.timestep_spacing == "linspace" or config.use_karras_sigmas):
        raise ValueError("euler with 'linspace' spacing or Karras sigmas puts the model at fractional timesteps, "
                         "which pia_jax does not implement; use 'leading' or 'trailing' spacing without --karras")
    start = n - min(int(n * strength), n)
    if start >= n:
        raise ValueError(f"strength {strength} leaves no step of {n} (int(steps * strength) = 0); raise --strength "
                         f"to at least {1 / n:.3g} or --steps")
    return start


def make_schedule(kind: str, config: SchedulerConfig, num_inference_steps: int, strength: float = 1.0,
                  length: int | None = None) -> Schedule:
    """The sampling schedule of `num_inference_steps`; `strength` < 1 keeps only the last int(steps·strength) steps,
    as diffusers' img2img and PIA pipelines do (start from the image noised with `add_noise_start`; LCM: see
    check_steps). `length` pads the per-step arrays to that many entries (at least the steps taken), so schedules of
    any step count share one shape; a padded DDIM schedule is always `stochastic` (see DDIMSchedule)."""
    n = num_inference_steps
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    start = check_steps(config, n, strength, kind)
    if length is not None and length < n - start:
        raise ValueError(f"length {length} is shorter than the {n - start} steps taken")
    pad = 0 if length is None else length - (n - start)

    def taken(a, dtype=np.float32):  # the steps taken, padded with copies of the last, as device arrays
        return jnp.asarray(np.pad(np.asarray(a)[start:].astype(dtype), (0, pad), mode="edge"))

    count = jnp.asarray(n - start, jnp.int32)
    if kind == "lcm":
        return _lcm(config, _lcm_timesteps(config, n, strength), taken, count)
    ts = _timesteps(config, kind, n)
    if kind == "ddim":
        return _ddim(config, ts, taken, count, stochastic=config.eta > 0 or length is not None)
    if kind == "euler":
        return _euler(config, ts, start, taken, count)
    return _dpm(config, ts, start, taken, count)


def _ddim(config: SchedulerConfig, ts, taken, count, stochastic: bool) -> DDIMSchedule:
    acp = alphas_cumprod(config)
    prev = ts - config.num_train_timesteps // len(ts)  # diffusers' rule for every spacing, so also for 'linspace'
    final = np.float32(1) if config.set_alpha_to_one else acp[0]
    a, a_prev = acp[ts], np.where(prev >= 0, acp[np.maximum(prev, 0)], final)
    variance = (1 - a_prev) / (1 - a) * (1 - a / a_prev)
    std = np.float32(config.eta) * variance ** 0.5
    return DDIMSchedule(
        taken(ts, np.int32), taken(a ** 0.5), taken((1 - a) ** 0.5), taken(a_prev ** 0.5),
        taken((1 - a_prev - std ** 2) ** 0.5), taken(std), count, config.prediction_type,
        config.clip_sample_range if config.clip_sample else None, stochastic)


def _final_sigma(config: SchedulerConfig) -> float:
    """Where the last step lands: σ = 0 (it returns its x0 prediction) or the smallest training σ."""
    acp = alphas_cumprod(config)
    return 0.0 if config.final_sigmas_type == "zero" else ((1 - acp[0]) / acp[0]) ** 0.5


def _sigmas(config: SchedulerConfig, ts) -> np.ndarray:
    """σ = sqrt((1-ᾱ)/ᾱ) at the timesteps, then the final σ: (N+1,) float32."""
    acp = alphas_cumprod(config)
    sigmas = np.interp(ts, np.arange(len(acp)), ((1 - acp) / acp) ** 0.5)  # clamped (leading + offset can give T)
    return np.append(sigmas, _final_sigma(config)).astype(np.float32)


def _dpm(config: SchedulerConfig, ts, start: int, taken, count) -> DPMSchedule:
    if config.use_karras_sigmas:
        acp = alphas_cumprod(config)
        karras, ts = _karras_timesteps(config, ((1 - acp) / acp) ** 0.5, len(ts))
        sigmas = np.append(karras, _final_sigma(config)).astype(np.float32)
    else:
        sigmas = _sigmas(config, ts)
    alpha = 1 / (sigmas ** 2 + 1) ** 0.5
    sigma = sigmas * alpha
    N = len(ts)
    with np.errstate(divide="ignore", invalid="ignore"):  # λ = inf at σ = 0; 0·inf where masked out below
        lam = np.log(alpha) - np.log(sigma)
        h = lam[1:] - lam[:-1]
        r0 = np.roll(h, 1) / h  # the previous step's h over this one's (wraps at k = 0, which is first order)
        phi = alpha[1:] * (np.exp(-h) - 1)
        if config.solver_type == "midpoint":
            c1 = -0.5 * phi * (1 / r0)
        else:
            c1 = alpha[1:] * ((np.exp(-h) - 1) / h + 1) * (1 / r0)
    # First order on the first step taken, and on the last one where diffusers lowers it.
    k = np.arange(N)
    lower_final = (config.euler_at_final or (config.lower_order_final and N < 15)
                   or config.final_sigmas_type == "zero")
    first = (config.solver_order == 1) | (k == start) | ((k == N - 1) & lower_final)
    return DPMSchedule(
        taken(ts, np.int32), taken(alpha[:-1]), taken(sigma[:-1]), taken(sigma[1:] / sigma[:-1]), taken(phi),
        taken(np.where(first, 0, c1)), count, config.prediction_type)


def _euler(config: SchedulerConfig, ts, start: int, taken, count) -> EulerSchedule:
    sigmas = _sigmas(config, ts)
    alpha = 1 / (sigmas ** 2 + 1) ** 0.5
    # diffusers' init_noise_sigma (over the whole schedule), then scale_model_input at the first step taken
    init_sigma = sigmas.max() if config.timestep_spacing == "trailing" else (sigmas.max() ** 2 + 1) ** 0.5
    return EulerSchedule(taken(ts, np.int32), taken(alpha[:-1]), taken(sigmas[:-1] * alpha[:-1]), taken(alpha[1:]),
                         taken(sigmas[1:] * alpha[1:]), jnp.asarray(init_sigma * alpha[start], jnp.float32), count,
                         config.prediction_type)


def _lcm_timesteps(config: SchedulerConfig, n: int, strength: float) -> np.ndarray:
    """diffusers' LCMScheduler.set_timesteps(n, strength=...): n of the original steps' timesteps (every
    T // original_inference_steps-th, ending at T-1, the first int(original·strength) of them), evenly spaced by
    index from the noisiest."""
    k = config.num_train_timesteps // config.original_inference_steps
    origin = (np.arange(1, int(config.original_inference_steps * strength) + 1) * k - 1)[::-1]
    return origin[np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)]


def _lcm(config: SchedulerConfig, ts, taken, count) -> LCMSchedule:
    acp = alphas_cumprod(config)
    a = acp[ts]
    a_prev = np.append(acp[ts[1:]], np.float32(1))  # no noise after the last step: alpha 1, sigma 0
    scaled = ts.astype(np.float32) * np.float32(config.timestep_scaling)
    data = np.float32(0.5 ** 2)  # σ_data² of the consistency-model parametrization
    c_skip = data / (scaled ** 2 + data)
    c_out = scaled / (scaled ** 2 + data) ** 0.5
    return LCMSchedule(taken(ts, np.int32), taken(a ** 0.5), taken((1 - a) ** 0.5), taken(c_skip), taken(c_out),
                       taken(a_prev ** 0.5), taken((1 - a_prev) ** 0.5), count, config.prediction_type,
                       config.clip_sample_range if config.clip_sample else None)


def init_state(schedule: Schedule, sample: jax.Array):
    """The solver's carry: the previous x0 prediction (float32) for DPM-Solver++, nothing for the others."""
    return jnp.zeros(sample.shape, jnp.float32) if isinstance(schedule, DPMSchedule) else ()


def initial_noise(schedule: Schedule, noise: jax.Array) -> jax.Array:
    """The first latents of a sampler started from noise: the noise itself, or init_scale·noise for Euler (see
    EulerSchedule)."""
    if isinstance(schedule, EulerSchedule):
        return (schedule.init_scale * noise.astype(jnp.float32)).astype(noise.dtype)
    return noise


def x0_eps(prediction_type, out, x, alpha, sigma):
    """(x0, eps) from a model's output at x = alpha x0 + sigma eps, for any prediction type."""
    if prediction_type == "epsilon":
        return (x - sigma * out) / alpha, out
    if prediction_type == "v_prediction":
        return alpha * x - sigma * out, alpha * out + sigma * x
    return out, (x - alpha * out) / sigma


def step(schedule: Schedule, state, i, model_output: jax.Array, sample: jax.Array, noise: jax.Array | None = None):
    """One denoising step i (a Python or traced int) -> (sample after step i, new state). Float32 inside, the sample's
    dtype out. DDIM with eta > 0 and LCM need `noise` (standard normal, the sample's shape)."""
    x, out = sample.astype(jnp.float32), model_output.astype(jnp.float32)
    x0, eps = x0_eps(schedule.prediction_type, out, x, schedule.alpha[i], schedule.sigma[i])
    if isinstance(schedule, DPMSchedule):
        prev = schedule.ratio[i] * x - schedule.phi[i] * x0 + schedule.c1[i] * (x0 - state)
        return prev.astype(sample.dtype), x0
    if isinstance(schedule, EulerSchedule):
        return (schedule.alpha_next[i] * x0 + schedule.sigma_next[i] * eps).astype(sample.dtype), state
    if schedule.clip is not None:
        x0 = jnp.clip(x0, -schedule.clip, schedule.clip)
    if isinstance(schedule, LCMSchedule):
        if noise is None:
            raise ValueError("LCM needs noise")
        denoised = schedule.c_out[i] * x0 + schedule.c_skip[i] * x
        prev = schedule.alpha_prev[i] * denoised + schedule.sigma_prev[i] * noise.astype(jnp.float32)
        return prev.astype(sample.dtype), state
    prev = schedule.alpha_prev[i] * x0 + schedule.direction[i] * eps
    if schedule.stochastic:
        if noise is None:
            raise ValueError("DDIM with eta > 0 needs noise")
        prev = prev + schedule.std[i] * noise.astype(jnp.float32)
    return prev.astype(sample.dtype), state


def _alpha_at(alphas, timesteps, ndim: int) -> jax.Array:
    """ᾱ at `timesteps` (one per leading entry), float32, shaped to broadcast over an array of `ndim` dims."""
    acp = jnp.asarray(alphas_cumprod(alphas) if isinstance(alphas, SchedulerConfig) else alphas, jnp.float32)
    return acp[jnp.asarray(timesteps)].reshape((-1,) + (1,) * (ndim - 1))


def add_noise(alphas, x0: jax.Array, noise: jax.Array, timesteps) -> jax.Array:
    """Forward diffusion sqrt(ᾱ_t)·x0 + sqrt(1-ᾱ_t)·noise as diffusers' DDPM/DDIM `add_noise`; `alphas` is a
    SchedulerConfig or its alphas_cumprod; `timesteps` an int or one per leading (batch) entry."""
    a = _alpha_at(alphas, timesteps, x0.ndim)
    return (jnp.sqrt(a) * x0.astype(jnp.float32) + jnp.sqrt(1 - a) * noise.astype(jnp.float32)).astype(x0.dtype)


def training_target(config: SchedulerConfig, x0: jax.Array, noise: jax.Array, timesteps) -> jax.Array:
    """What a model of `config.prediction_type` learns to output at add_noise(config, x0, noise, timesteps): the
    noise, the velocity sqrt(ᾱ_t)·noise - sqrt(1-ᾱ_t)·x0 (diffusers' `get_velocity`), or x0 ("sample")."""
    if config.prediction_type == "epsilon":
        return noise.astype(jnp.float32)
    if config.prediction_type == "sample":
        return x0.astype(jnp.float32)
    a = _alpha_at(config, timesteps, x0.ndim)
    return jnp.sqrt(a) * noise.astype(jnp.float32) - jnp.sqrt(1 - a) * x0.astype(jnp.float32)


def add_noise_start(schedule: Schedule, x0: jax.Array, noise: jax.Array) -> jax.Array:
    """x0 noised to the schedule's first step (the img2img start): diffusers' `add_noise` at timesteps[0]; for
    DPM-Solver this uses the step's own σ (with Karras sigmas that is not ᾱ at the rounded timestep)."""
    y = schedule.alpha[0] * x0.astype(jnp.float32) + schedule.sigma[0] * noise.astype(jnp.float32)
    return y.astype(x0.dtype)
