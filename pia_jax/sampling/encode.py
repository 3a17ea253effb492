"""Encode: prompts -> CLIP text states, image -> condition latent (the first phase; one compiled program).

As the reference (PIA `i2v_pipeline.py`): the text states of [negative prompt, prompt] per video (guidance picks
what it needs), and the VAE posterior *sample* of the image times the scaling factor, the same on every frame;
with an IP-Adapter, the image prompt's tokens beside the text, [unconditional, image prompt] per video.
"""

import jax
import jax.numpy as jnp

from pia_jax.models.vae import sample_posterior
from pia_jax.sampling.prompt_travel import interpolate


def encode(text_encoder, vae, scaling_factor: float, ids_Bx2xL, pixels_BxHxWx3, post_noise_Bxhxwx4,
           clip_skip: int | None, travel=None, nearest_F=None):
    """-> (text states (B, 2, L, D), condition latent (B, h, w, c) float32). `pixels` in [-1, 1].

    Prompt travel: ids (B, 2, K, L) hold the K key prompts of each [negative, prompt] map and `travel` = (lo, hi, t),
    each (B, 2, F), interpolates them per frame (prompt_travel.py) -> text states (B, 2, F, L, D).
    Keyframes: pixels (B, K, H, W, 3), one image per keyframe (the same posterior noise for each) and `nearest_F`
    (F,) each frame's nearest keyframe (keyframes.nearest_keyframe) -> per-frame condition latents (B, F, h, w, c)."""
    length = ids_Bx2xL.shape[-1]
    states = text_encoder(ids_Bx2xL.reshape(-1, length), clip_skip=clip_skip)
    states = states.reshape(ids_Bx2xL.shape + states.shape[-1:])
    if travel is not None:
        states = jax.vmap(jax.vmap(interpolate))(states, *travel)
    pixels = pixels_BxHxWx3.reshape((-1,) + pixels_BxHxWx3.shape[-3:])  # (B·K, H, W, 3) with keyframes
    mean, logvar = vae.encode(pixels)
    noise = jnp.repeat(post_noise_Bxhxwx4, pixels.shape[0] // post_noise_Bxhxwx4.shape[0], axis=0)
    latent = sample_posterior(mean.astype(jnp.float32), logvar.astype(jnp.float32), noise) * scaling_factor
    if nearest_F is not None:
        latent = latent.reshape(pixels_BxHxWx3.shape[:2] + latent.shape[1:])[:, nearest_F]  # (B, F, h, w, c)
    return states, latent


def encode_image_prompt(image_encoder, image_proj, clip_pixels_BxSxSx3):
    """IP-Adapter: CLIP-preprocessed images (media.clip_preprocess) -> image tokens (B, 2, n, D) float32 [unconditional,
    image prompt]. The unconditional tokens are the projection of zero image embeddings, as diffusers'
    `prepare_ip_adapter_image_embeds` makes them for classifier-free guidance."""
    embeds = image_encoder(clip_pixels_BxSxSx3)
    tokens = image_proj(jnp.concatenate([jnp.zeros_like(embeds), embeds]))
    return jnp.moveaxis(tokens.reshape((2, -1) + tokens.shape[1:]), 0, 1).astype(jnp.float32)
