"""The zero-initialized parts are exact no-ops at the start of training."""

import dataclasses

import jax.numpy as jnp
import numpy as np
from flax import nnx

from pia_jax.models import config
from pia_jax.models.layers import Builder
from pia_jax.models.motion import MotionModule
from pia_jax.models.unet import UNetMotionModel, widen_conv_in
from tests.oracle import assert_close
from tests.helpers import inputs, jitted


def test_widened_conv_in_ignores_mask_and_condition():
    cfg4 = dataclasses.replace(config.TINY.unet, in_channels=4)
    model = UNetMotionModel(cfg4, rngs=nnx.Rngs(0))
    x = inputs(cfg4, 2, 3, 8, 12)
    before = jitted(model)(x["sample"], x["t"], x["context"])
    kernel4 = np.asarray(model.conv_in.kernel[...])

    model = widen_conv_in(model, nnx.Rngs(1))
    assert model.config.in_channels == 9 and model.conv_in.kernel.shape == (3, 3, 9, 32)
    np.testing.assert_array_equal(np.asarray(model.conv_in.kernel[...])[:, :, :4], kernel4)
    np.testing.assert_array_equal(np.asarray(model.conv_in.kernel[...])[:, :, 4:], 0)
    run = jitted(model)
    rng = np.random.default_rng(0)
    for _ in range(2):  # any mask and condition: the zero channels contribute exact zeros
        mask = rng.uniform(-3, 3, (2, 3, 1, 1, 1)).astype(np.float32)
        cond = rng.standard_normal((2, 3, 8, 12, 4)).astype(np.float32) * 5
        # Tolerance 1e-6: the 9-channel conv may sum its (zero) extra terms in another order; nothing else differs.
        assert_close(run(x["sample"], x["t"], x["context"], mask, cond), before, 1e-6, "widened conv_in")


def test_fresh_motion_module_is_identity():
    mm = MotionModule(Builder(nnx.Rngs(0)), channels=32, heads=4, groups=8, max_len=32, pooled_norm=False)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2 * 5, 6, 4, 32)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(mm(x, frames=5)), np.asarray(x))
    assert not np.any(np.asarray(mm.proj_out.kernel[...])) and not np.any(np.asarray(mm.proj_out.bias[...]))
