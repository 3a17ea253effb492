"""One model directory from any valid combination of base model, motion weights, VAE and LoRAs.

Order of work, as the reference composes a personalized animator: base model (diffusers folder or LDM single file)
-> optional separate VAE -> LoRAs merged into the base UNet / text encoder -> motion LoRAs merged into the motion
modules (`motion_lora.py`) -> motion modules and the 9-channel `conv_in` attached -> strict mapping onto the NNX
parameters -> one atomic write. Every LoRA file is read and checked for its kind first, before any model is read.

The `conv_in` rule (`conv_in="auto"`): with a personalized single-file base, input channels 0-3 and the bias come from
the base and channels 4-8 from the PIA weights (PIA's DreamBooth path, diffusers' `from_unet2d`); with a diffusers
folder base (SD1.5 itself in the reference workflow), all of `conv_in` comes from the PIA weights. `"base"` and
`"motion"` force either rule. A LoRA on `conv_in` changes channels 0-3 under either rule, as the reference merges it
into the 9-channel layer.

Memory: the source tensors are read once and passed on by reference (renames, views for the layout changes); only
LoRA-merged tensors are copied, and the writer casts one tensor at a time, so the peak is about one model in its
source dtype plus the LoRA-touched tensors.
"""

import dataclasses
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pia_jax import weights
from pia_jax.models import config as config_lib
from pia_jax.models.abstract import abstract_model
from pia_jax.weights import WeightLoadError, model_dir
from pia_jax.weights.convert import animatediff, ldm, lora, motion_lora, presets
from pia_jax.weights.convert import diffusers_folder as dfolder

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


@dataclass(frozen=True)
class Request:
    base: Path  # diffusers folder or LDM single file
    motion: Path  # pia.ckpt, a PIA condition-adapter folder, or AnimateDiff motion modules
    out: Path
    vae: Path | None = None
    loras: tuple[tuple[Path, float], ...] = ()  # (file, multiplier)
    motion_loras: tuple[tuple[Path, float], ...] = ()  # (AnimateDiff motion LoRA file, multiplier)
    config_from: Path | None = None  # a diffusers SD1.5 folder: tokenizer and configs for a single-file base
    conv_in: str = "auto"  # auto | base | motion
    legacy_lora_alpha: bool = False
    extract_ema: bool = False
    widen_conv_in: bool = False  # plain AnimateDiff motion modules -> 9-channel conv_in with zero condition channels
    motion_heads: int | None = None  # None: from the adapter's config.json, else 8 (AnimateDiff/PIA)
    norm_semantics: str = "pia"
    dtype: str = "fp32"
    force: bool = False
    ip_adapter: Path | None = None  # IP-Adapter file (ip-adapter_sd15.bin / .safetensors), with image_encoder
    image_encoder: Path | None = None  # its image encoder: a transformers CLIPVisionModelWithProjection folder
    scheduler_config: str | None = None  # a SCHEDULER_PRESETS name; None: by the motion file's name (presets.py)


def _need(path: Path | None, what: str, folder_ok: bool):
    if path is None:
        return
    if not path.exists():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    if path.is_dir() and not folder_ok:
        raise WeightLoadError(f"{what} {str(path)!r} is a directory; expected a checkpoint file")
    if path.is_file() and path.suffix not in CHECKPOINT_SUFFIXES:
        raise WeightLoadError(f"{what} {str(path)!r}: unknown file type {path.suffix!r}; expected one of "
                              f"{', '.join(CHECKPOINT_SUFFIXES)}")


def _pipeline_folder(path: Path, what: str):
    if not (dfolder.is_diffusers_pipeline(path) and (path / "tokenizer").is_dir()):
        raise WeightLoadError(f"{what} {str(path)!r} is not a diffusers SD1.5 pipeline folder (needs unet/, vae/, "
                              "text_encoder/ with config.json, and tokenizer/)")


def check_request(req: Request):
    """Every check that needs no weights, so bad arguments fail before any expensive reading."""
    if req.conv_in not in ("auto", "base", "motion"):
        raise ValueError(f"conv_in must be auto, base or motion, got {req.conv_in!r}")
    config_lib.dtype(req.dtype)  # raises for a name outside the vocabulary
    presets.scheduler_preset(req.motion, req.scheduler_config)
    if req.norm_semantics not in config_lib.NORM_SEMANTICS:
        raise ValueError(f"norm semantics must be one of {sorted(config_lib.NORM_SEMANTICS)}")
    _need(req.base, "base model", folder_ok=True)
    if req.base.is_dir():
        _pipeline_folder(req.base, "base model folder")
    else:
        if req.config_from is None:
            raise ValueError(f"the single-file base {str(req.base)!r} has no tokenizer: pass --config-from with a "
                             "diffusers SD1.5 folder (e.g. stable-diffusion-v1-5) to take the tokenizer and configs "
                             "from")
        _need(req.config_from, "--config-from folder", folder_ok=True)
        _pipeline_folder(req.config_from, "--config-from")
    _need(req.motion, "motion checkpoint", folder_ok=True)
    if req.motion.is_dir() and not (req.motion / "config.json").is_file():
        raise WeightLoadError(f"motion folder {str(req.motion)!r} is not a diffusers MotionAdapter folder "
                              "(no config.json)")
    _need(req.vae, "VAE", folder_ok=True)
    for path, multiplier in req.loras + req.motion_loras:
        _need(path, "LoRA", folder_ok=False)
        if not np.isfinite(multiplier):
            raise ValueError(f"LoRA multiplier for {str(path)!r} must be finite, got {multiplier}")
    if (req.ip_adapter is None) != (req.image_encoder is None):
        raise ValueError("--ip-adapter and --image-encoder go together: the adapter file and its image encoder folder "
                         "(h94/IP-Adapter models/ip-adapter_sd15.bin and models/image_encoder)")
    _need(req.ip_adapter, "IP-Adapter", folder_ok=False)
    _need(req.image_encoder, "image encoder", folder_ok=True)
    if req.out.exists() and not req.force:
        raise FileExistsError(f"output {str(req.out)!r} already exists; pass --force to replace it")
    parent = req.out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not (parent.is_dir() and os.access(parent, os.W_OK | os.X_OK)):
        raise PermissionError(f"cannot create the output {str(req.out)!r}: {str(parent)!r} is not a writable folder")


class Sources:
    """Records each input file as it is read and hashes it on a second thread meanwhile: sha256 of SD1.5 + PIA takes
    ~10 s on one core, which then overlaps reading, mapping and writing."""

    def __init__(self):
        self.pool, self.pending = ThreadPoolExecutor(1), []

    def add(self, role: str, root: Path, files=None, **extra):
        self.pending.append((self.pool.submit(model_dir.describe_source, role, root, files), extra))

    def records(self) -> list[dict]:
        return [{**future.result(), **extra} for future, extra in self.pending]

    def close(self):
        self.pool.shutdown(wait=False, cancel_futures=True)


def _configs_of(folder: Path) -> config_lib.PIAConfig:
    try:
        return config_lib.PIAConfig(
            unet=dfolder.unet_config(dfolder.read_json(folder / "unet" / "config.json"), str(folder / "unet")),
            vae=dfolder.vae_config(dfolder.read_json(folder / "vae" / "config.json")),
            text=dfolder.text_config(dfolder.read_json(folder / "text_encoder" / "config.json")))
    except (KeyError, TypeError) as e:
        raise WeightLoadError(f"{str(folder)!r}: a config.json lacks or mistypes a field ({type(e).__name__}: {e})")


def read_base(req: Request, report: dict, sources: Sources):
    """({'unet', 'vae', 'text_encoder'} diffusers-named dicts, PIAConfig, tokenizer folder); the VAE is left out when
    --vae replaces it."""
    wanted = ("unet", "text_encoder") + (("vae",) if req.vae is None else ())
    if req.base.is_dir():
        cfg = _configs_of(req.base)
        parts = {part: dfolder.read_component(req.base / part, part)[0] for part in wanted}
        sources.add("base", req.base, [f for part in wanted for f in dfolder.component_files(req.base / part, part)])
        report["base"] = {"converted": {part: len(sd) for part, sd in parts.items()}}
        return parts, cfg, req.base / "tokenizer"
    cfg = _configs_of(req.config_from)
    sources.add("base", req.base)
    parts, rep = ldm.split_ldm_checkpoint(weights.read_state_dict(req.base), cfg.unet, cfg.vae,
                                          extract_ema=req.extract_ema)
    if "unet" not in parts:
        raise WeightLoadError(f"{str(req.base)!r} holds no UNet weights (model.diffusion_model.*)")
    if req.vae is not None:
        parts.pop("vae", None)
    configs = [req.config_from / part / "config.json" for part in ("unet", "vae", "text_encoder")]
    for part in (p for p in wanted if p not in parts):  # pruned civitai files sometimes lack the VAE or text encoder
        parts[part] = dfolder.read_component(req.config_from / part, part)[0]
        configs += dfolder.component_files(req.config_from / part, part)[1:]
        rep[f"{part} taken from --config-from"] = len(parts[part])
    sources.add("config_from", req.config_from, configs)
    report["base"] = rep
    return parts, cfg, req.config_from / "tokenizer"


def read_vae(path: Path, cfg: config_lib.VAEConfig, report: dict, sources: Sources) -> dict:
    """A separate VAE: a diffusers AutoencoderKL folder (or a pipeline folder's vae/), or an LDM/diffusers file."""
    if path.is_dir():
        folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
        sd, vcfg = dfolder.read_component(folder, "vae")
        sources.add("vae", path, dfolder.component_files(folder, "vae"))
        if dfolder.vae_config(vcfg) != cfg:
            raise WeightLoadError(f"VAE folder {str(folder)!r} has config {dfolder.vae_config(vcfg)}, the base has "
                                  f"{cfg}")
        report["vae"] = {"converted": {"vae": len(sd)}}
        return sd
    sources.add("vae", path)
    sd, report["vae"] = ldm.convert_ldm_vae(weights.read_state_dict(path), cfg)
    return sd


def read_motion(req: Request, cfg: config_lib.UNetConfig, sources: Sources):
    """Reads the motion checkpoint and checks it against the base UNet `cfg`. Returns (motion, spatial, info,
    unet_cfg): the motion-module (and PIA conv_in) tensors in diffusers names; the spatial UNet tensors a whole
    PIA-trained UNet file also holds (unused: the base provides them; counted in the report); the checkpoint's
    layout as `animatediff.convert_motion_checkpoint` reports it (conv_in channels, mid block, position-table length,
    ignored tensors); and `cfg` with the input channels and motion-module fields that layout implies."""
    heads, seq = req.motion_heads, None
    if req.motion.is_dir():
        sd, mcfg = dfolder.read_component(req.motion, "motion")
        sources.add("motion", req.motion, dfolder.component_files(req.motion, "motion"))
        heads = heads or mcfg.get("motion_num_attention_heads")
        seq = mcfg.get("motion_max_seq_length")
        for key, expected in (("motion_norm_num_groups", cfg.norm_num_groups),
                              ("motion_transformer_layers_per_block", 1)):  # our motion modules have one block
            if mcfg.get(key, expected) not in (expected, [expected] * len(cfg.block_out_channels)):
                raise WeightLoadError(f"motion adapter {str(req.motion)!r}: {key} is {mcfg[key]}, expected {expected}")
    else:
        sd = weights.read_state_dict(req.motion)
        sources.add("motion", req.motion)
    motion, spatial, info = animatediff.convert_motion_checkpoint(sd)
    del sd
    found = (tuple(info["block_out_channels"]), info["layers_per_block"])
    if found != (cfg.block_out_channels, cfg.layers_per_block):
        raise WeightLoadError(f"the motion modules are for a UNet with blocks {found[0]} of {found[1]} layers, the "
                              f"base UNet has blocks {cfg.block_out_channels} of {cfg.layers_per_block} layers")
    channels = info["conv_in_channels"]
    if channels not in (None, config_lib.PIA_IN_CHANNELS):
        raise WeightLoadError(f"the motion checkpoint's conv_in takes {channels} input channels; PIA's takes "
                              f"{config_lib.PIA_IN_CHANNELS} (latent, affinity mask, condition latent)")
    if channels and req.widen_conv_in:
        raise ValueError("--widen-conv-in is for plain AnimateDiff motion modules; these PIA weights already have a "
                         f"{channels}-channel conv_in")
    in_channels = channels or (config_lib.PIA_IN_CHANNELS if req.widen_conv_in else config_lib.LATENT_CHANNELS)
    unet_cfg = dataclasses.replace(cfg, in_channels=in_channels, motion_mid_block=info["mid_block"],
                                   motion_max_seq_length=info["max_seq_length"] or seq or 32,
                                   motion_num_attention_heads=heads or 8)
    return motion, spatial, info, unet_cfg


def attach_motion(unet: dict, conv_in_before_lora: np.ndarray, motion: dict, info: dict, mode: str,
                  widen: bool) -> dict:
    """The UNetMotionModel state dict: base spatial weights + motion modules + conv_in by the chosen rule."""
    if info["conv_in_channels"] is None or mode == "base":
        merged = weights.merge_unet_and_adapter(unet, motion)
        if widen:  # PIA's training start: zero condition channels
            from pia_jax.models.unet import widen_conv_in_kernel
            merged["conv_in.weight"] = widen_conv_in_kernel(np.asarray(merged["conv_in.weight"]), in_axis=1)
        return merged
    merged = weights.merge_unet_and_adapter(unet, {k: v for k, v in motion.items() if not k.startswith("conv_in.")})
    conv = np.array(motion["conv_in.weight"], dtype=np.float32)
    latent = config_lib.LATENT_CHANNELS
    conv[:, :latent] += np.asarray(unet["conv_in.weight"], np.float32) - np.asarray(conv_in_before_lora, np.float32)
    merged["conv_in.weight"], merged["conv_in.bias"] = conv, motion["conv_in.bias"]
    return merged


def to_nnx(state: dict, cls, cfg, keymap: weights.KeyMap, ignored: dict) -> dict:
    """Strictly maps a diffusers-named dict onto the parameters of `cls(cfg)` (NNX paths and layouts); counts the
    keys the keymap's ignore rules consume in `ignored` (by reason)."""
    flat, problems = weights.map_keys(state, keymap, weights.param_shapes(abstract_model(cls, cfg)),
                                      ignored)
    if problems:
        raise weights.problems_error(f"cannot build the {cls.__name__}", problems, limit=20)
    return flat


def read_loras(req: Request) -> tuple[list, list]:
    """([(LoRA state, multiplier)], [(motion LoRA state, multiplier)]), each file read and checked for its kind (a
    motion LoRA given as --lora, a truncated file, ...) before any model is read."""
    loras, motion = [], []
    for paths, out, flag, check in ((req.loras, loras, "--lora", lora.check),
                                    (req.motion_loras, motion, "--motion-lora", motion_lora.check)):
        for i, (path, multiplier) in enumerate(paths):
            try:
                state = lora.read_lora(path)
                check(i, state)
            except WeightLoadError as e:
                raise WeightLoadError(f"{flag} {str(path)!r}: {e}") from None
            out.append((state, multiplier))
    return loras, motion


def merge_motion_loras(req: Request, motion: dict, loras: list, report: dict, sources: Sources, log) -> dict:
    """The motion modules with the motion LoRAs merged; the mid-block keys a PIA model has no layer for are named in
    the report (and counted in the log's ignored line)."""
    for path, m in req.motion_loras:
        sources.add("motion_lora", path, multiplier=m)
    motion, reps = motion_lora.merge_motion_loras(motion, loras)
    report["motion_loras"] = [{"file": str(path), "multiplier": m, "motion layers": len(rep.motion),
                               "ignored": rep.ignored} for (path, m), rep in zip(req.motion_loras, reps)]
    for summary in report["motion_loras"]:
        skipped = f", {len(summary['ignored'])} tensors skipped: {motion_lora.NO_MID_BLOCK}" * bool(summary["ignored"])
        log(f"motion lora: {summary['file']} x{summary['multiplier']}: {summary['motion layers']} motion-module "
            f"layers{skipped}")
    return motion


def _lora_summary(path, multiplier, rep: lora.LoraReport) -> dict:
    return {"file": str(path), "multiplier": multiplier, "unet modules": len(rep.unet),
            "text_encoder modules": len(rep.text_encoder), "ignored": rep.ignored}


def ignored_summary(report: dict) -> str:
    """One line explaining the source tensors that were read but not written, counted by rule over every input."""
    counts = Counter()
    for name in ("base", "vae", "motion", "mapping"):
        counts.update(report.get(name, {}).get("ignored", {}))  # {reason: tensors}
    for summary in report.get("loras", []) + report.get("motion_loras", []):
        counts.update(summary["ignored"].values())  # {key: reason}
    if not counts:
        return "ignored: no source tensor"
    return f"ignored {counts.total()} source tensors, by rule: " + "; ".join(f"{n} {r}" for r, n in
                                                                            counts.most_common())


def read_base_and_ip_adapter(req: Request, report: dict, sources: Sources, log):
    """`read_base`, with the IP-Adapter (`ip_adapter.py`) read and checked against its image encoder first when
    asked for: its to_k_ip/to_v_ip join the base UNet's tensors, its image encoder and projection come as the parts
    image_encoder and image_proj, and the config gains its section (the UNet's image tokens)."""
    if req.ip_adapter is None:
        return read_base(req, report, sources)
    from pia_jax.weights.convert import ip_adapter
    ip = ip_adapter.read_ip_adapter(req.ip_adapter, req.image_encoder)
    sources.add("ip_adapter", req.ip_adapter)
    sources.add("image_encoder", req.image_encoder, [req.image_encoder / "config.json", *ip.files])
    vision = ip.config.image_encoder
    log(f"ip-adapter: {req.ip_adapter} ({len(ip.layers)} cross-attention layers, {ip.config.num_tokens} image tokens) "
        f"with image encoder {req.image_encoder} ({vision.num_hidden_layers} layers x {vision.hidden_size}, "
        f"{vision.hidden_act}, {ip.config.image_embed_dim}-dim embeddings)")
    parts, cfg, tokenizer_dir = read_base(req, report, sources)
    where = f"the IP-Adapter {str(req.ip_adapter)!r}"
    cfg = ip_adapter.with_ip_adapter(cfg, ip.config, where)
    parts["unet"] = {**parts["unet"], **ip_adapter.unet_ip_state(ip.layers, cfg.unet, where)}
    parts["image_encoder"], parts["image_proj"] = ip.encoder, ip.image_proj
    return parts, cfg, tokenizer_dir


def ip_adapter_parts(parts: dict, cfg: config_lib.PIAConfig, ignored: dict) -> dict:
    """The IP-Adapter's image_encoder and image_proj parts mapped strictly, none without one."""
    if cfg.ip_adapter is None:
        return {}
    from pia_jax.models.clip_vision import CLIPVisionModelWithProjection
    from pia_jax.models.ip_adapter import ImageProjection
    from pia_jax.weights.convert import ip_adapter
    return {"image_encoder": to_nnx(parts.pop("image_encoder"), CLIPVisionModelWithProjection, cfg.ip_adapter,
                                    ip_adapter.TRANSFORMERS_CLIP_VISION, ignored),
            "image_proj": to_nnx(parts.pop("image_proj"), ImageProjection, cfg.ip_adapter, ip_adapter.IMAGE_PROJ,
                                 ignored)}


def convert(req: Request, log=print) -> Path:
    """Converts and writes `req.out` (see the module docstring); `log` gets one line per step and the counts."""
    check_request(req)
    sources = Sources()
    try:
        return _convert(req, sources, log)
    finally:
        sources.close()


def _convert(req: Request, sources: Sources, log) -> Path:
    from pia_jax.models.text_encoder import CLIPTextModel
    from pia_jax.models.unet import UNetMotionModel
    from pia_jax.models.vae import AutoencoderKL

    start, report = time.perf_counter(), {}
    loras, motion_loras = read_loras(req)
    parts, cfg, tokenizer_dir = read_base_and_ip_adapter(req, report, sources, log)
    log(f"base: {req.base} ({', '.join(f'{k} {len(v)} tensors' for k, v in parts.items())})")
    if req.vae is not None:
        parts["vae"] = read_vae(req.vae, cfg.vae, report, sources)
        log(f"vae: {req.vae} ({len(parts['vae'])} tensors)")
    conv_in_before_lora = parts["unet"]["conv_in.weight"]
    if req.loras:
        for path, m in req.loras:
            sources.add("lora", path, multiplier=m, legacy_alpha=req.legacy_lora_alpha)
        parts["unet"], parts["text_encoder"], reps = lora.merge_loras(
            parts["unet"], parts["text_encoder"], loras, legacy_alpha=req.legacy_lora_alpha, keep_float32=True)
        del loras
        report["loras"] = [_lora_summary(path, m, rep) for (path, m), rep in zip(req.loras, reps)]
        for summary in report["loras"]:
            log(f"lora: {summary['file']} x{summary['multiplier']}: {summary['unet modules']} UNet and "
                f"{summary['text_encoder modules']} text-encoder modules")

    motion, spatial, info, unet_cfg = read_motion(req, cfg.unet, sources)
    report["motion"] = {"converted": len(motion), "ignored": info["ignored"]}
    if motion_loras:
        motion = merge_motion_loras(req, motion, motion_loras, report, sources, log)
        del motion_loras
    if spatial:
        report["motion"]["ignored"]["spatial UNet weights (the base model provides them)"] = len(spatial)
    mode = req.conv_in if req.conv_in != "auto" else ("motion" if req.base.is_dir() else "base")
    state = attach_motion(parts.pop("unet"), conv_in_before_lora, motion, info, mode, req.widen_conv_in)
    del motion, spatial, conv_in_before_lora
    cfg = dataclasses.replace(cfg, unet=dataclasses.replace(unet_cfg, norm_semantics=req.norm_semantics))
    rule = f"conv_in rule {mode!r}" if info["conv_in_channels"] else ("widened with zero condition channels"
                                                                       if req.widen_conv_in else "no condition input")
    log(f"motion: {req.motion} ({report['motion']['converted']} tensors, {cfg.unet.in_channels}-channel conv_in, "
        f"{rule}, mid block {'yes' if info['mid_block'] else 'no'})")
    sources.add("tokenizer", tokenizer_dir, sorted(p for p in tokenizer_dir.iterdir() if p.is_file()))

    report["mapping"] = {"ignored": {}}
    flat = {"unet": to_nnx(state, UNetMotionModel, cfg.unet, weights.DIFFUSERS_UNET, report["mapping"]["ignored"])}
    del state
    flat["vae"] = to_nnx(parts.pop("vae"), AutoencoderKL, cfg.vae, weights.DIFFUSERS_VAE,
                         report["mapping"]["ignored"])
    flat["text_encoder"] = to_nnx(parts.pop("text_encoder"), CLIPTextModel, cfg.text, weights.TRANSFORMERS_CLIP_TEXT,
                                  report["mapping"]["ignored"])
    flat.update(ip_adapter_parts(parts, cfg, report["mapping"]["ignored"]))
    report["converted"] = {part: len(v) for part, v in flat.items()}
    log(ignored_summary(report))
    preset = presets.scheduler_preset(req.motion, req.scheduler_config)
    log(f"scheduler config: {preset} ({'given' if req.scheduler_config else 'by the motion name'})")
    out = model_dir.save_model_dir(req.out, cfg, flat, tokenizer=tokenizer_dir,
                                   scheduler=config_lib.to_dict(config_lib.SCHEDULER_PRESETS[preset]),
                                   sources=sources.records,
                                   report=report, dtype=req.dtype, force=req.force)
    log(f"wrote {out} ({', '.join(f'{k} {v} tensors' for k, v in report['converted'].items())}, {req.dtype}) "
        f"in {time.perf_counter() - start:.1f} s")
    return out
