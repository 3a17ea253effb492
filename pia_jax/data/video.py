"""Video probing and frame decoding with PyAV, from encoded bytes held in memory."""

import io
from dataclasses import dataclass

import numpy as np


class VideoError(Exception):
    """A video that cannot be used; `reason` is a short category for the skip counts."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason, self.message = reason, message


@dataclass(frozen=True)
class VideoInfo:
    num_frames: int
    height: int
    width: int
    pts: np.ndarray  # int64 (num_frames,) presentation timestamps, for seeking; empty where they are unusable


def _open(data: bytes):
    import av  # imported here: the training config and trainer import this module, also where PyAV is absent

    container = av.open(io.BytesIO(data), mode="r")
    if not container.streams.video:
        container.close()
        raise VideoError("corrupt", "no video stream")
    return container, container.streams.video[0]


def probe(data: bytes) -> VideoInfo:
    """Decodes every frame once (without colour conversion) to count them exactly and to catch corrupt files.

    Container metadata (stream.frames, duration) is often missing or wrong, so the count comes from decoding.
    """
    try:
        container, stream = _open(data)
        with container:
            pts, size = [], None
            for frame in container.decode(stream):
                pts.append(frame.pts)
                size = (frame.height, frame.width)
    except (VideoError, ImportError):  # a missing PyAV is no corrupt video
        raise
    except Exception as e:  # PyAV raises many kinds (FFmpegError, ValueError, ...); all mean "cannot use"
        raise VideoError("corrupt", f"{type(e).__name__}: {e}") from e
    if not pts:
        raise VideoError("corrupt", "no decodable frame")
    usable = None not in pts and all(a < b for a, b in zip(pts, pts[1:]))
    return VideoInfo(len(pts), *size, pts=np.asarray(pts if usable else [], np.int64))


def _decode(data: bytes, wanted: list[int], pts: np.ndarray | None) -> dict[int, np.ndarray]:
    """Frames at the sorted, distinct indices `wanted`: seek to the keyframe before the first one when the frame
    timestamps are known, else decode from the start and count frames."""
    container, stream = _open(data)
    out = {}
    with container:
        if pts is not None:
            by_pts = {int(pts[i]): i for i in wanted}
            container.seek(int(pts[wanted[0]]), stream=stream, backward=True, any_frame=False)
            for frame in container.decode(stream):
                if frame.pts in by_pts:
                    out[by_pts[frame.pts]] = frame.to_ndarray(format="rgb24")
                if len(out) == len(wanted) or frame.pts is None or frame.pts >= pts[wanted[-1]]:
                    break
        else:
            wanted_set = set(wanted)
            for i, frame in enumerate(container.decode(stream)):
                if i in wanted_set:
                    out[i] = frame.to_ndarray(format="rgb24")
                if i >= wanted[-1]:
                    break
    return out


def decode_frames(data: bytes, indices, pts: np.ndarray | None = None) -> np.ndarray:
    """RGB frames uint8 (len(indices), H, W, 3) at the given frame indices (presentation order, 0-based).

    `pts` (from `probe`) enables seeking; if seeking misses a frame the video is decoded again from the start.
    Raises VideoError when a frame cannot be decoded.
    """
    indices = [int(i) for i in indices]
    wanted = sorted(set(indices))
    try:
        frames = _decode(data, wanted, pts) if pts is not None and len(pts) > wanted[-1] else {}
        if len(frames) < len(wanted):
            frames = _decode(data, wanted, None)
    except VideoError:
        raise
    except Exception as e:
        raise VideoError("corrupt", f"{type(e).__name__}: {e}") from e
    if len(frames) < len(wanted):
        raise VideoError("corrupt", f"frame {max(set(wanted) - frames.keys())} could not be decoded")
    return np.stack([frames[i] for i in indices])
