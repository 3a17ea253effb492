"""UNet + motion modules + 9-channel condition input against diffusers' UNetMotionModel (fp32, random weights).

Tolerance: both sides compute in fp32 and differ only in summation order (conv/matmul blocking, GroupNorm and
softmax reductions); measured 1e-6..2.3e-6 of the output scale, tiny and full size. 2e-5 leaves ~10x headroom
while a wrong weight, layout, norm grouping or skip order shows up at 1e-3 or more.
"""

import dataclasses

import pytest

from pia_jax import weights
from pia_jax.models import config
from pia_jax.models.abstract import abstract_model
from pia_jax.models.unet import UNetMotionModel
from tests import torch_models as tm
from tests.helpers import UNET_TOL as TOL
from tests.helpers import inputs, jitted, load_ours
from tests.oracle import assert_close


@pytest.fixture(scope="module")
def tiny_pair():
    cfg = dataclasses.replace(config.TINY.unet, norm_semantics="diffusers")
    torch_model = tm.unet_motion(cfg)
    return cfg, torch_model, jitted(load_ours(cfg, tm.numpy_state(torch_model)))


# (batch, frames, latent h, latent w): non-square; odd sizes that are not multiples of 4 exercise the strided
# convolutions' rounding and the upsample-to-skip-size path.
@pytest.mark.parametrize("b, f, h, w", [(2, 3, 16, 24), (1, 5, 13, 10)])
def test_tiny_unet_matches_diffusers(tiny_pair, b, f, h, w):
    cfg, torch_model, ours = tiny_pair
    x = inputs(cfg, b, f, h, w)
    expected = tm.run_unet_motion(torch_model, x["sample"], x["t"], x["context"], x["mask"], x["condition"])
    got = ours(x["sample"], x["t"], x["context"], x["mask"], x["condition"])
    assert_close(got, expected, TOL, f"UNet {b}x{f}x{h}x{w}")


def test_tiny_unet_with_mid_block_motion_module_and_4_channels():
    """AnimateDiff v2 layout: 4-channel text-to-video UNet with a mid-block motion module."""
    cfg = dataclasses.replace(config.TINY.unet, norm_semantics="diffusers", in_channels=4, motion_mid_block=True)
    torch_model = tm.unet_motion(cfg, seed=1)
    ours = jitted(load_ours(cfg, tm.numpy_state(torch_model)))
    x = inputs(cfg, 2, 4, 8, 8, seed=1)
    expected = tm.run_unet_motion(torch_model, x["sample"], x["t"], x["context"])
    assert_close(ours(x["sample"], x["t"], x["context"]), expected, TOL, "UNet with mid motion module")


class Draining(dict):
    """A dict whose items are handed out once: reading one drops it, so what it held can be freed right away."""

    def __getitem__(self, key):
        return self.pop(key)


def test_full_sd15_pia_unet_matches_diffusers():
    """The real SD1.5 + PIA architecture (head dims 40/80/160, 320-1280 channels, 32 groups), random weights;
    a 16x16 latent and 2 frames keep it CPU-sized. Same fp32 tolerance argument as above.

    Memory (5 GB of fp32 weights per copy): the reference runs first, then its weights move into our model one
    tensor at a time, each torch tensor freed as it is copied, so the two full copies never coexist."""
    cfg = dataclasses.replace(config.SD15_PIA.unet, norm_semantics="diffusers")
    torch_model = tm.unet_motion(cfg)
    x = inputs(cfg, 1, 2, 16, 16)
    expected = tm.run_unet_motion(torch_model, x["sample"], x["t"], x["context"], x["mask"], x["condition"])
    state = tm.numpy_state(torch_model)
    del torch_model  # `state` holds the only references to the weights now
    abstract = abstract_model(UNetMotionModel, cfg)
    flat, problems = weights.map_keys(state, weights.DIFFUSERS_UNET, weights.param_shapes(abstract))
    assert not problems
    del state
    flat = Draining(flat)  # the only references left
    ours = jitted(weights.fill(abstract, flat))
    assert_close(ours(x["sample"], x["t"], x["context"], x["mask"], x["condition"]), expected, TOL,
                 "full-size UNet")
