"""The AnimateBench-style runner: cases from a folder, videos sampled (or read), scored, and reported.

    <bench>/img/<style>/<image>.png|jpg      the input images, one folder per style (personalized model)
    <bench>/configs/<style>.yaml             the cases of the style, in either form:
        cases: [{image: 1.png, prompts: [...], seed: 42, negative_prompt: ...}, ...]   (seed/negative_prompt may
                                                                                       also be given at the top)
        or PIA's example-config keys, one image per file: prompts (a list, or a list of lists),
        n_prompt, validation_data.input_name (the image's stem), generate.global_seed

A case is one image and one prompt; it is named `<style>/<image stem>-<prompt index>`. Each case is animated with
every affinity preset asked for (same image, prompt and seed), all presets of a case in one batch.
"""

import csv
import dataclasses
import math
from pathlib import Path

import numpy as np
import yaml

from pia_jax import files, media
from pia_jax.eval import motion
from pia_jax.eval.sheet import write_contact_sheet
from pia_jax.eval.video import VIDEO_SUFFIXES, read_video
from pia_jax.sampling import affinity

DEFAULT_SEED = 42
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
SUMMARY = (  # (CSV column, markdown header)
    ("image_alignment_scaled", "image align. (x250)"), ("text_alignment_scaled", "text align. (x250)"),
    ("frame_consistency_scaled", "consistency (x250)"), ("image_alignment", "image cos"),
    ("text_alignment", "text cos"), ("dynamic", "dynamic degree"), ("flow_mean", "flow (px)"),
    ("psnr", "PSNR (dB)"), ("ssim", "SSIM"), ("controllability", "controllability"))
PSNR_CAP = 100.0  # identical frames have infinite PSNR; averages count them as 100 dB


class BenchError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class Case:
    style: str
    image: Path
    prompt_index: int
    prompt: str
    negative_prompt: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.image.stem}-{self.prompt_index}"


def _find_image(folder: Path, stem: str) -> Path:
    hits = [p for p in sorted(folder.glob(f"{stem}.*")) if p.suffix.lower() in IMAGE_SUFFIXES]
    if not hits:
        raise BenchError(f"no image {stem}.* ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return hits[0]


def read_cases(bench) -> list[Case]:
    """Every case of a bench folder, in style then file order; the images must exist."""
    from pia_jax.sampling import DEFAULT_NEGATIVE_PROMPT

    bench = Path(bench)
    files = sorted((bench / "configs").glob("*.yaml")) + sorted((bench / "configs").glob("*.yml"))
    if not files:
        raise BenchError(f"no case files: expected {bench}/configs/<style>.yaml (and images in {bench}/img/<style>/)")
    cases = []
    for file in files:
        style, folder = file.stem, bench / "img" / file.stem
        try:
            doc = yaml.safe_load(file.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise BenchError(f"cannot read {file}: {e}") from None
        if not isinstance(doc, dict):
            raise BenchError(f"{file}: expected a mapping")
        if "cases" in doc:
            entries = doc["cases"]
            seed, negative = doc.get("seed", DEFAULT_SEED), doc.get("negative_prompt", DEFAULT_NEGATIVE_PROMPT)
        else:  # PIA's example config
            prompts = doc.get("prompts") or []
            prompts = [p for group in prompts for p in (group if isinstance(group, list) else [group])]
            stem = (doc.get("validation_data") or {}).get("input_name")
            negative = (doc.get("n_prompt") or [DEFAULT_NEGATIVE_PROMPT])[0]
            seed = (doc.get("generate") or {}).get("global_seed", DEFAULT_SEED)
            entries = [{"image": _find_image(folder, str(stem)).name, "prompts": prompts}] if stem else []
        if not isinstance(entries, list) or not entries:
            raise BenchError(f"{file}: expected a non-empty 'cases:' list, or PIA's 'prompts:' and "
                             "'validation_data: {input_name: ...}'")
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or "image" not in entry or not (entry.get("prompts") or entry.get("prompt")):
                raise BenchError(f"{file}: case {i} needs 'image' and 'prompts' (or 'prompt')")
            image = folder / str(entry["image"])
            if not image.is_file():
                raise BenchError(f"{file}: case {i}: image {image} not found")
            prompts = entry.get("prompts") or [entry["prompt"]]
            for p, prompt in enumerate(prompts if isinstance(prompts, list) else [prompts]):
                cases.append(Case(style, image, p, str(prompt), str(entry.get("negative_prompt", negative)),
                                  int(entry.get("seed", seed))))
    return cases


def read_model_map(path) -> dict[str, Path]:
    """{style: model directory} from a YAML mapping; relative paths are relative to the file."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise BenchError(f"cannot read the model map {path}: {e}") from None
    if not isinstance(doc, dict) or not doc:
        raise BenchError(f"{path}: expected a mapping style: model directory")
    return {str(k): (Path(v) if Path(v).is_absolute() else path.parent / v) for k, v in doc.items()}


# ---------------------------------------------------------------------------------------------------------------
# Existing videos: <videos>/<style>/<case>-<preset>.<ext>, or <case>.<ext> for the main preset; a folder of frame
# images in place of a file also counts.

def find_video(folder: Path, case: Case, preset: str, main: bool) -> Path | None:
    names = [f"{case.name}-{preset}"] + ([case.name] if main else [])
    for name in names:
        for suffix in VIDEO_SUFFIXES:
            if (folder / case.style / f"{name}{suffix}").is_file():
                return folder / case.style / f"{name}{suffix}"
        if (folder / case.style / name).is_dir():
            return folder / case.style / name
    return None


# ---------------------------------------------------------------------------------------------------------------
# The run

@dataclasses.dataclass
class BenchOptions:
    frames: int = 16
    steps: int = 25
    guidance: float = 7.5
    size: int = 512
    motion: str = "small"  # the preset whose videos the summary scores (PIA's example configs use preset 0)
    presets: tuple[str, ...] = ("small", "moderate", "large")  # for controllability; `motion` is added if missing
    devices: int | None = None  # local devices to sample on (default all)


def run_bench(cases: list[Case], out: Path, options: BenchOptions, *, scorer=None, models: dict | None = None,
              videos: Path | None = None, log=print) -> list[dict]:
    """Samples (with `models`: {style: model directory}) or reads (from `videos`) every case's videos, scores
    them, and writes into `out`: scores.csv, summary.md, sheets/<style>/<case>.png, motion.png, and with sampling
    videos/<style>/<case>-<preset>.gif. Returns the CSV rows."""
    from pia_jax.eval.scores import score_video

    presets = list(dict.fromkeys([options.motion, *options.presets]))
    requested = {p: motion.requested_motion(affinity.preset_affinity(p, options.frames)) for p in presets}
    rows, curves = [], []
    for case in cases:
        image = media.load_image(case.image)
        clips, fps = (_sample(case, image, presets, options, models[case.style], out) if videos is None else
                      _read(case, presets, options.motion, videos))
        # sampled videos are compared with the very pixels they were conditioned on
        condition = media.preprocess_image(image, options.size) if videos is None else None
        case_rows = []
        for p, clip in clips.items():
            scores = score_video(scorer, clip, image, case.prompt, condition=condition, fps=fps[p])
            case_rows.append({"style": case.style, "case": case.name, "prompt": case.prompt, "seed": case.seed,
                              "motion": p, "main": int(p == options.motion), "requested_motion": requested[p],
                              **scores})
        measured = [r["flow_mean"] for r in case_rows]
        control = (motion.controllability([r["requested_motion"] for r in case_rows], measured)
                   if len(case_rows) >= 2 else float("nan"))
        for r in case_rows:
            r["controllability"] = control
        curves.append((case, [r["requested_motion"] for r in case_rows], measured))
        rows += case_rows
        write_contact_sheet(out / "sheets" / case.style / f"{case.name}.png", [image] * len(clips),
                            list(clips.values()), columns=8)
        log(f"{case.style}/{case.name}: " + ", ".join(f"{r['motion']} flow {r['flow_mean']:.2f}" for r in case_rows)
            + f"; controllability {control:.2f}")
    write_csv(out / "scores.csv", rows)
    with files.atomic_write(out / "summary.md") as tmp:
        Path(tmp).write_text(summary_markdown(rows))
    plot_motion(out / "motion.png", curves)
    return rows


def _sample(case: Case, image, presets, options: BenchOptions, model, out: Path) -> tuple[dict, dict]:
    """({preset: uint8 video}, {preset: fps}) sampled; each video is also saved as
    out/videos/<style>/<case>-<preset>.gif."""
    from pia_jax.eval.animate import animate
    from pia_jax.sampling import SampleOptions

    affinities = np.stack([affinity.preset_affinity(p, options.frames) for p in presets])
    n = len(presets)  # one batch: the same image, prompt and seed with each preset
    made = animate(model, [media.preprocess_image(np.asarray(image), options.size)] * n, [case.prompt] * n, affinities,
                   [case.seed] * n, SampleOptions(steps=options.steps, guidance_scale=options.guidance),
                   negative_prompt=case.negative_prompt, devices=options.devices)
    clips = dict(zip(presets, made))
    for p, clip in clips.items():
        media.write_gif(out / "videos" / case.style / f"{case.name}-{p}.gif", clip)
    return clips, {p: 8.0 for p in presets}


def _read(case: Case, presets, main: str, videos: Path) -> tuple[dict, dict]:
    """({preset: uint8 video}, {preset: fps}) of the existing videos of a case (the presets found)."""
    read = {p: read_video(f) for p in presets if (f := find_video(videos, case, p, p == main)) is not None}
    return {p: v[0] for p, v in read.items()}, {p: v[1] for p, v in read.items()}


def write_csv(path: Path, rows: list[dict]):
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with files.atomic_write(path) as tmp, open(tmp, "w", newline="") as f:  # complete or not at all
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)


def _mean(values) -> float:
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def summary_markdown(rows: list[dict]) -> str:
    """Per style and overall means over the main-preset videos (controllability: over cases)."""
    main = [r for r in rows if r["main"]]
    columns = [(k, h) for k, h in SUMMARY if any(k in r for r in main)]
    lines = ["| style | videos | " + " | ".join(h for _, h in columns) + " |", "|---" * (len(columns) + 2) + "|"]
    groups = [(s, [r for r in main if r["style"] == s]) for s in dict.fromkeys(r["style"] for r in main)]
    for style, group in groups + [("**all**", main)]:
        cells = [f"{_mean([min(r[k], PSNR_CAP) if k == 'psnr' else r[k] for r in group]):.4g}" for k, _ in columns]
        lines.append(f"| {style} | {len(group)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_motion(path: Path, curves):
    """Measured flow against the motion each preset asks for (1 - mean affinity), one line per case."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    styles = list(dict.fromkeys(case.style for case, _, _ in curves))
    colours = plt.get_cmap("tab10")
    for case, x, y in curves:
        order = np.argsort(x)
        ax.plot(np.asarray(x)[order], np.asarray(y)[order], "o-", color=colours(styles.index(case.style) % 10),
                alpha=0.6, label=case.style)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=7)
    ax.set_xlabel("requested motion: 1 - mean affinity of the preset")
    ax.set_ylabel("measured mean optical flow (px / frame)")
    ax.set_title("affinity controllability")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
