"""UNet + motion modules: time one denoising step (a CFG batch) in JAX, and diffusers' PyTorch model beside it.

    python bench/unet_step.py --config sd15 --frames 16 --size 512 --batch 2 --torch

Random weights (timing does not depend on their values). Reports compile time, ms per step (median), achieved
TFLOP/s (XLA's flop count), peak device memory; with --torch the same step in diffusers' UNetMotionModel (fp16,
eager, and with --torch-compile also torch.compile) on the same device.
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pia_jax.models import config
from pia_jax.models.unet import UNetMotionModel


def count_flops(cfg, state, *inputs):
    """FLOPs of one step from the un-compiled HLO of an all-XLA-kernel model: after compilation GPU convolutions
    and cuDNN attention are custom calls that XLA's cost analysis does not count."""
    model = nnx.eval_shape(lambda: UNetMotionModel(cfg, rngs=nnx.Rngs(0), attention_kernels={"self": "xla",
                                                                                           "cross": "xla"}))
    graphdef = nnx.graphdef(model)
    sample, context, mask, cond = inputs
    traced = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, 500, context, mask, cond)).trace(state, sample)
    try:
        cost = traced.lower(lowering_platforms=("cpu",)).cost_analysis()
    except Exception:  # some jax versions cannot lower for another platform or give no analysis
        return float("nan")
    cost = cost[0] if isinstance(cost, list) else cost  # older jax returns one dict per device
    return float((cost or {}).get("flops", float("nan")))


def bench_jax(cfg, args):
    dtype, param_dtype = config.dtype(args.dtype), config.dtype(args.param_dtype)
    model = UNetMotionModel(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype)
    graphdef, state = nnx.split(model)
    h = w = args.size // 8
    rng = np.random.default_rng(0)
    sample = jnp.asarray(rng.standard_normal((args.batch, args.frames, h, w, 4)), jnp.float32)
    context = jnp.asarray(rng.standard_normal((args.batch, 77, cfg.cross_attention_dim)), jnp.float32)
    mask = jnp.full((args.batch, args.frames, 1, 1, 1), 0.8, jnp.float32)
    cond = sample[:, :1]

    @jax.jit
    def step(state, sample, t):
        return nnx.merge(graphdef, state)(sample, t, context, mask, cond)

    t0 = time.perf_counter()
    compiled = step.lower(state, sample, jnp.int32(500)).compile()
    compile_s = time.perf_counter() - t0
    flops = count_flops(cfg, state, sample, context, mask, cond)
    out = compiled(state, sample, jnp.int32(500))
    out.block_until_ready()
    times = []
    for i in range(args.iters):
        t0 = time.perf_counter()
        out = compiled(state, out.astype(jnp.float32), jnp.int32(900 - i))
        out.block_until_ready()
        times.append(time.perf_counter() - t0)
    ms = 1e3 * statistics.median(times)
    stats = jax.devices()[0].memory_stats() or {}
    peak = f"{stats['peak_bytes_in_use'] / 2**30:.1f} GiB" if "peak_bytes_in_use" in stats else "n/a"
    rate = (f"{flops / (ms / 1e3) / 1e12:.1f} TFLOP/s ({flops / 1e9:.1f} GFLOP/step, XLA's count of the HLO)"
            if np.isfinite(flops) else "no flop count from this jax version")
    print(f"jax     {args.dtype} compute / {args.param_dtype} params: compile {compile_s:.1f} s, "
          f"{ms:.1f} ms/step (median of {args.iters}), {rate}, peak memory {peak}")
    return ms


def bench_torch(cfg, args):
    import torch
    from diffusers import UNetMotionModel as TorchUNet

    from tests.torch_models import motion_adapter, unet2d
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    model = TorchUNet.from_unet2d(unet2d(cfg), motion_adapter(cfg)).to(device, dtype).eval()
    h = w = args.size // 8
    x = torch.randn(args.batch, cfg.in_channels, args.frames, h, w, device=device, dtype=dtype)
    ctx = torch.randn(args.batch * args.frames, 77, cfg.cross_attention_dim, device=device, dtype=dtype)
    t = torch.tensor(500, device=device)

    def run(fn, label):
        with torch.no_grad():
            for _ in range(3):
                fn(x, t, ctx)
            times = []
            for _ in range(args.iters):
                if device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn(x, t, ctx)
                if device == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
        ms = 1e3 * statistics.median(times)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
        print(f"torch   {label} ({dtype}): {ms:.1f} ms/step (median of {args.iters}), peak memory {peak:.1f} GiB")

    run(model, "diffusers UNetMotionModel, eager")
    if args.torch_compile:
        run(torch.compile(model), "diffusers UNetMotionModel, torch.compile")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=["sd15", "tiny"], default="sd15")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--size", type=int, default=512, help="pixel size; latents are size/8")
    p.add_argument("--batch", type=int, default=2, help="videos per step (2 = one video with CFG)")
    p.add_argument("--dtype", choices=list(config.DTYPES), default="bf16")
    p.add_argument("--param-dtype", choices=list(config.DTYPES), default="bf16")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--torch", action="store_true", help="also time diffusers' UNetMotionModel")
    p.add_argument("--torch-compile", action="store_true")
    args = p.parse_args()
    cfg = {"sd15": config.SD15_PIA, "tiny": config.TINY}[args.config].unet
    print(f"device: {jax.devices()[0].device_kind}; {args.config} UNet, {args.batch}x{args.frames} frames at "
          f"{args.size // 8}x{args.size // 8} latents")
    bench_jax(cfg, args)
    if args.torch or args.torch_compile:
        bench_torch(cfg, args)


if __name__ == "__main__":
    main()
