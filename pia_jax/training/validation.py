"""Periodic validation videos: fixed (image, prompt) pairs animated with the weights being trained, through
`pia_jax.sampling.Animator` built from the trainer's models, written as GIFs to `{workdir}/validation/step_NNNNNNN/`,
and scored as evaluate.py scores videos (means logged to TensorBoard under `validation/`).

The caller makes one `Validator` per run and hands it to `loop.run`. Every process samples on its own devices
(weights gathered to each host; validation is rare and small) and process 0 writes. The Validator keeps its
`Animator` and gives it the new UNet weights each time, so its phases compile once per run, and with
`validation.clip` the CLIP scorer, loaded once.
"""

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from pia_jax import media
from pia_jax.sampling import affinity
from pia_jax.training.state import merge, weights_to_export


class Validator:
    """validator(state, step, writer) samples, writes and scores the validation videos of `cfg.validation`."""

    def __init__(self, cfg, trainer):
        v = cfg.validation
        if len(v.images) != len(v.prompts) or not v.images:
            raise ValueError(f"validation needs as many images as prompts (got {len(v.images)} and {len(v.prompts)})")
        if trainer.setup.tokenizer is None:
            raise ValueError("validation needs a model directory with a tokenizer (model.model_dir)")
        self.cfg, self.trainer, self.animator, self.scorer = cfg, trainer, None, None
        if v.clip:
            from pia_jax.eval.scores import CLIPScorer
            self.scorer = CLIPScorer.load(v.clip)

    def _animator(self, unet):
        """The run's Animator with `unet`: made once, then given the new UNet weights."""
        setup = self.trainer.setup
        if self.animator is None:
            from pia_jax.sampling import Animator
            self.animator = Animator(
                setup.config, unet, merge(setup.graphs.vae, setup.frozen["vae"]),
                merge(setup.graphs.text_encoder, setup.frozen["text_encoder"]), setup.tokenizer, setup.scheduler,
                jax.sharding.Mesh(np.array(jax.local_devices()), ("data",)), compile_cache_dir=None)  # jax's setting
        else:
            self.animator.update_unet(unet)
        return self.animator

    def __call__(self, state, step: int, writer) -> None:
        from pia_jax.sampling import DEFAULT_NEGATIVE_PROMPT, SampleOptions

        cfg, v, setup = self.cfg, self.cfg.validation, self.trainer.setup
        params = multihost_utils.process_allgather(weights_to_export(state), tiled=True)
        animator = self._animator(merge(setup.graphs.unet, params, setup.frozen["unet"]))
        size, n = cfg.data.resolution, len(v.images)
        images = np.stack([media.preprocess_image(media.load_image(p), height=size, width=size) for p in v.images])
        mask = np.stack([affinity.preset_affinity(v.affinity, cfg.data.n_frames)] * n)
        options = SampleOptions(steps=v.steps, guidance_scale=v.guidance_scale)
        result = animator(images, list(v.prompts), [DEFAULT_NEGATIVE_PROMPT] * n, mask, options,
                          seeds=[v.seed + i for i in range(n)])
        if jax.process_index() == 0:
            out = epath.Path(cfg.workdir) / "validation" / f"step_{step:07d}"  # gs:// too; writers make parents
            for i, video in enumerate(result.videos):  # uint8 frames
                media.write_gif(out / f"{i}.gif", video)
            writer.log(f"validation: {n} videos in {out}")
            writer.scalars(step, scores(self.scorer, v.prompts, result.videos, images), force=True)


def scores(scorer, prompts, videos, images) -> dict:
    """Mean over the validation videos of evaluate.py's per-video scores (pia_jax.eval.scores.score_video): flow,
    dynamic degree, condition-frame PSNR/SSIM against the exact input pixels, and with a CLIP `scorer` the CLIP
    alignment scores. An infinite PSNR (a frame equal to the image) is logged as 100 dB, as evaluate.py does."""
    from pia_jax.eval.scores import score_video
    rows = [score_video(scorer, video, image, prompt, condition=image)
            for video, image, prompt in zip(videos, images, prompts)]
    means = {f"validation/{k}": float(np.mean([min(r[k], 100.0) if k == "psnr" else r[k] for r in rows]))
             for k in rows[0] if isinstance(rows[0][k], (int, float))}
    return {k: v for k, v in means.items() if np.isfinite(v)}  # SSIM is NaN on frames under 11 pixels
