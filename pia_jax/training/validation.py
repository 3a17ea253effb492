"""Periodic validation videos: fixed (image, prompt) pairs animated with the weights being trained, through
`pia_jax.sampling.Animator` built from the trainer's models, written as GIFs to `{workdir}/validation/step_NNNNNNN/`,
and scored as evaluate.py scores videos (means logged to TensorBoard under `validation/`).

Every process samples on its own devices (weights gathered to each host; validation is rare and small) and
process 0 writes. One `Animator` per trainer is kept and given the new UNet weights each time, so its phases
compile once per run.
"""

import weakref

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from pia_jax import media
from pia_jax.sampling import affinity
from pia_jax.training.state import merge, weights_to_export

_ANIMATORS = weakref.WeakKeyDictionary()  # trainer -> its Animator
_SCORERS = {}  # CLIP model directory -> its scorer, loaded once


def validate(cfg, trainer, state, step: int, writer) -> None:
    from pia_jax.sampling import DEFAULT_NEGATIVE_PROMPT, Animator, SampleOptions

    v, setup = cfg.validation, trainer.setup
    if len(v.images) != len(v.prompts) or not v.images:
        raise ValueError(f"validation needs as many images as prompts (got {len(v.images)} and {len(v.prompts)})")
    if setup.tokenizer is None:
        raise ValueError("validation needs a model directory with a tokenizer (model.model_dir)")
    params = multihost_utils.process_allgather(weights_to_export(state), tiled=True)
    unet = merge(setup.graphs.unet, params, setup.frozen["unet"])
    animator = _ANIMATORS.get(trainer)
    if animator is None:
        animator = _ANIMATORS[trainer] = Animator(
            setup.config, unet, merge(setup.graphs.vae, setup.frozen["vae"]),
            merge(setup.graphs.text_encoder, setup.frozen["text_encoder"]), setup.tokenizer, setup.scheduler,
            jax.sharding.Mesh(np.array(jax.local_devices()), ("data",)), compile_cache_dir=None)  # jax's setting
    else:
        animator.update_unet(unet)
    size, n = cfg.data.resolution, len(v.images)
    images = np.stack([media.preprocess_image(media.load_image(p), height=size, width=size) for p in v.images])
    mask = np.stack([affinity.preset_coefficients(v.affinity, cfg.data.n_frames)] * n)
    options = SampleOptions(steps=v.steps, guidance_scale=v.guidance_scale)
    result = animator(images, list(v.prompts), [DEFAULT_NEGATIVE_PROMPT] * n, mask, options,
                      seeds=[v.seed + i for i in range(n)])
    if jax.process_index() == 0:
        out = epath.Path(cfg.workdir) / "validation" / f"step_{step:07d}"  # gs:// too; writers make parents
        for i, video in enumerate(result.videos):  # uint8 frames
            media.write_gif(out / f"{i}.gif", video)
        writer.log(f"validation: {n} videos in {out}")
        writer.scalars(step, scores(v, result.videos, images), force=True)


def scores(v, videos, images) -> dict:
    """Mean over the validation videos of evaluate.py's per-video scores (pia_jax.eval.scores.score_video): flow,
    dynamic degree, condition-frame PSNR/SSIM against the exact input pixels, and with `validation.clip` the CLIP
    alignment scores. An infinite PSNR (a frame equal to the image) is logged as 100 dB, as evaluate.py does."""
    from pia_jax.eval.scores import CLIPScorer, score_video
    if v.clip and v.clip not in _SCORERS:
        _SCORERS[v.clip] = CLIPScorer.load(v.clip)
    scorer = _SCORERS.get(v.clip)
    rows = [score_video(scorer, video, image, prompt, condition=image)
            for video, image, prompt in zip(videos, images, v.prompts)]
    means = {f"validation/{k}": float(np.mean([min(r[k], 100.0) if k == "psnr" else r[k] for r in rows]))
             for k in rows[0] if isinstance(rows[0][k], (int, float))}
    return {k: v for k, v in means.items() if np.isfinite(v)}  # SSIM is NaN on frames under 11 pixels
