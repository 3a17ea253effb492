"""`pia` GroupNorm semantics against the reference computation.

The PIA reference applies torch GroupNorm to 5-D (b, c, f, h, w) tensors in its ResNets and conv_norm_out
(statistics pooled over the clip's frames) and per frame in the spatial transformers and motion modules. We build
exactly that in PyTorch by wrapping the norms of diffusers' UNetMotionModel, and compare in fp32 (tolerance as in
test_unet.py: only summation order differs).
"""

import dataclasses

import jax
import numpy as np
from flax import nnx

from pia_jax.models import config
from tests import torch_models as tm
from tests.helpers import UNET_TOL as TOL
from tests.helpers import inputs, jitted, load_ours
from tests.oracle import assert_close, rel_err


def test_pia_norm_semantics_match_reference_computation():
    cfg = config.TINY.unet
    assert cfg.norm_semantics == "pia"  # the default
    torch_model = tm.unet_motion(cfg, seed=2)
    state = tm.numpy_state(torch_model)
    ours = jitted(load_ours(cfg, state))
    x = inputs(cfg, 2, 4, 12, 16, seed=2)
    args = (x["sample"], x["t"], x["context"], x["mask"], x["condition"])
    diffusers_out = tm.run_unet_motion(torch_model, *args)
    reference = tm.run_unet_motion(tm.pia_reference(torch_model, frames=4), *args)
    got = ours(*args)
    assert_close(got, reference, TOL, "pia semantics")
    # the two semantics really differ, so the comparison above is not vacuous
    assert rel_err(got, diffusers_out) > 1e-3
    ours_diffusers = jitted(load_ours(dataclasses.replace(cfg, norm_semantics="diffusers"), state))
    assert_close(ours_diffusers(*args), diffusers_out, TOL, "diffusers semantics")


def test_pia_norms_on_frame_chunks_match_reference_computation():
    """With `frame_chunk` the per-frame layers run on chunks of frames while the frame-pooled ResNets and
    conv_norm_out keep their statistics over all frames: 5 frames in chunks of 2 (the last chunk padded) give the
    reference's pooled result within TOL (only summation order differs)."""
    cfg = config.TINY.unet
    torch_model = tm.unet_motion(cfg, seed=3)
    graphdef, params = nnx.split(load_ours(cfg, tm.numpy_state(torch_model)))
    x = inputs(cfg, 2, 5, 12, 16, seed=3)
    args = (x["sample"], x["t"], x["context"], x["mask"], x["condition"])
    reference = tm.run_unet_motion(tm.pia_reference(torch_model, frames=5), *args)
    chunked = jax.jit(lambda params, *args: nnx.merge(graphdef, params)(*args, frame_chunk=2))
    assert_close(np.asarray(chunked(params, *args)), reference, TOL, "pia semantics on frame chunks")
