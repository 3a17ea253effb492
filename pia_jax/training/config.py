"""The training configuration as data: nested frozen dataclasses, read from YAML, changed by `key=value` overrides.

Defaults are the PIA reference recipe (pia_reference.md §5) except where noted.
"""

import dataclasses
import types
import typing
from dataclasses import dataclass, field

import yaml


@dataclass(frozen=True)
class ModelConfig:
    model_dir: str | None = None  # a converted model directory (UNet with 4 or 9 input channels)
    init: str = "sd15"  # without model_dir: random weights of this pia_jax.config model ("sd15" or "tiny")
    # Regexes searched in UNet parameter paths; a match is trained, everything else (and the VAE, text) is frozen.
    trainable: tuple[str, ...] = (r"^conv_in\.", r"\.motion_modules\.")
    compute_dtype: str = "bfloat16"
    frozen_dtype: str = "bfloat16"  # storage of frozen weights; trainable weights and Adam state are always fp32
    remat_policy: str | None = None  # pia_jax.unet.REMAT_POLICIES
    attention: str = "auto"  # kernel for spatial self/cross attention (pia_jax/attention.py)


@dataclass(frozen=True)
class DataConfig:
    path: str | None = None  # a prepared dataset (prepare_dataset.py); None = synthetic clips (smoke runs)
    batch_size: int = 4  # clips per micro-batch, all hosts together; a multiple of the device count
    n_frames: int = 16
    stride: int = 4
    resolution: int = 256
    caption_dropout: float = 0.1
    condition_dropout: float = 0.2  # drawn per clip (the reference draws one per batch)
    sim_range: tuple[float, ...] = (0.2, 1.0)  # affinity coefficient range (train.yaml mask_sim_range)
    flip: bool = True  # random horizontal flips (the reference's); off where captions name directions
    workers: int = 8


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-4
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 1e-2
    clip_norm: float = 1.0  # on the accumulated, averaged gradient (the reference clips partial, scaled sums)
    warmup_steps: int = 0  # linear warmup from 0, then constant
    grad_accum: int = 1  # micro-batches per optimizer step (the reference config uses 16)


@dataclass(frozen=True)
class MeshConfig:
    data: int = -1  # -1: the devices left after fsdp
    fsdp: int = 1


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 1000  # optimizer steps
    keep: int = 3
    async_save: bool = True


@dataclass(frozen=True)
class LogConfig:
    every: int = 10
    tensorboard: bool = True
    dir: str | None = None  # TensorBoard event files; default {workdir}/tensorboard (keep it local on pods)
    progress_bar: bool = True  # only on interactive terminals
    peak_tflops: float | None = None  # per device, for MFU; None = look up the device kind


@dataclass(frozen=True)
class ValidationConfig:
    every: int = 0  # optimizer steps; 0 = off
    images: tuple[str, ...] = ()  # condition images, paired with prompts
    prompts: tuple[str, ...] = ()
    affinity: str = "moderate"  # pia_jax.affinity preset for the mask channel
    steps: int = 25
    guidance_scale: float = 7.5
    seed: int = 0


@dataclass(frozen=True)
class TrainConfig:
    task: str = "pia"  # pia | vae | t2i: the objective and trained part (pia_jax/training/tasks.py)
    workdir: str = "runs/pia"  # checkpoints/, tensorboard/, validation/, model/ (the export); local or gs://
    steps: int = 31_250  # optimizer steps (the reference's 500k micro-steps / 16)
    seed: int = 0
    on_nonfinite: str = "stop"  # non-finite loss or gradient: "stop" (keep the last good checkpoint) or "skip"
    export_dtype: str = "fp16"  # storage dtype of the exported model directory
    compilation_cache: str | None = None  # a persistent XLA cache folder: a resumed run skips recompiling the step
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)

    def __post_init__(self):
        if self.task not in ("pia", "vae", "t2i"):
            raise ValueError(f"task must be 'pia', 'vae' or 't2i', got {self.task!r}")
        if self.on_nonfinite not in ("stop", "skip"):
            raise ValueError(f"on_nonfinite must be 'stop' or 'skip', got {self.on_nonfinite!r}")


def _coerce(tp, value, key):
    """`value` (from YAML) as type `tp`; YAML reads '1e-4' as a string, so numbers are converted here."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        tp = next(a for a in args if a is not type(None))
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key + ".")
    if typing.get_origin(tp) is tuple:
        items = [value] if isinstance(value, str) else list(value)
        return tuple(_coerce(args[0], v, key) for v in items)
    if tp is bool and isinstance(value, str):
        return {"true": True, "false": False}[value.lower()]
    return tp(value)


def from_dict(cls, data: dict, prefix: str = ""):
    if not isinstance(data, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(hints))
    if unknown:
        raise ValueError(f"unknown config key(s) {[prefix + k for k in unknown]}; {cls.__name__} has {sorted(hints)}")
    return cls(**{k: _coerce(hints[k], v, prefix + k) for k, v in data.items()})


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """`section.key=value` strings applied to a nested dict; values are parsed as YAML."""
    data = yaml.safe_load(yaml.safe_dump(data))  # a deep copy
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not of the form key=value")
        *parents, leaf = key.strip().split(".")
        node = data
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    return data


def load(path: str | None = None, overrides: list[str] = ()) -> TrainConfig:
    """The defaults, updated by the YAML file at `path` (if any), then by the overrides."""
    data = {}
    if path:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    return from_dict(TrainConfig, apply_overrides(data, list(overrides)))
