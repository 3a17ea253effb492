"""IP-Adapter (SD1.5) weights for a model directory: the adapter file and its image encoder, checked against each
other (and later the base UNet) before anything else is read, then mapped by rule.

The adapter file: h94's `ip-adapter_sd15.bin` (a torch pickle of {"image_proj": {...}, "ip_adapter": {...}}) or its
`.safetensors` form (the same keys flattened: "image_proj.proj.weight", "ip_adapter.1.to_k_ip.weight").
  image_proj.{proj.weight, proj.bias, norm.weight, norm.bias} -> the image_proj part (`models.ip_adapter`)
  ip_adapter.{2k+1}.{to_k_ip, to_v_ip}.weight -> the UNet's k-th spatial cross-attention, in diffusers' order
      (`models.ip_adapter.cross_attention_sites`; even numbers were self-attentions, which have no IP layers)
The image encoder: a transformers CLIPVisionModelWithProjection folder (h94's `models/image_encoder`: config.json and
model.safetensors or pytorch_model.bin) -> the image_encoder part. Every other key is an error naming it, and the
variants this code does not compute (Plus, Full Face, FaceID, SDXL) are refused by name.
"""

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pia_jax import weights
from pia_jax.models import config as config_lib
from pia_jax.models.ip_adapter import cross_attention_sites
from pia_jax.weights import KeyMap, WeightLoadError

TRANSFORMERS_CLIP_VISION = KeyMap(
    "transformers CLIPVisionModelWithProjection",
    ignore=((r"(^|\.)position_ids$", "constant buffer (0..n-1), rebuilt by the model"),),
)
IMAGE_PROJ = KeyMap("IP-Adapter image_proj", renames=((r"^image_proj\.", ""),))
PLAIN_IMAGE_PROJ = ("image_proj.proj.weight", "image_proj.proj.bias", "image_proj.norm.weight", "image_proj.norm.bias")
IP_LAYER = re.compile(r"^ip_adapter\.(\d+)\.(to_k_ip|to_v_ip)\.weight$")
# image_proj layouts of the variants that need other projections (key pattern, name), checked in order
VARIANTS = ((r"^image_proj\.perceiver_resampler\.", "IP-Adapter FaceID Plus (a perceiver resampler)"),
            (r"^image_proj\.(latents|proj_in\.)", "IP-Adapter Plus (a resampler over patch embeddings)"),
            (r"^image_proj\.proj\.3\.", "IP-Adapter Full Face (an MLP projection of 257 tokens)"),
            (r"^image_proj\.proj\.0\.", "IP-Adapter FaceID (an MLP projection of InsightFace embeddings)"),
            (r"^ip_adapter\.\d+\.to_[qkv]_lora\.|^ip_adapter\.\d+\.to_out_lora\.", "IP-Adapter FaceID (LoRA layers)"))
SDXL_CROSS_ATTENTION_DIM = 2048
ENCODER_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


@dataclass
class IPAdapterWeights:
    config: config_lib.IPAdapterConfig
    image_proj: dict  # "image_proj.proj.weight", ... (torch layouts)
    layers: dict  # {file layer id: {"to_k_ip": array, "to_v_ip": array}}
    encoder: dict  # the CLIPVisionModelWithProjection state dict
    files: list = field(default_factory=list)  # the encoder files read


def read_adapter_file(path) -> dict:
    """The adapter's tensors with flat keys ("image_proj.proj.weight"), from either file form."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return weights.read_state_dict(path)
    try:
        import torch
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Exception as e:  # noqa: BLE001  truncated or corrupt pickles raise many error types
        raise WeightLoadError(f"cannot read {str(path)!r} ({type(e).__name__}: {e}); the file may be truncated, "
                              "corrupt or not an IP-Adapter checkpoint") from None
    groups = ("image_proj", "ip_adapter")
    if not (isinstance(sd, dict) and set(sd) == set(groups) and all(isinstance(sd[g], dict) for g in groups)):
        found = sorted(sd) if isinstance(sd, dict) else type(sd).__name__
        raise WeightLoadError(f"{str(path)!r} is not an IP-Adapter checkpoint: it holds {found}, not exactly the "
                              "'image_proj' and 'ip_adapter' state dicts")
    return {f"{g}.{k}": v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
            for g in groups for k, v in sd[g].items()}


def split_adapter(sd: dict, where: str) -> tuple[dict, dict, int, int]:
    """(image_proj tensors, {layer id: {to_k_ip, to_v_ip}}, image embedding width, token width) of a plain SD1.5
    IP-Adapter; every other layout is an error naming what it is."""
    for pattern, name in VARIANTS:
        if any(re.search(pattern, k) for k in sd):
            raise WeightLoadError(f"{where} is an {name}; only the plain IP-Adapter (ip-adapter_sd15, a Linear + "
                                  "LayerNorm projection to 4 tokens) is implemented")
    image_proj = {k: np.asarray(sd[k]) for k in PLAIN_IMAGE_PROJ if k in sd}
    layers, unknown = {}, []
    for key, value in sd.items():
        m = IP_LAYER.match(key)
        if m:
            layers.setdefault(int(m[1]), {})[m[2]] = np.asarray(value)
        elif key not in image_proj:
            unknown.append(key)
    missing = [k for k in PLAIN_IMAGE_PROJ if k not in image_proj]
    if unknown or missing or not layers:
        raise WeightLoadError(f"{where} is not an SD1.5 IP-Adapter: unexpected keys {unknown[:8]}, missing "
                              f"{missing}{', no ip_adapter layers' if not layers else ''}")
    width = image_proj["image_proj.norm.weight"].shape[0]
    if width == SDXL_CROSS_ATTENTION_DIM:
        raise WeightLoadError(f"{where} is an SDXL IP-Adapter ({width}-wide image tokens for SDXL's cross-attention); "
                              "only SD1.5 IP-Adapters (768) are implemented")
    proj = image_proj["image_proj.proj.weight"]
    if proj.ndim != 2 or proj.shape[0] % width:
        raise WeightLoadError(f"{where}: image_proj.proj.weight {proj.shape} is not (tokens x {width}, embed dim)")
    expected = list(range(1, 2 * len(layers), 2))
    bad = [i for i in sorted(layers) if len(layers[i]) != 2]
    if sorted(layers) != expected or bad:
        raise WeightLoadError(f"{where}: ip_adapter layers {sorted(layers)} are not 1, 3, ..., {expected[-1]} each "
                              f"with to_k_ip and to_v_ip (incomplete: {bad})")
    return image_proj, layers, proj.shape[1], width


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise WeightLoadError(f"cannot read {path}: {e}") from None


def encoder_config(folder: Path, embed_dim: int, where: str) -> config_lib.VisionConfig:
    """The tower of a CLIPVisionModelWithProjection folder's config.json, checked against the adapter's image_proj
    input (`embed_dim`: 1024 for ViT-H/14, whose projection_dim it is)."""
    cfg = _read_json(folder / "config.json")
    cfg = cfg.get("vision_config", cfg)  # a whole CLIPConfig folder: its vision tower
    if cfg.get("hidden_act", "quick_gelu") not in ("gelu", "quick_gelu"):
        raise WeightLoadError(f"{folder}: hidden_act {cfg['hidden_act']!r} is not implemented (gelu, quick_gelu)")
    names = [f.name for f in dataclasses.fields(config_lib.VisionConfig)]
    vision = config_lib.VisionConfig(**{k: cfg[k] for k in names if k in cfg})
    if cfg.get("projection_dim") != embed_dim:
        raise WeightLoadError(f"the image encoder {str(folder)!r} projects to {cfg.get('projection_dim')} dims "
                              f"(a {vision.num_hidden_layers}-layer, {vision.hidden_size}-wide tower), but {where} "
                              f"takes {embed_dim}-dim image embeddings: give the encoder the adapter was trained with "
                              "(ip-adapter_sd15: OpenCLIP ViT-H/14, h94/IP-Adapter models/image_encoder)")
    return vision


def encoder_weights(folder: Path) -> tuple[dict, list]:
    """(state dict, files read) of a transformers model folder: model.safetensors (or its shards) or
    pytorch_model.bin."""
    file = next((folder / f for f in ENCODER_WEIGHTS if (folder / f).is_file()), None)
    if file is None:
        raise WeightLoadError(f"the image encoder folder {str(folder)!r} holds none of {ENCODER_WEIGHTS}")
    if not file.name.endswith(".index.json"):
        return weights.read_state_dict(file), [file]
    shards = sorted({folder / s for s in _read_json(file).get("weight_map", {}).values()})
    if not shards:
        raise WeightLoadError(f"{file} lists no shards")
    return {k: v for shard in shards for k, v in weights.read_state_dict(shard).items()}, [file, *shards]


def read_ip_adapter(adapter: Path, encoder: Path) -> IPAdapterWeights:
    """Reads and checks the adapter file, then the encoder's config against it, then the encoder's weights."""
    if not Path(encoder).is_dir() or not (Path(encoder) / "config.json").is_file():
        raise WeightLoadError(f"--image-encoder {str(encoder)!r} is not a transformers model folder with a "
                              "config.json (e.g. h94/IP-Adapter models/image_encoder)")
    where = f"the IP-Adapter {str(adapter)!r}"
    image_proj, layers, embed_dim, width = split_adapter(read_adapter_file(adapter), where)
    vision = encoder_config(Path(encoder), embed_dim, where)
    tokens = image_proj["image_proj.proj.weight"].shape[0] // width
    cfg = config_lib.IPAdapterConfig(image_encoder=vision, image_embed_dim=embed_dim, num_tokens=tokens,
                                     cross_attention_dim=width)
    encoder_sd, files = encoder_weights(Path(encoder))
    return IPAdapterWeights(cfg, image_proj, layers, encoder_sd, files)


def unet_ip_state(layers: dict, unet_cfg: config_lib.UNetConfig, where: str = "the IP-Adapter") -> dict:
    """The adapter's to_k_ip/to_v_ip under the UNet's (diffusers-style) names, "<site>.attn2.to_k_ip.weight"."""
    sites = cross_attention_sites(unet_cfg)
    if len(layers) != len(sites):
        raise WeightLoadError(f"{where} has {len(layers)} cross-attention layers, the UNet has {len(sites)}")
    ids = sorted(layers)
    return {f"{site}.attn2.{name}.weight": layers[i][name] for site, i in zip(sites, ids)
            for name in ("to_k_ip", "to_v_ip")}


def with_ip_adapter(cfg: config_lib.PIAConfig, ip: config_lib.IPAdapterConfig, where: str) -> config_lib.PIAConfig:
    """`cfg` with the IP-Adapter section and the UNet's image tokens; an adapter for another UNet is an error."""
    if ip.cross_attention_dim != cfg.unet.cross_attention_dim:
        raise WeightLoadError(f"{where} makes {ip.cross_attention_dim}-wide image tokens; the base UNet's "
                              f"cross-attention takes {cfg.unet.cross_attention_dim}")
    return dataclasses.replace(
        cfg, unet=dataclasses.replace(cfg.unet, ip_adapter_tokens=ip.num_tokens), ip_adapter=ip)
