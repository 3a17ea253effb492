"""Moved to `pia_jax.sampling` (kept so that `from pia_jax.pipeline import Animator, SampleOptions` still works)."""

from pia_jax.sampling import (DEFAULT_NEGATIVE_PROMPT, Animator, Result, SampleOptions,  # noqa: F401
                              accelerator_default_dtype, latent_factor, latent_shape, seed_key)
