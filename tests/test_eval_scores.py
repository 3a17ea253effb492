"""CLIP alignment scores through the whole path (preprocessing, tokenizer, model) against transformers, and their
known answers on hand-made videos."""

import numpy as np
import pytest
import torch

from pia_jax.eval.clip_dir import convert_clip
from pia_jax.eval.scores import CLIPScorer, alignment_scores, scaled, score_video
from tests.eval_assets import write_transformers_clip


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """(our scorer, the transformers model it was converted from, the source folder). The source's config says
    `eos_token_id: 2` as openai/clip-vit-large-patch14's does: transformers then pools the text at the largest id,
    we at the tokenizer's first EOS, the same token for a CLIP tokenizer (EOS is its largest id)."""
    root = tmp_path_factory.mktemp("clip")
    ref = write_transformers_clip(root / "src", seed=11, legacy_eos=True)
    assert ref.config.text_config.eos_token_id == 2
    return CLIPScorer.load(convert_clip(root / "src", root / "clip")), ref, root / "src"


def test_alignment_matches_transformers(clip):
    """The oracle: CLIPImageProcessor + CLIPTokenizer + CLIPModel from the same source folder, cosines by hand."""
    from transformers import CLIPImageProcessor, CLIPTokenizer
    scorer, ref, src = clip
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (5, 40, 56, 3), dtype=np.uint8)
    image = rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)
    processor, tokenizer = CLIPImageProcessor.from_pretrained(src), CLIPTokenizer.from_pretrained(src)
    with torch.no_grad():
        pixels = processor(images=[*frames, image], return_tensors="pt")["pixel_values"]
        img = ref.get_image_features(pixel_values=pixels)
        txt = ref.get_text_features(**tokenizer(["hello cat"], padding="max_length", max_length=77,
                                                return_tensors="pt"))
    img, txt = (getattr(x, "pooler_output", x) for x in (img, txt))  # transformers 5 returns output objects
    img, txt = (x / x.norm(dim=-1, keepdim=True) for x in (img, txt))
    e_frames, e_image, e_text = img[:5].numpy(), img[5].numpy(), txt[0].numpy()
    expected = {"image_alignment": e_frames @ e_image, "text_alignment": e_frames @ e_text,
                "frame_consistency": (e_frames[1:] * e_frames[:-1]).sum(-1)}
    ours = alignment_scores(scorer, frames, image, "hello cat")
    for name, cos in expected.items():
        # cosines in [-1, 1], fp32 on both sides: absolute 1e-5 (measured ~1e-7); the scaled value is 250x
        assert ours[name] == pytest.approx(cos.mean(), abs=1e-5), name
        assert ours[f"{name}_scaled"] == pytest.approx(250 * np.maximum(cos, 0).mean(), abs=250e-5), name


def test_known_answers(clip):
    scorer = clip[0]
    image = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    still = np.stack([image] * 4)  # a video equal to the image
    scores = score_video(scorer, still, image, "hello")
    # unit vectors against themselves: cos = 1 up to fp32 rounding of the normalisation
    assert scores["frame_consistency"] == pytest.approx(1, abs=1e-6)
    assert scores["image_alignment"] == pytest.approx(1, abs=1e-6)
    assert scores["image_alignment_scaled"] == pytest.approx(250, abs=250e-6)
    assert scores["psnr"] == float("inf") and scores["ssim"] == 1.0
    assert scores["flow_mean"] < 0.005 and scores["dynamic"] == 0
    assert -1 <= scores["text_alignment"] <= 1
    # a larger input image is fitted to the frames for PSNR/SSIM; CLIP sees it at its own size
    big = np.repeat(np.repeat(image, 2, 0), 2, 1)
    assert score_video(None, still, big, "hello")["psnr"] > 20
    assert "image_alignment" not in score_video(None, still, big, "hello")
    # given the exact conditioning pixels (what the sampler was fed), fidelity compares with those instead
    assert score_video(None, still, big, "hello", condition=image)["psnr"] == float("inf")
    assert np.isnan(alignment_scores(scorer, still[:1], image, "hello")["frame_consistency"])


def test_scaled_is_clipscore():
    # 100 * 2.5 * mean(max(cos, 0)): PIA's 225.9 / 63.68 correspond to mean cosines 0.9036 / 0.2547
    assert scaled([0.9, -0.2]) == pytest.approx(112.5)
    assert scaled([0.9036]) == pytest.approx(225.9) and scaled([0.25472]) == pytest.approx(63.68)
