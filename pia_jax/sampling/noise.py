"""Randomness per video: every video's noise comes from its own seed, so a video does not depend on the batch it
is in or on the device count.

A seed gives four keys: the initial latent noise, the VAE posterior noise, the DDIM (eta) step noise, which the
denoising loop draws as normal(fold_in(key, step)) inside the compiled program, and FreeNoise's shuffles. Each use
has its own key, so no two draws are correlated (jax's split is counter-based: adding the fourth key left the
first three, and every seed's videos, as they were).
"""

import functools

import jax
import numpy as np


def seed_key(seed: int):
    """A PRNG key for any 64-bit seed (the reference's example configs use seeds above 2**63)."""
    seed = int(seed)
    if not 0 <= seed < 2 ** 64:
        raise ValueError(f"seeds must be integers in [0, 2**64), got {seed}")
    return jax.random.fold_in(jax.random.key(seed & 0xFFFFFFFF), seed >> 32)


def video_keys(seed: int):
    """(initial noise, posterior noise, step noise, FreeNoise permutations) keys of one video."""
    return jax.random.split(seed_key(seed), 4)


def freenoise_key(seed: int):
    """The key of one video's FreeNoise shuffles (pia_jax.sampling.windows.shuffle_permutations)."""
    return video_keys(seed)[3]


@functools.partial(jax.jit, static_argnums=1)
def _normal(key, shape):
    return jax.random.normal(key, shape)


def draw(seeds, latent_shape: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(initial noise (B, F, h, w, c), posterior noise (B, h, w, c), step-noise key data (B, 2)) for the seeds."""
    keys = [video_keys(s) for s in seeds]
    noise = np.stack([np.asarray(_normal(k[0], latent_shape)) for k in keys])
    post = np.stack([np.asarray(_normal(k[1], latent_shape[1:])) for k in keys])
    return noise, post, np.stack([np.asarray(jax.random.key_data(k[2])) for k in keys])


def step_noise(key_data_Bx2, i, shape: tuple):
    """Standard normal noise (B,) + shape for step i: one independent draw per video and step."""
    keys = jax.random.wrap_key_data(key_data_Bx2)
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), shape))(keys)
