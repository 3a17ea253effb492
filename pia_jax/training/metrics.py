"""Training metrics: a FLOP count of the step, model FLOP utilisation, and the stdout / TensorBoard writer.

FLOPs are counted on the step's jaxpr (matmuls and convolutions, forward and backward), so the count does not
depend on the backend: XLA's own cost analysis misses cuDNN convolutions and attention, which compile to custom
calls. Model FLOPs exclude rematerialisation's recomputation, as MFU conventionally does.
"""

import math
import sys
import time

import jax
import numpy as np

# Dense bf16 peak TFLOP/s per device (vendor specifications), by substring of `device_kind`; MFU is relative to it.
PEAK_TFLOPS = (("H200", 989.0), ("H100", 989.0), ("A100", 312.0), ("L4", 121.0), ("v6", 918.0), ("v5p", 459.0),
               ("v5 lite", 197.0), ("v5e", 197.0), ("v4", 275.0), ("v3", 123.0))


def _eqn_flops(eqn) -> float:
    name = eqn.primitive.name
    if name == "dot_general":
        (contract, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        return 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract)
    if name == "conv_general_dilated":
        rhs, spec = eqn.invars[1].aval.shape, eqn.params["dimension_numbers"].rhs_spec
        # rhs_spec = (out feature dim, in feature dim, *spatial dims): each output element is one dot product over
        # the kernel window and its input features (already divided by feature groups)
        return 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(rhs[d] for d in spec[1:])
    total = 0.0
    # sub-computations run once, a scan body `length` times, a shard_map body once on each device it splits over
    times = eqn.params.get("length", 1) if name == "scan" else 1
    if name == "shard_map":
        times = math.prod(eqn.params["mesh"].shape[a] for a in eqn.params["newly_manual_axes"])
    for value in eqn.params.values():  # jit, remat, custom_vjp, scan bodies, cond branches, shard_map
        for sub in value if isinstance(value, (tuple, list)) else (value,):
            jaxpr = getattr(sub, "jaxpr", sub)
            if hasattr(jaxpr, "eqns"):
                total += jaxpr_flops(jaxpr) * times
    return total


def jaxpr_flops(jaxpr) -> float:
    return sum(_eqn_flops(e) for e in jaxpr.eqns)


def count_flops(fn, *args) -> float:
    """Matmul + convolution FLOPs of fn(*args) (abstract args are fine: only the jaxpr is built)."""
    return jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)


def peak_flops(device, override_tflops: float | None = None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    kind = device.device_kind
    return next((tf * 1e12 for key, tf in PEAK_TFLOPS if key.lower() in kind.lower()), None)


class Writer:
    """Scalars to stdout every `every` steps and to TensorBoard event files (process 0 only); a tqdm progress bar
    when stdout is a terminal."""

    def __init__(self, logdir, every: int, total_steps: int, start_step: int, tensorboard: bool, progress_bar: bool):
        self.every, self.main = every, jax.process_index() == 0
        self.tb = None
        if self.main and tensorboard:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(str(logdir))
        self.bar = None
        if self.main and progress_bar and sys.stdout.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def scalars(self, step: int, values: dict, force: bool = False):
        if not self.main:
            return
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{values.get('train/loss', float('nan')):.4f}", refresh=False)
        if force or step % self.every == 0:
            self.log(f"step {step}: " + ", ".join(f"{k.split('/')[-1]} {_fmt(v)}" for k, v in values.items()))

    def log(self, message: str):
        if not self.main:
            return
        line = f"[{time.strftime('%H:%M:%S')}] {message}"
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def flush(self):
        if self.tb is not None:
            self.tb.flush()

    def close(self):
        if self.tb is not None:
            self.tb.close()
        if self.bar is not None:
            self.bar.close()


def _fmt(v) -> str:
    v = float(v)
    return f"{v:.4g}" if v == 0 or 1e-3 <= abs(v) < 1e5 else f"{v:.3e}"


def step_scalars(metrics: dict, seconds: float, clips: int, flops: float, peak: float | None, devices: int) -> dict:
    """The logged scalars of one step from its device metrics and host timing.

    train/grad_norm_unclipped is the global L2 norm of the step's accumulated, averaged gradient BEFORE clipping
    (what torch's clip_grad_norm_ returns; the reference logs the norm after it); the gradient Adam receives has norm
    min(that, optim.clip_norm), so a value above clip_norm means the step was clipped."""
    out = {"train/loss": metrics["loss"], "train/grad_norm_unclipped": metrics["grad_norm"], "train/lr": metrics["lr"],
           "perf/step_seconds": seconds, "perf/clips_per_second": clips / seconds}
    if flops and np.isfinite(flops):
        out["perf/tflops_per_device"] = flops / seconds / devices / 1e12
        if peak:
            out["perf/mfu"] = flops / seconds / devices / peak
    return out
