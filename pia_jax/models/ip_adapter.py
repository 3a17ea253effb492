"""IP-Adapter (SD1.5): the image projection and the decoupled cross-attention of the UNet.

`ImageProjection` turns the image encoder's `image_embeds` (`pia_jax.models.clip_vision`) into `num_tokens` context
tokens (a Linear, then a LayerNorm per token; diffusers' `ImageProjection`). Each spatial cross-attention then adds
the attention of its queries over those tokens, through its own key/value projections `to_k_ip`/`to_v_ip`, scaled:

    out = to_out(attention(q, to_k(text), to_v(text)) + scale * attention(q, to_k_ip(image), to_v_ip(image)))

as diffusers' `IPAdapterAttnProcessor2_0`. The UNet carries the image tokens through its blocks in the cross-attention
context itself (`append_image_tokens`): [text | image tokens | scale * image tokens], the last rows feeding `to_v_ip`
only. As `to_v_ip` is linear without bias, to_v_ip(scale * image) = scale * to_v_ip(image): the scale (a number or
one per video) reaches the output exactly where diffusers applies it, and frame chunks, per-frame text and every
other path the context takes carry it unchanged.
"""

import jax.numpy as jnp
from flax import nnx

from pia_jax.models.attention import dot_product_attention
from pia_jax.models.config import IPAdapterConfig, UNetConfig
from pia_jax.models.layers import Attention, Builder


class ImageProjection(nnx.Module):
    """image_embeds (B, image_embed_dim) -> image tokens (B, num_tokens, cross_attention_dim)."""

    def __init__(self, config: IPAdapterConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        mk = Builder(rngs, dtype, param_dtype)
        self.config = config
        self.proj = mk.linear(config.image_embed_dim, config.num_tokens * config.cross_attention_dim)
        self.norm = mk.layer_norm(config.cross_attention_dim)  # torch's LayerNorm default eps 1e-5

    def __call__(self, image_embeds_BxE):
        tokens = self.proj(image_embeds_BxE).reshape(image_embeds_BxE.shape[0], self.config.num_tokens, -1)
        return self.norm(tokens)


def cross_attention_sites(cfg: UNetConfig) -> list[str]:
    """The transformer blocks holding a spatial cross-attention (attn2), in the order diffusers numbers IP-Adapter
    layers (its `attn_processors`: down blocks, up blocks, then the mid block); layer k holds the file's keys
    `{2k+1}.to_k_ip.weight` / `.to_v_ip.weight`."""
    n = cfg.layers_per_block
    down = [f"down_blocks.{i}.attentions.{j}" for i, kind in enumerate(cfg.down_block_types)
            if kind.startswith("CrossAttn") for j in range(n)]
    up = [f"up_blocks.{i}.attentions.{j}" for i, kind in enumerate(cfg.up_block_types)
          if kind.startswith("CrossAttn") for j in range(n + 1)]
    return [f"{site}.transformer_blocks.0" for site in down + up + ["mid_block.attentions.0"]]


class IPAttention(nnx.Module):
    """A cross-attention (`layers.Attention`, whose projections it takes over under the same names) plus the
    attention over the image tokens at the end of its context (the module docstring)."""

    def __init__(self, base: Attention, mk: Builder, context_dim: int, tokens: int):
        self.heads, self.kernel, self.tokens = base.heads, base.kernel, tokens
        self.to_q, self.to_k, self.to_v, self.to_out = base.to_q, base.to_k, base.to_v, base.to_out
        dim = base.to_q.out_features
        self.to_k_ip = mk.linear(context_dim, dim, bias=False)
        self.to_v_ip = mk.linear(context_dim, dim, bias=False)

    def __call__(self, x_BxLxC, context):
        n = self.tokens
        text, image, scaled_image = context[:, :-2 * n], context[:, -2 * n:-n], context[:, -n:]
        split = lambda t: t.reshape(*t.shape[:2], self.heads, -1)  # (B, L, C) -> (B, L, H, D)
        q = split(self.to_q(x_BxLxC))
        out = dot_product_attention(q, split(self.to_k(text)), split(self.to_v(text)), kernel=self.kernel)
        out = out + dot_product_attention(q, split(self.to_k_ip(image)), split(self.to_v_ip(scaled_image)),
                                          kernel=self.kernel)
        return self.to_out[0](out.reshape(x_BxLxC.shape[:2] + (-1,)))


def add_ip_attention(unet: nnx.Module, mk: Builder, cfg: UNetConfig):
    """Turns every spatial cross-attention of a just-built UNet into an `IPAttention` (its new parameters drawn
    after all others, so the rest initialise as without an IP-Adapter)."""
    for site in cross_attention_sites(cfg):
        block = unet
        for name in site.split("."):
            block = block[int(name)] if name.isdigit() else getattr(block, name)
        block.attn2 = IPAttention(block.attn2, mk, cfg.cross_attention_dim, cfg.ip_adapter_tokens)


def append_image_tokens(context, image_tokens, scale, tokens: int):
    """The UNet's cross-attention context with the image tokens appended as IPAttention reads them.

    context (b, T, D) or per frame (b, f, T, D); image_tokens (b, n, D) (`ImageProjection`'s output), or None on a
    model with an IP-Adapter: no image prompt (zero tokens, whose attention adds exactly 0: uniform weights over
    zero values); scale a number or one per video (b,)."""
    if not tokens:
        if image_tokens is not None:
            raise ValueError("image_tokens given to a UNet without an IP-Adapter (convert with --ip-adapter)")
        return context
    b, d = context.shape[0], context.shape[-1]
    if image_tokens is None:
        image_tokens, scale = jnp.zeros((b, tokens, d), context.dtype), 0.0
    if image_tokens.shape != (b, tokens, d):
        raise ValueError(f"image_tokens must be (b, {tokens}, {d}) = ({b}, {tokens}, {d}), got {image_tokens.shape}")
    image_tokens = image_tokens.astype(context.dtype)
    scale = jnp.broadcast_to(jnp.asarray(scale, context.dtype), (b,))[:, None, None]
    rows = jnp.concatenate([image_tokens, scale * image_tokens], axis=1)  # (b, 2n, D)
    if context.ndim == 4:
        rows = jnp.broadcast_to(rows[:, None], (b, context.shape[1]) + rows.shape[1:])
    return jnp.concatenate([context, rows], axis=-2)
