"""A second process after a first: what the persistent compilation cache and the stored executables save.

    python -m bench.restart [--part sample|train|both] [--model DIR --frames N --size S]

sample: the README's toy command (`models/toy`, or --model) three times in fresh processes on one new cache folder: cold
(compiles and stores), warm (loads the stored executables: no tracing, lowering or compiling), and warm with the
stored executables deleted (jax's own cache only: traces and lowers, then loads XLA's result).
train: train.py on the tiny model, 2 steps cold, then resumed to 4 (loads the stored step), then to 6 with the
stored step deleted (jax's cache only). Prints one JSON line per run: wall seconds, the run's own compile/load line,
and how many entries jax's cache gained (a miss writes one).
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STORE = "pia_jax_executables"  # pia_jax.compiled.store.FOLDER (kept literal: this script imports no jax)
SAMPLE = ["sample.py", "--image", "docs/toy/image.png", "--prompt", "a green cross moves right on a gray background",
          "--negative-prompt", "", "--guidance", "4"]
TRAIN = ["train.py", "configs/one_gpu.yaml", "model.init=tiny", "model.compute_dtype=fp32", "data.path=null",
         "data.synthetic=true", "data.n_frames=2", "data.resolution=32", "data.batch_size=1", "data.workers=1",
         "optim.grad_accum=1", "checkpoint.every=2", "log.every=1"]


def run(name: str, command: list[str], cache: Path, pattern: str, env: dict):
    before = {p.name for p in cache.glob("*")} if cache.exists() else set()
    start = time.perf_counter()
    out = subprocess.run([sys.executable, *command], env=env, check=True, capture_output=True, text=True).stdout
    wall = time.perf_counter() - start
    line = next((m.group(0) for m in re.finditer(pattern, out)), "")
    added = len({p.name for p in cache.glob("*")} - before - {STORE})
    print(json.dumps({"run": name, "wall_s": round(wall, 1), "line": line.strip(), "jax_cache_entries_added": added}),
          flush=True)


def sample(tmp: Path, model: str, frames: int, size: int | None):
    cache = tmp / "sample_cache"
    env = dict(os.environ, PIA_JAX_CACHE_DIR=str(cache))
    command = [*SAMPLE, "--model", model, "--frames", str(frames), "--out", str(tmp / "video.gif"),
               *(["--size", str(size)] if size else [])]
    for name in ("sample cold", "sample warm (stored executables)", "sample warm (jax cache only)"):
        if "jax cache only" in name:
            shutil.rmtree(cache / STORE)
        run(name, command, cache, r"compile [\d.]+s.*", env)


def train(tmp: Path):
    cache = tmp / "train_cache"
    command = [*TRAIN, f"workdir={tmp / 'run'}", f"compilation_cache={cache}"]
    for steps, name in ((2, "train cold"), (4, "train resume (stored step)"), (6, "train resume (jax cache only)")):
        if "jax cache only" in name:
            shutil.rmtree(cache / STORE)
        run(name, [*command, f"steps={steps}"], cache, r"(compiled the|loaded the stored) step in [\d.]+ s", os.environ)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=("sample", "train", "both"), default="both")
    p.add_argument("--model", default="models/toy", help="sample: a model directory (a converted SD1.5 PIA on a GPU)")
    p.add_argument("--frames", type=int, default=8, help="sample: frames (16 for the GPU target)")
    p.add_argument("--size", type=int, help="sample: the short side (512 for the GPU target; default the model's)")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if a.part in ("sample", "both"):
            sample(Path(tmp), a.model, a.frames, a.size)
        if a.part in ("train", "both"):
            train(Path(tmp))


if __name__ == "__main__":
    main()
