"""IP-Adapter (SD1.5) against diffusers and transformers, random weights in the real file formats: the image encoder
(tiny, and full OpenCLIP ViT-H/14 size) against transformers' CLIPVisionModelWithProjection, the UNet's decoupled
cross-attention against diffusers' UNetMotionModel after its own IP-Adapter loading, the conversion into a model
directory, and the bad inputs, each refused before any model is read."""

import dataclasses
import json
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
    # per-frame text (b, f, T, D): every frame gets the same image rows as the per-video context
    per_video = np.asarray(append_image_tokens(jnp.asarray(x["context"]), tokens, 0.6, TINY_IP.num_tokens))
    per_frame = append_image_tokens(jnp.asarray(np.repeat(x["context"][:, None], 3, 1)), tokens, 0.6,
                                    TINY_IP.num_tokens)
    np.testing.assert_array_equal(per_frame, np.repeat(per_video[:, None], 3, 1))


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """A tiny SD1.5 diffusers folder, a PIA condition adapter, an IP-Adapter .bin and .safetensors of the same
    weights, and its image encoder folder as transformers saves one."""
    from safetensors.torch import save_file
    root = tmp_path_factory.mktemp("ip-src")
    tm.write_diffusers_base(root / "sd", config.TINY, seed=8)
    tm.write_motion_adapter(root / "adapter", config.TINY.unet, seed=9)
    adapter = random_adapter(config.TINY.unet, TINY_IP, seed=10)
    torch.save(adapter, root / "ip-adapter.bin")
    save_file({f"{g}.{k}": v.contiguous() for g in adapter for k, v in adapter[g].items()},
              str(root / "ip-adapter.safetensors"))
    encoder = torch_encoder(TINY_IP, seed=11)
    encoder.save_pretrained(str(root / "image_encoder"))
    return root, adapter, encoder


def request(root, out, **kw):
    from pia_jax.weights.convert.build import Request
    kw = {"ip_adapter": root / "ip-adapter.bin", "image_encoder": root / "image_encoder", **kw}
    return Request(base=root / "sd", motion=root / "adapter", out=out, motion_heads=4, **kw)


def test_convert_adds_the_ip_adapter_to_the_model_directory(src, tmp_path):
    from pia_jax.models import IP_ADAPTER_PARTS, PARTS
    from pia_jax.weights import model_dir
    from pia_jax.weights.convert.build import convert
    root, adapter, encoder = src
    logs = []
    out = convert(request(root, tmp_path / "model"), log=logs.append)
    assert any(line.startswith("ip-adapter:") and "4 image tokens" in line for line in logs)
    md = model_dir.load_model_dir(out, parts=PARTS + IP_ADAPTER_PARTS, tokenizer=False)
    assert md.config.ip_adapter == TINY_IP and md.config.unet.ip_adapter_tokens == 4
    assert json.loads((out / "config.json").read_text())["parts"] == sorted(PARTS + IP_ADAPTER_PARTS)
    roles = [s["role"] for s in json.loads((out / "sources.json").read_text())["sources"]]
    assert roles[:2] == ["ip_adapter", "image_encoder"]
    check_encoder(md.image_encoder, encoder, TINY_IP, 2, seed=12)
    # each file tensor where the rules put it (our layouts: Linear kernels are (in, out)); layer 2k+1 -> site k
    flat = {p: model_dir.flat_params(getattr(md, p)) for p in ("unet", "image_proj")}
    np.testing.assert_array_equal(flat["image_proj"]["proj.kernel"], adapter["image_proj"]["proj.weight"].numpy().T)
    np.testing.assert_array_equal(flat["image_proj"]["norm.bias"], adapter["image_proj"]["norm.bias"].numpy())
    for k, site in enumerate(cross_attention_sites(md.config.unet)):
        for name in ("to_k_ip", "to_v_ip"):
            np.testing.assert_array_equal(flat["unet"][f"{site}.attn2.{name}.kernel"],
                                          adapter["ip_adapter"][f"{2 * k + 1}.{name}.weight"].numpy().T)
    # the .safetensors form of the same weights converts to the same model
    again = convert(request(root, tmp_path / "st", ip_adapter=root / "ip-adapter.safetensors"), log=lambda _: None)
    for part in ("unet", "image_proj", "image_encoder"):
        a, b = (model_dir.flat_params(getattr(model_dir.load_model_dir(d, parts=(part,), tokenizer=False), part))
                for d in (out, again))
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), part
    # the model without its IP-Adapter parts is refused at load (strict: the config says it has them)
    (out / "image_proj.safetensors").unlink()
    with pytest.raises(model_dir.ModelDirError, match="incomplete"):
        model_dir.load_model_dir(out, tokenizer=False)


def _save(state: dict, path):
    torch.save({g: {k: torch.as_tensor(v) for k, v in d.items()} for g, d in state.items()}, path)
    return path


def bad_adapters(root, tmp):
    """(case, request kwargs, expected message) of inputs refused before any model is read."""
    plain = random_adapter(config.TINY.unet, TINY_IP, seed=13)
    sdxl = {"image_proj": {"proj.weight": torch.zeros(4 * 2048, 1280), "proj.bias": torch.zeros(4 * 2048),
                           "norm.weight": torch.ones(2048), "norm.bias": torch.zeros(2048)},
            "ip_adapter": {"1.to_k_ip.weight": torch.zeros(8, 2048), "1.to_v_ip.weight": torch.zeros(8, 2048)}}
    vit_h = {"image_proj": {"proj.weight": torch.zeros(4 * 32, 1024), "proj.bias": torch.zeros(128),
                            "norm.weight": torch.ones(32), "norm.bias": torch.zeros(32)},
             "ip_adapter": plain["ip_adapter"]}
    (tmp / "vit-l").mkdir()  # openai/clip-vit-large-patch14's vision tower: 768-dim embeddings
    (tmp / "vit-l" / "config.json").write_text(json.dumps({"hidden_size": 1024, "num_hidden_layers": 24,
                                                           "hidden_act": "quick_gelu", "projection_dim": 768}))
    plus = {"image_proj": {"latents": torch.zeros(1, 16, 32), "proj_in.weight": torch.zeros(32, 48)},
            "ip_adapter": plain["ip_adapter"]}
    faceid = {"image_proj": {"proj.0.weight": torch.zeros(64, 512), "proj.2.weight": torch.zeros(128, 64),
                             "norm.weight": torch.ones(32), "norm.bias": torch.zeros(32)},
              "ip_adapter": {**plain["ip_adapter"], "1.to_k_lora.down.weight": torch.zeros(4, 32)}}
    truncated = tmp / "truncated.bin"
    truncated.write_bytes((root / "ip-adapter.bin").read_bytes()[:5000])
    return [("sdxl", {"ip_adapter": _save(sdxl, tmp / "sdxl.bin")}, "SDXL IP-Adapter"),
            ("vit-l encoder", {"ip_adapter": _save(vit_h, tmp / "vit-h.bin"), "image_encoder": tmp / "vit-l"},
             "projects to 768 dims .* takes 1024-dim image embeddings"),
            ("plus", {"ip_adapter": _save(plus, tmp / "plus.bin")}, "IP-Adapter Plus"),
            ("faceid", {"ip_adapter": _save(faceid, tmp / "faceid.bin")}, "IP-Adapter FaceID"),
            ("truncated", {"ip_adapter": truncated}, "truncated"),
            ("no encoder", {"image_encoder": None}, "--ip-adapter and --image-encoder go together")]


def test_bad_ip_adapters_are_refused_before_any_model_is_read(src, tmp_path, monkeypatch):
    from pia_jax.weights.convert import build
    root = src[0]

    def no_base(*_):
        raise AssertionError("the base model was read before the IP-Adapter was checked")

    monkeypatch.setattr(build, "read_base", no_base)
    for case, kw, message in bad_adapters(root, tmp_path):
        with pytest.raises(ValueError, match=message):
            build.convert(request(root, tmp_path / "out", **kw), log=lambda _: None)
        assert not (tmp_path / "out").exists(), case
