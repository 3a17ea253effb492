"""The training run (`run`): resume, step, log, checkpoint, validate, survive pre-emption; and the run's loader
(`make_loader`, `check_data`). The export of a finished run is `tasks.export`.

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

from pia_jax.training import metrics as metrics_lib
from pia_jax.training.checkpoint import Checkpointer
from pia_jax.training.config import TrainConfig
from pia_jax.training.step import Trainer, TrainState


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
    return cfg.data.resolution // vae.latent_factor, vae.latent_channels


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


def run(cfg: TrainConfig, trainer: Trainer, loader, validate=None) -> Result:
    """Trains `cfg.steps` steps from the newest checkpoint of `cfg.workdir` (or from the start); `validate` (a
    `validation.Validator`, made by the caller) runs every `validation.every` steps."""
    run_ = _Run(cfg, trainer, loader, validate)
    try:
        run_.loop()
    finally:
        run_.close()
    return Result(run_.state, run_.status, run_.skipped)


class _Run:
    """One run's moving parts: checkpointer, writer, the state, the steps dispatched, the batch drawn ahead."""

    def __init__(self, cfg: TrainConfig, trainer: Trainer, loader, validate):
        self.cfg, self.trainer, self.loader, self.validate = cfg, trainer, loader, validate
        workdir = epath.Path(cfg.workdir)
        self.ckpt = Checkpointer(workdir / "checkpoints", cfg.checkpoint.keep, cfg.checkpoint.async_save)
        try:
            latest, restored = self.ckpt.restore_latest(trainer.abstract_state(), cfg.checkpoint.on_corrupt,
                                                        log=lambda m: print(f"warning: {m}", flush=True))
        except BaseException:
            self.ckpt.close()
            raise
        self.writer = metrics_lib.Writer(cfg.log.dir or workdir / "tensorboard", cfg.log.every, cfg.steps,
                                         latest or 0, cfg.log.tensorboard, cfg.log.progress_bar)
        self.ahead = None  # (batch, loader state) of the next step, drawn while the current one runs
        if latest is None:
            self.state = trainer.init_state(cfg.seed)
        else:
            self.state, data_state = restored
            loader.set_state(data_state)
            self.writer.log(f"resumed from step {latest} of {self.ckpt.directory}")
        self.step, self.skipped, self.status = latest or 0, 0, "done"  # step: the steps dispatched so far
        self.clips = cfg.data.batch_size * cfg.optim.grad_accum
        self.peak = metrics_lib.peak_flops(jax.devices()[0], cfg.log.peak_tflops)
        self.flops = self.last = None  # FLOPs per step (known once compiled); when the last step's metrics came
        self.consumed = None  # the loader state after the data of the last dispatched step
        self.preemption = Preemption()

    def draw(self):
        """The next step's batch on the devices, and the loader state after it (what a checkpoint of it holds)."""
        batches = [next(self.loader) for _ in range(self.cfg.optim.grad_accum)]
        return self.trainer.put_batch(batches), self.loader.get_state()

    def compile(self, batch):
        """Compiles (or finds compiled) the step before the first one runs, and counts its FLOPs."""
        start, loaded = time.perf_counter(), self.trainer.program.loaded
        self.trainer.compile(self.state, batch)
        self.flops, mesh = self.trainer.count_flops(batch), self.trainer.mesh
        how = "loaded the stored step" if self.trainer.program.loaded > loaded else "compiled the step"
        self.writer.log(f"{how} in {time.perf_counter() - start:.1f} s; {self.flops / 1e12:.4g} TFLOP "
                        f"per step of {self.clips} clips on {mesh.size} devices (mesh {dict(mesh.shape)})")
        self.last = time.perf_counter()

    def loop(self):
        cfg, pending, stop = self.cfg, None, False  # pending: (step, metrics) dispatched, metrics not read yet
        while self.step < cfg.steps and not stop:
            batch, data_state = self.ahead or self.draw()
            self.ahead = None
            if self.flops is None:
                self.compile(batch)
            self.state, metrics = self.trainer.step(self.state, batch)  # runs on the devices while the host goes on
            self.step, self.consumed = self.step + 1, data_state
            del batch
            if pending is not None:  # the step before, which ran while this one was dispatched
                stop = self.finish(*pending)
            pending = (self.step, metrics)
            save = self.step % cfg.checkpoint.every == 0 or self.step == cfg.steps
            validate = (self.validate is not None and bool(cfg.validation.every)
                        and self.step % cfg.validation.every == 0)
            if not (save or validate or stop):
                self.ahead = self.draw()  # the next batch, made and placed while this step runs
                continue
            stop = self.finish(*pending) or stop  # this step's state is needed now: nothing more is dispatched first
            pending = None
            self.after(save or stop, validate, stop, data_state)

    def finish(self, n: int, metrics) -> bool:
        """Reads step n's metrics (blocking until it is done), logs them, applies on_nonfinite; then whether any
        process got SIGTERM."""
        metrics = jax.device_get(metrics)
        now = time.perf_counter()
        seconds, self.last = now - self.last, now
        if not metrics["finite"]:
            message = (f"step {n}: non-finite loss ({metrics['loss']}) or gradient norm "
                       f"({metrics['grad_norm']}); the step was not applied")
            if self.cfg.on_nonfinite == "stop":
                self.ckpt.wait()
                raise NonFiniteError(f"{message}. Stopping; the last good checkpoint is step "
                                     f"{self.ckpt.latest_step()} in {self.ckpt.directory} (set on_nonfinite=skip to "
                                     "skip such steps instead)")
            self.skipped += 1
            self.writer.log(f"{message}; skipped ({self.skipped} so far)")
        self.writer.scalars(n, metrics_lib.step_scalars(metrics, seconds, self.clips, self.flops, self.peak,
                                                        self.trainer.mesh.size))
        return self.preemption.requested()

    def after(self, save: bool, validate: bool, stop: bool, data_state):
        """Checkpoints, validates and stops after a finished step, as asked."""
        if save:
            self.ckpt.save(self.step, self.state, data_state)
            self.writer.flush()  # a kill after this loses no logged step up to the checkpoint
        if validate:
            self.validate(self.state, self.step, self.writer)
            self.last = time.perf_counter()
        if stop:
            self.status = "preempted"
            self.writer.log(f"SIGTERM: saved step {self.step} in {self.ckpt.directory}; stopping")

    def close(self):
        if self.ahead is not None:  # drawn for a step that never ran: the loader continues after the consumed data
            self.loader.set_state(self.consumed)
        self.ckpt.wait()
        self.ckpt.close()
        self.writer.close()
        self.preemption.restore()
