"""Keyframes, affinity for any length, prompt-map parsing and interpolation, and the long-video input checks."""

import types

import numpy as np
import pytest
import torch
from diffusers.pipelines.free_noise_utils import AnimateDiffFreeNoiseMixin

from pia_jax.sampling import affinity, keyframes, prompt_travel


def pia_nearest(video_length, cond_frames):
    """PIA's prepare_masked_latent_cond rule, restated: scan the sorted keyframes, move to one strictly nearer."""
    cond_frames = sorted(cond_frames)
    nearest = [cond_frames[0]] * video_length
    for f in range(video_length):
        for c in cond_frames:
            if abs(nearest[f] - f) > abs(c - f):
                nearest[f] = c
    return nearest


@pytest.mark.parametrize("n, keys", [(16, [0, 15]), (9, [4, 0, 8]), (48, [0, 20, 47]), (7, [3]), (10, [1, 5])])
def test_nearest_keyframe_is_pias_rule(n, keys):
    got = np.asarray(keys)[keyframes.nearest_keyframe(n, keys)]
    np.testing.assert_array_equal(got, pia_nearest(n, keys))


def test_condition_latents_follow_the_nearest_keyframe():
    latents = np.arange(3)[:, None, None, None] * np.ones((3, 2, 2, 4))  # keyframe k's latent is all k
    cond = latents[keyframes.nearest_keyframe(10, [9, 0, 4])]
    np.testing.assert_array_equal(cond[:, 0, 0, 0], [1, 1, 1, 2, 2, 2, 2, 0, 0, 0])  # frame 2 ties 0/4: earlier


def reference_preset(preset, num_frames, cond_frame):
    """The reference's rule (PIA prepare_mask_coef_by_statistics): values[|f - cond_frame|], the list padded with
    its last value."""
    values = list(affinity.get_preset(preset).values)
    return np.float32([(values + values[-1:] * num_frames)[abs(f - cond_frame)] for f in range(num_frames)])


@pytest.mark.parametrize("preset", [p.name for p in affinity.PRESETS])
def test_one_keyframe_reproduces_the_reference_presets(preset):
    """Every preset, frame count and condition frame of the reference (up to 32 frames), except, on purpose, loop
    presets past 16 frames: the reference pins every frame from distance 15 on to the image (1.0); ours closes the
    loop at the last frame instead (test_presets_extend_to_long_videos)."""
    loop = preset.startswith("loop_")
    for n in (1, 5, 16, 24, 32) if not loop else (1, 5, 12, 16):
        for cond in sorted({0, n // 2, n - 1}):
            np.testing.assert_array_equal(affinity.preset_affinity(preset, n, [cond]),
                                          reference_preset(preset, n, cond))


def test_presets_extend_to_long_videos():
    values = affinity.get_preset("loop_small").values  # 16 values, back to 1.0 at distance 15
    ext = affinity.preset_values("loop_small", 48)
    np.testing.assert_array_equal(ext[:8], np.float32(values[:8]))  # the rise
    np.testing.assert_array_equal(ext[-8:], np.float32(values[8:]))  # the return: the last frame is the image
    assert (ext[8:40] == np.float32(values[7])).all()
    large = affinity.preset_affinity("large", 128, [0])
    assert large[0] == 1 and (large[13:] == np.float32(0.5)).all()
    both = affinity.preset_affinity("moderate", 48, [0, 47])
    assert both[0] == both[47] == 1 and np.array_equal(both, both[::-1])  # each keyframe shows its image
    np.testing.assert_array_equal(affinity.custom_affinity(np.linspace(1, 0.5, 100), 100),
                                  np.linspace(1, 0.5, 100).astype(np.float32))


def pia_multi_cond(video_length, cond_frames, sim_range=(0.2, 1.0)):
    """PIA's (unused) prepare_mask_coef_multi_cond, restated: per keyframe a linear ramp 1 - d·|f - c|/(n-1)·span;
    fold them by |ramp - running| with min-max rescaling after the first; rescale into sim_range."""
    lo, hi = min(sim_range), max(sim_range)
    ramps = [[1 - (hi - lo) / (video_length - 1) * abs(c - f) for f in range(video_length)] for c in cond_frames]
    mixed = [0.0] * video_length
    for k, ramp in enumerate(ramps):
        mixed = [abs(r - m) for r, m in zip(ramp, mixed)]
        if k > 0:
            mn, mx = min(mixed), max(mixed)
            mixed = [(m - mn) / (mx - mn) for m in mixed]
    mn, mx = min(mixed), max(mixed)
    return np.array([(hi - lo) * (m - mn) / (mx - mn) + lo for m in mixed])


def test_why_not_pias_multi_cond_rule():
    """Two keyframes at the ends: PIA's helper is a linear ramp in the distance to the nearest keyframe (so the
    nearest-keyframe distance we use orders frames the same way). Three keyframes: its value is no longer a function
    of that distance (equal distances get different values), which is why it is not used."""
    n = 17
    d2 = affinity.keyframe_distance(n, [0, 16])
    np.testing.assert_allclose(pia_multi_cond(n, [0, 16]), 1.0 - 0.8 * d2 / d2.max(), atol=1e-12)
    d3 = affinity.keyframe_distance(n, [0, 8, 16])
    theirs = pia_multi_cond(n, [0, 8, 16])
    assert any(np.ptp(theirs[d3 == d]) > 0.1 for d in set(d3.tolist()))


def test_prompt_interpolation_matches_diffusers():
    """diffusers' _encode_prompt_free_noise with its default _lerp, on a stub encoder that maps each prompt to a
    known tensor; our static (lo, hi, t) interpolation of the same tensors. fp32 lerp on both sides: 1e-6."""
    table = {p: torch.randn(1, 3, 2, generator=torch.Generator().manual_seed(i)) for i, p in enumerate("abcd")}
    prompts, n = {0: "a", 5: "b", 6: "c", 9: "d"}, 12

    def encode_prompt(prompt, *args, **kwargs):
        return torch.cat([table[p] for p in prompt]), None

    pipe = types.SimpleNamespace(encode_prompt=encode_prompt)
    pipe._check_inputs_free_noise = lambda *a: AnimateDiffFreeNoiseMixin._check_inputs_free_noise(pipe, *a)
    pipe._free_noise_prompt_interpolation_callback = lambda *a: AnimateDiffFreeNoiseMixin._lerp(pipe, *a)
    expected, _ = AnimateDiffFreeNoiseMixin._encode_prompt_free_noise(pipe, prompts, n, "cpu", 1, False)
    keys = sorted(prompts)
    embeds = torch.cat([table[prompts[k]] for k in keys]).numpy()
    got = prompt_travel.interpolate(embeds, *prompt_travel.interpolation(keys, n))
    np.testing.assert_allclose(got, expected.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(got[9:], np.broadcast_to(embeds[3], (3, 3, 2)))  # the last prompt holds


def test_prompt_map_parsing():
    assert prompt_travel.parse_prompt_map(["0:a cat sitting", "24: a cat running"]) == {
        0: "a cat sitting", 24: "a cat running"}
    assert prompt_travel.parse_prompt_map({0: "a", "8": "b: with colon"}) == {0: "a", 8: "b: with colon"}


@pytest.mark.parametrize("call, message", [
    (lambda: prompt_travel.parse_prompt_map(["0:a", "x:b"]), "key 'x' is not an integer frame index"),
    (lambda: prompt_travel.parse_prompt_map({0: "a", 2.5: "b"}), "key 2.5 is not an integer"),
    (lambda: prompt_travel.parse_prompt_map(["0:a", "0:b"]), "frame 0 twice"),
    (lambda: prompt_travel.parse_prompt_map(["3:a"]), "needs a prompt at frame 0"),
    (lambda: prompt_travel.parse_prompt_map(["a cat"]), "must look like FRAME:VALUE"),
    (lambda: prompt_travel.interpolation([0, 16], 16), r"frame\(s\) \[16\] outside the video: frames are 0..15"),
    (lambda: keyframes.nearest_keyframe(16, [0, 16]), r"keyframe frame\(s\) \[16\] outside the video"),
    (lambda: keyframes.nearest_keyframe(16, [-1]), "outside the video"),
    (lambda: keyframes.nearest_keyframe(16, [0, 15, 0]), "overlap"),
    (lambda: keyframes.parse_keyed(["0:a.png", "0:b.png"], "keyframe"), "keyframe has frame 0 twice"),
    (lambda: affinity.preset_affinity("loop_small", 32, [0, 31]), "loop presets return to a single image"),
    (lambda: affinity.preset_affinity("small", 16, [0, 16]), "outside the video"),
    (lambda: affinity.custom_affinity([1.0, 0.0], 2), r"affinity values must be in \(0, 1\]"),
    (lambda: affinity.custom_affinity([1.0] * 3, 4), "one affinity value per frame"),
])
def test_bad_inputs_give_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_a_videos_preset_follows_one_rule_at_every_length():
    """The sampler's per-video affinity (sampling.cases.video_affinity, what sample.py and batch files use) extends a
    loop preset by one rule at every length: the loop closes at the last frame and the frames between stay off the
    image, from 17 frames up; it used to pad with 1.0 (frames 15.. pinned to the image) up to 32 frames and switch
    rule at 33."""
    from pia_jax.sampling import cases
    for n in (16, 17, 24, 32, 33, 48):
        got = cases.video_affinity(cases.Settings(motion="loop_moderate", frames=n))
        np.testing.assert_array_equal(got, affinity.preset_values("loop_moderate", n))
        assert got[0] == got[-1] == 1 and (got[1:-1] < 1).all()
    # the reference's 16-frame lists, and every non-loop preset, are as before
    for preset in ("small", "large", "loop_small", "style_moderate"):
        for n, cond in ((16, 0), (16, 7), (8, 3)):
            got = cases.video_affinity(cases.Settings(motion=preset, frames=n, cond_frame=cond))
            np.testing.assert_array_equal(got, reference_preset(preset, n, cond))
