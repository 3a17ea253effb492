"""Inputs: which videos to make, from command-line values or a YAML batch file, all checked before any model
weight is read or anything compiled; and where each video goes. This module imports no jax (`plan` does, to check
the model's weights).

What a video is made with is `Settings`: `SampleOptions` and the per-video fields below, each declared once with its
default and help; `sample.py`'s flags and a batch file's keys are made from them (`options.key`: `guidance` for
guidance_scale; dashes for underscores on the command line).
A batch file has optional `defaults:` and a list `cases:`; every key is a `Settings` key or `name`, `image`,
`keyframes`, `prompt`/`prompts`/`prompt_map`, `seed`/`seeds`, typed strictly (a list where a string belongs, or
"no" where a boolean belongs, is an error naming the case and the key). Each case makes one video per
prompt x motion x seed.
`keyframes:` (instead of `image:` and `cond_frame:`) is a mapping {frame: image path} or a list of 'frame:path'
strings, as `--keyframe`; image paths are relative to the batch file.

Output names: `<image stem>-<prompt slug>-<seed>` from the command line, `<case name or image stem>-<prompt slug>-
<motion or 'custom'>-<seed>` from a batch file; the slug is the prompt lower-cased, runs of other characters than
a-z and 0-9 made one '-', cut to 40 characters. `--out x.gif` with one video writes x.gif; with several,
x-<name>.gif beside it; `--out folder` writes folder/<name>.gif. PNG frames go to a folder `<that stem>_frames/`
(0000.png, ...); saved noise to `<that stem>_noise.npy` and `<that stem>_posterior_noise.npy`.
A prompt map (prompt travel) names a video by its frame-0 prompt's slug + '-travel'; keyframes by the first
keyframe's image stem; text-to-video (a 4-channel model, no image) uses the stem 't2v'.
"""

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from pia_jax import files, media
from pia_jax.models.config import PIAConfig, SchedulerConfig, opt
from pia_jax.sampling.affinity import PRESETS, custom_affinity, preset_affinity
from pia_jax.sampling.keyframes import parse_keyed, validate_keys
from pia_jax.sampling.options import DEFAULT_NEGATIVE_PROMPT, SampleOptions, key
from pia_jax.sampling.prompt_travel import interpolation, parse_prompt_map

FORMATS = ("gif", "mp4", "png")
MAX_FPS = {"gif": 50, "mp4": 240, "png": math.inf}  # what media.write_gif / write_mp4 accept


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v):
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


@dataclass(frozen=True)
class Settings(SampleOptions):
    """What a video is made with, besides its image, prompt and seed: `SampleOptions` and these per-video fields.
    A field's `metadata["check"]` is (test, what it must be) of a batch file's value where its type does not say."""
    negative_prompt: str | None = opt(None, "default: the reference's negative prompt; '' for none")
    motion: str | int = opt(
        "small", f"affinity preset: {', '.join(p.name for p in PRESETS)}, or a PIA index "
                 f"({', '.join(str(p.pia_index) for p in PRESETS)}); a batch file may list several (a video each)",
        check=(lambda v: v != [] and all(isinstance(m, str) or _is_int(m) for m in (v if isinstance(v, list) else [v])),
               "a preset name or PIA index, or a non-empty list of them"))
    affinity: str | list | None = opt(
        None, "custom per-frame affinities instead of a preset, one per frame in (0, 1], e.g. '1,0.9,0.85,...'",
        check=(lambda v: v is None or isinstance(v, str) or isinstance(v, list) and all(_is_number(x) for x in v),
               "a list of numbers (one per frame) or a string '1, 0.9, ...'"))
    cond_frame: int | None = opt(None, "the frame that shows the image (presets count from it; default 0)")
    frames: int = opt(16, "frames per video; past the motion modules' 32, context windows of --context-length")
    size: int = opt(512, "long side of the image (reference preprocessing)")
    height: int | None = opt(None, "explicit size (with --width): resize to cover, centre-crop")
    width: int | None = opt(None, "explicit size (with --height)")
    ip_adapter_image: str | None = opt(None, "the IP-Adapter's image prompt, for a model converted with --ip-adapter "
                                             "(default: the condition image; text-to-video needs one, or --ip-adapter-"
                                             "scale 0); in a batch file relative to it")

    def options(self) -> SampleOptions:
        hints = typing.get_type_hints(SampleOptions)
        return SampleOptions(**{f.name: float(getattr(self, f.name)) if hints[f.name] is float
                                else getattr(self, f.name) for f in dataclasses.fields(SampleOptions)})


_DEFAULT_MOTION = Settings.motion
# Every field of Settings, the per-video ones first: the flags of sample.py and the keys of a batch file.
_SAMPLE = {f.name for f in dataclasses.fields(SampleOptions)}
FIELDS = tuple(sorted(dataclasses.fields(Settings), key=lambda f: f.name in _SAMPLE))


def value_type(f: dataclasses.Field) -> type:
    """The type a command line gives a Settings field: its type's first non-null member (str for 'str | int')."""
    tp = typing.get_type_hints(Settings)[f.name]
    union = typing.get_origin(tp) in (typing.Union, types.UnionType)
    return next(a for a in (typing.get_args(tp) if union else (tp,)) if a is not type(None))


def _nullable(f: dataclasses.Field) -> bool:
    return type(None) in typing.get_args(typing.get_type_hints(Settings)[f.name])


@dataclass
class Video:
    """One video to make."""
    name: str
    image: Path | None  # None: text-to-video (a 4-channel model)
    prompt: str | dict  # or a prompt map {frame: prompt} (prompt travel)
    negative_prompt: str
    affinity: np.ndarray  # (F,)
    seed: int
    settings: Settings
    keyframes: dict | None = None  # {frame: image path}: several condition images (then `image` is the first)


@dataclass
class Group:
    """Videos of one image size, frame count and options: they share the compiled programs and run in batches."""
    height: int
    width: int
    frames: int
    options: SampleOptions
    videos: list  # [Video]
    images: list  # [(H, W, 3) uint8], one per video ((K, H, W, 3) with keyframes)
    keyframes: list | None = None  # the keyframes' frames, shared by the group's videos
    ip_images: list | None = None  # [(H, W, 3) uint8] the IP-Adapter's image prompts, or None: the condition images


@dataclass
class Plan:
    groups: list  # [Group]
    formats: list  # of FORMATS
    config: PIAConfig
    scheduler: SchedulerConfig

    @property
    def videos(self) -> list:
        return [v for g in self.groups for v in g.videos]


def slug(prompt: str | dict, most: int = 40) -> str:
    """'A cat, wind blowing!' -> 'a-cat-wind-blowing'; a prompt map's slug is its frame-0 prompt's + '-travel'."""
    if isinstance(prompt, dict):
        return slug(prompt[min(prompt)], most) + "-travel"
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower())[:most].strip("-") or "prompt"


def output_paths(out: Path, name: str, single: bool, formats) -> dict:
    """{format: path} of one video (see the module docstring); object-store URLs stay URLs (`files.path`)."""
    out = files.path(out)
    stem = out / name if out.suffix == "" else out.with_suffix("") if single else out.with_name(f"{out.stem}-{name}")
    return {fmt: (stem.with_name(stem.name + "_frames") if fmt == "png" else stem.with_suffix(f".{fmt}"))
            for fmt in formats}


def noise_paths(paths: dict) -> tuple[Path, Path]:
    stem = next(iter(paths.values()))
    stem = stem.with_name(stem.name.removesuffix("_frames")).with_suffix("")
    return stem.with_name(stem.name + "_noise.npy"), stem.with_name(stem.name + "_posterior_noise.npy")


def save_noise(paths: dict, noise: np.ndarray, posterior_noise: np.ndarray) -> list[Path]:
    """Writes one video's noise (1, F, h, w, 4) and posterior noise (1, h, w, 4) beside its outputs, each file
    complete or not at all (`files.atomic_write`). Returns the paths."""
    written = []
    for path, array in zip(noise_paths(paths), (noise, posterior_noise)):
        with files.atomic_write(path) as tmp, open(tmp, "wb") as f:  # a file object: np.save adds no '.npy'
            np.save(f, array)
        written.append(path)
    return written


def _numbers(values):
    """Custom affinities from a list or a string '1, 0.9, ...'."""
    if not isinstance(values, str):
        return values
    try:
        return [float(v) for v in values.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"affinity must be numbers separated by commas, got {values!r}") from None


def _preset(motion):
    return int(motion) if str(motion).lstrip("-").isdigit() else motion


def video_affinity(s: Settings, keyframes=None) -> np.ndarray:
    """The (F,) affinity of a video: custom values, or a preset counted from the condition frame (or from the
    nearest of the `keyframes`' frames), by one rule at every length (`affinity.preset_affinity`)."""
    if s.affinity is not None:
        if s.cond_frame is not None and not keyframes:
            raise ValueError("the condition frame places a motion preset; custom affinities give every frame's value "
                             "themselves (put 1.0 where the image should be): drop one of the two")
        return custom_affinity(_numbers(s.affinity), s.frames)
    return preset_affinity(_preset(s.motion), s.frames, keyframes or [s.cond_frame or 0])


# ---- batch files ----

_SCALARS = {bool: (lambda v: isinstance(v, bool), "true or false"), int: (_is_int, "an integer"),
            float: (_is_number, "a number"), str: (lambda v: isinstance(v, str), "a string")}


def _value_check(f: dataclasses.Field) -> tuple:
    """(test, what it must be) of a batch file's value for a Settings field, from its metadata or its type."""
    if "check" in f.metadata:
        return f.metadata["check"]
    choices = f.metadata.get("choices")
    test, must = ((lambda v: v in choices), f"one of {', '.join(map(str, choices))}") if choices is not None \
        else _SCALARS[value_type(f)]
    if _nullable(f):
        return (lambda v: v is None or test(v)), f"{must} or null"
    return test, must


_TYPES = {  # key: (test, what it must be)
    "name": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "image": (lambda v: isinstance(v, str) and v != "", "a path (a string)"),
    "keyframes": (lambda v: isinstance(v, dict) and v and all(isinstance(p, str) for p in v.values())
                  or isinstance(v, list) and v and all(isinstance(x, str) for x in v),
                  "a mapping {frame: image path} or a list of 'frame:path' strings"),
    "prompt": (lambda v: isinstance(v, str), "a string (several prompts go in a list under 'prompts:')"),
    "prompt_map": (lambda v: isinstance(v, dict) and all(isinstance(p, str) for p in v.values()),
                   "a mapping {frame: prompt} (prompt travel)"),
    "prompts": (lambda v: isinstance(v, list) and v and all(isinstance(p, str) for p in v),
                "a non-empty list of strings"),
    "seed": (lambda v: _is_int(v), "an integer"),
    "seeds": (lambda v: isinstance(v, list) and v and all(_is_int(x) for x in v), "a non-empty list of integers"),
    **{key(f): _value_check(f) for f in FIELDS},
}
CASE_KEYS = set(_TYPES)
_FIELD_NAMES = {key(f): f.name for f in FIELDS}  # batch-file key -> Settings field


def _typed(where: str, raw) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a mapping of keys to values, got {type(raw).__name__}")
    unknown = sorted(set(raw) - CASE_KEYS, key=str)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; allowed: {sorted(CASE_KEYS)}")
    for k, value in raw.items():
        test, must = _TYPES[k]
        if not test(value):
            raise ValueError(f"{where}: key '{k}' must be {must}, got {value!r}")
    return raw


def _read_doc(path: Path) -> dict:
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"cannot read the batch file {path}: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("cases"), list) or not doc["cases"]:
        raise ValueError(f"{path}: expected a mapping with a non-empty list 'cases:' (and optional 'defaults:')")
    extra = sorted(set(doc) - {"cases", "defaults"}, key=str)
    if extra:
        raise ValueError(f"{path}: unknown top-level keys {extra}; a batch file has 'defaults:' and 'cases:'")
    return doc


def read_batch_file(path: Path, base: Settings, default_seed: int) -> list[Video]:
    """The videos of a YAML batch file; `base` and `default_seed` fill what neither a case nor `defaults:` sets."""
    path = files.path(path)
    doc = _read_doc(path)
    defaults = _typed(f"{path}: defaults", doc.get("defaults"))
    videos = []
    for i, raw in enumerate(doc["cases"]):
        label = f"case {i}" + (f" ({raw['name']})" if isinstance(raw, dict) and isinstance(raw.get("name"), str)
                               else "")
        where = f"{path}: {label}"
        videos += _case_videos(path, where, {**defaults, **_typed(where, raw)}, base, default_seed)
    return videos


def _case_prompts(where: str, case: dict) -> list:
    given = {"prompt", "prompts", "prompt_map"} & set(case)
    if not given:
        raise ValueError(f"{where}: needs 'prompt' (or 'prompts' or 'prompt_map') and, for PIA, 'image' "
                         "(or 'keyframes')")
    if len(given) > 1:
        raise ValueError(f"{where}: give one of 'prompt', 'prompts' and 'prompt_map'")
    if "prompt_map" in case:
        try:
            return [parse_prompt_map(case["prompt_map"])]
        except ValueError as e:
            raise ValueError(f"{where}: key 'prompt_map': {e}") from None
    return case.get("prompts") or [case["prompt"]]


def _case_images(path: Path, where: str, case: dict, frames: int) -> tuple[Path | None, dict | None]:
    """(image, keyframes {frame: image path} or None) of a case."""
    image = _image_path(path, where, "image", case["image"]) if "image" in case else None
    if "keyframes" not in case:
        return image, None
    if image is not None or case.get("cond_frame") is not None:
        raise ValueError(f"{where}: key 'keyframes' replaces 'image' and 'cond_frame': give one of them")
    try:
        keyframes = parse_keyed(case["keyframes"], "keyframe")
        validate_keys(keyframes, frames)
    except ValueError as e:
        raise ValueError(f"{where}: key 'keyframes': {e}") from None
    keyframes = {k: _image_path(path, where, "keyframes", p) for k, p in keyframes.items()}
    return keyframes[min(keyframes)], keyframes


def _case_videos(path: Path, where: str, case: dict, base: Settings, default_seed: int) -> list[Video]:
    """The videos of one case: one per prompt x motion x seed."""
    prompts = _case_prompts(where, case)
    if "seed" in case and "seeds" in case:
        raise ValueError(f"{where}: give 'seed' or 'seeds', not both")
    image, keyframes = _case_images(path, where, case, case.get("frames", base.frames))
    motions = case.get("motion", base.motion)
    seeds = case.get("seeds") or [case.get("seed", default_seed)]
    fields = {_FIELD_NAMES[k]: v for k, v in case.items() if k in _FIELD_NAMES}
    if fields.get("ip_adapter_image") is not None:
        fields["ip_adapter_image"] = str(_image_path(path, where, "ip_adapter_image", fields["ip_adapter_image"]))
    name = case.get("name", image.stem if image else "t2v")
    videos = []
    for prompt in prompts:
        for motion in motions if isinstance(motions, list) else [motions]:
            s = dataclasses.replace(base, **{**fields, "motion": motion})
            try:
                affinity = video_affinity(s, sorted(keyframes or ()))
            except ValueError as e:
                raise ValueError(f"{where}: key '{'affinity' if s.affinity is not None else 'motion'}': {e}") \
                    from None
            tag = "custom" if s.affinity is not None else str(motion)
            videos += [_video(f"{name}-{slug(prompt)}-{tag}-{seed}", image, prompt, affinity, seed, s, where,
                              keyframes) for seed in seeds]
    return videos


def _image_path(batch_file: Path, where: str, key: str, image: str) -> Path:
    """An image path of a case, relative to the batch file; it must exist (the plan reads it)."""
    local = files.is_local(image) and not Path(image).is_absolute()
    image = batch_file.parent / image if local else files.path(image)
    if not image.exists():
        raise ValueError(f"{where}: key '{key}': image not found: {image}")
    return image


def _video(name, image, prompt, affinity, seed, s: Settings, where="", keyframes=None) -> Video:
    if not 0 <= seed < 2 ** 64:
        raise ValueError(f"{where}{': ' if where else ''}seeds must be integers in [0, 2**64), got {seed}")
    negative = DEFAULT_NEGATIVE_PROMPT if s.negative_prompt is None else s.negative_prompt
    keyframes = {k: files.path(p) for k, p in keyframes.items()} if keyframes else None
    return Video(name, image and files.path(image), prompt, negative, affinity, int(seed), s, keyframes)


def settings_of(args) -> Settings:
    """The option values of an argparse namespace made by sample.py's parser (or the web UI's equivalent)."""
    return Settings(**{f.name: getattr(args, f.name) for f in FIELDS})


def videos_from_args(args, settings: Settings) -> list[Video]:
    """The videos of sample.py's command-line form (no batch file): --image or --keyframe, --prompt or --prompt-map,
    --seed, --num-videos; checked in one order with one wording for sample.py and the web UI."""
    if not args.prompt and not args.prompt_map:
        raise ValueError("--image and --prompt are required (--prompt-map instead for prompt travel; no --image "
                         "for a text-to-video model), or --config with a batch file")
    if args.prompt and args.prompt_map:
        raise ValueError("give --prompt or --prompt-map, not both")
    if args.keyframe and (args.image or args.cond_frame is not None):
        raise ValueError("--keyframe replaces --image and --cond-frame")
    prompts = args.prompt or [parse_prompt_map(args.prompt_map)]
    keyframes = parse_keyed(args.keyframe, "keyframe") if args.keyframe else None
    return videos_from_values(args.image, prompts, args.seed, settings, args.num_videos, keyframes)


def videos_from_values(image: Path, prompts: list[str], seeds: list[int], settings: Settings,
                       num_videos: int | None = None, keyframes: dict | None = None) -> list[Video]:
    """The videos of one image (or of `keyframes` {frame: image path}): one per prompt x seed (`num_videos`: seeds
    seeds[0], seeds[0]+1, ...)."""
    if not prompts:
        raise ValueError("give at least one prompt")
    if num_videos is not None:
        if num_videos < 1:
            raise ValueError(f"the number of videos must be >= 1, got {num_videos}")
        if len(seeds) != 1:
            raise ValueError("give one seed with a number of videos (they get seed, seed+1, ...)")
        seeds = [seeds[0] + i for i in range(num_videos)]
    if keyframes:
        validate_keys(keyframes, settings.frames)
        image = keyframes[min(keyframes)]
    affinity = video_affinity(settings, sorted(keyframes or ()))
    stem = files.path(image).stem if image else "t2v"
    return [_video(f"{stem}-{slug(p)}-{s}", image, p, affinity, s, settings, keyframes=keyframes)
            for p in prompts for s in seeds]


# ---- the plan: every check that needs no model weights ----

def plan(model, videos: list[Video], out: Path, formats=None, fps: float = 8, devices: int | None = None) -> Plan:
    """Checks the model directory (config, weight headers, tokenizer), every video's settings against it, the
    images, the output formats and paths, and groups the videos by shape and options; nothing is loaded or
    compiled. Raises ValueError (or OSError) with a message for the user. `devices`: how many the sampler will lay
    out (default: this host's, as `Animator.load` takes), for a --devices-per-video check."""
    config, scheduler = _check_model(model)
    out = files.path(out)  # gs://... outputs are written through pia_jax.files
    formats = _check_formats(out, formats, fps)
    if not videos:
        raise ValueError("nothing to make: no videos")
    names = [v.name for v in videos]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"two videos would get the same output name ({', '.join(twice[:3])}); give the cases "
                         "distinct names, prompts or seeds")
    groups, images = {}, {}
    for v in videos:
        options = _check_video(v, model, config, scheduler)
        image = _image(v, images, text_to_video=config.unet.in_channels == 4)
        height, width = image.shape[-3:-1]
        factor = config.vae.latent_factor
        if height % factor or width % factor:
            raise ValueError(f"{v.name}: image size {width}x{height} is not a multiple of {factor}")
        frames = sorted(v.keyframes) if v.keyframes else None
        group = groups.setdefault((image.shape, v.settings.frames, options, tuple(frames or ())),
                                  Group(height, width, v.settings.frames, options, [], [], frames))
        group.videos.append(v)
        group.images.append(image)
    for group in groups.values():
        group.ip_images = _ip_images(group, images)
    _check_devices(groups.values(), config, devices)
    for v in videos:
        for path in output_paths(out, v.name, len(videos) == 1, formats).values():
            media.check_writable(path, directory=path.suffix == "")
    return Plan(list(groups.values()), formats, config, scheduler)


def _check_devices(groups, config: PIAConfig, devices: int | None):
    """ValueError for a group's devices per video that `devices` devices cannot lay out, by the rule the sampler
    applies (sharding.sampler_split, as `Animator.split_for` calls it: all a group's videos in one call)."""
    from pia_jax import sharding  # imports jax, as _check_model does
    for g in groups:
        if g.options.devices_per_video is None:  # the default layout always exists
            continue
        if devices is None:
            import jax
            devices = jax.local_device_count()
        parts = g.options.device_parts(g.frames, config.unet.motion_max_seq_length)
        try:
            sharding.sampler_split(devices, len(g.videos), g.options.cfg, parts, g.options.devices_per_video)
        except ValueError as e:
            raise ValueError(f"{g.videos[0].name}: {e}") from None


def _check_model(model) -> tuple[PIAConfig, SchedulerConfig]:
    from pia_jax.sampling import schedulers  # these two import jax (the weights' shapes come from the models)
    from pia_jax.weights import model_dir
    config, scheduler_dict = model_dir.check_model_dir(model)
    if config.unet.in_channels not in (4, 9):
        raise ValueError(f"{model} holds a {config.unet.in_channels}-channel UNet; PIA has 9, AnimateDiff 4")
    return config, schedulers.from_dict(scheduler_dict) if scheduler_dict else schedulers.PIA_DDIM


def _check_formats(out: Path, formats, fps: float) -> list:
    formats = list(formats) if formats else ([out.suffix[1:]] if out.suffix else ["gif"])
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise ValueError(f"unknown output format(s) {bad}; choose from {FORMATS}")
    most = min(MAX_FPS[f] for f in formats)
    if not 0 < fps <= most:
        raise ValueError(f"fps must be in (0, {most:g}] for {', '.join(formats)}, got {fps}")
    return formats


def _check_video(v: Video, model, config: PIAConfig, scheduler: SchedulerConfig) -> SampleOptions:
    """A video's settings against the model (a 4-channel UNet makes videos from text alone); its SampleOptions."""
    s = v.settings
    text_to_video = config.unet.in_channels == 4  # AnimateDiff motion modules without PIA's condition branch
    if (s.height is None) != (s.width is None):
        raise ValueError(f"{v.name}: give both height and width, or neither")
    if text_to_video != (v.image is None):
        raise ValueError(f"{v.name}: {model} holds a 4-channel (text-to-video) UNet: give no image" if text_to_video
                         else f"{v.name}: needs an image ({model} is a PIA model; text-to-video needs a 4-channel "
                              "AnimateDiff model directory)")
    if text_to_video and s.strength < 1:
        raise ValueError(f"{v.name}: strength < 1 starts from an image; text-to-video has none")
    if s.ip_adapter_image is not None and config.ip_adapter is None:
        raise ValueError(f"{v.name}: ip adapter image: {model} has no IP-Adapter; convert it with "
                         "convert_torch_weights.py --ip-adapter FILE --image-encoder DIR (or drop the option)")
    if text_to_video and s.ip_adapter_image is None and s.options().image_prompt_scale(config) != 0:
        raise ValueError(f"{v.name}: a text-to-video model has no condition image for its IP-Adapter: give an ip "
                         "adapter image, or an ip adapter scale of 0")
    placed = [k for k, given in (("motion", s.motion != _DEFAULT_MOTION), ("affinity", s.affinity is not None),
                                 ("cond frame", s.cond_frame is not None)) if given]
    if text_to_video and placed:
        raise ValueError(f"{v.name}: a 4-channel (text-to-video) model has no condition image or motion mask, so "
                         f"{' and '.join(placed)} would have no effect: drop them")
    try:
        if isinstance(v.prompt, dict):
            interpolation(sorted(v.prompt), s.frames)
        options = s.options()
        options.check(config, scheduler)
        options.check_frames(s.frames, config)
    except ValueError as e:
        raise ValueError(f"{v.name}: {e}") from None
    return options


def _ip_images(group: Group, images: dict) -> list | None:
    """The IP-Adapter's image prompts of a group, read once per path into `images` (the condition image, the first
    keyframe's, where a video gives none), or None where no video gives one."""
    paths = [v.settings.ip_adapter_image for v in group.videos]
    if not any(paths):
        return None
    for path in filter(None, paths):
        if path not in images:
            images[path] = media.load_image(path)
    return [images[p] if p else image[0] if image.ndim == 4 else image for p, image in zip(paths, group.images)]


def _image(v: Video, images: dict, text_to_video: bool) -> np.ndarray:
    """A video's preprocessed image ((K, H, W, 3) for keyframes), read once per image and size into `images`."""
    s = v.settings
    key_ = (v.image, s.size, s.height, s.width, tuple(sorted(v.keyframes.items())) if v.keyframes else None)
    if key_ in images:
        return images[key_]
    if v.keyframes:
        loaded = [media.preprocess_image(media.load_image(v.keyframes[k]), s.size, s.height, s.width)
                  for k in sorted(v.keyframes)]
        if len({x.shape for x in loaded}) > 1:
            raise ValueError(f"{v.name}: the keyframe images must have one size after preprocessing, got "
                             f"{sorted({x.shape[:2] for x in loaded})}; give --height/--width")
        images[key_] = np.stack(loaded)
    elif text_to_video:  # a blank image: only its size is used, checked as an image's would be
        for name, value in (("height", s.height), ("width", s.width)) if s.height is not None else (("size", s.size),):
            media.check_size(name, value)
        images[key_] = np.zeros((s.height or s.size, s.width or s.size, 3), np.uint8)
    else:
        images[key_] = media.preprocess_image(media.load_image(v.image), s.size, s.height, s.width)
    return images[key_]


def text_keys(videos) -> int:
    """The most keys of the videos' prompt maps (0 without prompt travel): the Animator's text input shape."""
    return max([len(v.prompt) for v in videos if isinstance(v.prompt, dict)], default=0)


def load_noise(plan_: Plan, noise_path=None, posterior_path=None) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Noise arrays from .npy files, checked against the one group of videos they are for."""
    if noise_path is None and posterior_path is None:
        return None, None
    if len(plan_.groups) != 1:
        raise ValueError("--noise/--posterior-noise need a single batch (one image size and one set of options)")
    g = plan_.groups[0]
    if noise_path is not None and g.options.free_noise != "none":
        raise ValueError("--free-noise reschedules the seeded noise; --noise is used as it is: drop --free-noise "
                         "(and save the noise already rescheduled, e.g. with --save-noise from a seeded run)")
    shape = (len(g.videos),) + plan_.config.vae.latent_shape(g.height, g.width, g.frames)
    out = []
    for name, path, expected in (("noise", noise_path, shape), ("posterior noise", posterior_path,
                                                                 shape[:1] + shape[2:])):
        if path is None:
            out.append(None)
            continue
        try:
            with files.path(path).open("rb") as f:
                arr = np.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read the {name} file {path}: {e}") from None
        if arr.shape != expected:
            raise ValueError(f"{name} in {path} has shape {arr.shape}; this run needs {expected}")
        out.append(arr)
    return tuple(out)
