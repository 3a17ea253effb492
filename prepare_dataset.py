"""Prepares a video-caption source as a tfds ArrayRecord dataset that train.py reads (on one host or a TPU pod).

  # a WebVid subset: results_10M_train.csv (videoid, name, page_dir) + videos/<videoid>.mp4 or
  # videos/<page_dir>/<videoid>.mp4
  python prepare_dataset.py webvid --csv results_10M_train.csv --videos videos --out /data/webvid
  # any CSV with columns path, caption (paths relative to the CSV's folder, or absolute)
  python prepare_dataset.py csv --csv my_clips.csv --out /data/my_clips
  # large sources: N jobs (machines) in parallel, each one part; train on /data/webvid10m (opens all parts)
  python prepare_dataset.py webvid --csv results_10M_train.csv --videos videos --part 3/16 --out /data/webvid10m/part-03
  # with a latent cache for train.py data.latents=true: 4 clips per video encoded by the model directory's VAE
  python prepare_dataset.py csv --csv my_clips.csv --out /data/my_clips_latents --latents models/pia-init

Every video is decoded once to count its frames and to catch corrupt files; unusable videos are skipped and
counted by reason (missing, unreadable, corrupt, too_short). The report is printed and kept in the dataset's
metadata.json. The dataset appears in --out only when complete; when no video is usable nothing is written and the
exit status is 2. A finished dataset in --out prepared from the same inputs is reused; one from other inputs is
refused (exit 2) unless --force replaces it (the old one stays until the new one is complete).

--latents MODEL_DIR adds a latent cache (pia_jax/data/latents.py): per video, --latent-clips clips drawn and
preprocessed as train.py's loader would (--n-frames, --stride, --resolution, --flip must be the training run's
data.* values), encoded by the model directory's VAE (posterior mean and log-variance of every frame, fp32 by
default: 512 KiB per 16-frame 256² clip, half that in bf16/fp16) with their affinity scores. train.py uses them with
data.latents=true, and refuses them if they were made for other clips or by another VAE than the model it trains.
Each cached clip is fixed (N windows per video instead of a fresh one per epoch) and preparation encodes N clips per
video, so the cache saves VAE work where training visits each video more than N times.
"""

import argparse
import itertools
import json
import sys
from pathlib import Path

from pia_jax.data.sources import check_source, rows_from


def part_arg(text: str) -> tuple[int, int]:
    k, _, n = text.partition("/")
    try:
        k, n = int(k), int(n)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K/N, got {text!r}") from None
    if not 0 <= k < n:
        raise argparse.ArgumentTypeError(f"need 0 <= K < N, got {text!r}")
    return k, n


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("kind", choices=("webvid", "csv"), help="source kind")
    p.add_argument("--csv", required=True, help="the CSV listing the videos")
    p.add_argument("--videos", help="webvid: the folder holding the videos")
    p.add_argument("--out", required=True, help="output folder (local path or one tfds/etils can write, e.g. gs://)")
    p.add_argument("--min-frames", type=int, default=16,
                   help="skip videos with fewer frames than this: the clip length (DataConfig.n_frames)")
    p.add_argument("--limit", type=int, help="only the first N rows of the CSV (a quick subset)")
    p.add_argument("--part", type=part_arg, default=(0, 1), metavar="K/N",
                   help="only rows K, K+N, K+2N, ... (0 <= K < N): one of N parts prepared in parallel")
    p.add_argument("--workers", type=int, default=8, help="threads decoding videos")
    p.add_argument("--force", action="store_true", help="replace a dataset in --out prepared from other inputs")
    g = p.add_argument_group("latent cache (train.py data.latents=true)")
    g.add_argument("--latents", metavar="MODEL_DIR", help="also store VAE posteriors of clips, encoded by this model "
                   "directory's VAE (the model train.py trains)")
    g.add_argument("--latent-clips", type=int, default=4, help="clips cached per video")
    g.add_argument("--latent-dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="storage of the posterior mean and log-variance (bf16/fp16: half the bytes)")
    g.add_argument("--latent-seed", type=int, default=0, help="seed of the clips' draws (window, flip)")
    g.add_argument("--n-frames", type=int, default=16, help="frames per cached clip (train.py data.n_frames)")
    g.add_argument("--stride", type=int, default=4, help="window stride of a cached clip (data.stride)")
    g.add_argument("--resolution", type=int, default=256, help="square size of a cached clip (data.resolution)")
    g.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True,
                   help="random horizontal flips of the cached clips (data.flip)")
    g.add_argument("--encode-batch", type=int, default=32, help="frames per VAE call")
    args = p.parse_args(argv)
    if args.kind == "webvid" and not args.videos:
        p.error("webvid needs --videos")
    for name in ("min_frames", "limit", "workers", "latent_clips", "n_frames", "stride", "resolution",
                 "encode_batch"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def quiet_tfds() -> None:
    """tfds draws tqdm bars for its internal phases (splits, examples, shuffling a temporary folder); this command's
    own lines and report say what happened, so the command line turns them off (the library does not)."""
    import tensorflow_datasets as tfds
    tfds.disable_progress_bar()


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        check_source(args.kind, args.csv, args.videos)
        if args.latents:
            from pia_jax.weights.model_dir import check_model_dir
            check_model_dir(args.latents, parts=("vae",), tokenizer=False)
    except ValueError as e:  # ModelDirError is one
        print(f"error: {e}", file=sys.stderr)
        return 2

    from pia_jax.data.builder import PrepareError, prepare  # tensorflow_datasets takes a moment to import
    from pia_jax.data.latents import LatentSpec
    quiet_tfds()

    k, n = args.part
    inputs = {"kind": args.kind, "csv": str(Path(args.csv).resolve()),
              "videos": args.videos and str(Path(args.videos).resolve()), "limit": args.limit, "part": f"{k}/{n}"}
    rows = itertools.islice(itertools.islice(rows_from(args.kind, args.csv, args.videos), args.limit), k, None, n)
    latents = args.latents and LatentSpec(args.latents, args.latent_clips, args.latent_dtype, args.latent_seed,
                                          args.n_frames, args.stride, args.resolution, args.flip, args.encode_batch)
    try:
        path, report = prepare(rows, args.out, min_frames=args.min_frames, workers=args.workers, inputs=inputs,
                               force=args.force, latents=latents or None)
    except PrepareError as e:
        if e.report:
            print(json.dumps(e.report, indent=1))
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=1))
    cache = report.get("latents")
    cache = cache and (f"; {cache['clips']} cached clips per video, {cache['bytes_per_clip'] / 2**10:.0f} KiB each "
                       f"({cache['dtype']})")
    print(f"dataset: {path}  ({report['examples']} videos, {sum(report['skipped'].values())} skipped{cache or ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
