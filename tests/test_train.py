"""The training step on CPU: sharding, freezing, gradient accumulation, overfitting; config parsing; FLOP count.

Every trainer here is one of tests/helpers.py's: one small model (a converted model directory with a 4-channel UNet,
widened at load), fp32 compute and bf16 frozen weights, compiled once per mesh and batch shape.
"""

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pia_jax.sharding import make_mesh
from pia_jax.training import config as config_lib
from pia_jax.training import metrics
from pia_jax.training import state as state_lib
from pia_jax.training.step import Trainer
from tests.assets import SMALL
from tests.helpers import BATCH, FRAMES, SEED, SIZE, host, loader, max_rel, setup, train_config, trainer


def run_steps(tr: Trainer, n: int, k: int = 1, batch_size: int = BATCH):
    """n steps of k micro-batches from a fresh state and loader; returns (params, [metrics]) on the host."""
    state, data, out = tr.init_state(SEED), loader(batch_size=batch_size), []
    for _ in range(n):
        state, m = tr.step(state, tr.put_batch([next(data) for _ in range(k)]))
        out.append(host(m))
    return host(state.params), out


def test_setup_widens_conv_in_and_splits_the_weights():
    s = setup()
    assert s.config.unet.in_channels == 9 and s.trainable["conv_in.kernel"].shape[2] == 9
    np.testing.assert_array_equal(s.trainable["conv_in.kernel"][:, :, 4:], 0)  # zero condition channels
    assert all(k.startswith("conv_in.") or ".motion_modules." in k for k in s.trainable)
    assert not any(".motion_modules." in k for k in s.frozen["unet"]) and "conv_out.kernel" in s.frozen["unet"]
    assert all(v.dtype == np.float32 for v in s.trainable.values())
    frozen = trainer(1, 1).frozen  # the device copies of frozen weights are bf16, the trainable ones fp32
    assert {v.dtype for part in frozen.values() for v in part.values()} == {np.dtype(jnp.bfloat16)}


# Tolerance 1e-4 of each weight's scale after 3 steps. Sharding changes only the order of the cross-device sums
# (loss mean, gradient reduction), ~1e-7 relative in fp32; Adam's first steps divide the gradient by its own
# magnitude, which amplifies that where a gradient is near 0 to at most ~lr * 1e-7 / (|g| + eps) per weight
# (measured: <= 3e-6 of the scale), while a sharding bug (a wrong slice, a missing reduction) moves weights by ~lr.
SHARDED_TOL = 1e-4


def test_sharded_step_matches_single_device_and_freezes():
    single, m1 = run_steps(trainer(1, 1), 3)
    sharded, m8 = run_steps(trainer(4, 2), 3)
    for a, b in zip(m8, m1):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
        np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-4)
    assert max_rel(sharded, single) < SHARDED_TOL
    # trainable weights move (every one: the random model has no zero-initialized outputs) ...
    init = setup().trainable
    assert all(not np.array_equal(sharded[k], init[k]) for k in init)
    # ... and frozen ones never leave the device copy they started as (bit-identical; they are no output of the step)
    frozen = host(trainer(4, 2).frozen)
    cast = {p: {k: v.astype(np.dtype(jnp.bfloat16)) for k, v in part.items()} for p, part in setup().frozen.items()}
    assert all(np.array_equal(frozen[p][k], cast[p][k]) for p in cast for k in cast[p])
    opt_leaves = jax.tree.leaves(trainer(4, 2).abstract_state().opt_state)
    assert sum(x.size for x in opt_leaves) < 2.01 * sum(v.size for v in init.values())  # Adam moments: trainables only


# Tolerance: k micro-batches of B vs one batch of kB differ only in the order of the loss/gradient sums (fp32);
# measured ~1e-7 relative on the gradient norm; the weights after 2 Adam steps as for SHARDED_TOL.
def test_gradient_accumulation_equals_the_larger_batch():
    big, m_big = run_steps(trainer(1, 1), 2, k=1, batch_size=BATCH)
    acc, m_acc = run_steps(trainer(1, 1), 2, k=2, batch_size=BATCH // 2)
    for a, b in zip(m_acc, m_big):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
        np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-4)
    assert max_rel(acc, big) < SHARDED_TOL


def test_loss_falls_when_overfitting():
    """Two clips seen again and again with the same noise and timesteps (the step counter is held at 0, so every
    step draws the same): the loss of that fixed regression problem must fall far below where it started."""
    tr = trainer(4, 2)
    state, data, losses = tr.init_state(SEED), loader(num_clips=2), []
    batch = tr.put_batch([next(data)])
    for _ in range(30):
        state, m = tr.step(state._replace(step=state.step * 0), batch)
        losses.append(float(m["loss"]))
    print("losses", np.round(losses, 3))  # measured: 1.31 -> 0.62, falling at every step after the warmup
    assert losses[-1] < 0.7 * losses[0] and all(b < a for a, b in zip(losses[2:], losses[3:]))


def one_block_inputs(model):
    """A built setup of a one-block UNet (short compilations) and one clip's latents, text states and batch."""
    one_block = dataclasses.replace(SMALL, unet=dataclasses.replace(
        SMALL.unet, block_out_channels=(32,), down_block_types=("CrossAttnDownBlockMotion",),
        up_block_types=("CrossAttnUpBlockMotion",)))
    s = state_lib.build(dataclasses.replace(model, model_dir=None), init_config=one_block)
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((1, FRAMES, SIZE, SIZE, 4), np.float32)
    context = rng.standard_normal((1, 77, SMALL.text.hidden_size), np.float32)
    batch = {"use_condition": np.array([True]), "affinity": np.full((1, FRAMES), 0.7, np.float32),
             "cond_frame": np.array([1], np.int32)}
    return s, latents, context, batch


def test_remat_keeps_loss_and_gradients():
    """Rematerialised down, mid and up blocks (one of each: a one-block UNet keeps the two compilations short)."""
    model = train_config().model
    s, latents, context, batch = one_block_inputs(model)
    plain = state_lib.make_graphs(state_lib.abstract_models(s.config, model))
    remat = state_lib.make_graphs(state_lib.abstract_models(s.config, dataclasses.replace(
        model, remat_policy="nothing_saveable")))
    from pia_jax.training.step import denoising_loss

    def grads(graphs):
        fn = jax.jit(jax.value_and_grad(lambda p: denoising_loss(p, s.frozen["unet"], graphs.unet, latents, context,
                                                                 batch, np.array([500]), latents * 0.5,
                                                                 s.scheduler)))
        return host(fn(s.trainable))
    (l0, g0), (l1, g1) = grads(plain), grads(remat)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    assert max_rel(g1, g0) < 1e-5  # recomputation may fuse differently; same math


def test_a_v_prediction_model_regresses_the_velocity():
    """The loss follows the model directory's prediction type: for v_prediction it is the MSE of the UNet's output
    to diffusers' DDPMScheduler.get_velocity (the target of diffusers' training scripts), not to the noise."""
    import torch
    from diffusers import DDPMScheduler

    from pia_jax.sampling import schedulers
    from pia_jax.training.step import denoising_loss

    model = train_config().model
    s, latents, context, batch = one_block_inputs(model)
    graphs = state_lib.make_graphs(state_lib.abstract_models(s.config, model))
    v_model = dataclasses.replace(s.scheduler, prediction_type="v_prediction")
    noise, t = np.random.default_rng(1).standard_normal(latents.shape, np.float32), np.array([700])
    loss = float(denoising_loss(s.trainable, s.frozen["unet"], graphs.unet, latents, context, batch, t, noise,
                                v_model))
    unet = state_lib.merge(graphs.unet, s.trainable, s.frozen["unet"])
    cond = latents[:, 1:2] * np.ones((1, FRAMES, 1, 1, 1), np.float32)  # cond_frame 1 on every frame
    out = np.asarray(unet(schedulers.add_noise(v_model, latents, noise, t), t, context,
                          mask=np.full((1, FRAMES, 1, 1, 1), 0.7, np.float32), condition=cond[:, :1]))
    ref = DDPMScheduler(beta_schedule="linear", beta_start=0.00085, beta_end=0.012)  # PIA's training schedule
    velocity = ref.get_velocity(*map(torch.from_numpy, (latents, noise, t))).numpy()
    np.testing.assert_allclose(loss, np.mean((out - velocity) ** 2), rtol=1e-5)  # fp32 sums of 1e3 terms
    # the reference's epsilon model on the same inputs regresses the noise
    eps_loss = float(denoising_loss(s.trainable, s.frozen["unet"], graphs.unet, latents, context, batch, t, noise,
                                    s.scheduler))
    np.testing.assert_allclose(eps_loss, np.mean((out - noise) ** 2), rtol=1e-5)
    print("v loss", loss, "epsilon loss", eps_loss)
    assert abs(loss - eps_loss) > 1e-3 * loss  # 100x the tolerance above: the two checks tell the targets apart


def test_flop_count_matches_a_hand_count():
    x = jax.ShapeDtypeStruct((4, 16, 16, 8), np.float32)
    w = jax.ShapeDtypeStruct((3, 3, 8, 32), np.float32)
    conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    assert metrics.count_flops(conv, x, w) == 2 * 4 * 16 * 16 * 32 * 3 * 3 * 8
    # backward: the input gradient and the kernel gradient are one convolution each of the same size
    assert metrics.count_flops(jax.grad(lambda x, w: conv(x, w).sum(), (0, 1)), x, w) == 3 * 2 * 4 * 16 * 16 * 32 * 72
    a, b = jax.ShapeDtypeStruct((5, 7, 3), np.float32), jax.ShapeDtypeStruct((5, 3, 2), np.float32)
    assert metrics.count_flops(lambda a, b: jax.lax.scan(lambda c, ab: (c, ab[0] @ ab[1]), 0.0, (a, b))[1],
                               a, b) == 5 * 2 * 7 * 3 * 2
    # a shard_map body runs on each of the devices it splits the batch over: 8 x (2 rows of 16 at a time)
    from jax.sharding import PartitionSpec as P
    split = jax.shard_map(lambda x, w: x @ w, mesh=make_mesh(4, 2), in_specs=(P(("data", "fsdp")), P()),
                          out_specs=P(("data", "fsdp")))
    x, w = jax.ShapeDtypeStruct((16, 4), np.float32), jax.ShapeDtypeStruct((4, 3), np.float32)
    assert metrics.count_flops(split, x, w) == 2 * 16 * 4 * 3


def test_config_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 10\noptim:\n  lr: 3.0e-5\nmodel:\n  trainable: ['^conv_in\\.']\n")
    cfg = config_lib.load(str(path), ["optim.lr=1e-4", "mesh.fsdp=4", "data.path=null", "log.progress_bar=false",
                                      "model.remat_policy=dots_saveable"])
    assert cfg.steps == 10 and cfg.optim.lr == 1e-4 and cfg.mesh.fsdp == 4 and cfg.data.path is None
    assert cfg.model.trainable == (r"^conv_in\.",) and cfg.model.remat_policy == "dots_saveable"
    assert cfg.log.progress_bar is False and cfg.optim.b2 == 0.999
    with pytest.raises(ValueError, match="optim.lrr"):
        config_lib.load(None, ["optim.lrr=1"])
    for name in ("one_gpu", "tpu_pod"):
        config_lib.load(str(Path(__file__).parent.parent / "configs" / f"{name}.yaml"))
