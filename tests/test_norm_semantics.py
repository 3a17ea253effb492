"""`pia` GroupNorm semantics against the reference computation.

The PIA reference applies torch GroupNorm to 5-D (b, c, f, h, w) tensors in its ResNets and conv_norm_out
(statistics pooled over the clip's frames) and per frame in the spatial transformers and motion modules. We build
exactly that in PyTorch by wrapping the norms of diffusers' UNetMotionModel, and compare in fp32 (tolerance as in
test_unet.py: only summation order differs).
"""

import dataclasses

from pia_jax.models import config
from tests import torch_models as tm
from tests.oracle import assert_close, rel_err
from tests.helpers import UNET_TOL as TOL
from tests.helpers import inputs, jitted, load_ours


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
