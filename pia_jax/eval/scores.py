"""Alignment scores of a video with CLIP, and `score_video`, every metric of one video at once.

Per video, with unit CLIP embeddings e(frame_f), e(image), e(prompt):
  image_alignment   = mean_f cos(e(frame_f), e(image))       the input image against every frame
  text_alignment    = mean_f cos(e(frame_f), e(prompt))
  frame_consistency = mean_f cos(e(frame_f), e(frame_f+1))   adjacent frames
Each is also given on the scale PIA's table uses, `*_scaled` = 100 * 2.5 * mean_f max(cos, 0): CLIPScore's
w = 2.5 and clamp at 0 (Hessel et al. 2021, documented), times 100 (inferred: it turns PIA's 225.9 and 63.68
into mean cosines 0.904 and 0.255, typical CLIP values; no evaluation code was released to confirm it).
"""

import jax
import numpy as np
from flax import nnx

from pia_jax.eval.clip import CLIPModel, normalize
from pia_jax.eval.preprocess import clip_preprocess

CLIPSCORE_W, PERCENT = 2.5, 100.0
BATCH = 16  # images per compiled call: every call has this shape, so the model compiles once


def scaled(cosines) -> float:
    """100 * 2.5 * mean(max(cos, 0)): CLIPScore's scale, the one PIA's AnimateBench numbers are on."""
    return float(PERCENT * CLIPSCORE_W * np.maximum(np.asarray(cosines, np.float64), 0).mean())


class CLIPScorer:
    """Unit CLIP embeddings of uint8 images and of prompts, from a loaded `CLIPModel` and its tokenizer."""

    def __init__(self, model: CLIPModel, tokenizer):
        self.config, self.tokenizer = model.config, tokenizer
        graphdef, self._state = nnx.split(model)
        self._images = jax.jit(lambda s, x: normalize(nnx.merge(graphdef, s).get_image_features(x)))
        self._texts = jax.jit(lambda s, ids: normalize(nnx.merge(graphdef, s).get_text_features(ids)))

    @classmethod
    def load(cls, path) -> "CLIPScorer":
        from pia_jax.eval.clip_dir import load_clip
        return cls(*load_clip(path))

    def embed_images(self, images) -> np.ndarray:
        """uint8 (N, H, W, 3) -> (N, projection_dim) float32 unit vectors."""
        c = self.config
        pixels = clip_preprocess(images, resize=c.resize, crop=c.vision.image_size, mean=c.image_mean,
                                 std=c.image_std)
        n = len(pixels)
        padded = np.concatenate([pixels, np.zeros((-n % BATCH,) + pixels.shape[1:], np.float32)])
        return np.concatenate([np.asarray(self._images(self._state, padded[i:i + BATCH]))
                               for i in range(0, len(padded), BATCH)])[:n]

    def embed_texts(self, prompts) -> np.ndarray:
        from pia_jax.models.tokenizer import tokenize
        ids = tokenize(self.tokenizer, list(prompts), self.config.text.max_position_embeddings)
        return np.asarray(self._texts(self._state, ids))


def alignment_scores(scorer: CLIPScorer, frames, image, prompt: str) -> dict:
    """The three CLIP scores of one video (uint8 frames (F, H, W, 3)) for its input image (any size) and prompt,
    raw (mean cosine) and scaled (`scaled`). With one frame, frame_consistency is NaN."""
    e_frames, e_image = scorer.embed_images(frames), scorer.embed_images(image)[0]
    e_text = scorer.embed_texts([prompt])[0]
    cosines = {"image_alignment": e_frames @ e_image, "text_alignment": e_frames @ e_text,
               "frame_consistency": (e_frames[1:] * e_frames[:-1]).sum(-1)}
    out = {}
    for name, cos in cosines.items():
        out[name] = float(np.mean(cos)) if len(cos) else float("nan")
        out[f"{name}_scaled"] = scaled(cos) if len(cos) else float("nan")
    return out


def score_video(scorer: CLIPScorer | None, frames, image, prompt: str, *, condition=None, cond_frame: int = 0,
                fps: float = 8.0) -> dict:
    """Every metric of one video: uint8 frames (F, H, W, 3), the uint8 input image (any size) and the prompt.
    PSNR/SSIM compare frame `cond_frame` with `condition`, the exact pixels the sampler was given if known, else
    the image fitted to the frames' size. `scorer=None` skips the CLIP scores. The one function training
    validation needs."""
    from pia_jax.eval.motion import motion_scores
    from pia_jax.eval.video import fit_image

    frames, image = np.asarray(frames), np.asarray(image)
    out = alignment_scores(scorer, frames, image, prompt) if scorer is not None else {}
    condition = fit_image(image, *frames.shape[1:3]) if condition is None else condition
    out.update(motion_scores(frames, condition, cond_frame, fps))
    return out

