"""The training tasks, each an objective and the model part it trains (`config.TASK_PARTS`), and the one export.

    task: pia   the PIA recipe (pia_jax/training/step.py): conv_in and the motion modules of the UNet
    task: vae   the autoencoder on frames: pixel MSE + a small KL term; its export measures the latent scale
    task: t2i   the text-to-image UNet on single frames (data.n_frames=1) with their captions: epsilon MSE, the VAE
                and text encoder frozen, the motion modules left out (identity while their proj_out is zero); on
                clips with only the motion modules trainable it is AnimateDiff's objective (configs/toy/motion.yaml)

vae and t2i are the base model's stages for a world where no pretrained base exists (pia_jax/toy). Every task is
the same build (`state.build`), sharded step, loop, checkpointing and resume; only the objective (the `loss_fn`
given to `Trainer`) and the trained part differ. `model.trainable` selects the trained weights of that part (by
regex on NNX paths) and `model.model_dir` is the starting model directory; `export` writes a whole model directory
with the trained part replaced, so the next stage starts from it."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from pia_jax import media
from pia_jax.models.vae import sample_posterior
from pia_jax.sampling import schedulers
from pia_jax.training import config as config_lib
from pia_jax.training import loop
from pia_jax.training import state as state_lib
from pia_jax.training.step import Trainer, diffusion_inputs, float_pixels, pia_loss
from pia_jax.weights.model_dir import save_model_dir

# Weight of the KL term against the per-pixel MSE on [-1, 1] images: small, as in the LDM autoencoders (1e-6 there,
# with a perceptual loss); it only keeps the posterior from drifting, the latent scale is fixed at export.
KL_WEIGHT = 1e-6
SCALE_BATCHES = 8  # batches whose latents set the VAE scaling factor at export


def vae_loss(params, frozen, graphs, mb, keys_Bx3, scheduler, scaling):
    """Reconstruction MSE of posterior samples + KL_WEIGHT x KL(q(z|x) || N(0, I)) per latent element."""
    vae = state_lib.merge(graphs.vae, params, frozen["vae"])
    pixels = float_pixels(mb["pixel_values"])
    b, f = pixels.shape[:2]
    x = pixels.reshape((b * f,) + pixels.shape[2:])
    mean, logvar = (m.astype(jnp.float32) for m in vae.encode(x))
    noise = jax.vmap(lambda k: jax.random.normal(k, (f,) + mean.shape[1:]))(keys_Bx3[:, 0]).reshape(mean.shape)
    recon = vae.decode(sample_posterior(mean, logvar, noise)).astype(jnp.float32)
    kl = 0.5 * jnp.mean(jnp.square(mean) + jnp.exp(logvar) - 1 - logvar)
    return jnp.mean(jnp.square(recon - x)) + KL_WEIGHT * kl


def t2i_loss(params, frozen, graphs, mb, keys_Bx3, scheduler, scaling):
    """The denoising MSE (to the scheduler's prediction target) of the 4-channel UNet on the clips' frames (as
    independent images when n_frames=1)."""
    latents, context, t, noise = diffusion_inputs(graphs, frozen, mb, keys_Bx3, scheduler, scaling)
    unet = state_lib.merge(graphs.unet, params, frozen["unet"])
    pred = unet(schedulers.add_noise(scheduler, latents, noise, t), t, context)
    return jnp.mean(jnp.square(pred - schedulers.training_target(scheduler, latents, noise, t)))


LOSSES = {"pia": pia_loss, "vae": vae_loss, "t2i": t2i_loss}  # one per task of config.TASK_PARTS


def make_trainer(cfg, mesh) -> Trainer:
    """The trainer of `cfg.task`: its setup (`state.build`) and its objective."""
    setup = state_lib.build(cfg.model, cfg.seed, task=cfg.task)
    return Trainer(setup, state_lib.make_optimizer(cfg.optim), mesh, loss_fn=LOSSES[cfg.task],
                   identity=config_lib.program_identity(cfg))


def latent_scale(trainer: Trainer, params: dict, batches) -> float:
    """1 / std of the VAE posterior means over `batches` (`params` on the host): unit-variance latents for the
    diffusion stages (how SD's 0.18215 was chosen). Every process encodes its own batches; the moments are summed
    over processes, so all of them get the scale of all their batches together."""
    vae = state_lib.merge(trainer.setup.graphs.vae, params, trainer.setup.frozen["vae"])
    encode_mean = jax.jit(lambda x: vae.encode(x)[0])
    pixels = [media.PIXEL_VALUES[b["pixel_values"]] if b["pixel_values"].dtype == np.uint8 else b["pixel_values"]
              for b in batches]
    means = np.concatenate([np.asarray(encode_mean(p.reshape((-1,) + p.shape[2:])), np.float64) for p in pixels])
    moments = np.array([means.size, means.sum(), np.square(means).sum()])
    if jax.process_count() > 1:
        moments = multihost_utils.process_allgather(moments).sum(0)
    n, total, squares = moments
    return float(1.0 / np.sqrt(squares / n - (total / n) ** 2))


def export(path, trainer: Trainer, params: dict, cfg, loader=None):
    """Writes the model directory of a finished task: the trained part's weights (`params`, global arrays, possibly
    sharded across hosts) merged into the frozen ones, the other parts, the tokenizer and the scheduler; for `vae`
    the config's scaling factor is measured on SCALE_BATCHES batches of `loader` (made from cfg when not given).
    Every process must call it (the weights are gathered from all of them); process 0 writes, the others return
    None."""
    setup = trainer.setup
    params = multihost_utils.process_allgather(params, tiled=True)  # numpy, whole, on every process
    config = setup.config
    if cfg.task == "vae":
        scale = _measure_scale(trainer, params, cfg, loader)
        config = dataclasses.replace(config, vae=dataclasses.replace(config.vae, scaling_factor=scale))
    if jax.process_index() != 0:
        return None
    part = setup.part
    models = {**setup.frozen, part: {**setup.frozen[part], **params}}
    return save_model_dir(path, config, models, tokenizer=setup.tokenizer,
                          scheduler=schedulers.to_dict(setup.scheduler), dtype=cfg.export_dtype, force=True,
                          report={"task": cfg.task, "trained": sorted(params)})


def _measure_scale(trainer: Trainer, params: dict, cfg, loader) -> float:
    made = loader is None
    loader = loader or loop.make_loader(cfg, trainer.setup.tokenizer, trainer.setup.config.text.vocab_size)
    try:
        return latent_scale(trainer, params, [next(loader) for _ in range(SCALE_BATCHES)])
    finally:
        if made:
            getattr(loader, "close", lambda: None)()
