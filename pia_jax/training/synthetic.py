"""Synthetic training clips with the data loader's contract, for smoke runs, benchmarks and tests.

A fixed set of `num_clips` random clips; global step s takes clips (s * G + i) mod num_clips, i < G, and host h the
rows [h * B, (h + 1) * B) of that global batch (G = B * process_count), like `pia_jax.data.Loader`: the hosts'
batches put together are the single-host batch.
"""

import numpy as np


class SyntheticLoader:
    def __init__(self, *, batch_size: int, n_frames: int, resolution: int, seed: int = 0, num_clips: int = 64,
                 vocab_size: int = 49408, process_index: int = 0, process_count: int = 1):
        self.batch_size, self.frames, self.size = batch_size, n_frames, resolution
        self.seed, self.num_clips, self.vocab = seed, num_clips, vocab_size
        self.first, self.global_batch_size = process_index * batch_size, batch_size * process_count
        self.step = 0  # the next global batch
        self.seen = []  # clip indices handed out, in order (tests check the data order with it)

    def clip(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, index])
        f = self.frames
        ids = rng.integers(1, self.vocab, 77).astype(np.int32)
        return {"pixel_values": rng.uniform(-1, 1, (f, self.size, self.size, 3)).astype(np.float32),
                "input_ids": ids, "mask_coef": rng.uniform(0.2, 1.0, f).astype(np.float32),
                "cond_frame": np.int32(rng.integers(f)), "use_condition": bool(rng.uniform() >= 0.2)}

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        start = self.step * self.global_batch_size + self.first
        indices = [(start + i) % self.num_clips for i in range(self.batch_size)]
        self.step += 1
        self.seen += indices
        clips = [self.clip(i) for i in indices]
        return {k: np.stack([c[k] for c in clips]) for k in clips[0]}

    def get_state(self) -> dict:
        return {"step": self.step}

    def set_state(self, state: dict):
        self.step = int(state["step"])
