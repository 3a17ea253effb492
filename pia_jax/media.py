"""Image input and video output: loading and sizing the condition image, saving frames as GIF, MP4 or PNGs.

Every writer goes through `pia_jax.files.atomic_write`: a local file appears (by rename) only when complete, an
object-store path (gs://...) is uploaded once complete, so a failure (full disk, bad frames, Ctrl-C) never leaves a
half-written file, and an existing file is replaced only by a complete one.
"""

import io
import warnings
from fractions import Fraction

import numpy as np
from PIL import Image, ImageOps

from pia_jax import files

MAX_SIDE = 2048  # a guard against typos: SD1.5 is trained at 512 and degrades long before this
# uint8 level -> float32 value in [-1, 1], computed as the reference's transforms compute it (/255, then
# Normalize(0.5, 0.5)): training clips travel as uint8 and the step maps them back with it (pia_jax/data/clips.py)
PIXEL_VALUES = (np.arange(256, dtype=np.float32) / 255.0 - 0.5) / 0.5


class MediaError(ValueError):
    """A file that cannot be read or written, or data that cannot be saved."""


def load_image(path, exif_transpose: bool = True) -> np.ndarray:
    """uint8 (H, W, 3) RGB; alpha is dropped (as PIA's `.convert('RGB')` does).

    `exif_transpose`: turn the pixels upright as the file's EXIF orientation says (what image viewers show, and
    what diffusers' `load_image` does). PIA's own preprocessing ignores the tag, so a phone photo stored sideways
    is animated sideways there; `exif_transpose=False` does the same.
    """
    path = files.path(path)  # an object-store URL is read through etils.epath
    if not path.exists():
        raise MediaError(f"image not found: {path}")
    if path.is_dir():
        raise MediaError(f"expected an image file, got a directory: {path}")
    data = path.read_bytes()
    if not data:
        raise MediaError(f"image file is empty (0 bytes): {path}")
    try:
        with warnings.catch_warnings():
            # a large photo (Pillow warns past ~89 megapixels) is the user's own input and is shrunk to --size next;
            # only past twice that does Pillow refuse it, and that error is reported below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                img.load()  # decodes now, so truncated or corrupt data fails here
                img = ImageOps.exif_transpose(img) if exif_transpose else img
    except Image.DecompressionBombError as e:
        raise MediaError(f"image {path} is too large to decode safely ({e}); shrink it first") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise MediaError(f"cannot read image {path}: {e}") from e
    if img.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit grey: Pillow's RGB conversion would saturate at 255
        img = Image.fromarray((np.asarray(img, np.float64) / 257).round().clip(0, 255).astype(np.uint8))
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # palette transparency must go through RGBA before the alpha can be dropped
    return np.asarray(img.convert("RGB"))


def check_size(name, value):
    """MediaError unless `value` is a generation side: a multiple of 8 in 8..MAX_SIDE."""
    if not (isinstance(value, (int, np.integer)) and 8 <= value <= MAX_SIDE and value % 8 == 0):
        raise MediaError(f"{name} must be a multiple of 8 in 8..{MAX_SIDE}, got {value!r}")


def preprocess_image(image: np.ndarray, size: int = 512, height: int | None = None,
                     width: int | None = None) -> np.ndarray:
    """uint8 (h, w, 3) generation-sized image, both sides multiples of 8 (the VAE downsamples by 8).

    Default (PIA's preprocess_img): shrink (never enlarge) so the long side is at most `size`, sides truncated
    to integers, then resize again to sides floored to multiples of 8; both with PIL's bicubic. The second resize
    slightly changes the aspect ratio instead of cropping. With `height` and `width`: scale to cover that size and
    centre-crop, in one bicubic resample from the cropped source box.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise MediaError(f"image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    img = Image.fromarray(image)
    src_w, src_h = img.size
    if (height is None) != (width is None):
        raise MediaError("give both height and width, or neither")
    if height is not None:
        check_size("height", height)
        check_size("width", width)
        scale = max(height / src_h, width / src_w)
        box_w, box_h = width / scale, height / scale  # the source region that maps onto the output
        left, top = (src_w - box_w) / 2, (src_h - box_h) / 2
        return np.asarray(img.resize((width, height), Image.Resampling.BICUBIC,
                                     box=(left, top, left + box_w, top + box_h)))
    check_size("size", size)
    scale = size / max(src_w, src_h) if max(src_w, src_h) > size else 1
    w, h = int(src_w * scale), int(src_h * scale)  # the reference's float expression, truncated
    if w < 8 or h < 8:
        raise MediaError(f"image {src_w}x{src_h} is too small or too elongated: resized to {w}x{h}, a side is "
                         f"under 8 pixels")
    img = img.resize((w, h), Image.Resampling.BICUBIC)
    return np.asarray(img.resize((w // 8 * 8, h // 8 * 8), Image.Resampling.BICUBIC))


def frames_to_uint8(x) -> np.ndarray:
    """Float frames in [0, 1] -> uint8: clip(x * 255) then a truncating cast, as PIA's save_videos_grid."""
    x = np.asarray(x, np.float32)
    if not np.isfinite(x).all():
        raise MediaError("frames contain NaN or infinity (an fp16 overflow in the model?)")
    return np.clip(x * 255, 0, 255).astype(np.uint8)


def check_writable(path, directory: bool = False):
    """Fails early (before any model is loaded) if `path` cannot be written; creates nothing (the writers make
    missing parent folders, and only once something is written). Returns the path (an `etils.epath.Path` for an
    object-store URL).

    directory=False: a file target, which must not be a directory. directory=True: a folder target for
    `write_png_frames`, which must not be a file or a non-empty folder.
    """
    path = files.path(path)
    if not path.name or path.name in (".", ".."):
        raise MediaError(f"not a file name: {str(path)!r}")
    if directory:
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise MediaError(f"output folder {path} exists and is not an empty folder")
    elif path.is_dir():
        raise MediaError(f"output path {path} is a directory")
    if files.is_local(path):
        folder = files.nearest_existing(path.parent)
        if not folder.is_dir():
            raise MediaError(f"cannot write {path}: {folder} is a file, not a folder")
        try:  # a probe file where the output goes (access() is not enough: read-only mounts, /proc)
            probe = files.temp_sibling(folder / path.name)
            probe.touch(exist_ok=False)
            probe.unlink()
        except OSError as e:
            raise MediaError(f"cannot write {path}: {e}") from e
    return path


def _write_atomically(path, write, directory=False):
    with files.atomic_write(check_writable(path, directory), directory=directory) as tmp:
        write(tmp)


def _check_frames(frames) -> np.ndarray:
    frames = np.ascontiguousarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or 0 in frames.shape:
        raise MediaError(f"frames must be uint8 (F, H, W, 3) with F, H, W > 0, got {frames.dtype} {frames.shape} "
                         "(use frames_to_uint8 for float frames)")
    return frames


def _check_fps(fps, most):
    if not 0 < fps <= most:
        raise MediaError(f"fps must be in (0, {most}], got {fps}")


def write_gif(path, frames: np.ndarray, fps: float = 8, loop: int = 0) -> None:
    """Animated GIF with one global 256-colour palette; loop=0 repeats forever.

    The palette comes from a median cut over pixels sampled from all frames, and colours are mapped without
    dithering: per-frame palettes make colours flicker, and error diffusion makes noise crawl across areas that
    barely change. Frame delays are rounded to the GIF's 10 ms unit on the cumulative clock, so the total duration
    is exact (8 fps: 120, 130, 120, ... ms). Pillow merges identical consecutive frames into one longer frame.
    """
    frames = _check_frames(frames)
    _check_fps(fps, 50)  # browsers stretch delays under 20 ms to 100 ms
    n, h, w, _ = frames.shape
    pixels = frames.reshape(-1, 3)
    rng = np.random.default_rng(0)  # a fixed sample: the same frames give the same file
    sample = pixels[rng.choice(len(pixels), 1 << 18, replace=False)] if len(pixels) > 1 << 18 else pixels
    palette = Image.fromarray(sample[:, None]).quantize(256, Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    indexed = Image.fromarray(frames.reshape(n * h, w, 3)).quantize(palette=palette, dither=Image.Dither.NONE)
    images = [indexed.crop((0, i * h, w, (i + 1) * h)) for i in range(n)]
    clock = np.round(np.arange(n + 1) * 100 / fps).astype(int) * 10  # ms, on the 10 ms grid
    _write_atomically(path, lambda tmp: images[0].save(
        tmp, format="GIF", save_all=True, append_images=images[1:], duration=np.diff(clock).tolist(), loop=loop))


def write_mp4(path, frames: np.ndarray, fps: float = 8, crf: int = 18) -> None:
    """H.264 (libx264, yuv420p, BT.601 limited range) MP4; crf 18 is visually lossless for most content.

    yuv420p needs even sides, so an odd height or width is padded by repeating the last row or column: the file is
    then one pixel larger there.
    """
    import av

    frames = _check_frames(frames)
    _check_fps(fps, 240)
    if not 0 <= crf <= 51:
        raise MediaError(f"crf must be in 0..51, got {crf}")
    _, h, w, _ = frames.shape
    frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")

    def write(tmp):
        # faststart: the index goes before the data, so browsers can play while downloading
        with av.open(str(tmp), "w", format="mp4", container_options={"movflags": "+faststart"}) as container:
            stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001),
                                          options={"crf": str(crf)})
            stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
            cc = stream.codec_context  # tag the matrix swscale converts with (BT.601), so players decode alike
            cc.colorspace, cc.color_primaries, cc.color_trc, cc.color_range = 6, 6, 6, 1  # SMPTE 170M, limited
            for frame in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())  # flush the encoder

    _write_atomically(path, write)


def write_png_frames(directory, frames: np.ndarray) -> None:
    """One lossless PNG per frame, 0000.png, 0001.png, ...; the folder appears complete or not at all."""
    frames = _check_frames(frames)

    def write(tmp):
        for i, frame in enumerate(frames):
            Image.fromarray(frame).save(tmp / f"{i:04d}.png")

    _write_atomically(directory, write, directory=True)


def write_video(fmt: str, path, frames: np.ndarray, fps: float = 8) -> None:
    """`frames` written as format `fmt` ("gif", "mp4" or "png": a folder of frames) at `path`, complete or not at
    all: the one place sample.py and the web UI turn a video into files."""
    writers = {"gif": lambda: write_gif(path, frames, fps), "mp4": lambda: write_mp4(path, frames, fps),
               "png": lambda: write_png_frames(path, frames)}
    if fmt not in writers:
        raise MediaError(f"video format must be one of {tuple(writers)}, got {fmt!r}")
    writers[fmt]()


# ---- CLIP's image preprocessing (the CLIP metric model and IP-Adapter's image encoder), step for step as
# transformers' `CLIPImageProcessor` (PIL backend): 1. resize the short side to `resize` pixels, the long side to
# int(resize * long / short) (truncated), PIL bicubic on the uint8 image; 2. centre crop to `crop` x `crop`, top-left
# at ((h - crop) // 2, (w - crop) // 2); 3. rescale x * (1/255) in float64, cast to float32; 4. (x - mean) / std per
# channel in float32.
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
