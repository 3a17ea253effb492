"""The training configuration as data: nested frozen dataclasses, read from YAML, changed by `key=value` overrides.

Defaults are the PIA reference recipe except where a field's help says otherwise. Every field carries its meaning
in `metadata["help"]` (and its valid values in `metadata["choices"]`): `train.py --help` lists them all.
"""

import dataclasses
from dataclasses import dataclass, field

import yaml

from pia_jax.data.clips import DataConfig
from pia_jax.models.attention import KERNELS
from pia_jax.models.config import DTYPES, MODELS, ConfigError, from_dict, opt, to_dict, type_name  # noqa: F401  (API)
from pia_jax.models.unet import REMAT_POLICIES


def section(cls, help: str):
    return field(default_factory=cls, metadata={"help": help})


@dataclass(frozen=True)
class ModelConfig:
    model_dir: str | None = opt(None, "a converted model directory (convert_torch_weights.py); its UNet may take "
                                      "4 channels (widened with zero condition channels) or 9")
    init: str | None = opt(None, "without model_dir: random weights of this pia_jax.models.config model (smoke runs)",
                           (None, *MODELS))
    trainable: tuple[str, ...] = opt((r"^conv_in\.", r"\.motion_modules\."),
                                     "regexes searched in UNet parameter paths: a match trains, the rest (and the "
                                     "VAE and text encoder) is frozen")
    compute_dtype: str = opt("bf16", "dtype of activations and matmuls", tuple(DTYPES))
    frozen_dtype: str = opt("bf16", "storage of frozen weights (trainable weights and Adam state are fp32)",
                            tuple(DTYPES))
    remat_policy: str | None = opt(None, "rematerialise each UNet block, saving what this policy names; null: "
                                         "none, as the recipe's 4 clips x 16 x 256² fit 80-95 GiB chips without it "
                                         "(BENCHMARKS.md: TPU table); 16-32 GiB chips need one or fewer clips",
                                   (None, *REMAT_POLICIES))
    attention: str = opt("auto", "kernel for spatial self/cross attention (pia_jax/models/attention.py)", KERNELS)


@dataclass(frozen=True)
class OptimConfig:
    lr: float = opt(1e-4, "AdamW learning rate after warmup")
    b1: float = opt(0.9, "Adam beta1")
    b2: float = opt(0.999, "Adam beta2")
    eps: float = opt(1e-8, "Adam epsilon")
    weight_decay: float = opt(1e-2, "AdamW decoupled weight decay")
    clip_norm: float = opt(1.0, "global-norm clipping of the accumulated, averaged gradient (the reference clips "
                                "partial, loss-scaled sums)")
    warmup_steps: int = opt(0, "linear warmup from 0 over this many steps, then constant")
    grad_accum: int = opt(1, "micro-batches per optimizer step (the reference uses 16)")
    ema_decay: float = opt(0.0, "0: off; else keep an exponential moving average of the trainable weights (decay "
                                "min(this, (1 + n) / (10 + n)) at update n > 0, as diffusers' EMAModel) and export it "
                                "instead of the last weights; fixed for a run")


@dataclass(frozen=True)
class MeshConfig:
    data: int = opt(-1, "data-parallel axis size; -1: the devices left after fsdp")
    fsdp: int = opt(1, "axis splitting weights and Adam state (within a host); -1: the devices left after data")


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = opt(1000, "optimizer steps between checkpoints")
    keep: int = opt(3, "newest checkpoints kept")
    async_save: bool = opt(True, "write checkpoints while training goes on")
    on_corrupt: str = opt("fallback", "a newest checkpoint that cannot be read: 'fallback' names it and resumes "
                                      "from the newest readable one; 'refuse' stops", ("fallback", "refuse"))


@dataclass(frozen=True)
class LogConfig:
    every: int = opt(10, "steps between stdout lines")
    tensorboard: bool = opt(True, "write TensorBoard event files")
    dir: str | None = opt(None, "TensorBoard folder; default {workdir}/tensorboard (keep it local on pods)")
    progress_bar: bool = opt(True, "a progress bar on interactive terminals")
    peak_tflops: float | None = opt(None, "peak TFLOP/s per device for MFU; null: looked up by device kind")


@dataclass(frozen=True)
class ValidationConfig:
    every: int = opt(0, "optimizer steps between validation videos; 0: off")
    images: tuple[str, ...] = opt((), "condition images, paired with prompts")
    prompts: tuple[str, ...] = opt((), "one prompt per image")
    affinity: str = opt("moderate", "pia_jax.sampling.affinity preset for the mask channel")
    steps: int = opt(25, "DDIM steps")
    guidance_scale: float = opt(7.5, "classifier-free guidance scale")
    seed: int = opt(0, "seed of the first video (then seed + 1, ...)")
    clip: str | None = opt(None, "a CLIP model directory (evaluate.py convert-clip): adds the CLIP image/text "
                                 "alignment scores to the motion and fidelity scores logged for each validation")


# task -> the model part it trains (pia_jax/training/tasks.py has their objectives)
TASK_PARTS = {"pia": "unet", "vae": "vae", "t2i": "unet"}


@dataclass(frozen=True)
class TrainConfig:
    task: str = opt("pia", "the objective and trained part (pia_jax/training/tasks.py): PIA's recipe, or a "
                           "base-model stage of the toy world (vae, t2i)", tuple(TASK_PARTS))
    workdir: str = opt("runs/pia", "checkpoints/, tensorboard/, validation/, model/ (the export), config.json; "
                                   "local or gs://")
    steps: int = opt(31_250, "optimizer steps (the reference's 500k micro-steps / 16)")
    seed: int = opt(0, "weights of new parameters, data order, noise")
    on_nonfinite: str = opt("stop", "non-finite loss or gradient: 'stop' (keep the last good checkpoint) or "
                                    "'skip' the step", ("stop", "skip"))
    on_change: str = opt("refuse", "resuming with other hyperparameters than the workdir's config.json: 'refuse' "
                                   "(listing them) or 'apply' the new ones (logged)", ("refuse", "apply"))
    sigterm_exit_code: int = opt(0, "exit status after SIGTERM saved a checkpoint (e.g. 143 for supervisors that "
                                    "restart only failed jobs)")
    export_dtype: str = opt("fp16", "storage dtype of the exported model directory", tuple(DTYPES))
    compilation_cache: str | None = opt(None, "a persistent XLA cache folder: the compiled step is stored there and "
                                              "a resumed run loads it without tracing or compiling")
    model: ModelConfig = section(ModelConfig, "the model and what trains")
    data: DataConfig = section(DataConfig, "the clips")
    optim: OptimConfig = section(OptimConfig, "the optimizer")
    mesh: MeshConfig = section(MeshConfig, "the device mesh")
    checkpoint: CheckpointConfig = section(CheckpointConfig, "checkpoints in {workdir}/checkpoints")
    log: LogConfig = section(LogConfig, "stdout and TensorBoard")
    validation: ValidationConfig = section(ValidationConfig, "sample videos during training")


POSITIVE = ("steps", "data.batch_size", "data.n_frames", "data.stride", "data.resolution", "data.workers",
            "optim.grad_accum", "checkpoint.every", "checkpoint.keep", "log.every")


def describe(cls=TrainConfig, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, meaning) of every leaf field, for --help."""
    rows = []
    for f in dataclasses.fields(cls):
        tp = cls.__annotations__[f.name]
        if dataclasses.is_dataclass(tp):
            rows += describe(tp, prefix + f.name + ".")
        else:
            default = yaml.safe_dump(list(f.default) if isinstance(f.default, tuple) else f.default,
                                     default_flow_style=True, width=1000).strip().removesuffix("\n...")
            rows.append((prefix + f.name, type_name(tp), default, f.metadata["help"]))
    return rows


def check(cfg: TrainConfig, data: bool = True) -> TrainConfig:
    """Checks that need more than one field, or a value range (`data`: of the data source too); raises
    ConfigError."""
    flat = {k: v for k, v in _flatten(to_dict(cfg))}
    bad = [k for k in POSITIVE if flat[k] < 1]
    if bad:
        raise ConfigError("must be >= 1: " + ", ".join(f"{k}={flat[k]}" for k in bad))
    if not 0 <= cfg.optim.ema_decay < 1:
        raise ConfigError(f"optim.ema_decay must be in [0, 1) (0: no moving average), got {cfg.optim.ema_decay}")
    if bool(cfg.model.model_dir) == bool(cfg.model.init):
        raise ConfigError("give exactly one of model.model_dir=DIR (a converted model directory) and "
                          f"model.init={'|'.join(MODELS)} (random weights)")
    if data and bool(cfg.data.path) == cfg.data.synthetic:
        raise ConfigError("give exactly one of data.path=DIR (a prepared dataset) and data.synthetic=true")
    v = cfg.validation
    if v.every and (len(v.images) != len(v.prompts) or not v.images or not cfg.model.model_dir):
        raise ConfigError(f"validation.every={v.every} needs as many validation.images as validation.prompts "
                          f"(got {len(v.images)} and {len(v.prompts)}, at least one) and a model.model_dir (its "
                          "tokenizer)")
    return cfg


def _flatten(d: dict, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flatten(v, prefix + k + ".")
        else:
            yield prefix + k, v


def flatten(cfg: TrainConfig) -> dict:
    """{'optim.lr': 1e-4, ...}: every leaf of a config (tuples as lists, as config.json stores them)."""
    return dict(_flatten(yaml.safe_load(yaml.safe_dump(to_dict(cfg)))))


# Settings a resumed run may change freely (where it writes, how long it runs, what it logs, how it is laid out on
# devices), by key or section prefix; others are hyperparameters (config.on_change); FIXED ones never change, since
# the checkpoint's trainable weights depend on them.
FREE_ON_RESUME = ("workdir", "steps", "on_nonfinite", "on_change", "sigterm_exit_code", "export_dtype",
                  "compilation_cache", "data.workers", "mesh.", "checkpoint.", "log.", "validation.")
FIXED_ON_RESUME = ("task", "model.model_dir", "model.init", "model.trainable",
                   "optim.ema_decay")  # on or off changes the optimizer state's structure


# What the compiled step is made from, beside the model graphs and arrays it sees: the task (its loss), the
# optimizer's settings (closed over by optax) and the model's build options. Not the weights' folder: the weights are
# the step's arguments and their shapes and dtypes are checked apart (pia_jax.compiled.store).
PROGRAM_SECTIONS = ("task", "optim.", "model.")


def program_identity(cfg: TrainConfig) -> str:
    """The training settings the compiled step depends on, as one line (the key of a stored step)."""
    return repr(sorted((k, v) for k, v in flatten(cfg).items()
                       if k.startswith(PROGRAM_SECTIONS) and k != "model.model_dir"))


def changes(stored: dict, cfg: TrainConfig) -> tuple[list, list]:
    """([(key, stored value, new value)] of FIXED_ON_RESUME keys, [...] of the other hyperparameters) where the
    config.json of a run (`stored`) and `cfg` differ."""
    old, new = flatten(TrainConfig()) | dict(_flatten(stored)), flatten(cfg)  # a key added since: its default
    diff = [(k, old.get(k, "(absent)"), new.get(k, "(absent)")) for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k) and not k.startswith(FREE_ON_RESUME)]
    return [d for d in diff if d[0] in FIXED_ON_RESUME], [d for d in diff if d[0] not in FIXED_ON_RESUME]


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """`section.key=value` strings applied to a nested dict; values are parsed as YAML."""
    data = yaml.safe_load(yaml.safe_dump(data))  # a deep copy
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        *parents, leaf = key.strip().split(".")
        node = data
        for i, p in enumerate(parents):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parents[:i + 1])} is not a section")
        try:
            node[leaf] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({e})") from None
    return data


def load(path: str | None = None, overrides: list[str] = ()) -> TrainConfig:
    """The defaults, updated by the YAML file at `path` (if any), then by the overrides; raises ConfigError."""
    data = {}
    if path:
        try:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        except OSError as e:
            raise ConfigError(f"cannot read the config file: {e}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from None
    return from_dict(TrainConfig, apply_overrides(data, list(overrides)))
