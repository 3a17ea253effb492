"""What training starts from: the three models as graph definitions plus flat weights, split into trainable and
frozen, and the optimizer.

Weights travel as flat {NNX path: array} dicts ('down_blocks.0.motion_modules.1.proj_in.kernel'), the keys of the
sharding rules, of checkpoints and of model directories alike; `merge` turns a graph definition and such dicts back
into a module inside the jitted step.
"""

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from pia_jax import models
from pia_jax.models import config as model_config
from pia_jax.models.config import LATENT_CHANNELS, PIA_IN_CHANNELS
from pia_jax.models.unet import widen_conv_in_kernel
from pia_jax.sampling import schedulers
from pia_jax.training.config import TASK_PARTS, ModelConfig, OptimConfig
from pia_jax.weights import param_shapes
from pia_jax.weights.model_dir import PARTS, flat_params, load_model_dir, read_config


@dataclass(frozen=True)
class Graphs:
    """The static structure of the models (NNX graph definitions: hashable, no weights)."""
    unet: nnx.GraphDef
    vae: nnx.GraphDef
    text_encoder: nnx.GraphDef


@dataclass
class Setup:
    config: model_config.PIAConfig  # for PIA with the (widened) 9-channel UNet
    graphs: Graphs
    model: ModelConfig
    trainable: dict[str, np.ndarray]  # the weights of `part` that train, fp32
    # {"unet", "vae", "text_encoder"} -> the weights that do not train, at their source precision (the device copies
    # are cast to model.frozen_dtype; an export writes these)
    frozen: dict[str, dict[str, np.ndarray]]
    scheduler: schedulers.SchedulerConfig
    tokenizer: object = None  # a CLIPTokenizer where the model directory has one
    part: str = "unet"  # the model part that trains (config.TASK_PARTS)


def merge(graph: nnx.GraphDef, *flats: dict) -> nnx.Module:
    """The module of `graph` with its weights taken from flat {NNX path: array} dicts (which together cover all)."""
    items = [(tuple(int(p) if p.isdigit() else p for p in k.split(".")), v) for flat in flats for k, v in flat.items()]
    return nnx.merge(graph, nnx.from_flat_state(items))


def abstract_models(config: model_config.PIAConfig, cfg: ModelConfig, attention: str | None = None,
                    remat: bool = True) -> dict[str, nnx.Module]:
    """{"unet", "vae", "text_encoder"} -> abstract models (no memory) in the compute dtype; `attention`/`remat`
    override the configured kernel and policy (the FLOP count uses all-XLA kernels and no rematerialisation)."""
    dtype, kernel = model_config.dtype(cfg.compute_dtype), attention or cfg.attention
    policy = cfg.remat_policy if remat else None
    kwargs = {"unet": dict(remat_policy=policy, attention_kernels={"self": kernel, "cross": kernel}),
              "vae": dict(attention_kernel=kernel), "text_encoder": {}}
    return {part: models.build(config, part, dtype=dtype, **kwargs[part]) for part in PARTS}


def make_graphs(models: dict[str, nnx.Module]) -> Graphs:
    return Graphs(**{part: nnx.graphdef(m) for part, m in models.items()})


def split_trainable(flat: dict, patterns) -> tuple[dict, dict]:
    rx = [re.compile(p) for p in patterns]
    trainable = {k: v for k, v in flat.items() if any(r.search(k) for r in rx)}
    if not trainable:
        raise ValueError(f"no parameter matches the trainable patterns {list(patterns)}")
    return trainable, {k: v for k, v in flat.items() if k not in trainable}


def random_weights(model: nnx.Module, seed: int) -> dict[str, np.ndarray]:
    """Seeded random weights for a (possibly abstract) model, drawn with numpy in a blink: kernels and embeddings
    N(0, 1/fan_in), norm scales 1, biases 0. Unlike a fresh model, every kernel is nonzero (the zero-initialized
    motion-module outputs included), so every trainable weight gets a gradient from the first step."""
    rng = np.random.default_rng(seed)
    out = {}
    for path, shape in param_shapes(model).items():
        leaf = path.rpartition(".")[2]
        if leaf in ("kernel", "embedding"):
            fan_in = shape[-1] if leaf == "embedding" else int(np.prod(shape[:-1]))
            out[path] = (rng.standard_normal(shape, np.float32) * fan_in ** -0.5).astype(np.float32)
        else:
            out[path] = np.full(shape, 1.0 if leaf == "scale" else 0.0, np.float32)
    return out


def build(cfg: ModelConfig, seed: int = 0, init_config: model_config.PIAConfig | None = None,
          task: str = "pia") -> Setup:
    """The setup of `task`: all weights of `cfg.model_dir` (or seeded random weights of `init_config`, else of
    `cfg.init`), the task's part (`TASK_PARTS`) split into trainable and frozen by `cfg.trainable`. For PIA a
    4-channel conv_in is widened with zero condition channels (PIA's training start); t2i trains a 4-channel UNet."""
    if task not in TASK_PARTS:
        raise ValueError(f"task must be one of {list(TASK_PARTS)}, got {task!r}")
    flats, tokenizer, scheduler = None, None, schedulers.PIA_DDIM
    if cfg.model_dir:
        md = load_model_dir(cfg.model_dir, tokenizer=(Path(cfg.model_dir) / "tokenizer").is_dir())
        config, tokenizer = md.config, md.tokenizer
        scheduler = schedulers.from_dict(md.scheduler) if md.scheduler else scheduler
        flats = {part: flat_params(getattr(md, part)) for part in PARTS}
        del md
    else:
        config = _start_config(cfg, init_config)
    cin = config.unet.in_channels
    if task == "t2i" and cin != LATENT_CHANNELS:
        raise ValueError(f"task t2i trains a 4-channel base UNet; {cfg.model_dir or cfg.init} has {cin} input channels")
    if task == "pia":
        config = dataclasses.replace(config, unet=dataclasses.replace(config.unet, in_channels=PIA_IN_CHANNELS))
    abstract = abstract_models(config, cfg)
    flats = flats or {part: random_weights(abstract[part], seed + i) for i, part in enumerate(PARTS)}
    if task == "pia" and cin == LATENT_CHANNELS:  # a random start's drawn condition channels are zeroed too
        kernel = flats["unet"]["conv_in.kernel"][:, :, :LATENT_CHANNELS]
        flats["unet"]["conv_in.kernel"] = widen_conv_in_kernel(kernel, in_axis=2)
    part = TASK_PARTS[task]
    trainable, rest = split_trainable(flats[part], cfg.trainable)
    trainable = {k: v.astype(np.float32) for k, v in trainable.items()}
    return Setup(config, make_graphs(abstract), cfg, trainable, {**flats, part: rest}, scheduler, tokenizer, part)


def _start_config(cfg: ModelConfig, init_config: model_config.PIAConfig | None) -> model_config.PIAConfig:
    """The model config of a start without a model directory: `init_config`, else `cfg.init` by name."""
    if init_config is None and cfg.init not in model_config.MODELS:
        raise ValueError(f"model.init must be one of {list(model_config.MODELS)} (or give model.model_dir), "
                         f"got {cfg.init!r}")
    return init_config or model_config.MODELS[cfg.init]


def abstract_setup(cfg: ModelConfig, init_config: model_config.PIAConfig | None = None) -> Setup:
    """What `build` returns for PIA, with every weight a jax.ShapeDtypeStruct (fp32) and nothing read or allocated:
    a `Trainer` over it compiles the step, e.g. for a TPU pod from a CPU host (bench/tpu_aot.py). The model comes
    from `init_config`, else `cfg.model_dir`'s config, else `cfg.init`; the UNet takes PIA's 9 input channels."""
    scheduler = schedulers.PIA_DDIM
    if cfg.model_dir and init_config is None:
        config, stored, _ = read_config(cfg.model_dir)
        scheduler = schedulers.from_dict(stored) if stored else scheduler
    else:
        config = _start_config(cfg, init_config)
    config = dataclasses.replace(config, unet=dataclasses.replace(config.unet, in_channels=PIA_IN_CHANNELS))
    abstract = abstract_models(config, cfg)
    shapes = {part: {k: jax.ShapeDtypeStruct(v, jnp.float32) for k, v in param_shapes(abstract[part]).items()}
              for part in PARTS}
    trainable, frozen_unet = split_trainable(shapes["unet"], cfg.trainable)
    return Setup(config, make_graphs(abstract), cfg, trainable, {**shapes, "unet": frozen_unet}, scheduler)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """Global-norm clipping of the (accumulated, averaged) gradient, then AdamW with linear warmup + constant LR.

    The learning rate is injected as a schedule, so the optimizer state carries the value used at each step but a
    resumed run computes it from this config; b1, b2, eps and weight decay are static, not stored in the state. So
    nothing of the config is frozen into a checkpoint: a resumed run uses the values it is given.
    """
    lr = optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps), optax.constant_schedule(cfg.lr)],
                              [cfg.warmup_steps]) if cfg.warmup_steps else optax.constant_schedule(cfg.lr)
    adamw = optax.inject_hyperparams(optax.adamw, static_args=("b1", "b2", "eps", "weight_decay"))(
        learning_rate=lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    parts = [optax.clip_by_global_norm(cfg.clip_norm), adamw]
    return optax.chain(*parts, ema_params(cfg.ema_decay)) if cfg.ema_decay else optax.chain(*parts)


class EmaParamsState(NamedTuple):
    count: jax.Array  # updates averaged so far
    ema: dict  # {path: fp32 array}, sharded like the weights


def ema_params(decay: float) -> optax.GradientTransformation:
    """The last link of the optimizer chain: passes the updates through unchanged and keeps an exponential moving
    average of the weights they produce, so that it is checkpointed, sharded and skipped on a non-finite step with the
    rest of the optimizer state. Update n (from 0) uses min(decay, (1 + n) / (10 + n)), and 0 at n = 0 (the average
    starts at the first step's weights), as diffusers' EMAModel warms its decay up."""

    def init(params):
        return EmaParamsState(jnp.zeros((), jnp.int32), jax.tree.map(lambda p: p.astype(jnp.float32), params))

    def update(updates, state, params):
        d = jnp.where(state.count == 0, 0.0, jnp.minimum(decay, (1.0 + state.count) / (10.0 + state.count)))
        new = optax.apply_updates(params, updates)
        ema = jax.tree.map(lambda e, p: d * e + (1 - d) * p.astype(jnp.float32), state.ema, new)
        return updates, EmaParamsState(state.count + 1, ema)

    return optax.GradientTransformation(init, update)


def weights_to_export(state) -> dict:
    """The trainable weights a run exports and validates with: the moving average where the optimizer keeps one
    (optim.ema_decay > 0), else the last weights."""
    last = state.opt_state[-1]  # make_optimizer's chain: a tuple of its links' states
    return last.ema if isinstance(last, EmaParamsState) else state.params
