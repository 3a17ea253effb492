"""The latent cache: VAE posteriors of clips drawn once, at preparation, so that the training step has no VAE encode.

`prepare_dataset.py ... --latents MODEL_DIR` keeps every record of the dataset (video bytes, caption, ...) and adds,
per video, `--latent-clips N` clips, each drawn with the pixel path's own random draws (`clips.draw` from
`clip_rng(seed, key, j)`: window indices and flip) and made exactly as the pixel path makes a clip
(`clips.transform_clip`, float32, not rounded to uint8), stored as

    latent_mean, latent_logvar  (N, F, h, w, 4)  the VAE posterior of every frame (fp32, or bf16/fp16: --latent-dtype)
    latent_scores               (N, F, F) float64  scores[f, c] = affinity score of frame f against condition frame c
                                (`affinity_scores.score_matrix`: `frame_scores` of the augmented clip, bit for bit)
    latent_indices (N, F) int64, latent_flip (N,) bool   what was drawn (to trace a clip to its frames)

With `data.latents=true` the loader draws one of a video's cached clips, then the condition frame, caption dropout
and condition dropout as the pixel path draws them (`draw_latent`), and affinity = affinity_from_scores(
scores[:, cond], cond), the value `make_example` computes for that clip and condition frame. The batch carries
latent_mean and latent_logvar instead of pixel_values; the step samples the posterior from them with the pixel
path's noise draw (times the scaling factor), so the objective is unchanged and only the encode moves to preparation.

Size per clip: 2 x F x h x w x 4 values; at 16 frames of 256² (h = w = 32) that is 512 KiB in fp32 and 256 KiB in
bf16/fp16, so N = 4 clips add 2 MiB (1 MiB) per video, about what a WebVid video's own bytes take.

The trade-off, the standard one of latent caches:
  * each cached clip is fixed: a video offers N windows and flips instead of a fresh random one every epoch, and
    changing the clip shape (n_frames, stride, resolution, flip) or the VAE means preparing again (a run refuses a
    cache made for other clips or another VAE: `check`);
  * preparation encodes N clips per video, so the cache saves VAE work only where training visits each video more
    than N times; its other gain is the training step itself (no encoder in the compiled step: fewer FLOPs and
    less memory per step, no decoding or resizing on the training hosts);
  * a record is read whole: the loader reads the video bytes with the latents (I/O only, nothing is decoded);
  * the latents are encoded in float32 (JAX's default matmul precision: TF32 convolutions on recent NVIDIA GPUs
    unless JAX_DEFAULT_MATMUL_PRECISION=highest), at least as exact as the step's own encode in its compute dtype.
"""

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import ml_dtypes
import numpy as np

from pia_jax.data.clips import DataConfig, draw, transform_clip
from pia_jax.data.video import decode_frames
from pia_jax.models import config as model_config

DTYPES = {"fp32": np.float32, "bf16": ml_dtypes.bfloat16, "fp16": np.float16}
FEATURES = ("latent_mean", "latent_logvar", "latent_scores", "latent_indices", "latent_flip")
CLIP_FIELDS = ("n_frames", "stride", "resolution", "flip")  # DataConfig fields the cached clips were made with


class LatentMismatch(ValueError):
    """A latent cache that cannot serve this run (none there, other clips, another VAE)."""


@dataclass(frozen=True)
class LatentSpec:
    """How a latent cache is made: by which model directory's VAE, how many clips per video, of which shape."""
    model_dir: str
    clips: int = 4
    dtype: str = "fp32"
    seed: int = 0
    n_frames: int = 16
    stride: int = 4
    resolution: int = 256
    flip: bool = True
    encode_batch: int = 32  # frames per VAE call (does not change the result)

    def data_config(self) -> DataConfig:
        return DataConfig(n_frames=self.n_frames, stride=self.stride, resolution=self.resolution, flip=self.flip)


def vae_identity(model_dir) -> dict:
    """{"vae": the VAE config (scaling factor included) as JSON data, "vae_sha256": of vae.safetensors}: what a
    latent cache records of its VAE and `check` compares with the model a run trains."""
    from pia_jax.weights.model_dir import read_config, sha256
    config, _, _ = read_config(model_dir)
    return {"vae": json.loads(json.dumps(asdict(config.vae))),
            "vae_sha256": sha256(Path(model_dir) / "vae.safetensors")}


def latent_shape(spec: LatentSpec, vae: dict) -> tuple[int, int, int, int]:
    """(F, h, w, channels) of a cached clip; `vae`: the VAE config as JSON data (`vae_identity`)."""
    config = model_config.from_dict(model_config.VAEConfig, vae)
    side = spec.resolution // config.latent_factor
    return spec.n_frames, side, side, config.latent_channels


def describe(spec: LatentSpec, identity: dict | None = None) -> dict:
    """The dataset metadata entry `latents` (also the latent part of the preparation's inputs)."""
    identity = identity or vae_identity(spec.model_dir)
    shape = latent_shape(spec, identity["vae"])
    return {"model_dir": str(Path(spec.model_dir).resolve()), "clips": spec.clips, "dtype": spec.dtype,
            "seed": spec.seed, **{k: getattr(spec, k) for k in CLIP_FIELDS}, **identity, "latent_shape": list(shape),
            "bytes_per_clip": int(2 * np.prod(shape) * np.dtype(DTYPES[spec.dtype]).itemsize)}


def clip_rng(seed: int, key: str, clip: int) -> np.random.Generator:
    """The generator of cached clip `clip` of the video `key` (its dataset key): the same clips whatever the
    preparation's --limit, --part or worker count."""
    digest = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little")
    return np.random.default_rng([seed, digest, clip])


def draw_clips(record: dict, spec: LatentSpec) -> dict:
    """The cached clips of one record (`video`, `key`, `num_frames`, `pts`) before encoding: pixels (N, F, S, S, 3)
    float32 in [-1, 1], and the latent_scores, latent_indices, latent_flip features. Raises VideoError."""
    from pia_jax.data.affinity_scores import score_matrix  # needs OpenCV

    config, pixels, scores, indices, flips = spec.data_config(), [], [], [], []
    for j in range(spec.clips):
        d = draw(int(record["num_frames"]), config, clip_rng(spec.seed, record["key"], j))
        clip = transform_clip(decode_frames(record["video"], d.indices, record.get("pts")), d.flip, spec.resolution)
        pixels.append(clip)
        scores.append(score_matrix((clip / 2 + 0.5) * 255))  # as make_example scores the augmented clip
        indices.append(d.indices)
        flips.append(d.flip)
    return {"pixels": np.stack(pixels), "latent_scores": np.stack(scores),
            "latent_indices": np.stack(indices).astype(np.int64), "latent_flip": np.array(flips, bool)}


class Encoder:
    """The VAE of a model directory, jit-compiled: float32 frames in [-1, 1] -> posterior (mean, logvar) float32,
    `batch` frames per call (the last call padded, so one program serves all)."""

    def __init__(self, model_dir, batch: int = 32):
        import jax
        from flax import nnx

        from pia_jax.weights.model_dir import load_model_dir
        md = load_model_dir(model_dir, parts=("vae",), tokenizer=False)
        graph, state = nnx.split(md.vae)
        self._state, self.batch = state, batch
        self._fn = jax.jit(lambda s, x: nnx.merge(graph, s).encode(x))

    def __call__(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n, means, logvars = len(frames), [], []
        for start in range(0, n, self.batch):
            chunk = frames[start:start + self.batch]
            padded = np.concatenate([chunk, np.zeros((self.batch - len(chunk),) + chunk.shape[1:], chunk.dtype)])
            mean, logvar = self._fn(self._state, padded)
            means.append(np.asarray(mean, np.float32)[:len(chunk)])
            logvars.append(np.asarray(logvar, np.float32)[:len(chunk)])
        return np.concatenate(means), np.concatenate(logvars)


def encode_clips(clips: dict, encoder: Encoder, dtype: str) -> dict:
    """`draw_clips`' output -> the record's latent features (pixels replaced by latent_mean, latent_logvar)."""
    pixels = clips.pop("pixels")
    mean, logvar = encoder(pixels.reshape((-1,) + pixels.shape[2:]))
    shape = pixels.shape[:2] + mean.shape[1:]
    return {"latent_mean": mean.reshape(shape).astype(DTYPES[dtype]),
            "latent_logvar": logvar.reshape(shape).astype(DTYPES[dtype]), **clips}


def check(metadata: list[tuple[str, dict]], data: DataConfig, model_dir: str | None) -> dict:
    """Raises LatentMismatch unless every dataset part (folder, metadata.json) holds latents made for this run's
    clips (data.n_frames, stride, resolution, flip) by this run's VAE (the model directory's VAE config, scaling
    factor included, and vae.safetensors' sha256). Reads no weights but hashes vae.safetensors. Returns the first
    part's latent metadata."""
    if not model_dir:
        raise LatentMismatch("data.latents=true needs model.model_dir: cached latents must come from the VAE of the "
                             "model trained (random weights, model.init, have no such VAE)")
    ours = vae_identity(model_dir)
    first = None
    for folder, meta in metadata:
        lat = meta.get("latents")
        if not lat:
            raise LatentMismatch(f"data.latents=true, but the dataset {folder} holds no cached latents: prepare it "
                                 "with prepare_dataset.py --latents MODEL_DIR, or train on pixels (data.latents=false)")
        problems = [f"data.{k}={getattr(data, k)!r} but the latents were made with {k}={lat.get(k)!r}"
                    for k in CLIP_FIELDS if lat.get(k) != getattr(data, k)]
        problems += [f"VAE {k}: {v!r} in model.model_dir, {lat['vae'].get(k)!r} in the latents' VAE"
                     for k, v in ours["vae"].items() if lat["vae"].get(k) != v]
        if not problems and lat["vae_sha256"] != ours["vae_sha256"]:
            problems.append(f"the VAE weights differ (vae.safetensors sha256 {ours['vae_sha256'][:16]}... in "
                            f"{model_dir}, {lat['vae_sha256'][:16]}... in {lat.get('model_dir')}, which made them)")
        if problems:
            raise LatentMismatch(f"the latents cached in {folder} do not fit this run: " + "; ".join(problems) +
                                 f". Prepare them again (prepare_dataset.py --latents {model_dir} --n-frames "
                                 f"{data.n_frames} --stride {data.stride} --resolution {data.resolution}"
                                 f"{'' if data.flip else ' --no-flip'}) or train on pixels (data.latents=false)")
        first = first or lat
    return first


class LatentDraws(NamedTuple):
    clip: int
    cond_frame: int
    drop_caption: bool
    use_condition: bool


def draw_latent(num_clips: int, config: DataConfig, rng: np.random.Generator) -> LatentDraws:
    """Every random choice of one example from a latent cache, in a fixed order: the cached clip (uniform), then the
    condition frame, caption dropout and condition dropout as `clips.draw` makes them."""
    return LatentDraws(int(rng.integers(0, num_clips)), int(rng.integers(0, config.n_frames)),
                       bool(rng.random() < config.caption_dropout), bool(rng.random() >= config.condition_dropout))


def make_latent_example(record: dict, config: DataConfig, rng: np.random.Generator) -> dict:
    """One example from a record with cached latents: latent_mean, latent_logvar (F, h, w, 4) at their stored
    dtype, caption, affinity (F,) float32, cond_frame, use_condition (as `clips.make_example`, without decoding)."""
    from pia_jax.data.affinity_scores import affinity_from_scores

    d = draw_latent(len(record["latent_mean"]), config, rng)
    if d.use_condition:
        scores = record["latent_scores"][d.clip]
        affinity = affinity_from_scores(scores[:, d.cond_frame], d.cond_frame, sim_range=config.sim_range)
    else:
        affinity = np.zeros(config.n_frames, np.float32)
    return {"latent_mean": record["latent_mean"][d.clip], "latent_logvar": record["latent_logvar"][d.clip],
            "caption": "" if d.drop_caption else record["caption"], "affinity": affinity,
            "cond_frame": d.cond_frame, "use_condition": d.use_condition}
