"""Image loading and sizing, video writing (read back with Pillow and PyAV), output-path checks, atomic writes."""

import os

import av
import numpy as np
import pytest
from PIL import GifImagePlugin, Image, ImageSequence

from pia_jax import media
from pia_jax.media import MediaError


def smooth_clip(num_frames=16, h=64, w=96):
    """A static colour-ramp background with a square moving across it (typical generated-video statistics)."""
    y, x = np.mgrid[:h, :w]
    background = np.stack([x * 255 // w, y * 255 // h, np.full_like(x, 96)], -1)
    frames = np.repeat(background[None], num_frames, 0).astype(np.uint8)
    for t in range(num_frames):
        frames[t, 20:36, 3 * t:3 * t + 16] = (230, 40, 60)
    return frames


# ---------------------------------------------------------------------------------------------------------------
# load_image


def save(tmp_path, name, img, **kw):
    path = tmp_path / name
    img.save(path, **kw)
    return path


def test_load_modes(tmp_path):
    rgba = np.zeros((4, 6, 4), np.uint8)
    rgba[...] = (10, 20, 30, 0)  # alpha is dropped, the colour kept (PIA's convert('RGB'))
    out = media.load_image(save(tmp_path, "a.png", Image.fromarray(rgba)))
    assert out.dtype == np.uint8 and out.shape == (4, 6, 3)
    np.testing.assert_array_equal(out, np.broadcast_to([10, 20, 30], (4, 6, 3)))

    grey = np.arange(24, dtype=np.uint8).reshape(4, 6)
    np.testing.assert_array_equal(media.load_image(save(tmp_path, "l.png", Image.fromarray(grey))),
                                  np.repeat(grey[..., None], 3, -1))

    pal = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), "P")
    pal.putpalette([255, 0, 0, 0, 0, 255])
    np.testing.assert_array_equal(media.load_image(save(tmp_path, "p.png", pal, transparency=0)),
                                  [[[255, 0, 0], [0, 0, 255]], [[0, 0, 255], [255, 0, 0]]])

    cmyk = Image.new("CMYK", (3, 2), (255, 0, 0, 0))  # pure cyan
    np.testing.assert_array_equal(media.load_image(save(tmp_path, "c.tif", cmyk)), np.full((2, 3, 3), [0, 255, 255]))

    deep = Image.fromarray(np.array([[0, 128 * 257, 65535]], np.uint16))  # 16-bit grey scales, not saturates
    np.testing.assert_array_equal(media.load_image(save(tmp_path, "d.png", deep))[..., 0], [[0, 128, 255]])


def test_load_applies_exif_orientation(tmp_path):
    stored = np.random.default_rng(0).integers(0, 256, (2, 4, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    path = save(tmp_path, "o.png", Image.fromarray(stored), exif=exif)
    np.testing.assert_array_equal(media.load_image(path), np.rot90(stored, -1))
    np.testing.assert_array_equal(media.load_image(path, exif_transpose=False), stored)  # PIA's way: as stored


def test_load_errors(tmp_path):
    good = save(tmp_path, "good.png", Image.new("RGB", (64, 64), (1, 2, 3)))
    data = good.read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[:len(data) // 2])
    (tmp_path / "corrupt.png").write_bytes(data[:30] + bytes(200))
    (tmp_path / "text.jpg").write_text("not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "folder.png").mkdir()
    cases = {"missing.png": "image not found", "folder.png": "got a directory", "empty.png": r"empty \(0 bytes\)",
             "truncated.png": "cannot read image", "corrupt.png": "cannot read image", "text.jpg": "cannot read image"}
    for name, match in cases.items():
        with pytest.raises(MediaError, match=match):
            media.load_image(tmp_path / name)
    assert issubclass(MediaError, ValueError)


# ---------------------------------------------------------------------------------------------------------------
# preprocess_image


def reference_preprocess(image, max_size=512):
    """PIA's preprocess_img, written from its description: shrink the long side, floor both sides to 8s."""
    img = Image.fromarray(image)
    w, h = img.size
    factor = max_size / max(w, h) if max(w, h) > max_size else 1
    w, h = int(w * factor), int(h * factor)
    img = img.resize((w, h))  # Pillow's default filter for RGB: bicubic
    return np.array(img.resize((w // 8 * 8, h // 8 * 8)))


@pytest.mark.parametrize("w,h,expected", [
    (1000, 750, (384, 512)), (750, 1000, (512, 384)), (1920, 1080, (288, 512)), (777, 1234, (512, 320)),
    (300, 203, (200, 296)), (512, 512, (512, 512)), (64, 40, (40, 64)),
    (561, 400, (360, 504))])  # 561 * (512 / 561) = 511.99.. truncates to 511 in the reference, so 504 wide
def test_preprocess_default_matches_reference(w, h, expected):
    image = np.random.default_rng(w).integers(0, 256, (h, w, 3), dtype=np.uint8)
    out = media.preprocess_image(image)
    assert out.dtype == np.uint8 and out.shape == (*expected, 3)
    np.testing.assert_array_equal(out, reference_preprocess(image))


def test_preprocess_size_argument():
    image = np.zeros((600, 800, 3), np.uint8)
    assert media.preprocess_image(image, size=256).shape == (192, 256, 3)


def test_preprocess_cover_and_centre_crop():
    image = np.zeros((100, 400, 3), np.uint8)
    image[:, :100], image[:, 100:300], image[:, 300:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    out = media.preprocess_image(image, height=32, width=32)  # source box: columns 150..250, all green
    np.testing.assert_array_equal(out, np.broadcast_to([0, 255, 0], (32, 32, 3)))
    wide = media.preprocess_image(image, height=32, width=128)  # same aspect: a plain resize, red on the left
    assert wide.shape == (32, 128, 3) and tuple(wide[16, 5]) == (255, 0, 0) and tuple(wide[16, 122]) == (0, 0, 255)
    small = np.full((10, 20, 3), 7, np.uint8)  # enlarging is allowed with an explicit size
    np.testing.assert_array_equal(media.preprocess_image(small, height=64, width=64), np.full((64, 64, 3), 7))


@pytest.mark.parametrize("image,kwargs,match", [
    (np.zeros((6, 6, 3), np.uint8), {}, r"too small.*6x6"),
    (np.zeros((5, 2000, 3), np.uint8), {}, r"resized to 512x1"),
    (np.zeros((64, 64, 3), np.float32), {}, r"uint8 \(H, W, 3\)"),
    (np.zeros((64, 64), np.uint8), {}, r"uint8 \(H, W, 3\)"),
    (np.zeros((64, 64, 3), np.uint8), dict(height=100, width=64), "height must be a multiple of 8"),
    (np.zeros((64, 64, 3), np.uint8), dict(height=64, width=0), "width must be a multiple of 8 in 8..2048"),
    (np.zeros((64, 64, 3), np.uint8), dict(height=4096, width=64), "height must be a multiple of 8 in 8..2048"),
    (np.zeros((64, 64, 3), np.uint8), dict(height=64), "both height and width"),
    (np.zeros((64, 64, 3), np.uint8), dict(size=500), "size must be a multiple of 8")])
def test_preprocess_errors(image, kwargs, match):
    with pytest.raises(MediaError, match=match):
        media.preprocess_image(image, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# frames_to_uint8


def test_frames_to_uint8_truncates_like_the_reference():
    torch = pytest.importorskip("torch")
    x = np.concatenate([[-0.1, 0.0, 0.5, 0.999, 1.0, 1.5, 1 / 255, 2 / 255 - 1e-6],
                        np.random.default_rng(0).uniform(-0.2, 1.2, 1000)]).astype(np.float32)
    out = media.frames_to_uint8(x)
    np.testing.assert_array_equal(out[:8], [0, 0, 127, 254, 255, 255, 1, 1])  # 127.5 -> 127: truncation
    # PIA save_videos_grid: torch.clamp(x * 255, 0, 255).numpy().astype(np.uint8)
    np.testing.assert_array_equal(out, torch.clamp(torch.from_numpy(x) * 255, 0, 255).numpy().astype(np.uint8))
    with pytest.raises(MediaError, match="NaN or infinity"):
        media.frames_to_uint8([0.5, np.nan])


# ---------------------------------------------------------------------------------------------------------------
# writers


def read_gif(path):
    with Image.open(path) as im:
        durations = [f.info["duration"] for f in ImageSequence.Iterator(im)]
        im.seek(0)
        frames = np.stack([np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)])
        return frames, durations, im.info.get("loop")


def test_gif_round_trip(tmp_path):
    frames = smooth_clip()
    media.write_gif(tmp_path / "clip.gif", frames)
    back, durations, loop = read_gif(tmp_path / "clip.gif")
    assert back.shape == frames.shape and loop == 0
    assert sum(durations) == 16 * 125 and set(durations) == {120, 130}  # 8 fps on the GIF's 10 ms grid
    # a 2-D ramp of ~6,000 colours in 256 (about 16 x 16 levels: +-8 at best, Pillow's palette lookup is
    # approximate): measured mean 2.8, max 18
    err = np.abs(back.astype(int) - frames)
    assert err.mean() < 4 and err.max() <= 24, (err.mean(), err.max())
    # one global palette: the static background decodes to exactly the same colours in every frame (no flicker)
    background = np.ones(frames.shape[1:3], bool)
    background[16:40] = False
    assert np.all(back[:, background] == back[:1, background])


def test_gif_is_lossless_up_to_256_colours(tmp_path):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (200, 3), dtype=np.uint8)[rng.integers(0, 200, (5, 32, 48))]
    media.write_gif(tmp_path / "few.gif", frames)
    np.testing.assert_array_equal(read_gif(tmp_path / "few.gif")[0], frames)


def test_gif_options_and_static_clip(tmp_path):
    frames = np.repeat(smooth_clip(1), 4, 0)
    media.write_gif(tmp_path / "still.gif", frames, fps=5, loop=2)
    back, durations, loop = read_gif(tmp_path / "still.gif")
    # Pillow stores identical consecutive frames once, with their summed delay: same timing, same pictures
    assert loop == 2 and len(back) == 1 and durations == [800]


def test_mp4_round_trip(tmp_path):
    frames = smooth_clip()
    media.write_mp4(tmp_path / "clip.mp4", frames, fps=8)
    with av.open(str(tmp_path / "clip.mp4")) as c:
        s = c.streams.video[0]
        assert (s.codec_context.name, s.codec_context.pix_fmt) == ("h264", "yuv420p")
        assert (s.width, s.height, s.average_rate, s.frames) == (96, 64, 8, 16)
        assert float(s.duration * s.time_base) == pytest.approx(2.0)
        back = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(s)])
    data = (tmp_path / "clip.mp4").read_bytes()
    assert data.find(b"moov") < data.find(b"mdat")  # faststart
    assert back.shape == frames.shape
    # Away from the square's outline, H.264 at crf 18 plus the RGB -> yuv420p -> RGB round trip (alone worth a mean
    # 1.5, max 5 at crf 0): measured mean 1.6, max 24. On the outline, 4:2:0 chroma shares one colour between 2 x 2
    # pixels of saturated red and the ramp, off by up to ~128 at any crf.
    err = np.abs(back.astype(int) - frames)
    outline = np.zeros(frames.shape[:3], bool)
    for t in range(len(frames)):
        outline[t, 18:38, max(3 * t - 2, 0):3 * t + 18] = True
    assert err[~outline].mean() < 2.5 and err[~outline].max() <= 32, (err[~outline].mean(), err[~outline].max())


def test_mp4_pads_odd_sizes(tmp_path):
    frames = smooth_clip(4, 63, 95)
    media.write_mp4(tmp_path / "odd.mp4", frames, fps=12.5, crf=10)
    with av.open(str(tmp_path / "odd.mp4")) as c:
        s = c.streams.video[0]
        assert (s.width, s.height, s.average_rate) == (96, 64, 12.5)
        back = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(s)])
    assert np.abs(back[:, :63, :95].astype(int) - frames).mean() < 3  # mostly the yuv420p round trip
    # the padding repeats the last row and column
    assert np.abs(back[:, 63].astype(int) - back[:, 62]).mean() < 2
    assert np.abs(back[:, :, 95].astype(int) - back[:, :, 94]).mean() < 2


def test_png_frames(tmp_path):
    frames = smooth_clip(3)
    media.write_png_frames(tmp_path / "out" / "frames", frames)
    names = sorted(os.listdir(tmp_path / "out" / "frames"))
    assert names == ["0000.png", "0001.png", "0002.png"]
    for name, frame in zip(names, frames):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / "frames" / name)), frame)
    (tmp_path / "empty").mkdir()
    media.write_png_frames(tmp_path / "empty", frames)  # an existing empty folder is filled
    assert len(os.listdir(tmp_path / "empty")) == 3
    assert sorted(os.listdir(tmp_path)) == ["empty", "out"]


@pytest.mark.parametrize("frames,match", [
    (np.zeros((2, 8, 8, 3), np.float32), r"uint8 \(F, H, W, 3\).*frames_to_uint8"),
    (np.zeros((2, 8, 8), np.uint8), r"uint8 \(F, H, W, 3\)"),
    (np.zeros((0, 8, 8, 3), np.uint8), r"uint8 \(F, H, W, 3\)")])
def test_writer_frame_errors(tmp_path, frames, match):
    for write in (media.write_gif, media.write_mp4, media.write_png_frames):
        with pytest.raises(MediaError, match=match):
            write(tmp_path / "x", frames)
    assert os.listdir(tmp_path) == []


def test_writer_argument_errors(tmp_path):
    frames = smooth_clip(2)
    with pytest.raises(MediaError, match=r"fps must be in \(0, 50\]"):
        media.write_gif(tmp_path / "a.gif", frames, fps=60)
    with pytest.raises(MediaError, match=r"fps must be in \(0, 240\]"):
        media.write_mp4(tmp_path / "a.mp4", frames, fps=0)
    with pytest.raises(MediaError, match=r"crf must be in 0..51"):
        media.write_mp4(tmp_path / "a.mp4", frames, crf=60)
    assert os.listdir(tmp_path) == []



def test_write_video_writes_each_format_as_its_writer(tmp_path):
    frames = smooth_clip(3)
    for fmt, write, name in (("gif", media.write_gif, "a.gif"), ("mp4", media.write_mp4, "a.mp4")):
        media.write_video(fmt, tmp_path / "via" / name, frames, fps=6)
        write(tmp_path / "direct" / name, frames, 6)
        assert (tmp_path / "via" / name).read_bytes() == (tmp_path / "direct" / name).read_bytes(), fmt
    media.write_video("png", tmp_path / "frames", frames)
    assert sorted(os.listdir(tmp_path / "frames")) == ["0000.png", "0001.png", "0002.png"]
    with pytest.raises(MediaError, match=r"video format must be one of \('gif', 'mp4', 'png'\), got 'avi'"):
        media.write_video("avi", tmp_path / "a.avi", frames)
    assert sorted(os.listdir(tmp_path)) == ["direct", "frames", "via"]

# ---------------------------------------------------------------------------------------------------------------
# output paths and atomicity


def test_check_writable(tmp_path):
    assert media.check_writable(tmp_path / "new" / "deeper" / "a.gif") == tmp_path / "new" / "deeper" / "a.gif"
    assert os.listdir(tmp_path) == []  # folders are made by the writer, once something is written
    (tmp_path / "file").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    cases = [(tmp_path, {}, "is a directory"), (tmp_path / "file" / "a.gif", {}, "file is a file, not a folder"),
             (tmp_path / "file" / "sub" / "a.gif", {}, "file is a file, not a folder"),
             ("/proc/self/a.gif", {}, "cannot write"), (tmp_path / "file", dict(directory=True), "not an empty"),
             (tmp_path / "full", dict(directory=True), "not an empty"), ("", {}, "not a file name")]
    for path, kw, match in cases:
        with pytest.raises(MediaError, match=match):
            media.check_writable(path, **kw)
    media.check_writable(tmp_path / "file")  # an existing file may be replaced


def failing(original, directory):
    """`original`, made to raise from its 4th call on, once the writer's temporary sibling exists."""
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) >= 4:
            assert any(p.name.endswith(".tmp") for p in directory.iterdir())  # midway: the temporary is there
            raise RuntimeError("disk full")
        return original(*args, **kwargs)

    return wrapper


def break_gif(monkeypatch, directory):  # the GIF writer's per-frame encoder
    monkeypatch.setattr(GifImagePlugin, "_write_frame_data", failing(GifImagePlugin._write_frame_data, directory))


def break_mp4(monkeypatch, directory):
    """PyAV creates the file at the first packet, which x264 holds back until the flush: fail right after that."""
    real_open = av.open

    class Container:  # PyAV's container is an extension type: wrap it instead of patching it
        def __init__(self, *args, **kwargs):
            self.inner = real_open(*args, **kwargs)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def mux(self, packets):
            self.inner.mux(packets)
            if any(p.name.endswith(".tmp") and p.stat().st_size for p in directory.iterdir()):
                raise RuntimeError("disk full")

    monkeypatch.setattr(av, "open", Container)


def break_png(monkeypatch, directory):
    monkeypatch.setitem(Image.SAVE, "PNG", failing(Image.SAVE["PNG"], directory))


@pytest.mark.parametrize("writer,target,sabotage", [
    ("write_gif", "clip.gif", break_gif), ("write_mp4", "clip.mp4", break_mp4),
    ("write_png_frames", "frames", break_png)])
def test_failed_write_leaves_nothing(tmp_path, monkeypatch, writer, target, sabotage):
    frames = smooth_clip(6)
    renamed = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (renamed.append(a), real_replace(a, b)))
    sabotage(monkeypatch, tmp_path)
    with pytest.raises(RuntimeError, match="disk full"):
        getattr(media, writer)(tmp_path / target, frames)
    assert os.listdir(tmp_path) == [] and renamed == []  # the temporary sibling is gone; nothing was renamed
    if writer != "write_png_frames":  # an existing file survives a failed overwrite
        (tmp_path / target).write_bytes(b"old")
        with pytest.raises(RuntimeError, match="disk full"):
            getattr(media, writer)(tmp_path / target, frames)
        assert os.listdir(tmp_path) == [target] and (tmp_path / target).read_bytes() == b"old"


def test_a_large_photo_loads_without_pillows_raw_warning_and_a_huge_one_is_refused(tmp_path, monkeypatch):
    """Pillow warns (DecompressionBombWarning) past MAX_IMAGE_PIXELS and refuses past twice that; both limits are
    lowered here so that a small image stands for a 100-megapixel photo."""
    import warnings
    from PIL import Image
    path = tmp_path / "big.png"
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1600 pixels: above the warning, below the error
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert media.load_image(path).shape == (40, 40, 3)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # 1600 > 2 x 500: Pillow refuses
    with pytest.raises(media.MediaError, match="too large to decode safely"):
        media.load_image(path)
