"""Small assets for tests: a CLIP-style tokenizer vocabulary made by hand (no hub access here), short MP4 videos of
a moving pattern, and the small model the training tests share."""

import dataclasses
import io

import numpy as np

from pia_jax.models import config as model_config
from pia_jax.toy.demo import MERGES, byte_chars, write_vocab  # noqa: F401

# TINY, cut to two UNet blocks of one layer (one with cross-attention), a one-block VAE and a one-layer text encoder:
# every kind of layer of the full model, at a compile time CPU tests can afford. A 4-channel UNet (training widens
# it to PIA's 9).
SMALL = model_config.PIAConfig(
    unet=dataclasses.replace(model_config.TINY.unet, in_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                             down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"),
                             up_block_types=("UpBlockMotion", "CrossAttnUpBlockMotion")),
    vae=dataclasses.replace(model_config.TINY.vae, block_out_channels=(32,)),
    text=dataclasses.replace(model_config.TINY.text, num_hidden_layers=1))


def pattern_frame(t: int, h: int, w: int) -> np.ndarray:
    """Frame t of a moving pattern: gradients that shift with t and a bright bar at x = t."""
    y, x = np.mgrid[:h, :w]
    img = np.stack([(x * 4 + t * 3) % 256, (y * 5 + t * 7) % 256, np.full_like(x, t * 11 % 256)], -1)
    img[:, t % w:t % w + 3] = 255
    return img.astype(np.uint8)


def mp4(num_frames: int, h: int, w: int, codec: str = "mpeg4", gop: int | None = None) -> bytes:
    """An MP4 of `num_frames` pattern frames of h x w pixels (PyAV, yuv420p), `gop` frames between keyframes."""
    import av
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream(codec, rate=24)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        if gop:
            s.codec_context.gop_size = gop
        for t in range(num_frames):
            for p in s.encode(av.VideoFrame.from_ndarray(pattern_frame(t, h, w), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


def all_frames(data: bytes) -> np.ndarray:
    """Every frame, decoded front to back: the independent reference for frame indexing."""
    import av
    with av.open(io.BytesIO(data)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
