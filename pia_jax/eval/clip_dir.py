"""The converted CLIP metric model: a transformers `CLIPModel` folder turned once into our format, and loaded back
without PyTorch or transformers' model code.

    <dir>/config.json        {"format": "pia-jax-clip", "version", "model": CLIPConfig, "source": {...}}
    <dir>/clip.safetensors   CLIPModel parameters keyed by NNX path, in NNX layout
    <dir>/tokenizer/         the CLIP tokenizer files

Written into a hidden sibling and renamed into place when complete (`files.atomic_write`).
"""

import dataclasses
import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from pia_jax import files, weights
from pia_jax.eval.clip import TRANSFORMERS_CLIP, CLIPConfig, CLIPModel, VisionConfig
from pia_jax.models.abstract import abstract_model
from pia_jax.models.config import TextConfig
from pia_jax.weights import model_dir

FORMAT, VERSION = "pia-jax-clip", 1
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


class ClipDirError(ValueError):
    pass


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ClipDirError(f"cannot read {path}: {e}") from None


def config_from_transformers(src) -> CLIPConfig:
    """Our CLIPConfig from a transformers CLIPModel folder's config.json (and preprocessor_config.json if present).
    Settings this implementation does not compute (another activation, other resampling) are refused."""
    src = Path(src)
    cfg = _read_json(src / "config.json")
    if "text_config" not in cfg or "vision_config" not in cfg:
        raise ClipDirError(f"{src / 'config.json'} is not a CLIPModel config (no text_config/vision_config)")
    text, vision = cfg["text_config"], cfg["vision_config"]
    for name, tower in (("text", text), ("vision", vision)):
        if tower.get("hidden_act", "quick_gelu") != "quick_gelu":
            raise ClipDirError(f"the {name} tower uses {tower['hidden_act']!r}; only quick_gelu (OpenAI CLIP) is "
                               "implemented")
    pick = lambda cls, d: {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d}  # noqa: E731
    kwargs = {"text": TextConfig(**pick(TextConfig, text)), "vision": VisionConfig(**pick(VisionConfig, vision)),
              "projection_dim": cfg.get("projection_dim", 512)}
    pre_file = src / "preprocessor_config.json"
    if pre_file.is_file():
        pre = _read_json(pre_file)
        size, crop = pre.get("size", 224), pre.get("crop_size", kwargs["vision"].image_size)
        size = size.get("shortest_edge", size) if isinstance(size, dict) else size
        crop = crop.get("height", crop) if isinstance(crop, dict) else crop
        if pre.get("resample", 3) != 3 or crop != kwargs["vision"].image_size or not isinstance(size, int):
            raise ClipDirError(f"{pre_file}: only bicubic (3) resizing of the short side and a centre crop to the "
                               f"model's {kwargs['vision'].image_size} pixels are implemented, got {pre}")
        kwargs.update(resize=size, image_mean=tuple(pre.get("image_mean", CLIPConfig.image_mean)),
                      image_std=tuple(pre.get("image_std", CLIPConfig.image_std)))
    return CLIPConfig(**kwargs)


def _config_to_dict(config: CLIPConfig) -> dict:
    return dataclasses.asdict(config)


def _config_from_dict(d: dict) -> CLIPConfig:
    rest = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k not in ("text", "vision")}
    return CLIPConfig(text=TextConfig(**d["text"]), vision=VisionConfig(**d["vision"]), **rest)


def read_weights(weight_file: Path) -> dict:
    """A state dict from one weight file, or from every shard a `.index.json` lists."""
    if weight_file.name.endswith(".index.json"):
        shards = sorted(set(_read_json(weight_file).get("weight_map", {}).values()))
        if not shards:
            raise ClipDirError(f"{weight_file} lists no shards")
        return {k: v for shard in shards for k, v in weights.read_state_dict(weight_file.parent / shard).items()}
    return weights.read_state_dict(weight_file)


def convert_clip(src, out, force: bool = False) -> Path:
    """Converts a transformers CLIPModel folder (config.json, model.safetensors (or its shards) or
    pytorch_model.bin, tokenizer files) into a metric-model directory; the strict loader checks every tensor."""
    src = Path(src)
    if not src.is_dir():
        raise ClipDirError(f"{src} is not a folder; expected a transformers CLIPModel folder "
                           "(e.g. a download of openai/clip-vit-large-patch14)")
    weight_file = next((src / f for f in WEIGHT_FILES if (src / f).is_file()), None)
    if weight_file is None:
        raise ClipDirError(f"{src} holds none of {WEIGHT_FILES}")
    from pia_jax.models.tokenizer import load_tokenizer
    tokenizer = load_tokenizer(src)  # fails early, before any weight is read
    config = dataclasses.replace(config_from_transformers(src), eos_token_id=int(tokenizer.eos_token_id))
    if Path(out).exists() and not force:
        raise FileExistsError(f"{str(out)!r} already exists; pass --force to replace it")
    abstract = abstract_model(CLIPModel, config)
    model = weights.load_state_dict(abstract, read_weights(weight_file), TRANSFORMERS_CLIP)
    with files.atomic_write(out, directory=True, force=force, mark="config.json") as tmp:
        model_dir.write_safetensors(tmp / "clip.safetensors", model_dir.flat_params(model))
        (tmp / "tokenizer").mkdir()
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy(src / name, tmp / "tokenizer" / name)
        meta = {"format": FORMAT, "version": VERSION, "model": _config_to_dict(config),
                "source": model_dir.describe_source("clip", src, [weight_file, *src.glob("model-*.safetensors")])}
        (tmp / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    return Path(out)


def read_clip_config(path) -> CLIPConfig:
    path = Path(path)
    meta_file = path / "config.json"
    if not meta_file.is_file():
        raise ClipDirError(f"{str(path)!r} is not a converted CLIP directory (no config.json); make one with "
                           "`evaluate.py convert-clip`")
    meta = _read_json(meta_file)
    if meta.get("format") != FORMAT or meta.get("version", 0) > VERSION:
        raise ClipDirError(f"{meta_file} is not a pia-jax CLIP config (format {meta.get('format')!r} "
                           f"v{meta.get('version')}); make one with `evaluate.py convert-clip`")
    try:
        return _config_from_dict(meta["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise ClipDirError(f"{meta_file} has an invalid model config ({type(e).__name__}: {e})") from None


def load_clip(path, dtype=jnp.float32):
    """(CLIPModel with its weights, tokenizer) of a converted directory."""
    from pia_jax.models.tokenizer import load_tokenizer
    config = read_clip_config(path)
    abstract = abstract_model(CLIPModel, config, dtype=dtype)
    expected = weights.param_shapes(abstract)
    from safetensors.numpy import load_file
    try:
        flat = load_file(str(Path(path) / "clip.safetensors"))
    except Exception as e:  # missing, truncated or corrupt files raise various safetensors errors
        raise ClipDirError(f"cannot read {Path(path) / 'clip.safetensors'} ({type(e).__name__}: {e}); convert "
                           "again") from None
    problems = [f"missing {k}" for k in expected if k not in flat]
    problems += [f"unexpected {k}" for k in flat if k not in expected]
    problems += [f"{k}: shape {flat[k].shape}, model expects {s}" for k, s in expected.items()
                 if k in flat and tuple(flat[k].shape) != s]
    if problems:
        raise ClipDirError(f"clip.safetensors in {str(path)!r} does not match its config.json: " + "; ".join(
            problems[:10]))
    return weights.fill(abstract, {k: np.asarray(v) for k, v in flat.items()}), load_tokenizer(Path(path))
