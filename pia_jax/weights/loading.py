"""Strict, table-driven loading of PyTorch state dicts into NNX models.

A key layout (`KeyMap`) is data: regex renames that turn a source key into an NNX path, and ignore rules, each with
a reason, for source keys that have no target. The leaf rule below then picks the parameter and its layout
transform. Loading fails with one error listing every unmapped source key, unfilled target and shape mismatch.
"""

import re
from dataclasses import dataclass
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@dataclass(frozen=True)
class KeyMap:
    name: str
    renames: tuple[tuple[str, str], ...] = ()  # (pattern, replacement), applied in order with re.sub
    ignore: tuple[tuple[str, str], ...] = ()  # (pattern, reason): source keys consumed without a target


# Key layouts of the diffusers/transformers models. Our attribute names mirror these, so they need few rules.
DIFFUSERS_UNET = KeyMap(
    "diffusers UNet2DConditionModel + MotionAdapter / UNetMotionModel",
    ignore=((r"\.pos_embed\.pe$", "fixed sinusoidal table, recomputed by the model"),),
)
DIFFUSERS_VAE = KeyMap(
    "diffusers AutoencoderKL",
    # older diffusers-format VAE files still use the pre-0.14 attention names
    renames=tuple((rf"(mid_block\.attentions\.0)\.{old}\.", rf"\1.{new}.") for old, new in
                  (("query", "to_q"), ("key", "to_k"), ("value", "to_v"), ("proj_attn", "to_out.0"))),
)
TRANSFORMERS_CLIP_TEXT = KeyMap(
    "transformers CLIPTextModel",
    renames=((r"^text_model\.", ""),),
    ignore=((r"(^|\.)position_ids$", "constant buffer (0..76), rebuilt by the model"),),
)

# torch leaf name -> candidate NNX leaf names; exactly one exists at a given module path.
LEAF_NAMES = {"weight": ("kernel", "scale", "embedding"), "bias": ("bias",)}


def to_nnx_layout(array: np.ndarray, leaf: str, target_ndim: int) -> np.ndarray:
    """torch layouts -> flax layouts: conv OIHW -> HWIO, linear (out, in) -> (in, out)."""
    if leaf != "kernel":
        return array
    if array.ndim == 4 and target_ndim == 2 and array.shape[2:] == (1, 1):  # 1x1 conv stored for a Linear
        array = array[:, :, 0, 0]
    if array.ndim == 4:
        return array.transpose(2, 3, 1, 0)
    return array.T if array.ndim == 2 else array


class WeightLoadError(ValueError):
    pass


def problems_error(what: str, problems: list[str], limit: int | None = None) -> WeightLoadError:
    """One error listing every problem found (the first `limit` of them, if given)."""
    shown = problems if limit is None else problems[:limit]
    more = f"\n  ... and {len(problems) - len(shown)} more" if len(shown) < len(problems) else ""
    return WeightLoadError(f"{what} ({len(problems)} problem{'s' * (len(problems) != 1)}):\n  " + "\n  ".join(shown)
                           + more)


def map_keys(state_dict: Mapping[str, np.ndarray], keymap: KeyMap, targets: Mapping[str, tuple],
             ignored: dict | None = None):
    """Returns ({target path: array in NNX layout}, [problems]) for `targets` = {path: shape}; `ignored`, if given,
    counts the source keys each ignore rule consumed, by its reason."""
    filled, sources, problems = {}, {}, []
    for key, array in state_dict.items():
        reason = next((why for pattern, why in keymap.ignore if re.search(pattern, key)), None)
        if reason is not None:
            if ignored is not None:
                ignored[reason] = ignored.get(reason, 0) + 1
            continue
        name = key
        for pattern, repl in keymap.renames:
            name = re.sub(pattern, repl, name)
        module, _, leaf = name.rpartition(".")
        hits = [f"{module}.{t}" for t in LEAF_NAMES.get(leaf, (leaf,)) if f"{module}.{t}" in targets]
        if not hits:
            problems.append(f"unexpected source key {key!r} (no parameter {name!r} in the model)")
            continue
        path = hits[0]
        if path in sources:
            problems.append(f"source keys {sources[path]!r} and {key!r} both map to {path!r}")
            continue
        sources[path] = key
        value = to_nnx_layout(np.asarray(array), path.rpartition(".")[2], len(targets[path]))
        if value.shape != tuple(targets[path]):
            problems.append(f"shape mismatch for {key!r}: got {tuple(np.shape(array))}, model {path!r} expects "
                            f"{tuple(targets[path])} (in NNX layout)")
            continue
        filled[path] = value
    problems += [f"missing source key for model parameter {p!r}" for p in targets if p not in sources]
    return filled, problems


def param_shapes(model: nnx.Module) -> dict[str, tuple]:
    """{NNX parameter path ('down_blocks.0.resnets.0.conv1.kernel'): shape} of a concrete or abstract model."""
    return {".".join(map(str, path)): tuple(var.shape) for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def load_state_dict(model: nnx.Module, state_dict: Mapping[str, np.ndarray], keymap: KeyMap) -> nnx.Module:
    """Fills every parameter of `model` (concrete, or abstract from `nnx.eval_shape`) from a torch state dict.

    Values are cast to each parameter's dtype and placed with its sharding where it has one.
    """
    filled, problems = map_keys(state_dict, keymap, param_shapes(model))
    if problems:
        raise problems_error(f"cannot load {keymap.name} weights into {type(model).__name__}", problems)
    return fill(model, filled)


def fill(model: nnx.Module, flat: Mapping[str, np.ndarray], sharding=None) -> nnx.Module:
    """`model` with each parameter set from `flat` = {NNX path: array in NNX layout}, which must cover them all.

    Each value is cast to its parameter's dtype and placed with `sharding` (one sharding, or a function of the path),
    else with the abstract parameter's own sharding where it has one.
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    leaves = nnx.to_flat_state(params)
    for path, var in leaves:
        name = ".".join(map(str, path))
        abstract = var.get_value()
        value = jnp.asarray(flat[name], dtype=abstract.dtype)
        where = sharding(name, value.shape) if callable(sharding) else sharding
        where = where if where is not None else getattr(abstract, "sharding", None)
        var.set_value(jax.device_put(value, where) if where is not None else value)
    return nnx.merge(graphdef, nnx.from_flat_state(leaves), rest)


def merge_unet_and_adapter(unet2d: Mapping[str, np.ndarray], adapter: Mapping[str, np.ndarray]) -> dict:
    """A UNetMotionModel state dict from a UNet2DConditionModel's and a MotionAdapter's, built as diffusers'
    `UNetMotionModel.from_unet2d` does: spatial weights from the UNet, motion modules from the adapter, and for a
    9-channel adapter `conv_in` the UNet's channels 0-3 and bias with the adapter's condition channels 4-8 (so a
    personalized base keeps its own input layer)."""
    clash = sorted(k for k in adapter if k in unet2d and not k.startswith("conv_in."))
    if clash:
        raise WeightLoadError(f"the UNet and the motion adapter both hold {clash[:5]} ... ({len(clash)} keys): "
                              "pass a spatial UNet and a motion adapter")
    merged = {**unet2d, **{k: v for k, v in adapter.items() if not k.startswith("conv_in.")}}
    if "conv_in.weight" in adapter:
        base = np.asarray(unet2d["conv_in.weight"])
        merged["conv_in.weight"] = np.concatenate([base, np.asarray(adapter["conv_in.weight"])[:, base.shape[1]:]],
                                                  axis=1)
    return merged


def read_state_dict(path) -> dict[str, np.ndarray]:
    """Reads a `.safetensors` file without torch, or a pickled `.bin`/`.ckpt`/`.pt` with torch's safe loader
    (`weights_only=True`: tensors and plain containers only, never arbitrary code)."""
    path = str(path)
    try:
        if path.endswith(".safetensors"):
            from safetensors.numpy import load_file
            return load_file(path)
        try:
            import torch  # only pickles need torch
        except ImportError:
            raise WeightLoadError(f"reading {path!r} needs PyTorch (pickled checkpoint): pip install 'pia-jax[convert]',"
                                  " or convert the file to .safetensors") from None
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except (WeightLoadError, FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Exception as e:  # truncated or corrupt files surface as many different error types
        raise WeightLoadError(f"cannot read {path!r} ({type(e).__name__}: {e}); the file may be truncated, corrupt or "
                              "not a checkpoint") from None
    if not isinstance(sd, dict):
        raise WeightLoadError(f"{path!r} holds a {type(sd).__name__}, not a state dict")
    sd = sd.get("state_dict", sd)
    return {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in sd.items()
            if isinstance(v, torch.Tensor)}
