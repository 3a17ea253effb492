"""AnimateDiff / PIA motion-module checkpoints -> diffusers MotionAdapter-named numpy state dicts.

AnimateDiff files (mm_sd_v15_v2.ckpt, pia.ckpt) name a motion module's weights `temporal_transformer.
transformer_blocks.0.attention_blocks.{0,1}` / `norms.{0,1}` / `ff_norm`, diffusers names them `transformer_blocks.0.
attn1/attn2` / `norm1/norm2` / `norm3`; the renames below are the whole difference. Both namings are accepted, also
inside a full PIA-trained UNet state dict, whose spatial weights come back separately. The stored position tables
are checked against the sinusoid our model computes, then dropped.
"""

import re
from collections.abc import Mapping

import numpy as np

from pia_jax.models.motion import sinusoidal_positions
from pia_jax.weights import WeightLoadError
from pia_jax.weights.convert.ldm import guess_kind, key_list

MOTION_KEY = re.compile(r"((?:down|up)_blocks\.(\d+)|mid_block)\.motion_modules\.(\d+)\.(.+)")
RENAMES = ((r"^temporal_transformer\.", ""), (r"\.attention_blocks\.0\.", ".attn1."),
           (r"\.attention_blocks\.1\.", ".attn2."), (r"\.norms\.0\.", ".norm1."), (r"\.norms\.1\.", ".norm2."),
           (r"\.ff_norm\.", ".norm3."))
# a motion module's parameters, in diffusers names
PARAM = re.compile(r"(norm|proj_in|proj_out|transformer_blocks\.\d+\.(norm[123]|attn[12]\.(to_[qkv]|to_out\.0)"
                   r"|ff\.net\.(0\.proj|2)))\.(weight|bias)")
# position tables: one per attention in AnimateDiff files, one per transformer block in diffusers'
POSITIONS = re.compile(r"transformer_blocks\.\d+\.(attn[12]\.pos_encoder|pos_embed)\.pe")
# what else a full PIA-trained UNet holds: the spatial UNet, in diffusers names
SPATIAL = re.compile(r"(conv_norm_out|conv_out|time_embedding\.linear_[12])\.(weight|bias)"
                     r"|((down|up)_blocks\.\d+\.(resnets|attentions|downsamplers|upsamplers)|mid_block\.(resnets|"
                     r"attentions))\.\d+\..+")
POSITION_ATOL = 1e-2  # bf16 storage rounds values <= 1 by <= 4e-3; any other encoding differs by O(0.1..1)
SDXL_CHANNELS = (320, 640, 1280)


def _rename(rest: str) -> str:
    for pattern, repl in RENAMES:
        rest = re.sub(pattern, repl, rest)
    return rest


def diffusers_name(name: str) -> str | None:
    """A motion-module weight or layer name in either naming -> its diffusers MotionAdapter name (None: not in a
    motion module)."""
    m = MOTION_KEY.fullmatch(name)
    return f"{m[1]}.motion_modules.{m[3]}.{_rename(m[4])}" if m else None


def _check_positions(key: str, pe: np.ndarray):
    """The stored table must be the interleaved sin/cos one the model recomputes; another encoding would change
    every output without any load error."""
    length, dim = pe.shape[-2:]
    expected = sinusoidal_positions(length, dim)
    err = float(np.abs(np.asarray(pe, np.float32).reshape(length, dim) - expected).max())
    if err > POSITION_ATOL:
        raise WeightLoadError(f"{key}: the stored temporal position encoding differs from the interleaved sin/cos "
                              f"table the model computes (max abs difference {err:.3g} > {POSITION_ATOL}); this file "
                              "uses another encoding, which pia_jax does not implement")


def _layout(modules: Mapping[tuple[str, int], set]) -> int:
    """Checks that the motion modules form AnimateDiff's layout (L per down block, L + 1 per up block over as many
    blocks, at most one in the mid block, indices without gaps) and returns L."""
    def counts(side):
        last = max((b for s, b in modules if s == side), default=-1)
        return [len(modules.get((side, b), ())) for b in range(last + 1)]
    down, up, mid = counts("down_blocks"), counts("up_blocks"), modules.get(("mid_block", 0), set())
    gapless = all(indices == set(range(len(indices))) for indices in modules.values())
    if not (down and len(set(down)) == 1 and up == [down[0] + 1] * len(down) and mid <= {0} and gapless):
        raise WeightLoadError(f"irregular motion-module layout: modules per down block {down}, per up block {up}, "
                              f"mid block {sorted(mid)}; expected L per down block and L + 1 per up block")
    return down[0]


def _check_is_motion(sd: Mapping[str, np.ndarray]) -> None:
    """WeightLoadError unless `sd` holds motion modules (a motion LoRA or another kind of checkpoint says so)."""
    loras = [k for k in sd if "lora" in k.lower()]
    if loras and any(MOTION_KEY.search(k) for k in loras):
        raise WeightLoadError(f"this is a motion LoRA (LoRA weights on the motion modules, e.g. {loras[0]!r}), not "
                              "motion modules; pass it with --motion-lora, and the motion modules it is for "
                              "with --motion")
    if not any(MOTION_KEY.match(k) for k in sd):
        raise WeightLoadError(f"no motion-module keys (down_blocks.N.motion_modules.M...): this looks like "
                              f"{guess_kind(sd)}, not AnimateDiff/PIA motion modules")


def _sort_keys(sd: Mapping[str, np.ndarray]):
    """Each tensor of a motion checkpoint into its pile: motion-module parameters (diffusers names), spatial UNet
    weights, conv_in, unknown keys and position tables; with the motion modules found per block and the channels
    of each down block."""
    motion, spatial, conv_in, unknown, tables = {}, {}, {}, [], []
    modules, channels = {}, {}  # {(side, block): motion-module indices}, {down block: channels}
    for key, value in sd.items():
        m = MOTION_KEY.fullmatch(key)
        if m is None:
            if key in ("conv_in.weight", "conv_in.bias"):
                conv_in[key] = value  # sorted out below, by its input channels
            elif SPATIAL.fullmatch(key):
                spatial[key] = value
            else:
                unknown.append(key)
            continue
        block, index, rest = m[1], int(m[3]), _rename(m[4])
        side, number = block.split(".")[0], int(m[2] or 0)
        modules.setdefault((side, number), set()).add(index)
        name = f"{block}.motion_modules.{index}.{rest}"
        if POSITIONS.fullmatch(rest):
            tables.append((key, value))
        elif not PARAM.fullmatch(rest) or name in motion:  # unknown, or a second source name for one parameter
            unknown.append(key)
        else:
            motion[name] = value
            if rest == "norm.weight" and side == "down_blocks":
                channels[number] = value.shape[0]
    return motion, spatial, conv_in, unknown, tables, modules, channels


def convert_motion_checkpoint(sd: Mapping[str, np.ndarray]):
    """An AnimateDiff/PIA motion checkpoint (or a diffusers MotionAdapter dict, or a full PIA-trained UNet) ->
    (motion, spatial, info).

    motion: diffusers MotionAdapter-named dict, with PIA's `conv_in` when the file has a wider-than-4-channel one.
    spatial: the spatial UNet2DConditionModel weights of a full UNet (its conv_in cut to the 4 latent channels, so
    `weights.merge_unet_and_adapter(spatial, motion)` rebuilds the trained UNet), else {}.
    info: conv_in_channels (None without conv_in in motion), block_out_channels (per down block), mid_block,
    max_seq_length (frames the stored position tables cover; None without tables), layers_per_block (motion modules
    per down block), ignored ({rule: tensors}).
    """
    sd = {k.removeprefix("module."): v for k, v in sd.items()}  # DataParallel / DDP wrappers
    _check_is_motion(sd)
    motion, spatial, conv_in, unknown, tables, modules, channels = _sort_keys(sd)
    block_out = tuple(channels[i] for i in sorted(channels))
    if block_out == SDXL_CHANNELS:
        raise WeightLoadError(f"these are SDXL motion modules (blocks {block_out}, e.g. mm_sdxl_v10_beta.ckpt); "
                              "pia_jax animates SD1.x models, whose motion modules have blocks (320, 640, 1280, 1280)")
    if unknown:
        raise WeightLoadError(f"{len(unknown)} tensors are neither motion-module, conv_in nor spatial UNet weights"
                              f"{key_list(unknown)}")
    layers = _layout(modules)
    for key, pe in tables:
        _check_positions(key, pe)
    wide = "conv_in.weight" in conv_in and conv_in["conv_in.weight"].shape[1] != 4
    if wide:  # PIA's [latent | mask | condition latent] conv_in belongs to the adapter
        motion.update(conv_in)
    if conv_in and (spatial or not wide):  # the spatial UNet's share: its latent channels and the bias
        spatial.update({k: v[:, :4] if k == "conv_in.weight" else v for k, v in conv_in.items()})
    info = {"conv_in_channels": conv_in["conv_in.weight"].shape[1] if wide else None,
            "block_out_channels": block_out, "mid_block": ("mid_block", 0) in modules,
            "max_seq_length": min(pe.shape[-2] for _, pe in tables) if tables else None,
            "layers_per_block": layers, "ignored": {"position tables (recomputed by the model)": len(tables)}}
    return motion, spatial, info
