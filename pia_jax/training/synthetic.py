"""Synthetic training clips with the data loader's contract, for smoke runs, benchmarks and tests.

A fixed set of `num_clips` random clips; global step s takes clips (s * G + i) mod num_clips, i < G, and host h the
rows [h * B, (h + 1) * B) of that global batch (G = B * process_count), like `pia_jax.data.Loader`: the hosts'
batches put together are the single-host batch. Pixels are uint8 levels as the real loader hands them out; with
`latent_size` each clip is a latent cache's instead: latent_mean ~ N(0, 1) and latent_logvar ~ U(-12, -2)
(F, latent_size, latent_size, latent_channels) float32, no pixel_values.
"""

import numpy as np


class SyntheticLoader:
    def __init__(self, *, batch_size: int, n_frames: int, resolution: int, seed: int = 0, num_clips: int = 64,
                 vocab_size: int = 49408, process_index: int = 0, process_count: int = 1,
                 latent_size: int | None = None, latent_channels: int = 4):
        self.batch_size, self.frames, self.size = batch_size, n_frames, resolution
        self.seed, self.num_clips, self.vocab = seed, num_clips, vocab_size
        self.latent_size, self.latent_channels = latent_size, latent_channels
        self.first, self.global_batch_size = process_index * batch_size, batch_size * process_count
        self.step = 0  # the next global batch
        self.seen = []  # clip indices handed out and not taken back by set_state, in order (tests check the order)

    def clip(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, index])
        f = self.frames
        if self.latent_size:
            shape = (f, self.latent_size, self.latent_size, self.latent_channels)
            clip = {"latent_mean": rng.standard_normal(shape, np.float32),
                    "latent_logvar": rng.uniform(-12, -2, shape).astype(np.float32)}
        else:
            clip = {"pixel_values": rng.integers(0, 256, (f, self.size, self.size, 3), dtype=np.uint8)}
        ids = rng.integers(1, self.vocab, 77).astype(np.int32)
        return {**clip, "input_ids": ids, "affinity": rng.uniform(0.2, 1.0, f).astype(np.float32),
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
        step = int(state["step"])
        if step < self.step:  # rewound (a training loop returning batches it drew ahead): they were not consumed
            del self.seen[max(0, len(self.seen) - (self.step - step) * self.batch_size):]
        self.step = step
