"""Pieces shared by several test modules, by section (tests import from here, never from each other): training,
the UNet parity checks, LoRAs."""

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import av
import jax
import numpy as np
from flax import nnx

from pia_jax import weights
from pia_jax.models.abstract import abstract_model
from pia_jax.models.unet import UNetMotionModel
from pia_jax.sharding import make_mesh
from pia_jax.training import config as config_lib
from pia_jax.training import state as state_lib
from pia_jax.training.step import Trainer
from pia_jax.training.synthetic import SyntheticLoader
from pia_jax.weights.model_dir import save_model_dir
from tests.assets import SMALL, mp4, write_vocab
from tests.oracle import numpy_state

# training

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


# the UNet parity checks

# The UNet against diffusers' (tests/test_unet.py's docstring has the measurement behind it).
UNET_TOL = 2e-5


def load_ours(cfg, state):
    abstract = abstract_model(UNetMotionModel, cfg)
    return weights.load_state_dict(abstract, state, weights.DIFFUSERS_UNET)


def jitted(model):
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda state, *args: nnx.merge(graphdef, state)(*args))
    return lambda *args: np.asarray(fn(state, *args))


def inputs(cfg, b, f, h, w, seed=0):
    rng = np.random.default_rng(seed)
    return dict(
        sample=rng.standard_normal((b, f, h, w, 4), np.float32),
        t=rng.integers(0, 1000, (b,)).astype(np.int64),
        context=rng.standard_normal((b, 7, cfg.cross_attention_dim), np.float32),
        mask=rng.uniform(0.2, 1.0, (b, f, 1, 1, 1)).astype(np.float32),
        condition=rng.standard_normal((b, 1, h, w, 4), np.float32),
    )


# LoRAs

def te_state(module) -> dict:
    """Text encoder keys as in SD1.5's text_encoder/model.safetensors (transformers 5 drops `text_model.` in memory)."""
    return {("" if k.startswith("text_model.") else "text_model.") + k: v for k, v in numpy_state(module).items()}


def modules(state) -> list[str]:
    """Every linear/conv module; the text encoder's embeddings are no LoRA targets."""
    return [k[:-7] for k, v in state.items() if k.endswith(".weight") and v.ndim in (2, 4) and "embeddings." not in k]


def kohya(state, prefix, names, seed, rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.5, dtype=np.float32,
          layout_1x1="conv") -> dict:
    """A random kohya LoRA: 3x3 convs get LoCon factors (down (r, in, 3, 3), up (out, r, 1, 1)) with kohya's separate
    conv_dim/conv_alpha; 1x1 convs and linears get `layout_1x1` ('conv': (r, in, 1, 1), 'linear': (r, in)) factors
    where the weight is a 1x1 conv, linear ones where it is a linear. alpha=None writes no `.alpha`."""
    rng = np.random.default_rng(seed)
    lora = {}
    for name in names:
        out, fan_in, *kernel = state[name + ".weight"].shape
        r, a = (conv_rank, conv_alpha) if kernel not in ([], [1, 1]) else (rank, alpha)
        if kernel == [1, 1] and layout_1x1 == "linear":
            kernel = []
        key = f"{prefix}_{name.replace('.', '_')}"
        lora[f"{key}.lora_down.weight"] = (0.1 * rng.standard_normal((r, fan_in, *kernel))).astype(dtype)
        lora[f"{key}.lora_up.weight"] = (0.1 * rng.standard_normal((out, r) + (1, 1) * bool(kernel))).astype(dtype)
        if a is not None:
            lora[f"{key}.alpha"] = np.array(a, dtype)
    return lora


def by_hand(weight, lora, key, multiplier, scale):
    """W + multiplier * scale * up @ down in float64, for kohya key prefix `key`."""
    down, up = (np.asarray(lora[f"{key}.lora_{p}.weight"], np.float64) for p in ("down", "up"))
    delta = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
    return weight + multiplier * scale * delta.reshape(weight.shape)
