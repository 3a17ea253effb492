"""Contact sheets: one row per video, its input image then its frames, as one PNG (the bench's and the toy's)."""

import numpy as np


def contact_sheet(images, videos, columns: int | None = None, scale: int = 1, pad: int = 2) -> np.ndarray:
    """uint8 grid: one row per uint8 video (F, H, W, 3), its image (fitted to the first video's frame size) then up
    to `columns` evenly spaced frames (every frame for None); each tile upscaled `scale`x (nearest) and framed by
    `pad` white pixels, short rows filled with white."""
    from pia_jax.eval.video import fit_image

    h, w = np.shape(videos[0])[1:3]
    rows = []
    for image, video in zip(images, videos):
        pick = np.linspace(0, len(video) - 1, min(columns or len(video), len(video))).round().astype(int)
        rows.append([fit_image(x, h, w) for x in [image, *np.asarray(video)[pick]]])
    width = max(len(r) for r in rows)
    blank = np.full((h, w, 3), 255, np.uint8)
    framed = [[np.pad(t.repeat(scale, 0).repeat(scale, 1), ((pad, pad), (pad, pad), (0, 0)), constant_values=255)
               for t in r + [blank] * (width - len(r))] for r in rows]
    return np.concatenate([np.concatenate(r, 1) for r in framed], 0)


def write_contact_sheet(path, images, videos, **kwargs):
    """`contact_sheet` as a PNG, written complete or not at all."""
    from PIL import Image

    from pia_jax import files

    with files.atomic_write(path) as tmp:
        Image.fromarray(contact_sheet(images, videos, **kwargs)).save(tmp, format="PNG")
