"""Sampling: an image, prompts and per-frame affinities in, videos out. The phases, in the order they run:

  cases.py          inputs: the batch-file format, planning of cases, output names, every check before loading
  options.py        SampleOptions (steps, scheduler, guidance, ...) and their checks against a model's config
  affinity.py       the per-frame affinity of the condition channel: presets, keyframes, custom values
  noise.py          per-video noise from seeds
  encode.py         prompts -> text states, image -> condition latent
  schedulers.py     DDIM and DPM-Solver++ 2M as data, one pure `step`
  loop.py           the denoising loop: one compiled program for every step count, strength and guidance scale
  decode.py         latents -> uint8 frames, chunked inside one program
  memory.py         how many videos fit on a device, from the compiled programs' measured memory
  compile_cache.py  the persistent compilation cache (the command lines turn it on)
  animator.py       `Animator`: built from the model parts, runs the phases batch by batch
Long videos: windows.py (context windows, FreeNoise), prompt_travel.py, keyframes.py.

The names below are imported on first use, so that the light modules (cases, options, affinity) load without jax.
"""

import importlib

_EXPORTS = {"Animator": "animator", "accelerator_default_dtype": "animator", "seed_key": "noise",
            "DEFAULT_NEGATIVE_PROMPT": "options", "Result": "options", "SampleOptions": "options"}


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pia_jax.sampling' has no attribute {name!r}")
    return getattr(importlib.import_module(f"pia_jax.sampling.{_EXPORTS[name]}"), name)


__all__ = list(_EXPORTS)
