"""A request -> what `sample.py` would make of the same values: its parsed command line (`namespace`), the checked
plan (`check`, the checks `sample.py`'s `plan` runs, in its order, with its messages) and the command line itself
(`command`), so that every result can be made again from a shell.

A request is a dict keyed as a batch file is (`cases.Settings`' keys, `options.key`: `guidance`, `frames`, ...) plus
one run's inputs (`RUN`): the image, an optional last-frame keyframe, the prompt or a prompt map (one
'FRAME: prompt' per line), the seed, the number of videos and the fps. Keys left out take their defaults; unknown
keys and values of the wrong type are refused (`typed`). The page and the API send the same dicts.

No gradio and no jax here; `check` imports jax through `cases.plan`'s model check, as sample.py's does.
"""

import argparse
import shlex
import typing
from pathlib import Path

from pia_jax.sampling import cases
from pia_jax.sampling.options import DEFAULT_NEGATIVE_PROMPT, key

FORMATS = ("mp4", "gif")  # every request writes both: the page plays the MP4, the GIF is a download
# One run's inputs besides the Settings fields: key -> (default, type). The defaults are sample.py's.
IMAGE_FIELDS = ("ip_adapter_image",)  # Settings fields that are image files: uploads on the page, copied per request
RUN = {"image": (None, str), "last_frame": (None, str), "prompt": ("", str), "prompt_map": ("", str),
       "seed": (42, int), "num_videos": (1, int), "fps": (8.0, float)}
FIELDS = {key(f): f for f in cases.FIELDS}  # request key -> Settings field
BLANK_IS_A_VALUE = {"negative_prompt"}  # '' is no negative prompt; elsewhere blank text means 'not given'


def label(k: str) -> str:
    return k.replace("_", " ")


def defaults() -> dict:
    """Every request key with its default."""
    return {**{k: d for k, (d, _) in RUN.items()}, **{k: f.default for k, f in FIELDS.items()}}


_MUST = {bool: "true or false", str: "text", int: "an integer", float: "a number"}


def nullable(f) -> bool:
    """Whether a Settings field may be left unset (None)."""
    return type(None) in typing.get_args(typing.get_type_hints(cases.Settings)[f.name])


def _number(text: str):
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text  # refused below, named as it was given


def _typed_value(k: str, value, tp: type, nullable: bool):
    if value is None or isinstance(value, str) and not value.strip() and (tp is not str or k not in BLANK_IS_A_VALUE):
        if nullable or tp is str:
            return None if nullable else ""
        raise ValueError(f"{label(k)}: give a value")
    if tp in (int, float) and isinstance(value, str):  # a text field (one that may be left blank) or JSON
        value = _number(value)
    if tp is int and isinstance(value, float) and value.is_integer():
        value = int(value)  # a number field or JSON may send 8.0 for 8
    ok = {bool: isinstance(value, bool), str: isinstance(value, str),
          int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, (int, float)) and not isinstance(value, bool)}[tp]
    if not ok:
        raise ValueError(f"{label(k)} must be {_MUST[tp]}, got {value!r}")
    return float(value) if tp is float else value


def typed(request: dict) -> dict:
    """The request with every key, typed: ValueError naming an unknown key or a value of the wrong type."""
    unknown = sorted(set(request) - set(RUN) - set(FIELDS), key=str)
    if unknown:
        raise ValueError(f"unknown keys {unknown}; allowed: {sorted(set(RUN) | set(FIELDS))}")
    out = defaults()
    for k, value in request.items():
        if k in RUN:
            out[k] = _typed_value(k, value, RUN[k][1], nullable=RUN[k][0] is None)
        else:
            out[k] = _typed_value(k, value, cases.value_type(FIELDS[k]), nullable(FIELDS[k]))
    return out


def namespace(model, request: dict, out, dtype="auto", compile_cache="default") -> argparse.Namespace:
    """What sample.py's parser makes of `command(...)`: the same names and values (tests/test_app_plan.py)."""
    r = typed(request)
    keyframe = None
    if r["last_frame"] is not None:  # the image at frame 0 and this one at the last frame
        keyframe = ([f"0:{r['image']}"] if r["image"] is not None else []) + [f"{r['frames'] - 1}:{r['last_frame']}"]
    settings = {f.name: r[k] for k, f in FIELDS.items()}
    if settings["negative_prompt"] == DEFAULT_NEGATIVE_PROMPT:
        settings["negative_prompt"] = None  # what sample.py uses when no --negative-prompt is given
    prompt_map = [line.strip() for line in r["prompt_map"].splitlines() if line.strip()]
    return argparse.Namespace(
        model=str(model), image=None if keyframe else r["image"], keyframe=keyframe,
        prompt=[r["prompt"]] if r["prompt"].strip() else None, prompt_map=prompt_map or None, config=None,
        seed=[r["seed"]], num_videos=None if r["num_videos"] == 1 else r["num_videos"], **settings, out=str(out),
        format=",".join(FORMATS), fps=r["fps"], noise=None, posterior_noise=None, save_noise=False, dtype=dtype,
        batch_size=None, compile_cache=compile_cache, no_progress=False)


def check(a: argparse.Namespace) -> cases.Plan:
    """sample.py's `plan` for one image and prompt (no batch file, no noise files): every check before loading, in
    its order and with its messages; ValueError (or OSError) for the user."""
    videos = cases.videos_from_args(a, cases.settings_of(a))
    p = cases.plan(a.model, videos, a.out, a.format.split(","), a.fps)
    from pia_jax.toy.vocab import check_prompts
    check_prompts(a.model, videos)  # the toy model knows only its world's words
    return p


def command(a: argparse.Namespace) -> list[str]:
    """The sample.py command line that makes the same videos: every value that differs from sample.py's default."""
    argv = ["python", "sample.py", "--model", a.model]
    argv += ["--image", a.image] if a.image is not None else []
    for k in a.keyframe or ():
        argv.append(f"--keyframe={k}")  # attached: a frame like -1 would read as a flag
    argv += ["--prompt", *a.prompt] if a.prompt else []
    argv += ["--prompt-map", *a.prompt_map] if a.prompt_map else []
    argv += ["--seed", *map(str, a.seed)]
    argv += ["--num-videos", str(a.num_videos)] if a.num_videos is not None else []
    for f in cases.FIELDS:
        value = getattr(a, f.name)
        if value != f.default:
            flag = "--" + key(f).replace("_", "-")
            argv += [flag] if value is True else [flag, str(value)]
    argv += ["--out", a.out, "--format", a.format, "--fps", str(a.fps)]
    argv += ["--dtype", a.dtype] if a.dtype != "auto" else []
    argv += ["--compile-cache", a.compile_cache] if a.compile_cache != "default" else []
    return argv


def shell(argv: list[str]) -> str:
    return shlex.join(argv)


def default_negative_prompt(model) -> str:
    """The reference's negative prompt, or '' for a model whose tokenizer does not know its words (the toy model:
    sample.py would refuse it and say to pass --negative-prompt '')."""
    from pia_jax.toy.vocab import is_toy_vocab, read_vocab, unknown_words
    vocab = read_vocab(Path(model) / "tokenizer")
    return "" if is_toy_vocab(vocab) and unknown_words(vocab, DEFAULT_NEGATIVE_PROMPT) else DEFAULT_NEGATIVE_PROMPT
