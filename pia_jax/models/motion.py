"""AnimateDiff motion module: a temporal transformer over the frames at each spatial site.

Names mirror diffusers' `AnimateDiffTransformer3D`; the original AnimateDiff/PIA checkpoints name the same weights
`temporal_transformer.transformer_blocks.0.attention_blocks.{0,1}` / `norms.{0,1}` / `ff_norm`, which a
converter maps onto these names by rule.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pia_jax.models import frame_split
from pia_jax.models.layers import Attention, Builder, FeedForward


def sinusoidal_positions(length: int, dim: int) -> np.ndarray:
    """(length, dim) interleaved encoding: pe[p, 2i] = sin(p w_i), pe[p, 2i+1] = cos(p w_i), w_i = 1e4^(-2i/dim).

    Interleaved, unlike the UNet's [cos | sin] timestep embedding.
    """
    pos = np.arange(length, dtype=np.float32)[:, None]
    freqs = np.exp(np.arange(0, dim, 2, dtype=np.float32) * np.float32(-np.log(10000.0) / dim))
    pe = np.zeros((length, dim), np.float32)
    pe[:, 0::2], pe[:, 1::2] = np.sin(pos * freqs), np.cos(pos * freqs)
    return pe


class TemporalTransformerBlock(nnx.Module):
    """Two temporal self-attentions (position encoding added to each normed input), then a GEGLU feed-forward."""

    def __init__(self, mk: Builder, dim: int, heads: int, max_len: int, kernel: str):
        self.max_len = max_len
        self.norm1, self.norm2, self.norm3 = (mk.layer_norm(dim) for _ in range(3))
        self.attn1 = Attention(mk, dim, heads, kernel=kernel)
        self.attn2 = Attention(mk, dim, heads, kernel=kernel)
        self.ff = FeedForward(mk, dim)

    def __call__(self, x_NxFxC, windows=None):
        """windows: None, or (frames (W, L) int, weights (W, L), norm (F,)) static arrays: the two attentions run on
        each window of L frames (positions 0..L-1) and their results are blended per frame, sum_w w·y_w / norm,
        before the feed-forward (FreeNoise's window fusion; see pia_jax/sampling/windows.py)."""
        n, frames, dim = x_NxFxC.shape
        length = frames if windows is None else windows[0].shape[1]
        if length > self.max_len:
            raise ValueError(f"{length} frames exceed the motion module's {self.max_len} positions")
        pe = sinusoidal_positions(length, dim).astype(x_NxFxC.dtype)

        def attend(x):
            x = x + self.attn1(self.norm1(x) + pe)
            return x + self.attn2(self.norm2(x) + pe)

        if windows is None:
            x_NxFxC = attend(x_NxFxC)
        else:
            idx_WxL, w_WxL, norm = (np.asarray(a) for a in windows)
            w_WxL, norm = w_WxL.astype(np.float32), norm.astype(np.float32)
            y = attend(x_NxFxC[:, idx_WxL].reshape(n * len(idx_WxL), length, dim)).reshape(n, *idx_WxL.shape, dim)
            acc = jnp.zeros(x_NxFxC.shape, jnp.float32).at[:, idx_WxL].add(y * w_WxL[None, :, :, None])
            x_NxFxC = (acc / norm[None, :, None]).astype(x_NxFxC.dtype)
        return x_NxFxC + self.ff(self.norm3(x_NxFxC))


class MotionModule(nnx.Module):
    """Residual temporal transformer on (b*f, h, w, c) activations; zero-initialized `proj_out` = identity at start."""

    def __init__(self, mk: Builder, channels: int, heads: int, groups: int, max_len: int, pooled_norm: bool,
                 kernel: str = "xla"):
        self.pooled_norm = pooled_norm
        self.norm = mk.group_norm(groups, channels, 1e-6)
        self.proj_in = mk.linear(channels, channels)
        self.transformer_blocks = nnx.List([TemporalTransformerBlock(mk, channels, heads, max_len, kernel)])
        self.proj_out = mk.linear(channels, channels, zero=True)

    def __call__(self, x, frames: int, windows=None, chunks: int | frame_split.Chunks = 1):
        """`chunks` > 1: everything after the GroupNorm (whose statistics see all sites) runs on that many chunks
        of the spatial sites, one after another (`site_chunks`), bounding its temporaries (diffusers'
        `enable_free_noise_split_inference` splits the same way). A `frame_split.Chunks` also splits each chunk's
        sites over its mesh axis (the frames, which the attention runs over, stay whole on each device)."""
        bf, h, w, c = x.shape
        b = bf // frames
        y = self.norm(x, frames if self.pooled_norm else 1).reshape(b, frames, h * w, c)

        def temporal(rows):  # (sites, f, c), or (b, sites, f, c) taken as b·sites rows
            y = self.proj_in(rows.reshape((-1,) + rows.shape[-2:]))
            for block in self.transformer_blocks:
                y = block(y, windows)
            return self.proj_out(y).reshape(rows.shape)

        # sites become the rows, frames the sequence: (b, f, h*w, c) -> (b*h*w, f, c)
        n, axis = frame_split.of(chunks)
        if axis is None:
            y = site_chunks(temporal, y.transpose(0, 2, 1, 3).reshape(b * h * w, frames, c), n)
            y = y.reshape(b, h * w, frames, c).transpose(0, 2, 1, 3)
        else:  # the devices' frames become their sites (an all-to-all), and back after
            sites = frame_split.over(y, axis).transpose(0, 2, 1, 3)
            y = frame_split.over(frame_split.chunked(temporal, (sites,), n, axis).transpose(0, 2, 1, 3), axis)
        y = y.reshape(bf, h, w, c)
        return x + y


def site_chunks(fn, y_SxFxC, chunks: int):
    """fn on `chunks` equal row chunks of y (the last padded with zeros, dropped after), in a `lax.map`."""
    s = y_SxFxC.shape[0]
    if chunks <= 1 or s < 2:
        return fn(y_SxFxC)
    size = -(-s // chunks)
    padded = jnp.pad(y_SxFxC, [(0, size * chunks - s)] + [(0, 0)] * (y_SxFxC.ndim - 1))
    out = jax.lax.map(fn, padded.reshape((chunks, size) + y_SxFxC.shape[1:]))
    return out.reshape((chunks * size,) + out.shape[2:])[:s]
