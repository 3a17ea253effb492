"""Encode: prompts -> CLIP text states, image -> condition latent (the first phase; one compiled program).

As the reference (PIA `i2v_pipeline.py`): the text states of [negative prompt, prompt] per video (guidance picks
what it needs), and the VAE posterior *sample* of the image times the scaling factor, the same on every frame.
"""

import jax
import jax.numpy as jnp

from pia_jax.sampling.prompt_travel import interpolate

from pia_jax.vae import sample_posterior


def encode(text_encoder, vae, scaling_factor: float, ids_Bx2xL, pixels_BxHxWx3, post_noise_Bxhxwx4,
           clip_skip: int | None, travel=None):
    """-> (text states (B, 2, L, D), condition latent (B, h, w, c) float32). `pixels` in [-1, 1].

    Prompt travel: ids (B, 2, K, L) hold the K key prompts of each [negative, prompt] map and `travel` = (lo, hi, t),
    each (B, 2, F), interpolates them per frame (prompt_travel.py) -> text states (B, 2, F, L, D)."""
    length = ids_Bx2xL.shape[-1]
    states = text_encoder(ids_Bx2xL.reshape(-1, length), clip_skip=clip_skip)
    states = states.reshape(ids_Bx2xL.shape + states.shape[-1:])
    if travel is not None:
        states = jax.vmap(jax.vmap(interpolate))(states, *travel)
    mean, logvar = vae.encode(pixels_BxHxWx3)
    latent = sample_posterior(mean.astype(jnp.float32), logvar.astype(jnp.float32), post_noise_Bxhxwx4)
    return states, latent * scaling_factor
