"""Original-Stable-Diffusion (LDM) single-file checkpoints -> diffusers/transformers-named numpy state dicts.

The rules are data. Per part, a table {LDM module: (diffusers module, kind)} is built from the config, so the block
indices follow layers_per_block and the number of blocks; a kind lists the sub-module renames inside such a module
(ResNet, spatial transformer, VAE attention), each matched against the whole sub-module name. Every source tensor is
converted, or consumed by a named ignore rule, or reported: one WeightLoadError lists all keys no rule explains.
Checkpoints of the wrong kind (SDXL, SD2.x, inpainting, motion modules, LoRAs) are named before any conversion.
"""

import re
from collections import Counter
from typing import Mapping, NamedTuple

import numpy as np

from pia_jax.weights import WeightLoadError

UNET, VAE, TEXT, EMA = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.", "model_ema."

# (name, pattern, reason): source tensors consumed without a target
VAE_LOSS = ("vae training loss", r"^(first_stage_model\.)?loss\.", "LPIPS and discriminator of the VAE's training loss")
IGNORE = (
    ("ddpm schedule", r"^(betas|alphas_cumprod(_prev)?|sqrt_(one_minus_|recip_|recipm1_)?alphas_cumprod"
                      r"|log_one_minus_alphas_cumprod|posterior_(variance|log_variance_clipped|mean_coef[12])"
                      r"|logvar|lvlb_weights)$", "DDPM noise-schedule buffers; the sampler's scheduler owns these"),
    ("ema bookkeeping", r"^model_ema\.(decay|num_updates)$", "EMA decay rate and step counter"),
    ("text position_ids", r"^cond_stage_model\.transformer\.(text_model\.)?embeddings\.position_ids$",
     "constant 0..76 buffer (some merges store it as broken floats); the model rebuilds it"),
    VAE_LOSS,
)
UNUSED_EMA = ("ema unet (not extracted)", r"^model_ema\.", "EMA copy of the UNet; pass extract_ema=True to use it")
REPLACED_BY_EMA = "non-ema unet (replaced)"  # with extract_ema: the raw UNet weights the EMA copies stand in for


class Kind(NamedTuple):
    rules: tuple[tuple[str, str], ...]  # (sub-module pattern, replacement), the first full match wins
    squeeze: bool = False  # 1x1 convs stored for Linear layers


LEAF = Kind((("", ""),))  # the module itself holds the weight/bias: conv_in, time_embed.0, ...
UNET_RESNET = Kind(((r"in_layers\.0", "norm1"), (r"in_layers\.2", "conv1"), (r"emb_layers\.1", "time_emb_proj"),
                    (r"out_layers\.0", "norm2"), (r"out_layers\.3", "conv2"), (r"skip_connection", "conv_shortcut")))
TRANSFORMER = Kind(((r"norm|proj_in|proj_out|transformer_blocks\.\d+\.(norm[123]|attn[12]\.(to_[qkv]|to_out\.0)"
                     r"|ff\.net\.(0\.proj|2))", r"\g<0>"),))  # same names on both sides
VAE_RESNET = Kind(((r"norm[12]|conv[12]", r"\g<0>"), (r"nin_shortcut", "conv_shortcut")))
VAE_ATTENTION = Kind(((r"norm", "group_norm"), (r"[qkv]", r"to_\g<0>"), (r"proj_out", "to_out.0")), squeeze=True)
TEXT_KEY = re.compile(r"(text_model\.)?((embeddings\.(token|position)_embedding|encoder\.layers\.\d+\.(self_attn\."
                      r"[qkvo]\w*_proj|layer_norm[12]|mlp\.fc[12])|final_layer_norm)\.(weight|bias))")


def unet_table(cfg) -> dict[str, tuple[str, Kind]]:
    """LDM UNet modules (under model.diffusion_model.) -> diffusers UNet2DConditionModel modules."""
    n, per = len(cfg.block_out_channels), cfg.layers_per_block
    table = {"time_embed.0": ("time_embedding.linear_1", LEAF), "time_embed.2": ("time_embedding.linear_2", LEAF),
             "input_blocks.0.0": ("conv_in", LEAF), "out.0": ("conv_norm_out", LEAF), "out.2": ("conv_out", LEAF),
             "middle_block.0": ("mid_block.resnets.0", UNET_RESNET),
             "middle_block.1": ("mid_block.attentions.0", TRANSFORMER),
             "middle_block.2": ("mid_block.resnets.1", UNET_RESNET)}
    for b in range(n):
        down_attn, up_attn = "CrossAttn" in cfg.down_block_types[b], "CrossAttn" in cfg.up_block_types[b]
        for j in range(per):  # input_blocks.0 is conv_in; each down block adds `per` layers and a downsampler
            i = 1 + b * (per + 1) + j
            table[f"input_blocks.{i}.0"] = (f"down_blocks.{b}.resnets.{j}", UNET_RESNET)
            if down_attn:
                table[f"input_blocks.{i}.1"] = (f"down_blocks.{b}.attentions.{j}", TRANSFORMER)
        for j in range(per + 1):
            i = b * (per + 1) + j
            table[f"output_blocks.{i}.0"] = (f"up_blocks.{b}.resnets.{j}", UNET_RESNET)
            if up_attn:
                table[f"output_blocks.{i}.1"] = (f"up_blocks.{b}.attentions.{j}", TRANSFORMER)
        if b < n - 1:
            table[f"input_blocks.{(b + 1) * (per + 1)}.0.op"] = (f"down_blocks.{b}.downsamplers.0.conv", LEAF)
            # the upsampler follows the last layer's resnet (and attention, if any)
            table[f"output_blocks.{b * (per + 1) + per}.{2 if up_attn else 1}.conv"] = (
                f"up_blocks.{b}.upsamplers.0.conv", LEAF)
    return table


def vae_table(cfg) -> dict[str, tuple[str, Kind]]:
    """LDM VAE modules (under first_stage_model.) -> diffusers AutoencoderKL modules; the decoder's `up` list is
    stored deepest first, diffusers' `up_blocks` shallowest first."""
    n, per = len(cfg.block_out_channels), cfg.layers_per_block
    table = {name: (name, LEAF) for name in ("quant_conv", "post_quant_conv")}
    for side in ("encoder", "decoder"):
        table.update({f"{side}.conv_in": (f"{side}.conv_in", LEAF), f"{side}.conv_out": (f"{side}.conv_out", LEAF),
                      f"{side}.norm_out": (f"{side}.conv_norm_out", LEAF),
                      f"{side}.mid.block_1": (f"{side}.mid_block.resnets.0", VAE_RESNET),
                      f"{side}.mid.block_2": (f"{side}.mid_block.resnets.1", VAE_RESNET),
                      f"{side}.mid.attn_1": (f"{side}.mid_block.attentions.0", VAE_ATTENTION)})
    for i in range(n):
        table.update({f"encoder.down.{i}.block.{j}": (f"encoder.down_blocks.{i}.resnets.{j}", VAE_RESNET)
                      for j in range(per)})
        table.update({f"decoder.up.{n - 1 - i}.block.{j}": (f"decoder.up_blocks.{i}.resnets.{j}", VAE_RESNET)
                      for j in range(per + 1)})
        if i < n - 1:
            table[f"encoder.down.{i}.downsample.conv"] = (f"encoder.down_blocks.{i}.downsamplers.0.conv", LEAF)
            table[f"decoder.up.{n - 1 - i}.upsample.conv"] = (f"decoder.up_blocks.{i}.upsamplers.0.conv", LEAF)
    return table


def key_list(keys) -> str:
    """The first ten keys, one a line, and how many more: for error messages."""
    keys = sorted(keys)
    more = f"\n  ... and {len(keys) - 10} more" if len(keys) > 10 else ""
    return "\n  " + "\n  ".join(keys[:10]) + more


def guess_kind(sd: Mapping) -> str:
    """What a state dict looks like, from its key names: for errors when a file of the wrong kind is passed."""
    kinds = (
        (r"^(conditioner\.embedders\.|model\.diffusion_model\.label_emb\.|add_embedding\.)", "an SDXL model"),
        (r"lora_(up|down|[AB])\b|\.lora\.|_lora\.|^lora_(unet|te)", "a LoRA"),
        (r"(^|\.)motion_modules\.", "AnimateDiff/PIA motion modules"),
        (r"^(model\.diffusion_model|first_stage_model|cond_stage_model)\.", "an LDM (original SD) checkpoint"),
        (r"^(encoder|decoder)\.(down|up)\.\d|^(encoder|decoder)\.mid\.block_", "an LDM-format VAE"),
        (r"^(encoder|decoder)\.(down|up)_blocks\.", "a diffusers AutoencoderKL"),
        (r"^(down|up)_blocks\.\d+\.(resnets|attentions)\.", "a diffusers UNet"),
        (r"^(text_model\.)?encoder\.layers\.\d+\.self_attn", "a CLIP text encoder"),
    )
    for pattern, kind in kinds:
        if any(re.search(pattern, k) for k in sd):
            return kind
    return f"nothing known (first keys: {sorted(sd)[:5]})"


def _check_sd1(sd: Mapping, unet_cfg):
    """Refuses checkpoints that are not an SD1.x text-to-image model, saying what they look like."""
    expects = "PIA animates SD1.x-family models (CLIP ViT-L text encoder, 768-d cross-attention, 4-channel UNet)"
    if guess_kind(sd) == "an SDXL model":
        raise WeightLoadError(f"this is an SDXL checkpoint (conditioner.embedders / label_emb keys); {expects}")
    to_k = [v for k, v in sd.items() if k.startswith(UNET) and k.endswith("attn2.to_k.weight")]
    evidence = {"an OpenCLIP text encoder (cond_stage_model.model.*)":
                any(k.startswith("cond_stage_model.model.") for k in sd),
                "1024-d cross-attention": bool(to_k) and to_k[0].shape[1] == 1024 != unet_cfg.cross_attention_dim,
                "linear proj_in layers": any(k.startswith(UNET) and k.endswith("proj_in.weight") and np.ndim(v) == 2
                                             for k, v in sd.items())}
    sd2 = [what for what, found in evidence.items() if found]
    if sd2:
        raise WeightLoadError(f"this looks like a Stable Diffusion 2.x checkpoint ({', '.join(sd2)}); {expects}")
    if not any(k.startswith((UNET, VAE, TEXT, EMA)) for k in sd):
        raise WeightLoadError(f"not an LDM single-file SD checkpoint (no model.diffusion_model / first_stage_model / "
                              f"cond_stage_model keys): it looks like {guess_kind(sd)}")
    conv_in = sd.get(UNET + "input_blocks.0.0.weight")
    if conv_in is not None and conv_in.shape[1] != 4:
        what = {9: "an inpainting model (latent + mask + masked-image latent)", 8: "an InstructPix2Pix model"}
        raise WeightLoadError(f"the UNet takes {conv_in.shape[1]} input channels: "
                              f"{what.get(conv_in.shape[1], 'not a text-to-image model')}, not a PIA base. PIA's own "
                              "9 input channels come from the PIA checkpoint; use a 4-channel text-to-image SD1.x "
                              "model")
    if to_k and to_k[0].shape[1] != unet_cfg.cross_attention_dim:
        raise WeightLoadError(f"the UNet cross-attends to {to_k[0].shape[1]}-d text features, the UNet config expects "
                              f"{unet_cfg.cross_attention_dim}")


def _rename(key: str, table: Mapping[str, tuple[str, Kind]]):
    """(diffusers key, Kind) for a key inside a part, by its longest module prefix in `table`; None if no rule."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        hit = table.get(".".join(parts[:cut]))
        if hit is None:
            continue
        target, kind = hit
        sub, leaf = ".".join(parts[cut:-1]), parts[-1]
        for pattern, repl in kind.rules:
            m = re.fullmatch(pattern, sub)
            if m and leaf in ("weight", "bias"):
                return ".".join(filter(None, (target, m.expand(repl), leaf))), kind
        return None
    return None


def _convert(items, table):
    """{key inside a part: (source key, array)} -> ({diffusers key: array}, [source keys no rule converts])."""
    out, unknown = {}, []
    for key, (source, value) in items.items():
        hit = _rename(key, table)
        if hit is not None and hit[1].squeeze and np.ndim(value) > 2:
            if all(d == 1 for d in value.shape[2:]):
                value = value.reshape(value.shape[:2])
            else:
                hit = None
        if hit is None:
            unknown.append(source)
        else:
            out[hit[0]] = value
    return out, unknown


def _convert_text(items):
    """Adds the `text_model.` level that files from old transformers versions lack."""
    out, unknown = {}, []
    for key, (source, value) in items.items():
        m = TEXT_KEY.fullmatch(key)
        if m is None:
            unknown.append(source)
        else:
            out["text_model." + m.group(2)] = value
    return out, unknown


def _sort(sd, ignore, prefixes, ignored: Counter):
    """Source tensors by part: ({part: {key inside the part: (source key, array)}}, [keys of no part]); tensors an
    ignore rule consumes are counted in `ignored`."""
    pools, unknown = {part: {} for part in prefixes.values()}, []
    for key, value in sd.items():
        rule = next((name for name, pattern, _ in ignore if re.search(pattern, key)), None)
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        if rule is not None:
            ignored[rule] += 1
        elif prefix is None:
            unknown.append(key)
        else:
            pools[prefixes[prefix]][key[len(prefix):]] = (key, value)
    return pools, unknown


def _fail_unknown(unknown, hint):
    raise WeightLoadError(f"{len(unknown)} checkpoint tensor{'s' * (len(unknown) != 1)} match no conversion rule "
                          f"({hint}):{key_list(unknown)}")


def split_ldm_checkpoint(sd: Mapping[str, np.ndarray], unet_config, vae_config, extract_ema: bool = False):
    """An LDM single-file checkpoint -> ({"unet", "vae", "text_encoder"}: diffusers/transformers-named dicts, report).

    Parts the file does not hold are left out. `report` = {"converted": {part: tensors}, "ignored": {rule: tensors}}.
    With extract_ema the UNet comes from the `model_ema.<key without dots>` copies (files that kept only the EMA
    weights hold them in model.diffusion_model already and need no flag).
    """
    _check_sd1(sd, unet_config)
    ignored = Counter()
    sd = dict(sd)
    if extract_ema:  # LitEma names each parameter of `model` by its name with the dots removed
        ema = {k: EMA + k[len("model."):].replace(".", "") for k in sd if k.startswith(UNET)}
        if not any(k.startswith(EMA) and not k.endswith((".decay", ".num_updates")) for k in sd):
            raise WeightLoadError("extract_ema=True but the file has no model_ema.* weights: it probably holds only "
                                  "the EMA weights already (e.g. *-emaonly files); pass extract_ema=False")
        missing = [f"{e} (for {k})" for k, e in ema.items() if e not in sd]
        if missing:
            raise WeightLoadError(f"extract_ema=True but {len(missing)} UNet weights have no EMA copy:"
                                  f"{key_list(missing)}")
        ignored[REPLACED_BY_EMA] = len(ema)
        sd.update({k: sd.pop(e) for k, e in ema.items()})  # the EMA copies take the UNet's place
    ignore = IGNORE + (() if extract_ema else (UNUSED_EMA,))
    pools, unknown = _sort(sd, ignore, {UNET: "unet", VAE: "vae", TEXT: "text_encoder"}, ignored)
    parts, tables = {}, {"unet": unet_table(unet_config), "vae": vae_table(vae_config)}
    for part, items in pools.items():
        if items:
            parts[part], bad = _convert_text(items) if part == "text_encoder" else _convert(items, tables[part])
            unknown += bad
    if unknown:
        _fail_unknown(unknown, f"does the file fit the configs? UNet: {len(unet_config.block_out_channels)} blocks "
                               f"of {unet_config.layers_per_block} layers, VAE: {len(vae_config.block_out_channels)} "
                               f"blocks of {vae_config.layers_per_block}")
    return parts, {"converted": {p: len(v) for p, v in parts.items()}, "ignored": dict(ignored)}


def convert_ldm_vae(sd: Mapping[str, np.ndarray], vae_config):
    """A separate VAE file -> (diffusers AutoencoderKL-named dict, report). Takes LDM keys with or without the
    `first_stage_model.` prefix (and the `loss.*` tensors of training checkpoints), or diffusers keys as they are."""
    kind = guess_kind(sd)
    if kind == "a diffusers AutoencoderKL":
        return dict(sd), {"converted": {"vae": len(sd)}, "ignored": {}}
    if any(k.startswith((UNET, TEXT)) for k in sd):
        raise WeightLoadError("this VAE file holds a whole SD checkpoint (UNet / text encoder keys); pass it as the "
                              "base model, or take split_ldm_checkpoint(...)[0]['vae']")
    if kind not in ("an LDM-format VAE", "an LDM (original SD) checkpoint"):
        raise WeightLoadError(f"not a VAE checkpoint: it looks like {kind}")
    ignored = Counter()
    pools, _ = _sort(sd, (VAE_LOSS,), {VAE: "vae", "": "vae"}, ignored)
    vae, unknown = _convert(pools["vae"], vae_table(vae_config))
    if unknown:
        _fail_unknown(unknown, f"does the file fit the VAE config? {len(vae_config.block_out_channels)} blocks of "
                               f"{vae_config.layers_per_block} layers")
    return vae, {"converted": {"vae": len(vae)}, "ignored": dict(ignored)}
