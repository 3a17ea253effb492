"""One table of sharding rules: which mesh axes each weight and each batch is split over.

The device mesh has two logical axes. `data`: plain data parallelism, weights replicated. `fsdp`: data parallelism
whose devices also split the weights and the optimizer state between them (ZeRO-3 storage). A batch is split over
both axes by video, never by frame, so the motion modules' frame<->site reshapes need no communication.
Sampling lays the same devices out as (video, cfg, window) instead (`SAMPLER_AXES`, `sampler_split`).
"""

import re

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")

# (regex searched in the NNX parameter path, PartitionSpec of the trailing dimensions); the first match wins.
# Specs are right-aligned to the parameter's rank, so one rule covers conv (H, W, I, O) and linear (I, O) kernels.
# A dimension that the axis size does not divide (conv_out's 4 channels, 77 positions) stays replicated.
RULES = (
    (r"\.(bias|scale)$", P()),  # vectors: a few KB each, not worth a gather
    (r"\.embedding$", P("fsdp", None)),  # (vocabulary or positions, width)
    (r"\.kernel$", P("fsdp")),  # output channels
)


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> jax.sharding.Mesh:
    """A (data, fsdp) mesh over `devices` (all by default); -1 for one axis takes the devices left over.

    Devices are ordered by process, so each process's devices hold one contiguous block of every batch, in process
    order: the rows that process's data loader made. fsdp groups of up to a host's devices stay within a host.
    """
    devices = sorted(jax.devices() if devices is None else devices, key=lambda d: (d.process_index, d.id))
    n = len(devices)
    if data == -1:
        data = n // fsdp
    elif fsdp == -1:
        fsdp = n // data
    if data * fsdp != n:
        raise ValueError(f"mesh data={data} x fsdp={fsdp} does not match the {n} devices")
    # Auto axes: jit's explicit in/out shardings fix the layout at the boundary, XLA propagates inside.
    return jax.sharding.Mesh(np.array(devices).reshape(data, fsdp), MESH_AXES,
                             axis_types=(jax.sharding.AxisType.Auto,) * 2)


def param_spec(path: str, shape: tuple, mesh: jax.sharding.Mesh, rules=RULES) -> P:
    for pattern, spec in rules:
        if re.search(pattern, path):
            break
    else:
        return P()
    spec = (None,) * (len(shape) - len(spec)) + tuple(spec)[-len(shape):] if shape else ()
    fits = lambda axes, dim: axes is None or dim % np.prod([mesh.shape[a] for a in np.atleast_1d(axes)]) == 0
    return P(*(axes if fits(axes, dim) else None for axes, dim in zip(spec, shape)))


def param_shardings(shapes: dict, mesh: jax.sharding.Mesh, rules=RULES) -> dict:
    """{path: NamedSharding} for a flat {NNX path: array or ShapeDtypeStruct} dict."""
    return {k: NamedSharding(mesh, param_spec(k, tuple(v.shape), mesh, rules)) for k, v in shapes.items()}


def batch_sharding(mesh: jax.sharding.Mesh, batch_dim: int = 0) -> NamedSharding:
    """Arrays whose dimension `batch_dim` indexes videos, split over all batch axes (leading dims replicated)."""
    return NamedSharding(mesh, P(*(None,) * batch_dim, BATCH_AXES))


# Sampling (pia_jax.sampling.animator): videos split over "video"; one video's devices split the UNet batch's two
# classifier-free guidance halves over "cfg" and over "window" its context windows (context mode unet) or its frames
# inside the UNet (context mode attention: pia_jax.models.frame_split).
SAMPLER_AXES = ("video", "cfg", "window")


def sampler_split(devices: int, videos: int, cfg: bool, parts: int, per_video: int | None = None) -> tuple:
    """(video, cfg, window) axis sizes for `videos` videos on at most `devices` devices: the sampler's one layout
    rule (Animator.split_for; sample.py's and the web UI's planning check --devices-per-video by it).

    A video can use 2 devices for guidance's halves (1 without guidance) times `parts`, what its devices may split
    beyond them (SampleOptions.device_parts: its context windows in context mode unet, its chunks of context-length
    frames in context mode attention, its groups of frames without windows; 1 for nothing). Each video
    gets `per_video` devices, by default as many as it can use while every video of the batch has its own (even
    with guidance, whose halves need a pair): spare devices go to the video. As many groups as the videos fill,
    at most devices // per_video, and no more than one batch round needs (12 videos on 8 groups: 6 groups of 2):
    devices nothing can use stay idle (`sampler_mesh` takes the first) rather than compute padding copies of a
    video. ValueError for a `per_video` outside 1..devices, above what a video can use, or odd (> 1) with guidance.
    """
    useful = (2 if cfg else 1) * max(1, parts)
    if per_video is None:
        per_video = max(1, min(useful, devices // max(1, videos)))
        per_video -= per_video % 2 if cfg and per_video > 1 else 0
    if not 1 <= per_video <= devices:
        raise ValueError(f"devices per video must be in 1..{devices} (the devices there are), got {per_video}")
    if per_video > useful or (cfg and per_video % 2 and per_video > 1):
        raise ValueError(f"devices per video {per_video}: a video can use {useful} (2 for guidance's halves, times "
                         f"its {max(1, parts)} context windows in context mode unet, chunks of context-length frames "
                         "in context mode attention, or groups of frames without windows), as an even number with "
                         "guidance; give fewer")
    halves = 2 if cfg and per_video % 2 == 0 else 1
    rounds = -(-videos // (devices // per_video))  # videos per group
    return max(1, -(-videos // rounds)), halves, per_video // halves


def sampler_mesh(devices, split: tuple) -> jax.sharding.Mesh:
    """The first video x cfg x window of `devices` (in their order) as a (video, cfg, window) mesh of the axis sizes
    `split` (sampler_split)."""
    n = int(np.prod(split))
    return jax.sharding.Mesh(np.asarray(list(devices)[:n]).reshape(split), SAMPLER_AXES)


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
