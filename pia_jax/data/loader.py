"""Deterministic, resumable, multi-host batches of training examples.

Order: epoch e visits the examples in the permutation rng(seed, e); global step s of an epoch takes the
permutation's positions [s * G, (s + 1) * G), G = batch_size * process_count, and host h the slice
[s * G + h * batch_size, s * G + (h + 1) * batch_size). The last partial global batch of an epoch is dropped.
Every random draw of a sample comes from `sample_rng(seed, epoch, position, attempt)`, so batches depend neither
on worker timing nor on the number of hosts: the hosts' batches put together are the single-host batch of size G.

Examples are made on a thread pool (decoding, resizing and the affinity score run in C code that mostly releases the
GIL), `prefetch` batches ahead, and handed out in order. With `config.latents` they come from the dataset's latent
cache instead (pia_jax/data/latents.py: no decoding, the VAE posterior of a cached clip).
"""

import collections
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from pia_jax.data.clips import DataConfig, make_example
from pia_jax.data.latents import make_latent_example
from pia_jax.data.video import VideoError
from pia_jax.models.tokenizer import tokenize

STATE_VERSION = 1


def sample_rng(seed: int, epoch: int, position: int, attempt: int = 0) -> np.random.Generator:
    """The generator of every random draw of one sample: a function of where the sample is, not of when it runs."""
    return np.random.default_rng([seed, epoch, position, attempt])


class Records:
    """Random access to the records of one or more prepared datasets (concatenated), text fields as str."""

    def __init__(self, sources: list):
        self._sources = sources
        self._ends = np.cumsum([len(s) for s in sources])

    def __len__(self):
        return int(self._ends[-1])

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} of {len(self)}")
        part = int(np.searchsorted(self._ends, index, side="right"))
        r = dict(self._sources[part][index - (int(self._ends[part - 1]) if part else 0)])
        r["caption"], r["key"] = r["caption"].decode("utf-8"), r["key"].decode("utf-8")
        return r


def dataset_folders(path) -> list:
    """The prepared dataset folders under `path` (see `open_dataset`), in path order."""
    from etils import epath

    path = epath.Path(path)
    found = [path / "dataset_info.json"] if (path / "dataset_info.json").exists() else []
    found = found or sorted(path.glob("pia_videos/*/dataset_info.json")) or sorted(
        path.glob("*/pia_videos/*/dataset_info.json"))
    if not found:
        raise FileNotFoundError(f"no prepared dataset at {str(path)!r} (looked for dataset_info.json in it, in "
                                f"pia_videos/<version>/ and in */pia_videos/<version>/)")
    return [f.parent for f in found]


def dataset_metadata(path) -> list[tuple[str, dict]]:
    """(folder, metadata.json) of each prepared dataset under `path`: the preparation report, its inputs and, for a
    latent cache, its `latents` entry (pia_jax/data/latents.py)."""
    import json
    out = []
    for folder in dataset_folders(path):
        meta = folder / "metadata.json"
        out.append((str(folder), json.loads(meta.read_text()) if meta.exists() else {}))
    return out


def open_dataset(path, split: str = "train") -> Records:
    """Opens prepared data: the folder `prepare` returned, the `out_dir` given to it, or a folder of such out_dirs
    (parts prepared in parallel, see prepare_dataset.py --part), concatenated in path order. Local or remote
    (e.g. gs://, through etils.epath) paths."""
    import tensorflow_datasets as tfds

    return Records([tfds.builder_from_directory(str(f)).as_data_source(split=split) for f in dataset_folders(path)])


class Loader:
    """Iterator of per-host batches (numpy arrays):

        pixel_values  uint8   (B, F, S, S, 3): levels of [-1, 1] (clips.quantize; the step maps them back with
                              media.PIXEL_VALUES)
        input_ids     int32   (B, max_length)
        affinity      float32 (B, F), 0 where use_condition is False
        cond_frame    int32   (B,)
        use_condition bool    (B,)

    or, with `config.latents` (a latent cache, pia_jax/data/latents.py), instead of pixel_values:

        latent_mean, latent_logvar  (B, F, h, w, 4) at the cache's dtype: the VAE posterior of a cached clip

    records: random access (`len`, `[i]`) to dicts with video bytes, caption, num_frames, pts (see `open_dataset`).
    tokenizer: a CLIP tokenizer (`pia_jax.models.tokenizer.load_tokenizer`). batch_size: examples per host and step.
    process_index, process_count: this host and the number of hosts (jax.process_index(), jax.process_count()).
    num_workers: threads making examples. prefetch: batches in flight beyond the one being handed out.
    max_attempts: consecutive unusable records tolerated for one example before the dataset counts as broken.

    A record that cannot be used (decoding fails, too few frames) is replaced by the next index, deterministically;
    `stats` counts such skips by reason over the batches handed out so far (and is part of the state).
    """

    def __init__(self, records, tokenizer, config: DataConfig = DataConfig(), *, batch_size: int, seed: int = 0,
                 process_index: int = 0, process_count: int = 1, num_workers: int = 8, prefetch: int = 2,
                 max_attempts: int = 32):
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        self.records, self.tokenizer, self.config = records, tokenizer, config
        self.batch_size, self.seed, self.max_attempts = batch_size, seed, max_attempts
        self.process_index, self.global_batch_size = process_index, batch_size * process_count
        self.steps_per_epoch = len(records) // self.global_batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(records)} examples cannot fill one global batch of {self.global_batch_size}")
        self.prefetch = prefetch
        self._pool = ThreadPoolExecutor(num_workers, thread_name_prefix="pia-data")
        self._pending = collections.deque()  # ((epoch, step), [future per sample]) in order
        self._perms = {}
        self.epoch, self.step = 0, 0  # the next batch to hand out
        self.stats = collections.Counter()

    # -- order -------------------------------------------------------------------------------------------------

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {e: p for e, p in self._perms.items() if e >= self.epoch}
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(len(self.records))
        return self._perms[epoch]

    def _after(self, epoch: int, step: int) -> tuple[int, int]:
        return (epoch + 1, 0) if step + 1 == self.steps_per_epoch else (epoch, step + 1)

    def _sample(self, epoch: int, position: int, index: int) -> tuple[dict, list[str]]:
        """The example at `position` of `epoch` (record `index`), and the reasons of the records skipped for it."""
        failures, error = [], None
        for attempt in range(self.max_attempts):
            rng = sample_rng(self.seed, epoch, position, attempt)
            try:
                record = self.records[(index + attempt) % len(self.records)]
                if self.config.latents:
                    return make_latent_example(record, self.config, rng), failures
                return make_example(record, self.config, rng), failures
            except VideoError as e:
                failures.append(e.reason)
            except Exception as e:  # a broken record (e.g. a damaged shard entry) must not stop training either
                failures.append("error")
                error = e
        raise RuntimeError(f"{self.max_attempts} consecutive records from index {index} failed ({failures}); "
                           f"the dataset looks broken") from error

    def _submit(self, epoch: int, step: int):
        perm = self._permutation(epoch)  # on this thread only
        start = step * self.global_batch_size + self.process_index * self.batch_size
        positions = range(start, start + self.batch_size)
        futures = [self._pool.submit(self._sample, epoch, p, int(perm[p])) for p in positions]
        self._pending.append(((epoch, step), futures))

    # -- iteration ---------------------------------------------------------------------------------------------

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        # Keep the batch handed out now and `prefetch` after it in flight.
        following = self._after(*self._pending[-1][0]) if self._pending else (self.epoch, self.step)
        while len(self._pending) < self.prefetch + 1:
            self._submit(*following)
            following = self._after(*following)
        (epoch, step), futures = self._pending.popleft()
        results = [f.result() for f in futures]
        for _, failures in results:
            self.stats.update(failures)
        self.epoch, self.step = self._after(epoch, step)
        return self._collate([example for example, _ in results])

    def _collate(self, examples: list[dict]) -> dict:
        # Tokenized here, on one thread: a Hugging Face fast tokenizer must not be called from several at once.
        clips = ("latent_mean", "latent_logvar") if self.config.latents else ("pixel_values",)
        return {
            **{k: np.stack([e[k] for e in examples]) for k in clips},
            "input_ids": tokenize(self.tokenizer, [e["caption"] for e in examples], self.config.max_length),
            "affinity": np.stack([e["affinity"] for e in examples]),
            "cond_frame": np.array([e["cond_frame"] for e in examples], np.int32),
            "use_condition": np.array([e["use_condition"] for e in examples], bool),
        }

    # -- checkpointing -----------------------------------------------------------------------------------------

    def get_state(self) -> dict:
        """Small JSON-able state: restoring it continues with the next batch not yet handed out."""
        return {"version": STATE_VERSION, "epoch": self.epoch, "step": self.step, "seed": self.seed,
                "global_batch_size": self.global_batch_size, "num_records": len(self.records),
                "skipped": dict(self.stats)}

    def set_state(self, state: dict):
        expected = {"version": STATE_VERSION, "seed": self.seed, "global_batch_size": self.global_batch_size,
                    "num_records": len(self.records)}
        wrong = {k: (state.get(k), v) for k, v in expected.items() if state.get(k) != v}
        if wrong:
            raise ValueError(f"loader state does not fit this loader (saved, current): {wrong}")
        for _, futures in self._pending:  # batches prefetched for the old position
            for f in futures:
                f.cancel()
        self._pending.clear()
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.stats = collections.Counter(state["skipped"])

    def close(self):
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
