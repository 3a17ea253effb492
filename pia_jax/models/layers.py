"""Building blocks shared by the UNet, the motion modules and the VAE.

Tensors are channels-last. Attribute names mirror diffusers' modules (to_q, to_out.0, ff.net.0.proj, ...) so that a
PyTorch key maps onto an NNX path by rule (see weights.py).
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pia_jax.models.attention import dot_product_attention


class Builder:
    """Carries the compute dtype, the parameter dtype and the RNG stream into layer constructors."""

    def __init__(self, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.rngs, self.dtype, self.param_dtype = rngs, dtype, param_dtype

    def linear(self, cin, cout, bias=True, zero=False):
        init = {"kernel_init": nnx.initializers.zeros} if zero else {}
        return nnx.Linear(cin, cout, use_bias=bias, dtype=self.dtype, param_dtype=self.param_dtype,
                          rngs=self.rngs, **init)

    def conv(self, cin, cout, kernel=3, stride=1, padding=None, zero=False):
        pad = kernel // 2 if padding is None else padding
        init = {"kernel_init": nnx.initializers.zeros} if zero else {}
        return nnx.Conv(cin, cout, (kernel, kernel), strides=stride, padding=((pad, pad), (pad, pad)),
                        dtype=self.dtype, param_dtype=self.param_dtype, rngs=self.rngs, **init)

    def group_norm(self, groups, channels, eps):
        return GroupNorm(groups, channels, eps, dtype=self.dtype, param_dtype=self.param_dtype)

    def layer_norm(self, dim, eps=1e-5):
        return nnx.LayerNorm(dim, epsilon=eps, dtype=self.dtype, param_dtype=self.param_dtype, rngs=self.rngs)


class GroupNorm(nnx.Module):
    """GroupNorm over channels-last tensors, statistics in fp32.

    With `frames` > 1 the statistics are pooled over each run of `frames` consecutive batch entries (the frames of
    one clip folded into the batch), which is what torch's GroupNorm computes on a (b, c, f, h, w) tensor.

    The statistics take one pass over x: the sums of d = x - shift and of d^2 fuse into one reduction (XLA:GPU: one
    kernel per norm instead of two), and E[d^2] - E[d]^2 loses about eps * (1 + (mean - shift)^2 / var) of the
    variance to cancellation. The shift is the mean of every SHIFT_STRIDE-th spatial position (all the group's
    channels there): for ANY data the mean of a 1/R subsample lies within sqrt(R * var) of the group's mean (its
    squared deviation is at most the subsample's share of the sum of squares), so the loss stays below
    eps * (1 + R) whatever the outliers or offsets. A single element as shift (the group's first value, before)
    allowed (mean - shift)^2 / var up to the group size: a 100-sigma outlier there cost 1e-3; two passes in fp32
    lose the mean itself at large DC offsets (1e-3 at mean 1e4); tests/test_groupnorm.py. The price, compiled for
    an H100 (BENCHMARKS.md): a small reduction of 1/R of x per norm, ~1.5 extra small kernels, memory unchanged.
    """

    SHIFT_STRIDE = 32  # R: the worst case above stays within 6e-6 of float64 (measured); 1/32 of x read once more

    def __init__(self, num_groups, num_channels, eps, *, dtype=jnp.float32, param_dtype=jnp.float32):
        if num_channels % num_groups:
            raise ValueError(f"{num_channels} channels cannot be split into {num_groups} groups")
        self.num_groups, self.eps, self.dtype = num_groups, eps, dtype
        self.scale = nnx.Param(jnp.ones((num_channels,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((num_channels,), param_dtype))

    def __call__(self, x, frames: int = 1):
        c = x.shape[-1]
        x_BxSxGxK = x.reshape(x.shape[0] // frames, -1, self.num_groups, c // self.num_groups)
        sample = x_BxSxGxK[:, ::self.SHIFT_STRIDE].astype(jnp.float32)
        shift = jax.lax.stop_gradient(sample.mean(axis=(1, 3), keepdims=True))  # mean and variance do not depend on it
        d = x_BxSxGxK.astype(jnp.float32) - shift
        m1, m2 = d.mean(axis=(1, 3), keepdims=True), jnp.square(d).mean(axis=(1, 3), keepdims=True)
        var = jnp.maximum(m2 - jnp.square(m1), 0.0)
        y = ((d - m1) * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
        return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(self.dtype)


class Attention(nnx.Module):
    """Multi-head attention with diffusers' parameter names; q/k/v without bias unless `qkv_bias`."""

    def __init__(self, mk: Builder, dim, heads, context_dim=None, qkv_bias=False, kernel="xla"):
        context_dim = context_dim or dim
        self.heads, self.kernel = heads, kernel
        self.to_q = mk.linear(dim, dim, bias=qkv_bias)
        self.to_k = mk.linear(context_dim, dim, bias=qkv_bias)
        self.to_v = mk.linear(context_dim, dim, bias=qkv_bias)
        self.to_out = nnx.List([mk.linear(dim, dim)])

    def __call__(self, x_BxLxC, context=None):
        context = x_BxLxC if context is None else context
        split = lambda t: t.reshape(*t.shape[:2], self.heads, -1)  # (B, L, C) -> (B, L, H, D)
        out = dot_product_attention(split(self.to_q(x_BxLxC)), split(self.to_k(context)), split(self.to_v(context)),
                                    kernel=self.kernel)
        return self.to_out[0](out.reshape(x_BxLxC.shape[:2] + (-1,)))


class GEGLU(nnx.Module):
    """value * gelu(gate) with [value | gate] = proj(x), as diffusers'.

    One matmul on purpose: as two matmuls on `proj`'s halves (value, gate) XLA:GPU still writes both products and
    reads them back in a separate multiply (compiled for an H100 without autotuning: no epilogue fusion, see
    BENCHMARKS.md), so the split saves no memory traffic and costs a kernel.
    """

    def __init__(self, mk: Builder, dim, inner):
        self.proj = mk.linear(dim, 2 * inner)

    def __call__(self, x):
        value, gate = jnp.split(self.proj(x), 2, axis=-1)
        return value * jax.nn.gelu(gate, approximate=False)


class FeedForward(nnx.Module):
    """GEGLU feed-forward; `net` keeps diffusers' indices (0: GEGLU, 1: dropout, 2: output Linear)."""

    def __init__(self, mk: Builder, dim, mult=4):
        self.net = nnx.List([GEGLU(mk, dim, mult * dim), nnx.Dropout(0.0), mk.linear(mult * dim, dim)])

    def __call__(self, x):
        return self.net[2](self.net[0](x))




def nearest_resize(x_NxHxWxC, size):
    """PyTorch's legacy `F.interpolate(mode="nearest")`: output pixel i reads input floor(i * in / out)."""
    n, h, w, c = x_NxHxWxC.shape
    if tuple(size) == (2 * h, 2 * w):  # the usual x2: each pixel becomes a 2x2 block, no gather needed
        return jnp.broadcast_to(x_NxHxWxC[:, :, None, :, None], (n, h, 2, w, 2, c)).reshape(n, 2 * h, 2 * w, c)

    def source(n_in, n_out):  # torch computes the scale and the product in fp32
        idx = np.floor(np.arange(n_out, dtype=np.float32) * (np.float32(n_in) / np.float32(n_out)))
        return np.minimum(idx.astype(np.int64), n_in - 1)
    return x_NxHxWxC[:, source(h, size[0])][:, :, source(w, size[1])]
