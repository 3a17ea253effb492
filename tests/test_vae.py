"""Parity of pia_jax.models.vae.AutoencoderKL with diffusers' PyTorch AutoencoderKL, both with the same random weights.

Tolerances are max abs error relative to the output scale (oracle.rel_err). Both sides compute in fp32 on CPU, so
they differ only in summation order (convolution algorithms, GroupNorm reductions, the attention matmuls); that
gives ~1e-6..1e-5 through the ~20-40 layers here. FP32_TOL = 1e-4 leaves room for that while any real mistake (a
wrong padding, a transposed kernel, a missing residual, a wrong eps or channel split) gives errors of 1e-2 or more.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from pia_jax.models.abstract import abstract_model
from pia_jax.models.config import SD15_PIA, TINY, VAEConfig
from pia_jax.models.vae import AutoencoderKL, sample_posterior
from pia_jax.weights import DIFFUSERS_VAE, load_state_dict
from tests.oracle import assert_close, numpy_state
from tests.torch_models import vae as torch_vae

FP32_TOL = 1e-4  # fp32 vs fp32, summation order only (see the module docstring); measured ~1e-6
BF16_TOL = 5e-2  # bf16 keeps 8 mantissa bits (~4e-3 per rounding); errors add up over ~20 layers to ~1e-2


# one jitted wrapper each, so repeated shapes reuse their compilation
ENCODE = nnx.jit(AutoencoderKL.encode)
DECODE = nnx.jit(AutoencoderKL.decode)

def jax_vae(ref, cfg: VAEConfig, dtype=jnp.float32):
    model = abstract_model(AutoencoderKL, cfg, dtype=dtype)
    return load_state_dict(model, numpy_state(ref), DIFFUSERS_VAE)  # strict: fails on any unused or missing key


def nchw(x_nhwc):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x_nhwc, np.float32).transpose(0, 3, 1, 2)))


def nhwc(t_nchw):
    return t_nchw.detach().numpy().transpose(0, 2, 3, 1)


def images(shape, seed):
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


@pytest.fixture(scope="module")
def tiny():
    ref = torch_vae(TINY.vae)
    return ref, jax_vae(ref, TINY.vae)


def check_encode(ref, model, x, noise_seed, what):
    with torch.no_grad():
        dist = ref.encode(nchw(x)).latent_dist
        # diffusers draws its noise with one torch.randn call on the generator; drawing it the same way here lets
        # the same noise go into our explicit-noise sampler.
        noise = torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(noise_seed))
        sample = dist.sample(generator=torch.Generator().manual_seed(noise_seed))
    mean, logvar = ENCODE(model, jnp.asarray(x))
    assert_close(mean, nhwc(dist.mean), FP32_TOL, f"{what} mean")
    assert_close(logvar, nhwc(dist.logvar), FP32_TOL, f"{what} logvar")
    assert_close(sample_posterior(mean, logvar, jnp.asarray(nhwc(noise))), nhwc(sample), FP32_TOL, f"{what} sample")


def check_decode(ref, model, z, what):
    with torch.no_grad():
        expected = nhwc(ref.decode(nchw(z)).sample)
    out = DECODE(model, jnp.asarray(z))
    assert_close(out, expected, FP32_TOL, f"{what} decode")
    return np.asarray(out), expected


# (N, H, W): batch > 1 with a non-square image; latent sizes that are odd (21x13) and where H < W.
IMAGE_SHAPES = [(2, 32, 48), (1, 42, 26), (3, 16, 40)]


@pytest.mark.parametrize("n,h,w", IMAGE_SHAPES)
def test_encode_matches_diffusers(tiny, n, h, w):
    ref, model = tiny
    check_encode(ref, model, images((n, h, w, 3), seed=h * w), noise_seed=n, what=f"tiny {n}x{h}x{w}")


@pytest.mark.parametrize("n,h,w", [(2, 16, 24), (1, 21, 13), (2, 5, 7)])
def test_decode_matches_diffusers(tiny, n, h, w):
    ref, model = tiny
    z = np.random.default_rng(h * w).standard_normal((n, h, w, TINY.vae.latent_channels)).astype(np.float32)
    check_decode(ref, model, z, f"tiny latent {n}x{h}x{w}")


def test_odd_image_size_matches_diffusers(tiny):
    """An odd image side exercises the asymmetric (bottom/right) downsampling pad: 33 -> 17, 27 -> 14."""
    ref, model = tiny
    check_encode(ref, model, images((1, 33, 27, 3), seed=1), noise_seed=3, what="tiny odd 33x27")


def test_group_norms_match_diffusers(tiny):
    """Every GroupNorm has diffusers' eps and group count. An eps of 1e-5 instead of 1e-6 is invisible in the parity
    tests (it moves outputs by ~1e-6 where activations are O(1)), but it matters for near-constant image regions."""
    ref, model = tiny
    norms = {name: m for name, m in ref.named_modules() if isinstance(m, torch.nn.GroupNorm)}
    assert norms
    for name, norm in norms.items():
        ours = model
        for part in name.split("."):
            ours = ours[int(part)] if part.isdigit() else getattr(ours, part)
        assert (ours.eps, ours.num_groups) == (norm.eps, norm.num_groups), name


def test_logvar_is_clamped():
    """Drive the log-variance far outside [-30, 20] through quant_conv's bias; both sides must clamp the same."""
    cfg = TINY.vae
    ref = torch_vae(cfg, seed=1)
    c = cfg.latent_channels
    with torch.no_grad():
        ref.quant_conv.bias[c:c + c // 2] += 100.0
        ref.quant_conv.bias[c + c // 2:] -= 100.0
    model = jax_vae(ref, cfg)
    x = images((1, 16, 16, 3), seed=2)
    with torch.no_grad():
        expected = nhwc(ref.encode(nchw(x)).latent_dist.logvar)
    _, logvar = model.encode(jnp.asarray(x))
    assert float(jnp.max(logvar)) == 20.0 and float(jnp.min(logvar)) == -30.0
    assert_close(logvar, expected, FP32_TOL, "clamped logvar")


def test_sd15_config_matches_diffusers():
    """The real SD1.5 channel counts (128..512, 2 layers, 32 groups, 512-wide single-head attention), small image."""
    cfg = SD15_PIA.vae
    ref = torch_vae(cfg, seed=2)
    model = jax_vae(ref, cfg)
    check_encode(ref, model, images((1, 64, 64, 3), seed=4), noise_seed=5, what="sd15 1x64x64")
    z = np.random.default_rng(6).standard_normal((1, 8, 8, cfg.latent_channels)).astype(np.float32)
    check_decode(ref, model, z, "sd15 latent 1x8x8")


def test_bf16_compute_close_to_fp32(tiny):
    """bf16 compute with fp32 parameters: finite, the requested dtype, and within bf16 rounding of fp32."""
    ref, model = tiny
    model_bf16 = jax_vae(ref, TINY.vae, dtype=jnp.bfloat16)
    z = jnp.asarray(np.random.default_rng(7).standard_normal((2, 12, 10, 4)).astype(np.float32))
    out_bf16 = DECODE(model_bf16, z)
    out_fp32 = DECODE(model, z)
    assert out_bf16.dtype == jnp.bfloat16
    assert bool(jnp.isfinite(out_bf16.astype(jnp.float32)).all())
    assert_close(out_bf16.astype(jnp.float32), out_fp32, BF16_TOL, "bf16 decode")
    mean_bf16, _ = ENCODE(model_bf16, jnp.asarray(images((1, 24, 16, 3), seed=8)))
    mean_fp32, _ = ENCODE(model, jnp.asarray(images((1, 24, 16, 3), seed=8)))
    assert_close(mean_bf16.astype(jnp.float32), mean_fp32, BF16_TOL, "bf16 encode mean")
