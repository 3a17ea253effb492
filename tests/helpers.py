"""Pieces shared by several test modules, by section (tests import from here, never from each other)."""

# training

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import av
import jax
import numpy as np

from pia_jax.sharding import make_mesh
from pia_jax.training import config as config_lib
from pia_jax.training import state as state_lib
from pia_jax.training.step import Trainer
from pia_jax.training.synthetic import SyntheticLoader
from pia_jax.weights.model_dir import save_model_dir
from tests.assets import SMALL, mp4, write_vocab

# Every trainer of the training tests uses one small model (a converted model directory with a 4-channel UNet,
# widened at load) with fp32 compute and bf16 frozen weights, compiled once per mesh and batch shape (cached across
# test modules).
FRAMES, SIZE, BATCH = 2, 8, 8  # one clip per fake device
SEED = 0
STEPS = 4  # the steps of a whole test run (the `uninterrupted` fixture of conftest.py)
CODEC = "libx264" if "libx264" in av.codecs_available else "mpeg4"  # x264's B-frames exercise pts reordering


@functools.cache
def model_dir() -> str:
    """A converted model directory of SMALL with random weights and a hand-made tokenizer."""
    root = Path(tempfile.mkdtemp(prefix="pia-train-test-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    write_vocab(root / "tokenizer")
    models = state_lib.abstract_models(SMALL, config_lib.ModelConfig())
    flat = {part: state_lib.random_weights(models[part], i) for i, part in enumerate(models)}
    return str(save_model_dir(root / "model", SMALL, flat, tokenizer=root / "tokenizer"))


def train_config(workdir="unused", **overrides) -> config_lib.TrainConfig:
    base = {"workdir": str(workdir), "steps": 4, "seed": SEED,
            "model": {"model_dir": model_dir(), "compute_dtype": "fp32", "frozen_dtype": "bf16", "attention": "xla"},
            "data": {"synthetic": True, "batch_size": BATCH, "n_frames": FRAMES, "resolution": SIZE},
            "optim": {"lr": 1e-3, "warmup_steps": 2},
            "checkpoint": {"every": 2, "keep": 10}, "log": {"every": 1, "progress_bar": False}}
    return config_lib.from_dict(config_lib.TrainConfig, config_lib.apply_overrides(
        base, [f"{k}={v}" for k, v in overrides.items()]))


@functools.cache
def setup():
    return state_lib.build(train_config().model, SEED)


@functools.cache
def trainer(data: int, fsdp: int) -> Trainer:
    """A trainer on the first data * fsdp fake devices (cached: its compiled steps are reused by every test)."""
    mesh = make_mesh(data, fsdp, devices=jax.devices()[:data * fsdp])
    return Trainer(setup(), state_lib.make_optimizer(train_config().optim), mesh)


def loader(**kwargs) -> SyntheticLoader:
    kwargs = {"batch_size": BATCH, "n_frames": FRAMES, "resolution": SIZE, "seed": SEED,
              "vocab_size": SMALL.text.vocab_size, **kwargs}
    return SyntheticLoader(**kwargs)


def host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def max_rel(a: dict, b: dict) -> float:
    """Largest |a - b| of any weight relative to that weight's scale."""
    return max(float(np.abs(a[k] - b[k]).max() / max(np.abs(b[k]).max(), 1e-12)) for k in b)


def encode_video(num_frames: int) -> bytes:
    """An MP4 of `num_frames` 48x64 frames with several keyframes, so decoding seeks."""
    return mp4(num_frames, 48, 64, CODEC, gop=12)
