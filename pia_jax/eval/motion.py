"""Motion and fidelity metrics of a video, on the CPU: optical flow (OpenCV Farneback), VBench's dynamic degree,
condition-frame PSNR/SSIM (scikit-image) and affinity controllability (Spearman's rank correlation, SciPy).

Frames are uint8 (F, H, W, 3) RGB throughout.
"""

import numpy as np

TOP_FRACTION = 0.05  # VBench: the mean of the largest 5 % of flow magnitudes scores a frame pair


def _check_video(frames, min_frames=1) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) < min_frames:
        raise ValueError(f"frames must be uint8 (F >= {min_frames}, H, W, 3), got {frames.dtype} {frames.shape}")
    return frames


def optical_flow(frames) -> np.ndarray:
    """(F-1, H, W, 2) float32 flow (dx, dy) in pixels from each frame to the next, by Farneback's method on the
    grey frames: 5 pyramid levels at scale 0.5 (motions up to ~30 px), 15-pixel windows, 3 iterations,
    5-pixel polynomial neighbourhoods with sigma 1.1 (OpenCV's recommended pair)."""
    import cv2
    frames = _check_video(frames, 2)
    grey = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]
    return np.stack([cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 5, 15, 3, 5, 1.1, 0)
                     for a, b in zip(grey[:-1], grey[1:])])


def flow_scores(flow) -> tuple[np.ndarray, np.ndarray]:
    """Per frame pair: (mean flow magnitude, mean of the top 5 % magnitudes), each (F-1,) float64."""
    mag = np.linalg.norm(np.asarray(flow, np.float64), axis=-1).reshape(len(flow), -1)
    top = max(1, int(mag.shape[1] * TOP_FRACTION))
    return mag.mean(1), -np.sort(-mag, axis=1)[:, :top].mean(1)


def dynamic_degree(top_scores, height: int, width: int, fps: float = 8.0) -> bool:
    """VBench's rule: a video is dynamic when at least round(4 n / 16) of its frame pairs (n frames) have a top-5 %
    flow magnitude above 6 * max(1, 8 / fps) * min(H, W) / 256 pixels. The dataset's dynamic degree is the fraction
    of dynamic videos. Unlike VBench, at least one pair must move (VBench's count of 0 for n <= 2 frames calls
    any 2-frame video dynamic)."""
    top_scores = np.asarray(top_scores)
    threshold = 6.0 * max(1.0, 8.0 / fps) * min(height, width) / 256.0
    needed = max(1, round(4 * (len(top_scores) + 1) / 16))
    return int((top_scores > threshold).sum()) >= needed


def vbench_subsample(frames, fps: float) -> np.ndarray:
    """VBench keeps every round(fps / 8)-th frame of videos faster than 8 fps before measuring the flow."""
    return np.asarray(frames)[::max(1, round(fps / 8))]


def psnr(a, b, peak: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB of two images (uint8: peak 255; in [0, 1]: peak 1); inf when they are
    equal."""
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(peak ** 2 / mse))


SSIM_MIN_SIDE = 11  # the 11x11 Gaussian window (sigma 1.5) of Wang et al.'s SSIM


def ssim(a, b) -> float:
    """Structural similarity of two uint8 RGB images with Wang et al.'s settings (Gaussian window, sigma 1.5,
    population covariance; per channel, averaged); 1 when they are equal. Images need sides of at least 11 px."""
    from skimage.metrics import structural_similarity
    return float(structural_similarity(np.asarray(a), np.asarray(b), channel_axis=-1, data_range=255,
                                       gaussian_weights=True, sigma=1.5, use_sample_covariance=False))


def controllability(preset_motion, measured_motion) -> float:
    """Spearman's rank correlation between the motion the affinity presets ask for and the motion measured in the
    videos made with them (one image, prompt and seed); 1 when more requested motion always gives more flow. NaN
    when either side is constant (no ranking)."""
    from scipy.stats import spearmanr
    preset_motion, measured_motion = np.asarray(preset_motion, float), np.asarray(measured_motion, float)
    if len(preset_motion) != len(measured_motion) or len(preset_motion) < 2:
        raise ValueError("need two or more (preset, measured) pairs of equal length")
    if np.ptp(preset_motion) == 0 or np.ptp(measured_motion) == 0:
        return float("nan")
    return float(spearmanr(preset_motion, measured_motion).statistic)


def requested_motion(coefficients) -> float:
    """How much motion an affinity schedule asks for: 1 - its mean affinity (affinity 1 copies the image)."""
    return float(1 - np.mean(coefficients))


def motion_scores(frames, image=None, cond_frame: int = 0, fps: float = 8.0) -> dict:
    """Flow, dynamic degree and (with the input image, already at the frames' size) condition fidelity; SSIM is
    NaN for frames under SSIM_MIN_SIDE pixels (its Gaussian window does not fit)."""
    frames = _check_video(frames, 2)
    sampled = vbench_subsample(frames, fps)
    mean, top = flow_scores(optical_flow(sampled)) if len(sampled) > 1 else (np.zeros(1), np.zeros(1))
    out = {"flow_mean": float(mean.mean()), "flow_top5": float(top.mean()),
           "dynamic": float(dynamic_degree(top, *frames.shape[1:3], fps))}
    if image is not None:
        if np.shape(image) != frames.shape[1:]:
            raise ValueError(f"the image ({np.shape(image)}) must have the frames' size {frames.shape[1:]}")
        small = min(frames.shape[1:3]) < SSIM_MIN_SIDE
        out.update(psnr=psnr(frames[cond_frame], image),
                   ssim=float("nan") if small else ssim(frames[cond_frame], image))
    return out
