"""pia_jax.sampling.schedulers against diffusers' DDIMScheduler and DPMSolverMultistepScheduler, step by step.

Both sides run float32 with the same coefficient formulas; ours precomputes the per-step scalars in numpy float32
and folds a few products (DPM's (1/r0)·0.5·phi) into one, so every step differs by a few float32 roundings (~1e-7
relative). DDIM divides by sqrt(ᾱ_t) (~0.07 at t = 961), which scales an absolute error in x0 up by ~15 before
sqrt(ᾱ_prev) scales it back, so per-step errors reach ~1e-6 of the output scale and 25-50 steps accumulate them
to a few 1e-6 (measured: at most 2e-6 here). TOL = 2e-5 leaves margin; a wrong coefficient, timestep or solver
order gives errors of 1e-3 or more.
"""

import dataclasses
import inspect
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
)

from pia_jax.sampling import schedulers as S
from tests.oracle import assert_close

TOL = 2e-5
SHAPE = (2, 4, 3, 8, 8)  # small video latents (b, c, f, h, w); the schedulers only broadcast


CLASSES = {"ddim": DDIMScheduler, "dpmpp_2m": DPMSolverMultistepScheduler, "lcm": LCMScheduler,
           "euler": EulerDiscreteScheduler}


def reference(kind, cfg: S.SchedulerConfig):
    """The diffusers scheduler for our config (each class takes only its own keys; eta is an argument of DDIM's
    step, not a config key)."""
    cls = CLASSES[kind]
    accepted = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in S.to_dict(cfg).items() if k in accepted and k != "eta"})


TRACES = [0]  # how often the sampler loop below was traced (= compiled)


@jax.jit
def sample_loop(schedule, x, noises, var_noises):
    """A sampler with the stand-in model eps_i = 0.5·x + noises[i]; returns every intermediate sample."""
    TRACES[0] += 1

    def body(i, carry):
        x, state, traj = carry
        x, state = S.step(schedule, state, i, 0.5 * x + noises[i], x, var_noises[i])
        return x, state, traj.at[i].set(x)

    n = schedule.timesteps.shape[0]
    return jax.lax.fori_loop(0, n, body, (x, S.init_state(schedule, x), jnp.zeros((n,) + x.shape, x.dtype)))[2]


def torch_loop(kind, cfg, steps, strength, x0, noise, noises, var_noises):
    ref = reference(kind, cfg)
    ref.set_timesteps(steps)
    start = steps - min(int(steps * strength), steps)  # diffusers' get_timesteps in the img2img and PIA pipelines
    timesteps = ref.timesteps[start:]
    if hasattr(ref, "set_begin_index"):  # as the pipelines do (DPM-Solver counts steps from there)
        ref.set_begin_index(start)
    t = lambda a: torch.from_numpy(np.asarray(a))
    x = ref.add_noise(t(x0), t(noise), timesteps[:1]) if start else t(noise)
    traj = []
    for i, ts in enumerate(timesteps):
        eps = 0.5 * x + t(noises[i])
        extra = {"eta": cfg.eta, "variance_noise": t(var_noises[i])} if kind == "ddim" else {}
        x = ref.step(eps, ts, x, **extra).prev_sample
        traj.append(x.numpy())
    return timesteps.numpy(), np.stack(traj)


CASES = [  # kind, config changes, steps, strength
    ("ddim", {}, 25, 1.0),  # the PIA reference
    ("ddim", {}, 50, 0.6),
    ("ddim", {"eta": 0.7}, 25, 1.0),
    ("ddim", {"timestep_spacing": "trailing", "prediction_type": "v_prediction"}, 50, 1.0),
    ("ddim", {"beta_schedule": "scaled_linear", "timestep_spacing": "linspace", "set_alpha_to_one": False,
              "clip_sample": True, "clip_sample_range": 2.0}, 10, 1.0),
    ("ddim", {"prediction_type": "sample", "beta_schedule": "squaredcos_cap_v2"}, 25, 1.0),
    ("dpmpp_2m", {}, 25, 1.0),
    ("dpmpp_2m", {"use_karras_sigmas": True}, 25, 1.0),
    ("dpmpp_2m", {"use_karras_sigmas": True, "timestep_spacing": "linspace"}, 10, 1.0),  # lower_order_final (< 15)
    ("dpmpp_2m", {"use_karras_sigmas": True}, 25, 0.6),
    ("dpmpp_2m", {"prediction_type": "v_prediction", "timestep_spacing": "trailing", "solver_type": "heun"}, 50, 1.0),
    ("dpmpp_2m", {"final_sigmas_type": "sigma_min", "beta_schedule": "scaled_linear"}, 20, 1.0),  # 2nd order to the end
    ("dpmpp_2m", {"final_sigmas_type": "sigma_min", "solver_order": 1}, 10, 1.0),
]


@pytest.mark.parametrize("kind,changes,steps,strength", CASES)
def test_step_parity(kind, changes, steps, strength):
    cfg = dataclasses.replace(S.PIA_DDIM, **changes)
    rng = np.random.default_rng(0)
    x0, noise = rng.standard_normal((2,) + SHAPE, np.float32)
    noises, var_noises = rng.standard_normal((2, steps) + SHAPE, np.float32)
    timesteps, expected = torch_loop(kind, cfg, steps, strength, x0, noise, noises, var_noises)

    schedule = S.make_schedule(kind, cfg, steps, strength)
    np.testing.assert_array_equal(schedule.timesteps, timesteps)
    x = S.add_noise_start(schedule, x0, noise) if strength < 1 else noise
    got = np.asarray(sample_loop(schedule, x, noises, var_noises))
    for i in range(len(timesteps)):
        assert_close(got[i], expected[i], TOL, f"{kind} {changes} step {i} (t={timesteps[i]})")


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_alphas_cumprod_bitwise(beta_schedule):
    cfg = dataclasses.replace(S.PIA_DDIM, beta_schedule=beta_schedule)
    np.testing.assert_array_equal(S.alphas_cumprod(cfg), reference("ddim", cfg).alphas_cumprod.numpy())
    cfg = dataclasses.replace(cfg, beta_start=1e-4, beta_end=0.02, num_train_timesteps=999)
    np.testing.assert_array_equal(S.alphas_cumprod(cfg), reference("ddim", cfg).alphas_cumprod.numpy())


@pytest.mark.parametrize("kind,karras", [("ddim", False), ("dpmpp_2m", False), ("dpmpp_2m", True)])
def test_timesteps(kind, karras):
    for spacing in ("leading", "trailing", "linspace"):
        for offset in (0, 1):
            cfg = S.SchedulerConfig(timestep_spacing=spacing, steps_offset=offset, use_karras_sigmas=karras)
            ref = reference(kind, cfg)
            for n in (1, 7, 10, 25, 50, 999):
                ref.set_timesteps(n)
                np.testing.assert_array_equal(S.make_schedule(kind, cfg, n).timesteps, ref.timesteps.numpy(),
                                              f"{kind} {spacing} offset {offset} steps {n}")


def test_pia_reference_timesteps():
    # PIA base.yaml: DDIM, linear betas, steps_offset 1, 25 steps (pia_reference.md §0 item 3)
    np.testing.assert_array_equal(S.make_schedule("ddim", S.PIA_DDIM, 25).timesteps, np.arange(961, 0, -40))
    assert S.make_schedule("ddim", S.PIA_DDIM, 25, strength=0.6).timesteps[0] == 561  # 15 of the 25 steps


def test_ddim_step_by_hand():
    """pia_reference.md §9: x0 = (x - sqrt(1-ᾱ)ε)/sqrt(ᾱ); x_prev = sqrt(ᾱ_prev)x0 + sqrt(1-ᾱ_prev)ε; ᾱ_prev = 1 at the
    end. ᾱ here in float64 from float64 betas, independent of the module (the float32 cumprod differs by ~1e-6)."""
    acp = np.cumprod(1 - np.linspace(0.00085, 0.012, 1000))
    schedule = S.make_schedule("ddim", S.PIA_DDIM, 25)
    rng = np.random.default_rng(1)
    x, eps = rng.standard_normal((2, 4, 8), np.float32).astype(np.float64)
    for i, (t, a_prev) in {0: (961, acp[921]), 24: (1, 1.0)}.items():
        x0 = (x - math.sqrt(1 - acp[t]) * eps) / math.sqrt(acp[t])
        expected = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
        got, _ = S.step(schedule, (), i, jnp.asarray(eps, jnp.float32), jnp.asarray(x, jnp.float32))
        assert_close(got, expected, 1e-5, f"DDIM step {i} by hand")


def test_add_noise():
    cfg = S.PIA_DDIM
    ref = reference("ddim", cfg)
    rng = np.random.default_rng(2)
    x0, noise = rng.standard_normal((2,) + SHAPE, np.float32)
    t = np.array([999, 1])
    expected = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
    for alphas in (cfg, S.alphas_cumprod(cfg)):
        assert_close(S.add_noise(alphas, x0, noise, t), expected, 1e-6, "add_noise")
    expected = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.tensor([500])).numpy()
    assert_close(S.add_noise(cfg, x0, noise, 500), expected, 1e-6, "add_noise, one timestep")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_training_target_matches_diffusers(prediction_type):
    # The training scripts of diffusers regress noise, scheduler.get_velocity(x0, noise, t) or x0 by prediction
    # type; both sides are one float32 multiply-add per element (1e-6 covers the sqrt's rounding).
    cfg = dataclasses.replace(S.PIA_DDIM, prediction_type=prediction_type)
    ref = reference("ddim", cfg)
    rng = np.random.default_rng(5)
    x0, noise = rng.standard_normal((2,) + SHAPE, np.float32)
    t = np.array([999, 37])
    x0_t, noise_t, t_t = map(torch.from_numpy, (x0, noise, t))
    expected = {"epsilon": noise, "sample": x0,
                "v_prediction": ref.get_velocity(x0_t, noise_t, t_t).numpy()}[prediction_type]
    assert_close(S.training_target(cfg, x0, noise, t), expected, 1e-6, prediction_type)
    # and a model that outputs it exactly gives back x0 and the noise through the sampler's conversion
    a = S.alphas_cumprod(cfg)[t].reshape(-1, *(1,) * (len(SHAPE) - 1))  # SHAPE leads with the batch of 2
    x_t = S.add_noise(cfg, x0, noise, t)
    x0_back, eps_back = S.x0_eps(prediction_type, S.training_target(cfg, x0, noise, t), x_t, np.sqrt(a), np.sqrt(1 - a))
    assert_close(x0_back, x0, 1e-5, "x0")  # from epsilon: / sqrt(ᾱ_999) = 0.04 scales roundings by 25
    assert_close(eps_back, noise, 1e-5, "noise")


def test_compiles_once():
    rng = np.random.default_rng(3)
    shape = (1, 4, 2, 8, 8)  # one no other test uses
    karras = dataclasses.replace(S.PIA_DDIM, use_karras_sigmas=True)
    before = TRACES[0]
    for cfg, steps, strength in ((S.PIA_DDIM, 10, 1.0), (karras, 10, 1.0), (S.PIA_DDIM, 20, 0.5)):
        schedule = S.make_schedule("dpmpp_2m", cfg, steps, strength)  # 10 steps each time; their values are data
        x, noises, var_noises = rng.standard_normal(shape), *rng.standard_normal((2, 10) + shape)
        sample_loop(schedule, np.float32(x), np.float32(noises), np.float32(var_noises)).block_until_ready()
    assert TRACES[0] - before == 1


def test_sample_dtype():
    """Float32 math for a bf16 sample: the same as stepping the upcast inputs, then rounding once."""
    schedule = S.make_schedule("dpmpp_2m", S.PIA_DDIM, 10)
    rng = np.random.default_rng(4)
    x, out, prev = (jnp.asarray(a, jnp.bfloat16) for a in rng.standard_normal((3,) + SHAPE, np.float32))
    state = prev.astype(jnp.float32)
    got, new_state = S.step(schedule, state, 3, out, x)
    f32, _ = S.step(schedule, state, 3, out.astype(jnp.float32), x.astype(jnp.float32))
    assert got.dtype == jnp.bfloat16 and new_state.dtype == jnp.float32
    np.testing.assert_array_equal(got, f32.astype(jnp.bfloat16))


def test_config_io():
    cfg = S.SchedulerConfig(use_karras_sigmas=True, eta=0.3)
    assert S.from_dict(json.loads(json.dumps(S.to_dict(cfg)))) == cfg
    # the PIA reference's scheduler, as diffusers' own DDIMScheduler stores it, is our default
    pia = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear", steps_offset=1, clip_sample=False)
    fields = {f.name for f in dataclasses.fields(S.SchedulerConfig)}
    assert S.SchedulerConfig(**{k: v for k, v in pia.config.items() if k in fields}) == S.PIA_DDIM
    for bad in ({"algorithm_type": "sde-dpmsolver++"}, {"solver_order": 3}, {"beta_schedule": "sigmoid"},
                {"eta": -0.1}):
        with pytest.raises(ValueError):
            S.SchedulerConfig(**bad)
    with pytest.raises(ValueError):
        S.make_schedule("ddim", S.PIA_DDIM, 10, strength=0.05)
    with pytest.raises(ValueError):
        S.step(S.make_schedule("ddim", dataclasses.replace(S.PIA_DDIM, eta=1.0), 10), (), 0, x := jnp.ones(3), x)


def test_padded_schedules_make_the_step_count_data():
    """Padded to one length, schedules of any step count, strength, eta or Karras sigmas run through one compiled
    loop (a fori_loop to `count`) per kind and give what the unpadded schedules give (DDIM with eta = 0 adds
    0·noise, which changes nothing)."""
    traces = [0]

    @jax.jit
    def run(schedule, x, noises):
        traces[0] += 1

        def body(i, carry):
            x, state = carry
            return S.step(schedule, state, i, 0.5 * x + noises[i], x, 0.3 * noises[i])
        return jax.lax.fori_loop(0, schedule.count, body, (x, S.init_state(schedule, x)))[0]

    rng = np.random.default_rng(5)
    x, noises = np.float32(rng.standard_normal(SHAPE)), np.float32(rng.standard_normal((50,) + SHAPE))
    karras = dataclasses.replace(S.PIA_DDIM, use_karras_sigmas=True)
    eta = dataclasses.replace(S.PIA_DDIM, eta=0.7)
    padded_traces = 0
    for kind, cfg, steps, strength in (("ddim", S.PIA_DDIM, 10, 1.0), ("ddim", eta, 25, 0.6),
                                       ("ddim", S.PIA_DDIM, 7, 1.0), ("dpmpp_2m", S.PIA_DDIM, 12, 1.0),
                                       ("dpmpp_2m", karras, 20, 0.5)):
        compact = S.make_schedule(kind, cfg, steps, strength)
        n = len(compact.timesteps)
        expected = run(compact, x, noises[:n]) if kind == "dpmpp_2m" or cfg.eta else None
        padded = S.make_schedule(kind, cfg, steps, strength, length=50)
        assert padded.timesteps.shape == (50,) and int(padded.count) == n
        before = traces[0]
        got = run(padded, x, noises)
        padded_traces += traces[0] - before
        if expected is None:  # a compact DDIM schedule with eta = 0 takes no noise: step it by hand
            expected, state = jnp.asarray(x), ()
            for i in range(n):
                expected, state = S.step(compact, state, i, 0.5 * expected + noises[i], expected)
        # the same float32 formulas; only XLA's fusion of a loop with a static vs dynamic trip count may differ
        assert_close(got, expected, 1e-6, f"padded {kind} {steps} steps, strength {strength}")
    assert padded_traces == 2, "one compiled loop per scheduler kind"


# ---------------------------------------------------------------------------------------------------------------
# Few-step samplers: LCM (AnimateLCM) and Euler with trailing spacing (AnimateDiff-Lightning). The same stand-in
# model and TOL as above; LCM's noise between steps is fed to diffusers' LCMScheduler in place of its own draws
# (its `randn_tensor`), and diffusers' Euler samples z = x0 + σ·ε are compared in our convention, z/sqrt(1+σ²).

LIGHTNING = S.SCHEDULER_PRESETS["lightning"]  # linear betas, trailing spacing
FEW_STEP_CASES = [  # kind, config changes, steps, strength
    *[("lcm", {}, n, 1.0) for n in (1, 2, 4, 8)],
    ("lcm", {}, 4, 0.5),  # timesteps from the first 25 of the 50 original steps, started from a noised image
    ("lcm", {"original_inference_steps": 100}, 6, 1.0),  # AnimateLCM's own repository samples with 100
    ("lcm", {"prediction_type": "v_prediction", "beta_schedule": "scaled_linear", "clip_sample": True,
             "clip_sample_range": 1.5, "timestep_scaling": 5.0}, 4, 1.0),
    *[("euler", {"timestep_spacing": "trailing"}, n, 1.0) for n in (1, 2, 4, 8)],
    ("euler", {"timestep_spacing": "trailing"}, 8, 0.6),
    ("euler", {}, 4, 1.0),  # leading + steps_offset 1: init_noise_sigma = sqrt(1 + σ_max²), so x starts at noise
    ("euler", {"timestep_spacing": "trailing", "prediction_type": "v_prediction", "final_sigmas_type": "sigma_min"},
     4, 1.0),
    ("euler", {"timestep_spacing": "trailing", "prediction_type": "sample", "beta_schedule": "scaled_linear"}, 2, 1.0),
]


def torch_few_step(kind, cfg, steps, strength, x0, noise, noises, var_noises, monkeypatch):
    """diffusers' loop as the pipelines run it -> (timesteps, every sample after each step in our convention)."""
    from diffusers.schedulers import scheduling_lcm

    ref = reference(kind, cfg)
    t = lambda a: torch.from_numpy(np.asarray(a))
    draws = iter(var_noises)
    monkeypatch.setattr(scheduling_lcm, "randn_tensor", lambda shape, **kw: t(next(draws)))
    if kind == "lcm":  # LCM's img2img pipeline passes strength to set_timesteps and keeps every step
        ref.set_timesteps(steps, strength=strength)
        start = 0
    else:
        ref.set_timesteps(steps)
        start = steps - min(int(steps * strength), steps)
        ref.set_begin_index(start)
    timesteps = ref.timesteps[start:]
    x = ref.add_noise(t(x0), t(noise), timesteps[:1]) if strength < 1 else t(noise) * ref.init_noise_sigma
    traj = []
    for i, ts in enumerate(timesteps):
        eps = 0.5 * ref.scale_model_input(x, ts) + t(noises[i])
        x = ref.step(eps, ts, x).prev_sample
        scale = (ref.sigmas[ref.step_index] ** 2 + 1) ** 0.5 if kind == "euler" else 1.0
        traj.append((x / scale).numpy())
    return timesteps.numpy().astype(np.int64), np.stack(traj)


@pytest.mark.parametrize("kind,changes,steps,strength", FEW_STEP_CASES)
def test_few_step_parity(kind, changes, steps, strength, monkeypatch):
    """Schedules padded to 8 steps as the sampler runs them (one compiled loop per kind and prediction type); the
    first `count` samples are the steps taken."""
    cfg = dataclasses.replace(S.PIA_DDIM, **changes)
    rng = np.random.default_rng(7)
    x0, noise = rng.standard_normal((2,) + SHAPE, np.float32)
    noises, var_noises = rng.standard_normal((2, 8) + SHAPE, np.float32)
    timesteps, expected = torch_few_step(kind, cfg, steps, strength, x0, noise, noises, var_noises, monkeypatch)

    schedule = S.make_schedule(kind, cfg, steps, strength, length=8)
    n = int(schedule.count)
    np.testing.assert_array_equal(schedule.timesteps[:n], timesteps)
    x = S.add_noise_start(schedule, x0, noise) if strength < 1 else S.initial_noise(schedule, jnp.asarray(noise))
    got = np.asarray(sample_loop(schedule, x, noises, var_noises))
    for i in range(n):
        assert_close(got[i], expected[i], TOL, f"{kind} {changes} step {i} (t={timesteps[i]})")


def test_few_step_timesteps():
    """Timesteps and step counts for every step count a distilled model uses and beyond, and the inputs diffusers
    refuses (LCM: more steps than int(original steps · strength)) refused here before any work."""
    for original in (50, 100):
        cfg = dataclasses.replace(S.PIA_DDIM, original_inference_steps=original)
        ref = reference("lcm", cfg)
        for strength in (1.0, 0.7, 0.31):
            for n in (1, 2, 3, 4, 6, 8, 13, int(original * strength)):
                ref.set_timesteps(n, strength=strength)
                schedule = S.make_schedule("lcm", cfg, n, strength, length=original)
                np.testing.assert_array_equal(schedule.timesteps[:n], ref.timesteps.numpy(), f"lcm {original} {n}")
                assert int(schedule.count) == n
            with pytest.raises(ValueError, match="lcm takes its"):
                S.check_steps(cfg, int(original * strength) + 1, strength, "lcm")
    for spacing, offset in (("trailing", 0), ("trailing", 1), ("leading", 1)):
        cfg = dataclasses.replace(S.PIA_DDIM, timestep_spacing=spacing, steps_offset=offset)
        ref = reference("euler", cfg)
        for n in (1, 2, 3, 4, 8, 25, 50):
            ref.set_timesteps(n)
            np.testing.assert_array_equal(S.make_schedule("euler", cfg, n).timesteps, ref.timesteps.numpy())
    np.testing.assert_array_equal(S.make_schedule("euler", LIGHTNING, 4).timesteps, [999, 749, 499, 249])
    np.testing.assert_array_equal(S.make_schedule("lcm", S.SCHEDULER_PRESETS["animatelcm"], 4).timesteps,
                                  [999, 759, 499, 259])
    for cfg in (dataclasses.replace(LIGHTNING, timestep_spacing="linspace"),
                dataclasses.replace(LIGHTNING, use_karras_sigmas=True)):
        with pytest.raises(ValueError, match="fractional timesteps"):
            S.check_steps(cfg, 4, 1.0, "euler")


def test_euler_trailing_starts_below_unit_noise():
    """diffusers' init_noise_sigma for 'trailing' is σ_max, so its model sees σ_max/sqrt(1+σ_max²)·noise =
    sqrt(1-ᾱ_999)·noise at the first step (by hand, float64 ᾱ), not the noise itself as with 'leading'."""
    acp = np.cumprod(1 - np.linspace(0.00085, 0.012, 1000))
    assert abs(float(S.make_schedule("euler", LIGHTNING, 4).init_scale) - np.sqrt(1 - acp[999])) < 1e-6
    assert abs(float(S.make_schedule("euler", S.PIA_DDIM, 4).init_scale) - 1) < 1e-6
    assert float(S.make_schedule("ddim", S.PIA_DDIM, 4).alpha[0]) > 0  # other kinds start at the noise itself
    noise = jnp.ones(3)
    assert S.initial_noise(S.make_schedule("lcm", S.PIA_DDIM, 4), noise) is noise


def test_few_step_loop_to_count_compiles_once():
    """The sampler's loop runs to `count` (data): one compiled loop per kind for 2, 4 and 8 steps, giving the
    samples the parity test's fixed-length loop gives at the last step taken."""
    rng = np.random.default_rng(8)
    x, noises = np.float32(rng.standard_normal(SHAPE)), np.float32(rng.standard_normal((8,) + SHAPE))
    for kind, cfg in (("lcm", S.PIA_DDIM), ("euler", LIGHTNING)):
        before = PADDED_TRACES[0]
        for steps in (2, 4, 8):
            schedule = S.make_schedule(kind, cfg, steps, length=8)
            expected = np.asarray(sample_loop(schedule, x, noises, noises))[steps - 1]
            assert_close(sample_loop_to_count(schedule, x, noises), expected, 1e-6, f"{kind} {steps} steps to count")
        assert PADDED_TRACES[0] - before == 1, f"one compiled loop for {kind}"


PADDED_TRACES = [0]


@jax.jit
def sample_loop_to_count(schedule, x, noises):
    PADDED_TRACES[0] += 1

    def body(i, carry):
        x, state = carry
        return S.step(schedule, state, i, 0.5 * x + noises[i], x, noises[i])
    return jax.lax.fori_loop(0, schedule.count, body, (x, S.init_state(schedule, x)))[0]
