"""Model configurations as plain data: the full SD1.5 + PIA setup and a tiny one for tests."""

import dataclasses
from dataclasses import dataclass, field

# Which GroupNorms pool their statistics over the frames of a clip (all others are per frame).
#   pia:       what pia.ckpt was trained with: ResNet norm1/norm2 and conv_norm_out see 5-D (b, c, f, h, w) tensors.
#   diffusers: diffusers' UNetMotionModel: only the motion-module norm sees the frames.
NORM_SEMANTICS = {
    "pia": frozenset({"resnet", "out"}),
    "diffusers": frozenset({"motion"}),
}


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 9  # [noisy latent (4) | affinity mask (1) | condition latent (4)]; 4 for plain AnimateDiff
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
class PIAConfig:
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextConfig = field(default_factory=TextConfig)


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


def to_dict(config: PIAConfig) -> dict:
    return dataclasses.asdict(config)


def from_dict(data: dict) -> PIAConfig:
    def build(cls, d):
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
    return PIAConfig(unet=build(UNetConfig, data["unet"]), vae=build(VAEConfig, data["vae"]),
                     text=build(TextConfig, data["text"]))
