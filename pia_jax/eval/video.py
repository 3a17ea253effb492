"""Reading videos to score (GIF through Pillow, MP4/WebM/... through PyAV, or a folder of frame images) and
fitting the input image to a video's frame size."""

from pathlib import Path

import numpy as np
from PIL import Image, ImageSequence

from pia_jax.media import MediaError

VIDEO_SUFFIXES = (".gif", ".mp4", ".webm", ".mov", ".mkv", ".avi")
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def read_video(path) -> tuple[np.ndarray, float]:
    """(uint8 (F, H, W, 3) RGB frames, frames per second) of a video file or of a folder of frames (sorted by name;
    fps then 8, PIA's rate)."""
    path = Path(path)
    if not path.exists():
        raise MediaError(f"video not found: {path}")
    try:
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
            frames = [np.asarray(Image.open(p).convert("RGB")) for p in files]
            fps = 8.0
        elif path.suffix.lower() == ".gif":
            with Image.open(path) as gif:
                frames, ms = [], 0
                for frame in ImageSequence.Iterator(gif):
                    frames.append(np.asarray(frame.convert("RGB")))
                    ms += frame.info.get("duration", 125)
            fps = 1000.0 * len(frames) / ms if ms else 8.0
        else:
            import av
            with av.open(str(path)) as container:
                stream = container.streams.video[0]
                frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
                fps = float(stream.average_rate or 8)
    except (OSError, ValueError) as e:  # PyAV's errors derive from OSError/ValueError
        raise MediaError(f"cannot read video {path}: {e}") from e
    if not frames:
        raise MediaError(f"no frames in {path}")
    if len({f.shape for f in frames}) > 1:
        raise MediaError(f"the frames of {path} differ in size")
    return np.stack(frames), fps


def fit_image(image, height: int, width: int) -> np.ndarray:
    """The uint8 image at (height, width): scaled (bicubic) to cover that size and centre-cropped; unchanged when
    it already has that size."""
    image = np.asarray(image)
    if image.shape[:2] == (height, width):
        return image
    img = Image.fromarray(image)
    scale = max(height / img.height, width / img.width)
    box_w, box_h = width / scale, height / scale  # the source region that maps onto the output
    left, top = (img.width - box_w) / 2, (img.height - box_h) / 2
    return np.asarray(img.resize((width, height), Image.Resampling.BICUBIC,
                                 box=(left, top, left + box_w, top + box_h)))
