"""Preparation: a video source -> a tensorflow-datasets dataset of ArrayRecord shards (no TensorFlow needed).

Each example keeps the encoded video bytes as they were (compact, and every epoch can draw a new random window as
the reference does), the caption, the exact frame count and the frames' timestamps (for seeking). Videos that are
missing, unreadable, corrupt or shorter than `min_frames` are skipped and counted by reason in the dataset's
metadata.json, with the inputs it was prepared from. The dataset is written into a hidden sibling of the output
folder and renamed into place only when it is complete and holds at least one video, so a failed or killed
preparation leaves no folder behind (a killed one's hidden sibling is removed by the next run), and an existing
dataset is replaced only on request, once the new one is complete.

With a `LatentSpec` (prepare_dataset.py --latents MODEL_DIR), each example also holds the VAE posteriors of N clips
of its video, drawn and preprocessed as the training loader would, and their affinity scores (pia_jax/data/
latents.py: what is stored, its size and its trade-off); the metadata's `latents` entry records the clip shape and
the VAE (config and weights hash) that a training run checks before using them. A video whose clips cannot be
decoded is skipped like any unusable video.
"""

import collections
import itertools
import json
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from pia_jax.data import latents as latents_lib
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


class PrepareError(ValueError):
    """A preparation that cannot start or produced nothing; `report` holds the skip counts where there are some."""

    def __init__(self, message: str, report: dict | None = None):
        super().__init__(message)
        self.report = report


class PiaVideos(tfds.core.GeneratorBasedBuilder):
    """Encoded videos with captions for PIA training; one split, 'train'."""

    name = "pia_videos"
    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, rows: Iterable[Row] = (), min_frames: int = 16, workers: int = 8,
                 latents: latents_lib.LatentSpec | None = None, latent_meta: dict | None = None, **kwargs):
        self._rows, self._min_frames, self._workers = rows, min_frames, workers
        self._latents, self._latent_meta = latents, latent_meta  # the spec and its `latents_lib.describe`
        super().__init__(**kwargs)

    def _info(self):
        features = {
            "video": tfds.features.Tensor(shape=(), dtype=np.object_),  # the encoded file, e.g. mp4 bytes
            "caption": tfds.features.Text(),
            "key": tfds.features.Text(),  # WebVid videoid or CSV path, to trace an example to its source
            "num_frames": tfds.features.Scalar(dtype=np.int32),
            "height": tfds.features.Scalar(dtype=np.int32),
            "width": tfds.features.Scalar(dtype=np.int32),
            "pts": tfds.features.Tensor(shape=(None,), dtype=np.int64),  # empty: timestamps unusable, no seeking
        }
        if self._latents is not None:  # raw bytes: read back with one np.frombuffer, not value by value
            raw = dict(encoding=tfds.features.Encoding.BYTES)
            f = self._latents.n_frames
            shape = (None, *self._latent_meta["latent_shape"])
            features |= {
                "latent_mean": tfds.features.Tensor(shape=shape, dtype=latents_lib.DTYPES[self._latents.dtype], **raw),
                "latent_logvar": tfds.features.Tensor(shape=shape, dtype=latents_lib.DTYPES[self._latents.dtype],
                                                      **raw),
                "latent_scores": tfds.features.Tensor(shape=(None, f, f), dtype=np.float64, **raw),
                "latent_indices": tfds.features.Tensor(shape=(None, f), dtype=np.int64, **raw),
                "latent_flip": tfds.features.Tensor(shape=(None,), dtype=np.bool_),
            }
        return tfds.core.DatasetInfo(builder=self, description=__doc__,
                                     features=tfds.features.FeaturesDict(features), metadata=tfds.core.MetadataDict())

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        spec = self._latents
        encoder = spec and latents_lib.Encoder(spec.model_dir, spec.encode_batch)

        def attempt(row):  # on a worker thread: decoding, resizing and scoring (the VAE runs on this one)
            try:
                example = load_row(row, self._min_frames)
                if spec is not None:
                    example["clips"] = latents_lib.draw_clips(example, spec)
                return row, example
            except VideoError as e:
                return row, e

        skipped, examples, written = collections.Counter(), collections.defaultdict(list), 0
        for i, (row, result) in enumerate(_ordered_map(attempt, self._rows, self._workers)):
            if isinstance(result, VideoError):
                skipped[result.reason] += 1
                if len(examples[result.reason]) < MAX_EXAMPLES_PER_REASON:
                    examples[result.reason].append([row.key, result.message])
                continue
            if spec is not None:
                result |= latents_lib.encode_clips(result.pop("clips"), encoder, spec.dtype)
            written += 1
            yield i, result  # the row number: unique even where a CSV repeats a video
        report = {"examples": written, "skipped": dict(skipped), "skipped_examples": dict(examples),
                  "min_frames": self._min_frames}
        if not written:  # stop before tfds writes (or asserts on) an empty split
            raise PrepareError(f"no usable video among the {sum(skipped.values())} rows "
                               f"({dict(skipped) or 'the source is empty'}); nothing was written", report)
        self.info.metadata.update(report)


def _finished(out: epath.Path) -> tuple[epath.Path, dict] | None:
    """(dataset folder, metadata) of a finished dataset prepared into `out`, or None."""
    folder = out / PiaVideos.name / str(PiaVideos.VERSION)
    if not (folder / "dataset_info.json").exists():
        return None
    meta = folder / "metadata.json"
    return folder, (json.loads(meta.read_text()) if meta.exists() else {})


def prepare(rows: Iterable[Row], out_dir, *, min_frames: int = 16, workers: int = 8, inputs: dict | None = None,
            force: bool = False, log=print, latents: latents_lib.LatentSpec | None = None) -> tuple[epath.Path, dict]:
    """Writes the dataset into out_dir; returns its folder (what `open_dataset` takes) and the report
    {"examples": n, "skipped": {reason: n}, "skipped_examples": {reason: [[key, message], ...]}, "min_frames": n,
    "inputs": {...}} (+ "latents": `latents_lib.describe(latents)` with a latent cache). `inputs` describes the
    source (kept in the metadata): a finished dataset in out_dir made from the same inputs (the latent cache's
    settings and VAE included) is reused as it is, one from other inputs is refused (PrepareError) unless `force`,
    which replaces it once the new one is complete. No usable video raises PrepareError with the report."""
    out = epath.Path(out_dir)
    latent_meta = latents and latents_lib.describe(latents)
    inputs = {**(inputs or {}), "min_frames": min_frames} | ({"latents": latent_meta} if latents else {})
    existing = _finished(out)
    if existing is not None and not force:
        if existing[1].get("inputs") == inputs:
            log(f"{out} already holds this dataset; reusing it")
            return existing
        old = existing[1].get("inputs", {})
        diff = ", ".join(f"{k}: {old.get(k)!r} -> {inputs.get(k)!r}" for k in sorted(set(old) | set(inputs))
                         if old.get(k) != inputs.get(k))
        raise PrepareError(f"{out} holds a dataset prepared from other inputs ({diff}); choose another --out, or "
                           "pass --force to replace it")
    if existing is None and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PrepareError(f"{out} exists and is neither a prepared dataset nor an empty folder; choose another "
                           "--out")
    for stale in out.parent.glob(f".{out.name}.tmp-*") if out.parent.exists() else ():
        log(f"removing {stale}, left by a killed preparation")
        stale.rmtree()
    made = [p for p in (out, *out.parents) if not p.exists()]
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    builder = PiaVideos(rows=rows, min_frames=min_frames, workers=workers, latents=latents, latent_meta=latent_meta,
                        data_dir=str(tmp), file_format="array_record")
    builder.info.metadata["inputs"] = inputs
    if latents:
        builder.info.metadata["latents"] = latent_meta
    try:
        with tempfile.TemporaryDirectory() as downloads:  # tfds wants one; nothing is downloaded
            builder.download_and_prepare(download_dir=downloads)
        report = dict(builder.info.metadata)
        if out.exists():  # an empty folder, or a dataset being replaced (force): swap once the new one is complete
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            old.rmtree()
        else:
            tmp.rename(out)
    except BaseException:
        if tmp.exists():
            tmp.rmtree()
        for folder in made[1:]:  # innermost first; out itself was never made
            if folder.exists() and not any(folder.iterdir()):
                folder.rmdir()
        raise
    return out / PiaVideos.name / str(PiaVideos.VERSION), report
