"""Prompt travel: prompts keyed by frame, text embeddings interpolated per frame.

Keys come as `'0:a cat sitting'` strings (command line) or a {frame: prompt} map (YAML). The rule is diffusers'
(`AnimateDiffFreeNoiseMixin._encode_prompt_free_noise` with its default `_lerp` callback): the first key must be
frame 0; the last key's prompt also holds at the last frame; between consecutive keys a < b each frame f in [a, b]
gets (1 - t)·E_a + t·E_b with t = (f - a) / (b - a), E the CLIP hidden states (all 77 tokens) of the key's prompt.
So a frame on a key has exactly that prompt's states and the last key's prompt holds until the end.
"""

import numpy as np

from pia_jax.sampling.keyframes import parse_keyed, validate_keys


def parse_prompt_map(spec) -> dict[int, str]:
    """{frame: prompt} from 'frame:prompt' strings (e.g. ['0:a cat sitting', '24:a cat running']) or a mapping
    (YAML; keys ints or integer strings). ValueError for a key that is not an integer, a repeated key, a missing
    prompt or an empty map."""
    keyed = parse_keyed(spec, "prompt map")
    if 0 not in keyed:
        raise ValueError(f"the prompt map needs a prompt at frame 0 (the first frame), got keys {sorted(keyed)}")
    return keyed


def interpolation(keys, num_frames: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Static per-frame interpolation for sorted key frames: (lo, hi, t), each (num_frames,): frame f takes
    (1 - t[f])·E[lo[f]] + t[f]·E[hi[f]], E indexed by the key's position in `keys`."""
    keys = sorted(keys)
    validate_keys(keys, num_frames, "prompt map")
    if keys[0] != 0:
        raise ValueError(f"the prompt map needs a prompt at frame 0, got keys {keys}")
    ends = keys + ([num_frames - 1] if keys[-1] != num_frames - 1 else [])  # the last prompt holds to the end
    lo = np.zeros(num_frames, np.int32)
    hi = np.zeros(num_frames, np.int32)
    t = np.zeros(num_frames, np.float32)
    for i, (a, b) in enumerate(zip(ends[:-1], ends[1:])):
        f = np.arange(a, b + 1)
        lo[f], hi[f] = min(i, len(keys) - 1), min(i + 1, len(keys) - 1)
        t[f] = (f - a) / (b - a)
    return lo, hi, t


def interpolate(embeds, lo, hi, t):
    """Per-frame text states (..., F, T, D) from the keys' states `embeds` (..., K, T, D) (numpy or JAX)."""
    t = t[:, None, None]
    return (1 - t) * embeds[..., lo, :, :] + t * embeds[..., hi, :, :]
