"""Inter-frame affinity: the per-frame scalar PIA feeds the UNet as its mask channel (1 = copy the condition image).

Inference uses hand-made presets indexed by temporal distance (this module); training derives the value from an
HSV + edge difference between each frame and the condition frame, normalised by per-distance dataset statistics
(`pia_jax.data.affinity_scores`).

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

One rule for every length and every set of keyframes (`preset_affinity`): affinity[f] = values[d], d the distance
from frame f to its nearest keyframe (one keyframe: the condition frame), so every keyframe shows its image (values[0])
and motion grows away from it. With one keyframe this is the reference's values[|f - cond_frame|] (PIA
`prepare_mask_coef_by_statistics`, diffusers `PIAPipeline`), except for loop presets past 16 frames (below).
Presets extend to any length (`preset_values`): past the end of a list its last value repeats (as the reference
does). Loop presets (back to the image at distance 15 of a 16-frame clip) keep their rise (the first half) and their
return (the second half) and repeat the value between them, so with the image at frame 0 the last frame of any
length returns to it. (Deliberately unlike the reference, which pads a loop past 16 frames with 1.0 and so pins every
frame from the 16th on to the image.)
PIA's `prepare_mask_coef_multi_cond` (several keyframes) is not used: it folds the keyframes' linear ramps by
repeated absolute differences and rescales to [min, max] of its range. For two keyframes that is a linear ramp in
the distance to the nearest one, reaching the minimum midway whatever the video length; for three or more the
absolute differences no longer measure any distance. It ignores the presets (the values the model is used with), and
PIA never calls it. (Which keyframe's image conditions a frame: `pia_jax.sampling.keyframes`.)
"""

from typing import NamedTuple

import numpy as np

from pia_jax.sampling.keyframes import validate_keys


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
    # repeat the middle value (`preset_values`).
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


def check_frames(frames: int, cond_frame: int = 0):
    """ValueError unless a video of `frames` frames (any number >= 1) has a frame `cond_frame`."""
    if frames < 1:
        raise ValueError(f"frames must be >= 1 (longer than the motion modules' 32 positions: context windows), got "
                         f"{frames}")
    if not 0 <= cond_frame < frames:
        raise ValueError(f"cond_frame must be in 0..{frames - 1}, got {cond_frame}")


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


def preset_values(preset: str | int, length: int) -> np.ndarray:
    """(length,) float32 affinity of a preset by distance 0..length-1 (see the module docstring)."""
    p = get_preset(preset)
    values = list(p.values)
    if p.name.startswith("loop_") and length > len(values):
        half = len(values) // 2
        values = values[:half] + [values[half - 1]] * (length - len(values)) + values[half:]
    return np.asarray((values + values[-1:] * length)[:length], np.float32)


def keyframe_distance(frames: int, keyframes) -> np.ndarray:
    """(frames,) int: distance of each frame to its nearest keyframe."""
    keyframes = list(keyframes)
    if not keyframes:
        raise ValueError("give at least one keyframe (the condition frame)")
    validate_keys(keyframes, frames)
    return np.abs(np.arange(frames)[:, None] - np.asarray(keyframes)[None]).min(axis=1)


def preset_affinity(preset: str | int, frames: int, keyframes=(0,)) -> np.ndarray:
    """(frames,) float32 affinity of a preset for a video of any length: values[distance to the nearest keyframe].
    Loop presets take one keyframe (the loop itself brings the video back to it)."""
    check_frames(frames)
    keyframes = list(keyframes)
    distance = keyframe_distance(frames, keyframes)
    if get_preset(preset).name.startswith("loop_") and len(keyframes) > 1:
        raise ValueError(f"loop presets return to a single image; with {len(keyframes)} keyframes use a non-loop "
                         f"preset and put the same image at the last frame")
    return preset_values(preset, frames)[distance]


def custom_affinity(values, frames: int) -> np.ndarray:
    """A user's per-frame affinity list as (frames,) float32, for any length; every value in (0, 1]."""
    check_frames(frames)
    affinity = np.asarray(values, np.float64)
    if affinity.shape != (frames,):
        raise ValueError(f"need one affinity value per frame ({frames}), got shape {affinity.shape}")
    bad = ~((affinity > 0) & (affinity <= 1))  # also catches NaN
    if bad.any():
        raise ValueError(f"affinity values must be in (0, 1], got {affinity[bad].tolist()} at frames "
                         f"{np.flatnonzero(bad).tolist()}")
    return affinity.astype(np.float32)
