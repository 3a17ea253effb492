"""IP-Adapter (SD1.5) against diffusers and transformers, random weights in the real file formats: the image encoder
(tiny, and full OpenCLIP ViT-H/14 size) against transformers' CLIPVisionModelWithProjection, the UNet's decoupled
cross-attention against diffusers' UNetMotionModel after its own IP-Adapter loading, the conversion into a model
directory, and the bad inputs, each refused before any model is read."""

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from pia_jax import weights
from pia_jax.models import config
from pia_jax.models.abstract import abstract_model
from pia_jax.models.clip_vision import VIT_H_14, CLIPVisionModelWithProjection
from pia_jax.models.ip_adapter import (
    ImageProjection,
    append_image_tokens,
    cross_attention_sites,
)
from pia_jax.weights.convert import ip_adapter as ip_convert
from tests import torch_models as tm
from tests.helpers import UNET_TOL, load_ours
from tests.oracle import assert_close, numpy_state

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
    from transformers import CLIPVisionConfig
    from transformers import CLIPVisionModelWithProjection as Ref
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
    return fast_randomize(model.eval(), seed)


POOL = 1_000_003  # prime: no tensor row of these models (widths 588..5120) repeats the one before it


def fast_randomize(module, seed):
    """`tests.oracle.randomize`'s distribution (norm weights ~1, biases ~0, matrices ~ fan_in^-0.5) with each tensor
    a slice of one random pool at a random offset: copies instead of 632M draws (25 s under load)."""
    rng = np.random.default_rng(seed)
    pool = torch.from_numpy(rng.standard_normal(POOL).astype(np.float32))
    with torch.no_grad():
        for name, p in module.named_parameters():
            start, n = int(rng.integers(POOL)), p.numel()
            values = pool.repeat(-(-(start + n) // POOL))[start:start + n].reshape(p.shape)
            if p.ndim == 1:
                base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
                p.copy_(base + 0.1 * values)
            else:
                p.copy_(values * float(np.prod(p.shape[1:])) ** -0.5)
    return module


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
    load = lambda sd: weights.load_state_dict(abstract_model(CLIPVisionModelWithProjection, TINY_IP), sd,
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


def random_adapter(unet_cfg: config.UNetConfig, ip: config.IPAdapterConfig, seed=0) -> dict:
    """An ip-adapter_sd15.bin-layout state ({"image_proj": ..., "ip_adapter": {"1.to_k_ip.weight", ...}}) for a UNet
    of `unet_cfg`, random torch tensors of the usual scales."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape, s=1.0: s * torch.randn(shape, generator=g)
    d, n = ip.cross_attention_dim, ip.num_tokens
    image_proj = {"proj.weight": rand(n * d, ip.image_embed_dim, s=ip.image_embed_dim ** -0.5),
                  "proj.bias": rand(n * d, s=0.1), "norm.weight": 1 + rand(d, s=0.1), "norm.bias": rand(d, s=0.1)}
    layers = {}
    for k, site in enumerate(cross_attention_sites(unet_cfg)):
        blocks, where = unet_cfg.block_out_channels, site.split(".")
        c = blocks[-1] if where[0] == "mid_block" else (blocks if where[0] == "down_blocks" else blocks[::-1])[
            int(where[1])]
        for name in ("to_k_ip", "to_v_ip"):
            layers[f"{2 * k + 1}.{name}.weight"] = rand(c, d, s=d ** -0.5)
    return {"image_proj": image_proj, "ip_adapter": layers}


def run_diffusers(model, x, image_embeds, scale):
    """diffusers' UNetMotionModel with IP-Adapter processors at `scale` on our channels-last inputs."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
    for proc in model.attn_processors.values():
        if isinstance(proc, IPAdapterAttnProcessor2_0):
            proc.scale = [scale]
    f = x["sample"].shape[1]
    sample = torch.from_numpy(np.concatenate([x["sample"], np.broadcast_to(x["mask"], x["sample"].shape[:4] + (1,)),
                                              np.broadcast_to(x["condition"], x["sample"].shape)], -1))
    with torch.no_grad():
        out = model(sample.permute(0, 4, 1, 2, 3), torch.tensor(x["t"]),
                    torch.from_numpy(x["context"]).repeat_interleave(f, dim=0),
                    added_cond_kwargs={"image_embeds": [torch.from_numpy(image_embeds)[:, None]]}).sample
    return out.permute(0, 2, 3, 4, 1).numpy()


def test_unet_decoupled_cross_attention_matches_diffusers(tmp_path):
    """The tiny UNet + IP-Adapter against diffusers' UNetMotionModel after its own `_load_ip_adapter_weights` of the
    same .bin (so the layer numbering is diffusers', not ours), at a different scale per video. Tolerance: the UNet
    parity tests' UNET_TOL (2e-5 of the output scale; same fp32 argument, tests/test_unet.py)."""
    from tests.helpers import inputs
    cfg = dataclasses.replace(config.TINY.unet, norm_semantics="diffusers")
    ref = tm.unet_motion(cfg, seed=4)
    base_state = numpy_state(ref)
    adapter = random_adapter(cfg, TINY_IP, seed=5)
    torch.save(adapter, tmp_path / "ip-adapter.bin")
    x = inputs(cfg, 2, 3, 8, 12, seed=6)
    embeds = np.random.default_rng(7).standard_normal((2, TINY_IP.image_embed_dim)).astype(np.float32)
    without = tm.run_unet_motion(ref, x["sample"], x["t"], x["context"], x["mask"], x["condition"])
    ref._load_ip_adapter_weights([adapter])
    scales = (0.6, 1.3)
    expected = np.stack([run_diffusers(ref, x, embeds, s)[i] for i, s in enumerate(scales)])

    image_proj, layers, _, _ = ip_convert.split_adapter(ip_convert.read_adapter_file(tmp_path / "ip-adapter.bin"),
                                                        "test")
    ip_cfg = dataclasses.replace(cfg, ip_adapter_tokens=TINY_IP.num_tokens)
    graphdef, state = nnx.split(load_ours(ip_cfg, {**base_state, **ip_convert.unet_ip_state(layers, ip_cfg)}))
    run = jax.jit(lambda state, *args, **kw: nnx.merge(graphdef, state)(*args, **kw))
    ours = lambda *args, **kw: np.asarray(run(state, *args, **kw))
    proj = weights.load_state_dict(abstract_model(ImageProjection, TINY_IP), image_proj, ip_convert.IMAGE_PROJ)
    tokens = np.asarray(proj(embeds))
    args = (x["sample"], x["t"], x["context"], x["mask"], x["condition"])
    assert_close(ours(*args, image_tokens=tokens, ip_adapter_scale=np.asarray(scales, np.float32)), expected,
                 UNET_TOL, "UNet + IP-Adapter")
    # scale 0 is the UNet without an IP-Adapter, as diffusers' model before loading it (same program: one compile)
    assert_close(ours(*args, image_tokens=tokens, ip_adapter_scale=np.zeros(2, np.float32)), without, UNET_TOL,
                 "UNet + IP-Adapter at scale 0")
    # no image prompt (None): zero image rows, whose attention adds exactly 0 (uniform weights over zero values)
    context = append_image_tokens(jnp.asarray(x["context"]), None, 1.0, TINY_IP.num_tokens)
    assert context.shape == (2, 7 + 2 * TINY_IP.num_tokens, cfg.cross_attention_dim) and not np.any(context[:, 7:])
