"""The UNet CFG step compiled for an H100 on a machine without a GPU: XLA:GPU's real program (fusions, cuDNN calls,
transposes) and its memory needs, to size a kernel change before any GPU time is spent.

    JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 PYTHONPATH=. python bench/gpu_aot.py --out /tmp/aot    # -> unet_cfg.hlo
    python ../shared/tools/gpu_aot/roofline.py /tmp/aot/unet_cfg.hlo 790 3.0               # roofline by category
    ... python bench/gpu_aot.py --frames 128 [--frame-chunk 0] --out /tmp/aot   # a long video's step: its memory

Needs jax with the CUDA plugin installed (jax[cuda13]); no device. No autotuning happens without one, so fusion
choices are XLA's defaults. The step is what the sampler runs per denoising step with guidance: both halves (no
text, text) in one batch of 2 videos, then the guided mix.
"""

import argparse
import collections
import functools
import json
import re
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental import topologies
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pia_jax.models import attention, config
from pia_jax.models.unet import UNetMotionModel
from pia_jax.sampling.windows import WindowSchedule

H100 = """gpu_device_info { threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535 memory_bandwidth: 3352320000000
  l2_cache_size: 52428800 clock_rate_ghz: 1.98 device_memory_size: 84929347584 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 } registers_per_core_limit: 65536 registers_per_block_limit: 65536 }
platform_name: "CUDA" dnn_version_info { major: 9 minor: 28 } runtime_version { major: 13 minor: 0 patch: 0 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""


def cfg_step(graphdef, state, latents, t, text, mask, cond, guidance, windows=None, frame_chunk=None):
    """One guided noise prediction: latents (B, F, h, w, 4), text (B, 2, T, D) = (no text, text) per video;
    `windows`/`frame_chunk` as the sampler passes them in context mode attention (UNetMotionModel)."""
    unet = nnx.merge(graphdef, state)
    b = latents.shape[0]
    twice = lambda x: jnp.concatenate([x, x])
    eps = unet(twice(latents), t, text.swapaxes(0, 1).reshape(2 * b, *text.shape[2:]),
               twice(mask[:, :, None, None, None]), twice(cond[:, None]), temporal_windows=windows,
               frame_chunk=frame_chunk)
    uncond, guided = jnp.split(eps, 2)
    return uncond + guidance * (guided - uncond)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="sd15", choices=("sd15", "tiny"))
    p.add_argument("--videos", type=int, default=1)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--latent", type=int, default=64, help="latent height = width (64 = 512x512 pixels)")
    p.add_argument("--temporal", default=None, help="temporal attention kernel (default: the model's)")
    p.add_argument("--frame-chunk", type=int, default=16,
                   help="past 16 frames: context windows of 16 every 4 (attention mode) with the spatial layers on "
                        "chunks of this many frames, as sample.py runs them; 0: no chunks (what they save)")
    p.add_argument("--out", default=".")
    a = p.parse_args()
    # what "auto" attention picks on a Hopper GPU; cuDNN's own check would ask a device that is not there
    attention._cudnn_max_head_dim = lambda: 256
    import jax._src.cudnn.fused_attention_stablehlo as fused
    fused.check_compute_capability = lambda cc: True

    topology = topologies.get_topology_desc(platform="cuda", target_config=H100, topology="1x1x1")
    shard = NamedSharding(topologies.make_mesh(topology, (1,), ("data",)), P())
    cfg = {"sd15": config.SD15_PIA, "tiny": config.TINY}[a.config]
    model = nnx.eval_shape(lambda: UNetMotionModel(cfg.unet, rngs=nnx.Rngs(0), dtype=jnp.bfloat16,
                                                   param_dtype=jnp.bfloat16,
                                                   attention_kernels={"temporal": a.temporal} if a.temporal else None))
    graphdef, state = nnx.split(model)
    spec = lambda shape, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype, sharding=shard)
    b, f, h = a.videos, a.frames, a.latent
    args = (jax.tree.map(lambda x: spec(x.shape, x.dtype), state), spec((b, f, h, h, 4)), spec((), jnp.int32),
            spec((b, 2, cfg.text.max_position_embeddings, cfg.unet.cross_attention_dim), jnp.bfloat16),
            spec((b, f)), spec((b, h, h, 4)), spec(()))
    begin = time.perf_counter()
    windows = WindowSchedule(f).arrays() if f > 16 else None  # the sampler's default windows (16 every 4)
    step = functools.partial(cfg_step, graphdef, windows=windows, frame_chunk=a.frame_chunk or None)
    compiled = jax.jit(step).trace(*args).lower(lowering_platforms=("cuda",)).compile()
    seconds = time.perf_counter() - begin
    hlo = compiled.as_text()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "unet_cfg.hlo").write_text(hlo)
    entry = hlo[hlo.index("\nENTRY"):]
    entry = entry[:entry.index("\n}\n")]
    ops = collections.Counter(re.findall(r"= (?:\([^=]*?\)|\S+) ([\w\-]+)\(", entry))
    launches = sum(n for op, n in ops.items()
                   if op not in ("parameter", "tuple", "get-tuple-element", "bitcast", "constant"))
    memory = compiled.memory_analysis()
    print(json.dumps({"compile_s": round(seconds, 1), "kernels": launches, "ops": dict(ops.most_common(8)),
                          "custom_calls": dict(collections.Counter(re.findall(r'custom_call_target="([^"]+)"', entry))),
                          "temp_GiB": round(memory.temp_size_in_bytes / 2**30, 3),
                          "weights_GiB": round(memory.argument_size_in_bytes / 2**30, 3)}))


if __name__ == "__main__":
    main()
