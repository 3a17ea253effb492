"""`Animator`: PIA image animation from its parts (UNet, VAE, text encoder, tokenizer, scheduler config, mesh).

A call runs the phases of the reference pipeline (PIA `i2v_pipeline.py`); encode, denoise and decode are one
compiled program each:
  noise   (noise.py)   per-video noise from seeds, drawn on the host (or given as arrays);
  encode  (encode.py)  prompts -> text states, image -> condition latent, and the first latents (loop.start);
  denoise (loop.py)    the whole loop over a padded schedule, one program for every step count and strength;
  decode  (decode.py)  latents -> uint8 frames, a few frames per video at a time inside the program.

Videos are the unit of parallelism: a batch of videos is split over the mesh's devices (never the frames of one
video, so the motion modules need no communication) and the weights are replicated. Batches hold `batch_size`
videos per device (default: as many as the measured memory allows, memory.py) and run one after another through
the same programs; the last is padded with copies of its last video.

Progress: with a `progress` function the loop runs in one-step pieces, all dispatched at once, and a step is
reported when its latents are ready: truthful per step, the device never waits for the host. (A host callback in
the loop would do the same in one call, but jax 0.10 does not cache programs holding callbacks: compile_cache.py.)
Each piece repeats the loop-invariant work (weight re-layouts on GPU, hoisted out of the loop body) and costs a
dispatch with every weight as an argument (host time, BENCHMARKS.md); without `progress` the loop is one call.
"""

import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from pia_jax.models import attention
from pia_jax.models.config import PIAConfig, VAEConfig
from pia_jax.models.tokenizer import tokenize
from pia_jax.sampling import compile_cache, memory, schedulers
from pia_jax.sampling import noise as noise_lib
from pia_jax.sampling.decode import decode
from pia_jax.sampling.encode import encode
from pia_jax.sampling.keyframes import nearest_keyframe
from pia_jax.sampling.loop import denoise, guided_eps, start, windowed
from pia_jax.sampling.options import Result, SampleOptions
from pia_jax.sampling.prompt_travel import interpolation, parse_prompt_map
from pia_jax.sampling.windows import freenoise_noise, shuffle_permutations


def accelerator_default_dtype():
    """bf16 on accelerators (as the reference's fp16/bf16 inference), fp32 on CPU where bf16 is slow."""
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


def latent_factor(vae: VAEConfig) -> int:
    """How much the VAE downsamples: 8 for SD1.5."""
    return 2 ** (len(vae.block_out_channels) - 1)


def latent_shape(vae: VAEConfig, height: int, width: int, num_frames: int) -> tuple:
    """(F, h, w, c) of one video's latents for images of height x width."""
    factor = latent_factor(vae)
    return num_frames, height // factor, width // factor, vae.latent_channels


def _signature(tree):
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, tuple((np.shape(x), getattr(x, "dtype", type(x)), getattr(x, "sharding", None)) for x in leaves)


class _Compiled:
    """`jax.jit` with an explicit per-signature cache of compiled executables, so compilation is timed apart from
    running, a second call with the same shapes provably compiles nothing, and a program can be compiled from
    shapes alone (`jax.ShapeDtypeStruct`s) to read its memory needs before any data exists."""

    def __init__(self, fn, out_sharding: NamedSharding, static_argnums=(), donate_argnums=()):
        self.jitted = jax.jit(fn, static_argnums=static_argnums, donate_argnums=donate_argnums,
                              out_shardings=out_sharding)
        self.mesh, self.static = out_sharding.mesh, static_argnums
        self.cache, self.compiles, self.seconds = {}, 0, 0.0

    def get(self, *args):
        key = tuple(a if i in self.static else _signature(a) for i, a in enumerate(args))
        exe = self.cache.get(key)
        if exe is None:
            begin = time.perf_counter()
            with attention.compiling_for(self.mesh):  # "auto" kernels for the mesh's devices, Pallas ones per device
                exe = self.cache[key] = self.jitted.lower(*args).compile()
            self.compiles += 1
            self.seconds += time.perf_counter() - begin
        return exe

    def __call__(self, *args):
        return self.get(*args)(*[a for i, a in enumerate(args) if i not in self.static])


class Animator:
    """Holds the models (weights replicated over the mesh) and their compiled phases."""

    def __init__(self, config: PIAConfig, unet: nnx.Module, vae: nnx.Module, text_encoder: nnx.Module, tokenizer,
                 scheduler: schedulers.SchedulerConfig = schedulers.PIA_DDIM, mesh: Mesh | None = None, *,
                 compile_cache_dir=None):
        """`tokenizer`: a CLIP tokenizer (pia_jax.models.tokenizer.load_tokenizer); `mesh`: devices to split videos over
        (default: this host's); `compile_cache_dir`: None (default) leaves jax's settings alone, as a library
        should; 'default', a folder or 'off' turn the persistent compilation cache on or off for the whole process
        (the CLIs do: see compile_cache.py)."""
        self.compile_cache = compile_cache.enable(compile_cache_dir)
        self.config, self.tokenizer, self.scheduler_config = config, tokenizer, scheduler
        self.mesh = mesh or Mesh(np.array(jax.local_devices()), ("data",))
        self._replicated = NamedSharding(self.mesh, P())
        self._by_video = NamedSharding(self.mesh, P(tuple(self.mesh.axis_names)))
        (self._unet_def, unet), (self._vae_def, vae), (self._text_def, text) = (
            nnx.split(unet), nnx.split(vae), nnx.split(text_encoder))
        self._unet, self._vae, self._text = jax.device_put((unet, vae, text), self._replicated)
        self.latent_factor = latent_factor(config.vae)
        # a 4-channel UNet (AnimateDiff motion modules without PIA's condition branch) makes text-to-video: the
        # image only gives the size (encoded, but unused) and the affinity is ignored
        self.text_to_video = config.unet.in_channels == 4
        # Outputs are placed by video explicitly, so the loop's outputs have exactly the placement its inputs had.
        self._encode = _Compiled(self._encode_fn, self._by_video, static_argnums=(8,))
        donate = (1, 2) if jax.default_backend() != "cpu" else ()  # the CPU backend cannot reuse donated buffers
        self._denoise = _Compiled(self._denoise_fn, self._by_video, static_argnums=(11,), donate_argnums=donate)
        self._decode = _Compiled(self._decode_fn, self._by_video, static_argnums=(2, 3))
        self._wait_each_step = False  # bench/sample.py: wait for each piece before queuing the next (the old loop)

    @classmethod
    def load(cls, path, *, dtype=None, param_dtype=None, mesh=None, attention_kernels=None,
             compile_cache_dir=None) -> "Animator":
        """An animator from a converted model directory (the only code here that knows that format); `dtype`
        defaults to bf16 on accelerators, fp32 on CPU."""
        from pia_jax.weights.model_dir import load_model_dir
        dtype = dtype or accelerator_default_dtype()
        kwargs = {"unet": {"attention_kernels": attention_kernels}} if attention_kernels else None
        md = load_model_dir(path, dtype=dtype, param_dtype=param_dtype or dtype, model_kwargs=kwargs)
        scheduler = schedulers.from_dict(md.scheduler) if md.scheduler else schedulers.PIA_DDIM
        return cls(md.config, md.unet, md.vae, md.text_encoder, md.tokenizer, scheduler, mesh,
                   compile_cache_dir=compile_cache_dir)

    def update_unet(self, unet: nnx.Module):
        """Swaps in new UNet weights of the same structure and dtypes (e.g. while training) without recompiling."""
        graphdef, state = nnx.split(unet)
        if graphdef != self._unet_def:
            raise ValueError("update_unet needs a UNet of the same architecture as the animator's")
        self._unet = jax.device_put(state, self._replicated)

    @property
    def compilations(self) -> int:
        return self._encode.compiles + self._denoise.compiles + self._decode.compiles

    @property
    def devices(self) -> int:
        return self.mesh.devices.size

    # ---- the phases as pure functions of weights and arrays ----

    def _encode_fn(self, text_state, vae_state, ids, pixels, post_noise, noise, schedule, from_image, clip_skip,
                   travel=None, nearest=None):
        text, cond = encode(nnx.merge(self._text_def, text_state), nnx.merge(self._vae_def, vae_state),
                            self.config.vae.scaling_factor, ids, pixels, post_noise, clip_skip, travel, nearest)
        return (text, cond) + start(schedule, noise, cond, from_image)

    def _denoise_fn(self, unet_state, latents, solver_state, schedule, text, mask, cond, guidance, step_keys, begin,
                    end, static):
        """-> (latents, solver state, whether each video's latents are finite): the flags are ready when the
        latents are, and unlike the latents (donated to the next piece on accelerators) they can be waited for.
        `static` = (cfg, window schedule or None, window batch)."""
        cfg, window, window_batch = static
        if self.text_to_video:
            mask = cond = None
        # what the loop denoises with is fixed by the static options (no mutable hook outside the compile key)
        denoiser = guided_eps if window is None else windowed(guided_eps, window, window_batch)
        latents, solver_state = denoise(nnx.merge(self._unet_def, unet_state), schedule, latents, solver_state, text,
                                        mask, cond, guidance, step_keys, begin, end, cfg=cfg, denoiser=denoiser)
        return latents, solver_state, jnp.isfinite(latents).all(axis=(1, 2, 3, 4))

    def _decode_fn(self, vae_state, latents, chunk, as_uint8):
        return decode(nnx.merge(self._vae_def, vae_state), self.config.vae.scaling_factor, latents, chunk, as_uint8)

    # ---- host side ----

    def _static(self, options: SampleOptions, frames: int) -> tuple:
        """What of the options the denoise program is compiled for."""
        return options.cfg, options.window(frames, self.config.unet.motion_max_seq_length), options.window_batch

    def _schedule(self, options: SampleOptions):
        config = self.scheduler_config
        config = schedulers.SchedulerConfig(**{**schedulers.to_dict(config), "eta": options.eta,
                                               "use_karras_sigmas": options.karras or config.use_karras_sigmas})
        schedule = schedulers.make_schedule(options.scheduler, config, options.steps, options.strength,
                                            length=config.num_train_timesteps)
        return jax.device_put(schedule, self._replicated)

    def _executables(self, b, height, width, frames, options: SampleOptions, float_frames=False, text_keys=0,
                     keyframes=0):
        """The three programs for a batch of b videos, compiled from shapes alone, each with the bytes of the
        weights it takes: [(encode, bytes), (denoise, bytes), (decode, bytes)]. `text_keys`: the most keys of a
        prompt map (prompt travel), 0 for plain prompts; `keyframes`: condition images per video (0: one image)."""
        f, h, w, c = latent_shape(self.config.vae, height, width, frames)
        videos = lambda shape, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype, sharding=self._by_video)  # noqa
        scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype, sharding=self._replicated)  # noqa: E731
        schedule = _shapes(self._schedule(options), self._replicated)
        tokens = self.config.text.max_position_embeddings
        ids = videos((b, 2, text_keys, tokens) if text_keys else (b, 2, tokens), jnp.int32)
        travel = (videos((b, 2, f), jnp.int32), videos((b, 2, f), jnp.int32), videos((b, 2, f))) if text_keys \
            else None
        pixels = videos((b, keyframes, height, width, 3) if keyframes else (b, height, width, 3))
        nearest = jax.ShapeDtypeStruct((f,), jnp.int32, sharding=self._replicated) if keyframes else None
        encode_exe = self._encode.get(self._text, self._vae, ids, pixels, videos((b, h, w, c)),
                                      videos((b, f, h, w, c)), schedule, scalar(jnp.bool_), options.clip_skip, travel,
                                      nearest)
        text, cond, latents, state = _shapes(encode_exe.out_info, self._by_video)
        denoise_exe = self._denoise.get(self._unet, latents, state, schedule, text, videos((b, f)), cond,
                                        scalar(jnp.float32), videos((b, 2), jnp.uint32), scalar(jnp.int32),
                                        scalar(jnp.int32), self._static(options, frames))
        decode_exe = self._decode.get(self._vae, latents, max(1, min(options.decode_chunk, frames)),
                                      not float_frames)
        return ((encode_exe, memory.tree_bytes((self._text, self._vae))),
                (denoise_exe, memory.tree_bytes(self._unet)), (decode_exe, memory.tree_bytes(self._vae)))

    def batch_bytes(self, per_device: int, height, width, frames, options, float_frames=False, text_keys=0,
                    keyframes=0) -> int:
        """Device memory a batch of `per_device` videos per device needs beyond the weights (compiles the phases
        for that batch size; they are then ready to run)."""
        exes = self._executables(per_device * self.devices, height, width, frames, options, float_frames, text_keys,
                                 keyframes)
        return max(memory.program_bytes(exe, resident) for exe, resident in exes)

    def plan_batch_size(self, videos: int, height: int, width: int, frames: int, options: SampleOptions,
                        batch_size: int | None = None, float_frames=False, text_keys=0, keyframes=0) -> int:
        """Videos per device per batch, at most what `videos` need. An explicit `batch_size` is checked against the
        free device memory (ValueError when it cannot fit); the default is as many as fit."""
        free = memory.free_bytes(self.mesh.devices.flat)
        shape = (height, width, frames, options)
        wanted = -(-videos // self.devices)
        if batch_size is not None:
            if batch_size < 1:
                raise ValueError(f"batch size must be >= 1 video per device, got {batch_size}")
            batch_size = min(batch_size, wanted)
            need = self.batch_bytes(batch_size, *shape, float_frames, text_keys, keyframes)
            if need > free:
                one = self.batch_bytes(1, *shape, float_frames, text_keys, keyframes)
                raise ValueError(f"batch size {batch_size} needs {memory.gib(need)} per device, {memory.gib(free)} "
                                 f"are free; use a batch size of at most {max(1, free // one)}")
            return batch_size
        if self.batch_bytes(wanted, *shape, float_frames, text_keys, keyframes) <= free:  # usual: one batch, one compile
            return wanted
        one = self.batch_bytes(1, *shape, float_frames, text_keys, keyframes)
        if one > free:
            raise ValueError(f"one {frames}-frame {width}x{height} video needs {memory.gib(one)} per device, "
                             f"{memory.gib(free)} are free; use fewer frames or a smaller size")
        n = min(wanted - 1, free // one)  # memory grows at most linearly from one video: n fits, unless that is wrong
        while n > 1 and self.batch_bytes(n, *shape, float_frames, text_keys, keyframes) > free:
            n -= 1
        return int(n)

    def __call__(self, images, prompts, negative_prompts, mask_coef, options: SampleOptions = SampleOptions(), *,
                 seeds=None, noise=None, posterior_noise=None, progress: Callable | None = None,
                 batch_size: int | None = None, float_frames: bool = False, keyframes=None) -> Result:
        """Animates B images: `images` (B, H, W, 3) uint8 (H, W multiples of the VAE factor), one prompt and one
        negative prompt per video (each a string or a prompt map {frame: prompt} for prompt travel), `mask_coef`
        (B, F) per-frame affinities. Noise comes from `seeds` (one int per
        video) unless given as arrays: `noise` (B, F, h, w, 4), `posterior_noise` (B, h, w, 4). `progress(phase,
        done, total)` is called as phases advance. `batch_size`: videos per device per batch (default: from the
        measured memory). The videos come back as uint8 frames, or float32 in [0, 1] with `float_frames`.
        Text-to-video (a 4-channel model): `images` may be a size (height, width) instead, `mask_coef` (B, F) only
        gives the frame count (e.g. np.ones((B, F))).
        Keyframes: `keyframes` = the K frames the images show (e.g. [0, 15]) and `images` (B, K, H, W, 3); every frame
        is conditioned on its nearest keyframe's latent (keyframes.py; give the affinity from
        keyframes.preset_affinity)."""
        if self.text_to_video and len(np.shape(images)) == 1:
            images = np.zeros((len(prompts),) + tuple(images) + (3,), np.uint8)
        images = np.asarray(images)
        mask_coef = np.asarray(mask_coef, np.float32)
        f = mask_coef.shape[1]
        nearest = None
        if keyframes is not None:
            nearest = nearest_keyframe(f, keyframes)
            if images.ndim != 5 or images.shape[1] != len(keyframes):
                raise ValueError(f"{len(keyframes)} keyframes need images (B, {len(keyframes)}, H, W, 3), got "
                                 f"{images.shape}")
        b, height, width = images.shape[0], images.shape[-3], images.shape[-2]
        shape = latent_shape(self.config.vae, height, width, f)
        if len(prompts) != b or len(negative_prompts) != b or mask_coef.shape[0] != b:
            raise ValueError(f"{b} images need {b} prompts, negative prompts and affinity rows")
        if height % self.latent_factor or width % self.latent_factor:
            raise ValueError(f"image size {height}x{width} must be a multiple of {self.latent_factor}")
        options.check(self.config, self.scheduler_config)
        options.check_frames(f, self.config)
        if seeds is not None and len(seeds) != b:
            raise ValueError(f"{b} videos need {b} seeds, got {len(seeds)}")
        if seeds is None and (noise is None or posterior_noise is None or options.eta > 0):
            raise ValueError("pass seeds (one per video) or both noise arrays (and seeds for eta > 0)")
        report = progress or (lambda *a: None)
        cache_before = compile_cache.counts()
        compile_before = self.compile_seconds

        # noise: per video, from its seed, unless given
        keys = np.zeros((b, 2), np.uint32)  # DDIM step noise is multiplied by 0 when eta = 0: any key will do
        if seeds is not None:
            drawn_noise, drawn_post, keys = noise_lib.draw(seeds, shape)
            if noise is None and options.free_noise != "none":  # FreeNoise: the windows repeat the first's noise
                window = options.window(f, self.config.unet.motion_max_seq_length)
                drawn_noise = np.stack([np.asarray(freenoise_noise(
                    drawn_noise[i:i + 1], window, options.free_noise, shuffle_permutations(
                        noise_lib.freenoise_key(seeds[i]), f, window.length, window.stride)))[0] for i in range(b)])
            noise = drawn_noise if noise is None else noise
            posterior_noise = drawn_post if posterior_noise is None else posterior_noise
        noise, posterior_noise = np.asarray(noise, np.float32), np.asarray(posterior_noise, np.float32)
        if noise.shape != (b,) + shape or posterior_noise.shape != (b,) + shape[1:]:
            raise ValueError(f"noise must be {(b,) + shape} and posterior noise {(b,) + shape[1:]}, got "
                             f"{noise.shape} and {posterior_noise.shape}")

        ids, travel = self._text_inputs(prompts, negative_prompts, f)
        text_keys = ids.shape[2] if travel else 0
        per_device = self.plan_batch_size(b, height, width, f, options, batch_size, float_frames, text_keys,
                                          0 if keyframes is None else len(keyframes))
        n = per_device * self.devices
        pixels = images.astype(np.float32) / 255 * 2 - 1
        schedule = self._schedule(options)
        put = lambda x: jax.device_put(np.asarray(x), self._replicated)  # noqa: E731
        from_image, guidance = put(np.bool_(options.strength < 1)), put(np.float32(options.guidance_scale))
        count = int(schedule.count)
        seconds = {"encode": 0.0, "denoise": 0.0, "decode": 0.0}
        videos = []
        for lo in range(0, b, n):
            def batch(x):  # this batch's rows, padded with copies of its last to n videos, split over the devices
                x = np.asarray(x[lo:lo + n])
                x = np.concatenate([x, np.repeat(x[-1:], n - len(x), axis=0)]) if len(x) < n else x
                return jax.device_put(x, self._by_video)

            tick = time.perf_counter()
            report("encode", 0, 1)
            text, cond, latents, state = self._encode(self._text, self._vae, batch(ids), batch(pixels),
                                                      batch(posterior_noise), batch(noise), schedule, from_image,
                                                      options.clip_skip,
                                                      None if travel is None else tuple(map(batch, travel)),
                                                      None if nearest is None else put(nearest))
            jax.block_until_ready(latents)
            report("encode", 1, 1)
            tick = self._lap(seconds, "encode", tick)
            args = (batch(mask_coef), cond, guidance, batch(keys))
            # the whole loop in one call, or (progress) in one-step pieces all queued before the first is waited for;
            # the executable is looked up once, not per piece (that lookup checks every weight's signature)
            run = self._denoise.get(self._unet, latents, state, schedule, text, *args, put(np.int32(0)),
                                    put(np.int32(count)), self._static(options, f))
            bounds = [(0, count)] if progress is None else [(i, i + 1) for i in range(count)]
            pieces = []
            for begin, end in bounds:
                latents, state, finite = run(self._unet, latents, state, schedule, text, *args, put(np.int32(begin)),
                                             put(np.int32(end)))
                pieces.append((end, finite))
                if self._wait_each_step:
                    finite.block_until_ready()
            for end, finite in pieces:
                finite.block_until_ready()
                report("denoise", end, count)
            tick = self._lap(seconds, "denoise", tick)
            frames, finite = self._decode(self._vae, latents, max(1, min(options.decode_chunk, f)), not float_frames)
            frames, finite = np.asarray(frames), np.asarray(finite)
            if not finite[:b - lo].all():
                raise FloatingPointError("the decoded frames contain NaN or infinity (an fp16/bf16 overflow in the "
                                         "model?)")
            report("decode", f, f)
            self._lap(seconds, "decode", tick)
            videos.append(frames[:b - lo])
        seconds["compile"] = self.compile_seconds - compile_before
        cache_after = compile_cache.counts()
        cache = {k: cache_after[k] - cache_before[k] for k in cache_after}
        return Result(np.concatenate(videos), noise, posterior_noise, seconds, per_device, cache)

    def _text_inputs(self, prompts, negative_prompts, frames: int):
        """-> (token ids (B, 2, 77), None) for plain prompts; for prompt maps (prompt travel), (ids (B, 2, K, 77) of
        every map's key prompts, padded with its last, (lo, hi, t) each (B, 2, F): prompt_travel.interpolation)."""
        pairs = [(neg, pos) for neg, pos in zip(negative_prompts, prompts)]
        if not any(isinstance(p, dict) for pair in pairs for p in pair):
            return np.stack([tokenize(self.tokenizer, list(negative_prompts)),
                             tokenize(self.tokenizer, list(prompts))], axis=1), None
        maps = [[parse_prompt_map(p) if isinstance(p, dict) else {0: p} for p in pair] for pair in pairs]
        most = max(len(m) for pair in maps for m in pair)
        ids, lo, hi, t = [], [], [], []
        for pair in maps:
            for m in pair:
                keys = sorted(m)
                texts = [m[k] for k in keys]
                ids.append(tokenize(self.tokenizer, texts + texts[-1:] * (most - len(texts))))
                for out, arr in zip((lo, hi, t), interpolation(keys, frames)):
                    out.append(arr)
        b = len(pairs)
        return (np.stack(ids).reshape((b, 2) + ids[0].shape),
                tuple(np.stack(x).reshape(b, 2, frames) for x in (lo, hi, t)))

    @property
    def compile_seconds(self) -> float:
        """Seconds spent compiling (or loading from the persistent cache) so far."""
        return self._encode.seconds + self._denoise.seconds + self._decode.seconds

    def _lap(self, seconds, phase, tick):
        """Adds the time since `tick` to `phase` (all compiling happened before, in plan_batch_size)."""
        now = time.perf_counter()
        seconds[phase] += now - tick
        return now


def _shapes(tree, sharding):
    """The arrays of `tree` as shapes placed by `sharding`."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
