"""CLIP ViT-L/14 as the metric model (transformers' `CLIPModel`): the vision tower (`pia_jax.models.clip_vision`,
shared with IP-Adapter's image encoder), the text tower SD1.5 already uses (`pia_jax.models.text_encoder`), and the
two linear projections into the shared embedding space.

Attribute paths mirror transformers' parameter names (text_model.*, vision_model.embeddings.patch_embedding,
vision_model.pre_layrnorm [sic], vision_model.encoder.layers[i].*, visual_projection, text_projection), so
`TRANSFORMERS_CLIP` loads `openai/clip-vit-large-patch14` by rule. Images are channels-last, already preprocessed
(`pia_jax.eval.preprocess`).
"""

from dataclasses import dataclass, field

import jax.numpy as jnp
from flax import nnx

from pia_jax.models.clip_vision import CLIPVisionTransformer
from pia_jax.models.config import TextConfig, VisionConfig
from pia_jax.models.layers import Builder
from pia_jax.models.text_encoder import CLIPTextModel
from pia_jax.weights import KeyMap


@dataclass(frozen=True)
class CLIPConfig:
    """openai/clip-vit-large-patch14 by default; its text tower is SD1.5's text encoder."""
    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)  # ViT-L/14 by default
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
