"""Sampling: seconds per video for the standard PIA job, and diffusers' PIAPipeline beside it.

    python -m bench.sample --config sd15 --frames 16 --size 512 --steps 25 --torch
    python -m bench.sample --config tiny --frames 2 --size 16 --steps 50 --overhead   # host overhead per step

Random weights (timing does not depend on their values), CFG 7.5, DDIM, the reference's batch of one video.
Reports compile time, seconds per video (second call, so no compilation), ms per denoising step (one CFG UNet
evaluation + scheduler), VAE decode time and peak device memory; with --torch the same job in diffusers'
PIAPipeline (fp16 on CUDA, fp32 on CPU; eager, and with --torch-compile the UNet under torch.compile).
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pia_jax.models import config
from pia_jax.models.text_encoder import CLIPTextModel
from pia_jax.models.unet import UNetMotionModel
from pia_jax.models.vae import AutoencoderKL
from pia_jax.sampling import Animator, SampleOptions, accelerator_default_dtype, affinity, schedulers

DTYPES = {"bf16": jnp.bfloat16, "fp32": jnp.float32}


class FixedTokenizer:
    """Stands in for CLIP's tokenizer (no vocabulary files here): BOS, a few ids, EOS padding (CLIP's BOS and EOS
    are the vocabulary's last two ids)."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def __call__(self, prompts, max_length=77, **_):
        ids = np.full((len(prompts), max_length), self.vocab_size - 1, np.int64)
        ids[:, 0], ids[:, 1:6] = self.vocab_size - 2, np.arange(400, 405)
        return {"input_ids": ids}


def resolve_dtype(name: str):
    """--dtype's value as a dtype; 'auto' is the accelerator default."""
    return DTYPES[name] if name != "auto" else accelerator_default_dtype()


def random_animator(cfg, dtype, compile_cache_dir) -> Animator:
    """An Animator of `cfg` with flax-initialised random weights in `dtype` and the stand-in tokenizer."""
    make = dict(rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype)
    return Animator(cfg, UNetMotionModel(cfg.unet, **make), AutoencoderKL(cfg.vae, **make),
                    CLIPTextModel(cfg.text, **make), FixedTokenizer(cfg.text.vocab_size),
                    compile_cache_dir=compile_cache_dir)


def bench_jax(cfg, args):
    dtype = resolve_dtype(args.dtype)
    animator = random_animator(cfg, dtype, args.compile_cache)
    n = args.videos
    images = np.random.default_rng(0).integers(0, 256, (n, args.size, args.size, 3), np.uint8)
    mask = np.stack([affinity.preset_affinity("moderate", args.frames)] * n)
    options = SampleOptions(steps=args.steps, scheduler=args.scheduler, decode_chunk=args.decode_chunk)
    if args.overhead:
        return bench_overhead(animator, images, mask, options)
    run = lambda: animator(images, ["a cat"] * n, ["ugly"] * n, mask, options, seeds=list(range(n)))  # noqa: E731
    first = run()
    runs = [run() for _ in range(args.repeats)]
    best = min(runs, key=lambda r: r.seconds["denoise"] + r.seconds["decode"] + r.seconds["encode"])
    s = best.seconds
    total = s["encode"] + s["denoise"] + s["decode"]
    stats = jax.devices()[0].memory_stats() or {}
    peak = f"{stats['peak_bytes_in_use'] / 2**30:.1f} GiB" if "peak_bytes_in_use" in stats else "n/a"
    print(f"jax   {jnp.dtype(dtype).name}, {n} video(s) on {len(jax.devices())} {jax.default_backend()} device(s): "
          f"compile {first.seconds['compile']:.1f} s, {total / n:.2f} s/video (encode {s['encode']:.2f} s, "
          f"{1e3 * s['denoise'] / args.steps:.1f} ms/step, decode {s['decode']:.2f} s), peak memory {peak}")


class _HostTimed:
    """Wraps the loop's compiled executables: the host time spent in each call (argument checks, dispatch), which
    returns before the device is done (asynchronous dispatch)."""

    def __init__(self, compiled):
        self.compiled, self.seconds_in_calls = compiled, []

    def get(self, *args):
        return _TimedExecutable(self.compiled.get(*args), self.seconds_in_calls)

    def __getattr__(self, name):
        return getattr(self.compiled, name)


class _TimedExecutable:
    def __init__(self, exe, seconds: list):
        self.exe, self.seconds = exe, seconds

    def __call__(self, *args):
        start = time.perf_counter()
        out = self.exe(*args)
        self.seconds.append(time.perf_counter() - start)
        return out

    def __getattr__(self, name):
        return getattr(self.exe, name)


def bench_overhead(animator, images, mask, options):
    """Host time per denoising step spent calling the loop program, and wall time per step, for: one loop call
    (no progress), one-step pieces queued at once (progress), and one-step calls each waited for (the pattern of
    the former per-step Python loop, where the device idles while the host prepares the next step)."""
    n, steps = len(images), options.steps
    animator(images, ["a cat"] * n, ["ugly"] * n, mask, options, seeds=list(range(n)))  # compiles
    animator._denoise = timed = _HostTimed(animator._denoise)
    rows = []
    for mode in ("loop", "pieces", "blocking"):
        animator._wait_each_step = mode == "blocking"
        progress = None if mode == "loop" else (lambda *a: None)
        wall, host = [], []
        for _ in range(5):
            timed.seconds_in_calls = []
            result = animator(images, ["a cat"] * n, ["ugly"] * n, mask, options, seeds=list(range(n)),
                              progress=progress)
            wall.append(result.seconds["denoise"] / steps)
            host.append(sum(timed.seconds_in_calls) / steps)
        rows.append(f"{mode}: host {1e3 * min(host):.2f} ms/step, wall {1e3 * min(wall):.1f} ms/step")
    animator._wait_each_step, animator._denoise = False, timed.compiled
    print(f"denoising, {steps} steps on {animator.devices} {jax.default_backend()} device(s) (best of 5): "
          + "; ".join(rows))


def bench_torch(cfg, args):
    import torch
    from diffusers import DDIMScheduler, PIAPipeline
    from diffusers import UNetMotionModel as TorchUNet
    from PIL import Image

    from tests import torch_models as tm
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    unet = TorchUNet.from_unet2d(tm.unet2d(cfg.unet), tm.motion_adapter(cfg.unet))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear", steps_offset=1,
                              clip_sample=False)
    pipe = PIAPipeline(vae=tm.vae(cfg.vae), text_encoder=tm.clip_text(cfg.text), tokenizer=None, unet=unet,
                       scheduler=scheduler).to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    if args.torch_compile:
        pipe.unet = torch.compile(pipe.unet)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (args.size, args.size, 3), np.uint8))
    embeds = torch.randn(1, 77, cfg.text.hidden_size, device=device, dtype=dtype)

    def run():
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            pipe(image=image, prompt_embeds=embeds, negative_prompt_embeds=embeds, num_frames=args.frames,
                 height=args.size, width=args.size, num_inference_steps=args.steps, guidance_scale=7.5,
                 motion_scale=1, output_type="np")
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    warm = run()
    seconds = min(run() for _ in range(args.repeats))
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    label = "torch.compile" if args.torch_compile else "eager"
    print(f"torch diffusers PIAPipeline {label} ({dtype}, {device}): first call {warm:.1f} s, {seconds:.2f} s/video,"
          f" peak memory {peak:.1f} GiB")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=["sd15", "tiny"], default="sd15")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--size", type=int, default=512, help="pixel size (square)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--scheduler", choices=schedulers.KINDS, default="ddim")
    p.add_argument("--videos", type=int, default=1, help="videos per call (split over the devices)")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto")
    p.add_argument("--decode-chunk", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--torch", action="store_true", help="also time diffusers' PIAPipeline (needs torch+diffusers)")
    p.add_argument("--torch-compile", action="store_true")
    p.add_argument("--overhead", action="store_true", help="time the denoising loop's host overhead per step")
    p.add_argument("--compile-cache", default="off", help="persistent compilation cache folder (default: off)")
    args = p.parse_args()
    cfg = {"sd15": config.SD15_PIA, "tiny": config.TINY}[args.config]
    print(f"{args.config}: {args.videos} x {args.frames} frames at {args.size}x{args.size}, {args.steps} "
          f"{args.scheduler} steps, CFG")
    bench_jax(cfg, args)
    if args.torch:
        bench_torch(cfg, args)


if __name__ == "__main__":
    main()
