"""The CLIP ViT-L/14 text tower that conditions SD1.5 (transformers' `CLIPTextModel`), in Flax NNX.

Attribute paths mirror transformers' parameter names below `text_model.` (embeddings.token_embedding,
encoder.layers[i].self_attn.q_proj, ..., final_layer_norm), so `weights.TRANSFORMERS_CLIP_TEXT` loads a
checkpoint by rule. The pooled (EOS) output and the projection head are left out: SD1.5 only conditions on the
per-token hidden states.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from pia_jax.models.attention import dot_product_attention
from pia_jax.models.config import TextConfig
from pia_jax.models.layers import Builder


def quick_gelu(x):
    """OpenAI CLIP's sigmoid approximation of GELU, which ViT-L/14 was trained with (`hidden_act="quick_gelu"`)."""
    return x * jax.nn.sigmoid(1.702 * x)


# transformers' `hidden_act` names of the activations CLIP towers use; "gelu" is the exact (erf) form
ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": lambda x: jax.nn.gelu(x, approximate=False)}


class CLIPTextEmbeddings(nnx.Module):
    def __init__(self, mk: Builder, config: TextConfig):
        embed = lambda n: nnx.Embed(n, config.hidden_size, dtype=mk.dtype, param_dtype=mk.param_dtype, rngs=mk.rngs)
        self.token_embedding = embed(config.vocab_size)
        self.position_embedding = embed(config.max_position_embeddings)

    def __call__(self, input_ids_BxL):
        length = input_ids_BxL.shape[-1]
        if length > self.position_embedding.num_embeddings:
            raise ValueError(f"{length} tokens exceed the {self.position_embedding.num_embeddings} positions "
                             "the text encoder was trained with")
        # Absolute positions 0..L-1 (transformers' `position_ids` buffer), broadcast over the batch.
        return self.token_embedding(input_ids_BxL) + self.position_embedding(jnp.arange(length))


class CLIPAttention(nnx.Module):
    """Multi-head self-attention, causal in the text tower (not in the vision tower); q/k/v/out projections all
    carry biases, as in CLIP."""

    def __init__(self, mk: Builder, dim: int, heads: int, kernel: str, causal: bool = True):
        if dim % heads:
            raise ValueError(f"hidden size {dim} is not divisible by {heads} heads")
        self.heads, self.kernel, self.causal = heads, kernel, causal
        self.q_proj = mk.linear(dim, dim)
        self.k_proj = mk.linear(dim, dim)
        self.v_proj = mk.linear(dim, dim)
        self.out_proj = mk.linear(dim, dim)

    def __call__(self, x_BxLxC):
        split = lambda t: t.reshape(*t.shape[:2], self.heads, -1)  # (B, L, C) -> (B, L, H, D)
        # Scale 1/sqrt(D) is the shared function's default and CLIP's `head_dim**-0.5`.
        out = dot_product_attention(split(self.q_proj(x_BxLxC)), split(self.k_proj(x_BxLxC)),
                                    split(self.v_proj(x_BxLxC)), kernel=self.kernel, causal=self.causal)
        return self.out_proj(out.reshape(x_BxLxC.shape))


class CLIPMLP(nnx.Module):
    def __init__(self, mk: Builder, dim: int, inner: int, act: str = "quick_gelu"):
        self.fc1 = mk.linear(dim, inner)
        self.fc2 = mk.linear(inner, dim)
        self.act = ACTIVATIONS[act]

    def __call__(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    """Pre-LayerNorm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x)). `config` is either tower's config
    (the fields hidden_size, intermediate_size, num_attention_heads, layer_norm_eps; hidden_act where it has one,
    else quick_gelu, the text tower's)."""

    def __init__(self, mk: Builder, config: TextConfig, kernel: str, causal: bool = True):
        dim, eps = config.hidden_size, config.layer_norm_eps
        self.self_attn = CLIPAttention(mk, dim, config.num_attention_heads, kernel, causal)
        self.layer_norm1 = mk.layer_norm(dim, eps)
        self.mlp = CLIPMLP(mk, dim, config.intermediate_size, getattr(config, "hidden_act", "quick_gelu"))
        self.layer_norm2 = mk.layer_norm(dim, eps)

    def __call__(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    def __init__(self, mk: Builder, config: TextConfig, kernel: str):
        self.layers = nnx.List([CLIPEncoderLayer(mk, config, kernel) for _ in range(config.num_hidden_layers)])


class CLIPTextModel(nnx.Module):
    """Token ids (B, L <= 77) -> per-token text embeddings (B, L, hidden), the UNet's cross-attention context.

    `dtype` is the compute dtype, `param_dtype` the storage dtype. flax's LayerNorm takes its statistics in fp32
    whatever the compute dtype, and the shared attention function takes its softmax in fp32. Token ids outside
    the vocabulary give NaN embeddings (`jnp.take`'s fill mode) rather than silently wrapping around.
    """

    def __init__(self, config: TextConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 attention_kernel: str = "xla"):
        mk = Builder(rngs, dtype, param_dtype)
        self.config = config
        self.embeddings = CLIPTextEmbeddings(mk, config)
        self.encoder = CLIPEncoder(mk, config, attention_kernel)
        self.final_layer_norm = mk.layer_norm(config.hidden_size, config.layer_norm_eps)

    def __call__(self, input_ids, clip_skip: int | None = None):
        """Returns the last hidden state after `final_layer_norm`.

        `clip_skip=k` follows diffusers' `encode_prompt`: the hidden state k layers before the last (that is
        `hidden_states[-(k + 1)]` of transformers' `output_hidden_states`), then `final_layer_norm`. k=0 is the same
        as None. The skipped layers are simply not run. Must be a Python int (static under `jit`).
        """
        depth = len(self.encoder.layers)
        skip = 0 if clip_skip is None else clip_skip
        if not 0 <= skip <= depth:
            raise ValueError(f"clip_skip must be in [0, {depth}] for a {depth}-layer text encoder, got {clip_skip}")
        x = self.embeddings(jnp.asarray(input_ids))
        for layer in self.encoder.layers[:depth - skip]:
            x = layer(x)
        return self.final_layer_norm(x)
