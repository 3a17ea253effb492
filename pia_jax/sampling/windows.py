"""Context windows for videos longer than the motion modules' span, as static data.

A video of N frames is covered by windows of `length` frames every `stride` frames. The schedule is FreeNoise's as
diffusers implements it (`FreeNoiseTransformerBlock._get_frame_indices`): starts 0, stride, 2·stride, ... while a
whole window fits, plus one window ending at the last frame when the last start leaves frames uncovered. In that tail
window only the frames no earlier window covers are blended in (diffusers does the same). A video no longer than the
window is one window of all its frames.

Overlapping results are blended by a weighted mean, weight w[j] for the j-th frame of a window (`frame_weights`):
flat [1, 1, ...], pyramid [1, 2, .., 2, 1] (FreeNoise Eq. 9) or delayed_reverse_sawtooth [0.01, .., m, .., 2, 1].
The tail rule (`tail`): "exact" divides every frame by the sum of the weights it received (a frame seen once is
unchanged); "diffusers" divides the frames only the tail window covers all by one weight, that of the tail's first
new frame w[t], as diffusers' `FreeNoiseTransformerBlock` does, so with non-flat weights those frames come out
scaled by w[j] / w[t] (pyramid, 16 every 4, a 4-frame tail: x1, x3/4, x1/2, x1/4). No tail window (N - length a
multiple of stride, or one window): both rules are the same.

Two places to blend (both use a `WindowSchedule`; sampling.options' `context_mode` picks one):
  * "unet", `windowed_eps`: the whole UNet runs per window and the noise predictions are blended (AnimateDiff-
    Evolved / prompt-travel "context windows"), tail "exact". Memory grows with the window batch, not with N; the
    UNet runs on ~N·length/stride frames.
  * "attention", temporal fusion inside the motion modules (`UNetMotionModel(..., temporal_windows=
    schedule.arrays())`): only the motion modules' attention runs per window; every other layer sees each frame
    once. This is diffusers' FreeNoise (`AnimateDiffPipeline.enable_free_noise`), tail "diffusers". With a
    `frame_chunk` the spatial layers run on chunks of frames (diffusers' `enable_free_noise_split_inference`): what
    grows with N is then the per-frame activations the UNet keeps (skips, residual stream), not the layers' work.
    A video's devices may split its frames (the sampler's "window" mesh axis, models/frame_split.py): each device
    then runs about one chunk's frames of every layer, and the windows whole for its share of the spatial sites.

FreeNoise noise rescheduling (`freenoise_source_frames`): frames past the first window take copies of the frames one
window length earlier, shuffled within each block of `stride` frames (diffusers' `_prepare_latents_free_noise`,
"shuffle_context"), or plain repeats ("repeat_context"; diffusers repeats only latents it is given with `length`
frames: its own draw comes back unchanged, as its `context_num_frames` test compares the length with a string).
diffusers draws each block's shuffle with
`torch.randperm(stride, generator)`; here the permutations are explicit inputs, drawn from a JAX key by
`shuffle_permutations` (deterministic per seed, but not the same permutations as torch's for the same seed).
"""

import functools
from dataclasses import dataclass

import numpy as np

# jax is imported in the functions that use it, so that the schedules and their checks load without it
# (pia_jax.sampling.options: input checking imports no jax).

WEIGHTINGS = ("flat", "pyramid", "delayed_reverse_sawtooth")
TAILS = ("exact", "diffusers")
NOISE_TYPES = ("random", "shuffle_context", "repeat_context")


def frame_weights(length: int, weighting: str = "pyramid") -> np.ndarray:
    """(length,) float32 blend weight of each position in a window (diffusers' `_get_frame_weights`)."""
    half = (length + 1) // 2
    if weighting == "flat":
        w = [1.0] * length
    elif weighting == "pyramid":  # 4 -> [1, 2, 2, 1], 5 -> [1, 2, 3, 2, 1]
        up = list(range(1, half + 1))
        w = up + up[::-1][length % 2:]
    elif weighting == "delayed_reverse_sawtooth":  # 4 -> [0.01, 2, 2, 1], 5 -> [0.01, 0.01, 3, 2, 1]
        # odd lengths as diffusers documents them (its code makes length + 1 weights there and then fails)
        w = [0.01] * (half - 1) + ([half] if length % 2 == 0 else []) + list(range(half, 0, -1))
    else:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    return np.asarray(w, np.float32)


def window_starts(num_frames: int, length: int, stride: int) -> list[int]:
    """First frame of each window; the last window ends at the last frame."""
    if num_frames <= length:
        return [0]
    starts = list(range(0, num_frames - length + 1, stride))
    if starts[-1] + length < num_frames:
        starts.append(num_frames - length)
    return starts


@dataclass(frozen=True)
class WindowSchedule:
    """Which frames each window holds and how much each window's result counts for them; hashable, so it can be a
    static argument of `jax.jit`. Arrays (W windows, L = min(length, num_frames) frames):
      frames  (W, L) int32    frame indices of each window
      weights (W, L) float32  blend weight of each window frame (0: this window does not contribute the frame)
      norm    (N,) float32    per-frame divisor of the blend (> 0 for every frame): the sum of the weights, but
                              with tail "diffusers" w[t] for the frames only the tail window covers (module doc)
    """
    num_frames: int
    length: int = 16
    stride: int = 4
    weighting: str = "pyramid"
    tail: str = "exact"

    def __post_init__(self):
        check_window(self.num_frames, self.length, self.stride)
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if self.tail not in TAILS:
            raise ValueError(f"tail must be one of {TAILS}, got {self.tail!r}")

    @functools.cached_property
    def frames(self) -> np.ndarray:
        size = min(self.length, self.num_frames)
        starts = window_starts(self.num_frames, self.length, self.stride)
        return (np.asarray(starts)[:, None] + np.arange(size)).astype(np.int32)

    @functools.cached_property
    def weights(self) -> np.ndarray:
        frames = self.frames
        w = np.tile(frame_weights(frames.shape[1], self.weighting), (len(frames), 1))
        starts = frames[:, 0]
        if len(starts) > 1 and starts[-1] - starts[-2] != self.stride:  # an added tail window
            w[-1, frames[-1] <= frames[-2, -1]] = 0  # adds only the frames past the previous window's end
        return w

    @functools.cached_property
    def norm(self) -> np.ndarray:
        norm = np.bincount(self.frames.ravel(), self.weights.ravel(), self.num_frames).astype(np.float32)
        tail = self.weights[-1] > 0
        if self.tail == "diffusers" and not tail.all():  # an added tail window: its new frames share one divisor
            norm[self.frames[-1][tail]] = self.weights[-1][tail][0]
        return norm

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(frames, weights, norm): what the motion modules' temporal fusion takes."""
        return self.frames, self.weights, self.norm


def check_window(num_frames: int, length: int, stride: int, max_positions: int | None = None):
    """ValueError unless the windows cover every frame and fit the motion modules' position table."""
    if num_frames < 1:
        raise ValueError(f"the video needs at least one frame, got {num_frames}")
    if length < 1:
        raise ValueError(f"the context window needs at least one frame, got length {length}")
    if not 1 <= stride <= length:
        raise ValueError(f"context stride must be in 1..{length} (the window length) so that windows overlap or "
                         f"touch, got {stride}")
    if max_positions is not None and min(length, num_frames) > max_positions:
        raise ValueError(f"context window of {min(length, num_frames)} frames is longer than the motion modules' "
                         f"{max_positions} positions (config unet.motion_max_seq_length); use --context-length "
                         f"{max_positions} or less")


def windowed_eps(eps_fn, latents, schedule: WindowSchedule, window_batch: int = 1):
    """The blended noise prediction of `eps_fn` run on every window of `latents` (b, N, ...) -> (b, N, ...) fp32.

    eps_fn(x, frames): x (b·k, L, ...) the latents of k = `window_batch` windows, video-major (row i·k + j is video
    i, window j); frames (k, L) int32 their frame indices (to slice per-frame inputs: context, mask, condition).
    Returns the prediction for x. The windows run in a `lax.scan`, k at a time (the last group padded with
    zero-weight copies), so one UNet evaluation of k windows is compiled and its activations do not grow with N
    (only the latents and the fp32 accumulator, (b, N, ...) each, do).
    """
    import jax
    import jax.numpy as jnp
    b, n = latents.shape[:2]
    if n != schedule.num_frames:
        raise ValueError(f"latents have {n} frames, the window schedule {schedule.num_frames}")
    frames, weights = schedule.frames, schedule.weights
    count, size = frames.shape
    k = max(1, min(window_batch, count))
    pad = -count % k
    frames = np.concatenate([frames, np.repeat(frames[-1:], pad, 0)]).reshape(-1, k, size)
    weights = np.concatenate([weights, np.zeros((pad, size), np.float32)]).reshape(-1, k, size)
    rest = latents.shape[2:]
    expand = (None, slice(None), slice(None)) + (None,) * len(rest)

    def body(acc, xs):
        f_KxL, w_KxL = xs
        x_BxKxL = jnp.take(latents, f_KxL, axis=1)
        eps = eps_fn(x_BxKxL.reshape((b * k, size) + rest), f_KxL).astype(jnp.float32)
        return acc.at[:, f_KxL].add(eps.reshape(x_BxKxL.shape) * w_KxL[expand]), None

    acc, _ = jax.lax.scan(body, jnp.zeros(latents.shape, jnp.float32), (jnp.asarray(frames), jnp.asarray(weights)))
    return acc / jnp.asarray(schedule.norm).reshape((1, n) + (1,) * len(rest))


def take_windows(per_frame, frames_KxL):
    """A per-frame input (b, N, ...) (text states, affinity, condition latents) cut to the windows of an `eps_fn`
    call: (b·k, L, ...), video-major like its x. Per-video inputs (b, ...) take `jnp.repeat(a, k, axis=0)`."""
    import jax.numpy as jnp
    a = jnp.take(per_frame, frames_KxL, axis=1)  # (b, k, L, ...)
    return a.reshape((-1,) + a.shape[2:])


def shuffle_permutations(key, num_frames: int, length: int, stride: int) -> np.ndarray:
    """(blocks, stride) int32: one random permutation of range(stride) per rescheduled block, from a JAX key."""
    import jax
    blocks = len(range(length, num_frames, stride))
    if blocks == 0:
        return np.zeros((0, stride), np.int32)
    perms = jax.vmap(lambda k: jax.random.permutation(k, stride))(jax.random.split(key, blocks))
    return np.asarray(perms, np.int32)


def freenoise_source_frames(num_frames: int, length: int, stride: int, noise_type: str = "shuffle_context",
                            permutations=None) -> np.ndarray:
    """(N,) int32: which of the initial noise's frames each frame's noise is a copy of.

    random: its own. repeat_context: frame mod length. shuffle_context: the first `length` frames keep theirs; block
    b (frames i .. i+stride-1, i = length + b·stride) copies frames i-length .. i-length+stride-1 in the order
    `permutations[b]` (frame i+j takes what frame i-length+permutations[b][j] holds by then).
    """
    check_window(num_frames, length, stride)
    if noise_type not in NOISE_TYPES:
        raise ValueError(f"noise_type must be one of {NOISE_TYPES}, got {noise_type!r}")
    src = np.arange(num_frames)
    if noise_type == "repeat_context":
        src = src % length
    elif noise_type == "shuffle_context":
        starts = list(range(length, num_frames, stride))
        perms = np.asarray(permutations if permutations is not None else np.zeros((0, stride)), np.int64)
        if perms.shape != (len(starts), stride) or any(sorted(p) != list(range(stride)) for p in perms.tolist()):
            raise ValueError(f"shuffle_context needs {len(starts)} permutations of range({stride}), got shape "
                             f"{perms.shape}")
        for i, perm in zip(starts, perms):
            end = min(num_frames, i + stride)
            src[i:end] = src[i - length + perm[:end - i]]
    return src.astype(np.int32)


def freenoise_noise(noise, schedule: WindowSchedule, noise_type: str = "shuffle_context", permutations=None):
    """Rescheduled initial noise (b, N, ...) from noise whose first `schedule.length` frames are used (all of it for
    'random')."""
    import jax.numpy as jnp
    src = freenoise_source_frames(schedule.num_frames, schedule.length, schedule.stride, noise_type, permutations)
    return jnp.take(jnp.asarray(noise), jnp.asarray(src), axis=1)
