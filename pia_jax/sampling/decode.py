"""Decode: latents -> uint8 video frames (the last phase; one compiled program per frame chunking).

The VAE decodes `chunk` frames of every video at a time inside the program (`lax.map` over chunks), so memory is
that of one chunk, and only uint8 frames (a quarter of fp32) travel back to the host.
"""

import jax
import jax.numpy as jnp


def decode(vae, scaling_factor: float, z_BxFxhxwxc, chunk: int, as_uint8: bool = True):
    """-> (frames (B, F, H, W, 3): uint8 as PIA's save_videos_grid makes them (clip(x·255), truncated), or float32
    in [0, 1]; finite (B,): whether every value of a video was finite (NaN or inf means an fp16/bf16 overflow))."""
    b, f = z_BxFxhxwxc.shape[:2]
    pad = -f % chunk  # every chunk has the same shape
    z = jnp.pad(z_BxFxhxwxc, ((0, 0), (0, pad)) + ((0, 0),) * 3)
    n = (f + pad) // chunk
    z_NxBCxhxwxc = z.reshape((b, n, chunk) + z.shape[2:]).swapaxes(0, 1).reshape((n, b * chunk) + z.shape[2:])

    def one(z_BCxhxwxc):
        x = vae.decode(z_BCxhxwxc / scaling_factor).astype(jnp.float32)
        return jnp.isfinite(x).all(axis=(1, 2, 3)), jnp.clip(x / 2 + 0.5, 0, 1)

    finite_NxBC, x_NxBCxHxWx3 = jax.lax.map(one, z_NxBCxhxwxc)
    x = x_NxBCxHxWx3.reshape((n, b, chunk) + x_NxBCxHxWx3.shape[2:]).swapaxes(0, 1)
    x = x.reshape((b, n * chunk) + x.shape[3:])[:, :f]
    finite = finite_NxBC.reshape(n, b, chunk).all(axis=(0, 2))  # padding frames decode zeros: finite
    if as_uint8:
        x = jnp.clip(x * 255, 0, 255).astype(jnp.uint8)
    return x, finite
