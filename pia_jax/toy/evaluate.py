"""Toy-world evaluation: animate the first frames of held-out clips and measure what moved, by tracking the object.

    python -m pia_jax.toy evaluate --model models/toy --out runs/toy/eval

Cases: every held-out (shape, colour, background) combination (never trained on; each word was) x each of the four
directions, prompted without a speed word, animated with each of the presets small / moderate / large; and each
combination prompted "stays still" (moderate preset); and, to tell the text's part from the image's, each
combination x direction once more with the object's eye on the opposite side ("text vs eye", moderate); and each
combination x direction once more starting at the canvas centre ("centred", moderate): a clip's start is drawn so
that the object stays in view, so elsewhere the start hints at the direction (a "moves left" object tends to start
on the right), and a model that merely moves into the open space scores above chance there. The object is tracked
by colour: each pixel's coverage is its colour projected onto the background -> object colour segment (exactly how
the renderer blends them), the centroid and area are the coverage-weighted mean position and sum. Pixels are those
of the 32x32 frames.

Metrics (goals from issue 11):
  direction accuracy  moderate preset: the last frame's centroid has moved > 1 px along the prompt's direction and
                      more along it than across it                                                   goal >= 90 %
  preset ordering     mean displacement from frame 0 over the frames: small < moderate < large       goal >= 90 %
  condition PSNR      frame 0 against the input image, all cases                                    goal >= 25 dB
  still motion        "stays still": mean centroid step between consecutive frames                   goal < 1 px/frame
  text vs eye         the eye faces against the prompt: the share that moves as the text says (judged as direction
                      accuracy) and the share that moves the way the eye faces                       no goal
  centred             direction accuracy with the object starting at the centre, where its position says nothing
                      about the direction: what the text and the image's eye and trail alone achieve   no goal

Long videos (`--long-frames`, default 48): each combination once with a direction (the four in turn, "slowly", so
the object stays in view for longer) and once "stays still", moderate preset, sampled in context windows of the
8 trained frames every 4 frames (pia_jax.sampling.windows). The same metrics, the direction judged at frame
LONG_HORIZON (the third window; the object may reach the border later) and the still motion over all frames.
"""

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

from pia_jax.eval.motion import psnr
from pia_jax.toy import world

PRESETS = ("small", "moderate", "large")
MIN_SHIFT = 1.0  # px: less than this is no movement
SEEDS = 4  # noise seeds per 8-frame case: whether a video moves as prompted varies with the seed (docs/toy/EVAL.md)
LONG_FRAMES, LONG_HORIZON, CONTEXT_STRIDE = 48, 16, 4
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


def first_frame(clip: world.Clip) -> np.ndarray:
    """uint8 (S, S, 3) at TRAIN_SIZE: frame 0 rendered and resized as the training data loader resizes frames."""
    from pia_jax.data.clips import transform_clip

    frame = transform_clip(world.render(clip, frames=1), flip=False, resolution=world.TRAIN_SIZE)[0]
    return np.round((frame + 1) * 127.5).clip(0, 255).astype(np.uint8)


def cases(seed: int = 0) -> list[dict]:
    """The evaluation cases: {kind, clip, prompt, preset}; kind is 'direction', 'still', 'conflict' (text vs eye) or
    'centred'."""
    rng = np.random.default_rng([seed, 2])
    out = []
    for combo in world.held_out_combinations():
        for direction in world.DIRECTIONS:
            clip = world.sample_clip(rng, combo, direction, speed="")
            out += [{"kind": "direction", "clip": clip, "prompt": clip.caption, "preset": p} for p in PRESETS]
        clip = world.sample_clip(rng, combo, "still")
        out.append({"kind": "still", "clip": clip, "prompt": clip.caption, "preset": "moderate"})
    rng = np.random.default_rng([seed, 4])
    for combo in world.held_out_combinations():
        for direction in world.DIRECTIONS:
            clip = world.sample_clip(rng, combo, direction, speed="")
            clip = dataclasses.replace(clip, heading=OPPOSITE[direction])
            out.append({"kind": "conflict", "clip": clip, "prompt": clip.caption, "preset": "moderate"})
    rng = np.random.default_rng([seed, 5])  # appended last, so the cases above keep their noise seeds
    for combo in world.held_out_combinations():
        for direction in world.DIRECTIONS:
            clip = dataclasses.replace(world.sample_clip(rng, combo, direction, speed=""), x=0.5, y=0.5)
            out.append({"kind": "centred", "clip": clip, "prompt": clip.caption, "preset": "moderate"})
    return out


def noise_offsets(todo: list[dict]) -> list[int]:
    """Video i's noise seed offset: i, except that a clip's presets all take its moderate video's, so that the
    preset ordering compares presets under one noise (as eval/bench.py does) and the moderate videos keep theirs."""
    moderate = {id(c["clip"]): i for i, c in enumerate(todo) if c["preset"] == "moderate"}
    return [moderate.get(id(c["clip"]), i) for i, c in enumerate(todo)]


def long_cases(seed: int = 0) -> list[dict]:
    """The long-video cases: per held-out combination one direction (slowly; the directions in turn) and one
    still clip, moderate preset."""
    rng = np.random.default_rng([seed, 3])
    out = []
    for i, combo in enumerate(world.held_out_combinations()):
        for motion in (list(world.DIRECTIONS)[i % len(world.DIRECTIONS)], "still"):
            clip = world.sample_clip(rng, combo, motion, speed="slowly")
            kind = "still" if motion == "still" else "direction"
            out.append({"kind": kind, "clip": clip, "prompt": clip.caption, "preset": "moderate"})
    return out


def track(video: np.ndarray, colour: str, background: str) -> tuple[np.ndarray, np.ndarray]:
    """Centroids (F, 2) as (x, y) in pixels and areas (F,) in pixels of the object in frames (F, H, W, 3) in
    [0, 1]. Coverage = the pixel's colour projected on the background -> object colour segment, clipped to [0, 1]."""
    fg, bg = (np.array(t, np.float64) / 255 for t in (world.COLOURS[colour], world.BACKGROUNDS[background]))
    axis = fg - bg
    cover = np.clip((np.asarray(video, np.float64) - bg) @ axis / (axis @ axis), 0, 1)  # (F, H, W)
    area = cover.sum((1, 2))
    ys, xs = np.mgrid[0:cover.shape[1], 0:cover.shape[2]] + 0.5
    safe = np.maximum(area, 1e-9)
    centroid = np.stack([(cover * xs).sum((1, 2)) / safe, (cover * ys).sum((1, 2)) / safe], -1)
    return centroid, area


def measure(case: dict, video: np.ndarray, image: np.ndarray, at: int = -1) -> dict:
    """The metrics of one video; a direction is judged by the shift from frame 0 to frame `at`."""
    clip = case["clip"]
    centroid, area = track(video, clip.colour, clip.background)
    shift = centroid - centroid[0]
    row = {"prompt": case["prompt"], "preset": case["preset"], "kind": case["kind"],
           "psnr": psnr(video[0], image / 255, peak=1.0), "area": area.tolist(), "centroid": centroid.tolist(),
           "displacement": float(np.linalg.norm(shift, axis=1).mean()),
           "step": float(np.linalg.norm(np.diff(centroid, axis=0), axis=1).mean())}
    if case["kind"] in ("direction", "conflict", "centred"):
        along, across = _components(shift[at], clip.motion)
        row.update(along=along, across=across, correct=along > MIN_SHIFT and along > across)
        if clip.heading is not None:
            eye_along, eye_across = _components(shift[at], clip.heading)
            row.update(follows_eye=eye_along > MIN_SHIFT and eye_along > eye_across)
    return row


def _components(shift: np.ndarray, direction: str) -> tuple[float, float]:
    """px along `direction` and (unsigned) across it."""
    want = np.array(world.DIRECTIONS[direction], np.float64)
    return float(shift @ want), float(abs(shift @ want[::-1]))


def summarize(rows: list[dict]) -> dict:
    direction = [r for r in rows if r["kind"] == "direction"]
    moderate = [r for r in direction if r["preset"] == "moderate"]
    by_prompt = {}  # (prompt, seed) -> {preset: displacement}
    for r in direction:
        by_prompt.setdefault((r["prompt"], r.get("seed")), {})[r["preset"]] = r["displacement"]
    ordered = [d["small"] < d["moderate"] < d["large"] for d in by_prompt.values()]
    pairs = [d[a] < d[b] for d in by_prompt.values() for a, b in (("small", "moderate"), ("moderate", "large"))]
    still = [r["step"] for r in rows if r["kind"] == "still"]
    conflict = [r for r in rows if r["kind"] == "conflict"]
    centred = [r for r in rows if r["kind"] == "centred"]
    return {
        "direction_accuracy": float(np.mean([r["correct"] for r in moderate])),
        "direction_accuracy_by_seed": {str(k): float(np.mean([r["correct"] for r in moderate if r.get("seed") == k]))
                                       for k in dict.fromkeys(r.get("seed") for r in moderate)},
        "direction_accuracy_all_presets": float(np.mean([r["correct"] for r in direction])),
        "preset_order": float(np.mean(ordered)), "preset_pairs_ordered": float(np.mean(pairs)),
        "mean_displacement_px": {p: float(np.mean([r["displacement"] for r in direction if r["preset"] == p]))
                                 for p in PRESETS},
        "condition_psnr_db": float(np.mean([r["psnr"] for r in rows])),
        "condition_psnr_min_db": float(np.min([r["psnr"] for r in rows])),
        "still_px_per_frame": float(np.mean(still)),
        "text_vs_eye": {"follows_text": float(np.mean([r["correct"] for r in conflict])),
                        "follows_eye": float(np.mean([r["follows_eye"] for r in conflict]))},
        "direction_accuracy_centred": float(np.mean([r["correct"] for r in centred])) if centred else None,
        "cases": {"direction": len(moderate), "ordering": len(by_prompt), "still": len(still),
                  "text_vs_eye": len(conflict), "centred": len(centred), "videos": len(rows)},
    }


def summarize_long(rows: list[dict]) -> dict:
    direction = [r for r in rows if r["kind"] == "direction"]
    return {"frames": len(rows[0]["centroid"]), "direction_judged_at_frame": LONG_HORIZON,
            "direction_accuracy": float(np.mean([r["correct"] for r in direction])),
            "condition_psnr_db": float(np.mean([r["psnr"] for r in rows])),
            "still_px_per_frame": float(np.mean([r["step"] for r in rows if r["kind"] == "still"])),
            "cases": {"direction": len(direction), "still": len(rows) - len(direction)}}


def gif_grid(videos, columns: int, scale: int = 3) -> np.ndarray:
    """uint8 (F, H, W, 3): videos tiled `columns` wide, upscaled `scale`x, as one video."""
    pad = 2
    tiles = [np.pad((v * 255).round().astype(np.uint8).repeat(scale, 1).repeat(scale, 2),
                    ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=255) for v in videos]
    tiles += [np.full_like(tiles[0], 255)] * (-len(tiles) % columns)
    rows = [np.concatenate(tiles[i:i + columns], 2) for i in range(0, len(tiles), columns)]
    return np.concatenate(rows, 1)


def _of_combinations(todo: list[dict], limit: int | None) -> list[dict]:
    """The cases of the first `limit` held-out combinations (all for None)."""
    keep = set(world.held_out_combinations()[:limit])
    return [c for c in todo if (c["clip"].shape, c["clip"].colour, c["clip"].background) in keep]


def _animate(model_dir, todo: list[dict], images, seeds, frames: int, **options) -> np.ndarray:
    """float32 videos (B, frames, H, W, 3) in [0, 1] of the cases, video i from noise seed seeds[i]; negative prompt
    "" (the caption-dropout condition the toy model was trained with); in batches of 16, so one program serves all."""
    from pia_jax.eval.animate import animate
    from pia_jax.sampling import SampleOptions
    from pia_jax.sampling.affinity import preset_affinity

    affinities = [preset_affinity(c["preset"], frames) for c in todo]
    return animate(model_dir, images, [c["prompt"] for c in todo], affinities, seeds, SampleOptions(**options),
                   batch=16, float_frames=True, log=lambda m: print(m, file=sys.stderr, flush=True))


def _sheet(path, videos, images):
    from pia_jax.eval.sheet import write_contact_sheet
    write_contact_sheet(path, images, np.round(np.asarray(videos) * 255).astype(np.uint8), scale=3)


def _write_json(path, value):
    """Complete or not at all: metrics.json is the evaluation's completion mark (toy/recipe.py)."""
    from pia_jax import files

    with files.atomic_write(path) as tmp:
        Path(tmp).write_text(json.dumps(value, indent=1) + "\n")


def evaluate(model_dir, out, *, steps: int = 25, guidance: float = 4.0, seed: int = 0, limit: int | None = None,
             long_frames: int = LONG_FRAMES, strength: float = 1.0, seeds: int = SEEDS):
    """Runs the cases (the first `limit` combinations' only, if given) `seeds` times (noise seeds seed + 1000 k, k <
    seeds; the metrics pool them), writes metrics.json (last), cases.json, sheet.png (moderate direction cases and
    still cases, the first seed's), grid.gif, sheet_text_vs_eye.png, and for `long_frames` > 0 the long-video cases
    (the first seed only; their metrics under "long", sheet_long.png with every 4th frame, grid_long.gif); returns
    the summary."""
    from pia_jax import media

    options = dict(steps=steps, guidance_scale=guidance, strength=strength)
    todo = _of_combinations(cases(seed), limit)
    images = np.stack([first_frame(c["clip"]) for c in todo])
    rows = []
    for k in range(seeds):
        noise_seed = seed + 1000 * k
        sampled = _animate(model_dir, todo, images, [noise_seed + o for o in noise_offsets(todo)], world.FRAMES,
                           **options)
        rows += [measure(c, v, im) | {"seed": noise_seed} for c, v, im in zip(todo, sampled, images)]
        if k == 0:
            videos = sampled  # the pictures show the first seed
    summary = summarize(rows) | {"model": str(model_dir), "steps": steps, "guidance": guidance, "seed": seed,
                                 "seeds": seeds, "strength": strength}
    out = Path(out)
    shown = [i for i, c in enumerate(todo) if c["preset"] == "moderate" and c["kind"] in ("direction", "still")]
    _sheet(out / "sheet.png", videos[shown], images[shown])
    media.write_gif(out / "grid.gif", gif_grid(videos[shown], columns=5), fps=4)
    conflict = [i for i, c in enumerate(todo) if c["kind"] == "conflict"]
    _sheet(out / "sheet_text_vs_eye.png", videos[conflict], images[conflict])
    if long_frames:
        long = _of_combinations(long_cases(seed), limit)
        long_images = np.stack([first_frame(c["clip"]) for c in long])
        long_videos = _animate(model_dir, long, long_images, [seed + i for i in range(len(long))], long_frames,
                               context_length=world.FRAMES, context_stride=CONTEXT_STRIDE, **options)
        long_rows = [measure(c, v, im, at=min(LONG_HORIZON, long_frames - 1))
                     for c, v, im in zip(long, long_videos, long_images)]
        summary["long"] = summarize_long(long_rows)
        _sheet(out / "sheet_long.png", long_videos[:, ::4], long_images)
        media.write_gif(out / "grid_long.gif", gif_grid(long_videos, columns=4), fps=8)
        rows += long_rows
    _write_json(out / "cases.json", rows)
    _write_json(out / "metrics.json", summary)
    return summary


def add_arguments(p):
    p.add_argument("--model", required=True, help="a toy model directory (e.g. models/toy)")
    p.add_argument("--out", required=True, help="folder for metrics.json, cases.json, sheet.png, grid.gif")
    p.add_argument("--steps", type=int, default=25, help="DDIM steps")
    p.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, default=SEEDS,
                   help="noise seeds per case (seed + 1000 k): one seed's 32 direction cases spread by +-8 %%")
    p.add_argument("--strength", type=float, default=1.0,
                   help="< 1: start from the image noised part way (the reference's 'noise from image' option)")
    p.add_argument("--limit", type=int, help="only the first N held-out combinations (a quick check)")
    p.add_argument("--long-frames", type=int, default=LONG_FRAMES,
                   help=f"frames of the long-video cases (0: none; at least {LONG_HORIZON + 1})")


def main(args) -> int:
    if min(args.steps, args.seeds) < 1 or (args.limit is not None and args.limit < 1):
        print("error: --steps, --seeds and --limit must be at least 1", file=sys.stderr)
        return 2
    if not 0 < args.strength <= 1:
        print(f"error: --strength must be in (0, 1], got {args.strength}", file=sys.stderr)
        return 2
    if args.long_frames and args.long_frames <= LONG_HORIZON:
        print(f"error: --long-frames must be 0 or more than {LONG_HORIZON}", file=sys.stderr)
        return 2
    summary = evaluate(args.model, args.out, steps=args.steps, guidance=args.guidance, seed=args.seed,
                       limit=args.limit, long_frames=args.long_frames, strength=args.strength, seeds=args.seeds)
    print(json.dumps(summary, indent=1))
    return 0
