"""Scores image animations: CLIP image/text alignment and frame consistency, optical-flow motion, VBench's dynamic
degree, condition-frame PSNR/SSIM, and affinity controllability, per video and over an AnimateBench-style folder.

  python evaluate.py convert-clip clip-vit-large-patch14 --out models/clip-l14
  python evaluate.py score --clip models/clip-l14 --video cat.gif --image cat.jpg --prompt "a cat"
  python evaluate.py bench AnimateBench --clip models/clip-l14 --models models.yaml --out results/pia
  python evaluate.py bench AnimateBench --clip models/clip-l14 --videos other_system/ --out results/other

Every input is checked before any model is loaded; a results folder appears complete or not at all.
"""

import argparse
import json
import sys
from pathlib import Path

from pia_jax import quiet

quiet.command_line()  # before the imports below load jax (XLA reads its log level then)

from pia_jax import files, media
from pia_jax.eval import bench
from pia_jax.eval.clip_dir import ClipDirError, convert_clip, read_clip_config
from pia_jax.sampling import affinity
from pia_jax.weights import model_dir


def local_path(value: str) -> Path:
    """An argument path; evaluation reads and writes local disks only, so a URL is refused here, before any work
    (a `Path` would collapse gs://b/x into a local 'gs:/b/x')."""
    if "://" in value:
        raise argparse.ArgumentTypeError(f"{value!r}: evaluate.py reads and writes local files only; copy it to a "
                                         "local disk first")
    return Path(value)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert-clip", help="a transformers CLIPModel folder -> a metric-model directory")
    c.add_argument("src", type=local_path, help="folder with config.json, model.safetensors or pytorch_model.bin, "
                                          "vocab.json + merges.txt (e.g. openai/clip-vit-large-patch14)")
    c.add_argument("--out", type=local_path, required=True)
    c.add_argument("--force", action="store_true", help="replace an existing output")

    s = sub.add_parser("score", help="score one existing video (GIF/MP4/frame folder) against its image and prompt")
    s.add_argument("--video", type=local_path, required=True)
    s.add_argument("--image", type=local_path, required=True)
    s.add_argument("--prompt", required=True)
    s.add_argument("--clip", type=local_path, help="converted CLIP directory (without it: motion scores only)")
    s.add_argument("--cond-frame", type=int, default=0, help="the frame that should show the image")
    s.add_argument("--out", type=local_path, help="also write the scores as JSON here")

    b = sub.add_parser("bench", help="sample (or read) and score every case of an AnimateBench-style folder")
    b.add_argument("bench", type=local_path, help="folder with img/<style>/ and configs/<style>.yaml")
    b.add_argument("--out", type=local_path, required=True, help="results folder")
    b.add_argument("--clip", type=local_path, help="converted CLIP directory (without it: motion scores only)")
    src = b.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=local_path, help="one PIA model directory for every style")
    src.add_argument("--models", type=local_path, help="YAML map style: PIA model directory")
    src.add_argument("--videos", type=local_path, help="score existing videos <videos>/<style>/<image>-<prompt index>"
                                                 "[-<preset>].gif|mp4 instead of sampling")
    b.add_argument("--motion", default="small", help="the preset the summary scores (default small, PIA preset 0)")
    b.add_argument("--presets", default="small,moderate,large", help="presets compared for controllability")
    b.add_argument("--frames", type=int, default=16)
    b.add_argument("--steps", type=int, default=25)
    b.add_argument("--guidance", type=float, default=7.5)
    b.add_argument("--size", type=int, default=512, help="long side of the image (as sample.py)")
    b.add_argument("--devices", type=int, help="local devices to sample on (default all)")
    b.add_argument("--force", action="store_true", help="replace an existing results folder")
    return p


def _scorer(path):
    if path is None:
        print("note: no --clip given, so no CLIP alignment scores", file=sys.stderr)
        return None
    from pia_jax.eval.scores import CLIPScorer
    return CLIPScorer.load(path)


def check_bench(a) -> tuple[list, dict | None]:
    """Everything a bench run needs, checked before any model loads: (cases, {style: model dir} or None)."""
    cases = bench.read_cases(a.bench)
    presets = [a.motion, *filter(None, a.presets.split(","))]
    for p in presets:
        affinity.preset_affinity(p, a.frames)  # unknown names and bad frame counts fail here
    if a.devices is not None and a.devices < 1:
        raise ValueError(f"--devices must be at least 1, got {a.devices}")
    if a.out.exists() and not a.force:
        raise FileExistsError(f"{a.out} already exists; pass --force to replace it")
    styles = list(dict.fromkeys(c.style for c in cases))
    if a.videos is not None:
        missing = [f"{c.style}/{c.name}" for c in cases if bench.find_video(a.videos, c, a.motion, True) is None]
        if missing:
            raise FileNotFoundError(f"no video in {a.videos} for {len(missing)} cases, e.g. {missing[:3]}; expected "
                                    f"<style>/<case>.gif|mp4 or <style>/<case>-{a.motion}.gif|mp4")
        return cases, None
    models = {s: a.model for s in styles} if a.model is not None else bench.read_model_map(a.models)
    unmapped = [s for s in styles if s not in models]
    if unmapped:
        raise bench.BenchError(f"{a.models} maps no model for the styles {unmapped}")
    for s in styles:
        model_dir.read_config(models[s])
    return cases, models


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    try:
        if a.command == "convert-clip":
            print(f"wrote {convert_clip(a.src, a.out, a.force)}")
            return 0
        if a.clip is not None:
            read_clip_config(a.clip)
        if a.command == "score":
            from pia_jax.eval.scores import score_video
            from pia_jax.eval.video import read_video
            frames, fps = read_video(a.video)
            if len(frames) < 2:  # every motion score compares frames, and a still image is no animation to score
                raise ValueError(f"{a.video} has {len(frames)} frame; scoring needs a video of at least 2 frames")
            image = media.load_image(a.image)
            if not 0 <= a.cond_frame < len(frames):
                raise ValueError(f"--cond-frame must be in 0..{len(frames) - 1}")
            scores = score_video(_scorer(a.clip), frames, image, a.prompt, cond_frame=a.cond_frame, fps=fps)
            text = json.dumps(scores, indent=2)
            print(text)
            if a.out:
                with files.atomic_write(media.check_writable(a.out)) as tmp:  # complete or not at all
                    Path(tmp).write_text(text + "\n")
            return 0
        cases, models = check_bench(a)
        from pia_jax.sampling import compile_cache
        compile_cache.enable("default")  # a CLI may change the process's jax settings; the Animator does not
        options = bench.BenchOptions(a.frames, a.steps, a.guidance, a.size, a.motion,
                                     tuple(filter(None, a.presets.split(","))), a.devices)
        scorer = _scorer(a.clip)
        with files.atomic_write(a.out, directory=True, force=a.force) as tmp:
            bench.run_bench(cases, tmp, options, scorer=scorer, models=models, videos=a.videos)
        print((a.out / "summary.md").read_text())
        print(f"wrote {a.out}: scores.csv, summary.md, motion.png, sheets/" + (", videos/" if models else ""))
        return 0
    except (ValueError, OSError, ClipDirError) as e:  # bad input: one clear line, nothing half-written
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
