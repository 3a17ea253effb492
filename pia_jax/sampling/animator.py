"""`Animator`: PIA image animation from its parts (UNet, VAE, text encoder, tokenizer, scheduler config, mesh).

A call reads as the recipe of the reference pipeline (PIA `i2v_pipeline.py`):
  inputs               images, prompts, affinities and options, checked before anything runs;
  noise   (noise.py)   per-video noise from seeds, drawn on the host (or given as arrays);
then per batch of videos, one compiled program each:
  encode  (encode.py)  prompts -> text states, image -> condition latent, and the first latents (loop.start);
  denoise (loop.py)    the whole loop over a padded schedule, one program for every step count and strength;
  decode  (decode.py)  latents -> uint8 frames, a few frames per video at a time inside the program.

The programs are pure module-level functions of the weights and the arrays (`_encode_fn`, `_denoise_fn`,
`_decode_fn`). Each model's graph definition is static (`Graph`, bound into the programs); its weights travel as a
flat list of arrays. What a program is compiled for besides its arguments' shapes is one frozen dataclass,
`ProgramSettings`. Programs are compiled ahead of time from shapes alone (pia_jax.compiled, shared with the Trainer)
by `plan_batch_size`, which reads their memory needs; the batches then run the executables found, so a call walks no
weight to find them.

Devices: each call lays the mesh's devices out as (video, cfg, window) (sharding.sampler_split, from the device
count and the batch, or `SampleOptions.devices_per_video`): a batch of videos is split over "video" groups; a
group's devices split one video's UNet batch, its two guidance halves over "cfg" and over "window" its context
windows in context mode unet (guided_eps, loop.py), or in context mode attention its frames inside the UNet: each
chunk's frames in the spatial layers, its spatial sites in the motion modules, the activations moved between the two
by all-to-alls (`ProgramSettings.frame_axis`, models/frame_split.py). Spare devices go to a video as far as it can
use them; the rest stay idle (the layout then holds the first devices only) instead of computing padding copies. The
layout is a static setting of all three programs (`ProgramSettings.split`), each placing its outputs by video on it;
the weights are replicated (`_weights` views them on the layout's devices). Batches hold `batch_size` videos per
group (default: as many as the measured memory allows, memory.py) and run one after another through the same
programs; the last is padded with copies of its last video.

Progress: with a `progress` function the loop runs in one-step pieces, all dispatched at once, and a step is
reported when its latents are ready: truthful per step, the device never waits for the host. (A host callback in
the loop would do the same in one call, but jax 0.10 does not cache programs holding callbacks: compile_cache.py.)
Each piece repeats the loop-invariant work (weight re-layouts on GPU, hoisted out of the loop body) and costs a
dispatch with every weight as an argument (host time, BENCHMARKS.md); without `progress` the loop is one call.
"""

import dataclasses
import functools
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from pia_jax import compiled, media, sharding
from pia_jax.models import attention
from pia_jax.models.config import PIAConfig
from pia_jax.models.tokenizer import tokenize
from pia_jax.sampling import compile_cache, memory, schedulers
from pia_jax.sampling import noise as noise_lib
from pia_jax.sampling.decode import decode
from pia_jax.sampling.encode import encode, encode_image_prompt
from pia_jax.sampling.keyframes import nearest_keyframe
from pia_jax.sampling.loop import denoise, fused, guided_eps, start, windowed
from pia_jax.sampling.options import Result, SampleOptions
from pia_jax.sampling.prompt_travel import interpolation, parse_prompt_map
from pia_jax.sampling.windows import WindowSchedule, freenoise_noise, shuffle_permutations

PHASES = ("encode", "denoise", "decode")


def accelerator_default_dtype():
    """bf16 on accelerators (as the reference's fp16/bf16 inference), fp32 on CPU where bf16 is slow."""
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


# ---- the programs: pure functions of static structure, static settings, weights and arrays ----

@dataclasses.dataclass(frozen=True)
class ProgramSettings:
    """What the programs are compiled for besides their arguments' shapes (hashable: part of their keys). Each
    program is specialised for, and keyed by, only the fields it reads (`only`): e.g. another decode chunk compiles
    a new decode and nothing else."""
    clip_skip: int | None = None  # encode: CLIP layers skipped
    cfg: bool = True  # denoise: classifier-free guidance on (the UNet sees [negative, prompt])
    window: WindowSchedule | None = None  # denoise: context windows (long videos)
    window_batch: int = 1  # denoise: windows per UNet call (context mode unet)
    decode_chunk: int = 1  # decode: frames per video decoded at once
    as_uint8: bool = True  # decode: uint8 frames, else float32 in [0, 1]
    context_mode: str = "attention"  # denoise: where the windows blend (options.CONTEXT_MODES)
    split: Mesh | None = None  # all: the devices as (video, cfg, window) (sharding.SAMPLER_AXES); outputs by video

    @property
    def frame_axis(self) -> str | None:
        """The mesh axis that splits a video's frames inside the UNet (context mode attention, or no windows: then
        the mode is attention's default), or None."""
        spread = self.split is not None and self.split.shape["window"] > 1
        return "window" if spread and self.context_mode == "attention" else None

    def only(self, phase: str) -> "ProgramSettings":
        """The settings `phase` reads, the others at their defaults."""
        return ProgramSettings(**{name: getattr(self, name) for name in _READS[phase]})


_READS = {"encode": ("clip_skip", "split"), "denoise": ("cfg", "window", "window_batch", "context_mode", "split"),
          "decode": ("decode_chunk", "as_uint8", "split")}


@dataclasses.dataclass(frozen=True, eq=False)
class Graph:
    """One model's static structure: its graph definition and the tree of its weights (a flat list of arrays)."""
    graphdef: Any
    treedef: Any

    @classmethod
    def split(cls, module: nnx.Module) -> tuple["Graph", list]:
        graphdef, state = nnx.split(module)
        leaves, treedef = jax.tree_util.tree_flatten(state)
        return cls(graphdef, treedef), leaves

    def merge(self, leaves) -> nnx.Module:
        return nnx.merge(self.graphdef, jax.tree_util.tree_unflatten(self.treedef, leaves))

    def same_as(self, other: "Graph") -> bool:
        return self.graphdef == other.graphdef and self.treedef == other.treedef


@dataclasses.dataclass(frozen=True, eq=False)
class Parts:
    """An animator's models as static structure (bound into its programs, never part of a key)."""
    text: Graph
    vae: Graph
    unet: Graph
    scaling_factor: float  # the VAE's latent scaling
    text_to_video: bool  # a 4-channel UNet: no condition branch, the affinity and condition latent are not used
    image_encoder: Graph | None = None  # the IP-Adapter's image tower and projection (encode), None without one
    image_proj: Graph | None = None


def _on_split(fn):
    """fn traced for the devices of the call's layout (`settings.split`), not all the Animator's: "auto" attention
    chooses for them and a Pallas kernel's shard_map spans them (models/attention.py; over all devices it would
    not lower where a layout leaves devices idle)."""
    @functools.wraps(fn)
    def traced(parts: Parts, settings: ProgramSettings, *args, **kwargs):
        with attention.compiling_for(settings.split):
            return fn(parts, settings, *args, **kwargs)
    return traced


@_on_split
def _encode_fn(parts: Parts, settings: ProgramSettings, weights, ids, pixels, post_noise, noise, schedule, from_image,
               travel, nearest, clip_pixels=None):
    """-> (text states, condition latent, first latents, solver state, IP-Adapter image tokens (B, 2, n, D) or None);
    weights = (text encoder, VAE) leaves, and (image encoder, image projection) with an IP-Adapter."""
    text_encoder, vae = parts.text.merge(weights[0]), parts.vae.merge(weights[1])
    text, cond = encode(text_encoder, vae, parts.scaling_factor, ids, pixels, post_noise, settings.clip_skip, travel,
                        nearest)
    image = None if clip_pixels is None else encode_image_prompt(parts.image_encoder.merge(weights[2]),
                                                                 parts.image_proj.merge(weights[3]), clip_pixels)
    return _by_video(settings, (text, cond) + start(schedule, noise, cond, from_image) + (image,))


@_on_split
def _denoise_fn(parts: Parts, settings: ProgramSettings, weights, latents, solver_state, schedule, text, mask, cond,
                guidance, step_keys, begin, end, image=None, ip_scale=None):
    """-> (latents, solver state, whether each video's latents are finite) after steps begin..end-1: the flags are
    ready when the latents are, and unlike the latents (donated to the next piece on accelerators) they can be
    waited for. weights = the UNet's leaves. `image`, `ip_scale`: the IP-Adapter's tokens (B, 2, n, D) and scale
    (data: one program for every scale), None without one (the program is then the one without the adapter)."""
    if parts.text_to_video:
        mask = cond = None
    # what the loop denoises with is fixed by the static settings (no mutable hook outside the compile key)
    guided = functools.partial(guided_eps, split=settings.split, frame_axis=settings.frame_axis)
    if settings.window is None:
        denoiser = guided
    elif settings.context_mode == "attention":
        denoiser = fused(guided, settings.window)
    else:
        denoiser = windowed(guided, settings.window, settings.window_batch)
    latents, solver_state = denoise(parts.unet.merge(weights), schedule, latents, solver_state, text, mask, cond,
                                    guidance, step_keys, begin, end, cfg=settings.cfg, denoiser=denoiser,
                                    image=None if image is None else (image, ip_scale))
    return _by_video(settings, (latents, solver_state, jnp.isfinite(latents).all(axis=(1, 2, 3, 4))))


@_on_split
def _decode_fn(parts: Parts, settings: ProgramSettings, weights, latents):
    """-> (frames, whether each video is finite); weights = the VAE's leaves."""
    return _by_video(settings, decode(parts.vae.merge(weights), parts.scaling_factor, latents, settings.decode_chunk,
                                      settings.as_uint8))


def _by_video(settings: ProgramSettings, outputs):
    """A program's outputs placed by video on its split (so the next program gets exactly what it was compiled
    for), replicated over a video's devices."""
    by_video = NamedSharding(settings.split, P("video"))
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, by_video), outputs)


class Executables(NamedTuple):
    """The three compiled programs for one batch shape; each takes its weights, then its arrays."""
    encode: Any
    denoise: Any
    decode: Any


# ---- one call's host-side data ----

@dataclasses.dataclass
class _Call:
    """One call's inputs per video (rows), checked, on the host; and what its batches share on the devices."""
    videos: int
    frames: int
    height: int
    width: int
    pixels: np.ndarray  # (B, H, W, 3) or, with keyframes, (B, K, H, W, 3) float32 in [-1, 1]
    affinity: np.ndarray  # (B, F) float32
    nearest: np.ndarray | None  # (F,) each frame's nearest keyframe, or None
    keyframes: int  # K, 0 for one image per video
    clip_pixels: np.ndarray | None = None  # (B, S, S, 3) the IP-Adapter's image prompts, CLIP-preprocessed
    noise: np.ndarray | None = None  # (B, F, h, w, c)
    posterior_noise: np.ndarray | None = None  # (B, h, w, c)
    step_keys: np.ndarray | None = None  # (B, 2) DDIM step-noise key data
    ids: np.ndarray | None = None  # token ids (B, 2, L), or (B, 2, K, L) with prompt maps
    travel: tuple | None = None  # prompt travel's (lo, hi, t), each (B, 2, F)

    @property
    def text_keys(self) -> int:
        return self.ids.shape[2] if self.travel else 0


@dataclasses.dataclass
class _Run:
    """What every batch of a call shares: the executables and the replicated arrays."""
    per_batch: int  # videos per batch (all devices)
    exes: Executables
    schedule: Any
    from_image: jax.Array
    guidance: jax.Array
    nearest: jax.Array | None
    steps: int  # the schedule's step count
    pieces: bool  # denoise in one-step pieces (progress)
    ip_scale: jax.Array | None = None  # the IP-Adapter's scale, None without one


def _silent(*_):
    pass


class Animator:
    """Holds the models (weights replicated over the mesh) and their compiled phases."""

    def __init__(self, config: PIAConfig, unet: nnx.Module, vae: nnx.Module, text_encoder: nnx.Module, tokenizer,
                 scheduler: schedulers.SchedulerConfig = schedulers.PIA_DDIM, mesh: Mesh | None = None, *,
                 compile_cache_dir=None, image_encoder: nnx.Module | None = None, image_proj: nnx.Module | None = None):
        """`tokenizer`: a CLIP tokenizer (pia_jax.models.tokenizer.load_tokenizer); `mesh`: devices to split videos over
        (default: this host's); `compile_cache_dir`: None (default) leaves jax's settings alone, as a library
        should; 'default', a folder or 'off' turn the persistent compilation cache on or off for the whole process
        (the CLIs do: see compile_cache.py). `image_encoder`, `image_proj`: the IP-Adapter's parts, required
        with (and only with) a config that has one (`config.ip_adapter`)."""
        self.compile_cache = compile_cache.enable(compile_cache_dir)
        self.config, self.tokenizer, self.scheduler_config = config, tokenizer, scheduler
        self.mesh = mesh or Mesh(np.array(jax.local_devices()), ("data",))
        self._use_split((self.devices, 1, 1))  # each call picks its own (_inputs)
        self._weight_sharding = self._replicated  # the weights' placement: every device (a split's view: _weights)
        self._placed = {}  # devices a split uses -> the weights viewed on them (_weights)
        (text_graph, text), (vae_graph, vae), (unet_graph, unet) = map(Graph.split, (text_encoder, vae, unet))
        self._text, self._vae, self._unet = jax.device_put((text, vae, unet), self._replicated)
        self.latent_factor = config.vae.latent_factor
        # a 4-channel UNet (AnimateDiff motion modules without PIA's condition branch) makes text-to-video: the
        # image only gives the size (encoded, but unused) and the affinity is ignored
        self.text_to_video = config.unet.in_channels == 4
        if (config.ip_adapter is None) != (image_encoder is None) or (image_encoder is None) != (image_proj is None):
            raise ValueError("image_encoder and image_proj go with a config that has an IP-Adapter, and only with one")
        image_graphs, self._image = (None, None), ()
        if config.ip_adapter is not None:  # the image prompt is encoded in the encode phase, with its weights
            (enc_graph, enc), (proj_graph, proj) = map(Graph.split, (image_encoder, image_proj))
            image_graphs, self._image = (enc_graph, proj_graph), jax.device_put((enc, proj), self._replicated)
        parts = Parts(text_graph, vae_graph, unet_graph, config.vae.scaling_factor, self.text_to_video, *image_graphs)
        # Outputs are placed by video explicitly (_by_video), so the loop's outputs have exactly the placement its
        # inputs had. identity: all a program closes over is in `parts`' repr, so its executables are stored beside the
        # persistent compile cache when that is on and a later process loads them (pia_jax.compiled.store)
        program = lambda fn, **jit: compiled.Program(functools.partial(fn, parts), self.mesh, settings=True,  # noqa
                                                     identity="sampler", **jit)
        donate = ("latents", "solver_state") if jax.default_backend() != "cpu" else ()  # CPU cannot reuse them
        self._encode, self._denoise, self._decode = (program(_encode_fn), program(_denoise_fn, donate_argnames=donate),
                                                     program(_decode_fn))
        self._parts = parts
        self._wait_each_step = False  # bench/sample.py: wait for each piece before queuing the next (the old loop)

    @classmethod
    def load(cls, path, *, dtype=None, param_dtype=None, mesh=None, attention_kernels=None,
             compile_cache_dir=None) -> "Animator":
        """An animator from a converted model directory (the only code here that knows that format); `dtype`
        defaults to bf16 on accelerators, fp32 on CPU."""
        from pia_jax.models import IP_ADAPTER_PARTS, PARTS
        from pia_jax.weights.model_dir import load_model_dir, read_config
        dtype = dtype or accelerator_default_dtype()
        kwargs = {"unet": {"attention_kernels": attention_kernels}} if attention_kernels else None
        parts = PARTS + (IP_ADAPTER_PARTS if read_config(path)[0].ip_adapter is not None else ())
        md = load_model_dir(path, parts=parts, dtype=dtype, param_dtype=param_dtype or dtype, model_kwargs=kwargs)
        scheduler = schedulers.from_dict(md.scheduler) if md.scheduler else schedulers.PIA_DDIM
        return cls(md.config, md.unet, md.vae, md.text_encoder, md.tokenizer, scheduler, mesh,
                   compile_cache_dir=compile_cache_dir, image_encoder=md.image_encoder, image_proj=md.image_proj)

    def update_unet(self, unet: nnx.Module):
        """Swaps in new UNet weights of the same structure, shapes and dtypes (e.g. while training) without
        recompiling: the programs take the weights as arguments, and their keys do not look at them."""
        graph, leaves = Graph.split(unet)
        if not graph.same_as(self._parts.unet):
            raise ValueError("update_unet needs a UNet of the same architecture as the animator's")
        leaves = jax.device_put(leaves, self._weight_sharding)
        if compiled.signature(leaves) != compiled.signature(self._unet):
            raise ValueError("update_unet needs UNet weights of the animator's shapes and dtypes")
        self._unet, self._placed = leaves, {}

    @property
    def compilations(self) -> int:
        return self._encode.compiles + self._denoise.compiles + self._decode.compiles

    @property
    def programs_loaded(self) -> int:
        """Programs loaded from stored executables (pia_jax.compiled.store) instead of compiled, so far."""
        return self._encode.loaded + self._denoise.loaded + self._decode.loaded

    @property
    def compile_seconds(self) -> float:
        """Seconds spent compiling (or loading from the persistent cache) so far."""
        return self._encode.seconds + self._denoise.seconds + self._decode.seconds

    @property
    def devices(self) -> int:
        return self.mesh.devices.size

    @property
    def groups(self) -> int:
        """Device groups a batch's videos are split over (sharding.sampler_split)."""
        return self._split.shape["video"]

    @property
    def devices_per_group(self) -> int:
        """Devices one video runs on (guidance's halves x its windows or frame chunks), in the split in use."""
        return self._split.shape["cfg"] * self._split.shape["window"]

    def _use_split(self, split: tuple):
        """Runs the next batches on the devices as (video, cfg, window) of these sizes (sharding.sampler_split)."""
        self._split = sharding.sampler_mesh(self.mesh.devices.flat, split)
        self._replicated = NamedSharding(self._split, P())
        self._by_video = NamedSharding(self._split, P("video"))

    def split_for(self, videos: int, frames: int, options: SampleOptions) -> tuple:
        """(video, cfg, window) axis sizes for a call (ValueError for a --devices-per-video that cannot be used)."""
        parts = options.device_parts(frames, self.config.unet.motion_max_seq_length)
        return sharding.sampler_split(self.devices, videos, options.cfg, parts, options.devices_per_video)

    # ---- compiling, from shapes alone ----

    def _settings(self, options: SampleOptions, frames: int, float_frames: bool = False) -> ProgramSettings:
        window = options.window(frames, self.config.unet.motion_max_seq_length)
        mode = options.mode if window is not None else ProgramSettings.context_mode  # no windows: one program for both
        window_batch, spread = options.window_batch, self._split.shape["window"]
        if spread > 1 and mode == "unet":  # each window device runs window_batch / spread windows per call
            window_batch = spread * max(1, min(window_batch, len(window.frames)) // spread)
        return ProgramSettings(options.clip_skip, options.cfg, window, window_batch,
                               max(1, min(options.decode_chunk, frames)), not float_frames, context_mode=mode,
                               split=self._split)

    def _schedule(self, options: SampleOptions):
        config = self.scheduler_config
        config = schedulers.SchedulerConfig(**{**schedulers.to_dict(config), "eta": options.eta,
                                               "use_karras_sigmas": options.karras or config.use_karras_sigmas})
        schedule = schedulers.make_schedule(options.scheduler, config, options.steps, options.strength,
                                            length=config.num_train_timesteps)
        return jax.device_put(schedule, self._replicated)

    def _weights(self, phase: str):
        """`phase`'s weights on the devices of the split in use: a split on fewer devices than the mesh views the
        first devices' copies (device_put reuses each device's buffer: nothing is copied)."""
        n = self._split.devices.size
        if n not in self._placed:
            every = (self._text, self._vae, self._unet, self._image)
            self._placed[n] = every if n == self.devices else jax.device_put(every, self._replicated)
        text, vae, unet, image = self._placed[n]
        return {"encode": (text, vae) + image, "denoise": unet, "decode": vae}[phase]

    def _get(self, phase: str, settings: ProgramSettings, *arrays):
        """`phase`'s executable for these arrays (or shapes) and the settings it reads, compiled on first use."""
        settings = settings.only(phase)
        program = getattr(self, "_" + phase)
        return program.get((settings, compiled.signature(arrays)), settings, self._weights(phase), *arrays)

    def _compile(self, b: int, height: int, width: int, frames: int, settings: ProgramSettings, schedule, text_keys=0,
                 keyframes=0) -> Executables:
        """The three programs for a batch of b videos (all devices), compiled from shapes. `text_keys`: the most keys
        of a prompt map (prompt travel), 0 for plain prompts; `keyframes`: condition images per video (0: one)."""
        f, h, w, c = self.config.vae.latent_shape(height, width, frames)
        videos = lambda shape, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype, sharding=self._by_video)  # noqa
        scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype, sharding=self._replicated)  # noqa: E731
        schedule = _shapes(schedule, self._replicated)
        tokens = self.config.text.max_position_embeddings
        ids = videos((b, 2, text_keys, tokens) if text_keys else (b, 2, tokens), jnp.int32)
        travel = (videos((b, 2, f), jnp.int32), videos((b, 2, f), jnp.int32), videos((b, 2, f))) if text_keys \
            else None
        pixels = videos((b, keyframes, height, width, 3) if keyframes else (b, height, width, 3))
        nearest = jax.ShapeDtypeStruct((f,), jnp.int32, sharding=self._replicated) if keyframes else None
        ip = self.config.ip_adapter  # with an IP-Adapter: its image prompts, and the scale for the loop
        clip_pixels = ip and videos((b,) + (ip.image_encoder.image_size,) * 2 + (3,))
        encode_exe = self._get("encode", settings, ids, pixels, videos((b, h, w, c)), videos((b, f, h, w, c)),
                               schedule, scalar(jnp.bool_), travel, nearest, clip_pixels)
        text, cond, latents, state, image = _shapes(encode_exe.out_info, self._by_video)
        denoise_exe = self._get("denoise", settings, latents, state, schedule, text, videos((b, f)), cond,
                                scalar(jnp.float32), videos((b, 2), jnp.uint32), scalar(jnp.int32), scalar(jnp.int32),
                                image, ip and scalar(jnp.float32))
        return Executables(encode_exe, denoise_exe, self._get("decode", settings, latents))

    def _executables(self, b, height, width, frames, options: SampleOptions, float_frames=False, text_keys=0,
                     keyframes=0):
        """The three programs for a batch of b videos, each with the bytes of the weights it takes:
        [(encode, bytes), (denoise, bytes), (decode, bytes)] (see `_compile`)."""
        exes = self._compile(b, height, width, frames, self._settings(options, frames, float_frames),
                             self._schedule(options), text_keys, keyframes)
        return tuple((exe, memory.tree_bytes(self._weights(phase))) for phase, exe in zip(PHASES, exes))

    def batch_bytes(self, per_device: int, height, width, frames, options, float_frames=False, text_keys=0,
                    keyframes=0) -> int:
        """Device memory a batch of `per_device` videos per device needs beyond the weights (compiles the phases
        for that batch size; they are then ready to run)."""
        exes = self._executables(per_device * self.groups, height, width, frames, options, float_frames, text_keys,
                                 keyframes)
        return max(memory.program_bytes(exe, resident) for exe, resident in exes)

    def plan_batch_size(self, videos: int, height: int, width: int, frames: int, options: SampleOptions,
                        batch_size: int | None = None, float_frames=False, text_keys=0, keyframes=0) -> int:
        """Videos per device group per batch, at most what `videos` need. An explicit `batch_size` is checked
        against the free device memory (ValueError when it cannot fit); the default is as many as fit. Lays the
        devices out for these videos (split_for) as the call will."""
        self._use_split(self.split_for(videos, frames, options))
        free = memory.free_bytes(self.mesh.devices.flat)
        shape = (height, width, frames, options)
        wanted = -(-videos // self.groups)
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

    # ---- a call: inputs -> noise -> per batch encode / denoise / decode ----

    def __call__(self, images, prompts, negative_prompts, affinity, options: SampleOptions = SampleOptions(), *,
                 seeds=None, noise=None, posterior_noise=None, progress: Callable | None = None,
                 batch_size: int | None = None, float_frames: bool = False, keyframes=None,
                 ip_adapter_images=None) -> Result:
        """Animates B images: `images` (B, H, W, 3) uint8 (H, W multiples of the VAE factor), one prompt and one
        negative prompt per video (each a string or a prompt map {frame: prompt} for prompt travel), `affinity`
        (B, F) per-frame affinities (affinity.py). Noise comes from `seeds` (one int per
        video) unless given as arrays: `noise` (B, F, h, w, 4), `posterior_noise` (B, h, w, 4). `progress(phase,
        done, total)` is called as phases advance. `batch_size`: videos per device group per batch (default: from the
        measured memory). The videos come back as uint8 frames, or float32 in [0, 1] with `float_frames`.
        Text-to-video (a 4-channel model): `images` may be a size (height, width) instead, `affinity` (B, F) only
        gives the frame count (e.g. np.ones((B, F))).
        Keyframes: `keyframes` = the K frames the images show (e.g. [0, 15]) and `images` (B, K, H, W, 3); every frame
        is conditioned on its nearest keyframe's latent (keyframes.py; give the affinity from
        affinity.preset_affinity with the keyframes).
        IP-Adapter (a model converted with one): `ip_adapter_images`, one uint8 (H, W, 3) image prompt per video (any
        size: CLIP-preprocessed here), default the condition images (the first keyframe's); at
        `options.ip_adapter_scale` (default 1.0; 0: exactly the model without it)."""
        call = self._inputs(images, prompts, negative_prompts, affinity, options, seeds, noise, posterior_noise,
                            keyframes)
        call.clip_pixels = self._image_prompts(images, ip_adapter_images, options, call)
        cache, compile_seconds = compile_cache.counts(), self.compile_seconds
        call.noise, call.posterior_noise, call.step_keys = self._noise(call, options, seeds, noise, posterior_noise)
        call.ids, call.travel = self._text_inputs(prompts, negative_prompts, call.frames)
        per_device = self.plan_batch_size(call.videos, call.height, call.width, call.frames, options, batch_size,
                                          float_frames, call.text_keys, call.keyframes)
        run = self._prepare(call, options, per_device * self.groups, float_frames, progress is not None)
        seconds = dict.fromkeys(PHASES, 0.0)
        videos = [self._batch(call, run, lo, seconds, progress or _silent)
                  for lo in range(0, call.videos, run.per_batch)]
        seconds["compile"] = self.compile_seconds - compile_seconds
        cache = {k: n - cache[k] for k, n in compile_cache.counts().items()}
        return Result(np.concatenate(videos), call.noise, call.posterior_noise, seconds, per_device, cache)

    def _inputs(self, images, prompts, negative_prompts, affinity, options: SampleOptions, seeds, noise,
                posterior_noise, keyframes) -> _Call:
        """The call's images, affinities and keyframes as arrays, every check made (ValueError) before anything runs."""
        if self.text_to_video and len(np.shape(images)) == 1:
            images = np.zeros((len(prompts),) + tuple(images) + (3,), np.uint8)
        images, affinity = np.asarray(images), np.asarray(affinity, np.float32)
        f = affinity.shape[1]
        nearest = None if keyframes is None else nearest_keyframe(f, keyframes)
        if keyframes is not None and (images.ndim != 5 or images.shape[1] != len(keyframes)):
            raise ValueError(f"{len(keyframes)} keyframes need images (B, {len(keyframes)}, H, W, 3), got "
                             f"{images.shape}")
        b, height, width = images.shape[0], images.shape[-3], images.shape[-2]
        if len(prompts) != b or len(negative_prompts) != b or affinity.shape[0] != b:
            raise ValueError(f"{b} images need {b} prompts, negative prompts and affinity rows")
        if height % self.latent_factor or width % self.latent_factor:
            raise ValueError(f"image size {height}x{width} must be a multiple of {self.latent_factor}")
        options.check(self.config, self.scheduler_config)
        options.check_frames(f, self.config)
        self._use_split(self.split_for(b, f, options))
        if seeds is not None and len(seeds) != b:
            raise ValueError(f"{b} videos need {b} seeds, got {len(seeds)}")
        if seeds is None and (noise is None or posterior_noise is None or options.step_noise):
            raise ValueError("pass seeds (one per video) or both noise arrays (and seeds for eta > 0 or lcm)")
        if noise is not None and options.free_noise != "none":
            raise ValueError("free noise reschedules the seeded noise; given noise is used as it is: reschedule it "
                             "first (windows.freenoise_noise), or give seeds")
        return _Call(b, f, height, width, images.astype(np.float32) / 255 * 2 - 1, affinity, nearest,
                     0 if keyframes is None else len(keyframes))

    def _image_prompts(self, images, ip_adapter_images, options: SampleOptions, call: _Call):
        """The IP-Adapter's image prompts, CLIP-preprocessed on the host (B, S, S, 3), or None without one."""
        ip = self.config.ip_adapter
        if ip is None:
            if ip_adapter_images is not None:
                raise ValueError("ip_adapter_images given to a model without an IP-Adapter; convert it with "
                                 "convert_torch_weights.py --ip-adapter FILE --image-encoder DIR")
            return None
        if ip_adapter_images is None:
            if self.text_to_video and options.image_prompt_scale(self.config) != 0:
                raise ValueError("a text-to-video model has no condition image to use as the IP-Adapter's image "
                                 "prompt: give ip_adapter_images (--ip-adapter-image), or an ip adapter scale of 0")
            images = np.asarray(images) if not self.text_to_video else np.zeros((call.videos, 8, 8, 3), np.uint8)
            ip_adapter_images = images[:, 0] if images.ndim == 5 else images  # keyframes: the first one's image
        if len(ip_adapter_images) != call.videos:
            raise ValueError(f"{call.videos} videos need {call.videos} IP-Adapter images, got {len(ip_adapter_images)}")
        size = ip.image_encoder.image_size
        return np.concatenate([media.clip_preprocess(im, resize=ip.resize, crop=size, mean=ip.image_mean,
                                                     std=ip.image_std) for im in ip_adapter_images])

    def _noise(self, call: _Call, options: SampleOptions, seeds, noise, posterior_noise):
        """-> (initial noise, posterior noise, DDIM step-noise keys) per video: from its seed, unless given."""
        b, shape = call.videos, self.config.vae.latent_shape(call.height, call.width, call.frames)
        keys = np.zeros((b, 2), np.uint32)  # unused without step noise (eta 0, not lcm): any key will do
        if seeds is not None:
            drawn_noise, drawn_post, keys = noise_lib.draw(seeds, shape)
            if noise is None and options.free_noise != "none":  # FreeNoise: the windows repeat the first's noise
                drawn_noise = self._freenoise(drawn_noise, seeds, options, call.frames)
            noise = drawn_noise if noise is None else noise
            posterior_noise = drawn_post if posterior_noise is None else posterior_noise
        noise, posterior_noise = np.asarray(noise, np.float32), np.asarray(posterior_noise, np.float32)
        if noise.shape != (b,) + shape or posterior_noise.shape != (b,) + shape[1:]:
            raise ValueError(f"noise must be {(b,) + shape} and posterior noise {(b,) + shape[1:]}, got "
                             f"{noise.shape} and {posterior_noise.shape}")
        return noise, posterior_noise, keys

    def _freenoise(self, noise, seeds, options: SampleOptions, frames: int) -> np.ndarray:
        """Each video's noise rescheduled by FreeNoise (windows.freenoise_noise), shuffled with its own key."""
        window = options.window(frames, self.config.unet.motion_max_seq_length)
        return np.stack([np.asarray(freenoise_noise(noise[i:i + 1], window, options.free_noise, shuffle_permutations(
            noise_lib.freenoise_key(seed), frames, window.length, window.stride)))[0] for i, seed in enumerate(seeds)])

    def _prepare(self, call: _Call, options: SampleOptions, per_batch: int, float_frames: bool, pieces: bool) -> _Run:
        """The executables (compiled by plan_batch_size: found, not compiled) and the arrays every batch shares."""
        schedule = self._schedule(options)
        exes = self._compile(per_batch, call.height, call.width, call.frames,
                             self._settings(options, call.frames, float_frames), schedule, call.text_keys,
                             call.keyframes)
        ip_scale = self._put(np.float32(options.image_prompt_scale(self.config))) if self.config.ip_adapter else None
        return _Run(per_batch, exes, schedule, self._put(np.bool_(options.strength < 1)),
                    self._put(np.float32(options.guidance_scale)),
                    None if call.nearest is None else self._put(call.nearest), int(schedule.count), pieces, ip_scale)

    def _batch(self, call: _Call, run: _Run, lo: int, seconds: dict, report: Callable) -> np.ndarray:
        """Videos lo.. of the call, one batch: encode, denoise, decode -> their frames (the padding dropped)."""
        rows = functools.partial(self._rows, lo=lo, n=run.per_batch)
        tick = time.perf_counter()
        report("encode", 0, 1)
        text, cond, latents, state, image = self._encode_batch(call, run, rows)
        report("encode", 1, 1)
        tick = self._lap(seconds, "encode", tick)
        latents = self._denoise_batch(call, run, rows, text, cond, latents, state, report, image)
        tick = self._lap(seconds, "denoise", tick)
        frames = self._decode_batch(run, latents, call.videos - lo)
        report("decode", call.frames, call.frames)
        self._lap(seconds, "decode", tick)
        return frames

    def _encode_batch(self, call: _Call, run: _Run, rows: Callable):
        """-> (text states, condition latent, first latents, solver state, image tokens or None) of a batch, ready."""
        travel = None if call.travel is None else tuple(map(rows, call.travel))
        clip_pixels = None if call.clip_pixels is None else rows(call.clip_pixels)
        out = run.exes.encode(self._weights("encode"), rows(call.ids), rows(call.pixels), rows(call.posterior_noise),
                              rows(call.noise), run.schedule, run.from_image, travel, run.nearest, clip_pixels)
        jax.block_until_ready(out[2])
        return out

    def _denoise_batch(self, call: _Call, run: _Run, rows: Callable, text, cond, latents, state, report: Callable,
                       image=None):
        """The loop in one call, or (progress) in one-step pieces all queued before the first is waited for."""
        args = (rows(call.affinity), cond, run.guidance, rows(call.step_keys))
        bounds = [(i, i + 1) for i in range(run.steps)] if run.pieces else [(0, run.steps)]
        pieces, weights = [], self._weights("denoise")
        for begin, end in bounds:
            latents, state, finite = run.exes.denoise(weights, latents, state, run.schedule, text, *args,
                                                      self._put(np.int32(begin)), self._put(np.int32(end)), image,
                                                      run.ip_scale)
            pieces.append((end, finite))
            if self._wait_each_step:
                finite.block_until_ready()
        for end, finite in pieces:
            finite.block_until_ready()
            report("denoise", end, run.steps)
        return latents

    def _decode_batch(self, run: _Run, latents, real: int) -> np.ndarray:
        """The frames of a batch's first `real` videos (the rest is padding), on the host."""
        frames, finite = run.exes.decode(self._weights("decode"), latents)
        frames, finite = np.asarray(frames), np.asarray(finite)
        if not finite[:real].all():
            raise FloatingPointError("the decoded frames contain NaN or infinity (an fp16/bf16 overflow in the "
                                     "model?)")
        return frames[:real]

    # ---- host helpers ----

    def _rows(self, x, lo: int, n: int) -> jax.Array:
        """Rows lo..lo+n of x, padded with copies of its last to n, split over the devices by video."""
        x = np.asarray(x[lo:lo + n])
        x = np.concatenate([x, np.repeat(x[-1:], n - len(x), axis=0)]) if len(x) < n else x
        return jax.device_put(x, self._by_video)

    def _put(self, x) -> jax.Array:
        return jax.device_put(np.asarray(x), self._replicated)

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

    def _lap(self, seconds, phase, tick):
        """Adds the time since `tick` to `phase` (all compiling happened before, in plan_batch_size)."""
        now = time.perf_counter()
        seconds[phase] += now - tick
        return now


def _shapes(tree, sharding):
    """The arrays of `tree` as shapes placed by `sharding`."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
