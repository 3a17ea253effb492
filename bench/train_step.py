"""PIA training step: clips/s, step time, MFU, peak memory and compile time in JAX, and diffusers' PyTorch step beside.

    python -m bench.train_step --config sd15 --frames 16 --size 256 --batch-per-device 4 --torch
    python -m bench.train_step --config tiny --frames 4 --size 32 --batch-per-device 1 --dtype fp32 --iters 3  # CPU

The step is the whole of train.py's: frozen VAE encode + text encode, UNet forward and backward (conv_in and motion
modules trainable), clipping and AdamW, on a batch of synthetic clips split over all devices. Random weights (timing
does not depend on their values). MFU counts the step's matmul/convolution FLOPs on its jaxpr (no remat
recomputation) against the device's dense bf16 peak (`pia_jax/training/metrics.py`). With --torch: the same step
with diffusers' UNetMotionModel + AutoencoderKL + transformers' CLIPTextModel, bf16 autocast, frozen base.
"""

import argparse
import statistics
import time

import jax

from pia_jax.models import config
from pia_jax.sharding import make_mesh
from pia_jax.training import metrics
from pia_jax.training import state as state_lib
from pia_jax.training.config import ModelConfig, OptimConfig
from pia_jax.training.step import Trainer
from pia_jax.training.synthetic import SyntheticLoader


def peak_memory() -> str:
    stats = jax.devices()[0].memory_stats() or {}
    return f"{stats['peak_bytes_in_use'] / 2**30:.1f} GiB" if "peak_bytes_in_use" in stats else "n/a"


def bench_jax(args):
    model = ModelConfig(init=args.config, compute_dtype=args.dtype, frozen_dtype=args.frozen_dtype,
                        remat_policy=args.remat, attention=args.attention)
    t0 = time.perf_counter()
    setup = state_lib.build(model)
    trainer = Trainer(setup, state_lib.make_optimizer(OptimConfig()), make_mesh(fsdp=args.fsdp))
    n = trainer.mesh.size
    batch_size = args.batch_per_device * n
    loader = SyntheticLoader(batch_size=batch_size, n_frames=args.frames, resolution=args.size, num_clips=batch_size,
                             vocab_size=setup.config.text.vocab_size)
    state = trainer.init_state(0)
    batches = [trainer.put_batch([next(loader) for _ in range(args.accum)])]
    print(f"setup (random weights, placement) {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    trainer.compile(state, batches[0])
    compile_s = time.perf_counter() - t0
    flops = trainer.count_flops(batches[0])
    state, m = trainer.step(state, batches[0])
    jax.block_until_ready(m)
    times = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        state, m = trainer.step(state, batches[0])
        jax.block_until_ready((state, m))
        times.append(time.perf_counter() - t0)
    s = statistics.median(times)
    clips = batch_size * args.accum
    peak = metrics.peak_flops(jax.devices()[0], args.peak_tflops)
    mfu = f", MFU {flops / s / n / peak:.1%}" if peak else " (no peak FLOP/s known for this device: --peak-tflops)"
    print(f"jax     {args.dtype} compute, {args.frozen_dtype} frozen weights, remat {args.remat}: compile "
          f"{compile_s:.1f} s, {1e3 * s:.1f} ms/step (median of {args.iters}), {clips / s:.2f} clips/s, "
          f"{flops / 1e12:.4g} TFLOP/step, {flops / s / n / 1e12:.4g} TFLOP/s per device{mfu}, "
          f"peak memory {peak_memory()}, loss {float(m['loss']):.4f}")


def torch_models(cfg: config.PIAConfig, device: str, remat: bool):
    """diffusers/transformers models of `cfg` with random weights; only conv_in and the motion modules train."""
    from diffusers import AutoencoderKL, UNetMotionModel
    from transformers import CLIPTextModel

    from tests.torch_models import clip_text_config, motion_adapter, unet2d
    n = len(cfg.vae.block_out_channels)
    vae = AutoencoderKL(block_out_channels=cfg.vae.block_out_channels, layers_per_block=cfg.vae.layers_per_block,
                        norm_num_groups=cfg.vae.norm_num_groups, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n)
    text = CLIPTextModel(clip_text_config(cfg.text))
    unet = UNetMotionModel.from_unet2d(unet2d(cfg.unet), motion_adapter(cfg.unet))
    vae, text, unet = (m.to(device).requires_grad_(False) for m in (vae, text, unet))
    params = [p for name, p in unet.named_parameters() if name.startswith("conv_in.") or "motion_modules" in name]
    for p in params:
        p.requires_grad_(True)
    if remat:
        unet.enable_gradient_checkpointing()
    return vae, text, unet, params


def time_torch(fn, label: str, iters: int, device: str, clips: int, amp) -> None:
    """Prints the median time of `fn` after two warm-up calls (synchronised on CUDA) and the peak memory."""
    import torch
    for _ in range(2):
        fn()
    times = []
    for _ in range(iters):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    ms = 1e3 * statistics.median(times)
    peak = f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device == "cuda" else "n/a"
    print(f"torch   {label} (autocast {amp}, one device): {ms:.1f} ms/step, {clips * 1e3 / ms:.2f} clips/s, "
          f"peak memory {peak}")


def bench_torch(cfg: config.PIAConfig, args):
    import torch
    device = "cuda" if torch.cuda.is_available() else "cpu"
    amp = torch.bfloat16 if args.dtype == "bf16" else None
    vae, text, unet, params = torch_models(cfg, device, args.remat)
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    b, f, s = args.batch_per_device, args.frames, args.size
    pixels = torch.rand(b * f, 3, s, s, device=device) * 2 - 1
    ids = torch.randint(0, cfg.text.vocab_size, (b, 77), device=device)
    acp = torch.linspace(0.00085, 0.012, 1000, device=device)
    acp = torch.cumprod(1 - acp, 0)

    def step():
        with torch.autocast(device, dtype=amp, enabled=amp is not None):
            with torch.no_grad():
                lat = vae.encode(pixels).latent_dist.sample() * 0.18215
                lat = lat.reshape(b, f, *lat.shape[1:]).permute(0, 2, 1, 3, 4)  # (b, c, f, h, w)
                ctx = text(ids)[0].repeat_interleave(f, dim=0)
            noise = torch.randn_like(lat)
            t = torch.randint(0, 1000, (b,), device=device)
            a = acp[t].view(b, 1, 1, 1, 1)
            noisy = a.sqrt() * lat + (1 - a).sqrt() * noise
            cond = lat[:, :, :1].expand_as(lat)
            mask = torch.full_like(lat[:, :1], 0.8)
            pred = unet(torch.cat([noisy, mask, cond], 1), t, ctx).sample
            loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    time_torch(step, "diffusers, eager", args.iters, device, b, amp)
    if args.torch_compile:
        unet.forward = torch.compile(unet.forward)
        time_torch(step, "diffusers, torch.compile (UNet)", args.iters, device, b, amp)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=["sd15", "tiny"], default="sd15")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--size", type=int, default=256, help="pixel size of the clips")
    p.add_argument("--batch-per-device", type=int, default=4)
    p.add_argument("--accum", type=int, default=1, help="micro-batches per step")
    p.add_argument("--fsdp", type=int, default=1)
    p.add_argument("--dtype", choices=config.DTYPES, default="bf16")
    p.add_argument("--frozen-dtype", choices=config.DTYPES, default="bf16")
    p.add_argument("--remat", default=None, help="UNet remat policy (pia_jax.models.unet.REMAT_POLICIES)")
    p.add_argument("--attention", default="auto", help="spatial attention kernel: auto, xla, cudnn")
    p.add_argument("--peak-tflops", type=float, help="per-device peak for MFU where the device kind is unknown")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--torch", action="store_true", help="also time the diffusers/PyTorch step (per device)")
    p.add_argument("--torch-compile", action="store_true")
    args = p.parse_args()
    print(f"device: {jax.device_count()} x {jax.devices()[0].device_kind}; {args.config}, {args.batch_per_device} clips"
          f" x {args.frames} frames at {args.size}x{args.size} per device, {args.accum} micro-batch(es) per step")
    bench_jax(args)
    if args.torch or args.torch_compile:
        bench_torch({"sd15": config.SD15_PIA, "tiny": config.TINY}[args.config], args)


if __name__ == "__main__":
    main()
