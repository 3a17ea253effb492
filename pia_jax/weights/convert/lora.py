"""Merging LoRA files into diffusers-named SD1.5 weights (numpy, torch layout), before the motion adapter is attached.

Accepted: kohya/LyCORIS-LoCon files (`lora_unet_<module path, '.' -> '_'>.lora_down.weight` / `.lora_up.weight` /
`.alpha`, `lora_te_...`; diffusers or original-SD (LDM) UNet module names; linear, 1x1 and 3x3 conv layers) and the
diffusers/peft files that diffusers' `load_lora_weights` reads (`unet.` / `text_encoder.` prefix; `lora_A`/`lora_B`,
`lora.down`/`lora.up`, `lora_linear_layer.down`/`.up` and the old attention-processor `to_q_lora.down` names), and
AnimateDiff v3's adapter LoRA (v3_sd15_adapter.ckpt: `down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.
to_q_lora.down.weight`, the attention-processor names without the `unet.` prefix, rank 128 on every to_q/k/v/out of
the spatial transformers, no alphas), which AnimateDiff merges as W += scale * up @ down (`load_diffusers_lora`) and
diffusers loads from its `unet.`-prefixed copy (guoyww/animatediff-motion-lora-v1-5-3) with alpha = rank: the same
merge as below. Everything else fails with one message naming the offending keys; motion LoRAs go to
`motion_lora.py`.

The merge is W += multiplier * (alpha / rank) * up @ down in float32 (kohya/diffusers semantics, alpha = rank where
the file has none), or W += multiplier * up @ down with `legacy_alpha=True` as in the PIA repo
(`convert_lora_model_level`), which ignores the file's alphas and ranks.
"""

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np

from pia_jax.weights import WeightLoadError, read_state_dict
from pia_jax.weights.convert import ldm

# Kinds of files we recognise but cannot merge: (key pattern, what it is). Checked before anything else so that the
# error names the kind instead of listing hundreds of unknown keys.
WRONG_KINDS = (
    (r"^lora_te[12]_|^text_encoder_2\.|label_emb|add_embedding",
     "this looks like an SDXL LoRA (lora_te1_/lora_te2_, text_encoder_2 or label_emb keys); PIA uses SD1.5"),
    (r"motion_modules", ("this is an AnimateDiff motion LoRA (motion_modules keys); it targets the motion modules, "
                         "not the SD1.5 UNet or text encoder: pass it with --motion-lora")),
    (r"\.hada_", "this is a LyCORIS LoHa (hada_w1_a/... keys), not a plain LoRA"),
    (r"\.lokr_", "this is a LyCORIS LoKr (lokr_w1/... keys), not a plain LoRA"),
    (r"\.lora_mid\.", "this is a LyCORIS LoCon with Tucker decomposition (lora_mid keys), not a plain LoRA"),
    (r"dora_scale|lora_magnitude_vector", "this is a DoRA (dora_scale/lora_magnitude_vector keys), not a plain LoRA"),
    (r"\.diff(_b)?$|\.(w|b)_norm$", "this is a LyCORIS full/norm fine-tune (diff/w_norm keys), not a LoRA"),
    (r"^lora_transformer_|^transformer\.|^diffusion_model\.", "this is a LoRA for a DiT model (Flux/SD3/...)"),
)
SUPPORTED = ("plain LoRA/LoCon for SD1.5: kohya 'lora_unet_*'/'lora_te_*' keys with lora_down/lora_up(/alpha), "
             "diffusers 'unet.*'/'text_encoder.*' keys with lora_A/lora_B (or lora.down/lora.up), or attention-processor "
             "'*.to_q_lora.down.weight' keys (also without 'unet.', as AnimateDiff v3's adapter)")

# Keys consumed without merging: (pattern, reason); they appear in the report.
IGNORE = (
    (r"^bundle_emb\.", "textual-inversion embedding bundled by kohya sd-scripts; load it as an embedding"),
)

KOHYA = re.compile(r"^lora_(unet|te)_(\w+)\.(lora_down\.weight|lora_up\.weight|alpha)$")
# `.alpha` is no diffusers key: `read_lora` makes it from the file's metadata.
DIFFUSERS = re.compile(r"^(unet|text_encoder)\.(.+?)\.(lora_[AB]\.weight|lora(?:_linear_layer)?\.(?:down|up)\.weight|"
                       r"alpha)$")
PARTS = {"lora_down.weight": "down", "lora_A.weight": "down", "lora.down.weight": "down",
         "lora_linear_layer.down.weight": "down", "lora_up.weight": "up", "lora_B.weight": "up", "lora.up.weight": "up",
         "lora_linear_layer.up.weight": "up", "alpha": "alpha"}
# The attention-processor format of diffusers < 0.14: `<attn>.processor.to_q_lora.down.weight`; without a prefix
# (AnimateDiff v3's adapter) the keys are UNet ones.
DIFFUSERS_OLD = re.compile(r"^(?:(unet|text_encoder)\.)?(.+?)(?:\.processor)?\.to_(q|k|v|out)_lora\.(down|up)\.weight$")
OLD_TARGETS = {"unet": {"q": "to_q", "k": "to_k", "v": "to_v", "out": "to_out.0"},
               "text_encoder": {"q": "q_proj", "k": "k_proj", "v": "v_proj", "out": "out_proj"}}
COMPONENTS = {"unet": "unet", "te": "text_encoder", "text_encoder": "text_encoder"}


@dataclass
class LoraReport:
    unet: list[str] = field(default_factory=list)  # module paths merged
    text_encoder: list[str] = field(default_factory=list)
    ignored: dict[str, str] = field(default_factory=dict)  # key -> reason


def listing(keys) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - 10} more ({len(keys)} in total)" if len(keys) > 10 else ""
    return ", ".join(map(repr, keys[:10])) + more


def _ldm_names(paths: list[str]) -> dict[str, str]:
    """{diffusers UNet module: the original SD (LDM) repo's name of it} for the given UNet module paths: kohya files
    of SD1.5 LoRAs trained on an LDM UNet use these. The names come from inverting `ldm.unet_table` (the single-file
    converter's table) for the block layout the paths show; its sub-module rules are literal renames or identities."""
    blocks = 1 + max(int(m[1]) for p in paths if (m := re.match(r"down_blocks\.(\d+)\.", p)))
    layers = 1 + max(int(m[1]) for p in paths if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", p)))
    attention = {(m[1], int(m[2])) for p in paths if (m := re.match(r"(down|up)_blocks\.(\d+)\.attentions\.", p))}
    block_type = lambda side, b: "CrossAttn" if (side, b) in attention else ""  # what unet_table reads
    layout = SimpleNamespace(block_out_channels=range(blocks), layers_per_block=layers,
                             down_block_types=[block_type("down", b) for b in range(blocks)],
                             up_block_types=[block_type("up", b) for b in range(blocks)])
    by_diffusers = {module: (ldm_module, k) for ldm_module, (module, k) in ldm.unet_table(layout).items()}
    names = {}
    for path in paths:
        parts = path.split(".")
        prefix = next((".".join(parts[:n]) for n in range(len(parts), 0, -1) if ".".join(parts[:n]) in by_diffusers),
                      None)
        if prefix is None:
            continue
        ldm_module, k = by_diffusers[prefix]
        rest = path[len(prefix) + 1:]
        for pattern, replacement in k.rules:
            if replacement == r"\g<0>" and re.fullmatch(pattern, rest):  # the same name on both sides
                sub = rest
            elif replacement == rest:
                sub = pattern.replace("\\.", ".")  # a literal rename, read backwards
            else:
                continue
            names[path] = ldm_module + ("." + sub if sub else "")
            break
    return names


def _module_names(unet, text_encoder) -> dict[str, dict[str, str]]:
    """{component: {accepted name: weight key}} for every linear/conv weight. Accepted names are the diffusers/
    transformers module path and its kohya form ('.' -> '_'); for the UNet also the LDM name, for the text encoder
    the path with and without transformers' `text_model.` prefix. Distinct paths never share a kohya name in these
    models (checked here), so the lookup is unambiguous, unlike the PIA repo's greedy getattr walk."""
    names = {"unet": {}, "text_encoder": {}}
    paths = {"unet": [k[:-7] for k, v in unet.items() if k.endswith(".weight") and np.ndim(v) in (2, 4)],
             "text_encoder": [k[:-7] for k, v in text_encoder.items()  # linears; LoRAs never target the embeddings
                              if k.endswith(".weight") and np.ndim(v) == 2 and "embedding" not in k]}
    ldm_names = _ldm_names(paths["unet"]) if paths["unet"] else {}
    for component, component_paths in paths.items():
        for path in component_paths:
            if component == "unet":
                aliases = {path, ldm_names.get(path)} - {None}
            else:
                core = path.removeprefix("text_model.")
                aliases = {core, "text_model." + core}
            for alias in aliases | {a.replace(".", "_") for a in aliases}:
                if names[component].setdefault(alias, path + ".weight") != path + ".weight":
                    raise AssertionError(f"ambiguous module name {alias!r}")
    return names


def _parse(state: Mapping[str, np.ndarray], report: LoraReport):
    """Groups LoRA keys by target module: {(component, name): {'down'/'up'/'alpha': key}}, plus unrecognised keys."""
    groups, unknown = {}, []
    for key in state:
        reason = next((r for pattern, r in IGNORE if re.search(pattern, key)), None)
        if reason:
            report.ignored[key] = reason
        elif m := KOHYA.match(key):
            groups.setdefault((COMPONENTS[m[1]], m[2]), {})[PARTS[m[3]]] = key
        elif m := DIFFUSERS.match(key):
            groups.setdefault((m[1], m[2].replace(".processor.", ".")), {})[PARTS[m[3]]] = key
        elif m := DIFFUSERS_OLD.match(key):
            component = m[1] or "unet"
            groups.setdefault((component, f"{m[2]}.{OLD_TARGETS[component][m[3]]}"), {})[m[4]] = key
        else:
            unknown.append(key)
    return groups, unknown


def _core(shape) -> tuple:
    """A weight shape without a trailing 1x1 kernel: 1x1 convs and linears are interchangeable."""
    return tuple(shape[:-2]) if len(shape) == 4 and tuple(shape[-2:]) == (1, 1) else tuple(shape)


def _fail(i, what, keys, expected=SUPPORTED):
    raise WeightLoadError(f"cannot merge LoRA {i}: {what}: {listing(keys)}; expected {expected}")


def check(i: int, state: Mapping[str, np.ndarray], report: LoraReport | None = None) -> dict:
    """{(component, module name): {'down' / 'up' / 'alpha': key}} of LoRA number i, after every check that needs no
    model (its kind, unknown and unpaired keys), so a wrong file fails before any loading."""
    if not state:
        raise WeightLoadError(f"cannot merge LoRA {i}: it holds no keys; expected {SUPPORTED}")
    for pattern, kind in WRONG_KINDS:
        if hits := [k for k in state if re.search(pattern, k)]:
            _fail(i, kind, hits)
    groups, unknown = _parse(state, report or LoraReport())
    if unknown:
        _fail(i, "unrecognised keys", unknown)
    if unpaired := [k for parts in groups.values() if not {"down", "up"} <= parts.keys() for k in parts.values()]:
        _fail(i, "keys without their up/down partner", unpaired, "a down and an up weight per module")
    if uneven := uneven_ranks(state, groups.values()):
        _fail(i, "down and up factors of different ranks", uneven, "down (rank, in[, kh, kw]) and up (out, rank[, 1, "
                                                                       "1]) per module; the rank may differ between modules")
    return groups


def uneven_ranks(state, groups) -> list[str]:
    """'down (shape) / up (shape) for <key>' of every pair whose ranks differ (down rows, up columns). Each module's
    rank is its own in every format (kohya, diffusers' rank_pattern, AnimateDiff's plain products), so only a pair
    that disagrees with itself is invalid."""
    shapes = [(np.shape(state[p["down"]]), np.shape(state[p["up"]]), p["up"]) for p in groups]
    return [f"down {d} / up {u} for {key}" for d, u, key in shapes if len(d) < 2 or len(u) < 2 or d[0] != u[1]]


def _plan(i, state, targets, names, legacy_alpha, report) -> list:
    """[(component, weight key, up, down, scale)] for LoRA number i, after checking every key of it."""
    def fail(what, keys, expected=SUPPORTED):
        _fail(i, what, keys, expected)

    groups = check(i, state, report)
    if unmatched := [k for (component, name), parts in groups.items() if name not in names[component]
                     for k in parts.values()]:
        every = len(unmatched) == sum(map(len, groups.values()))
        what = "none of its keys matches a" if every else "keys that match no"
        fail(f"{what} module of the SD1.5 UNet/text encoder (a LoRA for another model?)", unmatched,
             "diffusers/LDM UNet or transformers CLIP module names")

    plan, sources, mismatched = [], {}, []
    for (component, name), parts in groups.items():
        key = names[component][name]
        sources.setdefault(key, []).append(parts["down"])
        down, up = np.asarray(state[parts["down"]], np.float32), np.asarray(state[parts["up"]], np.float32)
        shape = np.shape(targets[component][key])
        if not (down.ndim in (2, 4) and up.ndim in (2, 4) and up.shape[2:] in ((), (1, 1))
                and up.shape[1] == down.shape[0] and up.shape[0] == shape[0]
                and _core(down.shape)[1:] == _core(shape)[1:]):
            mismatched.append(f"{parts['down']} {down.shape} / up {up.shape} for {key} {shape}")
            continue
        rank = down.shape[0]
        alpha = rank if legacy_alpha or "alpha" not in parts else float(np.asarray(state[parts["alpha"]]).item())
        plan.append((component, key, up, down, alpha / rank))
        getattr(report, component).append(key[:-7])
    if mismatched:
        fail("shapes that do not fit their module (a LoRA for another base model, e.g. SD2?)", mismatched,
             "down (rank, in[, kh, kw]) and up (out, rank[, 1, 1]) matching the module's weight (out, in[, kh, kw])")
    if twice := [k for keys in sources.values() if len(keys) > 1 for k in keys]:
        fail("several keys for the same module", twice, "one down/up pair per module")
    return plan


def merge_loras(unet: Mapping[str, np.ndarray], text_encoder: Mapping[str, np.ndarray],
                loras: Sequence[tuple[Mapping[str, np.ndarray], float]], legacy_alpha: bool = False,
                keep_float32: bool = False):
    """Merges `loras` = [(LoRA state dict, multiplier)] into a diffusers UNet2DConditionModel state dict and a
    transformers CLIPTextModel one: W += multiplier * alpha / rank * up @ down, or W += multiplier * up @ down with
    `legacy_alpha` (the PIA repo's merge). Returns (unet, text_encoder, [LoraReport per LoRA]); the inputs are left as
    they are and only the changed tensors are new. Every LoRA is checked before anything is merged; the deltas of all
    LoRAs are summed onto the float32 weight, which is cast back to its dtype once (or, with `keep_float32`, left in
    float32 for a caller that casts once more anyway, so fp16 source weights are not rounded twice)."""
    targets = {"unet": unet, "text_encoder": text_encoder}
    names = _module_names(unet, text_encoder)
    reports = [LoraReport() for _ in loras]
    plans = [_plan(i, state, targets, names, legacy_alpha, report) for i, ((state, _), report)
             in enumerate(zip(loras, reports))]
    merged = {"unet": {}, "text_encoder": {}}
    for plan, (_, multiplier) in zip(plans, loras):
        for component, key, up, down, scale in plan:
            weight = merged[component].setdefault(key, np.array(targets[component][key], np.float32))
            delta = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
            weight += (delta * np.float32(multiplier * scale)).reshape(weight.shape)
    unet, text_encoder = ({**targets[c], **{k: w if keep_float32 else w.astype(np.asarray(targets[c][k]).dtype)
                                            for k, w in merged[c].items()}} for c in ("unet", "text_encoder"))
    return unet, text_encoder, reports


def read_lora(path) -> dict[str, np.ndarray]:
    """Reads a LoRA file of any accepted format. diffusers keeps the alphas of its own LoRA files in the safetensors
    metadata (each component's peft LoraConfig under 'lora_adapter_metadata'), not in tensors; they become
    `<component>.<module>.alpha` entries here so that `merge_loras` scales as diffusers' loader does (alpha = rank
    where there is no metadata)."""
    state = read_state_dict(path)
    meta = {}
    if str(path).endswith(".safetensors"):
        from safetensors import safe_open
        with safe_open(str(path), "np") as f:
            meta = json.loads((f.metadata() or {}).get("lora_adapter_metadata") or "{}")
    for key in list(state):
        m = DIFFUSERS.match(key)
        if not m or PARTS[m[3]] != "down" or f"{m[1]}.lora_alpha" not in meta:
            continue
        if meta.get(f"{m[1]}.use_rslora") or meta.get(f"{m[1]}.use_dora"):
            raise WeightLoadError(f"{path}: its metadata asks for rsLoRA/DoRA scaling ({m[1]}), which cannot be merged "
                                  "here; expected plain LoRA (scale alpha / rank)")
        patterns = meta.get(f"{m[1]}.alpha_pattern") or {}  # peft's regex rules: the first matching one wins
        hit = next((p for p in patterns if re.match(rf"(.*\.)?({p})$", m[2].replace(".processor.", "."))), None)
        state[f"{m[1]}.{m[2]}.alpha"] = np.float32(patterns[hit] if hit else meta[f"{m[1]}.lora_alpha"])
    return state
