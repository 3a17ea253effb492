"""Inputs: which videos to make, from command-line values or a YAML batch file, all checked before any model
weight is read or anything compiled; and where each video goes.

A batch file has optional `defaults:` and a list `cases:`; every key is one of `Settings`' fields or `name`,
`image`, `keyframes`, `prompt`/`prompts`/`prompt_map`, `seed`/`seeds`, typed strictly (a list where a string
belongs, or "no" where a boolean belongs, is an error naming the case and the key). Each case makes one video per
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from pia_jax import media
from pia_jax.models.config import PIAConfig
from pia_jax.sampling import keyframes as keyframes_lib
from pia_jax.sampling import schedulers
from pia_jax.sampling.animator import latent_factor, latent_shape
from pia_jax.sampling.keyframes import parse_keyed, validate_keys
from pia_jax.sampling.options import DEFAULT_NEGATIVE_PROMPT, SampleOptions
from pia_jax.sampling.prompt_travel import interpolation, parse_prompt_map
from pia_jax.weights import model_dir

FORMATS = ("gif", "mp4", "png")
MAX_FPS = {"gif": 50, "mp4": 240, "png": math.inf}  # what media.write_gif / write_mp4 accept


@dataclass(frozen=True)
class Settings:
    """What a video is made with, besides its image, prompt and seed: the command line's flags, a batch file's
    keys (`guidance` is `SampleOptions.guidance_scale`)."""
    negative_prompt: str | None = None  # None: the reference's DEFAULT_NEGATIVE_PROMPT
    motion: str | int = "small"  # an affinity preset name or PIA index
    affinity: str | list | None = None  # custom per-frame affinities (instead of `motion`)
    cond_frame: int | None = None  # the frame showing the image (presets count from it); None: 0
    frames: int = 16
    steps: int = 25
    scheduler: str = "ddim"
    karras: bool = False
    guidance: float = 7.5
    strength: float = 1.0
    eta: float = 0.0
    clip_skip: int | None = None
    size: int = 512
    height: int | None = None
    width: int | None = None
    decode_chunk: int = 4
    context_length: int | None = None  # long videos: SampleOptions' window fields
    context_stride: int = 4
    context_weighting: str = "pyramid"
    window_batch: int = 1
    free_noise: str = "none"

    def options(self) -> SampleOptions:
        return SampleOptions(steps=self.steps, scheduler=self.scheduler, karras=self.karras,
                             guidance_scale=float(self.guidance), strength=float(self.strength), eta=float(self.eta),
                             clip_skip=self.clip_skip, decode_chunk=self.decode_chunk,
                             context_length=self.context_length, context_stride=self.context_stride,
                             context_weighting=self.context_weighting, window_batch=self.window_batch,
                             free_noise=self.free_noise)


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


@dataclass
class Plan:
    groups: list  # [Group]
    formats: list  # of FORMATS
    config: PIAConfig
    scheduler: schedulers.SchedulerConfig

    @property
    def videos(self) -> list:
        return [v for g in self.groups for v in g.videos]


def slug(prompt: str | dict, most: int = 40) -> str:
    """'A cat, wind blowing!' -> 'a-cat-wind-blowing'; a prompt map's slug is its frame-0 prompt's + '-travel'."""
    if isinstance(prompt, dict):
        return slug(prompt[min(prompt)], most) + "-travel"
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower())[:most].strip("-") or "prompt"


def output_paths(out: Path, name: str, single: bool, formats) -> dict:
    """{format: path} of one video (see the module docstring)."""
    stem = out / name if out.suffix == "" else out.with_suffix("") if single else out.with_name(f"{out.stem}-{name}")
    return {fmt: (stem.with_name(stem.name + "_frames") if fmt == "png" else stem.with_suffix(f".{fmt}"))
            for fmt in formats}


def noise_paths(paths: dict) -> tuple[Path, Path]:
    stem = next(iter(paths.values()))
    stem = stem.with_name(stem.name.removesuffix("_frames")).with_suffix("")
    return stem.with_name(stem.name + "_noise.npy"), stem.with_name(stem.name + "_posterior_noise.npy")


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


def coefficients(s: Settings, keyframes=None) -> np.ndarray:
    """The (F,) affinities of a video: custom values, or a preset counted from the condition frame (or from the
    nearest of the `keyframes`' frames)."""
    if s.affinity is not None:
        if s.cond_frame is not None and not keyframes:
            raise ValueError("the condition frame places a motion preset; custom affinities give every frame's value "
                             "themselves (put 1.0 where the image should be): drop one of the two")
        return keyframes_lib.custom_affinity(_numbers(s.affinity), s.frames)
    # one rule for every length (keyframes.preset_values: a loop closes at the last frame); the reference's up to 16
    return keyframes_lib.preset_affinity(_preset(s.motion), s.frames, keyframes or [s.cond_frame or 0])


# ---- batch files ----

def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v):
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


_TYPES = {  # key: (check, what it must be)
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
    "negative_prompt": (lambda v: isinstance(v, str), "a string ('' for none)"),
    "motion": (lambda v: all(isinstance(m, str) or _is_int(m) for m in (v if isinstance(v, list) else [v]))
               and v != [], "a preset name or PIA index, or a non-empty list of them"),
    "affinity": (lambda v: isinstance(v, str) or isinstance(v, list) and all(_is_number(x) for x in v),
                 "a list of numbers (one per frame) or a string '1, 0.9, ...'"),
    "seed": (lambda v: _is_int(v), "an integer"),
    "seeds": (lambda v: isinstance(v, list) and v and all(_is_int(x) for x in v), "a non-empty list of integers"),
    "karras": (lambda v: isinstance(v, bool), "true or false"),
    "scheduler": (lambda v: v in schedulers.KINDS, f"one of {', '.join(schedulers.KINDS)}"),
    "clip_skip": (lambda v: v is None or _is_int(v), "an integer or null"),
    "height": (lambda v: v is None or _is_int(v), "an integer or null"),
    "width": (lambda v: v is None or _is_int(v), "an integer or null"),
    "cond_frame": (lambda v: v is None or _is_int(v), "an integer or null"),
    "context_length": (lambda v: v is None or _is_int(v), "an integer or null"),
    "context_weighting": (lambda v: isinstance(v, str), "a string (flat, pyramid, delayed_reverse_sawtooth)"),
    "free_noise": (lambda v: isinstance(v, str), "a string (none, shuffle_context, repeat_context, random)"),
    **{k: (_is_int, "an integer") for k in ("frames", "steps", "size", "decode_chunk", "context_stride",
                                            "window_batch")},
    **{k: (_is_number, "a number") for k in ("guidance", "strength", "eta")},
}
CASE_KEYS = set(_TYPES)


def _typed(where: str, raw) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a mapping of keys to values, got {type(raw).__name__}")
    unknown = sorted(set(raw) - CASE_KEYS, key=str)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; allowed: {sorted(CASE_KEYS)}")
    for key, value in raw.items():
        check, must = _TYPES[key]
        if not check(value):
            raise ValueError(f"{where}: key '{key}' must be {must}, got {value!r}")
    return raw


def read_batch_file(path: Path, base: Settings, default_seed: int) -> list[Video]:
    """The videos of a YAML batch file; `base` and `default_seed` fill what neither a case nor `defaults:` sets."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"cannot read the batch file {path}: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("cases"), list) or not doc["cases"]:
        raise ValueError(f"{path}: expected a mapping with a non-empty list 'cases:' (and optional 'defaults:')")
    extra = sorted(set(doc) - {"cases", "defaults"}, key=str)
    if extra:
        raise ValueError(f"{path}: unknown top-level keys {extra}; a batch file has 'defaults:' and 'cases:'")
    defaults = _typed(f"{path}: defaults", doc.get("defaults"))
    videos = []
    for i, raw in enumerate(doc["cases"]):
        label = f"case {i}" + (f" ({raw['name']})" if isinstance(raw, dict) and isinstance(raw.get("name"), str)
                               else "")
        where = f"{path}: {label}"
        case = {**defaults, **_typed(where, raw)}
        if not ({"prompt", "prompts", "prompt_map"} & set(case)):
            raise ValueError(f"{where}: needs 'prompt' (or 'prompts' or 'prompt_map') and, for PIA, 'image' "
                             "(or 'keyframes')")
        if len({"prompt", "prompts", "prompt_map"} & set(case)) > 1:
            raise ValueError(f"{where}: give one of 'prompt', 'prompts' and 'prompt_map'")
        if "prompt_map" in case:
            try:
                case["prompts"] = [parse_prompt_map(case["prompt_map"])]
            except ValueError as e:
                raise ValueError(f"{where}: key 'prompt_map': {e}") from None
        if "seed" in case and "seeds" in case:
            raise ValueError(f"{where}: give 'seed' or 'seeds', not both")
        image = _image_path(path, where, "image", case["image"]) if "image" in case else None
        keyframes = None
        if "keyframes" in case:
            if image is not None or case.get("cond_frame") is not None:
                raise ValueError(f"{where}: key 'keyframes' replaces 'image' and 'cond_frame': give one of them")
            try:
                keyframes = parse_keyed(case["keyframes"], "keyframe")
                validate_keys(keyframes, case.get("frames", base.frames))
            except ValueError as e:
                raise ValueError(f"{where}: key 'keyframes': {e}") from None
            keyframes = {k: _image_path(path, where, "keyframes", p) for k, p in keyframes.items()}
            image = keyframes[min(keyframes)]
        prompts = case.get("prompts") or [case["prompt"]]
        motions = case.get("motion", base.motion)
        motions = motions if isinstance(motions, list) else [motions]
        seeds = case.get("seeds") or [case.get("seed", default_seed)]
        fields = {k: case[k] for k in case if k in {f.name for f in dataclasses.fields(Settings)}}
        name = case.get("name", image.stem if image else "t2v")
        for prompt in prompts:
            for motion in motions:
                s = dataclasses.replace(base, **{**fields, "motion": motion})
                try:
                    coef = coefficients(s, sorted(keyframes or ()))
                except ValueError as e:
                    raise ValueError(f"{where}: key '{'affinity' if s.affinity is not None else 'motion'}': {e}") \
                        from None
                tag = "custom" if s.affinity is not None else str(motion)
                for seed in seeds:
                    videos.append(_video(f"{name}-{slug(prompt)}-{tag}-{seed}", image, prompt, coef, seed, s, where,
                                         keyframes))
    return videos


def _image_path(batch_file: Path, where: str, key: str, image: str) -> Path:
    """An image path of a case, relative to the batch file; it must exist (the plan reads it)."""
    image = Path(image) if Path(image).is_absolute() else batch_file.parent / image
    if not image.exists():
        raise ValueError(f"{where}: key '{key}': image not found: {image}")
    return image


def _video(name, image, prompt, coef, seed, s: Settings, where="", keyframes=None) -> Video:
    if not 0 <= seed < 2 ** 64:
        raise ValueError(f"{where}{': ' if where else ''}seeds must be integers in [0, 2**64), got {seed}")
    negative = DEFAULT_NEGATIVE_PROMPT if s.negative_prompt is None else s.negative_prompt
    keyframes = {k: Path(p) for k, p in keyframes.items()} if keyframes else None
    return Video(name, image and Path(image), prompt, negative, coef, int(seed), s, keyframes)


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
    coef = coefficients(settings, sorted(keyframes or ()))
    stem = Path(image).stem if image else "t2v"
    return [_video(f"{stem}-{slug(p)}-{s}", image, p, coef, s, settings, keyframes=keyframes)
            for p in prompts for s in seeds]


# ---- the plan: every check that needs no model weights ----

def plan(model, videos: list[Video], out: Path, formats=None, fps: float = 8) -> Plan:
    """Checks the model directory (config, weight headers, tokenizer), every video's settings against it, the
    images, the output formats and paths, and groups the videos by shape and options; nothing is loaded or
    compiled. Raises ValueError (or OSError) with a message for the user."""
    config, scheduler_dict = model_dir.check_model_dir(model)
    text_to_video = config.unet.in_channels == 4  # AnimateDiff motion modules without PIA's condition branch
    if config.unet.in_channels not in (4, 9):
        raise ValueError(f"{model} holds a {config.unet.in_channels}-channel UNet; PIA has 9, AnimateDiff 4")
    scheduler = schedulers.from_dict(scheduler_dict) if scheduler_dict else schedulers.PIA_DDIM
    out = Path(out)
    formats = list(formats) if formats else ([out.suffix[1:]] if out.suffix else ["gif"])
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise ValueError(f"unknown output format(s) {bad}; choose from {FORMATS}")
    most = min(MAX_FPS[f] for f in formats)
    if not 0 < fps <= most:
        raise ValueError(f"fps must be in (0, {most:g}] for {', '.join(formats)}, got {fps}")
    if not videos:
        raise ValueError("nothing to make: no videos")
    names = [v.name for v in videos]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"two videos would get the same output name ({', '.join(twice[:3])}); give the cases "
                         "distinct names, prompts or seeds")
    groups, images = {}, {}
    for v in videos:
        s = v.settings
        if (s.height is None) != (s.width is None):
            raise ValueError(f"{v.name}: give both height and width, or neither")
        if text_to_video != (v.image is None):
            raise ValueError(f"{v.name}: {model} holds a 4-channel (text-to-video) UNet: give no image" if text_to_video
                             else f"{v.name}: needs an image ({model} is a PIA model; text-to-video needs a 4-channel "
                                  "AnimateDiff model directory)")
        if text_to_video and s.strength < 1:
            raise ValueError(f"{v.name}: strength < 1 starts from an image; text-to-video has none")
        if isinstance(v.prompt, dict):
            try:
                interpolation(sorted(v.prompt), s.frames)
            except ValueError as e:
                raise ValueError(f"{v.name}: {e}") from None
        options = s.options()
        try:
            options.check(config, scheduler)
            options.check_frames(s.frames, config)
        except ValueError as e:
            raise ValueError(f"{v.name}: {e}") from None
        key = (v.image, s.size, s.height, s.width, tuple(sorted(v.keyframes.items())) if v.keyframes else None)
        if key not in images and v.keyframes:
            loaded = [media.preprocess_image(media.load_image(v.keyframes[k]), s.size, s.height, s.width)
                      for k in sorted(v.keyframes)]
            if len({x.shape for x in loaded}) > 1:
                raise ValueError(f"{v.name}: the keyframe images must have one size after preprocessing, got "
                                 f"{sorted({x.shape[:2] for x in loaded})}; give --height/--width")
            images[key] = np.stack(loaded)
        if key not in images and text_to_video:  # a blank image: only its size is used
            images[key] = np.zeros((s.height or s.size, s.width or s.size, 3), np.uint8)
        if key not in images:
            images[key] = media.preprocess_image(media.load_image(v.image), s.size, s.height, s.width)
        image = images[key]
        height, width = image.shape[-3:-1]
        if height % latent_factor(config.vae) or width % latent_factor(config.vae):
            raise ValueError(f"{v.name}: image size {width}x{height} is not a multiple of "
                             f"{latent_factor(config.vae)}")
        frames = sorted(v.keyframes) if v.keyframes else None
        group = groups.setdefault((image.shape, s.frames, options, tuple(frames or ())),
                                  Group(height, width, s.frames, options, [], [], frames))
        group.videos.append(v)
        group.images.append(image)
    for v in videos:
        for path in output_paths(out, v.name, len(videos) == 1, formats).values():
            media.check_writable(path, directory=path.suffix == "")
    return Plan(list(groups.values()), formats, config, scheduler)


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
    shape = (len(g.videos),) + latent_shape(plan_.config.vae, g.height, g.width, g.frames)
    out = []
    for name, path, expected in (("noise", noise_path, shape), ("posterior noise", posterior_path,
                                                                 shape[:1] + shape[2:])):
        if path is None:
            out.append(None)
            continue
        try:
            arr = np.load(path)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read the {name} file {path}: {e}") from None
        if arr.shape != expected:
            raise ValueError(f"{name} in {path} has shape {arr.shape}; this run needs {expected}")
        out.append(arr)
    return tuple(out)
