"""AnimateDiff motion module: a temporal transformer over the frames at each spatial site.

Names mirror diffusers' `AnimateDiffTransformer3D`; the original AnimateDiff/PIA checkpoints name the same weights
`temporal_transformer.transformer_blocks.0.attention_blocks.{0,1}` / `norms.{0,1}` / `ff_norm`, which a
converter maps onto these names by rule.
"""

import numpy as np
from flax import nnx

from pia_jax.layers import Attention, Builder, FeedForward


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

    def __call__(self, x_NxFxC):
        frames, dim = x_NxFxC.shape[1:]
        if frames > self.max_len:
            raise ValueError(f"{frames} frames exceed the motion module's {self.max_len} positions")
        pe = sinusoidal_positions(frames, dim).astype(x_NxFxC.dtype)
        x_NxFxC = x_NxFxC + self.attn1(self.norm1(x_NxFxC) + pe)
        x_NxFxC = x_NxFxC + self.attn2(self.norm2(x_NxFxC) + pe)
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

    def __call__(self, x, frames: int):
        bf, h, w, c = x.shape
        b = bf // frames
        y = self.norm(x, frames if self.pooled_norm else 1)
        # sites become the batch, frames the sequence: (b*f, h, w, c) -> (b*h*w, f, c)
        y = y.reshape(b, frames, h * w, c).transpose(0, 2, 1, 3).reshape(b * h * w, frames, c)
        y = self.proj_in(y)
        for block in self.transformer_blocks:
            y = block(y)
        y = self.proj_out(y)
        y = y.reshape(b, h * w, frames, c).transpose(0, 2, 1, 3).reshape(bf, h, w, c)
        return x + y
