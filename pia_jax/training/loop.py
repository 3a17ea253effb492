"""The training run: resume, step, log, checkpoint, validate, survive pre-emption, export.

A run resumes from the newest complete, readable checkpoint in `{workdir}/checkpoints` if there is one (see
`Checkpointer.restore_latest`). SIGTERM (pre-emption) finishes the steps already dispatched (at most two), saves a
checkpoint and returns `status="preempted"` (train.py then exits with `sigterm_exit_code`); a non-finite loss or
gradient either stops the run (`NonFiniteError`; the step did not touch the weights and nothing after the last good
checkpoint is saved) or is skipped, as `on_nonfinite` says.

The devices are kept busy: step n+1 is dispatched before step n's metrics are read (JAX runs steps
asynchronously), and while step n runs the host makes batch n+1 and puts it on the devices (`Trainer.put_batch`).
Metrics are read one step late, still every step and in order. Steps that checkpoint or validate (and the last)
are finished before anything more is dispatched or drawn, since the next step consumes (donates) their state; a
checkpoint holds the loader state after the batches its step consumed, and a run that ends with a batch drawn
ahead hands it back (`loader.set_state`), so resuming, or reading the loader after `run`, continues exactly after
the data the returned state has seen.
"""

import signal
import threading
import time
from dataclasses import dataclass

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from pia_jax.sampling import schedulers
from pia_jax.training import metrics as metrics_lib
from pia_jax.training.checkpoint import Checkpointer
from pia_jax.training.config import TrainConfig
from pia_jax.training.step import Trainer, TrainState
from pia_jax.weights.model_dir import save_model_dir


class NonFiniteError(RuntimeError):
    pass


@dataclass
class Result:
    state: TrainState
    status: str  # "done" or "preempted"
    skipped: int  # non-finite steps skipped


class Preemption:
    """SIGTERM sets a flag (in the main thread only; elsewhere the handler cannot be installed); every process
    learns whether any process got one, so all of them save the same step and stop together."""

    def __init__(self):
        self.flag, self.previous = False, None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.flag = True

    def requested(self) -> bool:
        if jax.process_count() == 1:
            return self.flag
        return bool(multihost_utils.process_allgather(np.int32(self.flag)).any())

    def restore(self):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def check_data(cfg: TrainConfig) -> dict | None:
    """Raises ValueError (pia_jax.data.LatentMismatch for a latent cache) where the data cannot serve this run; with
    data.latents, checks the dataset's cached latents against the clips and the VAE of this run (reads no weights,
    hashes vae.safetensors), so it can run before the model is built. Returns the cache's metadata entry or None."""
    d = cfg.data
    if d.latents and cfg.task == "vae":
        raise ValueError("data.latents=true: the vae task trains the VAE on pixels; set data.latents=false")
    if d.latents and d.path:
        from pia_jax.data import dataset_metadata, latents
        return latents.check(dataset_metadata(d.path), d, cfg.model.model_dir)
    return None


def _latent_side(cfg: TrainConfig) -> tuple[int, int]:
    """(latent side, channels) of the model's VAE at data.resolution."""
    from pia_jax.models import config as model_config
    from pia_jax.weights.model_dir import read_config
    vae = (read_config(cfg.model.model_dir)[0] if cfg.model.model_dir else model_config.MODELS[cfg.model.init]).vae
    return cfg.data.resolution // 2 ** (len(vae.block_out_channels) - 1), vae.latent_channels


def make_loader(cfg: TrainConfig, tokenizer, vocab_size: int):
    """This process's share of each global batch: a prepared dataset (`data.path`; its latent cache with
    data.latents, checked by `check_data`), or synthetic clips (synthetic latents with data.latents)."""
    d, n = cfg.data, jax.process_count()
    if d.batch_size % jax.device_count():
        raise ValueError(f"data.batch_size={d.batch_size} must be a multiple of the {jax.device_count()} devices")
    check_data(cfg)
    common = dict(batch_size=d.batch_size // n, seed=cfg.seed, process_index=jax.process_index(), process_count=n)
    if d.path is None:
        from pia_jax.training.synthetic import SyntheticLoader
        side, channels = _latent_side(cfg) if d.latents else (None, 4)
        return SyntheticLoader(n_frames=d.n_frames, resolution=d.resolution, vocab_size=vocab_size, latent_size=side,
                               latent_channels=channels, **common)
    from pia_jax import data
    if tokenizer is None:
        raise ValueError("training on a dataset needs the model directory's tokenizer")
    return data.Loader(data.open_dataset(d.path), tokenizer, d, num_workers=d.workers, **common)


def run(cfg: TrainConfig, trainer: Trainer, loader) -> Result:
    workdir = epath.Path(cfg.workdir)
    ckpt = Checkpointer(workdir / "checkpoints", cfg.checkpoint.keep, cfg.checkpoint.async_save)
    try:
        latest, restored = ckpt.restore_latest(trainer.abstract_state(), cfg.checkpoint.on_corrupt,
                                               log=lambda m: print(f"warning: {m}", flush=True))
    except BaseException:
        ckpt.close()
        raise
    writer = metrics_lib.Writer(cfg.log.dir or workdir / "tensorboard", cfg.log.every, cfg.steps, latest or 0,
                                cfg.log.tensorboard, cfg.log.progress_bar)
    if latest is None:
        state = trainer.init_state(cfg.seed)
    else:
        state, data_state = restored
        loader.set_state(data_state)
        writer.log(f"resumed from step {latest} of {ckpt.directory}")
    step, skipped, status = latest or 0, 0, "done"  # step: the steps dispatched so far
    clips = cfg.data.batch_size * cfg.optim.grad_accum
    peak = metrics_lib.peak_flops(jax.devices()[0], cfg.log.peak_tflops)
    preemption = Preemption()
    flops, last = None, None

    def draw():
        """The next step's batch on the devices, and the loader state after it (what a checkpoint of it holds)."""
        return trainer.put_batch([next(loader) for _ in range(cfg.optim.grad_accum)]), loader.get_state()

    def finish(n: int, metrics) -> bool:
        """Reads step n's metrics (blocking until it is done), logs them, applies on_nonfinite; then whether any
        process got SIGTERM."""
        nonlocal skipped, last
        metrics = jax.device_get(metrics)
        now = time.perf_counter()
        seconds, last = now - last, now
        if not metrics["finite"]:
            message = (f"step {n}: non-finite loss ({metrics['loss']}) or gradient norm "
                       f"({metrics['grad_norm']}); the step was not applied")
            if cfg.on_nonfinite == "stop":
                ckpt.wait()
                raise NonFiniteError(f"{message}. Stopping; the last good checkpoint is step "
                                     f"{ckpt.latest_step()} in {ckpt.directory} (set on_nonfinite=skip to skip "
                                     "such steps instead)")
            skipped += 1
            writer.log(f"{message}; skipped ({skipped} so far)")
        writer.scalars(n, metrics_lib.step_scalars(metrics, seconds, clips, flops, peak, trainer.mesh.size))
        return preemption.requested()

    pending = None  # (step, metrics) dispatched, metrics not read yet
    ahead = None  # (batch, loader state) of the next step, drawn while the current one runs
    consumed = None  # the loader state after the data of the last dispatched step
    stop = False
    try:
        while step < cfg.steps and not stop:
            batch, data_state = ahead or draw()
            ahead = None
            if flops is None:  # the first step: compile (or find compiled) ahead of running
                start = time.perf_counter()
                trainer.compile(state, batch)
                flops = trainer.count_flops(batch)
                writer.log(f"compiled the step in {time.perf_counter() - start:.1f} s; {flops / 1e12:.4g} TFLOP per "
                           f"step of {clips} clips on {trainer.mesh.size} devices (mesh {dict(trainer.mesh.shape)})")
                last = time.perf_counter()
            state, metrics = trainer.step(state, batch)  # dispatched: runs on the devices while the host goes on
            step, consumed = step + 1, data_state
            del batch
            if pending is not None:  # the step before, which ran while this one was dispatched
                stop = finish(*pending)
            pending = (step, metrics)
            save = step % cfg.checkpoint.every == 0 or step == cfg.steps
            validate_now = bool(cfg.validation.every) and step % cfg.validation.every == 0
            if not (save or validate_now or stop):
                ahead = draw()  # the next batch, made and placed while this step runs
                continue
            stop = finish(*pending) or stop  # this step's state is needed now: nothing more is dispatched first
            pending = None
            if save or stop:
                ckpt.save(step, state, data_state)
                writer.flush()  # a kill after this loses no logged step up to the checkpoint
            if validate_now:
                from pia_jax.training.validation import validate
                validate(cfg, trainer, state, step, writer)
                last = time.perf_counter()
            if stop:
                status = "preempted"
                writer.log(f"SIGTERM: saved step {step} in {ckpt.directory}; stopping")
    finally:
        if ahead is not None:  # drawn for a step that never ran: the loader continues after the consumed data
            loader.set_state(consumed)
        ckpt.wait()
        ckpt.close()
        writer.close()
        preemption.restore()
    return Result(state, status, skipped)


def export(path, trainer: Trainer, params: dict, *, dtype: str = "fp16", force: bool = True):
    """Writes the trained UNet (trained weights merged into the frozen ones), the VAE, the text encoder, the
    tokenizer and the scheduler as a model directory that sample.py loads (process 0 writes)."""
    setup = trainer.setup
    params = multihost_utils.process_allgather(params, tiled=True)  # numpy on every process
    if jax.process_index() != 0:
        return None
    models = {**setup.frozen, "unet": {**setup.frozen["unet"], **params}}
    return save_model_dir(path, setup.config, models, tokenizer=setup.tokenizer,
                          scheduler=schedulers.to_dict(setup.scheduler), dtype=dtype, force=force,
                          report={"trained": sorted(params)})
