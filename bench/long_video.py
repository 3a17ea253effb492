"""Long videos: time per frame and compiled memory of the windowed sampler at 16, 64 and 128 frames.

    python -m bench.long_video --config tiny --size 64 --steps 4                  # CPU: small (say so in the table)
    python -m bench.long_video --config sd15 --size 512 --steps 25                # GPU: the issue's 512² question
    python -m bench.long_video --model models/pia-sd15 --frames 16 64 128 --context-mode unet --window-batch 2
    python -m bench.long_video --config tiny --size 256 --memory-only --context-mode attention unet whole

--context-mode: attention (FreeNoise inside the motion modules, spatial layers on chunks of --context-length
frames, as the sampler runs it), unet (the whole UNet per window), or `whole`: attention mode without the frame
chunks (not a sampler option: what chunking saves). --memory-only compiles and reads the programs without running
them (`whole` is always memory-only: one guided UNet evaluation, compiled from shapes).

Random weights unless --model (time and memory do not depend on their values). Every size runs through the public
`Animator` call with context windows (default: 16 frames every 4, pyramid blend, one window per UNet call), once
to compile and then --repeats timed calls, of which the fastest counts. One JSON line per size:
  ms_per_frame        (encode + denoise + decode) seconds of that call / frames, in ms
  denoise_peak_bytes  the compiled denoise program's `memory_analysis()`: argument + output + temp bytes (weights
                      included); `denoise_beyond_weights_bytes` is what memory.py plans batches with (without the
                      weights, and donated buffers counted once)
  device_peak_bytes   the device's peak in use since the process began (accelerators; null on CPU): the sizes run in
                      the order given, so with ascending sizes it is the peak up to this size
Windows keep the UNet's activations at one window batch, so temp bytes should barely grow with the frames; the
arguments and outputs (latents, per-frame condition) grow linearly but are small.
"""

import argparse
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np

from bench.sample import DTYPES, random_animator, resolve_dtype
from pia_jax.models import config
from pia_jax.sampling import Animator, SampleOptions, affinity, loop, memory

PHASES = ("encode", "denoise", "decode")


def make_animator(a) -> Animator:
    dtype = resolve_dtype(a.dtype)
    if a.model:
        return Animator.load(a.model, dtype=dtype, compile_cache_dir=a.compile_cache)
    return random_animator(config.MODELS[a.config], dtype, a.compile_cache)


def bench_frames(animator: Animator, frames: int, mode: str, a) -> dict:
    """One size in one context mode: the sampler's calls (unless --memory-only) and its denoise program's memory."""
    if mode == "whole":
        return {**describe(animator, frames, mode, a), **whole_unet_memory(animator, frames, a)}
    options = SampleOptions(steps=a.steps, context_length=a.context_length, context_stride=a.context_stride,
                            context_weighting=a.context_weighting, window_batch=a.window_batch,
                            free_noise=a.free_noise, context_mode=mode)
    timing = {} if a.memory_only else time_calls(animator, frames, options, a)
    # the denoise program the calls ran (compiled once, cached by shape): its memory as XLA planned it
    compiled = animator.compilations
    _, (denoise, weights), _ = animator._executables(animator.devices, a.size, a.size, frames, options)
    assert a.memory_only or animator.compilations == compiled, "not the program the calls ran: its shapes differ"
    m = denoise.memory_analysis()
    stats = jax.devices()[0].memory_stats() or {}
    return {
        **describe(animator, frames, mode, a), **timing,
        "denoise_argument_bytes": m.argument_size_in_bytes, "denoise_output_bytes": m.output_size_in_bytes,
        "denoise_temp_bytes": m.temp_size_in_bytes, "denoise_alias_bytes": m.alias_size_in_bytes,
        "denoise_peak_bytes": m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes,
        "denoise_beyond_weights_bytes": memory.program_bytes(denoise, weights), "unet_weight_bytes": weights,
        "device_peak_bytes": stats.get("peak_bytes_in_use"),
    }


def describe(animator: Animator, frames: int, mode: str, a) -> dict:
    return {
        "frames": frames, "size": a.size, "steps": a.steps, "model": str(a.model or a.config),
        "dtype": np.dtype(jax.tree.leaves(animator._unet)[0].dtype).name,
        "backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
        "window": {"mode": mode, "length": a.context_length, "stride": a.context_stride,
                   "weighting": a.context_weighting, "batch": a.window_batch, "free_noise": a.free_noise},
    }


def time_calls(animator: Animator, frames: int, options: SampleOptions, a) -> dict:
    """Seconds of the fastest of --repeats calls after the compiling one."""
    images = np.random.default_rng(0).integers(0, 256, (1, a.size, a.size, 3), np.uint8)
    mask = affinity.preset_affinity("moderate", frames)[None]  # ignored by a text-to-video (4-channel) model
    run = lambda: animator(images, ["a cat walking"], [""], mask, options, seeds=[0])
    first = run()
    best = min((run() for _ in range(a.repeats)), key=lambda r: sum(r.seconds[k] for k in PHASES))
    seconds = {k: round(best.seconds[k], 4) for k in PHASES}
    return {"compile_s": round(first.seconds["compile"], 2), "seconds": seconds,
            "ms_per_frame": round(1e3 * sum(seconds.values()) / frames, 2),
            "denoise_ms_per_frame": round(1e3 * seconds["denoise"] / frames, 2)}


def whole_unet_memory(animator: Animator, frames: int, a) -> dict:
    """Attention mode without frame chunks: one guided UNet evaluation (CFG batch of 2) with the motion modules'
    window fusion and every layer on all frames, compiled from shapes (the sampler never runs this)."""
    cfg = animator.config
    window = SampleOptions(context_length=a.context_length, context_stride=a.context_stride,
                           context_weighting=a.context_weighting).window(frames, cfg.unet.motion_max_seq_length)
    unet_graph, weights = animator._parts.unet, animator._unet
    arrays = window.arrays()

    def eps(weights, x, text, mask, cond):
        unet = functools.partial(unet_graph.merge(weights), temporal_windows=arrays)  # no frame_chunk
        return loop.guided_eps(unet, x, 500, text, mask, cond, 7.5, True)

    f, h, w, c = cfg.vae.latent_shape(a.size, a.size, frames)
    shape = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
    t2v = animator.text_to_video
    args = (shape(1, f, h, w, c), shape(1, 2, 77, cfg.unet.cross_attention_dim), None if t2v else shape(1, f),
            None if t2v else shape(1, h, w, c))
    m = jax.jit(eps).lower(weights, *args).compile().memory_analysis()
    return {"unet_eval_argument_bytes": m.argument_size_in_bytes, "unet_eval_temp_bytes": m.temp_size_in_bytes,
            "unet_eval_output_bytes": m.output_size_in_bytes, "unet_weight_bytes": memory.tree_bytes(weights)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=sorted(config.MODELS), default="tiny", help="random-weight model")
    p.add_argument("--model", help="a converted model directory instead of random weights")
    p.add_argument("--frames", type=int, nargs="+", default=[16, 64, 128])
    p.add_argument("--size", type=int, default=64, help="pixel size (square)")
    p.add_argument("--steps", type=int, default=4, help="DDIM steps")
    p.add_argument("--context-length", type=int, default=16)
    p.add_argument("--context-stride", type=int, default=4)
    p.add_argument("--context-weighting", default="pyramid")
    p.add_argument("--context-mode", nargs="+", default=["attention"], choices=("attention", "unet", "whole"))
    p.add_argument("--window-batch", type=int, default=1, help="context mode unet only")
    p.add_argument("--free-noise", default="none")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto")
    p.add_argument("--repeats", type=int, default=1, help="timed calls per size after the compiling one")
    p.add_argument("--compile-cache", default="off", help="persistent compilation cache folder (default: off)")
    p.add_argument("--memory-only", action="store_true", help="compile and read memory; run nothing")
    a = p.parse_args()
    if a.repeats < 1:
        p.error("--repeats must be >= 1")
    animator = make_animator(a)
    for mode in a.context_mode:
        for frames in a.frames:
            print(json.dumps(bench_frames(animator, frames, mode, a)), flush=True)


if __name__ == "__main__":
    main()
