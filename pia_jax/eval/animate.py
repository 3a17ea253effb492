"""The evaluations' one door to the sampler (`pia_jax.sampling.Animator`): a cache of loaded animators and
`animate`, which the bench and the toy world call, so a new sampler API changes only this file."""

import functools

import numpy as np


@functools.lru_cache(maxsize=2)  # evaluations run model by model, so each is loaded once
def animator(model_dir: str, devices: int | None = None):
    """The Animator of a model directory, its videos split over the first `devices` local devices (None: all)."""
    import jax
    from jax.sharding import Mesh

    from pia_jax.sampling import Animator
    return Animator.load(model_dir, mesh=Mesh(np.array(jax.local_devices()[:devices]), ("data",)))


def animate(model_dir, images, prompts, affinities, seeds, options, *, negative_prompt: str = "",
            batch: int | None = None, devices: int | None = None, float_frames: bool = False,
            log=None) -> np.ndarray:
    """Videos (B, F, H, W, 3) from uint8 images (B, H, W, 3) at the model's size, one prompt, one affinity
    schedule (F,) and one noise seed per image, sampled with `options` (SampleOptions). `batch`: videos per call,
    the last call padded with the last video, so that one program serves every call (None: all at once). Frames
    are uint8, or float32 in [0, 1] with `float_frames`. `log(message)` hears of the loading and of each call."""
    images, affinities = np.asarray(images), np.asarray(affinities, np.float32)
    n = len(images)
    batch = min(batch or n, n)
    log = log or (lambda message: None)
    log(f"loading {model_dir} (once per process)")
    sampler = animator(str(model_dir), devices)
    out = []
    for start in range(0, n, batch):
        fresh = start == 0 and sampler.compilations + sampler.programs_loaded == 0  # not yet used in this process
        log(f"sampling videos {start + 1}-{min(start + batch, n)} of {n}" + " (compiling or loading first)" * fresh)
        idx = [min(i, n - 1) for i in range(start, start + batch)]
        result = sampler(images[idx], [prompts[i] for i in idx], [negative_prompt] * batch, affinities[idx], options,
                         seeds=[int(seeds[i]) for i in idx], float_frames=float_frames)
        out.append(np.asarray(result.videos)[:min(batch, n - start)])
    return np.concatenate(out)
