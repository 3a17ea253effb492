"""Reading diffusers/transformers model folders: a component's weights and its config, as our config dataclasses."""

import json
from pathlib import Path

import numpy as np

from pia_jax.models import config as config_lib
from pia_jax.weights import WeightLoadError, read_state_dict

# weight file stems per component, in order of preference (safetensors first: no torch, no pickle)
_STEMS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "motion": "diffusion_pytorch_model",
          "text_encoder": "model"}
_LEGACY_STEMS = {"text_encoder": "pytorch_model"}


def read_json(path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise WeightLoadError(f"cannot read {str(path)!r}: {e}") from None


def weight_files(folder: Path, component: str) -> list[Path]:
    """The weight file(s) of a component folder: plain, fp16 variant, or sharded with an index."""
    stems = [_STEMS[component]] + ([_LEGACY_STEMS[component]] if component in _LEGACY_STEMS else [])
    for stem in stems:
        for ext in (".safetensors", ".bin"):
            for name in (f"{stem}{ext}", f"{stem}.fp16{ext}"):
                if (folder / name).is_file():
                    return [folder / name]
                index = folder / f"{name}.index.json"
                if index.is_file():
                    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
                    return [folder / s for s in shards]
    raise WeightLoadError(f"no weights in {str(folder)!r}: expected {stems[0]}.safetensors (or .bin, .fp16 variants, "
                          "or a sharded index)")


def component_files(folder, component: str) -> list[Path]:
    """config.json and the weight file(s) of one diffusers/transformers component folder."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise WeightLoadError(f"{str(folder)!r} is not a diffusers {component} folder: it has no config.json")
    return [folder / "config.json"] + weight_files(folder, component)


def read_component(folder, component: str) -> tuple[dict[str, np.ndarray], dict]:
    """(state dict, config.json) of one diffusers/transformers component folder."""
    config_file, *files = component_files(folder, component)
    state = {}
    for file in files:
        state.update(read_state_dict(file))
    return state, read_json(config_file)


def is_diffusers_pipeline(path) -> bool:
    path = Path(path)
    return path.is_dir() and all((path / c / "config.json").is_file() for c in ("unet", "vae", "text_encoder"))


def _check(value, expected, what, folder):
    if value != expected:
        raise WeightLoadError(f"{folder}: {what} is {value!r}, expected {expected!r} for an SD1.5-family model")


def unet_config(cfg: dict, folder="the base UNet") -> config_lib.UNetConfig:
    """Our UNetConfig from a diffusers UNet2DConditionModel config, refusing what is not SD1.5-shaped."""
    if cfg.get("addition_embed_type") or cfg.get("cross_attention_dim") == 2048:
        raise WeightLoadError(f"{folder} is an SDXL UNet; PIA animates SD1.5-family models")
    if cfg.get("cross_attention_dim") == 1024 or cfg.get("use_linear_projection"):
        raise WeightLoadError(f"{folder} is an SD2.x UNet (cross_attention_dim {cfg.get('cross_attention_dim')}, "
                              "linear projections); PIA animates SD1.5-family models")
    if cfg.get("in_channels", 4) != 4:
        raise WeightLoadError(f"{folder} takes {cfg['in_channels']} input channels (an inpainting model?); "
                              "the base must be a 4-channel text-to-image UNet")
    _check(cfg.get("center_input_sample", False), False, "center_input_sample", folder)
    _check(cfg.get("time_embedding_type", "positional"), "positional", "time_embedding_type", folder)
    _check(cfg.get("flip_sin_to_cos", True), True, "flip_sin_to_cos", folder)
    _check(cfg.get("freq_shift", 0), 0, "freq_shift", folder)
    heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)  # diffusers' historical misnomer
    if not isinstance(heads, int):
        raise WeightLoadError(f"{folder}: per-block head counts {heads!r} are not supported (SD1.5 uses 8)")
    to_motion = {"CrossAttnDownBlock2D": "CrossAttnDownBlockMotion", "DownBlock2D": "DownBlockMotion",
                 "CrossAttnUpBlock2D": "CrossAttnUpBlockMotion", "UpBlock2D": "UpBlockMotion"}
    blocks = list(cfg["down_block_types"]) + list(cfg["up_block_types"])
    unknown = [b for b in blocks if b not in to_motion]
    if unknown:
        raise WeightLoadError(f"{folder}: block types {unknown} are not SD1.5 blocks")
    return config_lib.UNetConfig(
        in_channels=4, out_channels=cfg.get("out_channels", 4), block_out_channels=tuple(cfg["block_out_channels"]),
        down_block_types=tuple(to_motion[b] for b in cfg["down_block_types"]),
        up_block_types=tuple(to_motion[b] for b in cfg["up_block_types"]),
        layers_per_block=cfg.get("layers_per_block", 2), num_attention_heads=heads,
        cross_attention_dim=cfg["cross_attention_dim"], norm_num_groups=cfg.get("norm_num_groups", 32),
        norm_eps=cfg.get("norm_eps", 1e-5))


def vae_config(cfg: dict) -> config_lib.VAEConfig:
    return config_lib.VAEConfig(
        in_channels=cfg.get("in_channels", 3), out_channels=cfg.get("out_channels", 3),
        latent_channels=cfg.get("latent_channels", 4), block_out_channels=tuple(cfg["block_out_channels"]),
        layers_per_block=cfg.get("layers_per_block", 2), norm_num_groups=cfg.get("norm_num_groups", 32),
        scaling_factor=cfg.get("scaling_factor", 0.18215))


def text_config(cfg: dict) -> config_lib.TextConfig:
    if cfg.get("hidden_act", "quick_gelu") != "quick_gelu":
        raise WeightLoadError(f"text encoder uses {cfg['hidden_act']!r}; SD1.5's CLIP ViT-L/14 uses quick_gelu")
    fields = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "max_position_embeddings", "layer_norm_eps")
    return config_lib.TextConfig(**{k: cfg[k] for k in fields if k in cfg})
