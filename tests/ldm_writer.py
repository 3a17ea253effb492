"""Writes diffusers/transformers state dicts as an original-Stable-Diffusion (LDM) single-file checkpoint, and
diffusers motion adapters as AnimateDiff/PIA motion-module checkpoints (mm_sd_v15_v2.ckpt, pia.ckpt).

Test-side and deliberately independent of pia_jax.weights.convert: one `re.fullmatch` per diffusers key, written from
the LDM module layout (the semantics of diffusers' scripts/convert_diffusers_to_original_stable_diffusion.py, for
any number of blocks and layers) and AnimateDiff's module names. Its output is checked by diffusers' own
single-file loaders in the tests.
"""

import math
import re

import torch

UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
SCHEDULE = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
            "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
            "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2")


def unet_key(key: str, config) -> str:
    """diffusers UNet2DConditionModel key -> LDM UNetModel key (without model.diffusion_model.)."""
    per = config["layers_per_block"]
    up_attention = ["CrossAttn" in t for t in config["up_block_types"]]
    if m := re.fullmatch(r"time_embedding\.linear_([12])\.(\w+)", key):
        return f"time_embed.{0 if m[1] == '1' else 2}.{m[2]}"
    simple = {"conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
              "mid_block.attentions.0": "middle_block.1"}
    if m := re.fullmatch(r"(conv_in|conv_norm_out|conv_out|mid_block\.attentions\.0)\.(.+)", key):
        return f"{simple[m[1]]}.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d)\.(\w+)\.(\w+)", key):
        return f"middle_block.{2 * int(m[1])}.{UNET_RESNET[m[2]]}.{m[3]}"
    if m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        side, block, kind, layer, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
        index = 1 + block * (per + 1) + layer if side == "down" else block * (per + 1) + layer
        if kind == "resnets":
            sub, leaf = rest.split(".")
            rest = f"{UNET_RESNET[sub]}.{leaf}"
        return f"{'input' if side == 'down' else 'output'}_blocks.{index}.{0 if kind == 'resnets' else 1}.{rest}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * (per + 1)}.0.op.{m[2]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", key):
        block = int(m[1])
        return f"output_blocks.{block * (per + 1) + per}.{2 if up_attention[block] else 1}.conv.{m[2]}"
    raise KeyError(key)


def vae_key(key: str, config) -> str:
    """diffusers AutoencoderKL key -> LDM AutoencoderKL key (without first_stage_model.)."""
    n = len(config["block_out_channels"])
    key = key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(\w+)", key):
        return f"{m[1]}.mid.attn_1.{VAE_ATTENTION[m[2]]}.{m[3]}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.{m[2]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(.+)", key):  # LDM stores the decoder deepest first
        return f"decoder.up.{n - 1 - int(m[1])}.block.{m[2]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key):
        return f"decoder.up.{n - 1 - int(m[1])}.upsample.{m[2]}"
    return key  # conv_in, conv_out, norm_out, quant_conv, post_quant_conv keep their names


def vae_value(key: str, value):
    """LDM's VAE attention projections are 1x1 convs."""
    return value[:, :, None, None] if ".mid.attn_1." in key and value.ndim == 2 else value


def ldm_checkpoint(unet=None, unet_config=None, vae=None, vae_config=None, text=None, ema=None,
                   legacy_text=False, schedule=True) -> dict:
    """{LDM key: tensor} from diffusers state dicts: `unet` (and an `ema` copy of it) under model.diffusion_model. /
    model_ema.<flattened>, `vae` under first_stage_model., `text` under cond_stage_model.transformer. (without the
    text_model. level if legacy_text), plus the DDPM schedule buffers and the CLIP position_ids, as SD files hold."""
    out = {}
    for key, value in (unet or {}).items():
        out["model.diffusion_model." + unet_key(key, unet_config)] = value
    for key, value in (ema or {}).items():  # LitEma: the parameter name under `model`, dots removed
        out["model_ema." + ("diffusion_model." + unet_key(key, unet_config)).replace(".", "")] = value
    if ema:
        out["model_ema.decay"], out["model_ema.num_updates"] = torch.tensor(0.9999), torch.tensor(1000)
    for key, value in (vae or {}).items():
        name = vae_key(key, vae_config)
        out["first_stage_model." + name] = vae_value(name, value)
    if text:
        prefix = "cond_stage_model.transformer." + ("" if legacy_text else "text_model.")
        out.update({prefix + key.removeprefix("text_model."): value for key, value in text.items()})
        out[prefix + "embeddings.position_ids"] = torch.arange(77)[None]
    if schedule:
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
        out.update({name: (betas * (i + 1)).float() for i, name in enumerate(SCHEDULE)})  # values do not matter
    return out


def vae_file(vae, vae_config, prefix="", loss=True) -> dict:
    """A separate VAE checkpoint (like vae-ft-mse-840000-ema-pruned.ckpt): LDM keys, optionally with the
    training loss's LPIPS/discriminator tensors."""
    out = {prefix + vae_key(k, vae_config): vae_value(vae_key(k, vae_config), v) for k, v in vae.items()}
    if loss:
        out.update({prefix + "loss.logvar": torch.zeros(()),
                    prefix + "loss.discriminator.main.0.weight": torch.randn(8, 3, 4, 4),
                    prefix + "loss.perceptual_loss.lin0.model.1.weight": torch.randn(1, 64, 1, 1)})
    return out


TO_ANIMATEDIFF = {"attn1": "attention_blocks.0", "attn2": "attention_blocks.1", "norm1": "norms.0",
                  "norm2": "norms.1", "norm3": "ff_norm"}


def animatediff_positions(length, dim, dtype=torch.float32):
    """AnimateDiff's PositionalEncoding buffer (1, length, dim), computed the way its module computes it."""
    position = torch.arange(length).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, dim, 2) * (-math.log(10000.0) / dim))
    pe = torch.zeros(1, length, dim)
    pe[0, :, 0::2] = torch.sin(position * div_term)
    pe[0, :, 1::2] = torch.cos(position * div_term)
    return pe.to(dtype)


def animatediff_checkpoint(state: dict, max_len: int) -> dict:
    """diffusers MotionAdapter / UNetMotionModel state -> AnimateDiff naming, with AnimateDiff's position tables;
    other keys (conv_in, spatial UNet weights) are kept as they are."""
    out = {}
    for key, value in state.items():
        m = re.fullmatch(r"(.+\.motion_modules\.\d+)\.(.+)", key)
        if m is None:
            out[key] = value
        elif not m[2].endswith("pos_embed.pe"):  # diffusers' own table: AnimateDiff has one per attention instead
            rest = re.sub(r"^transformer_blocks\.(\d+)\.(attn1|attn2|norm1|norm2|norm3)\.",
                          lambda t: f"transformer_blocks.{t[1]}.{TO_ANIMATEDIFF[t[2]]}.", m[2])
            out[f"{m[1]}.temporal_transformer.{rest}"] = value
            if rest == "norm.weight":
                for attention in (0, 1):
                    out[f"{m[1]}.temporal_transformer.transformer_blocks.0.attention_blocks.{attention}."
                        "pos_encoder.pe"] = animatediff_positions(max_len, value.shape[0], value.dtype)
    return out
