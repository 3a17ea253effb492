"""CLIP's vision tower in Flax NNX: the ViT-L/14 of the CLIP metric model (`pia_jax.eval.clip`) and the OpenCLIP
ViT-H/14 image encoder of IP-Adapter, one module with a config for each (`VisionConfig`, `VIT_H_14`).

Attribute paths mirror transformers' parameter names (embeddings.patch_embedding, pre_layrnorm [sic],
encoder.layers[i].*, post_layernorm; `visual_projection` for `CLIPVisionModelWithProjection`), so their checkpoints
load by rule. Images are channels-last, already preprocessed (CLIPImageProcessor's resize, crop and normalisation).
"""

import jax.numpy as jnp
from flax import nnx

from pia_jax.models.config import VIT_H_14, IPAdapterConfig, VisionConfig
from pia_jax.models.layers import Builder
from pia_jax.models.text_encoder import CLIPEncoderLayer

__all__ = ["VIT_H_14", "CLIPVisionModelWithProjection", "CLIPVisionTransformer", "VisionConfig"]


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


class CLIPVisionModelWithProjection(nnx.Module):
    """transformers' CLIPVisionModelWithProjection: preprocessed images (B, S, S, 3) -> `image_embeds`
    (B, image_embed_dim), the projected class token, not normalised (IP-Adapter's image_proj input). Built from an
    `IPAdapterConfig` (its image_encoder tower and image_embed_dim, transformers' projection_dim)."""

    def __init__(self, config: IPAdapterConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 attention_kernel: str = "xla"):
        mk = Builder(rngs, dtype, param_dtype)
        self.config = config
        self.vision_model = CLIPVisionTransformer(mk, config.image_encoder, attention_kernel)
        self.visual_projection = mk.linear(config.image_encoder.hidden_size, config.image_embed_dim, bias=False)

    def __call__(self, pixels_BxHxWx3):
        return self.visual_projection(self.vision_model(pixels_BxHxWx3))
