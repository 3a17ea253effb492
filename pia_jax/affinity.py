"""Inter-frame affinity: the per-frame scalar PIA feeds the UNet as its mask channel (1 = copy the condition image).

Inference uses hand-made presets indexed by temporal distance d = |f - cond_frame|; training derives the value from
an HSV + edge difference between each frame and the condition frame, normalised by per-distance dataset statistics.

Preset numbering (same lists, three ways to name them):

    name            PIA index   diffusers motion_scale
    small           0           0
    moderate        1           1
    large           2           2
    loop_small      3           3       (PIA CLI: --magnitude m --loop           -> m + 3)
    loop_moderate   4           4
    loop_large      5           5
    style_small     -1          6       (PIA CLI: --magnitude m --style_transfer -> -m - 1)
    style_moderate  -2          7
    style_large     -3          8

PIA indexes its list with Python semantics, so its -1/-2/-3 are list entries 8/7/6; diffusers stores the three
style lists in reverse order, so its 6/7/8 are small/moderate/large. Integers here mean PIA indices; 6-8 are refused
because they name different presets in the two numberings.
"""

from typing import NamedTuple

import numpy as np

MAX_FRAMES = 32  # the motion modules' sinusoidal position table


class Preset(NamedTuple):
    name: str
    pia_index: int
    motion_scale: int  # diffusers PIAPipeline(motion_scale=...)
    values: tuple[float, ...]  # affinity at temporal distance 0, 1, ...; the last value repeats


PRESETS = (
    Preset("small", 0, 0, (1.0, 0.9, 0.85, 0.85, 0.85, 0.8)),
    Preset("moderate", 1, 1, (1.0, 0.8, 0.8, 0.8, 0.79, 0.78, 0.75)),
    Preset("large", 2, 2, (1.0, 0.8, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.6, 0.5, 0.5)),
    # Loops come back to 1.0 at d = 15, i.e. the last of 16 frames (cond_frame 0) repeats the image; longer clips
    # pad with 1.0.
    Preset("loop_small", 3, 3, (1.0, 0.9, 0.85, 0.85, 0.85, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.85, 0.85, 0.9, 1.0)),
    Preset("loop_moderate", 4, 4,
           (1.0, 0.8, 0.8, 0.8, 0.79, 0.78, 0.75, 0.75, 0.75, 0.75, 0.75, 0.78, 0.79, 0.8, 0.8, 1.0)),
    Preset("loop_large", 5, 5, (1.0, 0.8, 0.7, 0.7, 0.7, 0.7, 0.6, 0.5, 0.5, 0.6, 0.7, 0.7, 0.7, 0.7, 0.8, 1.0)),
    # 0.5 at the condition frame (never seen in training, where it is 1) copies less of the image's appearance.
    Preset("style_small", -1, 6, (0.5, 0.4, 0.4, 0.4, 0.35, 0.3)),
    Preset("style_moderate", -2, 7, (0.5, 0.4, 0.4, 0.4, 0.35, 0.35, 0.3, 0.25, 0.2)),
    Preset("style_large", -3, 8, (0.5, 0.2)),
)
_BY_NAME = {p.name: p for p in PRESETS}
_BY_INDEX = {p.pia_index: p for p in PRESETS}

# Per-distance [lo, hi] of the training score over the dataset, row d = |f - cond_frame| (PIA train.yaml
# `statistic`). float32 because the reference turns the list into a default-dtype torch tensor.
STATISTIC = np.array([
    [0.0, 0.0],
    [0.3535855, 24.23687346],
    [0.91609545, 30.65091947],
    [1.41165152, 34.40093286],
    [1.56943881, 36.99639585],
    [1.73182842, 39.42044163],
    [1.82733002, 40.94703526],
    [1.88060527, 42.66233244],
    [1.96208071, 43.73070788],
    [2.02723091, 44.25965378],
    [2.10820894, 45.66120213],
    [2.21115041, 46.29561324],
    [2.23412351, 47.08810863],
    [2.29430165, 47.9515062],
    [2.32986362, 48.69085638],
    [2.37310751, 49.19931439],
], np.float32)


def _check_frames(num_frames, cond_frame, max_frames=MAX_FRAMES):
    if not 1 <= num_frames <= max_frames:
        raise ValueError(f"num_frames must be in 1..{max_frames}, got {num_frames}")
    if not 0 <= cond_frame < num_frames:
        raise ValueError(f"cond_frame must be in 0..{num_frames - 1}, got {cond_frame}")


def get_preset(preset: str | int) -> Preset:
    """A preset by name or PIA index (see the module docstring)."""
    found = None
    if isinstance(preset, str):
        found = _BY_NAME.get(preset)
    elif isinstance(preset, (int, np.integer)) and not isinstance(preset, bool):
        found = _BY_INDEX.get(int(preset))
    if found is None:
        valid = ", ".join(f"{p.name} ({p.pia_index})" for p in PRESETS)
        raise ValueError(f"unknown affinity preset {preset!r}; valid names (PIA index): {valid}")
    return found


def preset_coefficients(preset: str | int, num_frames: int, cond_frame: int = 0) -> np.ndarray:
    """(num_frames,) float32 affinity: coef[f] = values[|f - cond_frame|], values padded with its last entry."""
    values = get_preset(preset).values
    _check_frames(num_frames, cond_frame)
    padded = np.array(values + values[-1:] * num_frames, np.float32)
    return padded[np.abs(np.arange(num_frames) - cond_frame)]


def custom_coefficients(values, num_frames: int) -> np.ndarray:
    """A user's per-frame affinity list as (num_frames,) float32; every value in (0, 1]."""
    coef = np.asarray(values, np.float64)
    _check_frames(num_frames, 0)
    if coef.shape != (num_frames,):
        raise ValueError(f"need one affinity value per frame ({num_frames}), got shape {coef.shape}")
    bad = ~((coef > 0) & (coef <= 1))  # also catches NaN
    if bad.any():
        raise ValueError(f"affinity values must be in (0, 1], got {coef[bad].tolist()} at frames "
                         f"{np.flatnonzero(bad).tolist()}")
    return coef.astype(np.float32)


def linear_ramp(num_frames: int, cond_frame: int = 0) -> np.ndarray:
    """Training-validation affinity: 1 at the condition frame, falling linearly by 0.8 over the clip length."""
    _check_frames(num_frames, cond_frame)
    d = np.abs(np.arange(num_frames) - cond_frame)
    return (1.0 - d * (0.8 / max(num_frames - 1, 1))).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# Training: score -> coefficient


def _dilation_size(height: int, width: int) -> int:
    # PySceneDetect's resolution heuristic (5 at 256x256, 7 at 512x512)
    k = 4 + round(float(np.sqrt(width * height)) / 192)
    return k + 1 - k % 2


def detect_edges(lum: np.ndarray) -> np.ndarray:
    """uint8 0/255 edge map of a uint8 (H, W) luma image: Canny at (1 -+ 1/3) * median, then a k x k dilation."""
    import cv2  # only the training data path needs OpenCV

    median = float(np.median(lum))
    low, high = int(max(0.0, (1 - 1 / 3) * median)), int(min(255.0, (1 + 1 / 3) * median))
    k = _dilation_size(*lum.shape)
    return cv2.dilate(cv2.Canny(lum, low, high), np.ones((k, k), np.uint8))


def frame_scores(frames: np.ndarray, cond_frame: int) -> np.ndarray:
    """(F,) float32 difference of each frame to the condition frame, as PIA's dataset computes it (there on the
    augmented 256 x 256 clip; the statistics and the edge dilation size depend on that resolution).

    frames: (F, H, W, 3) RGB in [0, 255] (uint8 or float). Per pixel, |dH| (degrees) + |dS| (0..1) + |dV| (0..255)
    + |dE| over the HSV channels and the edge map of V, averaged over pixels and divided by 4.

    The edge difference is taken in uint8 as the reference does, so it wraps: edge in the condition frame only
    gives 0 - 255 = 1, edge in the frame only gives 255. This asymmetry is in the published statistics
    (`STATISTIC`), so it is kept.
    """
    import cv2

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or 0 in frames.shape:
        raise ValueError(f"frames must be (F, H, W, 3), got shape {frames.shape}")
    if not 0 <= cond_frame < len(frames):
        raise ValueError(f"cond_frame must be in 0..{len(frames) - 1}, got {cond_frame}")
    frames = frames.astype(np.float32)
    if not np.isfinite(frames).all() or frames.min() <= -1 or frames.max() >= 256:  # V >= 256 would wrap in uint8
        raise ValueError(f"frames must hold RGB values in [0, 255], got range [{frames.min()}, {frames.max()}]")
    # float32 RGB -> H in [0, 360), S in [0, 1], V = max(R, G, B) in [0, 255]
    hsv = np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2HSV) for f in frames])
    edges = np.stack([detect_edges(v.astype(np.uint8)) for v in hsv[..., 2]])  # astype truncates
    f, h, w = edges.shape
    # per (frame, channel) float32 sums over contiguous pixels, the reference's summation order
    hsv_sums = np.abs(hsv - hsv[cond_frame]).transpose(0, 3, 1, 2).reshape(f, 3, h * w).sum(-1)
    edge_sums = (edges - edges[cond_frame]).reshape(f, h * w).sum(-1, dtype=np.int64)  # uint8 wrap-around
    total = (hsv_sums[:, 0] + hsv_sums[:, 1] + hsv_sums[:, 2]).astype(np.float64) + edge_sums
    return (total / (h * w) / 4).astype(np.float32)


def coefficients_from_scores(scores, cond_frame: int, statistic=STATISTIC, sim_range=(0.2, 1.0)) -> np.ndarray:
    """(F,) float32 training affinity from `frame_scores` (PIA's prepare_mask_coef_by_score for one clip).

    With [lo, hi] = the statistic row of each frame's distance: scores above hi become 0.95 hi (a discontinuity
    kept from the reference: a large difference maps to 1 - 0.95 span, not to the minimum), scores below lo become
    lo, then coef = 1 - span * score / (hi + 1e-10), span = max(sim_range) - min(sim_range). Only the span of
    sim_range matters: the top is always 1, as in the reference. coef[cond_frame] = 1.
    """
    scores = np.asarray(scores, np.float64)
    statistic = np.asarray(statistic, np.float32)
    if statistic.ndim != 2 or statistic.shape[1] != 2:
        raise ValueError(f"statistic must be (distances, 2), got shape {statistic.shape}")
    if scores.ndim != 1:
        raise ValueError(f"scores must be (F,), got shape {scores.shape}")
    if len(scores) > len(statistic):
        raise ValueError(f"{len(scores)} frames need statistic rows for distances up to {len(scores) - 1}, "
                         f"got {len(statistic)} rows")
    _check_frames(len(scores), cond_frame)
    if len(sim_range) != 2:
        raise ValueError(f"sim_range must be (min, max), got {sim_range}")
    rows = statistic[np.abs(np.arange(len(scores)) - cond_frame)].astype(np.float64)
    lo, hi = rows.min(1), rows.max(1)
    scores = np.where(scores > hi, 0.95 * hi, scores)
    scores = np.where(scores < lo, lo, scores)
    coef = 1 - np.abs(scores / (hi + 1e-10) * (max(sim_range) - min(sim_range)))
    coef[cond_frame] = 1.0
    return coef.astype(np.float32)
