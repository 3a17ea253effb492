"""CLIP ViT-L/14 as the metric model (transformers' `CLIPModel`): the vision tower, the text tower SD1.5 already
uses (`pia_jax.models.text_encoder`), and the two linear projections into the shared embedding space.

Attribute paths mirror transformers' parameter names (text_model.*, vision_model.embeddings.patch_embedding,
vision_model.pre_layrnorm [sic], vision_model.encoder.layers[i].*, visual_projection, text_projection), so
`TRANSFORMERS_CLIP` loads `openai/clip-vit-large-patch14` by rule. Images are channels-last, already preprocessed
(`pia_jax.eval.preprocess`).
"""

from dataclasses import dataclass, field

import jax.numpy as jnp
from flax import nnx

from pia_jax.models.config import TextConfig
from pia_jax.models.layers import Builder
from pia_jax.models.text_encoder import CLIPEncoderLayer, CLIPTextModel
from pia_jax.weights import KeyMap


@dataclass(frozen=True)
class VisionConfig:
    """The ViT-L/14 vision tower (field names as in transformers' CLIPVisionConfig)."""
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    layer_norm_eps: float = 1e-5


@dataclass(frozen=True)
class CLIPConfig:
    """openai/clip-vit-large-patch14 by default; its text tower is SD1.5's text encoder."""
    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    projection_dim: int = 768
    eos_token_id: int = 49407  # the text embedding is read at the first EOS token
    # CLIPImageProcessor settings: bicubic resize of the short side to `resize`, centre crop to vision.image_size,
    # then (x / 255 - mean) / std
    resize: int = 224
    image_mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)


TRANSFORMERS_CLIP = KeyMap(
    "transformers CLIPModel",
    ignore=((r"(^|\.)position_ids$", "constant buffer (0..n-1), rebuilt by the model"),
            (r"^logit_scale$", "the contrastive loss's temperature; the scores are plain cosines")),
)


class CLIPVisionEmbeddings(nnx.Module):
    def __init__(self, mk: Builder, config: VisionConfig):
        self.patch_size, dim = config.patch_size, config.hidden_size
        self.num_positions = (config.image_size // config.patch_size) ** 2 + 1  # patches + the class token
        self.class_embedding = nnx.Param(nnx.initializers.normal(dim ** -0.5)(mk.rngs.params(), (dim,),
                                                                               mk.param_dtype))
        self.patch_embedding = nnx.Conv(3, dim, (self.patch_size,) * 2, strides=self.patch_size, padding="VALID",
                                        use_bias=False, dtype=mk.dtype, param_dtype=mk.param_dtype, rngs=mk.rngs)
        self.position_embedding = nnx.Embed(self.num_positions, dim, dtype=mk.dtype, param_dtype=mk.param_dtype,
                                            rngs=mk.rngs)

    def __call__(self, pixels_BxHxWx3):
        b = pixels_BxHxWx3.shape[0]
        patches_BxhxwxC = self.patch_embedding(pixels_BxHxWx3)
        patches_BxNxC = patches_BxhxwxC.reshape(b, -1, patches_BxhxwxC.shape[-1])  # row-major, as torch's flatten
        if patches_BxNxC.shape[1] + 1 != self.num_positions:
            raise ValueError(f"images of {pixels_BxHxWx3.shape[1:3]} give {patches_BxNxC.shape[1]} patches; the "
                             f"model has positions for {self.num_positions - 1}")
        cls = jnp.broadcast_to(self.class_embedding[...].astype(patches_BxNxC.dtype), (b, 1, patches_BxNxC.shape[-1]))
        return jnp.concatenate([cls, patches_BxNxC], axis=1) + self.position_embedding(jnp.arange(self.num_positions))


class CLIPVisionEncoder(nnx.Module):
    def __init__(self, mk: Builder, config: VisionConfig, kernel: str):
        self.layers = nnx.List([CLIPEncoderLayer(mk, config, kernel, causal=False)
                                for _ in range(config.num_hidden_layers)])


class CLIPVisionTransformer(nnx.Module):
    """Preprocessed images (B, S, S, 3) -> the pooled class-token state (B, hidden), after post_layernorm."""

    def __init__(self, mk: Builder, config: VisionConfig, kernel: str):
        dim, eps = config.hidden_size, config.layer_norm_eps
        self.embeddings = CLIPVisionEmbeddings(mk, config)
        self.pre_layrnorm = mk.layer_norm(dim, eps)  # transformers' spelling, kept so keys map by rule
        self.encoder = CLIPVisionEncoder(mk, config, kernel)
        self.post_layernorm = mk.layer_norm(dim, eps)

    def __call__(self, pixels_BxHxWx3):
        x = self.pre_layrnorm(self.embeddings(pixels_BxHxWx3))
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x[:, 0])


class CLIPModel(nnx.Module):
    """Image and text features in CLIP's shared space (not normalised; see `cosine`)."""

    def __init__(self, config: CLIPConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 attention_kernel: str = "xla"):
        mk = Builder(rngs, dtype, param_dtype)
        self.config = config
        self.text_model = CLIPTextModel(config.text, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                                        attention_kernel=attention_kernel)
        self.vision_model = CLIPVisionTransformer(mk, config.vision, attention_kernel)
        self.visual_projection = mk.linear(config.vision.hidden_size, config.projection_dim, bias=False)
        self.text_projection = mk.linear(config.text.hidden_size, config.projection_dim, bias=False)

    def get_image_features(self, pixels_BxHxWx3):
        return self.visual_projection(self.vision_model(pixels_BxHxWx3))

    def get_text_features(self, input_ids_BxL):
        """The projected state at each sequence's first EOS token (transformers' pooling; for OpenAI's tokenizer,
        whose EOS is the largest id, this is also the legacy argmax rule)."""
        input_ids_BxL = jnp.asarray(input_ids_BxL)
        states_BxLxD = self.text_model(input_ids_BxL)
        eos_B = jnp.argmax(input_ids_BxL == self.config.eos_token_id, axis=-1)
        return self.text_projection(states_BxLxD[jnp.arange(states_BxLxD.shape[0]), eos_B])


def normalize(x_BxP):
    """Unit-length rows in fp32, so that dot products are cosines."""
    x_BxP = x_BxP.astype(jnp.float32)
    return x_BxP / jnp.linalg.norm(x_BxP, axis=-1, keepdims=True)
