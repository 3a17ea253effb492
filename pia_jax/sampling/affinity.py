"""Inter-frame affinity: the per-frame scalar PIA feeds the UNet as its mask channel (1 = copy the condition image).

Inference uses hand-made presets indexed by temporal distance d = |f - cond_frame| (this module); training derives
the value from an HSV + edge difference between each frame and the condition frame, normalised by per-distance
dataset statistics (`pia_jax.data.affinity_scores`).

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


def custom_coefficients(values, num_frames: int, max_frames: float = MAX_FRAMES) -> np.ndarray:
    """A user's per-frame affinity list as (num_frames,) float32; every value in (0, 1]. `max_frames`: the longest
    video allowed (math.inf where context windows lift the motion modules' limit)."""
    coef = np.asarray(values, np.float64)
    _check_frames(num_frames, 0, max_frames)
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
