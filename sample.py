"""Animates an image with PIA: a converted model directory, an image and a prompt in; GIF/MP4/PNG frames out.

  python sample.py --model models/pia-sd15 --image cat.jpg --prompt "a cat, wind blowing" --motion moderate
  python sample.py --model models/pia-sd15 --image cat.jpg --prompt "a cat" --seed 1 2 3 4 --out out/cat.mp4
  python sample.py --model models/pia-sd15 --config cases.yaml --out out/

Every input is checked before any model is loaded or compiled. Several videos (seeds x prompts, or the cases of a
YAML file with the same size and options) run as one batch split over all local devices.
"""

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from pia_jax import affinity, media, model_dir
from pia_jax.pipeline import DEFAULT_NEGATIVE_PROMPT, SampleOptions, latent_shape

FORMATS = ("gif", "mp4", "png")


@dataclasses.dataclass
class Case:
    """One video to make: everything that differs between videos of a batch."""
    name: str
    image: Path
    prompt: str
    negative_prompt: str
    affinity: np.ndarray  # (F,)
    seed: int


def parse_affinity(motion, custom, frames: int, cond_frame: int) -> np.ndarray:
    if custom is not None:
        values = [float(v) for v in str(custom).replace(",", " ").split()] if isinstance(custom, str) else custom
        return affinity.custom_coefficients(values, frames)
    preset = int(motion) if str(motion).lstrip("-").isdigit() else motion
    return affinity.preset_coefficients(preset, frames, cond_frame)


def output_paths(out: Path, name: str, single: bool, formats) -> dict:
    """--out file.gif: that file (several videos: file-<name>.gif); --out folder: folder/<name>.gif."""
    stem = out / name if out.suffix == "" else out.with_suffix("") if single else out.with_name(f"{out.stem}-{name}")
    return {fmt: (stem.with_name(stem.name + "_frames") if fmt == "png" else stem.with_suffix(f".{fmt}"))
            for fmt in formats}


def cases_from_args(a) -> list[Case]:
    seeds = a.seed if a.num_videos is None else [a.seed[0] + i for i in range(a.num_videos)]
    coef = parse_affinity(a.motion, a.affinity, a.frames, a.cond_frame)
    negative = DEFAULT_NEGATIVE_PROMPT if a.negative_prompt is None else a.negative_prompt
    many = len(seeds) * len(a.prompt) > 1
    return [Case(f"{a.image.stem}-{p}-{s}" if many else a.image.stem, a.image, prompt, negative, coef, s)
            for p, prompt in enumerate(a.prompt) for s in seeds]


# keys a YAML case may set; anything else is a typo and an error
CASE_KEYS = {"name", "image", "prompt", "prompts", "negative_prompt", "motion", "affinity", "cond_frame", "seed",
             "seeds", "frames", "steps", "scheduler", "karras", "guidance", "strength", "eta", "size", "height",
             "width", "clip_skip"}


def cases_from_yaml(path: Path, a) -> list[tuple[Case, dict]]:
    """A YAML file: optional `defaults:` (any case key) and a list `cases:`; each case gives an image and a prompt
    (or `prompts:`), and may list `motion:` presets and `seeds:`, making one video per combination."""
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"cannot read the batch file {path}: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("cases"), list) or not doc["cases"]:
        raise ValueError(f"{path}: expected a mapping with a non-empty list 'cases:' (and optional 'defaults:')")
    defaults = doc.get("defaults") or {}
    out = []
    for i, raw in enumerate(doc["cases"]):
        case = {**defaults, **(raw or {})}
        unknown = sorted(set(case) - CASE_KEYS)
        if unknown:
            raise ValueError(f"{path}: case {i}: unknown keys {unknown}; allowed: {sorted(CASE_KEYS)}")
        if "image" not in case or not ({"prompt", "prompts"} & set(case)):
            raise ValueError(f"{path}: case {i} needs 'image' and 'prompt' (or 'prompts')")
        image = Path(case["image"])
        image = image if image.is_absolute() else path.parent / image
        prompts = case.get("prompts") or [case["prompt"]]
        motions = case.get("motion", a.motion)
        motions = motions if isinstance(motions, list) else [motions]
        seeds = case.get("seeds") or [case.get("seed", a.seed[0])]
        frames = int(case.get("frames", a.frames))
        settings = {k: case[k] for k in ("steps", "scheduler", "karras", "guidance", "strength", "eta", "size",
                                         "height", "width", "clip_skip") if k in case}
        settings["frames"] = frames
        name = str(case.get("name", image.stem))
        for p, prompt in enumerate(prompts):
            for motion in motions:
                coef = parse_affinity(motion, case.get("affinity"), frames, int(case.get("cond_frame", a.cond_frame)))
                for seed in seeds:
                    tag = f"{name}-{p}-{motion if case.get('affinity') is None else 'custom'}-{seed}"
                    out.append((Case(tag, image, str(prompt), case.get("negative_prompt", DEFAULT_NEGATIVE_PROMPT),
                                     coef, int(seed)), settings))
    return out


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True, help="converted model directory (convert_torch_weights.py)")
    p.add_argument("--image", type=Path, help="condition image (the first frame)")
    p.add_argument("--prompt", nargs="+", help="prompt(s); one video per prompt and seed")
    p.add_argument("--negative-prompt", help="default: the reference's negative prompt; '' for none")
    p.add_argument("--config", type=Path, help="YAML batch file of cases (instead of --image/--prompt)")
    p.add_argument("--motion", default="small",
                   help="affinity preset: small, moderate, large, loop_small, loop_moderate, loop_large, style_small, "
                        "style_moderate, style_large, or a PIA index (0..5, -1..-3)")
    p.add_argument("--affinity", help="custom per-frame affinities, e.g. '1,0.9,0.85,...' (one per frame)")
    p.add_argument("--cond-frame", type=int, default=0, help="the frame that shows the image (presets count from it)")
    p.add_argument("--frames", type=int, default=16, help="frames per video (at most the motion modules' 32)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--scheduler", choices=("ddim", "dpmpp_2m"), default="ddim")
    p.add_argument("--karras", action="store_true", help="Karras sigmas (dpmpp_2m)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (<= 1: off)")
    p.add_argument("--strength", type=float, default=1.0, help="< 1 starts from the noised image")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    p.add_argument("--clip-skip", type=int)
    p.add_argument("--seed", type=int, nargs="+", default=[42])
    p.add_argument("--num-videos", type=int, help="videos with seeds seed, seed+1, ...")
    p.add_argument("--size", type=int, default=512, help="long side of the image (reference preprocessing)")
    p.add_argument("--height", type=int, help="explicit size (with --width): resize to cover, centre-crop")
    p.add_argument("--width", type=int)
    p.add_argument("--out", type=Path, default=Path("outputs"),
                   help="output file (.gif/.mp4; several videos get -<prompt>-<seed> suffixes) or folder")
    p.add_argument("--format", default=None, help="comma-separated gif,mp4,png (default: from --out, else gif)")
    p.add_argument("--fps", type=float, default=8)
    p.add_argument("--noise", type=Path, help=".npy initial noise (B, F, h, w, 4) to use instead of the seeds")
    p.add_argument("--posterior-noise", type=Path, help=".npy VAE posterior noise (B, h, w, 4)")
    p.add_argument("--save-noise", action="store_true", help="save the noise used next to each video (.npy)")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                   help="compute dtype (auto: bf16 on GPU/TPU, fp32 on CPU)")
    p.add_argument("--decode-chunk", type=int, default=4, help="frames per video decoded at once by the VAE")
    return p


def plan(a):
    """Every check that needs no model weights. Returns the batches [((image shape, frames, options), [(case,
    image)])], the output formats, the model config and whether there is a single video."""
    config, _, _ = model_dir.read_config(a.model)  # raises a clear error for a missing or incomplete directory
    if config.unet.in_channels != 9:
        raise ValueError(f"{a.model} holds a {config.unet.in_channels}-channel UNet (motion modules without PIA's "
                         "condition branch); convert it with pia.ckpt or the PIA condition adapter")
    if a.config is not None:
        if a.image is not None or a.prompt is not None:
            raise ValueError("use either --config or --image/--prompt")
        entries = cases_from_yaml(a.config, a)
    else:
        if a.image is None or not a.prompt:
            raise ValueError("--image and --prompt are required (or --config with a batch file)")
        entries = [(c, {"frames": a.frames}) for c in cases_from_args(a)]
    formats = a.format.split(",") if a.format else ([a.out.suffix[1:]] if a.out.suffix else ["gif"])
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise ValueError(f"unknown output format(s) {bad}; choose from {FORMATS}")
    max_frames = config.unet.motion_max_seq_length
    batches = {}
    images = {}
    for case, settings in entries:
        merged = {**{k: getattr(a, k) for k in ("steps", "scheduler", "karras", "guidance", "strength", "eta",
                                                 "size", "height", "width", "clip_skip")}, **settings}
        frames = merged["frames"]
        if not 1 <= frames <= max_frames:
            raise ValueError(f"{frames} frames: this model's motion modules take 1..{max_frames}")
        if (merged["height"] is None) != (merged["width"] is None):
            raise ValueError("give both --height and --width, or neither")
        key = (case.image, merged["size"], merged["height"], merged["width"])
        if key not in images:
            images[key] = media.preprocess_image(media.load_image(case.image), merged["size"], merged["height"],
                                                 merged["width"])
        options = SampleOptions(steps=int(merged["steps"]), scheduler=merged["scheduler"], karras=bool(merged["karras"]),
                                guidance_scale=float(merged["guidance"]), strength=float(merged["strength"]),
                                eta=float(merged["eta"]), clip_skip=merged["clip_skip"],
                                decode_chunk=a.decode_chunk)
        if not 0 < options.strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {options.strength}")
        if options.steps < 1:
            raise ValueError(f"steps must be >= 1, got {options.steps}")
        image = images[key]
        batches.setdefault((image.shape, frames, options), []).append((case, image))
    names = [case.name for case, _ in entries]
    if len(set(names)) != len(names):
        raise ValueError("two videos would get the same output name; give the cases distinct names")
    for case, _ in entries:
        for path in output_paths(a.out, case.name, len(entries) == 1, formats).values():
            media.check_writable(path, directory=path.suffix == "")
    return list(batches.items()), formats, config, len(entries) == 1


def load_noise(a, batch_size, shape):
    noise = post = None
    for name, path, expected in (("noise", a.noise, (batch_size,) + shape),
                                 ("posterior noise", a.posterior_noise, (batch_size,) + shape[1:])):
        if path is None:
            continue
        try:
            arr = np.load(path)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read the {name} file {path}: {e}") from None
        if arr.shape != expected:
            raise ValueError(f"{name} in {path} has shape {arr.shape}; this run needs {expected}")
        noise, post = (arr, post) if name == "noise" else (noise, arr)
    return noise, post


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        batches, formats, config, single = plan(a)
        if (a.noise or a.posterior_noise) and len(batches) != 1:
            raise ValueError("--noise/--posterior-noise need a single batch (one image size and one set of options)")
        (shape, frames, _), items = batches[0]
        noise, post = load_noise(a, len(items), latent_shape(config.vae, shape[0], shape[1], frames))
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import jax.numpy as jnp
    from pia_jax.pipeline import Animator
    dtype = {"auto": None, "fp32": jnp.float32, "bf16": jnp.bfloat16}[a.dtype]
    animator = Animator.load(a.model, dtype=dtype)
    seconds = {"load": time.perf_counter() - start}
    written = []
    for (shape, frames, options), items in batches:
        cases = [c for c, _ in items]
        progress = Progress(len(cases), frames)
        result = animator(np.stack([img for _, img in items]), [c.prompt for c in cases],
                          [c.negative_prompt for c in cases], np.stack([c.affinity for c in cases]), options,
                          seeds=[c.seed for c in cases], noise=noise, posterior_noise=post, progress=progress)
        for k, v in result.seconds.items():
            seconds[k] = seconds.get(k, 0) + v
        for i, case in enumerate(cases):
            frames_u8 = media.frames_to_uint8(result.videos[i])
            paths = output_paths(a.out, case.name, single, formats)
            for fmt, path in paths.items():
                {"gif": lambda p, f: media.write_gif(p, f, a.fps), "mp4": lambda p, f: media.write_mp4(p, f, a.fps),
                 "png": media.write_png_frames}[fmt](path, frames_u8)
                written.append(path)
            if a.save_noise:
                stem = next(iter(paths.values()))
                np.save(stem.with_name(stem.stem + "_noise.npy"), result.noise[i:i + 1])
                np.save(stem.with_name(stem.stem + "_posterior_noise.npy"), result.posterior_noise[i:i + 1])
    seconds["total"] = time.perf_counter() - start
    shown = ", ".join(str(p) for p in written[:4]) + (f", ... ({len(written)} files)" if len(written) > 4 else "")
    print(f"wrote {shown} | " + " ".join(f"{k} {v:.1f}s" for k, v in seconds.items()))
    return 0


class Progress:
    """One status line per phase on stderr, rewritten in place on a terminal."""

    def __init__(self, videos, frames):
        self.videos, self.frames, self.tty = videos, frames, sys.stderr.isatty()
        self.start = time.perf_counter()

    def __call__(self, phase, done, total):
        text = {"encode": "encoding prompts and image" + (" (compiling)" if done == 0 else ""),
                "denoise": f"denoising step {done}/{total}", "decode": f"decoding frame {done}/{total}"}[phase]
        line = f"[{time.perf_counter() - self.start:6.1f}s] {self.videos} video(s) x {self.frames} frames: {text}"
        if self.tty:
            print("\r" + line.ljust(100), end="" if done < total or phase != "decode" else "\n", file=sys.stderr,
                  flush=True)
        elif done == total or phase == "denoise" and done % 5 == 0:
            print(line, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
