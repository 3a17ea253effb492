"""One training example from one video, as PIA's WebVid10M dataset and train.py make it.

Clip: a random window of n_frames * stride frames, n_frames indices spread evenly over it, a random horizontal flip
of the whole clip, short side resized to `resolution` (antialiased bilinear), centre crop, values in [-1, 1].
Then a condition frame, the affinity coefficients of the augmented clip, caption and condition dropout.

Pixels leave the loader as uint8 (`quantize`: a quarter of float32's host memory and host-to-device bytes) and the
training step maps them back to [-1, 1] with `PIXEL_VALUES`, the exact float32 values `transform_clip` gives an
unresized frame. So a clip that needs no resize (video already `resolution` on its short side) reaches the step bit
for bit as the float pipeline made it; a resized one is rounded to the nearest of 256 levels: at most 0.5/255 in
[0, 1] units (1/255 in [-1, 1]), a quarter of the 8-bit step of the video it came from. The affinity scores are
computed from the float clip, before rounding, as the reference computes them.
"""

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from PIL import Image

from pia_jax import media
from pia_jax.data.video import VideoError, decode_frames
from pia_jax.models.config import opt


@dataclass(frozen=True)
class DataConfig:
    """The clips of training: where they come from, how many, and how each is made (train.py's `data.*` keys)."""
    path: str | None = opt(None, "a prepared dataset (prepare_dataset.py), local or gs://")
    synthetic: bool = opt(False, "without path: train on random synthetic clips (smoke runs)")
    batch_size: int = opt(4, "clips per micro-batch, all hosts together; a multiple of the device count")
    n_frames: int = opt(16, "frames per clip")
    stride: int = opt(4, "a clip's window spans n_frames * stride frames of the video")
    resolution: int = opt(256, "short side after resizing, and the square crop")
    caption_dropout: float = opt(0.1, "probability of an empty caption (cfg_random_null_text_ratio)")
    condition_dropout: float = opt(0.2, "probability of no condition frame (cond_prob), drawn per clip (the "
                                        "reference draws one per batch)")
    max_length: int = opt(77, "CLIP token ids per caption")
    sim_range: tuple[float, float] = opt((0.2, 1.0), "range of the affinity coefficients (mask_sim_range)")
    flip: bool = opt(True, "random horizontal flips, as the reference; false where captions name directions "
                           "(the flip is drawn either way, so the other draws do not shift)")
    workers: int = opt(8, "threads decoding videos")
    latents: bool = opt(False, "train from the VAE latents cached in the dataset (prepare_dataset.py --latents): the "
                               "VAE encode leaves the step, clips are drawn from the cached ones; refused where the "
                               "dataset has none, or they were made for other clips or by another VAE")


PIXEL_VALUES = media.PIXEL_VALUES  # uint8 level -> the float32 value `transform_clip` gives an unresized frame


def quantize(pixels: np.ndarray) -> np.ndarray:
    """float32 pixels in [-1, 1] -> uint8 levels, the nearest of `PIXEL_VALUES` (exact for unresized clips)."""
    return np.rint((pixels.astype(np.float32) + 1) * 127.5).clip(0, 255).astype(np.uint8)


def sample_window(num_frames: int, n_frames: int, stride: int, rng: np.random.Generator) -> np.ndarray:
    """(n_frames,) int64 frame indices: PIA's TemporalRandomCrop(n_frames * stride) then linspace.

    The window begins uniformly in [0, max(0, T - size - 1)] (both ends included; the `- 1` is the reference's:
    the last frame of a video longer than the window is never sampled) and ends at min(begin + size, T).
    Raises VideoError("too_short") if the window has fewer than n_frames frames.
    """
    size = n_frames * stride
    begin = int(rng.integers(0, max(0, num_frames - size - 1), endpoint=True))
    end = min(begin + size, num_frames)
    if end - begin < n_frames:
        raise VideoError("too_short", f"{num_frames} frames, need {n_frames}")
    return np.linspace(begin, end - 1, n_frames).astype(np.int64)  # truncation, as numpy's dtype=int does


def resized_size(height: int, width: int, short: int) -> tuple[int, int]:
    """torchvision Resize(short)'s output (height, width): the long side is truncated, not rounded."""
    if height <= width:
        return short, int(short * width / height)
    return int(short * height / width), short


def crop_offset(size: int, crop: int) -> int:
    # torchvision's CenterCrop: int(round(...)), Python's round is half to even
    return int(round((size - crop) / 2.0))


def transform_clip(frames: np.ndarray, flip: bool, resolution: int) -> np.ndarray:
    """uint8 (F, H, W, 3) -> float32 (F, resolution, resolution, 3) in [-1, 1]: flip, resize, centre crop, normalise.

    The resize is Pillow's BILINEAR on float32 ("F" mode) images, one channel at a time. Pillow's resampler is the
    antialiased triangle filter that torchvision's `Resize(antialias=True)` on tensors was ported from, and in "F"
    mode nothing is rounded to 8 bits, so the result equals torch's `interpolate(bilinear, antialias=True)` up to
    rounding: within 1e-5 of torch in float64 (tests/test_data.py), within 4e-5 of torch in float32 at 336x596 ->
    256 (torch's own float32 error; values in [-1, 1]). Only the pixels inside the crop are computed: Pillow's
    `box` maps the crop back to source coordinates and clips filter taps at the image edges, not the box's, so each
    pixel gets the same weights as in the full resize.
    """
    if flip:
        frames = frames[:, :, ::-1]  # before the crop, as in the reference: the crop offset rounds asymmetrically
    f, h, w, _ = frames.shape
    rh, rw = resized_size(h, w, resolution)
    top, left = crop_offset(rh, resolution), crop_offset(rw, resolution)
    x = frames.astype(np.float32) / 255.0
    if (rh, rw) == (h, w):  # torchvision returns an image of the requested size unchanged
        out = x[:, top:top + resolution, left:left + resolution]
    else:
        sy, sx = h / rh, w / rw
        box = (left * sx, top * sy, (left + resolution) * sx, (top + resolution) * sy)
        out = np.empty((f, resolution, resolution, 3), np.float32)
        for i in range(f):
            for c in range(3):
                plane = Image.fromarray(np.ascontiguousarray(x[i, :, :, c]))
                out[i, :, :, c] = plane.resize((resolution, resolution), Image.Resampling.BILINEAR, box=box)
    return (out - 0.5) / 0.5


class Draws(NamedTuple):
    indices: np.ndarray  # frames of the clip
    flip: bool
    cond_frame: int
    drop_caption: bool
    use_condition: bool


def draw(num_frames: int, config: DataConfig, rng: np.random.Generator) -> Draws:
    """Every random choice of one example, in a fixed order and before any decoding (so decoding cannot shift
    them). Condition dropout is drawn per sample; the reference draws it once per batch (train.py
    `is_cond = random.random()`), which only makes its gradient noisier."""
    indices = sample_window(num_frames, config.n_frames, config.stride, rng)
    return Draws(indices, bool(rng.random() < 0.5) and config.flip, int(rng.integers(0, config.n_frames)),
                 bool(rng.random() < config.caption_dropout), bool(rng.random() >= config.condition_dropout))


def make_example(record: dict, config: DataConfig, rng: np.random.Generator, pixel_dtype=np.uint8) -> dict:
    """One example from a dataset record (`video` bytes, `caption`, `num_frames`, `pts`).

    Keys: pixel_values (F, S, S, 3) uint8 (`quantize`; float32 in [-1, 1] with pixel_dtype=np.float32), caption str
    (after dropout), affinity (F,) float32, cond_frame int, use_condition bool. Where use_condition is False the
    reference zeroes the mask and the condition latent; here the affinity is 0 (and not computed).
    Raises VideoError when the video cannot be used.
    """
    from pia_jax.data.affinity_scores import affinity_from_scores, frame_scores  # needs OpenCV

    d = draw(int(record["num_frames"]), config, rng)
    pixels = transform_clip(decode_frames(record["video"], d.indices, record.get("pts")), d.flip, config.resolution)
    if d.use_condition:
        scores = frame_scores((pixels / 2 + 0.5) * 255, d.cond_frame)  # the reference scores the augmented clip
        affinity = affinity_from_scores(scores, d.cond_frame, sim_range=config.sim_range)
    else:
        affinity = np.zeros(config.n_frames, np.float32)
    if np.dtype(pixel_dtype) == np.uint8:
        pixels = quantize(pixels)
    return {"pixel_values": pixels, "caption": "" if d.drop_caption else record["caption"], "affinity": affinity,
            "cond_frame": d.cond_frame, "use_condition": d.use_condition}
