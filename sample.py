"""Animates an image with PIA: a converted model directory, an image and a prompt in; GIF/MP4/PNG frames out.

  python sample.py --model models/pia-sd15 --image cat.jpg --prompt "a cat, wind blowing" --motion moderate
  python sample.py --model models/pia-sd15 --image cat.jpg --prompt "a cat" --seed 1 2 3 4 --out out/cat.mp4
  python sample.py --model models/pia-sd15 --config cases.yaml --out out/

Every input is checked before any model is loaded or compiled (pia_jax.sampling.cases: the batch-file format,
output names). The flags from --negative-prompt to --free-noise are made from the fields of `cases.Settings` and
`SampleOptions`, where each is declared once; a batch file takes the same names as keys. Videos of one size and
options run in batches of --batch-size videos per local device.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from pia_jax import media
from pia_jax.sampling import cases
from pia_jax.sampling.options import key


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # paths stay strings: a Path collapses gs://bucket to a local gs:/bucket (files.path keeps object-store URLs)
    p.add_argument("--model", required=True, help="converted model directory (convert_torch_weights.py), on a "
                                                  "local disk")
    p.add_argument("--image", help="condition image (the first frame); a local path or gs://...")
    p.add_argument("--keyframe", action="append", metavar="FRAME:IMAGE",
                   help="a condition image at a frame, instead of --image (repeat: --keyframe 0:a.png "
                        "--keyframe 15:b.png)")
    p.add_argument("--prompt", nargs="+", help="prompt(s); one video per prompt and seed")
    p.add_argument("--prompt-map", nargs="+", metavar="FRAME:PROMPT",
                   help="prompt travel instead of --prompt: e.g. '0:a cat sitting' '24:a cat running'")
    p.add_argument("--config", help="YAML batch file of cases (instead of --image/--prompt)")
    p.add_argument("--seed", type=int, nargs="+", default=[42])
    p.add_argument("--num-videos", type=int, help="videos with seeds seed, seed+1, ...")
    add_settings(p)
    p.add_argument("--out", default="outputs",
                   help="output file (.gif/.mp4; several videos get -<name> suffixes) or folder; local or gs://...")
    p.add_argument("--format", default=None, help="comma-separated gif,mp4,png (default: from --out, else gif)")
    p.add_argument("--fps", type=float, default=8)
    p.add_argument("--noise", help=".npy initial noise (B, F, h, w, 4) to use instead of the seeds")
    p.add_argument("--posterior-noise", help=".npy VAE posterior noise (B, h, w, 4)")
    p.add_argument("--save-noise", action="store_true", help="save the noise used next to each video (.npy)")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                   help="compute dtype (auto: bf16 on GPU/TPU, fp32 on CPU)")
    p.add_argument("--batch-size", type=int,
                   help="videos per device per batch (default: as many as the device memory holds)")
    p.add_argument("--compile-cache", default="default", metavar="DIR|off",
                   help="persistent compilation cache folder (default: $PIA_JAX_CACHE_DIR, else "
                        "$XDG_CACHE_HOME/pia_jax/xla); 'off' disables it")
    p.add_argument("--no-progress", action="store_true", help="no per-step progress (the loop runs as one call)")
    return p


def add_settings(p: argparse.ArgumentParser):
    """A flag per `cases.Settings` field, made from its type, default, help and choices (each declared once)."""
    for f in cases.FIELDS:
        choices = f.metadata.get("choices")
        help = f.metadata["help"] + (f"; one of {', '.join(map(str, choices))}" if choices else "")
        help += f" (default: {f.default})" if f.default is not None and f.default is not False else ""
        flag = "--" + key(f).replace("_", "-")
        if cases.value_type(f) is bool:
            p.add_argument(flag, dest=f.name, action="store_true", help=help)
        else:
            p.add_argument(flag, dest=f.name, type=cases.value_type(f), default=f.default, help=help,
                           metavar=key(f).upper())


def plan(a) -> tuple:
    """Every check that needs no model weights -> (plan, noise, posterior noise)."""
    settings = cases.settings_of(a)
    if a.batch_size is not None and a.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1 video per device, got {a.batch_size}")
    if a.config is not None:
        if a.image is not None or a.prompt is not None or a.prompt_map or a.num_videos is not None:
            raise ValueError("use either --config or --image/--prompt/--prompt-map/--num-videos")
        videos = cases.read_batch_file(a.config, settings, a.seed[0])
    else:
        videos = cases.videos_from_args(a, settings)
    p = cases.plan(a.model, videos, a.out, a.format.split(",") if a.format else None, a.fps)
    from pia_jax.toy.vocab import check_prompts
    check_prompts(a.model, videos)  # the toy model knows only its world's words
    from pia_jax.sampling import compile_cache  # imports jax, as cases.plan's model check does
    compile_cache.check(a.compile_cache)
    return (p, *cases.load_noise(p, a.noise, a.posterior_noise))


def attach_values(argv: list[str]) -> list[str]:
    """'--keyframe -1:x' -> '--keyframe=-1:x': argparse takes a value starting with '-' for an option ('expected
    one argument'); attached, it reaches the keyframe check, which names the bad frame index."""
    out = []
    for arg in argv:
        if out and out[-1] == "--keyframe" and arg[:1] == "-" and arg[1:2].isdigit():
            out[-1] = f"--keyframe={arg}"
        else:
            out.append(arg)
    return out


def main(argv=None) -> int:
    from pia_jax import quiet
    quiet.command_line()  # before jax loads; a command line may change the process's logging, the library does not
    a = build_parser().parse_args(attach_values(sys.argv[1:] if argv is None else list(argv)))
    start = time.perf_counter()
    try:
        p, noise, post = plan(a)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import jax.numpy as jnp

    from pia_jax.sampling import Animator, compile_cache
    cache_before = compile_cache.counts()
    dtype = {"auto": None, "fp32": jnp.float32, "bf16": jnp.bfloat16}[a.dtype]
    say(start, f"loading {a.model}")
    animator = Animator.load(a.model, dtype=dtype, compile_cache_dir=a.compile_cache)
    seconds = {"load": time.perf_counter() - start}
    cache = f"cache {animator.compile_cache}" if animator.compile_cache else "cache off"
    say(start, f"compiling the sampler for {len(p.groups)} video shape(s) ({cache}; a cached program loads in seconds)")
    try:  # compile (or load from the cache) and size every batch before the first video is made
        sizes = [animator.plan_batch_size(len(g.videos), g.height, g.width, g.frames, g.options, a.batch_size,
                                          text_keys=cases.text_keys(g.videos),
                                          keyframes=len(g.keyframes or ())) for g in p.groups]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    written = []
    for g, size in zip(p.groups, sizes):
        try:
            result = animator(np.stack(g.images), [v.prompt for v in g.videos], [v.negative_prompt for v in g.videos],
                              np.stack([v.affinity for v in g.videos]), g.options, seeds=[v.seed for v in g.videos],
                              noise=noise, posterior_noise=post, batch_size=size, keyframes=g.keyframes,
                              ip_adapter_images=g.ip_images,
                              progress=None if a.no_progress else Progress(len(g.videos), g.frames))
        except FloatingPointError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        for k, v in result.seconds.items():
            seconds[k] = seconds.get(k, 0) + v
        written += write_group(a, g, result, single=len(p.videos) == 1, formats=p.formats)
    seconds["compile"] = animator.compile_seconds
    seconds["total"] = time.perf_counter() - start
    print(summary(written, seconds, animator, cache_before, max(sizes)))
    return 0


def say(start: float, what: str) -> None:
    """A status line on stderr as a slow phase starts (loading and compiling can take a minute on a cold start)."""
    print(f"[{time.perf_counter() - start:6.1f}s] {what}", file=sys.stderr, flush=True)


def write_group(a, g, result, single: bool, formats) -> list[Path]:
    """Writes a group's videos (and with --save-noise their noise), each file complete or not at all."""
    written = []
    for i, video in enumerate(g.videos):
        paths = cases.output_paths(a.out, video.name, single, formats)
        for fmt, path in paths.items():
            media.write_video(fmt, path, result.videos[i], a.fps)
            written.append(path)
        if a.save_noise:
            cases.save_noise(paths, result.noise[i:i + 1], result.posterior_noise[i:i + 1])
    return written


def summary(written, seconds: dict, animator, cache_before: dict, batch: int) -> str:
    from pia_jax.sampling import compile_cache
    counts = {k: v - cache_before[k] for k, v in compile_cache.counts().items()}
    cache = (f"cache {counts['hits']} hit(s), {counts['misses']} miss(es)" if animator.compile_cache
             else "cache off")
    shown = ", ".join(str(q) for q in written[:4]) + (f", ... ({len(written)} files)" if len(written) > 4 else "")
    return (f"wrote {shown} | " + " ".join(f"{k} {v:.1f}s" for k, v in seconds.items())
            + f" | {cache} | batch {batch} video(s) x {animator.groups} device group(s) of "
              f"{animator.devices_per_group} device(s)")


class Progress:
    """One status line per phase on stderr, rewritten in place on a terminal."""

    def __init__(self, videos, frames):
        self.videos, self.frames, self.tty = videos, frames, sys.stderr.isatty()
        self.start = time.perf_counter()

    def __call__(self, phase, done, total):
        text = {"encode": "encoding prompts and image", "denoise": f"denoising step {done}/{total}",
                "decode": f"decoding {total} frames"}[phase]
        line = f"[{time.perf_counter() - self.start:6.1f}s] {self.videos} video(s) x {self.frames} frames: {text}"
        if self.tty:
            print("\r" + line.ljust(100), end="" if phase != "decode" else "\n", file=sys.stderr, flush=True)
        elif done == total or phase == "denoise" and done % 5 == 0:
            print(line, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
