"""Keyframes: several condition images at given frames, and which of them conditions each frame.

Rule (decided after reading PIA's unused helpers in `animatediff/utils/util.py`): each frame takes the condition
latent of its nearest keyframe, ties going to the earlier keyframe. This is PIA's `prepare_masked_latent_cond`.
(A keyframed video's affinity, the preset's value at each frame's distance to its nearest keyframe:
`pia_jax.sampling.affinity.preset_affinity`.)

`parse_keyed` reads 'frame:value' entries, as `--keyframe` and prompt maps (`prompt_travel.py`) give them.
"""

import numpy as np


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
