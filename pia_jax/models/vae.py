"""The Stable Diffusion 1.5 VAE (diffusers' `AutoencoderKL`) in Flax NNX.

Channels-last throughout: images are (N, H, W, 3) in [-1, 1], latents (N, H/f, W/f, latent_channels) with
f = 2 ** (len(block_out_channels) - 1), i.e. 8 for SD1.5. Attribute paths mirror diffusers' module names
(encoder.down_blocks.0.resnets.1.conv2, decoder.mid_block.attentions.0.to_q, ...), so `weights.DIFFUSERS_VAE` loads a
diffusers state dict without renames.

The latent scaling factor (`VAEConfig.scaling_factor`, 0.18215) is applied by callers, as in diffusers: `encode`
returns the raw posterior and `decode` takes raw latents.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from pia_jax.models.config import VAEConfig
from pia_jax.models.layers import Attention, Builder, nearest_resize

LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamps the log-variance to this range


class ResnetBlock(nnx.Module):
    """norm-SiLU-conv twice, plus the input (through a 1x1 conv where the channel count changes). No time input."""

    def __init__(self, mk: Builder, cin, cout, groups, eps):
        self.norm1 = mk.group_norm(groups, cin, eps)
        self.conv1 = mk.conv(cin, cout)
        self.norm2 = mk.group_norm(groups, cout, eps)
        self.conv2 = mk.conv(cout, cout)
        self.conv_shortcut = mk.conv(cin, cout, kernel=1) if cin != cout else None

    def __call__(self, x):
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class Downsample(nnx.Module):
    def __init__(self, mk: Builder, channels):
        self.conv = mk.conv(channels, channels, kernel=3, stride=2, padding=0)

    def __call__(self, x_NxHxWxC):
        # The LDM VAE pads one row and column at the bottom/right only, then runs an unpadded stride-2 conv;
        # symmetric padding would shift every latent by half a pixel relative to the trained weights.
        return self.conv(jnp.pad(x_NxHxWxC, ((0, 0), (0, 1), (0, 1), (0, 0))))


class Upsample(nnx.Module):
    def __init__(self, mk: Builder, channels):
        self.conv = mk.conv(channels, channels)

    def __call__(self, x_NxHxWxC):
        return self.conv(nearest_resize(x_NxHxWxC, (2 * x_NxHxWxC.shape[1], 2 * x_NxHxWxC.shape[2])))


class SpatialSelfAttention(Attention):
    """The VAE mid-block attention: one head over all channels, q/k/v with bias, its own GroupNorm, residual."""

    def __init__(self, mk: Builder, channels, groups, eps, kernel):
        super().__init__(mk, channels, heads=1, qkv_bias=True, kernel=kernel)
        self.group_norm = mk.group_norm(groups, channels, eps)

    def __call__(self, x_NxHxWxC):
        n, h, w, c = x_NxHxWxC.shape
        tokens_NxLxC = self.group_norm(x_NxHxWxC).reshape(n, h * w, c)
        return x_NxHxWxC + super().__call__(tokens_NxLxC).reshape(n, h, w, c)


class MidBlock(nnx.Module):
    """resnet -> attention -> resnet at the lowest resolution."""

    def __init__(self, mk: Builder, channels, groups, eps, kernel):
        self.resnets = nnx.List([ResnetBlock(mk, channels, channels, groups, eps) for _ in range(2)])
        self.attentions = nnx.List([SpatialSelfAttention(mk, channels, groups, eps, kernel)])

    def __call__(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class DownEncoderBlock(nnx.Module):
    def __init__(self, mk: Builder, cin, cout, layers, groups, eps, downsample):
        self.resnets = nnx.List([ResnetBlock(mk, cin if i == 0 else cout, cout, groups, eps) for i in range(layers)])
        self.downsamplers = nnx.List([Downsample(mk, cout)]) if downsample else None

    def __call__(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.downsamplers is None else self.downsamplers[0](x)


class UpDecoderBlock(nnx.Module):
    def __init__(self, mk: Builder, cin, cout, layers, groups, eps, upsample):
        self.resnets = nnx.List([ResnetBlock(mk, cin if i == 0 else cout, cout, groups, eps) for i in range(layers)])
        self.upsamplers = nnx.List([Upsample(mk, cout)]) if upsample else None

    def __call__(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.upsamplers is None else self.upsamplers[0](x)


class Encoder(nnx.Module):
    """Image (N, H, W, in_channels) -> posterior moments (N, H/f, W/f, 2 * latent_channels), before quant_conv."""

    def __init__(self, mk: Builder, config: VAEConfig, kernel):
        chans, groups, eps = config.block_out_channels, config.norm_num_groups, config.norm_eps
        self.conv_in = mk.conv(config.in_channels, chans[0])
        cins = (chans[0],) + chans[:-1]
        self.down_blocks = nnx.List([
            DownEncoderBlock(mk, cin, cout, config.layers_per_block, groups, eps, downsample=i < len(chans) - 1)
            for i, (cin, cout) in enumerate(zip(cins, chans))])
        self.mid_block = MidBlock(mk, chans[-1], groups, eps, kernel)
        self.conv_norm_out = mk.group_norm(groups, chans[-1], eps)
        self.conv_out = mk.conv(chans[-1], 2 * config.latent_channels)

    def __call__(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    """Latent (N, h, w, latent_channels), after post_quant_conv -> image (N, h*f, w*f, out_channels)."""

    def __init__(self, mk: Builder, config: VAEConfig, kernel):
        chans, groups, eps = config.block_out_channels[::-1], config.norm_num_groups, config.norm_eps
        self.conv_in = mk.conv(config.latent_channels, chans[0])
        self.mid_block = MidBlock(mk, chans[0], groups, eps, kernel)
        cins = (chans[0],) + chans[:-1]
        # One resnet more per block than the encoder has: the decoder mirrors the encoder's resnets + downsampler.
        self.up_blocks = nnx.List([
            UpDecoderBlock(mk, cin, cout, config.layers_per_block + 1, groups, eps, upsample=i < len(chans) - 1)
            for i, (cin, cout) in enumerate(zip(cins, chans))])
        self.conv_norm_out = mk.group_norm(groups, chans[-1], eps)
        self.conv_out = mk.conv(chans[-1], config.out_channels)

    def __call__(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
    """The KL-regularized autoencoder of Stable Diffusion: `encode` images to a diagonal Gaussian, `decode` latents.

    `dtype` is the compute dtype, `param_dtype` the storage dtype of the weights; GroupNorm statistics and the
    attention softmax stay in fp32 whatever the compute dtype. `attention_kernel` is passed to the mid-block
    attentions (see attention.py); their single head spans all channels (512 for SD1.5).
    """

    def __init__(self, config: VAEConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 attention_kernel="auto"):
        mk = Builder(rngs, dtype, param_dtype)
        self.config = config
        self.encoder = Encoder(mk, config, attention_kernel)
        self.decoder = Decoder(mk, config, attention_kernel)
        self.quant_conv = mk.conv(2 * config.latent_channels, 2 * config.latent_channels, kernel=1)
        self.post_quant_conv = mk.conv(config.latent_channels, config.latent_channels, kernel=1)

    def encode(self, x_NxHxWx3):
        """Images in [-1, 1] -> (mean, logvar) of the posterior, each (N, H/f, W/f, latent_channels), unscaled."""
        moments = self.quant_conv(self.encoder(x_NxHxWx3))
        mean, logvar = jnp.split(moments, 2, axis=-1)  # channels [0, c) are the mean, [c, 2c) the log-variance
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, z_NxhxwxC):
        """Unscaled latents -> images, nominally in [-1, 1] (not clipped)."""
        return self.decoder(self.post_quant_conv(z_NxhxwxC))


def sample_posterior(mean, logvar, noise):
    """A draw from N(mean, exp(logvar)) given standard-normal `noise` of the same shape (explicit, so draws are
    reproducible across frameworks)."""
    return mean + jnp.exp(0.5 * logvar) * noise
