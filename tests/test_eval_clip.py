"""The CLIP metric model against transformers' CLIPModel (random weights, tiny and full ViT-L/14 size), its
conversion into our format, and the image preprocessing against CLIPImageProcessor."""

import dataclasses
import json
import time

import numpy as np
import pytest
import torch
from flax import nnx

from pia_jax import weights
from pia_jax.eval.clip import TRANSFORMERS_CLIP, CLIPConfig, CLIPModel, normalize
from pia_jax.eval.clip_dir import ClipDirError, convert_clip, load_clip
from pia_jax.eval.preprocess import clip_preprocess
from pia_jax.eval.scores import CLIPScorer
from pia_jax.models.abstract import abstract_model
from pia_jax.weights import model_dir
from tests.eval_assets import TINY_CLIP, random_ids, torch_clip, write_transformers_clip
from tests.oracle import assert_close, numpy_state

# fp32 on both sides with the same math; only summation order and the sigmoid/rsqrt implementations differ. Measured
# max errors: 3e-7..4e-7 (tiny) and 0.9e-6..1.4e-6 (ViT-L/14, 24 + 12 layers) of the output scale. 1e-5 leaves room
# for other BLAS/XLA builds; real bugs are far larger: quick_gelu's 1.702 as 1.7 gives ~6e-4 (measured on the text
# tower), a causal vision tower 0.8, a missed pre_layrnorm 0.55 (measured, tiny).
FP32_TOL = 1e-5


def reference(ref, pixels_NHWC, ids):
    """transformers' unit image and text embeddings, and their cosine matrix (logits / temperature)."""
    with torch.no_grad():
        out = ref(input_ids=torch.from_numpy(ids.astype(np.int64)),
                  pixel_values=torch.from_numpy(pixels_NHWC.transpose(0, 3, 1, 2).copy()))
        return out.image_embeds.numpy(), out.text_embeds.numpy(), (out.logits_per_image / ref.logit_scale.exp()).numpy()


def check_parity(model, ref, cfg: CLIPConfig, images, lengths, seed, length=77, jit=True):
    """`images` random images and one text per entry of `lengths` (tokens before EOS), `length` ids long.
    jit=False runs op by op: at full size each op compiles once for all 24 identical layers, far cheaper than
    compiling the whole 36-layer graph."""
    rng = np.random.default_rng(seed)
    pixels = rng.standard_normal((images, cfg.vision.image_size, cfg.vision.image_size, 3)).astype(np.float32)
    ids = random_ids(cfg, lengths, seed)[:, :length]
    ids[:, -1] = cfg.eos_token_id  # every sequence ends in EOS, as the tokenizer guarantees
    image_ref, text_ref, cos_ref = reference(ref, pixels, ids)
    run = lambda m, x, t: (normalize(m.get_image_features(x)), normalize(m.get_text_features(t)))  # noqa: E731
    image, text = map(np.asarray, (nnx.jit(run) if jit else run)(model, pixels, ids))
    name = f"{cfg.vision.num_hidden_layers}-layer"
    assert_close(image, image_ref, FP32_TOL, f"{name} image embeddings")
    assert_close(text, text_ref, FP32_TOL, f"{name} text embeddings")
    # cosines lie in [-1, 1]: an absolute bound (random-weight cosines are small, so a relative one would be loose
    # or flaky); measured 1.7e-7 (tiny), 6e-8 (ViT-L/14)
    err = np.abs(image @ text.T - cos_ref).max()
    print(f"{name} image-text cosines: max abs error {err:.3g} (tol {FP32_TOL:g})")
    assert err <= FP32_TOL, f"{name} image-text cosines: max abs error {err:.3g}"


def test_tiny_parity_and_strict_keys():
    ref = torch_clip(TINY_CLIP, seed=3)
    state = numpy_state(ref)
    abstract = lambda: abstract_model(CLIPModel, TINY_CLIP)  # noqa: E731
    model = weights.load_state_dict(abstract(), state, TRANSFORMERS_CLIP)
    check_parity(model, ref, TINY_CLIP, 3, [5, 20, 76], seed=0)
    # strict: a missing tensor and an unknown one are both reported, in one error
    broken = {k: v for k, v in state.items() if k != "visual_projection.weight"}
    broken["vision_model.extra.weight"] = np.zeros(3)
    with pytest.raises(weights.WeightLoadError, match="(?s)vision_model.extra.*missing.*visual_projection"):
        weights.load_state_dict(abstract(), broken, TRANSFORMERS_CLIP)


def test_full_size_parity():
    """ViT-L/14 (openai/clip-vit-large-patch14's architecture): 24 vision + 12 text layers, 428M parameters."""
    cfg = CLIPConfig()
    start = time.perf_counter()
    ref = torch_clip(cfg, seed=1)
    assert sum(p.numel() for p in ref.parameters()) > 427e6
    model = weights.load_state_dict(abstract_model(CLIPModel, cfg), numpy_state(ref), TRANSFORMERS_CLIP)
    # one image (~160 GFLOP per side) and two 16-token texts keep this at the cost of a few forward passes
    check_parity(model, ref, cfg, 1, [5, 12], seed=1, length=16, jit=False)
    print(f"full-size parity in {time.perf_counter() - start:.1f} s")


def test_convert_and_load(tmp_path):
    src = tmp_path / "clip-src"
    ref = write_transformers_clip(src, seed=5)
    out = convert_clip(src, tmp_path / "clip")
    meta = json.loads((out / "config.json").read_text())
    assert meta["format"] == "pia-jax-clip" and meta["model"]["eos_token_id"] == TINY_CLIP.eos_token_id
    model, tokenizer = load_clip(out)
    assert model.config == TINY_CLIP and tokenizer.eos_token_id == TINY_CLIP.eos_token_id
    check_parity(model, ref, TINY_CLIP, 2, [3, 9], seed=7)
    # the scorer's text path: our tokenizer output, pooled at the first EOS, against transformers on the same ids
    ids = np.asarray(tokenizer(["hello cat"], padding="max_length", max_length=77)["input_ids"])
    with torch.no_grad():
        expected = ref.get_text_features(input_ids=torch.from_numpy(ids))
        expected = getattr(expected, "pooler_output", expected)  # transformers 5 returns an output object
    expected = (expected / expected.norm(dim=-1, keepdim=True)).numpy()
    assert_close(CLIPScorer(model, tokenizer).embed_texts(["hello cat"]), expected, FP32_TOL, "scorer text")
    with pytest.raises(FileExistsError, match="--force"):
        convert_clip(src, out)
    # the same weights as a pickled pytorch_model.bin (read with torch.load(weights_only=True)) convert identically
    write_transformers_clip(tmp_path / "bin-src", seed=5, bin_format=True)
    assert not list((tmp_path / "bin-src").glob("*.safetensors"))
    # and so do safetensors shards with their index (as transformers saves large models)
    write_transformers_clip(tmp_path / "sharded-src", seed=5, shard="100KB")
    assert len(list((tmp_path / "sharded-src").glob("model-*.safetensors"))) > 1
    for variant in ("bin", "sharded"):
        other, _ = load_clip(convert_clip(tmp_path / f"{variant}-src", tmp_path / f"clip-{variant}"))
        for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model, nnx.Param)),
                                     nnx.to_flat_state(nnx.state(other, nnx.Param))):
            np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(path))


def test_convert_refuses_bad_sources(tmp_path):
    with pytest.raises(ClipDirError, match="not a folder"):
        convert_clip(tmp_path / "nowhere", tmp_path / "out")
    src = tmp_path / "src"
    write_transformers_clip(src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["vision_config"]["hidden_act"] = "gelu"
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ClipDirError, match="quick_gelu"):
        convert_clip(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_preprocessing_matches_clip_image_processor():
    """Bit-exact: the same PIL bicubic resize, crop offsets and float32 arithmetic (measured difference 0)."""
    from transformers import CLIPImageProcessor
    processor = CLIPImageProcessor()  # openai/clip-vit-large-patch14's settings are the defaults
    rng = np.random.default_rng(0)
    cfg = CLIPConfig()
    # landscape, portrait, square, odd sizes, smaller than 224 (upscaled), long side truncation (225 x 799)
    for h, w in [(300, 500), (512, 320), (224, 224), (225, 799), (37, 41), (64, 64)]:
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        expected = processor(images=image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
        ours = clip_preprocess(image, resize=cfg.resize, crop=cfg.vision.image_size, mean=cfg.image_mean,
                               std=cfg.image_std)[0]
        np.testing.assert_array_equal(ours, expected, err_msg=f"{h}x{w}")
    with pytest.raises(ValueError, match="uint8"):
        clip_preprocess(np.zeros((8, 8, 3), np.float32))


def test_config_round_trip():
    from pia_jax.eval.clip_dir import _config_from_dict, _config_to_dict
    for cfg in (CLIPConfig(), TINY_CLIP, dataclasses.replace(TINY_CLIP, image_mean=(0.5, 0.5, 0.5))):
        assert _config_from_dict(json.loads(json.dumps(_config_to_dict(cfg)))) == cfg
