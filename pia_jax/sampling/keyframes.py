"""Keyframes and affinity for videos of any length: several condition images at given frames.

Rule (decided after reading PIA's unused helpers in `animatediff/utils/util.py`):
  * condition latent: each frame takes the latent of its nearest keyframe, ties going to the earlier keyframe.
    This is PIA's `prepare_masked_latent_cond`.
  * affinity: a preset's value at the distance to the nearest keyframe, coef[f] = values[min_k |f - key_k|], the
    single-image rule (values[|f - cond_frame|], `pia_jax.sampling.affinity.preset_coefficients`) with the distance taken to
    the nearest keyframe, so every keyframe shows its image (affinity values[0]) and motion grows away from it.
    PIA's `prepare_mask_coef_multi_cond` is not used: it folds the keyframes' linear ramps by repeated absolute
    differences and rescales to [min, max] of its range. For two keyframes that is a linear ramp in the distance to
    the nearest one, reaching the minimum midway whatever the video length; for three or more the absolute
    differences no longer measure any distance. It ignores the presets (the values the model is used with), and PIA
    never calls it.
Presets extend to N frames (`preset_values`): a preset lists values by distance; past its end the last value
repeats (as for 16 frames). Loop presets (back to the image at distance 15 of a 16-frame clip) keep their rise
(the first half) and their return (the second half) and repeat the value between them, so with the image at frame 0
the last frame of any length still returns to it; up to 16 frames the lists are used as they are. (Deliberately
unlike the reference and `affinity.preset_coefficients`, which pad a loop past 16 frames with 1.0 and so pin every
frame from the 16th on to the image.)
"""

import math

import numpy as np

from pia_jax.sampling import affinity


def parse_keyed(spec, what: str) -> dict:
    """{frame: value} from 'frame:value' strings or a mapping (keys ints or integer strings); ValueError for a key
    that is not an integer, a repeated key or an empty value."""
    items = list(spec.items()) if isinstance(spec, dict) else []
    if not isinstance(spec, dict):
        for text in [spec] if isinstance(spec, str) else list(spec):
            key, sep, value = str(text).partition(":")
            if not sep:
                raise ValueError(f"{what} entry {text!r} must look like FRAME:VALUE with an integer frame, e.g. 0:...")
            items.append((key, value))
    out = {}
    for key, value in items:
        try:
            frame = int(str(key).strip()) if not isinstance(key, bool) else None
        except ValueError:
            frame = None
        if frame is None:
            raise ValueError(f"{what} key {key!r} is not an integer frame index")
        if frame in out:
            raise ValueError(f"{what} has frame {frame} twice (keys must not overlap)")
        if not str(value).strip():
            raise ValueError(f"{what} entry for frame {frame} is empty")
        out[frame] = str(value).strip()
    if not out:
        raise ValueError(f"the {what} is empty")
    return out


def validate_keys(frames, num_frames: int, what: str = "keyframe"):
    """ValueError unless every key frame is an index of the video and none repeats."""
    frames = list(frames)
    bad = [f for f in frames if not 0 <= f < num_frames]
    if bad:
        raise ValueError(f"{what} frame(s) {bad} outside the video: frames are 0..{num_frames - 1}")
    if len(set(frames)) != len(frames):
        raise ValueError(f"{what} frames {sorted(frames)} overlap: each frame may be keyed once")


def nearest_keyframe(num_frames: int, keyframes) -> np.ndarray:
    """(num_frames,) int32: position in `keyframes` of each frame's nearest keyframe (ties: the earlier frame)."""
    validate_keys(keyframes, num_frames)
    keys = np.asarray(keyframes)
    dist = np.abs(np.arange(num_frames)[:, None] - keys[None])
    # among equally near keyframes take the earliest: sort positions by frame, argmin picks the first minimum
    order = np.argsort(keys, kind="stable")
    return order[np.argmin(dist[:, order], axis=1)].astype(np.int32)


def keyframe_distance(num_frames: int, keyframes) -> np.ndarray:
    """(num_frames,) int: distance of each frame to its nearest keyframe."""
    keys = np.asarray(keyframes)
    return np.abs(np.arange(num_frames) - keys[nearest_keyframe(num_frames, keyframes)])


def preset_values(preset, length: int) -> np.ndarray:
    """(length,) float32 affinity of a preset by distance 0..length-1 (see the module docstring)."""
    p = affinity.get_preset(preset)
    values = list(p.values)
    if p.name.startswith("loop_") and length > len(values):
        half = len(values) // 2
        values = values[:half] + [values[half - 1]] * (length - len(values)) + values[half:]
    return np.asarray((values + values[-1:] * length)[:length], np.float32)


def preset_affinity(preset, num_frames: int, keyframes=(0,)) -> np.ndarray:
    """(num_frames,) float32: values[distance to the nearest keyframe]. For one keyframe and up to 32 frames this is
    `affinity.preset_coefficients(preset, num_frames, keyframe)`, except for loop presets past 16 frames (extended
    by `preset_values`, not padded with 1.0). Loop presets take one keyframe (the loop itself brings the video back
    to it)."""
    keyframes = list(keyframes)
    if num_frames < 1:
        raise ValueError(f"frames must be >= 1 (longer than the motion modules' 32 positions: context windows), got "
                         f"{num_frames}")
    if affinity.get_preset(preset).name.startswith("loop_") and len(keyframes) > 1:
        raise ValueError(f"loop presets return to a single image; with {len(keyframes)} keyframes use a non-loop "
                         f"preset and put the same image at the last frame")
    return preset_values(preset, num_frames)[keyframe_distance(num_frames, keyframes)]


def custom_affinity(values, num_frames: int) -> np.ndarray:
    """A user's per-frame affinity list as (num_frames,) float32, for any length: `affinity.custom_coefficients`
    without its 32-frame limit (which windows lift)."""
    return affinity.custom_coefficients(values, num_frames, max_frames=math.inf)


def keyframe_condition(latents_KxHxWxC, num_frames: int, keyframes):
    """Per-frame condition latents (num_frames, h, w, c) from the keyframes' latents (K, h, w, c), by nearest
    keyframe; works on numpy and JAX arrays."""
    if len(latents_KxHxWxC) != len(keyframes):
        raise ValueError(f"{len(keyframes)} keyframes need {len(keyframes)} condition latents, got "
                         f"{len(latents_KxHxWxC)}")
    return latents_KxHxWxC[nearest_keyframe(num_frames, keyframes)]
