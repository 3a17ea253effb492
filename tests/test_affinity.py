"""Affinity presets against PIA's and diffusers' tables; training scores and affinity against independent code."""

import cv2
import numpy as np
import pytest

from pia_jax.data import affinity_scores
from pia_jax.sampling import affinity

# PIA animatediff/utils/util.py RANGE_LIST @ 73f06d7, in its order: PIA index i (and -1/-2/-3 = 8/7/6).
PIA_RANGE_LIST = [
    [1.0, 0.9, 0.85, 0.85, 0.85, 0.8],
    [1.0, 0.8, 0.8, 0.8, 0.79, 0.78, 0.75],
    [1.0, 0.8, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.6, 0.5, 0.5],
    [1.0, 0.9, 0.85, 0.85, 0.85, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.85, 0.85, 0.9, 1.0],
    [1.0, 0.8, 0.8, 0.8, 0.79, 0.78, 0.75, 0.75, 0.75, 0.75, 0.75, 0.78, 0.79, 0.8, 0.8, 1.0],
    [1.0, 0.8, 0.7, 0.7, 0.7, 0.7, 0.6, 0.5, 0.5, 0.6, 0.7, 0.7, 0.7, 0.7, 0.8, 1.0],
    [0.5, 0.2],
    [0.5, 0.4, 0.4, 0.4, 0.35, 0.35, 0.3, 0.25, 0.2],
    [0.5, 0.4, 0.4, 0.4, 0.35, 0.3],
]
NAMES = ["small", "moderate", "large", "loop_small", "loop_moderate", "loop_large",
         "style_large", "style_moderate", "style_small"]  # PIA list order
PIA_INDICES = [0, 1, 2, 3, 4, 5, -3, -2, -1]

# PIA example/config/train.yaml `statistic` @ 73f06d7.
TRAIN_STATISTIC = [[0., 0.], [0.3535855, 24.23687346], [0.91609545, 30.65091947], [1.41165152, 34.40093286],
                   [1.56943881, 36.99639585], [1.73182842, 39.42044163], [1.82733002, 40.94703526],
                   [1.88060527, 42.66233244], [1.96208071, 43.73070788], [2.02723091, 44.25965378],
                   [2.10820894, 45.66120213], [2.21115041, 46.29561324], [2.23412351, 47.08810863],
                   [2.29430165, 47.9515062], [2.32986362, 48.69085638], [2.37310751, 49.19931439]]


def reference_preset(values, num_frames, cond_frame):
    padded = values + [values[-1]] * num_frames
    return [padded[abs(f - cond_frame)] for f in range(num_frames)]


@pytest.mark.parametrize("i,num_frames,cond_frame", [
    (i, n, c) for i in range(9) for n, c in [(16, 0), (24, 0), (16, 5), (24, 23), (1, 0)]
    if not (NAMES[i].startswith("loop_") and n > 16)])
def test_presets_match_pia(i, num_frames, cond_frame):
    """Every preset as the reference has it, except, on purpose, loop presets past 16 frames (the reference pins
    every frame from distance 15 on to the image; ours closes the loop at the last frame: test_keyframes.py)."""
    expected = np.float32(reference_preset(PIA_RANGE_LIST[i], num_frames, cond_frame))
    by_name = affinity.preset_affinity(NAMES[i], num_frames, [cond_frame])
    assert by_name.dtype == np.float32 and by_name.shape == (num_frames,)
    np.testing.assert_array_equal(by_name, expected)
    np.testing.assert_array_equal(affinity.preset_affinity(PIA_INDICES[i], num_frames, [cond_frame]), expected)
    # PIA indexes its Python list, so its negative indices wrap
    assert PIA_RANGE_LIST[PIA_INDICES[i]] == PIA_RANGE_LIST[i]


def test_presets_match_diffusers():
    pia = pytest.importorskip("diffusers.pipelines.deprecated.pia.pipeline_pia")
    for preset in affinity.PRESETS:
        for num_frames, cond_frame in [(16, 0), (24, 0), (16, 7)]:
            if preset.name.startswith("loop_") and num_frames > 16:
                continue  # on purpose: test_presets_match_pia
            expected = pia.prepare_mask_coef_by_statistics(num_frames, cond_frame, preset.motion_scale)
            np.testing.assert_array_equal(affinity.preset_affinity(preset.name, num_frames, [cond_frame]),
                                          np.float32(expected), err_msg=preset.name)


def test_preset_table_is_consistent():
    assert sorted(p.pia_index for p in affinity.PRESETS) == [-3, -2, -1, 0, 1, 2, 3, 4, 5]
    assert sorted(p.motion_scale for p in affinity.PRESETS) == list(range(9))
    # PIA CLI: --loop maps magnitude m to m + 3, --style_transfer to -m - 1
    for m, base in enumerate(["small", "moderate", "large"]):
        assert affinity.get_preset(f"loop_{base}").pia_index == m + 3
        assert affinity.get_preset(f"style_{base}").pia_index == -m - 1
    assert affinity.get_preset(np.int64(2)).name == "large"


@pytest.mark.parametrize("preset", ["huge", 6, 8, -4, True, 1.0, None])
def test_unknown_preset(preset):
    with pytest.raises(ValueError, match=r"unknown affinity preset .*small \(0\).*style_large \(-3\)"):
        affinity.preset_affinity(preset, 16)


@pytest.mark.parametrize("num_frames,keyframes,match", [
    (0, [0], "frames must be >= 1"), (-3, [0], "frames must be >= 1"),
    (16, [16], r"keyframe frame\(s\) \[16\] outside the video: frames are 0..15"),
    (16, [-1], r"keyframe frame\(s\) \[-1\] outside the video"), (16, [], "at least one keyframe")])
def test_preset_frame_validation(num_frames, keyframes, match):
    with pytest.raises(ValueError, match=match):
        affinity.preset_affinity("small", num_frames, keyframes)


def test_any_length():
    """No frame limit (context windows lift the motion modules' 32 positions): 33 and 100 frames work."""
    for n in (33, 100):
        assert affinity.preset_affinity("moderate", n).shape == (n,)
        assert affinity.custom_affinity([1.0] * n, n).shape == (n,)


def test_custom_affinity():
    values = [1.0, 0.9, 0.5, 1e-3]
    out = affinity.custom_affinity(values, 4)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, np.float32(values))
    with pytest.raises(ValueError, match=r"one affinity value per frame \(5\), got shape \(4,\)"):
        affinity.custom_affinity(values, 5)
    with pytest.raises(ValueError, match=r"in \(0, 1\], got \[0.0, nan, 1.5\] at frames \[1, 2, 3\]"):
        affinity.custom_affinity([1.0, 0.0, float("nan"), 1.5], 4)
    with pytest.raises(ValueError, match="frames must be >= 1"):
        affinity.custom_affinity([], 0)


def test_statistic_is_the_training_table():
    assert affinity_scores.STATISTIC.shape == (16, 2)
    np.testing.assert_array_equal(affinity_scores.STATISTIC, np.float32(TRAIN_STATISTIC))


# ---------------------------------------------------------------------------------------------------------------
# Training scores, against a per-pixel oracle: HSV by formula (not cv2.cvtColor), edges as PySceneDetect does.


def oracle_hsv(rgb):
    """Float HSV by the textbook formula, OpenCV's conventions: H in degrees [0, 360), S in [0, 1], V = max."""
    r, g, b = (rgb[..., i].astype(np.float64) for i in range(3))
    v, lo = np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)
    c = v - lo
    safe = np.where(c > 0, c, 1)
    h = np.where(v == r, 60 * (g - b) / safe, np.where(v == g, 120 + 60 * (b - r) / safe, 240 + 60 * (r - g) / safe))
    h = np.where(c > 0, h % 360, 0)
    return h, np.where(v > 0, c / np.where(v > 0, v, 1), 0), v


def oracle_edges(lum):
    side = 4 + int(np.floor(np.sqrt(lum.shape[0] * lum.shape[1]) / 192 + 0.5))  # half up: same after forcing odd
    side += side % 2 == 0
    med = np.median(lum)
    edges = cv2.Canny(lum, int(max(0, med * 2 / 3)), int(min(255, med * 4 / 3)))
    return cv2.dilate(edges, np.ones((side, side), np.uint8))


def oracle_scores(frames, cond):
    frames = frames.astype(np.float64)
    chans = [(*oracle_hsv(f), oracle_edges(np.floor(f.max(-1)).astype(np.uint8)).astype(np.int64)) for f in frames]
    scores = []
    for ch in chans:
        total = sum(np.abs(ch[c] - chans[cond][c]).sum() for c in range(3))
        de = ch[3] - chans[cond][3]
        total += np.where(de < 0, de + 256, de).sum()  # uint8 arithmetic: 0 - 255 wraps to 1
        scores.append(total / frames[0, ..., 0].size / 4)
    return np.array(scores)


def moving_square(num_frames=16, size=64):
    y, x = np.mgrid[:size, :size]
    frames = np.empty((num_frames, size, size, 3), np.uint8)
    for t in range(num_frames):
        frames[t] = np.stack([x * 2, y * 3, 255 - x - y], -1).clip(0, 255)  # hue and brightness ramps
        s = 8 + 2 * t
        frames[t, s:s + 16, s // 2:s // 2 + 20] = (250, 40, 90)
    return frames


CLIPS = {
    "moving_square": moving_square(),
    "noise": np.random.default_rng(1).integers(0, 256, (6, 48, 80, 3)).astype(np.uint8),
    "constant": np.full((4, 32, 32, 3), 77, np.uint8),
}


@pytest.mark.parametrize("clip", CLIPS)
@pytest.mark.parametrize("cond", [0, 3])
def test_scores_match_oracle(clip, cond):
    frames = CLIPS[clip]
    expected = oracle_scores(frames, cond)
    for x in (frames, frames.astype(np.float32)):
        got = affinity_scores.frame_scores(x, cond)
        assert got.dtype == np.float64 and got.shape == (len(frames),)
        # OpenCV float32 HSV (with epsilons in its divisions) vs float64 here: measured <= 1.2e-6 relative
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert got[cond] == 0
    if clip == "constant":
        np.testing.assert_array_equal(got, 0)
    if clip == "moving_square":  # the square drifts away from its place in the condition frame
        assert np.all(np.diff(got[cond:]) > 0)


def reference_arithmetic(frames, cond):
    """PIA's get_score loop as it ran: cv2 HSV planes and edge maps per frame, np.sum of each |difference| plane
    (float32 pairwise; the uint8 edge plane as an integer), times the float weight 1.0, which under the NumPy 1.x
    of the reference makes float64, the four summed with Python's sum in channel order, / (h * w) / 4."""
    h, w = frames.shape[1:3]

    def planes(frame):
        hsv = list(cv2.split(cv2.cvtColor(frame.astype(np.float32), cv2.COLOR_RGB2HSV)))
        return hsv + [affinity_scores.detect_edges(hsv[2].astype(np.uint8))]

    ref = planes(frames[cond])
    out = []
    for frame in frames:
        sums = [np.float64(np.sum(np.abs(p - q))) * 1.0 for p, q in zip(planes(frame), ref)]
        out.append(sum(sums) / (h * w) / 4.0)
    return np.array(out)


@pytest.mark.parametrize("size", [(64, 80), (256, 256)])
def test_scores_have_the_reference_arithmetic(size):
    """Bit-equal to the reference's summation on smooth random clips (a plane summed along another axis or the
    channels added in float32 differ by up to ~1e-4 at 256x256)."""
    rng = np.random.default_rng(size[0])
    walk = rng.integers(0, 256, (1, *size, 3)) + np.cumsum(rng.normal(0, 12, (8, *size, 3)), 0)
    frames = (np.clip(walk, 0, 255) / 255 * 255).astype(np.float32)  # float frames, as the reference's tensors
    np.testing.assert_array_equal(affinity_scores.frame_scores(frames, 3), reference_arithmetic(frames, 3))


def test_scores_by_hand():
    red, blue = np.full((2, 32, 32, 3), 0, np.uint8)
    red[..., 0], blue[..., 2] = 255, 255
    # constant frames have no edges; only the hue differs, by 240 degrees: (240 + 0 + 0 + 0) / 4
    np.testing.assert_array_equal(affinity_scores.frame_scores(np.stack([red, blue]), 0), [0, 60])
    grey = np.stack([np.full((32, 32, 3), 100), np.full((32, 32, 3), 200)]).astype(np.float32)
    np.testing.assert_array_equal(affinity_scores.frame_scores(grey, 1), [25, 0])  # |dV| = 100, hue and saturation 0
    assert affinity_scores._dilation_size(256, 256) == 5 and affinity_scores._dilation_size(512, 512) == 7


def test_edge_difference_wraps_like_uint8():
    flat = np.full((64, 64, 3), 128, np.uint8)
    split = flat.copy()
    split[:, 32:] = 200  # one vertical edge; hue 0, saturation 0 on both sides
    n_edge = np.count_nonzero(affinity_scores.detect_edges(split[..., 0]))
    assert 0 < n_edge < 64 * 64
    v_part = 72 * 64 * 32 / 64 ** 2 / 4
    forward = affinity_scores.frame_scores(np.stack([flat, split]), 0)[1]  # edges appear: 255 per edge pixel
    backward = affinity_scores.frame_scores(np.stack([flat, split]), 1)[0]  # edges vanish: 0 - 255 = 1 in uint8
    np.testing.assert_allclose([forward, backward], [v_part + 255 * n_edge / 64 ** 2 / 4,
                                                     v_part + n_edge / 64 ** 2 / 4], rtol=1e-6)


@pytest.mark.parametrize("frames,cond,match", [
    (np.zeros((4, 8, 8)), 0, r"\(F, H, W, 3\)"), (np.zeros((0, 8, 8, 3)), 0, r"\(F, H, W, 3\)"),
    (np.zeros((4, 8, 8, 3)), 4, "cond_frame must be in 0..3"),
    (np.full((2, 8, 8, 3), 256.0), 0, r"\[0, 255\]"), (np.full((2, 8, 8, 3), np.nan), 0, r"\[0, 255\]")])
def test_score_validation(frames, cond, match):
    with pytest.raises(ValueError, match=match):
        affinity_scores.frame_scores(frames, cond)


def oracle_coefficients(scores, cond, statistic, sim_range):
    out = []
    for f, s in enumerate(scores):
        lo, hi = sorted(float(v) for v in np.float32(statistic[abs(f - cond)]))
        s = 0.95 * hi if s > hi else s
        s = lo if s < lo else s
        out.append(1.0 if f == cond else 1 - (max(sim_range) - min(sim_range)) * s / (hi + 1e-10))
    return out


def test_coefficients_by_hand_at_the_clamps():
    lo, hi = np.float32(TRAIN_STATISTIC[1]).astype(np.float64)  # frame 1 of a 2-frame clip: distance 1
    up, down = np.nextafter(hi, np.inf), np.nextafter(lo, -np.inf)
    cases = {hi: 1 - 0.8, up: 1 - 0.8 * 0.95, 1e3: 1 - 0.8 * 0.95,  # above hi: 0.95 hi, not hi
             lo: 1 - 0.8 * lo / hi, down: 1 - 0.8 * lo / hi, 0.0: 1 - 0.8 * lo / hi,
             (lo + hi) / 2: 1 - 0.8 * (lo + hi) / 2 / hi}
    for score, expected in cases.items():
        coef = affinity_scores.affinity_from_scores([5.0, score], 0)  # the condition frame is 1 whatever its score
        assert coef.dtype == np.float32
        np.testing.assert_allclose(coef, [1.0, expected], rtol=1e-7, err_msg=f"score {score}")


@pytest.mark.parametrize("cond", [0, 7, 15])
@pytest.mark.parametrize("sim_range", [(0.2, 1.0), (1.0, 0.2), (0.5, 1.0), (0.1, 0.6)])
def test_coefficients_match_oracle(cond, sim_range):
    scores = np.random.default_rng(cond).uniform(0, 60, 16)
    expected = oracle_coefficients(scores, cond, TRAIN_STATISTIC, sim_range)
    got = affinity_scores.affinity_from_scores(scores, cond, sim_range=sim_range)
    np.testing.assert_allclose(got, expected, rtol=1e-7)
    span = max(sim_range) - min(sim_range)
    assert got[cond] == 1 and np.all(got >= np.float32(1 - span))
    # the statistic rows may come in either order and as plain lists
    swapped = [row[::-1] for row in TRAIN_STATISTIC]
    np.testing.assert_array_equal(affinity_scores.affinity_from_scores(scores, cond, swapped, sim_range), got)


def test_scores_to_coefficients_end_to_end():
    frames = moving_square()
    coef = affinity_scores.affinity_from_scores(affinity_scores.frame_scores(frames, 4), 4)
    others = np.delete(coef, 4)
    assert coef[4] == 1 and np.all((others >= 0.2) & (others < 1))


@pytest.mark.parametrize("kwargs,match", [
    (dict(scores=np.zeros(17), cond_frame=0), "17 frames need statistic rows for distances up to 16"),
    (dict(scores=np.zeros(4), cond_frame=4), "cond_frame must be in 0..3"),
    (dict(scores=np.zeros((2, 4)), cond_frame=0), r"scores must be \(F,\)"),
    (dict(scores=np.zeros(4), cond_frame=0, statistic=np.zeros((16, 3))), r"statistic must be \(distances, 2\)"),
    (dict(scores=np.zeros(4), cond_frame=0, sim_range=(0.2,)), "sim_range must be")])
def test_coefficient_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        affinity_scores.affinity_from_scores(**kwargs)
