"""Denoise: the sampling loop as one program, `lax.fori_loop` over a padded schedule (pia_jax.sampling.schedulers) from step
`begin` to `end`, both data. So one executable per (shape, scheduler kind, guidance on/off) serves every step count,
strength, guidance scale, eta and Karras setting; and the loop-invariant work on the weights (re-layouts for the
convolution kernels, dtype casts) is hoisted out of the loop body by XLA, so it runs once per call, not per step
(tests/test_sampling.py reads the compiled program to check it).

Every step: eps = denoiser(...) (the UNet with classifier-free guidance; a replaceable function, e.g. for context
windows over long videos: `windowed` around the whole UNet, `fused` inside its motion modules), then the
scheduler's pure `step`.
"""

import contextlib
import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pia_jax.sampling import schedulers
from pia_jax.sampling.noise import step_noise
from pia_jax.sampling.windows import WindowSchedule, take_windows, windowed_eps


def guided_eps(unet, latents_BxFxhxwxc, t, text_Bx2xLxD, mask_BxF, cond_Bxhxwxc, guidance, cfg: bool, image=None,
               split=None, frame_axis: str | None = None):
    """The noise prediction for a batch of videos. With `cfg` the UNet sees [negative, prompt] per video (kept
    next to each other so a video stays on its device) and eps = neg + guidance·(pos - neg); else the prompt only.
    Text may be per frame, (B, 2, F, L, D) (prompt travel). `image`: None, or the IP-Adapter's (tokens (B, 2, n, D)
    [unconditional, image prompt], scale (a number or (B,))), paired with the text branches as the text is.
    `split`: the sampler's mesh (sharding.SAMPLER_AXES) or None. Its rows are split over ("video", "window") (the
    window axis: a windowed call's windows, rows video-major); with a cfg axis of 2 the two branches go to its two
    devices: the UNet batch is then branch-major [negatives; prompts], and the combination gathers the halves.
    `frame_axis`: a mesh axis of `split` ("window", context mode attention) that splits each video's frames
    inside the UNet instead (models/frame_split.py): the rows then go over the other axes, the latents' frames over
    it, and the UNet is traced under the mesh."""
    b = latents_BxFxhxwxc.shape[0]
    n = 2 if cfg else 1
    major = cfg and split is not None and split.shape["cfg"] > 1  # branch-major rows, one branch per cfg device
    rows = _rows(n, major, split, frame_axis)
    x = rows(jnp.broadcast_to(latents_BxFxhxwxc[:, None], (b, n) + latents_BxFxhxwxc.shape[1:]), frames=True)
    if frame_axis is not None:
        unet = functools.partial(unet, frame_axis=frame_axis)
    text = rows(text_Bx2xLxD[:, -n:])
    if image is not None:
        tokens, scale = image
        unet = functools.partial(unet, image_tokens=rows(tokens[:, -n:]),
                                 ip_adapter_scale=rows(jnp.broadcast_to(jnp.reshape(scale, (-1, 1)), (b, n))))
    with _tracing_under(split if frame_axis is not None else None):
        if mask_BxF is None:  # text-to-video: a 4-channel (AnimateDiff) UNet has no condition branch
            eps = unet(x, t, text)
        else:
            mask = rows(jnp.broadcast_to(mask_BxF[:, None], (b, n) + mask_BxF.shape[1:]))[:, :, None, None, None]
            cond = cond_Bxhxwxc if cond_Bxhxwxc.ndim == 5 else cond_Bxhxwxc[:, None]  # per frame or per video
            cond = rows(jnp.broadcast_to(cond[:, None], (b, n) + cond.shape[1:]))
            eps = unet(x, t, text, mask=mask, condition=cond)
    eps = eps.reshape((n, b) + x.shape[1:]) if major else eps.reshape((b, n) + x.shape[1:]).swapaxes(0, 1)
    return eps[0] + guidance * (eps[1] - eps[0]) if cfg else eps[0]


def _rows(n: int, major: bool, split, frame_axis: str | None = None):
    """(b, n, ...) per video and branch -> the UNet batch (b·n, ...): video-major, or branch-major (`major`),
    constrained to the split of `split` (guided_eps) when given; rows(a, frames=True): a's frames (dimension 1)
    over `frame_axis` when given."""
    axes = tuple(a for a in (("cfg",) if major else ()) + ("video", "window") if a != frame_axis)

    def rows(a, frames=False):
        a = a.swapaxes(0, 1) if major else a
        a = a.reshape((-1,) + a.shape[2:])
        if split is None:
            return a
        split_frames = frames and frame_axis is not None and a.shape[1] % split.shape[frame_axis] == 0
        spec = P(axes, frame_axis) if split_frames else P(axes)
        return jax.lax.with_sharding_constraint(a, NamedSharding(split, spec))
    return rows


def _tracing_under(mesh):
    """A context tracing under `mesh` (the UNet's frame split reads it: models/frame_split.py), or none."""
    return contextlib.nullcontext() if mesh is None else jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


def windowed(denoiser, window: WindowSchedule, window_batch: int = 1):
    """`denoiser` run on the context windows of `window` (`window_batch` at a time), the predictions blended
    (windows.windowed_eps); the same signature as `denoiser`. Per-video inputs are repeated for each window of a
    call (the IP-Adapter's image tokens too: one image per video, the same for every window), the mask (B, F) is
    cut to the windows' frames."""
    k = max(1, min(window_batch, len(window.frames)))

    def eps(unet, latents, t, text, mask, cond, guidance, cfg, image=None):
        if image is not None:
            tokens, scale = image
            image = (jnp.repeat(tokens, k, axis=0), scale if jnp.ndim(scale) == 0 else jnp.repeat(scale, k))

        def fn(x, frames_KxL):
            if text.ndim == 5:  # per-frame text (B, 2, F, L, D) (prompt travel) -> (B·k, 2, window, L, D)
                text_w = jnp.moveaxis(jnp.take(text, frames_KxL, axis=2), 2, 1)
                text_w = text_w.reshape((-1,) + text_w.shape[2:])
            else:
                text_w = jnp.repeat(text, k, axis=0)
            if mask is None:  # text-to-video
                return denoiser(unet, x, t, text_w, None, None, guidance, cfg, **_image_kw(image))
            cond_w = take_windows(cond, frames_KxL) if cond.ndim == 5 else jnp.repeat(cond, k, axis=0)
            return denoiser(unet, x, t, text_w, take_windows(mask, frames_KxL), cond_w, guidance, cfg,
                            **_image_kw(image))
        return windowed_eps(fn, latents, window, k)

    return eps


def fused(denoiser, window: WindowSchedule, chunked: bool = True):
    """`denoiser` with the UNet's motion modules attending within the windows of `window` and blending there
    (FreeNoise, context mode attention); the spatial layers see every frame once, in chunks of `window.length`
    frames (the UNet's `frame_chunk`), so their temporaries do not grow with the frames (`chunked` False: all
    frames at once, the same values). Every input stays whole."""
    arrays = window.arrays()

    def eps(unet, latents, t, text, mask, cond, guidance, cfg, image=None):
        unet = functools.partial(unet, temporal_windows=arrays, frame_chunk=window.length if chunked else None)
        return denoiser(unet, latents, t, text, mask, cond, guidance, cfg, **_image_kw(image))

    return eps


def _image_kw(image) -> dict:
    """The `image` argument for a denoiser, left out without an IP-Adapter (denoisers that take none still work)."""
    return {} if image is None else {"image": image}


def start(schedule: schedulers.Schedule, noise_BxFxhxwxc, cond_Bxhxwxc, from_image):
    """The first latents and the solver state: the noise itself, or (`from_image`, for strength < 1) the condition
    latent on every frame noised to the first step taken. `from_image` is data: both come from one program."""
    cond = cond_Bxhxwxc if cond_Bxhxwxc.ndim == 5 else cond_Bxhxwxc[:, None]  # per frame (keyframes) or video
    noised = schedulers.add_noise_start(schedule, jnp.broadcast_to(cond, noise_BxFxhxwxc.shape),
                                        noise_BxFxhxwxc)
    latents = jnp.where(from_image, noised, schedulers.initial_noise(schedule, noise_BxFxhxwxc))  # Euler scales it
    return latents, schedulers.init_state(schedule, latents)


def denoise(unet, schedule: schedulers.Schedule, latents, solver_state, text, mask, cond, guidance, step_keys,
            begin, end, *, cfg: bool, denoiser=guided_eps, image=None):
    """Runs steps begin..end-1 of the schedule -> (latents, solver state). `step_keys` (B, 2) is each video's DDIM
    step-noise key (unused by DPM-Solver); `denoiser(unet, latents, t, text, mask, cond, guidance, cfg) -> eps`
    (and `image=` the IP-Adapter's (tokens, scale) when given: guided_eps)."""

    def body(i, carry):
        x, state = carry
        eps = denoiser(unet, x, schedule.timesteps[i], text, mask, cond, guidance, cfg, **_image_kw(image))
        noise = step_noise(step_keys, i, x.shape[1:]) if getattr(schedule, "stochastic", False) else None
        return schedulers.step(schedule, state, i, eps, x, noise)

    return jax.lax.fori_loop(begin, end, body, (latents, solver_state))
