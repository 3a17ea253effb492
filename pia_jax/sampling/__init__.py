"""Sampling: an image, prompts and per-frame affinities in, videos out. The phases, in the order they run:

  cases.py          inputs: the batch-file format, planning of cases, output names, every check before loading
  options.py        SampleOptions (steps, scheduler, guidance, ...) and their checks against a model's config
  noise.py          per-video noise from seeds
  encode.py         prompts -> text states, image -> condition latent
  loop.py           the denoising loop: one compiled program for every step count, strength and guidance scale
  decode.py         latents -> uint8 frames, chunked inside one program
  memory.py         how many videos fit on a device, from the compiled programs' measured memory
  compile_cache.py  the persistent compilation cache (on by default)
  animator.py       `Animator`: built from the model parts, runs the phases batch by batch

The schedulers themselves are `pia_jax.schedulers`.
"""

from pia_jax.sampling.animator import Animator, accelerator_default_dtype, latent_factor, latent_shape  # noqa: F401
from pia_jax.sampling.noise import seed_key  # noqa: F401
from pia_jax.sampling.options import DEFAULT_NEGATIVE_PROMPT, Result, SampleOptions  # noqa: F401
