"""Every speed target of one GPU, side by side with diffusers (eager and torch.compile), parts in priority order.

    OUT=/path python -m bench.gpu                       # the run below: results as JSON lines in $OUT/results.jsonl
    OUT=/tmp/g python -m bench.gpu --config tiny --frames 4 --size 64 --steps 2 --train-size 32 --train-frames 4 \
        --train-batch 1 --total 3000 --guard-factor 8 --torch-modes eager      # CPU smoke test of every part
                                                        # (6-8 minutes on the shared 2-core machine, 2026-12-07)

The next GPU session's run (issue 33): one `run` of the device tool with `carry=[".whl"]` (diffusers' wheels, made
as BENCHMARKS.md's "Prepared for the next GPU" says) and `timeout_s=570` (the parts end by --total; pip and the
copies back fit the rest):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; set -o pipefail; PYTHONUNBUFFERED=1 python3 -m bench.gpu 2>&1 | tee $OUT/log

No part starts after --total seconds (default TOTAL_S = 510: with the machine's start, ~12 of a session's 15
minutes, leaving ~2.5 for a short rerun), nor with less left than it needs (NEED_S); what is skipped goes to a
later call with --parts. Each part runs in its own process (clean peak-memory counters, no jax/torch allocator
fight) under a time guard (GUARD_S), so a run cut short still returns the parts done; every result is one JSON line,
written at once. Default order (issue 33's):
  train       pia-jax training step (4 clips x 16 frames x 256², default config, frozen base), from pixels then
              from a latent cache: clips/s, peak memory; compilation cache on (a rerun loads the stored step).
              Guard 300 s: its first compile autotunes (it ran past 150 s on an H200); the second should reuse
              most of that (same GEMM and convolution shapes; XLA keeps autotuning results, not yet seen on a GPU)
  torch_train diffusers training step, eager then torch.compile. Guard 240 s: eager took 39 s on an H200, and
              torch.compile of forward and backward is unmeasured (the forward alone compiled in 105 s)
  profile     `step` (below), then 3 more CFG steps under jax.profiler: top 25 kernels and time by kind
              (bench/trace_summary.py), trace files copied flat into OUT. Guard 130 s: `step` took 64 s
  sample      pia-jax standard video (16 x 512², 25 DDIM steps, CFG, VAE decode), peak memory, compile time; fills
              jax's compilation cache and the stored executables beside it, and saves the model directory for
              `warm`. Guard 150 s: 88 s on an H200
  warm        a fresh process: process start -> first video, `Animator.load` of that model directory, its programs
              loaded from the stored executables (`programs`: loaded vs compiled). Guard 60 s: 30 s on an H200
  torch_infer diffusers UNetMotionModel CFG step and PIAPipeline video, eager then torch.compile. Guard 230 s: 192
  step        pia-jax UNet CFG step alone (2 x 16 frames, 64x64 latents): ms synced and back to back, memory; its
              XLA program saved (roofline: ../shared/tools/gpu_aot/roofline.py on it). `profile` already measures
              it; here for a run after a kernel change. Guard 120 s
  step_short  (not by default) `step` with the "short" temporal attention kernel (11 % slower on an H200)
The guards add up to more than TOTAL_S: a full run reaches `profile` only if training compiles fast; the parts are
in the order the issue ranks them. Random weights throughout (timings do not depend on their values).
"""

import argparse
import gzip
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

START = float(os.environ.setdefault("BENCH_GPU_START", str(time.time())))  # the whole run's start, for all parts
OUT = Path(os.environ.get("OUT", "bench_gpu_out"))
CACHE = os.environ.get("BENCH_GPU_CACHE", "/tmp/bench_gpu_xla_cache")  # not under OUT: that comes back whole
MODEL_DIR = Path(os.environ.get("BENCH_GPU_MODEL_DIR", "/tmp/bench_gpu_model"))  # `sample` writes it, `warm` loads it
PARTS = ("train", "torch_train", "profile", "sample", "warm", "torch_infer", "step", "step_short")
DEFAULT_PARTS = PARTS[:-1]
TOTAL_S = 510
# Measured on one H200 (2026-12-01, BENCHMARKS.md): step 64 s, torch_infer 192, sample 88, warm 30, step_short 54,
# torch_train eager 39; train ran past 150 s while autotuning its compile. Guards: the docstring says why each.
GUARD_S = {"train": 300, "torch_train": 240, "profile": 130, "sample": 150, "warm": 60, "torch_infer": 230,
           "step": 120, "step_short": 90}
# the least time left for a part to start: about what it needs to write its first line
NEED_S = {"train": 150, "torch_train": 60, "profile": 90, "sample": 100, "warm": 40, "torch_infer": 100, "step": 70,
          "step_short": 60}


def emit(**record):
    record["t"] = round(time.time() - START, 1)
    line = json.dumps(record)
    print(line, flush=True)
    with open(OUT / "results.jsonl", "a") as f:
        f.write(line + "\n")


def jax_peak_gib():
    import jax
    stats = jax.devices()[0].memory_stats() or {}
    return round(stats["peak_bytes_in_use"] / 2**30, 2) if "peak_bytes_in_use" in stats else None


def random_state(abstract_state, seed=0):
    """Random weights, fast: slices of one pool of 2**24 host normals scaled by 1/sqrt(fan_in), norm scales 1 and
    biases 0 (so activations keep their scale through the deep VAE). Initialising on the device would compile ~90
    RNG programs (eager) or one huge one (jitted): tens of seconds to minutes."""
    import jax
    import numpy as np
    rng = np.random.default_rng(seed)
    pool = rng.standard_normal(1 << 24, dtype=np.float32)

    def leaf(path, a):
        if len(a.shape) <= 1:
            scale = "['scale']" in jax.tree_util.keystr(path)  # GroupNorm / LayerNorm scales
            values = np.full(a.shape, 1.0 if scale else 0.0, np.float32)
        else:
            n = int(np.prod(a.shape))
            start = int(rng.integers(0, pool.size - n)) if n < pool.size else 0
            values = np.resize(pool[start:], n).reshape(a.shape) * np.float32(np.prod(a.shape[:-1]) ** -0.5)
        return jax.device_put(values.astype(a.dtype))
    return jax.tree_util.tree_map_with_path(leaf, abstract_state)


def random_models(cfg, dtype, attention_kernels=None):
    from flax import nnx

    from pia_jax.models.text_encoder import CLIPTextModel
    from pia_jax.models.unet import UNetMotionModel
    from pia_jax.models.vae import AutoencoderKL
    models = []
    for cls, part, extra in ((UNetMotionModel, cfg.unet, {"attention_kernels": attention_kernels}),
                             (AutoencoderKL, cfg.vae, {}), (CLIPTextModel, cfg.text, {})):
        graphdef, state = nnx.split(nnx.eval_shape(lambda cls=cls, part=part, extra=extra: cls(
            part, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype, **extra)))
        models.append(nnx.merge(graphdef, random_state(state)))
    return models


def model_config(name):
    from pia_jax.models import config
    return config.MODELS[name]


# ----------------------------------------------------------------------------------------------------------- pia-jax
def build_step(a, temporal=None):
    """The UNet CFG step alone (bench/gpu_aot.py's cfg_step, the program the roofline was computed on), compiled:
    (executable, weights, arguments, compile seconds)."""
    import jax
    import numpy as np
    from flax import nnx

    from bench.gpu_aot import cfg_step
    from pia_jax.sampling import accelerator_default_dtype
    cfg = model_config(a.config)
    dtype = accelerator_default_dtype()
    unet = random_models(cfg, dtype, {"temporal": temporal} if temporal else None)[0]
    graphdef, state = nnx.split(unet)
    f, h = a.frames, a.size // 8
    rng = np.random.default_rng(0)
    args = (rng.standard_normal((1, f, h, h, 4), np.float32), np.int32(500),
            rng.standard_normal((1, 2, 77, cfg.unet.cross_attention_dim)).astype(dtype),
            np.full((1, f), 0.8, np.float32),
            rng.standard_normal((1, h, h, 4), np.float32), np.float32(7.5))
    args = jax.device_put(args)
    begin = time.perf_counter()
    exe = jax.jit(lambda *x: cfg_step(graphdef, *x)).lower(state, *args).compile()
    return exe, state, args, time.perf_counter() - begin


def jax_step(a, temporal=None):
    """The CFG step timed synchronised per call and back to back (the gap between the two is the host's share per
    step); its optimised HLO saved (kernel names in a profile are its fusions' names). Returns (exe, weights,
    arguments), warm."""
    import jax
    exe, state, args, compile_s = build_step(a, temporal)
    exe(state, *args).block_until_ready()
    synced = []
    for _ in range(10):
        begin = time.perf_counter()
        exe(state, *args).block_until_ready()
        synced.append(time.perf_counter() - begin)
    begin = time.perf_counter()
    outs = [exe(state, *args) for _ in range(25)]
    jax.block_until_ready(outs)
    piped = (time.perf_counter() - begin) / 25
    memory = exe.memory_analysis()
    (OUT / f"jax_step{'_' + temporal if temporal else ''}.hlo.gz").write_bytes(gzip.compress(exe.as_text().encode()))
    emit(part="jax_unet_cfg_step", temporal_kernel=temporal or "default",
         ms_synced=round(1e3 * statistics.median(synced), 2), ms_pipelined=round(1e3 * piped, 2),
         compile_s=round(compile_s, 1), temp_GiB=round(memory.temp_size_in_bytes / 2**30, 2),
         weights_GiB=round(memory.argument_size_in_bytes / 2**30, 2), peak_GiB=jax_peak_gib(),
         device=str(jax.devices()[0]))
    return exe, state, args


PROFILE_STEPS = 3
KEEP_MIB = 15  # the device tool brings back files of at most 16 MiB, at most 2 folders below OUT


def jax_profile(a):
    """`step` (timed, so warm), then PROFILE_STEPS more CFG steps under jax.profiler, summarised here from the
    perfetto trace (bench/trace_summary.py: top kernels, time by kind). The trace is written outside OUT (jax
    nests it 3 folders deep) and its perfetto JSON and xplane copied flat into OUT when under KEEP_MIB."""
    import shutil
    import tempfile

    import jax

    from bench import trace_summary
    exe, state, args = jax_step(a)
    raw = Path(tempfile.mkdtemp(prefix="bench_gpu_profile_"))
    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0  # Python frames: not what is asked, and they grow the trace
    begin = time.perf_counter()
    with jax.profiler.trace(raw, create_perfetto_trace=True, profiler_options=options):
        for i in range(PROFILE_STEPS):
            with jax.profiler.StepTraceAnnotation("cfg_step", step_num=i):
                exe(state, *args).block_until_ready()
    trace_s = time.perf_counter() - begin
    perfetto = max(raw.rglob("perfetto_trace.json.gz"), key=os.path.getmtime)
    kept = {}
    for source, name in ((perfetto, "profile.trace.json.gz"),
                         (next(perfetto.parent.glob("*.xplane.pb"), None), "profile.xplane.pb")):
        mib = source and round(source.stat().st_size / 2**20, 2)
        if source and mib <= KEEP_MIB:
            shutil.copyfile(source, OUT / name)
        kept[name] = mib if source and mib <= KEEP_MIB else f"not kept ({mib} MiB)"
    summary = trace_summary.summarize(trace_summary.load(perfetto), PROFILE_STEPS)
    emit(part="jax_profile", trace_s=round(trace_s, 1), files_MiB=kept, raw_trace=str(raw), **summary)


class IdsTokenizer:
    """Token ids without vocabulary files (BOS, a few ids, EOS padding; CLIP's BOS/EOS are the vocabulary's last two
    ids): the speed does not depend on the words."""

    def __init__(self, vocab_size: int):
        self.bos, self.eos = vocab_size - 2, vocab_size - 1

    def __call__(self, prompts, max_length=77, **_):
        import numpy as np
        ids = np.full((len(prompts), max_length), self.eos, np.int64)
        ids[:, 0], ids[:, 1:6] = self.bos, np.arange(400, 405)
        return {"input_ids": ids}


def make_animator(a):
    """The sampler (pia_jax.sampling.Animator) from random-weight parts, its compilation cache at CACHE; and the
    parts, which `sample` saves for `warm`."""
    from pia_jax.sampling import Animator, accelerator_default_dtype
    cfg = model_config(a.config)
    models = random_models(cfg, accelerator_default_dtype())
    return Animator(cfg, *models, IdsTokenizer(cfg.text.vocab_size), compile_cache_dir=CACHE), models


def save_models(a, models):
    """The random parts as a model directory at MODEL_DIR (bf16 safetensors, a tokenizer of the prompts' words),
    which `warm` loads as a user's run would."""
    import tempfile

    from pia_jax.toy.vocab import write_tokenizer
    from pia_jax.weights import model_dir
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = write_tokenizer(Path(tmp) / "tokenizer", ["a", "cat", "ugly"])
        model_dir.save_model_dir(MODEL_DIR, model_config(a.config), dict(zip(("unet", "vae", "text_encoder"), models)),
                                 tokenizer=tokenizer, dtype="bf16", force=True)


def animate(animator, a):
    """One standard video: (Result, wall seconds)."""
    import numpy as np

    from pia_jax.sampling import SampleOptions, affinity
    image = np.random.default_rng(0).integers(0, 256, (1, a.size, a.size, 3), np.uint8)
    mask = affinity.preset_affinity("moderate", a.frames)[None]
    begin = time.perf_counter()
    result = animator(image, ["a cat"], ["ugly"], mask, SampleOptions(steps=a.steps), seeds=[0])
    return result, time.perf_counter() - begin


def cache_contents() -> dict:
    """What the caches at CACHE hold: jax's compilation cache entries (its files at the top) and the executables
    stored beside them (pia_jax.compiled.store), which `warm` loads without tracing or compiling."""
    from pia_jax.compiled import store
    cache, stored = Path(CACHE), Path(CACHE) / store.FOLDER
    return {"xla_cache_files": sum(p.is_file() for p in cache.iterdir()) if cache.is_dir() else 0,
            "stored_executables": len(list(stored.glob("*.pkl"))) if stored.is_dir() else 0}


def programs(animator) -> dict:
    """The sampler's three programs' counts: compiled in this process, loaded from stored executables (private
    attributes read by this benchmark only)."""
    phases = (animator._encode, animator._denoise, animator._decode)
    return {"compiled": sum(p.compiles for p in phases), "loaded": sum(p.loaded for p in phases)}


def jax_sample(a):
    """The standard video, three times (the first compiles and fills the caches for `warm`); then the parts saved
    as the model directory `warm` loads."""
    begin = time.perf_counter()
    animator, models = make_animator(a)
    setup_s = time.perf_counter() - begin
    first, first_s = animate(animator, a)
    runs = [animate(animator, a) for _ in range(2)]
    result, wall = min(runs, key=lambda r: r[1])
    s = result.seconds
    emit(part="jax_sample", s_per_video=round(wall, 3), encode_s=round(s["encode"], 3),
         ms_per_step=round(1e3 * s["denoise"] / a.steps, 1), decode_s=round(s["decode"], 3),
         compile_s=round(first.seconds["compile"], 1), first_video_s=round(first_s, 1), setup_s=round(setup_s, 1),
         peak_GiB=jax_peak_gib(), programs=programs(animator), cache=first.cache, **cache_contents())
    begin = time.perf_counter()
    save_models(a, models)
    emit(part="jax_save_model_dir", s=round(time.perf_counter() - begin, 1))


def jax_warm(a):
    """Process start (the parent's spawn time) -> first video: `Animator.load` of the model directory that `sample`
    saved, its programs loaded from the executables `sample` stored (`programs`: loaded vs compiled; `cache`:
    jax's compilation cache hits, for programs compiled after all)."""
    from pia_jax.sampling import Animator
    spawned = float(os.environ["BENCH_GPU_SPAWNED"])
    found = cache_contents()
    animator = Animator.load(MODEL_DIR, compile_cache_dir=CACHE)
    ready = time.time()
    result, _ = animate(animator, a)
    emit(part="jax_warm_start", process_start_to_video_s=round(time.time() - spawned, 1),
         to_animator_s=round(ready - spawned, 1), compile_or_load_s=round(result.seconds["compile"], 1),
         programs=programs(animator), cache=result.cache, found=found)


def jax_train(a):
    """pia-jax's training step (bench/train_step.py's: synthetic clips, random weights, the default config) from
    pixels (the VAE encode inside the step, as diffusers' step has it), then from a latent cache's posteriors
    (pia_jax/data/latents.py: no encoder in the step). jax's compilation cache is on at CACHE and the step is stored
    beside it (as train.py does with `compilation_cache`), so a rerun on the same machine loads it instead of
    compiling with autotuning (minutes). peak_GiB is the process's peak so far (the second line's includes the
    first program's); temp_GiB is each program's own."""
    from pia_jax.sampling import compile_cache
    from pia_jax.sharding import make_mesh
    from pia_jax.training import state as state_lib
    from pia_jax.training.config import ModelConfig, TrainConfig, program_identity
    from pia_jax.training.step import Trainer
    from pia_jax.training.synthetic import SyntheticLoader
    compile_cache.enable(CACHE)
    begin = time.perf_counter()
    cfg = TrainConfig(model=ModelConfig(init=a.config))
    setup = state_lib.build(cfg.model)
    trainer = Trainer(setup, state_lib.make_optimizer(cfg.optim), make_mesh(), identity=program_identity(cfg))
    state = trainer.init_state(0)
    setup_s = time.perf_counter() - begin
    for latents in (None, a.train_size // setup.config.vae.latent_factor):
        loader = SyntheticLoader(batch_size=a.train_batch, n_frames=a.train_frames, resolution=a.train_size,
                                 num_clips=a.train_batch, vocab_size=setup.config.text.vocab_size,
                                 latent_size=latents)
        state = train_timed(a, trainer, state, trainer.put_batch([next(loader)]),
                            {"inputs": "latent cache" if latents else "pixels", "remat": cfg.model.remat_policy,
                             "setup_s": round(setup_s, 1)})


def train_timed(a, trainer, state, batch, record: dict):
    """Compiles (or loads) the step for `batch`, then times 5 steps after one; emits one line, returns the state."""
    import jax
    program = trainer.program
    loaded, begin = program.loaded, time.perf_counter()
    exe = trainer.compile(state, batch)
    compile_s = time.perf_counter() - begin
    state, metrics = trainer.step(state, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(5):
        begin = time.perf_counter()
        state, metrics = trainer.step(state, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - begin)
    s = statistics.median(times)
    memory = exe.memory_analysis()
    emit(part="jax_train", **record, ms_per_step=round(1e3 * s, 1), clips_per_s=round(a.train_batch / s, 2),
         compile_s=round(compile_s, 1), stored_step_loaded=program.loaded > loaded, peak_GiB=jax_peak_gib(),
         temp_GiB=round(memory.temp_size_in_bytes / 2**30, 2), loss=float(metrics["loss"]))
    return state


# ------------------------------------------------------------------------------------------------------------- torch
def torch_env():
    import torch
    cuda = torch.cuda.is_available()
    return {"dev": "cuda" if cuda else "cpu", "dtype": torch.float16 if cuda else torch.float32,
            "sync": torch.cuda.synchronize if cuda else (lambda: None),
            "reset": torch.cuda.reset_peak_memory_stats if cuda else (lambda: None),
            "peak": (lambda: round(torch.cuda.max_memory_allocated() / 2**30, 2)) if cuda else (lambda: None)}


def torch_frozen(cfg, dev):
    """diffusers' VAE and transformers' text encoder with random weights, built on the CPU (the oracle draws them
    with a CPU generator, which torch refuses under torch.device('cuda')) and moved to `dev`."""
    from tests import torch_models
    return torch_models.vae(cfg.vae).to(dev), torch_models.clip_text(cfg.text).to(dev)


def torch_unet(cfg, env, dtype=None):
    import torch
    from diffusers import UNetMotionModel

    from tests import torch_models
    with torch.device(env["dev"]):  # built on the device: a CPU init of 1.3B parameters takes tens of seconds
        unet = UNetMotionModel.from_unet2d(torch_models.unet2d(cfg.unet), torch_models.motion_adapter(cfg.unet))
    return unet.to(dtype) if dtype else unet


def torch_infer(a):
    import numpy as np
    import torch
    from diffusers import DDIMScheduler, PIAPipeline
    from PIL import Image

    env, cfg = torch_env(), model_config(a.config)
    dev, dt, sync = env["dev"], env["dtype"], env["sync"]
    unet = torch_unet(cfg, env, dt).eval()
    h = a.size // 8
    x = torch.randn(2, cfg.unet.in_channels, a.frames, h, h, device=dev, dtype=dt)
    context = torch.randn(2 * a.frames, 77, cfg.unet.cross_attention_dim, device=dev, dtype=dt)
    t = torch.tensor(500, device=dev)

    def step_ms(fn, n=10):
        with torch.no_grad():
            for _ in range(3):
                fn(x, t, context)
            times = []
            for _ in range(n):
                sync(); begin = time.perf_counter(); fn(x, t, context); sync()
                times.append(time.perf_counter() - begin)
        return round(1e3 * statistics.median(times), 2)

    vae, text = torch_frozen(cfg, dev)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear", steps_offset=1,
                              clip_sample=False)
    pipe = PIAPipeline(vae=vae, text_encoder=text, tokenizer=None, unet=unet, scheduler=scheduler).to(dev, dt)
    pipe.set_progress_bar_config(disable=True)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (a.size, a.size, 3), np.uint8))
    embeds = torch.randn(1, 77, cfg.text.hidden_size, device=dev, dtype=dt)

    def video_s():
        sync(); begin = time.perf_counter()
        with torch.no_grad():
            pipe(image=image, prompt_embeds=embeds, negative_prompt_embeds=embeds, num_frames=a.frames, height=a.size,
                 width=a.size, num_inference_steps=a.steps, guidance_scale=7.5, output_type="np")
        sync()
        return round(time.perf_counter() - begin, 3)

    for mode in a.torch_modes.split(","):
        if mode == "torch.compile":
            pipe.unet = unet = torch.compile(unet, dynamic=False)
            env["reset"](); begin = time.perf_counter()
            with torch.no_grad():
                unet(x, t, context)
            sync()
            emit(part="torch_compile_time", what="unet cfg step", s=round(time.perf_counter() - begin, 1))
        env["reset"]()
        emit(part="torch_unet_cfg_step", mode=mode, ms=step_ms(unet), peak_GiB=env["peak"]())
        env["reset"]()
        first = video_s()
        emit(part="torch_sample", mode=mode, s_per_video=video_s(), first_video_s=first, peak_GiB=env["peak"]())


def torch_train(a):
    """diffusers' PIA training step (as bench/train_step.py's reference): frozen VAE and text encoder, conv_in and
    motion modules trained with AdamW under bf16 autocast, fp32 weights."""
    import torch

    env, cfg = torch_env(), model_config(a.config)
    dev = env["dev"]
    vae, text = torch_frozen(cfg, dev)
    b, f, s = a.train_batch, a.train_frames, a.train_size
    pixels = torch.rand(b * f, 3, s, s, device=dev) * 2 - 1
    ids = torch.randint(0, cfg.text.vocab_size, (b, 77), device=dev)
    alphas = torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, device=dev) ** 2, 0)

    def make_step(unet):
        unet.train()
        for name, p in unet.named_parameters():
            p.requires_grad_(name.startswith("conv_in.") or "motion_modules" in name)
        params = [p for p in unet.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)

        def step():
            with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
                with torch.no_grad():
                    latents = vae.encode(pixels).latent_dist.sample() * 0.18215
                    latents = latents.reshape(b, f, *latents.shape[1:]).permute(0, 2, 1, 3, 4)
                    context = text(ids)[0].repeat_interleave(f, dim=0)
                noise = torch.randn_like(latents)
                t = torch.randint(0, 1000, (b,), device=dev)
                alpha = alphas[t].view(b, 1, 1, 1, 1)
                noisy = alpha.sqrt() * latents + (1 - alpha).sqrt() * noise
                mask = torch.full_like(latents[:, :1], 0.8)
                inputs = torch.cat([noisy, mask, latents[:, :, :1].expand_as(latents)], 1)
                pred = unet(inputs, t, context).sample
                loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    for mode in a.torch_modes.split(","):
        unet = torch_unet(cfg, env)
        if mode == "torch.compile":
            torch._dynamo.reset()
            unet.forward = torch.compile(unet.forward, dynamic=False)
        step = make_step(unet)
        env["reset"](); begin = time.perf_counter(); step(); env["sync"]()
        first = time.perf_counter() - begin
        step(); env["sync"]()
        times = []
        for _ in range(4):
            begin = time.perf_counter(); step(); env["sync"]()
            times.append(time.perf_counter() - begin)
        ms = 1e3 * statistics.median(times)
        emit(part="torch_train", mode=mode, ms_per_step=round(ms, 1), clips_per_s=round(b * 1e3 / ms, 2),
             first_call_s=round(first, 1), peak_GiB=env["peak"]())
        del unet, step


# ------------------------------------------------------------------------------------------------------------ driver
RUNNERS = {"train": jax_train, "torch_train": torch_train, "profile": jax_profile, "sample": jax_sample,
           "warm": jax_warm, "torch_infer": torch_infer, "step": jax_step, "step_short": lambda a: jax_step(a, "short")}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=PARTS, help="run one part in this process (the driver's child)")
    p.add_argument("--parts", default=",".join(DEFAULT_PARTS), help="comma-separated parts to run, in this order")
    p.add_argument("--config", default="sd15", choices=("sd15", "tiny"))
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--train-batch", type=int, default=4)
    p.add_argument("--train-frames", type=int, default=16)
    p.add_argument("--train-size", type=int, default=256)
    p.add_argument("--total", type=float, default=TOTAL_S, help="seconds for the whole run; no part starts after it")
    p.add_argument("--guard-factor", type=float, default=1.0, help="scales each part's time guard (slow machines)")
    p.add_argument("--torch-modes", default="eager,torch.compile",
                   help="diffusers modes to time (torch.compile takes many minutes on a CPU)")
    return p.parse_args()


def skip_reason(part: str, left: float, guard_factor: float) -> str | None:
    """Why `part` does not start with `left` seconds of the run left (None: it starts)."""
    if left < NEED_S[part] * guard_factor:
        return f"time budget: {left:.0f} s left, the part needs ~{NEED_S[part] * guard_factor:.0f}"
    if part == "warm" and not (MODEL_DIR / "config.json").exists():
        return f"no model directory at {MODEL_DIR} (`sample` makes it, with the caches `warm` loads)"
    return None


def main():
    a = parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if a.part:
        return RUNNERS[a.part](a)
    parts = a.parts.split(",")
    if unknown := [x for x in parts if x not in PARTS]:
        print(f"error: unknown part(s) {unknown}; choose from {','.join(PARTS)}", file=sys.stderr)
        sys.exit(2)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items()
             if k not in ("part", "parts", "total", "guard_factor")]
    for part in parts:
        left = a.total - (time.time() - START)
        if reason := skip_reason(part, left, a.guard_factor):
            emit(part=part, skipped=reason)
            continue
        env = {**os.environ, "OUT": str(OUT), "BENCH_GPU_SPAWNED": str(time.time()), "PYTHONUNBUFFERED": "1"}
        begin = time.perf_counter()
        try:
            rc = subprocess.run([sys.executable, "-m", "bench.gpu", "--part", part] + flags, env=env, check=False,
                                timeout=min(GUARD_S[part] * a.guard_factor, left)).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        emit(part=f"process:{part}", rc=rc, wall_s=round(time.perf_counter() - begin, 1))


if __name__ == "__main__":
    main()
