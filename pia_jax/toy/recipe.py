"""The whole toy recipe, stage by stage, with the project's own commands; each stage is skipped once its output
exists, and the training stages resume from their checkpoints, so an interrupted run continues where it stopped.

    world  videos + CSV (world.py)                       -> OUT/world/train.csv
    data   prepare_dataset.py csv                        -> OUT/data
    init   random TOY weights + the grammar's tokenizer  -> OUT/init
    vae    train.py configs/toy/vae.yaml                 -> OUT/vae/model
    t2i    train.py configs/toy/t2i.yaml                 -> OUT/t2i/model     (the frozen base of PIA)
    motion train.py configs/toy/motion.yaml              -> OUT/motion/model  (AnimateDiff's motion modules)
    pia    train.py configs/toy/pia.yaml                 -> OUT/pia/model     (the animator)
    eval   python -m pia_jax.toy evaluate                -> OUT/eval
"""

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

from pia_jax import files
from pia_jax.toy import world

REPO = Path(__file__).resolve().parents[2]
STAGES = ("world", "data", "init", "vae", "t2i", "motion", "pia", "eval")
TRAINED = ("vae", "t2i", "motion", "pia")  # the train.py stages, each from the one before
CLIPS = 3000
# Velocity targets weigh x0's error by 1 + SNR at every t, where epsilon targets give the high-noise steps that
# place the image and choose the motion almost no weight (docs/toy/EVAL.md).
PREDICTION = "v_prediction"


def write_init(path, seed: int = 0, model_config=None, prediction_type: str = PREDICTION) -> Path:
    """A model directory of the TOY architecture (or `model_config`) with freshly initialised weights (zero
    motion-module outputs, as AnimateDiff starts), a tokenizer whose vocabulary holds every caption word as one
    token, and PIA's DDIM scheduler with `prediction_type`, which every stage trains for and the sampler reads.

    The text encoder stays random and frozen in every stage, as CLIP is frozen in SD and PIA: its residual stream
    keeps each word's random embedding distinguishable, and the UNet's cross-attention learns to read it; training
    it as well would add a moving target to a short CPU budget."""
    import tempfile

    from flax import nnx

    from pia_jax.models import config
    from pia_jax.models.text_encoder import CLIPTextModel
    from pia_jax.models.unet import UNetMotionModel
    from pia_jax.models.vae import AutoencoderKL
    from pia_jax.sampling import schedulers
    from pia_jax.toy.vocab import write_tokenizer
    from pia_jax.weights import model_dir

    cfg, rngs = model_config or config.TOY, nnx.Rngs(seed)
    models = {"unet": UNetMotionModel(cfg.unet, rngs=rngs), "vae": AutoencoderKL(cfg.vae, rngs=rngs),
              "text_encoder": CLIPTextModel(cfg.text, rngs=rngs)}
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = write_tokenizer(Path(tmp) / "tokenizer", world.vocabulary())
        return model_dir.save_model_dir(path, cfg, models, tokenizer=tokenizer,
                                        scheduler=schedulers.to_dict(dataclasses.replace(
                                            schedulers.PIA_DDIM, prediction_type=prediction_type)), force=True)


def _run(args: list, log: Path):
    """Runs a command line (under this Python) with its output appended to `log`; raises if it fails."""
    with open(log, "a") as f:
        f.write(f"$ {' '.join(map(str, args))}\n")
        f.flush()
        code = subprocess.call([sys.executable, *map(str, args)], cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    if code:
        raise RuntimeError(f"{' '.join(map(str, args[:2]))} failed with exit code {code}; see {log}")


def train_stage(out: Path, stage: str, start: Path, overrides=()):
    _run([REPO / "train.py", REPO / "configs" / "toy" / f"{stage}.yaml", f"workdir={out / stage}",
          f"model.model_dir={start}", f"data.path={out / 'data'}", *overrides], out / f"{stage}.log")


def train(out, *, clips: int = CLIPS, overrides: dict | None = None, evaluate_args=(), log=print) -> dict:
    """Runs every stage not yet done under `out`; `overrides` maps a training stage to extra `key=value`s.
    Returns (and keeps in OUT/timings.json) the wall time of each stage run now, in seconds."""
    out = Path(out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    overrides = overrides or {}
    timings_file = out / "timings.json"
    timings = json.loads(timings_file.read_text()) if timings_file.exists() else {}
    done = {
        "world": lambda: (out / "world" / "train.csv").exists(),
        "data": lambda: any((out / "data").glob("pia_videos/*/dataset_info.json")),
        "init": lambda: (out / "init" / "config.json").exists(),
        **{stage: (lambda stage=stage: (out / stage / "model" / "config.json").exists()) for stage in TRAINED},
        "eval": lambda: (out / "eval" / "metrics.json").exists(),
    }
    run = {
        "world": lambda: world.write_world(out / "world", clips),
        "data": lambda: _run([REPO / "prepare_dataset.py", "csv", "--csv", out / "world" / "train.csv", "--out",
                              out / "data", "--min-frames", world.FRAMES, "--workers", 2], out / "data.log"),
        "init": lambda: write_init(out / "init"),
        **{stage: (lambda stage=stage, start=start: train_stage(out, stage, start, overrides.get(stage, ())))
           for stage, start in zip(TRAINED, (out / "init", *(out / s / "model" for s in TRAINED[:-1])))},
        "eval": lambda: _run(["-m", "pia_jax.toy", "evaluate", "--model", out / "pia" / "model", "--out",
                              out / "eval", *evaluate_args], out / "eval.log"),
    }
    for stage in STAGES:
        if done[stage]():
            log(f"{stage}: done already")
            continue
        log(f"{stage}: running")
        start = time.perf_counter()
        run[stage]()
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start
        with files.atomic_write(timings_file) as tmp:  # complete or not at all: a kill keeps the last one
            Path(tmp).write_text(json.dumps(timings, indent=1) + "\n")
        log(f"{stage}: {timings[stage]:.0f} s")
    return timings
