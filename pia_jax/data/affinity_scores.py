"""Training affinity: each frame's HSV + edge difference to the condition frame (the score), mapped to the mask
value the UNet is trained with through per-distance dataset statistics (PIA's dataset `get_score` and
`prepare_mask_coef_by_score`). Inference uses presets instead (`pia_jax.sampling.affinity`).
"""

import numpy as np

from pia_jax.sampling.affinity import check_frames

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


def _check_shape(frames) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or 0 in frames.shape:
        raise ValueError(f"frames must be (F, H, W, 3), got shape {frames.shape}")
    return frames


def _features(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(H, S, V planes (F, 3, H, W) float32, edge maps (F, H, W) uint8) of RGB frames in [0, 255]."""
    import cv2

    frames = _check_shape(frames).astype(np.float32)
    if not np.isfinite(frames).all() or frames.min() <= -1 or frames.max() >= 256:  # V >= 256 would wrap in uint8
        raise ValueError(f"frames must hold RGB values in [0, 255], got range [{frames.min()}, {frames.max()}]")
    # float32 RGB -> H in [0, 360), S in [0, 1], V = max(R, G, B) in [0, 255]
    hsv = np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2HSV) for f in frames])
    edges = np.stack([detect_edges(v.astype(np.uint8)) for v in hsv[..., 2]])  # astype truncates
    return np.ascontiguousarray(hsv.transpose(0, 3, 1, 2)), edges  # (F, 3, H, W): H, S, V planes


def _scores(planes: np.ndarray, edges: np.ndarray, cond_frame: int) -> np.ndarray:
    f, h, w = edges.shape
    total = np.zeros(f)
    for i in range(f):
        for c in range(3):  # float32 pairwise sum of one whole plane, then float64, as np.sum(plane) * 1.0 was
            total[i] += np.float64(np.abs(planes[i, c] - planes[cond_frame, c]).sum())
        total[i] += int((edges[i] - edges[cond_frame]).sum(dtype=np.int64))  # uint8 wrap-around
    return total / (h * w) / 4


def frame_scores(frames: np.ndarray, cond_frame: int) -> np.ndarray:
    """(F,) float64 difference of each frame to the condition frame, as PIA's dataset computes it (there on the
    augmented 256 x 256 clip; the statistics and the edge dilation size depend on that resolution).

    frames: (F, H, W, 3) RGB in [0, 255] (uint8 or float). Per pixel, |dH| (degrees) + |dS| (0..1) + |dV| (0..255)
    + |dE| over the HSV channels and the edge map of V, averaged over pixels and divided by 4. The arithmetic is the
    reference's, to the last bit: each channel plane summed on its own (numpy's pairwise float32 sum of a contiguous
    plane; the edge plane as integers), the four sums added in the order H, S, V, E in float64 (the reference's
    float32 sums times its float weights are float64 under the NumPy 1.x it ran with), then divided. Returns
    float64 (the reference's values).

    The edge difference is taken in uint8 as the reference does, so it wraps: edge in the condition frame only
    gives 0 - 255 = 1, edge in the frame only gives 255. This asymmetry is in the published statistics
    (`STATISTIC`), so it is kept.
    """
    frames = _check_shape(frames)
    if not 0 <= cond_frame < len(frames):
        raise ValueError(f"cond_frame must be in 0..{len(frames) - 1}, got {cond_frame}")
    return _scores(*_features(frames), cond_frame)


def score_matrix(frames: np.ndarray) -> np.ndarray:
    """(F, F) float64: column c is `frame_scores(frames, c)`, bit for bit (each frame's HSV and edge map computed
    once): the scores of every frame against every possible condition frame, which a latent cache stores so that the
    condition frame can still be drawn when a clip is loaded (pia_jax/data/latents.py)."""
    planes, edges = _features(frames)
    return np.stack([_scores(planes, edges, c) for c in range(len(edges))], axis=1)


def affinity_from_scores(scores, cond_frame: int, statistic=STATISTIC, sim_range=(0.2, 1.0)) -> np.ndarray:
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
    check_frames(len(scores), cond_frame)
    if len(sim_range) != 2:
        raise ValueError(f"sim_range must be (min, max), got {sim_range}")
    rows = statistic[np.abs(np.arange(len(scores)) - cond_frame)].astype(np.float64)
    lo, hi = rows.min(1), rows.max(1)
    scores = np.where(scores > hi, 0.95 * hi, scores)
    scores = np.where(scores < lo, lo, scores)
    coef = 1 - np.abs(scores / (hi + 1e-10) * (max(sim_range) - min(sim_range)))
    coef[cond_frame] = 1.0
    return coef.astype(np.float32)
