"""A converted model directory: everything `sample.py` and `train.py` need, readable without PyTorch.

    <dir>/config.json              {"format", "version", "model": PIAConfig, "scheduler": {...}, "storage_dtype"}
    <dir>/unet.safetensors         UNetMotionModel parameters keyed by NNX path, in NNX layout
    <dir>/vae.safetensors          AutoencoderKL parameters
    <dir>/text_encoder.safetensors CLIPTextModel parameters
    <dir>/tokenizer/               CLIP tokenizer files
    <dir>/image_encoder.safetensors  optional, with an IP-Adapter (config "model.ip_adapter"): the CLIP image tower
    <dir>/image_proj.safetensors     optional, likewise: IP-Adapter's image projection (its to_k_ip / to_v_ip are
                                     UNet parameters, in unet.safetensors)
    <dir>/sources.json             the files it was made from, with sizes and sha256, and the conversion report

A directory is written complete or not at all (`pia_jax.files.atomic_write`: a temporary sibling renamed into place
on local disks; on object stores, uploaded with config.json last as the completion mark), so an interrupted or
failed write never leaves a half-written model, and an existing one is replaced only with `force`. Directories are
read from local disks.
"""

import hashlib
import json
import shutil
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from pia_jax import files, weights
from pia_jax.models import IP_ADAPTER_PARTS, PARTS, build
from pia_jax.models import config as config_lib

FORMAT, VERSION = "pia-jax-model", 1


class ModelDirError(ValueError):
    pass


@dataclass
class ModelDir:
    path: Path
    config: config_lib.PIAConfig
    scheduler: dict  # a SchedulerConfig as data (pia_jax.sampling.schedulers.from_dict)
    unet: nnx.Module | None = None
    vae: nnx.Module | None = None
    text_encoder: nnx.Module | None = None
    tokenizer: object = None
    image_encoder: nnx.Module | None = None  # the IP-Adapter parts, loaded when asked for
    image_proj: nnx.Module | None = None


def flat_params(model: nnx.Module) -> dict[str, np.ndarray]:
    """{NNX path: host array} of a model's parameters."""
    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def sha256(path, chunk=1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def describe_source(role: str, path, files=None) -> dict:
    """A record of one input: its role ('base', 'motion', 'lora', 'vae', ...), path, and the size and hash of each
    file read from it (`files`; by default the file itself, or every file of a folder)."""
    path = Path(path)
    if files is None:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    name = (lambda f: str(f.relative_to(path))) if path.is_dir() else (lambda f: f.name)
    return {"role": role, "path": str(path.resolve()),
            "files": {name(f): {"bytes": f.stat().st_size, "sha256": sha256(f)} for f in sorted(map(Path, files))}}


_SAFETENSORS_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(ml_dtypes.bfloat16): "BF16",
                       np.dtype(np.int32): "I32", np.dtype(np.int64): "I64"}


def write_safetensors(path, tensors: dict, dtype=None):
    """Writes a .safetensors file one tensor at a time (casting each to `dtype` if given), so saving never holds a
    second full copy of the weights as `safetensors.numpy.save_file` does."""
    header, offset = {}, 0
    for name, array in tensors.items():
        dt = np.dtype(dtype or array.dtype)
        size = int(np.prod(array.shape)) * dt.itemsize
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dt], "shape": list(array.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format aligns the data to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name, array in tensors.items():
            data = np.ascontiguousarray(np.asarray(array).astype(dtype or array.dtype, copy=False))
            f.write(data.reshape(-1).view(np.uint8).data)  # the bytes themselves, no further copy


def save_model_dir(path, config: config_lib.PIAConfig, models: dict, *, tokenizer=None,
                   scheduler: dict | None = None, sources=None, report: dict | None = None, dtype: str = "fp32",
                   force: bool = False) -> Path:
    """Writes a model directory. `models` maps part names to NNX modules or flat {NNX path: array} dicts;
    `tokenizer` is a transformers tokenizer or a folder of tokenizer files; `dtype` the storage dtype; `sources` a
    list of `describe_source` records, or a function returning it, called once the weights are written (so that
    hashing the inputs can overlap the writing)."""
    storage = config_lib.dtype(dtype)
    unknown = sorted(set(models) - set(PARTS + IP_ADAPTER_PARTS))
    if unknown:
        raise ValueError(f"unknown model parts {unknown}; expected some of {PARTS + IP_ADAPTER_PARTS}")
    if config.ip_adapter is not None and not set(IP_ADAPTER_PARTS) <= set(models):
        raise ValueError(f"a model with an IP-Adapter needs the parts {IP_ADAPTER_PARTS}, got {sorted(models)}")
    with files.atomic_write(path, directory=True, force=force, mark="config.json",
                            log=lambda m: print(m, file=sys.stderr)) as tmp:
        for part, model in models.items():
            flat = flat_params(model) if isinstance(model, nnx.Module) else model
            write_safetensors(tmp / f"{part}.safetensors", flat, storage)
        if tokenizer is not None:
            if isinstance(tokenizer, (str, Path)):
                shutil.copytree(tokenizer, tmp / "tokenizer")
            else:
                tokenizer.save_pretrained(str(tmp / "tokenizer"))
        meta = {"format": FORMAT, "version": VERSION, "model": config_lib.to_dict(config), "scheduler": scheduler or {},
                "storage_dtype": dtype, "parts": sorted(models)}
        sources = sources() if callable(sources) else sources
        (tmp / "sources.json").write_text(json.dumps({"sources": sources or [], "report": report or {}}, indent=2)
                                          + "\n")
        (tmp / "config.json").write_text(json.dumps(meta, indent=2) + "\n")  # the completion mark
    return Path(path) if files.is_local(path) else files.as_path(path)


def read_config(path) -> tuple[config_lib.PIAConfig, dict, dict]:
    """(model config, scheduler dict, raw metadata) of a model directory, checked without reading any weights."""
    if not files.is_local(path):
        raise ModelDirError(f"model directories are read from a local disk; copy {str(path)!r} to one first (e.g. "
                            "gcloud storage cp -r)")
    path = Path(path)
    meta_file = path / "config.json"
    if not path.is_dir():
        raise ModelDirError(f"model directory {str(path)!r} does not exist; create one with convert_torch_weights.py")
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as e:
        raise ModelDirError(f"{str(path)!r} is not a pia-jax model directory: cannot read config.json ({e}); "
                            "create one with convert_torch_weights.py") from None
    if meta.get("format") != FORMAT:
        raise ModelDirError(f"{str(meta_file)!r} is not a pia-jax model config (format {meta.get('format')!r})")
    if meta.get("version", 0) > VERSION:
        raise ModelDirError(f"{str(path)!r} has format version {meta['version']}; this pia-jax reads up to {VERSION}")
    missing = [f"{p}.safetensors" for p in meta.get("parts", []) if not (path / f"{p}.safetensors").is_file()]
    if missing:
        raise ModelDirError(f"model directory {str(path)!r} is incomplete: missing {missing}")
    try:
        config = config_lib.from_dict(config_lib.PIAConfig, meta["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise ModelDirError(f"{str(meta_file)!r} has an invalid model config ({type(e).__name__}: {e})") from None
    ip_parts = sorted(set(IP_ADAPTER_PARTS) & set(meta.get("parts", [])))
    if ip_parts != (sorted(IP_ADAPTER_PARTS) if config.ip_adapter else []):
        raise ModelDirError(f"{str(meta_file)!r}: the IP-Adapter parts {ip_parts} do not fit its model config (ip_adapter "
                            f"{'set' if config.ip_adapter else 'unset'}); convert the model again")
    return config, meta.get("scheduler", {}), meta


def open_part(path, part: str):
    """The `safe_open` handle of one part's weights: shapes from the header, each tensor read when asked for
    (safetensors checks at opening that the header fits the file, so truncated files fail here)."""
    from safetensors import safe_open
    file = Path(path) / f"{part}.safetensors"
    try:
        return safe_open(str(file), "np")
    except Exception as e:  # safetensors raises its own error types for missing, truncated or corrupt files
        raise ModelDirError(f"cannot read {str(file)!r} ({type(e).__name__}: {e}); convert the model again") from None


class _Tensors:
    """{NNX path: array} read one tensor at a time, so loading holds the host copy of one tensor, not of a model;
    each is checked for NaN/inf as it is read (one pass over memory already there), so a broken weight is named at
    load rather than found as a black video after the whole run."""

    def __init__(self, handle, where: str = ""):
        self.handle, self.where = handle, where

    def __getitem__(self, key):
        array = self.handle.get_tensor(key)
        if array.dtype.kind not in "biu" and not np.isfinite(array).all():
            bad = int(array.size - np.isfinite(array).sum())
            raise ModelDirError(f"{self.where}: tensor {key} has {bad} non-finite values (NaN or inf) of {array.size}; "
                                "the weights are broken (e.g. an fp16 overflow when they were saved): convert the "
                                "model again from its source weights")
        return array


def _check_header(path, part: str, handle, abstract) -> None:
    """Raises ModelDirError unless the stored tensors are exactly the model's parameters, shapes included."""
    stored = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
    expected = weights.param_shapes(abstract)
    problems = [f"missing {k}" for k in expected if k not in stored]
    problems += [f"unexpected {k}" for k in stored if k not in expected]
    problems += [f"{k}: shape {stored[k]}, model expects {s}" for k, s in expected.items()
                 if k in stored and stored[k] != s]
    if problems:
        raise ModelDirError(f"{part}.safetensors in {str(path)!r} does not match its config.json "
                            f"({len(problems)} problems): " + "; ".join(problems[:10]))


def check_model_dir(path, *, parts=PARTS, tokenizer: bool = True) -> tuple[config_lib.PIAConfig, dict]:
    """Everything `load_model_dir` would find wrong, found without reading a weight: the config, each part's
    safetensors header against the shapes its config implies (a truncated file fails to open), and the tokenizer
    files. Returns (model config, scheduler dict)."""
    from pia_jax.models.tokenizer import _is_tokenizer_dir
    config, scheduler, meta = read_config(path)
    for part in parts:
        if part not in meta["parts"]:
            raise ModelDirError(f"model directory {str(path)!r} has no {part!r} weights (it has {meta['parts']})")
        with open_part(path, part) as handle:
            _check_header(path, part, handle, build(config, part))
    if tokenizer and not _is_tokenizer_dir(Path(path) / "tokenizer"):
        raise ModelDirError(f"model directory {str(path)!r} has no tokenizer (tokenizer/vocab.json + merges.txt or "
                            "tokenizer/tokenizer.json); convert it again or copy SD1.5's tokenizer/ folder there")
    return config, scheduler


def load_model_dir(path, *, parts=PARTS, dtype=jnp.float32, param_dtype=jnp.float32, sharding=None,
                   model_kwargs: dict | None = None, tokenizer: bool = True) -> ModelDir:
    """Builds the models of a directory with their weights. `dtype` is the compute dtype, `param_dtype` the
    parameter dtype; `sharding` (one sharding or a function of (path, shape)) places the parameters;
    `model_kwargs` maps a part to extra constructor arguments (e.g. attention kernels)."""
    config, scheduler, meta = read_config(path)
    out = ModelDir(Path(path), config, scheduler)
    for part in parts:
        if part not in meta["parts"]:
            raise ModelDirError(f"model directory {str(path)!r} has no {part!r} weights (it has {meta['parts']})")
        abstract = build(config, part, dtype=dtype, param_dtype=param_dtype, **(model_kwargs or {}).get(part, {}))
        with open_part(path, part) as handle:
            _check_header(path, part, handle, abstract)
            where = f"{part}.safetensors in {str(path)!r}"
            setattr(out, part, weights.fill(abstract, _Tensors(handle, where), sharding))
    if tokenizer:
        from pia_jax.models.tokenizer import load_tokenizer
        out.tokenizer = load_tokenizer(Path(path) / "tokenizer")
    return out
