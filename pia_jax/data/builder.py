"""Preparation: a video source -> a tensorflow-datasets dataset of ArrayRecord shards (no TensorFlow needed).

Each example keeps the encoded video bytes as they were (compact, and every epoch can draw a new random window as
the reference does), the caption, the exact frame count and the frames' timestamps (for seeking). Videos that are
missing, unreadable, corrupt or shorter than `min_frames` are skipped and counted by reason in the dataset's
metadata.json. tfds writes into an `incomplete.*` folder and renames it only when everything is written, so a
killed preparation never leaves a folder that looks like a finished dataset.
"""

import collections
import itertools
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from pia_jax.data.sources import Row
from pia_jax.data.video import VideoError, probe

MAX_EXAMPLES_PER_REASON = 20  # skipped videos listed by name in the metadata, per reason


def _ordered_map(fn: Callable, items: Iterable, workers: int) -> Iterator:
    """fn over items on a thread pool, results in input order, at most 4 * workers in flight (bounded memory)."""
    items = iter(items)
    with ThreadPoolExecutor(workers) as pool:
        pending = collections.deque(pool.submit(fn, x) for x in itertools.islice(items, 4 * workers))
        while pending:
            yield pending.popleft().result()
            pending.extend(pool.submit(fn, x) for x in itertools.islice(items, 1))


def load_row(row: Row, min_frames: int) -> dict:
    """The example for one row; raises VideoError (reason missing/unreadable/corrupt/too_short) to skip it."""
    if row.path is None:
        raise VideoError("missing", "no video file")
    try:
        data = Path(row.path).read_bytes()
    except OSError as e:
        raise VideoError("unreadable", str(e)) from e
    info = probe(data)
    if info.num_frames < min_frames:
        raise VideoError("too_short", f"{info.num_frames} frames, need {min_frames}")
    return {"video": data, "caption": row.caption, "key": row.key, "num_frames": info.num_frames,
            "height": info.height, "width": info.width, "pts": info.pts}


class PiaVideos(tfds.core.GeneratorBasedBuilder):
    """Encoded videos with captions for PIA training; one split, 'train'."""

    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, rows: Iterable[Row] = (), min_frames: int = 16, workers: int = 8, **kwargs):
        self._rows, self._min_frames, self._workers = rows, min_frames, workers
        super().__init__(**kwargs)

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "video": tfds.features.Tensor(shape=(), dtype=np.object_),  # the encoded file, e.g. mp4 bytes
                "caption": tfds.features.Text(),
                "key": tfds.features.Text(),  # WebVid videoid or CSV path, to trace an example to its source
                "num_frames": tfds.features.Scalar(dtype=np.int32),
                "height": tfds.features.Scalar(dtype=np.int32),
                "width": tfds.features.Scalar(dtype=np.int32),
                "pts": tfds.features.Tensor(shape=(None,), dtype=np.int64),  # empty: timestamps unusable, no seeking
            }),
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        def attempt(row):
            try:
                return row, load_row(row, self._min_frames)
            except VideoError as e:
                return row, e

        skipped, examples, written = collections.Counter(), collections.defaultdict(list), 0
        for i, (row, result) in enumerate(_ordered_map(attempt, self._rows, self._workers)):
            if isinstance(result, VideoError):
                skipped[result.reason] += 1
                if len(examples[result.reason]) < MAX_EXAMPLES_PER_REASON:
                    examples[result.reason].append([row.key, result.message])
                continue
            written += 1
            yield i, result  # the row number: unique even where a CSV repeats a video
        self.info.metadata.update({"examples": written, "skipped": dict(skipped), "skipped_examples": dict(examples),
                                   "min_frames": self._min_frames})


def prepare(rows: Iterable[Row], out_dir, *, min_frames: int = 16, workers: int = 8) -> tuple[epath.Path, dict]:
    """Writes the dataset under out_dir; returns its folder (what `open_dataset` takes) and the report
    {"examples": n, "skipped": {reason: n}, "skipped_examples": {reason: [[key, message], ...]}, "min_frames": n}.
    An existing finished dataset in out_dir is kept as it is (tfds reuses it)."""
    builder = PiaVideos(rows=rows, min_frames=min_frames, workers=workers, data_dir=str(out_dir),
                        file_format="array_record")
    with tempfile.TemporaryDirectory() as downloads:  # tfds wants one; nothing is downloaded
        builder.download_and_prepare(download_dir=downloads)
    return epath.Path(builder.data_dir), dict(builder.info.metadata)
