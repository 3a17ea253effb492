"""Training tasks besides PIA, for a world where no pretrained base exists (pia_jax/toy): the base model's stages.

    task: vae   the autoencoder on frames: pixel MSE + a small KL term; its export measures the latent scale
    task: t2i   the text-to-image UNet on single frames (data.n_frames=1) with their captions: epsilon MSE, the VAE
                and text encoder frozen, the motion modules left out (identity while their proj_out is zero); on
                clips with only the motion modules trainable it is AnimateDiff's objective (configs/toy/motion.yaml)
    task: pia   the PIA recipe itself (pia_jax/training/step.py), unchanged

Each task is the same sharded step, loop, checkpointing and resume as PIA's; only the objective (the `loss_fn`
given to `Trainer`) and which model part trains differ. `model.trainable` selects the trained weights of that
part (by regex on NNX paths) and `model.model_dir` is the starting model directory; the export writes a whole
model directory with the trained part replaced, so the next stage starts from it.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from pia_jax import media
from pia_jax.models.vae import sample_posterior
from pia_jax.sampling import schedulers
from pia_jax.training import loop
from pia_jax.training import state as state_lib
from pia_jax.training.step import Trainer, diffusion_inputs, float_pixels, pia_loss
from pia_jax.weights.model_dir import flat_params, load_model_dir, save_model_dir

TASKS = ("pia", "vae", "t2i")
PART = {"vae": "vae", "t2i": "unet"}  # the model part each base task trains
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


LOSSES = {"pia": pia_loss, "vae": vae_loss, "t2i": t2i_loss}


def build(cfg) -> state_lib.Setup:
    """The setup of a base task: all weights of `cfg.model.model_dir`, the task's part split by `model.trainable`."""
    if not cfg.model.model_dir:
        raise ValueError(f"task {cfg.task!r} needs model.model_dir (a model directory to start from)")
    md = load_model_dir(cfg.model.model_dir)
    flats = {"unet": flat_params(md.unet), "vae": flat_params(md.vae), "text_encoder": flat_params(md.text_encoder)}
    part = PART[cfg.task]
    trainable, rest = state_lib.split_trainable(flats[part], cfg.model.trainable)
    if cfg.task == "t2i" and md.config.unet.in_channels != 4:
        raise ValueError(f"task t2i trains a 4-channel base UNet; {cfg.model.model_dir} has "
                         f"{md.config.unet.in_channels} input channels")
    graphs = state_lib.make_graphs(state_lib.abstract_models(md.config, cfg.model))
    scheduler = schedulers.from_dict(md.scheduler) if md.scheduler else schedulers.PIA_DDIM
    return state_lib.Setup(md.config, graphs, cfg.model, {k: v.astype(np.float32) for k, v in trainable.items()},
                           {**flats, part: rest}, scheduler, md.tokenizer)


def make_trainer(cfg, mesh) -> Trainer:
    """The trainer of `cfg.task`: PIA's setup (state.build) or a base task's, with the task's objective."""
    if cfg.task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {cfg.task!r}")
    setup = state_lib.build(cfg.model, cfg.seed) if cfg.task == "pia" else build(cfg)
    return Trainer(setup, state_lib.make_optimizer(cfg.optim), mesh, loss_fn=LOSSES[cfg.task])


def latent_scale(trainer: Trainer, params: dict, batches) -> float:
    """1 / std of the VAE posterior means over `batches`: unit-variance latents for the diffusion stages (how
    SD's 0.18215 was chosen)."""
    vae = state_lib.merge(trainer.setup.graphs.vae, jax.device_get(params), trainer.setup.frozen["vae"])
    encode_mean = jax.jit(lambda x: vae.encode(x)[0])
    pixels = [media.PIXEL_VALUES[b["pixel_values"]] if b["pixel_values"].dtype == np.uint8 else b["pixel_values"]
              for b in batches]
    means = [np.asarray(encode_mean(p.reshape((-1,) + p.shape[2:]))) for p in pixels]
    return float(1.0 / np.std(np.concatenate(means)))


def export(path, trainer: Trainer, params: dict, cfg, loader=None):
    """Writes the model directory of a finished task; for `vae` the config's scaling factor is measured on
    SCALE_BATCHES batches of `loader` (made from cfg when not given)."""
    if cfg.task == "pia":
        return loop.export(path, trainer, params, dtype=cfg.export_dtype)
    setup = trainer.setup
    params = jax.device_get(params)
    config = setup.config
    if cfg.task == "vae":
        made = loader is None
        loader = loader or loop.make_loader(cfg, setup.tokenizer, config.text.vocab_size)
        try:
            scale = latent_scale(trainer, params, [next(loader) for _ in range(SCALE_BATCHES)])
        finally:
            if made:
                getattr(loader, "close", lambda: None)()
        config = dataclasses.replace(config, vae=dataclasses.replace(config.vae, scaling_factor=scale))
    parts = {**setup.frozen, PART[cfg.task]: {**setup.frozen[PART[cfg.task]], **params}}
    return save_model_dir(path, config, {k: parts[k] for k in ("unet", "vae", "text_encoder")},
                          tokenizer=setup.tokenizer, scheduler=schedulers.to_dict(setup.scheduler),
                          dtype=cfg.export_dtype, force=True, report={"task": cfg.task, "trained": sorted(params)})
