"""CLIP's image preprocessing, step for step as transformers' `CLIPImageProcessor` (PIL backend) computes it.

1. resize: the short side to `resize` pixels, the long side to int(resize * long / short) (truncated), with
   PIL's bicubic filter on the uint8 image;
2. centre crop to `crop` x `crop`, top-left corner at ((h - crop) // 2, (w - crop) // 2);
3. rescale: x * (1/255) in float64, cast to float32;
4. normalize: (x - mean) / std per channel, in float32.
"""

import numpy as np
from PIL import Image


def resized_size(height: int, width: int, short: int) -> tuple[int, int]:
    """(height, width) after scaling the short side to `short` (transformers' get_resize_output_image_size)."""
    if width <= height:
        return int(short * height / width), short
    return short, int(short * width / height)


def clip_preprocess(images, *, resize: int = 224, crop: int = 224, mean=(0.48145466, 0.4578275, 0.40821073),
                    std=(0.26862954, 0.26130258, 0.27577711)) -> np.ndarray:
    """uint8 (N, H, W, 3) RGB (or one (H, W, 3) image) -> float32 (N, crop, crop, 3) CLIP input, channels-last."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or 0 in images.shape:
        raise ValueError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    mean32, std32 = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    out = np.empty((len(images), crop, crop, 3), np.float32)
    for i, image in enumerate(images):
        h, w = resized_size(*image.shape[:2], resize)
        pixels = np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.BICUBIC))
        if h < crop or w < crop:  # only when resize < crop; transformers would zero-pad, which no CLIP config does
            raise ValueError(f"resize ({resize}) must be at least the crop size ({crop})")
        top, left = (h - crop) // 2, (w - crop) // 2
        pixels = pixels[top:top + crop, left:left + crop]
        out[i] = ((pixels.astype(np.float64) * (1 / 255)).astype(np.float32) - mean32) / std32
    return out
