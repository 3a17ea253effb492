"""The PIA objective and the one jit-compiled training step, with its shardings.

One step = k micro-batches (a `lax.scan`) -> the averaged gradient -> global-norm clipping -> AdamW. Per micro-batch:
frozen VAE encode (posterior sample x scaling factor) and text encode, t ~ U{0..999} and noise per video, the noisy
latent with PIA's condition channels, the MSE to the model's prediction target (epsilon for SD1.5 and PIA; the
velocity for a v-prediction model).

Batches: pixel_values come as uint8 levels (a quarter of float32's host-to-device bytes) and are mapped to [-1, 1]
inside the step, to the data pipeline's exact float32 values (pia_jax/data/clips.py); float32 pixels in [-1, 1] are
taken as they are. A batch from a latent cache (pia_jax/data/latents.py) carries the VAE posterior instead
(latent_mean, latent_logvar): the step then samples it with the same noise draw, so the objective is the same and the
VAE encoder is not part of the compiled step.

Differences from the reference, on purpose:
  * clipping acts once on the accumulated, averaged gradient. The reference clips after every micro-batch
    backward, before GradScaler's unscale, so each new (scaled) micro-batch gradient swamps the earlier ones and
    only ~the last of its 16 micro-batches counts. Here k micro-batches of B are one step on the k*B batch.
  * every random draw is made per video from its own key (fold_in(rng, step), then the video's index in the
    step), so results do not depend on the device count, the mesh or how the batch is split into micro-batches.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from pia_jax import compiled, media
from pia_jax.models import attention
from pia_jax.models import config as model_config
from pia_jax.models.vae import sample_posterior
from pia_jax.sampling import schedulers
from pia_jax.sharding import BATCH_AXES, batch_sharding, param_shardings, replicated
from pia_jax.training.metrics import count_flops
from pia_jax.training.state import Graphs, Setup, abstract_models, make_graphs, merge

# every key a batch may hold; a batch has pixel_values or (latent_mean, latent_logvar), and all the others
BATCH_KEYS = ("pixel_values", "latent_mean", "latent_logvar", "input_ids", "affinity", "cond_frame", "use_condition")


class TrainState(NamedTuple):
    step: jax.Array  # int32 (): optimizer steps taken (skipped non-finite steps included)
    params: dict  # trainable UNet weights by NNX path, fp32
    opt_state: optax.OptState
    rng: jax.Array  # raw uint32 key data: step s draws from fold_in(rng, s)


def float_pixels(pixels):
    """A batch's pixel_values as float32 in [-1, 1]: uint8 levels mapped to the data pipeline's own values."""
    if pixels.dtype == jnp.uint8:
        return jnp.take(jnp.asarray(media.PIXEL_VALUES), pixels.astype(jnp.int32), axis=0)
    return pixels


def encode(graphs: Graphs, frozen: dict, batch: dict, post_keys, scaling: float):
    """Latents (b, f, h, w, 4) fp32 = VAE posterior samples x scaling, and text states (b, 77, d).

    The posterior is the frozen VAE's encode of pixel_values (uint8 levels -> the float32 values of
    pia_jax.media.PIXEL_VALUES, or float32 in [-1, 1]), or the batch's cached latent_mean and latent_logvar
    (any float dtype). The noise is drawn per video from post_keys with the latents' shape either way."""
    text = merge(graphs.text_encoder, frozen["text_encoder"])
    if "latent_mean" in batch:
        mean, logvar = (batch[k].astype(jnp.float32) for k in ("latent_mean", "latent_logvar"))
    else:
        vae = merge(graphs.vae, frozen["vae"])
        pixels = float_pixels(batch["pixel_values"])
        b, f = pixels.shape[:2]
        mean, logvar = vae.encode(pixels.reshape((b * f,) + pixels.shape[2:]))
        mean, logvar = (x.astype(jnp.float32).reshape((b, f) + x.shape[1:]) for x in (mean, logvar))
    noise = jax.vmap(lambda k: jax.random.normal(k, mean.shape[1:]))(post_keys)
    return sample_posterior(mean, logvar, noise) * scaling, text(batch["input_ids"])


def denoising_loss(params, frozen_unet, graph, latents, context, batch, t, noise, scheduler):
    """MSE to the prediction target of `scheduler` (a SchedulerConfig: epsilon in the reference), mean over all
    elements. The mask channel is each frame's affinity coefficient, the condition the latent of the clip's
    condition frame on every frame; both are zero where use_condition is False."""
    unet = merge(graph, params, frozen_unet)
    use = batch["use_condition"].astype(jnp.float32)
    mask = (batch["affinity"] * use[:, None])[:, :, None, None, None]
    cond = jnp.take_along_axis(latents, batch["cond_frame"][:, None, None, None, None], axis=1)
    cond = cond * use[:, None, None, None, None]
    pred = unet(schedulers.add_noise(scheduler, latents, noise, t), t, context, mask=mask, condition=cond)
    return jnp.mean(jnp.square(pred - schedulers.training_target(scheduler, latents, noise, t)))


def diffusion_inputs(graphs: Graphs, frozen: dict, mb: dict, keys_Bx3, scheduler, scaling):
    """(latents, text states, t ~ U{0..T-1}, noise) of one micro-batch; keys_Bx3: per video, the keys of the
    posterior, t and the noise. Shared by every denoising task (PIA here, t2i in tasks.py)."""
    latents, context = encode(graphs, frozen, mb, keys_Bx3[:, 0], scaling)
    t = jax.vmap(lambda key: jax.random.randint(key, (), 0, scheduler.num_train_timesteps))(keys_Bx3[:, 1])
    noise = jax.vmap(lambda key: jax.random.normal(key, latents.shape[1:]))(keys_Bx3[:, 2])
    return latents, context, t, noise


def pia_loss(params, frozen, graphs: Graphs, mb: dict, keys_Bx3, scheduler, scaling):
    """The PIA objective on one micro-batch; keys_Bx3: per video, the keys of the posterior, t and the noise."""
    latents, context, t, noise = diffusion_inputs(graphs, frozen, mb, keys_Bx3, scheduler, scaling)
    return denoising_loss(params, frozen["unet"], graphs.unet, latents, context, mb, t, noise, scheduler)


def data_parallel(value_and_grad, mesh: jax.sharding.Mesh):
    """value_and_grad(params, frozen, micro-batch, keys) with the batch split over every device of `mesh`: each
    device differentiates its own videos and the (fp32) losses and gradients are averaged over the devices. Left to
    XLA's partitioner, the gradient of each bf16 matmul was summed across devices in bf16, before its cast to the
    fp32 weight's gradient (BENCHMARKS.md, the TPU table); here the sum is one fp32 all-reduce, as PyTorch's DDP."""
    if mesh.size == 1:
        return value_and_grad

    def per_device(params, frozen, mb, keys):
        with attention.compiling_for(mesh, manual=True):  # Pallas kernels already run per device here
            return jax.lax.pmean(value_and_grad(params, frozen, mb, keys), BATCH_AXES)

    return jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), P(BATCH_AXES), P(BATCH_AXES)),
                         out_specs=P(), check_vma=False)


def train_step(graphs, tx, scheduler, scaling, shardings, mesh, state: TrainState, frozen, batch,
               loss_fn=pia_loss):
    """batch: {key: (k, B, ...)}, k micro-batches of B videos. Returns the new state and the step's metrics.
    `loss_fn` (signature of `pia_loss`) is the objective; other training tasks (pia_jax/training/tasks.py) swap it."""
    k, b = batch["input_ids"].shape[:2]
    keys = jax.random.split(jax.random.fold_in(state.rng, state.step), k * b)
    keys = jax.vmap(lambda key: jax.random.split(key, 3))(keys).reshape(k, b, 3, -1)
    # Weights are stored sharded; gather them once per step (not per micro-batch) and run data-parallel.
    full, frozen = jax.lax.with_sharding_constraint((state.params, frozen), shardings["replicated"])
    value_and_grad = data_parallel(jax.value_and_grad(
        lambda params, frozen, mb, keys_Bx3: loss_fn(params, frozen, graphs, mb, keys_Bx3, scheduler, scaling)), mesh)

    def micro(acc, xs):
        mb, keys_Bx3 = xs
        loss, grads = value_and_grad(full, frozen, mb, keys_Bx3)
        acc = jax.lax.with_sharding_constraint(jax.tree.map(jnp.add, acc, grads), shardings["params"])
        return acc, loss

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    if k == 1:  # XLA:CPU runs convolutions inside a loop (scan) ~35x slower (toy VAE step: 0.93 s -> 33 s)
        grads, loss = micro(zeros, jax.tree.map(lambda x: x[0], (batch, keys)))
        losses = loss[None]
    else:
        grads, losses = jax.lax.scan(micro, zeros, (batch, keys))
    grads, loss = jax.tree.map(lambda g: g / k, grads), losses.mean()
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": opt_state[1].hyperparams["learning_rate"],
               "finite": finite}
    return TrainState(state.step + 1, keep(params, state.params), keep(opt_state, state.opt_state), state.rng), metrics


class Trainer:
    """The compiled step for one model setup, optimizer and mesh, and the placement of everything it takes."""

    def __init__(self, setup: Setup, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh, loss_fn=pia_loss,
                 identity: str | None = None):
        """`identity`: what `tx` and `loss_fn` were made from (config.program_identity): given, the compiled step
        is stored beside jax's compilation cache (when that is on), and a resumed run loads it (pia_jax.compiled)."""
        self.setup, self.tx, self.mesh = setup, tx, mesh
        self.param_shardings = param_shardings(setup.trainable, mesh)
        self.frozen_shardings = {part: param_shardings(flat, mesh) for part, flat in setup.frozen.items()}
        frozen_dtype = model_config.dtype(setup.model.frozen_dtype)
        self.frozen = jax.tree.map(lambda v, s: place(v, s, frozen_dtype), setup.frozen, self.frozen_shardings)
        abstract = self.abstract_state()
        self.state_shardings = jax.tree.map(lambda a: a.sharding, abstract)
        self.batch_shardings = batch_sharding(mesh, 1)  # every batch array: (k, B, ...) split by video (axis 1)
        shardings = {"params": self.param_shardings, "replicated": jax.tree.map(
            lambda _: replicated(mesh), (setup.trainable, setup.frozen))}
        self._step_args = (tx, setup.scheduler, setup.config.vae.scaling_factor, shardings, mesh)
        self._loss_fn = loss_fn
        # compiled ahead of time per batch shape (pia_jax.compiled, shared with the sampler); frozen weights not keyed
        self.program = compiled.Program(
            functools.partial(train_step, setup.graphs, *self._step_args, loss_fn=loss_fn), mesh,
            in_shardings=(self.state_shardings, self.frozen_shardings, self.batch_shardings),
            out_shardings=(self.state_shardings, replicated(mesh)), donate_argnums=0, identity=identity)

    def abstract_state(self) -> TrainState:
        """The state's shapes, dtypes and shardings (a restore target), computed without allocating anything."""
        params = {k: jax.ShapeDtypeStruct(v.shape, jnp.float32, sharding=self.param_shardings[k])
                  for k, v in self.setup.trainable.items()}
        opt = jax.eval_shape(self.tx.init, params)
        # optimizer leaves that mirror a parameter (Adam moments) take its sharding; scalars are replicated
        opt = jax.tree_util.tree_map_with_path(lambda path, a: jax.ShapeDtypeStruct(
            a.shape, a.dtype, sharding=self._sharding_at(path)), opt)
        scalar = lambda dtype, shape=(): jax.ShapeDtypeStruct(shape, dtype, sharding=replicated(self.mesh))  # noqa
        key_shape = jax.random.key_data(jax.random.key(0)).shape  # (2,) for the default threefry keys
        return TrainState(scalar(jnp.int32), params, opt, scalar(jnp.uint32, key_shape))

    def _sharding_at(self, path):
        names = [getattr(p, "key", None) for p in path]
        return next((self.param_shardings[n] for n in reversed(names) if n in self.param_shardings),
                    replicated(self.mesh))

    def init_state(self, seed: int) -> TrainState:
        params = {k: put(v, self.param_shardings[k]) for k, v in self.setup.trainable.items()}
        opt_state = jax.jit(self.tx.init, out_shardings=self.state_shardings.opt_state)(params)
        rng = put(np.asarray(jax.random.key_data(jax.random.key(seed))), replicated(self.mesh))
        return TrainState(put(np.int32(0), replicated(self.mesh)), params, opt_state, rng)

    def put_batch(self, micro_batches: list[dict]) -> dict:
        """k host-local batches {key: (B_host, ...)} -> global arrays (k, B, ...) split by video over the mesh, at
        the dtypes the loader made (uint8 pixels, cached latents at their stored dtype): the step converts."""
        out = {}
        for key in BATCH_KEYS:
            if key not in micro_batches[0]:
                continue
            local = np.stack([np.asarray(mb[key]) for mb in micro_batches])
            shape = (local.shape[0], local.shape[1] * jax.process_count()) + local.shape[2:]
            out[key] = jax.make_array_from_process_local_data(self.batch_shardings, local, shape)
        return out

    def compile(self, state: TrainState, batch: dict):
        """The executable for this batch shape (compiled once, ahead of the first step; timed: program.seconds)."""
        return self.program.get(_shape_key(batch), state, self.frozen, batch)

    def lower(self, state: TrainState, batch: dict):
        """The step lowered for this mesh's devices (arguments may be shapes: `abstract_state`, `batch_shapes`)."""
        return self.program.lower(state, self.frozen, batch)

    def batch_shapes(self, micro_batches: int, clips: int, frames: int, size: int, latents=None) -> dict:
        """The global batch of `micro_batches` x `clips` clips of frames x size² pixels as shapes with the step's
        shardings: what `lower` takes to compile without data (bench/tpu_aot.py). Pixels are uint8, as loaders
        make them; `latents` (a dtype, e.g. jnp.float32 or jnp.bfloat16) gives a latent-cache batch instead: the
        VAE posterior of each frame, (size / the VAE's latent factor)² x latent channels."""
        k, b, f = micro_batches, clips, frames
        vae = self.setup.config.vae
        side = size // vae.latent_factor
        clip = ({"latent_mean": ((k, b, f, side, side, vae.latent_channels), latents),
                 "latent_logvar": ((k, b, f, side, side, vae.latent_channels), latents)} if latents is not None
                else {"pixel_values": ((k, b, f, size, size, 3), jnp.uint8)})
        shapes = {**clip, "input_ids": ((k, b, 77), jnp.int32), "affinity": ((k, b, f), jnp.float32),
                  "cond_frame": ((k, b), jnp.int32), "use_condition": ((k, b), jnp.bool_)}
        return {key: jax.ShapeDtypeStruct(*shapes[key], sharding=self.batch_shardings) for key in BATCH_KEYS
                if key in shapes}

    def step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        return self.compile(state, batch)(state, self.frozen, batch)

    def count_flops(self, batch: dict) -> float:
        """Model FLOPs of one step on `batch`: all-XLA attention and no rematerialisation (see metrics.py)."""
        def count():
            graphs = make_graphs(abstract_models(self.setup.config, self.setup.model, attention="xla", remat=False))
            step = functools.partial(train_step, graphs, *self._step_args, loss_fn=self._loss_fn)
            return count_flops(step, self.abstract_state(), self.frozen, batch)
        return self.program.remember(_shape_key(batch), "flops", count)  # stored with the step: no trace on resume


def _shape_key(batch: dict) -> tuple:
    return tuple((k, v.shape, str(v.dtype)) for k, v in sorted(batch.items()))  # uint8 or float pixels: two programs


def place(value, sharding, dtype):
    """A host weight cast to `dtype` and placed with `sharding`; a shape-only weight (jax.ShapeDtypeStruct, an
    abstract Setup) stays a shape, with that dtype and sharding."""
    if isinstance(value, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(value.shape, dtype, sharding=sharding)
    return put(np.asarray(value).astype(dtype), sharding)


def put(value, sharding) -> jax.Array:
    """A host array (the same on every process) placed with `sharding`, which may span several processes."""
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx])
