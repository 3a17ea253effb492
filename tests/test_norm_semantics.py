"""`pia` GroupNorm semantics against the reference computation.

The PIA reference applies torch GroupNorm to 5-D (b, c, f, h, w) tensors in its ResNets and conv_norm_out
(statistics pooled over the clip's frames) and per frame in the spatial transformers and motion modules. We build
exactly that in PyTorch by wrapping the norms of diffusers' UNetMotionModel, and compare in fp32 (tolerance as in
test_unet.py: only summation order differs).
"""

import dataclasses

import numpy as np
import torch
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D

from pia_jax import config
from tests import torch_models as tm
from tests.oracle import assert_close, rel_err
from tests.test_unet import TOL, inputs, jitted, load_ours


class Over5D(torch.nn.Module):
    """GroupNorm of a (b*f, c, h, w) tensor computed on its (b, c, f, h, w) view: stats pooled over frames."""

    def __init__(self, norm, frames):
        super().__init__()
        self.norm, self.frames = norm, frames

    def forward(self, x):
        bf, c, h, w = x.shape
        x5 = x.reshape(bf // self.frames, self.frames, c, h, w).permute(0, 2, 1, 3, 4)
        return self.norm(x5).permute(0, 2, 1, 3, 4).reshape(bf, c, h, w)


class PerFrame(torch.nn.Module):
    """GroupNorm of a (b, c, f, h, w) tensor applied to each frame separately."""

    def __init__(self, norm):
        super().__init__()
        self.norm = norm

    def forward(self, x):
        b, c, f, h, w = x.shape
        y = self.norm(x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w))
        return y.reshape(b, f, c, h, w).permute(0, 2, 1, 3, 4)


def pia_reference(model, frames):
    for module in list(model.modules()):
        if isinstance(module, ResnetBlock2D):
            module.norm1, module.norm2 = Over5D(module.norm1, frames), Over5D(module.norm2, frames)
        elif isinstance(module, AnimateDiffTransformer3D):
            module.norm = PerFrame(module.norm)
    model.conv_norm_out = Over5D(model.conv_norm_out, frames)
    return model


def test_pia_norm_semantics_match_reference_computation():
    cfg = config.TINY.unet
    assert cfg.norm_semantics == "pia"  # the default
    torch_model = tm.unet_motion(cfg, seed=2)
    state = tm.numpy_state(torch_model)
    ours = jitted(load_ours(cfg, state))
    x = inputs(cfg, 2, 4, 12, 16, seed=2)
    args = (x["sample"], x["t"], x["context"], x["mask"], x["condition"])
    diffusers_out = tm.run_unet_motion(torch_model, *args)
    reference = tm.run_unet_motion(pia_reference(torch_model, frames=4), *args)
    got = ours(*args)
    assert_close(got, reference, TOL, "pia semantics")
    # the two semantics really differ, so the comparison above is not vacuous
    assert rel_err(got, diffusers_out) > 1e-3
    ours_diffusers = jitted(load_ours(dataclasses.replace(cfg, norm_semantics="diffusers"), state))
    assert_close(ours_diffusers(*args), diffusers_out, TOL, "diffusers semantics")
