"""PIA image animation: an image, a prompt and per-frame affinities in, a video out.

The reference pipeline (PIA `i2v_pipeline.py`), phase by phase, each phase one jit-compiled function:
  encode:  prompts -> CLIP text states ([negative, prompt] per video for classifier-free guidance);
           image -> VAE posterior *sample* x scaling_factor = the condition latent, the same on every frame.
  denoise: from Gaussian noise (or, for strength < 1, the condition latent noised to the first step), the UNet sees
           [latent | affinity mask | condition latent] and the scheduler steps; one compiled step, called per step.
  decode:  latents / scaling_factor -> VAE decoder, a few frames at a time so memory stays bounded -> [0, 1].

Videos are the unit of parallelism: with several devices the batch of videos is split across them (never the frames
of one video, so the motion modules need no communication) and the weights are replicated. Each video's randomness
comes from its own seed (or from noise arrays passed in), so a video does not depend on the batch it is in.
"""

import contextlib
import dataclasses
import time
from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pia_jax import schedulers
from pia_jax.config import VAEConfig
from pia_jax.model_dir import ModelDir, load_model_dir
from pia_jax.tokenizer import tokenize
from pia_jax.vae import sample_posterior

# The reference's negative prompt when a config gives none (PIA i2v_pipeline.py DEFAULT_N_PROMPT).
DEFAULT_NEGATIVE_PROMPT = (
    "wrong white balance, dark, sketches,worst quality,low quality, deformed, distorted, disfigured, bad eyes, "
    "wrong lips,weird mouth, bad teeth, mutated hands and fingers, bad anatomy,wrong anatomy, amputation, "
    "extra limb, missing limb, floating,limbs, disconnected limbs, mutation, ugly, disgusting, bad_pictures, "
    "negative_hand-neg")


@dataclass(frozen=True)
class SampleOptions:
    steps: int = 25
    scheduler: str = "ddim"  # ddim | dpmpp_2m (see pia_jax.schedulers; the model directory holds the config)
    karras: bool = False  # Karras sigmas for dpmpp_2m
    guidance_scale: float = 7.5  # <= 1 turns classifier-free guidance off
    strength: float = 1.0  # < 1: start from the condition image noised to step int(steps * (1 - strength))
    eta: float = 0.0  # DDIM stochasticity
    clip_skip: int | None = None
    decode_chunk: int = 4  # frames per video decoded at once


@dataclass
class Result:
    videos: np.ndarray  # (B, F, H, W, 3) float32 in [0, 1]
    noise: np.ndarray  # (B, F, h, w, 4) the initial noise used
    posterior_noise: np.ndarray  # (B, h, w, 4) the VAE posterior noise used
    seconds: dict  # wall time per phase ('compile' counted apart)


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


def seed_key(seed: int):
    """A PRNG key for any 64-bit seed (the reference's example configs use seeds above 2**63)."""
    seed = int(seed)
    if not 0 <= seed < 2 ** 64:
        raise ValueError(f"seeds must be integers in [0, 2**64), got {seed}")
    return jax.random.fold_in(jax.random.key(seed & 0xFFFFFFFF), seed >> 32)


def _signature(tree):
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, tuple((np.shape(x), getattr(x, "dtype", type(x)), getattr(x, "sharding", None)) for x in leaves)


class _Compiled:
    """`jax.jit` with an explicit per-signature cache of compiled executables, so compilation is timed apart from
    running and a second call with the same shapes provably compiles nothing."""

    def __init__(self, fn, static_argnums=(), donate_argnums=(), out_shardings=None):
        self.jitted = jax.jit(fn, static_argnums=static_argnums, donate_argnums=donate_argnums,
                              out_shardings=out_shardings)
        self.static = static_argnums
        self.cache, self.compiles, self.seconds = {}, 0, 0.0

    def __call__(self, *args):
        key = tuple(a if i in self.static else _signature(a) for i, a in enumerate(args))
        exe = self.cache.get(key)
        if exe is None:
            start = time.perf_counter()
            exe = self.cache[key] = self.jitted.lower(*args).compile()
            self.compiles += 1
            self.seconds += time.perf_counter() - start
        return exe(*[a for i, a in enumerate(args) if i not in self.static])


class Animator:
    """Holds the models (weights replicated over the mesh) and the compiled phases."""

    def __init__(self, model: ModelDir, mesh: Mesh | None = None):
        self.model, self.config = model, model.config
        self.mesh = mesh or Mesh(np.array(jax.local_devices()), ("data",))  # this host's devices
        self.scheduler_config = schedulers.from_dict(model.scheduler) if model.scheduler else schedulers.PIA_DDIM
        replicated, self._by_video = NamedSharding(self.mesh, P()), NamedSharding(self.mesh, P("data"))
        (self._unet_def, unet), (self._vae_def, vae), (self._text_def, text) = (
            nnx.split(model.unet), nnx.split(model.vae), nnx.split(model.text_encoder))
        self._unet, self._vae, self._text = jax.device_put((unet, vae, text), replicated)
        self._replicate = lambda x: jax.device_put(x, replicated)  # noqa: E731
        self.latent_factor = latent_factor(self.config.vae)
        # Outputs are placed by video explicitly, so a step's outputs have exactly the placement its inputs had.
        self._encode = _Compiled(self._encode_fn, static_argnums=(5,), out_shardings=self._by_video)
        donate = (1, 2) if jax.default_backend() != "cpu" else ()  # the CPU backend cannot reuse donated buffers
        self._step = _Compiled(self._step_fn, static_argnums=(9,), donate_argnums=donate,
                               out_shardings=self._by_video)
        self._decode = _Compiled(self._decode_fn, out_shardings=self._by_video)

    @classmethod
    def load(cls, path, *, dtype=None, param_dtype=None, mesh=None, attention_kernels=None) -> "Animator":
        """An animator from a converted model directory; `dtype` defaults to bf16 on accelerators, fp32 on CPU."""
        dtype = dtype or accelerator_default_dtype()
        kwargs = {"unet": {"attention_kernels": attention_kernels}} if attention_kernels else None
        return cls(load_model_dir(path, dtype=dtype, param_dtype=param_dtype or dtype, model_kwargs=kwargs), mesh)

    def update_unet(self, unet: nnx.Module):
        """Swaps in new UNet weights of the same structure and dtypes (e.g. while training) without recompiling."""
        graphdef, state = nnx.split(unet)
        if graphdef != self._unet_def:
            raise ValueError("update_unet needs a UNet of the same architecture as the animator's")
        self._unet = self._replicate(state)

    @property
    def compilations(self) -> int:
        return self._encode.compiles + self._step.compiles + self._decode.compiles

    # ---- the three phases (pure functions of weights and arrays) ----

    def _encode_fn(self, text_state, vae_state, ids_Bx2xL, image_BxHxWx3, post_noise_Bxhxwx4, clip_skip):
        text = nnx.merge(self._text_def, text_state)
        vae = nnx.merge(self._vae_def, vae_state)
        b, n, length = ids_Bx2xL.shape
        states = text(ids_Bx2xL.reshape(b * n, length), clip_skip=clip_skip)
        mean, logvar = vae.encode(image_BxHxWx3)
        latent = sample_posterior(mean.astype(jnp.float32), logvar.astype(jnp.float32), post_noise_Bxhxwx4)
        return states.reshape(b, n, length, -1), latent * self.config.vae.scaling_factor

    def _step_fn(self, unet_state, latents_BxFxhxwx4, solver_state, i, schedule, text_Bx2xLxD, cond_Bxhxwx4, mask_BxF,
                 guidance, cfg: bool, eta_key=None):
        unet = nnx.merge(self._unet_def, unet_state)
        b, f = latents_BxFxhxwx4.shape[:2]
        n = 2 if cfg else 1  # [negative, prompt] per video, kept next to each other so a video stays on its device
        x = jnp.repeat(latents_BxFxhxwx4, n, axis=0)
        text = text_Bx2xLxD[:, -n:].reshape((b * n,) + text_Bx2xLxD.shape[2:])
        mask = jnp.repeat(mask_BxF, n, axis=0)[:, :, None, None, None]
        cond = jnp.repeat(cond_Bxhxwx4, n, axis=0)[:, None]
        eps = unet(x, schedule.timesteps[i], text, mask=mask, condition=cond).reshape((b, n) + x.shape[1:])
        eps = eps[:, 0] + guidance * (eps[:, 1] - eps[:, 0]) if cfg else eps[:, 0]
        noise = None
        if eta_key is not None:
            noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), latents_BxFxhxwx4.shape[1:]))(eta_key)
        return schedulers.step(schedule, solver_state, i, eps, latents_BxFxhxwx4, noise)

    def _decode_fn(self, vae_state, z_BxCxhxwx4):
        vae = nnx.merge(self._vae_def, vae_state)
        b, c = z_BxCxhxwx4.shape[:2]
        frames = vae.decode(z_BxCxhxwx4.reshape((b * c,) + z_BxCxhxwx4.shape[2:]) / self.config.vae.scaling_factor)
        frames = jnp.clip(frames.astype(jnp.float32) / 2 + 0.5, 0, 1)
        return frames.reshape((b, c) + frames.shape[1:])

    # ---- host side ----

    def _batched(self, x):
        """Places a per-video array with its leading (video) axis split over the mesh."""
        return jax.device_put(x, self._by_video)

    def __call__(self, images, prompts, negative_prompts, mask_coef, options: SampleOptions = SampleOptions(), *,
                 seeds=None, noise=None, posterior_noise=None, progress: Callable | None = None) -> Result:
        """Animates B images: `images` (B, H, W, 3) uint8 (H, W multiples of the VAE factor), one prompt and one
        negative prompt per video, `mask_coef` (B, F) per-frame affinities. Noise comes from `seeds` (one int per
        video) unless given as arrays: `noise` (B, F, h, w, 4), `posterior_noise` (B, h, w, 4).
        `progress(phase, done, total)` is called as phases advance."""
        images = np.asarray(images)
        mask_coef = np.asarray(mask_coef, np.float32)
        b, height, width = images.shape[:3]
        f = mask_coef.shape[1]
        shape = latent_shape(self.config.vae, height, width, f)
        if len(prompts) != b or len(negative_prompts) != b or mask_coef.shape[0] != b:
            raise ValueError(f"{b} images need {b} prompts, negative prompts and affinity rows")
        if height % self.latent_factor or width % self.latent_factor:
            raise ValueError(f"image size {height}x{width} must be a multiple of {self.latent_factor}")
        if f > self.config.unet.motion_max_seq_length:
            raise ValueError(f"{f} frames exceed the motion modules' {self.config.unet.motion_max_seq_length}")
        progress = progress or (lambda *a: None)

        # Randomness per video: its own key, so a video does not depend on its batch or the device count.
        if noise is None or posterior_noise is None or options.eta > 0:
            if seeds is None:
                raise ValueError("pass seeds (one per video) or both noise arrays")
            if len(seeds) != b:
                raise ValueError(f"{b} videos need {b} seeds, got {len(seeds)}")
            keys = [jax.random.split(seed_key(s), 3) for s in seeds]
            if noise is None:
                noise = np.stack([np.asarray(jax.random.normal(k[0], shape)) for k in keys])
            if posterior_noise is None:
                posterior_noise = np.stack([np.asarray(jax.random.normal(k[1], shape[1:])) for k in keys])
        noise, posterior_noise = np.asarray(noise, np.float32), np.asarray(posterior_noise, np.float32)
        if noise.shape != (b,) + shape or posterior_noise.shape != (b,) + shape[1:]:
            raise ValueError(f"noise must be {(b,) + shape} and posterior noise {(b,) + shape[1:]}, got "
                             f"{noise.shape} and {posterior_noise.shape}")

        # Pad the batch to a multiple of the device count with copies of the last video, dropped at the end.
        pad = -b % self.mesh.devices.size
        padded = lambda x: np.concatenate([x, np.repeat(x[-1:], pad, axis=0)]) if pad else x  # noqa: E731
        tok = self.model.tokenizer
        ids = np.stack([tokenize(tok, list(negative_prompts)), tokenize(tok, list(prompts))], axis=1)  # (B, 2, 77)
        put = lambda x: self._batched(padded(np.asarray(x)))  # noqa: E731
        ids, pixels, post, mask = put(ids), put(images.astype(np.float32) / 255 * 2 - 1), put(posterior_noise), put(
            mask_coef)

        timer = _PhaseTimer((self._encode, self._step, self._decode))
        progress("encode", 0, 1)
        with timer("encode"):
            text, cond = self._encode(self._text, self._vae, ids, pixels, post, options.clip_skip)
            cond.block_until_ready()
        progress("encode", 1, 1)

        config = dataclasses.replace(self.scheduler_config, eta=options.eta,
                                     use_karras_sigmas=options.karras or self.scheduler_config.use_karras_sigmas)
        schedule = self._replicate(schedulers.make_schedule(options.scheduler, config, options.steps, options.strength))
        latents = put(noise)
        if options.strength < 1:  # "noise from the image": the condition latent on every frame, noised
            latents = schedulers.add_noise_start(schedule, jnp.broadcast_to(cond[:, None], latents.shape), latents)
        state = jax.tree.map(self._batched, schedulers.init_state(schedule, latents))  # placed as the step returns it
        eta_keys = None
        if options.eta > 0:
            eta_keys = jax.random.wrap_key_data(put(np.stack([jax.random.key_data(k[2]) for k in keys])))
        cfg, guidance = options.guidance_scale > 1, self._replicate(np.float32(options.guidance_scale))
        n_steps = len(schedule.timesteps)
        with timer("denoise"):
            for i in range(n_steps):
                latents, state = self._step(self._unet, latents, state, self._replicate(np.int32(i)), schedule, text,
                                            cond, mask, guidance, cfg, eta_keys)
                latents.block_until_ready()  # so progress is truthful; the GPU idles only for a dispatch
                progress("denoise", i + 1, n_steps)

        chunk = max(1, min(options.decode_chunk, f))
        pad_f = -f % chunk  # every chunk has the same shape: one compilation
        z = jnp.pad(latents, ((0, 0), (0, pad_f), (0, 0), (0, 0), (0, 0))) if pad_f else latents
        frames = []
        with timer("decode"):
            for j in range(0, f + pad_f, chunk):
                frames.append(np.asarray(self._decode(self._vae, z[:, j:j + chunk])))
                progress("decode", min(j + chunk, f), f)
        videos = np.concatenate(frames, axis=1)[:b, :f]
        return Result(videos, noise, posterior_noise, timer.seconds)


class _PhaseTimer:
    """Wall time per phase, with compilation time taken out of the phase and reported as 'compile'."""

    def __init__(self, compiled):
        self.compiled, self.seconds = compiled, {"compile": 0.0}

    @contextlib.contextmanager
    def __call__(self, phase):
        start, compiled = time.perf_counter(), sum(c.seconds for c in self.compiled)
        yield
        compiling = sum(c.seconds for c in self.compiled) - compiled
        self.seconds[phase] = time.perf_counter() - start - compiling
        self.seconds["compile"] += compiling
