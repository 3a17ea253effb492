"""Model configurations as plain data: the full SD1.5 + PIA setup and a tiny one for tests."""

import dataclasses
import types
import typing
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np

# The one vocabulary of dtype names (command lines, training configs, model directories), parsed by `dtype`.
DTYPES = {"fp32": np.dtype(np.float32), "bf16": np.dtype(ml_dtypes.bfloat16), "fp16": np.dtype(np.float16)}


def dtype(name: str) -> np.dtype:
    """The numpy dtype (which jax takes as it is) of a name in DTYPES."""
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {name!r}")
    return DTYPES[name]


# Which GroupNorms pool their statistics over the frames of a clip (all others are per frame).
#   pia:       what pia.ckpt was trained with: ResNet norm1/norm2 and conv_norm_out see 5-D (b, c, f, h, w) tensors.
#   diffusers: diffusers' UNetMotionModel: only the motion-module norm sees the frames.
NORM_SEMANTICS = {
    "pia": frozenset({"resnet", "out"}),
    "diffusers": frozenset({"motion"}),
}


# PIA's UNet input, channels-last: [noisy latent | affinity mask | condition-image latent] (name, width), in order.
# A plain AnimateDiff (text-to-video) UNet takes only the first part.
PIA_INPUT_CHANNELS = (("latent", 4), ("mask", 1), ("condition", 4))
LATENT_CHANNELS = PIA_INPUT_CHANNELS[0][1]
PIA_IN_CHANNELS = sum(n for _, n in PIA_INPUT_CHANNELS)


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = PIA_IN_CHANNELS  # PIA_INPUT_CHANNELS; LATENT_CHANNELS (4) for plain AnimateDiff
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlockMotion",) * 3 + ("DownBlockMotion",)
    up_block_types: tuple[str, ...] = ("UpBlockMotion",) + ("CrossAttnUpBlockMotion",) * 3
    layers_per_block: int = 2
    num_attention_heads: int = 8  # SD1.5's config calls this attention_head_dim; it is the head count
    cross_attention_dim: int = 768
    norm_num_groups: int = 32
    norm_eps: float = 1e-5  # ResNets and conv_norm_out; spatial transformers and motion modules use 1e-6
    motion_num_attention_heads: int = 8
    motion_max_seq_length: int = 32
    motion_mid_block: bool = False  # AnimateDiff v2 motion modules have one; PIA has not
    norm_semantics: str = "pia"
    # IP-Adapter image tokens appended to each spatial cross-attention's context (decoupled attention with
    # to_k_ip/to_v_ip; `pia_jax.models.ip_adapter`); 0: no IP-Adapter, no such parameters
    ip_adapter_tokens: int = 0

    def __post_init__(self):
        if self.norm_semantics not in NORM_SEMANTICS:
            raise ValueError(f"norm_semantics must be one of {sorted(NORM_SEMANTICS)}, got {self.norm_semantics!r}")
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError("down_block_types, up_block_types and block_out_channels need the same length")

    def pooled(self, site: str) -> bool:
        """Whether the GroupNorms at `site` ('resnet', 'out' or 'motion') pool statistics over frames."""
        return site in NORM_SEMANTICS[self.norm_semantics]


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    scaling_factor: float = 0.18215

    @property
    def latent_factor(self) -> int:
        """Pixels per latent pixel along each side (each VAE block after the first halves the image)."""
        return 2 ** (len(self.block_out_channels) - 1)

    def latent_shape(self, height: int, width: int, frames: int) -> tuple[int, int, int, int]:
        """(F, h, w, c) of one video's latents for images of height x width."""
        return frames, height // self.latent_factor, width // self.latent_factor, self.latent_channels


@dataclass(frozen=True)
class TextConfig:
    """The CLIP ViT-L/14 text tower of SD1.5 (field names as in transformers' CLIPTextConfig)."""
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    layer_norm_eps: float = 1e-5


@dataclass(frozen=True)
class VisionConfig:
    """A CLIP vision tower (field names as in transformers' CLIPVisionConfig); ViT-L/14 (OpenAI) by default."""
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"  # OpenAI's towers; OpenCLIP's (LAION) use exact "gelu"

    def __post_init__(self):
        if self.hidden_act not in ("quick_gelu", "gelu"):
            raise ValueError(f"hidden_act must be 'quick_gelu' or 'gelu', got {self.hidden_act!r}")


# OpenCLIP ViT-H/14 (laion2B), IP-Adapter SD1.5's image encoder (h94/IP-Adapter models/image_encoder)
VIT_H_14 = VisionConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                        hidden_act="gelu")


@dataclass(frozen=True)
class IPAdapterConfig:
    """IP-Adapter (SD1.5): the image tower (transformers' CLIPVisionModelWithProjection) whose `image_embeds`
    the projection turns into `num_tokens` context tokens for the UNet's cross-attentions."""
    image_encoder: VisionConfig = field(default_factory=lambda: VIT_H_14)
    image_embed_dim: int = 1024  # the tower's projection_dim: image_proj's input
    num_tokens: int = 4
    cross_attention_dim: int = 768
    # CLIPImageProcessor's defaults, which diffusers' pipelines use for the image encoder
    resize: int = 224
    image_mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class PIAConfig:
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextConfig = field(default_factory=TextConfig)
    ip_adapter: IPAdapterConfig | None = None  # with it, the optional parts image_encoder and image_proj

    def __post_init__(self):
        ip = self.ip_adapter
        if self.unet.ip_adapter_tokens != (ip.num_tokens if ip else 0) or (
                ip and ip.cross_attention_dim != self.unet.cross_attention_dim):
            raise ValueError(f"unet.ip_adapter_tokens ({self.unet.ip_adapter_tokens}) and cross_attention_dim must "
                             f"match the ip_adapter section ({ip})")


SD15_PIA = PIAConfig()

# Small enough for CPU tests, yet with every kind of block, skip connection and GroupNorm grouping
# (several channels per group) of the full model.
TINY = PIAConfig(
    unet=UNetConfig(
        block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlockMotion", "CrossAttnDownBlockMotion", "DownBlockMotion"),
        up_block_types=("UpBlockMotion", "CrossAttnUpBlockMotion", "CrossAttnUpBlockMotion"),
        num_attention_heads=4,
        cross_attention_dim=32,
        norm_num_groups=8,
        motion_num_attention_heads=4,
    ),
    vae=VAEConfig(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8),
    text=TextConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4),
)


# The toy world's model (pia_jax/toy): 32x32 frames, VAE factor 4 (8x8x4 latents), a 4-channel base UNet (PIA
# training widens conv_in) at 8, 4 and 2 latent pixels, a 2-layer text tower over the grammar's ~600 BPE tokens.
TOY = PIAConfig(
    unet=UNetConfig(
        in_channels=4,
        block_out_channels=(64, 96, 128),
        down_block_types=("CrossAttnDownBlockMotion", "CrossAttnDownBlockMotion", "DownBlockMotion"),
        up_block_types=("UpBlockMotion", "CrossAttnUpBlockMotion", "CrossAttnUpBlockMotion"),
        layers_per_block=1,
        num_attention_heads=4,
        cross_attention_dim=64,
        norm_num_groups=16,
        motion_num_attention_heads=4,
    ),
    vae=VAEConfig(block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=16, scaling_factor=1.0),
    text=TextConfig(vocab_size=640, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4),
)
MODELS = {"sd15": SD15_PIA, "tiny": TINY, "toy": TOY}  # by name, for random-weight runs


# The noise scheduler's config is stored with a model (config.json), so it lives with the model configs;
# the schedulers themselves are pia_jax.sampling.schedulers.
SCHEDULER_KINDS = ("ddim", "dpmpp_2m", "lcm", "euler")
_SCHEDULER_CHOICES = {
    "beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
    "timestep_spacing": ("leading", "trailing", "linspace"),
    "prediction_type": ("epsilon", "v_prediction", "sample"),
    "solver_order": (1, 2),
    "algorithm_type": ("dpmsolver++",),
    "solver_type": ("midpoint", "heun"),
    "final_sigmas_type": ("zero", "sigma_min"),
}


@dataclass(frozen=True)
class SchedulerConfig:
    """Keys and meanings as in diffusers' scheduler configs; defaults = the PIA reference (DDIM, linear betas)."""
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "linear"
    steps_offset: int = 1
    timestep_spacing: str = "leading"
    prediction_type: str = "epsilon"
    # DDIM
    set_alpha_to_one: bool = True
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    eta: float = 0.0  # an argument of diffusers' step(); here part of the schedule
    # DPM-Solver++ (multistep)
    solver_order: int = 2
    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    use_karras_sigmas: bool = False
    final_sigmas_type: str = "zero"  # also Euler's
    # LCM (multistep consistency sampling): timesteps are taken from this many evenly spaced "original" steps, and
    # the boundary-condition scalings use timestep * timestep_scaling
    original_inference_steps: int = 50
    timestep_scaling: float = 10.0

    def __post_init__(self):
        for key, allowed in _SCHEDULER_CHOICES.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key}={getattr(self, key)!r} is not supported; choose from {allowed}")
        if self.eta < 0:
            raise ValueError(f"eta must be >= 0, got {self.eta}")
        if not 1 <= self.original_inference_steps <= self.num_train_timesteps:
            raise ValueError(f"original_inference_steps must be in [1, {self.num_train_timesteps}], got "
                             f"{self.original_inference_steps}")
        if not self.timestep_scaling > 0:
            raise ValueError(f"timestep_scaling must be > 0, got {self.timestep_scaling}")


PIA_DDIM = SchedulerConfig()
# What a converted model directory stores, by the source's recommendation (convert_torch_weights.py --scheduler-config).
# AnimateLCM and AnimateDiff-Lightning both say: the base model's scheduler config (SD1.5's: betas 0.00085-0.012)
# with linear betas, i.e. PIA's; Lightning adds trailing timestep spacing, which its Euler sampler needs (for DDIM
# it changes the timesteps too, as diffusers' from_config does). LCM's timesteps ignore the spacing keys.
SCHEDULER_PRESETS = {"pia": PIA_DDIM, "animatelcm": PIA_DDIM,
                     "lightning": dataclasses.replace(PIA_DDIM, timestep_spacing="trailing")}


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def opt(default, help: str, choices=None, **metadata):
    """A config field with its meaning (and its valid values, checked by `from_dict`), for command-line help;
    `metadata` adds other entries (e.g. `pia_jax.sampling.options`' `key`)."""
    return field(default=default, metadata={"help": help, "choices": choices, **metadata})


class ConfigError(ValueError):
    """A config that does not fit its dataclasses: the message names the key and what is valid there."""


def from_dict(cls, data, prefix: str = ""):
    """A `cls` dataclass (nested ones too) from data as YAML or JSON give it, checked against the field types:
    unknown keys, wrong types and values outside a field's `metadata["choices"]` raise ConfigError naming the key.
    Lists become tuples; ints are accepted for floats, and strings of numbers too (YAML 1.1 reads `1e-4` as one)."""
    where = prefix.rstrip(".") or "the config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping of keys to values, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(prefix + str(k) for k in unknown)}; the keys of {where} are: "
                          + ", ".join(fields))
    hints = typing.get_type_hints(cls)
    values = {}
    for k, v in data.items():
        values[k] = _typed(hints[k], v, prefix + k)
        choices = fields[k].metadata.get("choices")
        if choices is not None and values[k] not in choices:
            raise ConfigError(f"{prefix + k} must be one of {list(choices)}, got {v!r}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None


def type_name(tp) -> str:
    """How a field type reads in messages and help: 'float', 'str or null', 'list of str'."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else type_name(a) for a in args)
    if typing.get_origin(tp) is tuple:
        return f"list of {type_name(args[0])}"
    return "section" if dataclasses.is_dataclass(tp) else tp.__name__


def _typed(tp, value, key: str):
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _typed(next(a for a in args if a is not type(None)), value, key)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key + ".")
    if typing.get_origin(tp) is tuple:
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        if args[-1] is not Ellipsis and len(items) != len(args):
            raise ConfigError(f"{key} must be a list of {len(args)} values, got {value!r}")
        return tuple(_typed(args[0], v, key) for v in items)
    if isinstance(value, bool) != (tp is bool):  # True is an int to Python, not to a config
        if tp is bool and isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif isinstance(value, tp):
        return value
    elif tp is float and isinstance(value, (int, str)):
        try:
            return float(value)
        except ValueError:
            pass
    raise ConfigError(f"{key} must be {type_name(tp)}, got {value!r}")
