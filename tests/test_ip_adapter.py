"""IP-Adapter (SD1.5) against diffusers and transformers, random weights in the real file formats: the image encoder
(tiny, and full OpenCLIP ViT-H/14 size) against transformers' CLIPVisionModelWithProjection, the UNet's decoupled
cross-attention against diffusers' UNetMotionModel after its own IP-Adapter loading, the conversion into a model
directory, and the bad inputs, each refused before any model is read."""

import dataclasses
import json
import time

import numpy as np
import pytest
import torch
from flax import nnx

from pia_jax import weights
from pia_jax.models import config
from pia_jax.models.abstract import abstract_model
from pia_jax.models.clip_vision import VIT_H_14, CLIPVisionModelWithProjection
from pia_jax.models.ip_adapter import ImageProjection, cross_attention_sites
from pia_jax.weights.convert import ip_adapter as ip_convert
from tests import torch_models as tm
from tests.helpers import UNET_TOL, jitted, load_ours
from tests.oracle import assert_close, numpy_state, randomize

# fp32 on both sides, same math; only summation order and erf/rsqrt implementations differ, as for the CLIP metric
# model (tests/test_eval_clip.py measured 3e-7 tiny, 1.4e-6 at ViT-L/14). 1e-5 of the output scale, as there.
ENCODER_TOL = 1e-5
# tiny: 48 wide, 2 layers, 32 px images in 8 px patches, exact gelu (as ViT-H), projection to 24 dims
TINY_IP = config.IPAdapterConfig(
    image_encoder=config.VisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, image_size=32, patch_size=8, hidden_act="gelu"),
    image_embed_dim=24, num_tokens=4, cross_attention_dim=config.TINY.unet.cross_attention_dim)


def torch_encoder(ip: config.IPAdapterConfig, seed=0):
    """transformers' CLIPVisionModelWithProjection, every weight random; built on the meta device and then filled,
    so that the full ViT-H/14 skips transformers' own (slow, discarded) initialisation."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection as Ref
    v = ip.image_encoder
    cfg = CLIPVisionConfig(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                           num_hidden_layers=v.num_hidden_layers, num_attention_heads=v.num_attention_heads,
                           image_size=v.image_size, patch_size=v.patch_size, layer_norm_eps=v.layer_norm_eps,
                           hidden_act=v.hidden_act, projection_dim=ip.image_embed_dim, attn_implementation="eager")
    with torch.device("meta"):
        model = Ref(cfg)
    model = model.to_empty(device="cpu")
    for name, buf in model.named_buffers():  # position_ids: to_empty leaves them uninitialised
        if name.endswith("position_ids"):
            buf.copy_(torch.arange(buf.shape[-1]).expand_as(buf))
    return randomize(model.eval(), seed)


def check_encoder(ours, ref, ip, images, seed, jit=True):
    pixels = np.random.default_rng(seed).standard_normal(
        (images, ip.image_encoder.image_size, ip.image_encoder.image_size, 3)).astype(np.float32)
    with torch.no_grad():
        expected = ref(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())).image_embeds.numpy()
    run = (lambda m, x: m(x)) if not jit else nnx.jit(lambda m, x: m(x))
    assert_close(np.asarray(run(ours, pixels)), expected, ENCODER_TOL,
                 f"{ip.image_encoder.num_hidden_layers}-layer image_embeds")


def test_tiny_image_encoder_matches_transformers_and_loads_strictly():
    ref = torch_encoder(TINY_IP, seed=1)
    state = numpy_state(ref)
    load = lambda sd: weights.load_state_dict(abstract_model(CLIPVisionModelWithProjection, TINY_IP), sd,  # noqa: E731
                                              ip_convert.TRANSFORMERS_CLIP_VISION)
    check_encoder(load(state), ref, TINY_IP, 3, seed=0)
    # the activation is the config's: quick_gelu here would be a different model (measured error ~1e-2)
    quick = dataclasses.replace(TINY_IP, image_encoder=dataclasses.replace(TINY_IP.image_encoder,
                                                                           hidden_act="quick_gelu"))
    wrong = weights.load_state_dict(abstract_model(CLIPVisionModelWithProjection, quick), state,
                                    ip_convert.TRANSFORMERS_CLIP_VISION)
    with pytest.raises(AssertionError):
        check_encoder(wrong, ref, TINY_IP, 3, seed=0)
    broken = {k: v for k, v in state.items() if k != "visual_projection.weight"}
    with pytest.raises(weights.WeightLoadError, match="visual_projection"):
        load(broken)


def test_full_vit_h_image_encoder_matches_transformers():
    """OpenCLIP ViT-H/14 (h94/IP-Adapter models/image_encoder's architecture): 32 layers x 1280, exact gelu, 632M
    parameters; one image, our side op by op (each op compiles once for all 32 identical layers)."""
    start = time.perf_counter()
    ip = config.IPAdapterConfig()
    assert ip.image_encoder == VIT_H_14 and ip.image_embed_dim == 1024
    ref = torch_encoder(ip, seed=2)
    assert sum(p.numel() for p in ref.parameters()) > 632e6
    ours = weights.load_state_dict(abstract_model(CLIPVisionModelWithProjection, ip), numpy_state(ref),
                                   ip_convert.TRANSFORMERS_CLIP_VISION)
    check_encoder(ours, ref, ip, 1, seed=3, jit=False)
    print(f"ViT-H/14 parity in {time.perf_counter() - start:.1f} s")
