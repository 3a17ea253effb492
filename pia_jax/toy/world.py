"""The toy world: one coloured shape on a plain background, doing one motion per clip, with a caption.

    a red circle moves left slowly on a gray background

Everything is a pure function of a seed. A clip is a `Clip` (what is where, how it moves); `render` draws its
frames anti-aliased (coverage from 4x4 supersampling) at RENDER_SIZE; training sees them at TRAIN_SIZE after the
data loader's antialiased resize, as real videos are. Sizes are chosen for two CPU cores: 32x32 pixels and 8
frames are the issue's minimum and still show a ~10 px object moving up to ~17 px; videos are written at 64x64 so
H.264's half-resolution chroma (yuv420p) is still full resolution after the 2x downscale.

Speed words narrow the speed ("slowly" / "fast"); a caption without one covers the whole range, so the speed is
then known only from the frames, which is what PIA's affinity (computed from the frames' HSV differences) tells
the model. The held-out split is by (shape, colour, background): those combinations never appear in training,
though each of their words does.

Objects have an eye (a hole off centre) on the side they face, and a moving object faces where it goes, as cars
and animals do in real videos; a still, growing, shrinking or turning one faces any of the four ways (a turning
one's eye turns with it). Without it a single frame never depends on the direction word, so the text-to-image
base has no reason to encode it, and PIA's motion modules read the text only through that frozen base's features:
trained without the eye, the animator's loss did not depend on the direction word at all (docs/toy/EVAL.md).
An object moving in a direction also leaves a fading trail behind its heading (TRAIL copies of its shape), a cue
one to two latent pixels wide where the eye is about one, so a single frame shows which way it goes.
"""

import csv
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {"red": (225, 45, 45), "green": (45, 185, 65), "blue": (45, 90, 235), "yellow": (240, 205, 35),
           "purple": (160, 70, 215)}
BACKGROUNDS = {"black": (20, 20, 20), "white": (235, 235, 235), "gray": (125, 125, 125)}
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # image axes: y grows downwards
MOTIONS = (*DIRECTIONS, "grow", "shrink", "rotate", "still")
SPEEDS = ("slowly", "", "fast")  # "" = unspecified: any speed

FRAMES, RENDER_SIZE, TRAIN_SIZE, FPS = 8, 64, 32, 8
SUPERSAMPLE = 4
EYE_RADIUS, EYE_OFFSET = 0.35, 0.45  # object radii: a hole ~3.5 px wide at 32 px, about one latent pixel
TRAIL = (0.6, 0.45, 0.3, 0.15)  # opacities of the shape's copies spread over one radius behind a moving object
# Per-frame rates, canvas = 1 (x TRAIN_SIZE for pixels): (slowly, fast); unspecified = the whole range.
SHIFT = ((0.02, 0.035), (0.055, 0.075))  # 0.6-1.1 px and 1.8-2.4 px per frame at 32 px
SCALE = ((0.025, 0.04), (0.065, 0.085))  # log radius per frame
TURN = ((5.0, 9.0), (15.0, 22.0))  # degrees per frame
HELD_OUT = 8  # (shape, colour, background) combinations kept out of training
SPLIT_SEED = 20240531


@dataclass(frozen=True)
class Clip:
    shape: str
    colour: str
    background: str
    motion: str
    speed: str  # one of SPEEDS; "" for "still"
    x: float  # centre at frame 0, canvas units
    y: float
    radius: float
    angle: float  # degrees at frame 0
    rate: float  # canvas units, log radius or degrees per frame (signed for rotation)
    heading: str | None = None  # the side of the eye at frame 0 (a DIRECTIONS key); None: no eye

    def eye(self) -> tuple[float, float] | None:
        """The eye's centre in the object's own frame (radius 1), fixed to the object as it turns."""
        if self.heading is None:
            return None
        hx, hy = DIRECTIONS[self.heading]
        c, s = np.cos(np.deg2rad(self.angle)), np.sin(np.deg2rad(self.angle))
        return EYE_OFFSET * (c * hx + s * hy), EYE_OFFSET * (-s * hx + c * hy)

    @property
    def caption(self) -> str:
        verb = {"grow": "grows", "shrink": "shrinks", "rotate": "rotates", "still": "stays still"}.get(
            self.motion, f"moves {self.motion}")
        speed = f" {self.speed}" if self.speed else ""
        return f"a {self.colour} {self.shape} {verb}{speed} on a {self.background} background"

    def state(self, frame: int) -> tuple[float, float, float, float]:
        """(x, y, radius, angle) at `frame`."""
        dx, dy = DIRECTIONS.get(self.motion, (0, 0))
        x, y = self.x + dx * self.rate * frame, self.y + dy * self.rate * frame
        radius = self.radius * float(np.exp({"grow": 1, "shrink": -1}.get(self.motion, 0) * self.rate * frame))
        angle = self.angle + (self.rate * frame if self.motion == "rotate" else 0.0)
        return x, y, radius, angle


def vocabulary() -> list[str]:
    """Every word a caption can hold (the tokenizer gives each one token)."""
    words = ["a", "on", "background", "moves", "grows", "shrinks", "rotates", "stays", "still", "slowly", "fast"]
    return words + list(SHAPES) + list(COLOURS) + list(BACKGROUNDS) + list(DIRECTIONS)


def all_combinations() -> list[tuple[str, str, str]]:
    return [(s, c, b) for s in SHAPES for c in COLOURS for b in BACKGROUNDS]


def held_out_combinations() -> list[tuple[str, str, str]]:
    """The (shape, colour, background) triples never trained on: a fixed random choice."""
    combos = all_combinations()
    order = np.random.default_rng(SPLIT_SEED).permutation(len(combos))
    return sorted(combos[i] for i in order[:HELD_OUT])


def train_combinations() -> list[tuple[str, str, str]]:
    held = set(held_out_combinations())
    return [c for c in all_combinations() if c not in held]


def _range(table, speed: str) -> tuple[float, float]:
    return {"slowly": table[0], "fast": table[1], "": (table[0][0], table[1][1])}[speed]


def sample_clip(rng: np.random.Generator, combination, motion: str | None = None, speed: str | None = None) -> Clip:
    """A random clip of `combination` (shape, colour, background); the motion and speed are drawn unless given.
    The start is drawn so that the object stays inside the canvas on every frame."""
    shape, colour, background = combination
    motion = motion or MOTIONS[rng.integers(len(MOTIONS))]
    if motion == "rotate" and shape == "circle":  # a turning circle looks still
        motion = "still"
    speed = "" if motion == "still" else (SPEEDS[rng.integers(len(SPEEDS))] if speed is None else speed)
    radius, angle, rate = float(rng.uniform(0.13, 0.18)), float(rng.uniform(0, 90)), 0.0
    if motion in DIRECTIONS:
        rate = float(rng.uniform(*_range(SHIFT, speed)))
    elif motion in ("grow", "shrink"):
        rate = float(rng.uniform(*_range(SCALE, speed)))
        radius = float(rng.uniform(0.09, 0.12) if motion == "grow" else rng.uniform(0.2, 0.26))
    elif motion == "rotate":
        rate = float(rng.uniform(*_range(TURN, speed)) * rng.choice([-1, 1]))
    last = FRAMES - 1
    reach = radius * float(np.exp(rate * last)) if motion == "grow" else radius
    heading = motion if motion in DIRECTIONS else list(DIRECTIONS)[rng.integers(len(DIRECTIONS))]
    lo, hi = reach + 0.02, 1 - reach - 0.02  # centre limits for the largest extent
    dx, dy = DIRECTIONS.get(motion, (0, 0))
    travel = rate * last
    x = float(rng.uniform(lo + max(0, -dx) * travel, hi - max(0, dx) * travel))
    y = float(rng.uniform(lo + max(0, -dy) * travel, hi - max(0, dy) * travel))
    return Clip(shape, colour, background, motion, speed, x, y, radius, angle, rate, heading)


def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Whether object-frame points (u, v) (radius 1) are inside the shape."""
    if shape == "circle":
        return u * u + v * v <= 1
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if shape == "triangle":  # equilateral, circumradius 1: three half-planes at distance 1/2 from the centre
        inside = np.ones(u.shape, bool)
        for k in range(3):
            a = np.deg2rad(90 + 120 * k)
            inside &= u * np.cos(a) + v * np.sin(a) <= 0.5
        return inside
    if shape == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.3) & (av <= 0.9)) | ((au <= 0.9) & (av <= 0.3))
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render(clip: Clip, size: int = RENDER_SIZE, frames: int = FRAMES) -> np.ndarray:
    """uint8 (frames, size, size, 3): each pixel blends object and background colour by its covered fraction."""
    n = size * SUPERSAMPLE
    grid = (np.arange(n) + 0.5) / n  # sample points in canvas units
    gx, gy = np.meshgrid(grid, grid)
    fg, bg = (np.array(t, np.float32) for t in (COLOURS[clip.colour], BACKGROUNDS[clip.background]))
    out = np.empty((frames, size, size, 3), np.uint8)
    eye = clip.eye()
    # The trail lies behind the heading (the eye's side), so in the evaluation's text-vs-eye cases both image cues
    # point against the prompt.
    trail = TRAIL if clip.motion in DIRECTIONS and clip.heading is not None else ()
    back = -np.array(DIRECTIONS[clip.heading] if trail else (0, 0), np.float32)
    for f in range(frames):
        x, y, radius, angle = clip.state(f)
        c, s = np.cos(np.deg2rad(angle)), np.sin(np.deg2rad(angle))

        def shape_at(cx, cy):  # sample points inside the shape centred at (cx, cy), and their object-frame coords
            px, py = (gx - cx) / radius, (gy - cy) / radius
            u, v = c * px + s * py, -s * px + c * py
            return _inside(clip.shape, u, v), u, v

        body, u, v = shape_at(x, y)
        inside = body if eye is None else body & ((u - eye[0]) ** 2 + (v - eye[1]) ** 2 > EYE_RADIUS ** 2)
        cover = inside.astype(np.float32)
        for k, opacity in enumerate(trail, 1):  # copies k/len(trail) radii back, hidden by the body (eye included)
            offset = back * radius * k / len(trail)
            cover = np.maximum(cover, opacity * (shape_at(x + offset[0], y + offset[1])[0] & ~body))
        cover = cover.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean((1, 3))[..., None]
        out[f] = np.round(bg + cover * (fg - bg)).astype(np.uint8)
    return out


def train_clips(n: int, seed: int = 0) -> list[Clip]:
    """`n` training clips, motions balanced, from the training combinations only."""
    rng = np.random.default_rng([seed, 1])
    combos = train_combinations()
    return [sample_clip(rng, combos[rng.integers(len(combos))], MOTIONS[i % len(MOTIONS)]) for i in range(n)]


def write_world(out, n: int, seed: int = 0, crf: int = 12) -> Path:
    """Writes `n` training clips as MP4 files under out/videos, a CSV (path, caption) that prepare_dataset.py reads,
    and world.json (the clips' parameters and the held-out combinations). Returns the CSV path. Files already
    written are kept (the clips are a function of the seed), so an interrupted write resumes."""
    from pia_jax import files, media

    out = Path(out)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    clips = train_clips(n, seed)
    rows = []
    for i, clip in enumerate(clips):
        name = f"videos/{i:05d}.mp4"
        if not (out / name).exists():
            media.write_mp4(out / name, render(clip), fps=FPS, crf=crf)
        rows.append((name, clip.caption))
    info = {"seed": seed, "clips": [dataclasses.asdict(c) for c in clips],
            "held_out": held_out_combinations()}
    with files.atomic_write(out / "world.json") as tmp:  # complete or not at all, as train.csv, the mark
        Path(tmp).write_text(json.dumps(info) + "\n")
    with files.atomic_write(out / "train.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "caption"])
        writer.writerows(rows)
    return out / "train.csv"
