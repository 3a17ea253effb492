"""Motion and fidelity metrics on hand-made videos with known answers, and video reading."""

import cv2
import numpy as np
import pytest

from pia_jax import media
from pia_jax.eval import motion
from pia_jax.eval.video import fit_image, read_video
from pia_jax.sampling import affinity

H, W = 64, 96  # VBench's threshold at this size: 6 * 64 / 256 = 1.5 px per frame


def texture(h, w, seed):
    """Smooth random RGB texture (Gaussian-blurred noise): enough structure everywhere for optical flow."""
    noise = np.random.default_rng(seed).random((h, w, 3)).astype(np.float32)
    return (cv2.GaussianBlur(noise, (0, 0), 2) * 255).clip(0, 255).astype(np.uint8)


def moving_square(k, frames=8):
    """A textured 24 x 24 square moving k px per frame to the right over a static textured background."""
    background, square = texture(H, W, 1), 255 - texture(24, 24, 2)
    video = np.stack([background] * frames)
    for t in range(frames):
        video[t, 20:44, 10 + k * t:34 + k * t] = square
    return video


def test_still_video_has_no_motion():
    video = moving_square(0)
    mean, top = motion.flow_scores(motion.optical_flow(video))
    # Farneback on identical frames leaves a residue of ~1e-3 px (mean) and 0.016 px (top 5 %), far below any
    # motion threshold
    assert mean.max() < 0.005 and top.max() < 0.05
    scores = motion.motion_scores(video, video[0])
    assert scores["dynamic"] == 0 and scores["psnr"] == float("inf") and scores["ssim"] == 1.0


@pytest.mark.parametrize("k", [1, 2, 4])
def test_translating_square_gives_its_speed(k):
    video = moving_square(k)
    flow = motion.optical_flow(video)
    assert flow.shape == (7, H, W, 2)
    # inside the square (4 px margin) the flow is (k, 0); Farneback measures 0.91k-0.97k on this texture (it
    # smooths over the square's edges), so 15 % bounds it
    inside = np.stack([flow[t, 24:40, 14 + k * t:30 + k * t] for t in range(7)])
    assert np.median(inside[..., 0]) == pytest.approx(k, rel=0.15)
    assert np.abs(np.median(inside[..., 1])) < 0.1
    mean, top = motion.flow_scores(flow)
    # the square covers 9.4 % of the frame (> 5 %): the top-5 % mean is the square's speed. The mean is k x 9.4 %
    # for an exact flow; Farneback's 15 px windows spread the motion onto the background next to the square's
    # edges, measured 1.5x that
    assert top == pytest.approx(np.full(7, k), rel=0.15)
    assert np.all((0.8 * k * 576 / (H * W) < mean) & (mean < 2 * k * 576 / (H * W)))
    # VBench's rule at 64 px: threshold 1.5 px, 2 of 8 frames' pairs must exceed it
    assert motion.motion_scores(video)["dynamic"] == float(k > 1.5)


def test_dynamic_degree_rule():
    # threshold 6 * min(H, W) / 256, times 8 / fps below 8 fps; round(4 n / 16) pairs must exceed it (n frames)
    assert motion.dynamic_degree([6.1, 6.1, 6.1, 6.1] + [0] * 11, 256, 512)  # 16 frames: 4 pairs needed
    assert not motion.dynamic_degree([6.1, 6.1, 6.1] + [0] * 12, 256, 512)
    assert not motion.dynamic_degree([6.0] * 15, 256, 512)  # strictly above
    assert motion.dynamic_degree([12.1] * 4 + [0] * 11, 512, 512)
    assert motion.dynamic_degree([11.9] * 4 + [0] * 11, 256, 256)  # threshold 6
    assert not motion.dynamic_degree([11.9] * 4 + [0] * 11, 256, 256, fps=4)  # threshold 6 * 2
    assert not motion.dynamic_degree([0.0], 64, 64)  # 2 frames: one moving pair is still needed
    np.testing.assert_array_equal(motion.vbench_subsample(np.arange(48), 24), np.arange(0, 48, 3))
    np.testing.assert_array_equal(motion.vbench_subsample(np.arange(10), 8), np.arange(10))


def test_psnr_and_ssim():
    image = texture(H, W, 3)
    assert motion.psnr(image, image) == float("inf") and motion.ssim(image, image) == 1.0
    brighter = image.astype(np.int16) + 1
    brighter = np.where(image == 255, 254, brighter).astype(np.uint8)  # every pixel off by exactly 1
    assert motion.psnr(image, brighter) == pytest.approx(20 * np.log10(255), abs=1e-9)  # MSE 1: 48.13 dB
    assert 0.99 < motion.ssim(image, brighter) < 1
    assert motion.ssim(image, texture(H, W, 4)) < 0.5  # unrelated textures


def test_controllability():
    presets = ["small", "moderate", "large"]
    requested = [motion.requested_motion(affinity.preset_affinity(p, 16)) for p in presets]
    assert requested == sorted(requested) and requested[0] > 0  # larger presets ask for more motion
    assert motion.controllability(requested, [0.5, 1.0, 3.0]) == pytest.approx(1.0)
    assert motion.controllability(requested, [3.0, 1.0, 0.5]) == pytest.approx(-1.0)
    assert motion.controllability(requested, [1.0, 3.0, 0.5]) == pytest.approx(-0.5)
    assert np.isnan(motion.controllability(requested, [1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="two or more"):
        motion.controllability([1.0], [1.0])


def test_read_video_round_trips(tmp_path):
    video = moving_square(2)
    few_colours = (video // 64 * 64).astype(np.uint8)  # <= 64 colours: the GIF palette holds them exactly
    media.write_gif(tmp_path / "v.gif", few_colours, fps=8)
    frames, fps = read_video(tmp_path / "v.gif")
    np.testing.assert_array_equal(frames, few_colours)
    assert fps == pytest.approx(8, rel=0.05)  # GIF delays are whole 10 ms: 120/130 ms alternate
    media.write_mp4(tmp_path / "v.mp4", video, fps=12)
    frames, fps = read_video(tmp_path / "v.mp4")
    assert frames.shape == video.shape and fps == 12
    assert motion.psnr(frames, video) > 30  # H.264 at crf 18 is lossy but close
    media.write_png_frames(tmp_path / "frames", video)
    frames, fps = read_video(tmp_path / "frames")
    np.testing.assert_array_equal(frames, video)
    with pytest.raises(media.MediaError, match="not found"):
        read_video(tmp_path / "missing.gif")
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    with pytest.raises(media.MediaError, match="cannot read"):
        read_video(tmp_path / "bad.mp4")


def test_fit_image():
    image = texture(40, 80, 5)
    assert fit_image(image, 40, 80) is image
    out = fit_image(image, 32, 32)  # cover (scale 0.8 -> 64 x 32), centre crop
    assert out.shape == (32, 32, 3)
    np.testing.assert_allclose(out.mean(), image[:, 20:60].mean(), atol=3)
