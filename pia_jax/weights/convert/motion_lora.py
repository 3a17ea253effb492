"""AnimateDiff motion LoRAs merged into the motion modules (diffusers MotionAdapter names, numpy, torch layout).

Files read (`lora.read_lora`: safetensors, or a torch pickle, also under a "state_dict" wrapper):
- AnimateDiff's own (the v2 camera LoRAs v2_lora_ZoomIn.ckpt, PanLeft, ...), attention-processor factors in
  AnimateDiff's motion-module names: `down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.
  attention_blocks.0.processor.to_q_lora.down.weight` (down (r, in), up (out, r); to_q/to_k/to_v/to_out; no alpha).
- diffusers' converted copies (guoyww/animatediff-motion-lora-*: its convert_animatediff_motion_lora_to_diffusers
  script renames the motion modules as its MotionAdapter and prefixes `unet.`): `unet.down_blocks.0.motion_modules.0.
  transformer_blocks.0.attn1.processor.to_q_lora.down.weight`.
- PEFT files, as diffusers' `save_lora_weights` writes a motion LoRA: `unet.<motion-module layer>.lora_A.weight` /
  `lora_B` (also `lora.down` / `lora.up`), the alphas in the safetensors metadata (`read_lora` turns them into keys).

Merge, per layer, in float32: W += multiplier * (alpha / rank) * up @ down, alpha = rank where the file has none.
For AnimateDiff's files that is both AnimateDiff's `load_diffusers_lora` (W += alpha * up @ down, its per-LoRA
`alpha` being our multiplier) and diffusers' `load_lora_weights` + `set_adapters(weights=[multiplier])` (peft with
lora_alpha = r). The rank may differ from layer to layer: every format stores each layer's factors on their own,
AnimateDiff multiplies them as they are and diffusers gives peft a per-layer rank_pattern.

PIA (and AnimateDiff v3) motion modules have no mid-block module: a LoRA's mid-block layers are then skipped, each
key named in the report with the reason; with mid-block motion modules (mm_sd_v15_v2.ckpt, on which the camera LoRAs
were trained) they are merged.
"""

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from pia_jax.weights import WeightLoadError
from pia_jax.weights.convert import animatediff, lora

OLD = re.compile(r"^(?P<layer>.+?)(?:\.processor)?\.to_(?P<proj>q|k|v|out)_lora\.(?P<part>down|up)\.weight$")
PEFT = re.compile(r"^(?P<layer>.+?)\.(?P<part>lora_[AB]\.weight|lora(?:_linear_layer)?\.(?:down|up)\.weight|alpha)$")
PROJECTIONS = {"q": "to_q", "k": "to_k", "v": "to_v", "out": "to_out.0"}
SUPPORTED = ("an AnimateDiff motion LoRA: '<block>.motion_modules.M...attention_blocks.A.processor.to_q_lora.down."
             "weight' (AnimateDiff), the same with 'unet.' and diffusers' motion-module names, or PEFT 'unet.<motion "
             "layer>.lora_A.weight' / 'lora_B.weight'")
NO_MID_BLOCK = "mid-block motion-module LoRA: these motion modules have no mid-block module (PIA, AnimateDiff v3)"


@dataclass
class MotionLoraReport:
    motion: list[str] = field(default_factory=list)  # layers merged
    ignored: dict[str, str] = field(default_factory=dict)  # key -> reason (the mid-block keys skipped)


def _fail(i, what, keys, expected=SUPPORTED):
    raise WeightLoadError(f"cannot merge motion LoRA {i}: {what}: {lora.listing(keys)}; expected {expected}")


def _layer(key: str):
    """(diffusers motion-module layer, 'down' / 'up' / 'alpha') of a motion LoRA key, or None."""
    name = key.removeprefix("unet.")
    if m := OLD.match(name):
        layer, part = f"{m['layer']}.{PROJECTIONS[m['proj']]}", m["part"]
    elif m := PEFT.match(name):
        layer, part = m["layer"].replace(".processor.", "."), lora.PARTS[m["part"]]
    else:
        return None
    layer = animatediff.diffusers_name(layer)
    return (layer, part) if layer else None


def check(i: int, state: Mapping[str, np.ndarray]) -> dict:
    """{layer: {'down' / 'up' / 'alpha': key}} of motion LoRA number i; WeightLoadError, naming the keys, for anything
    else (a spatial LoRA, LyCORIS kinds, unknown or unpaired keys). Needs no model: run it before any loading."""
    if not state:
        _fail(i, "it holds no keys", [])
    for pattern, kind in lora.WRONG_KINDS:
        if "motion_modules" not in pattern and (hits := [k for k in state if re.search(pattern, k)]):
            _fail(i, kind, hits)
    if not any("motion_modules." in k for k in state):
        _fail(i, "no motion_modules keys, so no motion LoRA (a LoRA for the SD1.5 UNet / text encoder goes to "
                 "--lora)", list(state))
    groups, unknown, twice = {}, [], []
    for key in state:
        target = _layer(key)
        if target is None:
            unknown.append(key)
        elif target[1] in groups.setdefault(target[0], {}):
            twice += [key, groups[target[0]][target[1]]]  # one layer under two names (two formats in one file)
        else:
            groups[target[0]][target[1]] = key
    if unknown:
        _fail(i, "keys that are not motion-module LoRA factors", unknown)
    if twice:
        _fail(i, "several keys for the same layer", twice, "one down/up pair per layer")
    if unpaired := [k for parts in groups.values() if not {"down", "up"} <= parts.keys() for k in parts.values()]:
        _fail(i, "keys without their up/down partner", unpaired, "a down and an up weight per layer")
    if uneven := lora.uneven_ranks(state, groups.values()):
        _fail(i, "down and up factors of different ranks", uneven, "down (rank, in) and up (out, rank) per layer; "
                                                                       "the rank may differ between layers")
    return groups


def _plan(i, state, motion) -> tuple[list, MotionLoraReport]:
    """[(weight key, up, down, alpha / rank)] for motion LoRA number i against the motion modules `motion`."""
    has_mid = any(k.startswith("mid_block.") for k in motion)
    plan, report, unmatched, mismatched = [], MotionLoraReport(), [], []
    for layer, parts in check(i, state).items():
        key = layer + ".weight"
        if key not in motion:
            if layer.startswith("mid_block.") and not has_mid:
                report.ignored.update(dict.fromkeys(parts.values(), NO_MID_BLOCK))
            else:
                unmatched += parts.values()
            continue
        down, up = np.asarray(state[parts["down"]], np.float32), np.asarray(state[parts["up"]], np.float32)
        shape = np.shape(motion[key])
        if not (down.ndim == up.ndim == 2 and up.shape[1] == down.shape[0] and (up.shape[0], down.shape[1]) == shape):
            mismatched.append(f"{parts['down']} {down.shape} / up {up.shape} for {key} {shape}")
            continue
        rank = down.shape[0]
        alpha = float(np.asarray(state[parts["alpha"]]).item()) if "alpha" in parts else rank
        plan.append((key, up, down, alpha / rank))
        report.motion.append(layer)
    if unmatched:
        _fail(i, "keys that match no layer of these motion modules (a LoRA for other motion modules?)", unmatched,
              "layers of the motion modules being converted")
    if mismatched:
        _fail(i, "shapes that do not fit their layer (a LoRA for motion modules of another size, e.g. SDXL?)",
              mismatched, "down (rank, in) and up (out, rank) matching the layer's weight (out, in)")
    return plan, report


def merge_motion_loras(motion: Mapping[str, np.ndarray], loras: Sequence[tuple[Mapping[str, np.ndarray], float]]):
    """Merges `loras` = [(motion LoRA state dict, multiplier)] into diffusers-named motion modules (see the module
    docstring). Returns (motion, [MotionLoraReport per LoRA]); every LoRA is checked before anything is merged, the
    input dict is left as it is, and the changed weights come back in float32 (the writer casts them once)."""
    plans = [_plan(i, state, motion) for i, (state, _) in enumerate(loras)]
    merged = {}
    for (plan, _), (_, multiplier) in zip(plans, loras):
        for key, up, down, scale in plan:
            weight = merged.setdefault(key, np.array(motion[key], np.float32))
            weight += np.float32(multiplier * scale) * (up @ down)
    return {**motion, **merged}, [report for _, report in plans]
