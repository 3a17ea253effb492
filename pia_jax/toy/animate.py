"""The toy package's one door to the sampler (`pia_jax.sampling.Animator`), so a new sampler API changes
only this file."""

import functools

import numpy as np


@functools.lru_cache(maxsize=2)
def _animator(model_dir: str):
    from pia_jax.sampling import Animator
    return Animator.load(model_dir)


def animate(model_dir, images, prompts, motions, seeds, *, frames: int = 8, steps: int = 25,
            guidance: float = 4.0, batch: int = 16, context_length: int | None = None, context_stride: int = 4,
            strength: float = 1.0) -> np.ndarray:
    """Videos (B, frames, H, W, 3) float32 in [0, 1] from uint8 images (B, H, W, 3), one prompt and one affinity
    preset name and one noise seed per image. The negative prompt is "" (the caption-dropout condition the
    toy model was trained with). Runs in fixed batches of `batch` (the last one padded), so it compiles once.
    Long videos: `context_length` frames per context window, a window every `context_stride` frames. `strength`
    < 1 starts from the image noised part way (the reference's "noise from image" option)."""
    from pia_jax.sampling import SampleOptions
    from pia_jax.sampling.keyframes import preset_affinity  # any length (affinity.preset_coefficients: <= 32)

    animator = _animator(str(model_dir))
    images = np.asarray(images)
    n = len(images)
    batch = min(batch, n)
    mask = np.stack([preset_affinity(m, frames) for m in motions])
    options = SampleOptions(steps=steps, guidance_scale=guidance, strength=strength, context_length=context_length,
                            context_stride=context_stride)
    out = []
    for start in range(0, n, batch):
        idx = [min(i, n - 1) for i in range(start, start + batch)]  # pad with the last video
        result = animator(images[idx], [prompts[i] for i in idx], [""] * batch, mask[idx], options,
                          seeds=[seeds[i] for i in idx], float_frames=True)
        out.append(result.videos[:min(batch, n - start)])
    return np.concatenate(out)
