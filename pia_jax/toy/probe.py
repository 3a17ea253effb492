"""Where does a toy model decide the motion? Held-out clips are rendered, noised to t, denoised by one UNet call,
and the predicted x0 is decoded and tracked: its shift from the first frame to the last along the clip's direction,
with the true caption and with the opposite direction word; and, for a PIA model, how far x0's first frame puts the
object from where the condition image has it, with the condition and without it (condition dropout's input).

    python -m pia_jax.toy probe --model models/toy
    python -m pia_jax.toy probe --model models/toy --trajectory --guidance 1 4

A model that decides the motion moves its x0 along the caption (and against it for the opposite word) where the
motion is no longer visible in the noisy frames (t >= ~800 at 8x8 latents); one that only copies visible motion
moves it at low t and not at high t, whatever the caption (docs/toy/EVAL.md). An animator that keeps the image
places frame 0's object within a pixel or two at every t, and much better with the condition than without it. A PIA
model gets the moderate preset's mask and frame 0 as its condition; a 4-channel (text-to-video) model gets the
caption only. `--trajectory` follows the sampler's own DDIM steps from noise instead and measures each step's x0:
where along the way a PIA model places (or loses) the image and picks the motion.
"""

import sys

import numpy as np

from pia_jax.toy import world
from pia_jax.toy.evaluate import OPPOSITE, cases, measure, track

NOISE_LEVELS = (300, 500, 650, 800, 900, 980)


def _say(message):
    print(message, file=sys.stderr, flush=True)  # progress, apart from the results on stdout


def opposite_caption(caption: str) -> str:
    return " ".join(OPPOSITE.get(word, word) for word in caption.split())


def shift_along(video: np.ndarray, clip: world.Clip) -> float:
    """px from frame 0 to the last frame along the clip's direction; video (F, H, W, 3) in [0, 1]."""
    centroid, _ = track(video, clip.colour, clip.background)
    return float((centroid[-1] - centroid[0]) @ np.array(world.DIRECTIONS[clip.motion], np.float64))


class _Cases:
    """The moderate held-out direction cases of `seed`, rendered and encoded by a model directory's VAE, and the
    measurements both probes take of decoded x0 videos."""

    def __init__(self, model_dir, seed: int):
        import jax.numpy as jnp

        from pia_jax.data.clips import transform_clip
        from pia_jax.weights.model_dir import load_model_dir

        _say(f"loading {model_dir}")
        self.md = md = load_model_dir(model_dir, tokenizer=True)
        self.clips = [c["clip"] for c in cases(seed) if c["kind"] == "direction" and c["preset"] == "moderate"]
        self.pixels = np.stack([transform_clip(world.render(c), flip=False, resolution=world.TRAIN_SIZE)
                                for c in self.clips])
        b, f = self.pixels.shape[:2]
        _say(f"encoding {b} held-out clips (compiling first)")
        self.scale = md.config.vae.scaling_factor
        mean, _ = md.vae.encode(jnp.asarray(self.pixels.reshape((b * f,) + self.pixels.shape[2:]), jnp.float32))
        self.latents = (mean * self.scale).reshape((b, f) + mean.shape[1:])  # (B, F, h, w, 4), posterior means
        self.first = [track((p[:1] + 1) / 2, c.colour, c.background)[0][0] for p, c in zip(self.pixels, self.clips)]
        self.animator = md.config.unet.in_channels == 9

    def context(self, captions):
        import jax.numpy as jnp

        from pia_jax.models.tokenizer import tokenize
        return self.md.text_encoder(jnp.asarray(tokenize(self.md.tokenizer, captions)))

    def decoded(self, x0) -> np.ndarray:
        """(B, F, H, W, 3) in [0, 1]."""
        b, f = x0.shape[:2]
        frames = self.md.vae.decode((x0 / self.scale).reshape((b * f,) + x0.shape[2:]))
        return (np.clip(np.asarray(frames, np.float64), -1, 1).reshape(self.pixels.shape) + 1) / 2

    def frame0_error(self, video) -> float:
        """Mean px between each video's frame-0 object and the true frame 0's."""
        return float(np.mean([np.linalg.norm(track(v[:1], c.colour, c.background)[0][0] - true)
                              for v, c, true in zip(video, self.clips, self.first)]))

    def shift(self, video) -> float:
        return float(np.mean([shift_along(v, c) for v, c in zip(video, self.clips)]))

    def as_prompted(self, video) -> float:
        """The share of videos that move as their caption says (the evaluation's rule)."""
        return float(np.mean([measure({"kind": "direction", "clip": c, "prompt": c.caption, "preset": ""}, v,
                                      v[0] * 255)["correct"] for v, c in zip(video, self.clips)]))


def probe(model_dir, levels=NOISE_LEVELS, seed: int = 0, predict=None) -> dict:
    """{"truth": mean px the clips move, "rows": [{t, true, opposite, frame0, frame0_uncond}]} over the moderate
    held-out direction cases: x0's shift along the direction with the true and the opposite caption, and (PIA models;
    None otherwise) the mean px between x0's frame-0 centroid and the true frame's, with and without the condition.
    `predict(x_t, t, context, noise, use_condition)` replaces the UNet (tests give it the true target)."""
    import jax
    import jax.numpy as jnp

    from pia_jax.sampling import affinity, schedulers

    cs = _Cases(model_dir, seed)
    md, latents, clips = cs.md, cs.latents, cs.clips
    b, f = latents.shape[:2]
    contexts = [cs.context([c.caption for c in clips]), cs.context([opposite_caption(c.caption) for c in clips])]
    if predict is None:
        if cs.animator:
            mask = jnp.asarray(affinity.preset_affinity("moderate", f), jnp.float32)
            mask = jnp.broadcast_to(mask[None, :, None, None, None], (b, f, 1, 1, 1))
            unet = jax.jit(lambda x, t, c, use: md.unet(x, t, c, mask=mask * use, condition=latents[:, :1] * use))
        else:
            unet = jax.jit(lambda x, t, c, use: md.unet(x, t, c))
        predict = lambda x, t, c, noise, use: unet(x, t, c, jnp.float32(use))  # noqa: E731
    scheduler = schedulers.from_dict(md.scheduler)
    alphas = schedulers.alphas_cumprod(scheduler)

    rows = []
    for level in levels:
        _say(f"t = {level}: denoising and decoding" + " (compiling first)" * (level == levels[0]))
        noise = jax.random.normal(jax.random.key(level), latents.shape)
        t = jnp.full((b,), level)
        x_t = schedulers.add_noise(alphas, latents, noise, t)
        alpha, sigma = np.sqrt(alphas[level]), np.sqrt(1 - alphas[level])
        x0 = lambda c, use=True: schedulers.x0_eps(  # noqa: E731
            scheduler.prediction_type, predict(x_t, t, c, noise, use), x_t, alpha, sigma)[0]
        videos = [cs.decoded(x0(c)) for c in contexts]
        row = {"t": level, "true": cs.shift(videos[0]), "opposite": cs.shift(videos[1]), "frame0": None,
               "frame0_uncond": None}
        if cs.animator:
            uncond = cs.decoded(x0(contexts[0], False))
            row.update(frame0=cs.frame0_error(videos[0]), frame0_uncond=cs.frame0_error(uncond))
        rows.append(row)
    truth = cs.shift((cs.pixels + 1) / 2)
    return {"truth": truth, "rows": rows}


def guided_unet(unet, text, mask, condition, guidance: float):
    """The sampler's guided noise prediction `(x, t) -> eps`, jitted; classifier-free guidance is on where the
    sampler turns it on (`SampleOptions.cfg`: guidance > 1), so guidance <= 1 is the prompt's prediction alone."""
    import jax

    from pia_jax.sampling import SampleOptions
    from pia_jax.sampling.loop import guided_eps

    cfg = SampleOptions(guidance_scale=guidance).cfg
    return jax.jit(lambda x, t: guided_eps(unet, x, t, text, mask, condition, guidance, cfg))


def trajectory(model_dir, guidance: float = 4.0, steps: int = 25, seed: int = 0, every: int = 3,
               predict=None) -> list[dict]:
    """Follows the sampler's DDIM trajectories for the moderate held-out direction cases of a PIA model (frame 0's
    latent as the condition, the moderate preset, negative prompt "", noise from `seed`) and, after every `every`-th
    step and the last, decodes that step's x0 prediction: [{step, t, frame0, shift, as_prompted}], frame0 the mean
    px between its frame-0 object and the image's, shift the mean px it moves along the prompt, as_prompted the
    share of videos that move as prompted. `predict(x, t, latents)` replaces the guided UNet (tests give it an
    oracle: latents are the clips' clean latents)."""
    import jax
    import jax.numpy as jnp

    from pia_jax.sampling import affinity, schedulers

    cs = _Cases(model_dir, seed)
    if not cs.animator:
        raise ValueError(f"{model_dir} is not a PIA model (its UNet takes {cs.md.config.unet.in_channels} channels)")
    latents, clips = cs.latents, cs.clips
    b, f = latents.shape[:2]
    scheduler = schedulers.from_dict(cs.md.scheduler)
    schedule = schedulers.make_schedule("ddim", scheduler, steps)
    if predict is None:
        text = jnp.stack([cs.context([""] * b), cs.context([c.caption for c in clips])], 1)  # (B, 2, L, D)
        mask = jnp.asarray(np.tile(affinity.preset_affinity("moderate", f), (b, 1)), jnp.float32)
        guided = guided_unet(cs.md.unet, text, mask, latents[:, 0], guidance)
        predict = lambda x, t, _: guided(x, t)  # noqa: E731
    x = jax.random.normal(jax.random.key(seed), latents.shape)
    state = schedulers.init_state(schedule, x)
    rows = []
    _say(f"{steps} DDIM steps (compiling first)")
    for i in range(steps):
        out = predict(x, schedule.timesteps[i], latents)
        if i % every == 0 or i == steps - 1:
            video = cs.decoded(schedulers.x0_eps(schedule.prediction_type, out, x, schedule.alpha[i],
                                                 schedule.sigma[i])[0])
            rows.append({"step": i, "t": int(schedule.timesteps[i]), "frame0": cs.frame0_error(video),
                         "shift": cs.shift(video), "as_prompted": cs.as_prompted(video)})
        x, state = schedulers.step(schedule, state, i, out, x)
    return rows


def main(args) -> int:
    if args.trajectory:
        for guidance in args.guidance:
            print(f"guidance {guidance}: after DDIM step (t), x0's frame 0 off the image (px), its shift along the "
                  "prompt (px), the share of videos it moves as prompted:")
            for row in trajectory(args.model, guidance=guidance):
                print(f"  step {row['step']:2d} (t = {row['t']:3d}): {row['frame0']:5.2f}  {row['shift']:+6.2f}  "
                      f"{row['as_prompted']:4.0%}")
        return 0
    result = probe(args.model)
    print(f"the clips move {result['truth']:.2f} px along their direction. Per noise level: x0's shift (px) with the "
          "true / opposite word; frame 0's object off the image's (px) with / without the condition:")
    for row in result["rows"]:
        keep = "" if row["frame0"] is None else f"   frame 0 off by {row['frame0']:5.2f} / {row['frame0_uncond']:5.2f}"
        print(f"  t = {row['t']:4d}: {row['true']:+6.2f} / {row['opposite']:+6.2f}{keep}")
    return 0
