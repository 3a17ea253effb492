"""Where does a toy model decide the motion? Held-out clips are rendered, noised to t, denoised by one UNet call,
and the predicted x0 is decoded and tracked: its shift from the first frame to the last along the clip's direction,
with the true caption and with the opposite direction word; and, for a PIA model, how far x0's first frame puts the
object from where the condition image has it, with the condition and without it (condition dropout's input).

    python -m pia_jax.toy probe --model models/toy

A model that decides the motion moves its x0 along the caption (and against it for the opposite word) where the
motion is no longer visible in the noisy frames (t >= ~800 at 8x8 latents); one that only copies visible motion
moves it at low t and not at high t, whatever the caption (docs/toy/EVAL.md). An animator that keeps the image
places frame 0's object within a pixel or two at every t, and much better with the condition than without it. A PIA
model gets the moderate preset's mask and frame 0 as its condition; a 4-channel (text-to-video) model gets the
caption only.
"""

import numpy as np

from pia_jax.toy import world
from pia_jax.toy.evaluate import OPPOSITE, cases, track

NOISE_LEVELS = (300, 500, 650, 800, 900, 980)


def opposite_caption(caption: str) -> str:
    return " ".join(OPPOSITE.get(word, word) for word in caption.split())


def shift_along(video: np.ndarray, clip: world.Clip) -> float:
    """px from frame 0 to the last frame along the clip's direction; video (F, H, W, 3) in [0, 1]."""
    centroid, _ = track(video, clip.colour, clip.background)
    return float((centroid[-1] - centroid[0]) @ np.array(world.DIRECTIONS[clip.motion], np.float64))


def probe(model_dir, levels=NOISE_LEVELS, seed: int = 0, predict=None) -> dict:
    """{"truth": mean px the clips move, "rows": [{t, true, opposite, frame0, frame0_uncond}]} over the moderate
    held-out direction cases: x0's shift along the direction with the true and the opposite caption, and (PIA models;
    None otherwise) the mean px between x0's frame-0 centroid and the true frame's, with and without the condition.
    `predict(x_t, t, context, noise, use_condition)` replaces the UNet (tests give it the true target)."""
    import jax
    import jax.numpy as jnp

    from pia_jax import affinity, schedulers
    from pia_jax.data.clips import transform_clip
    from pia_jax.model_dir import load_model_dir
    from pia_jax.tokenizer import tokenize

    md = load_model_dir(model_dir, tokenizer=True)
    clips = [c["clip"] for c in cases(seed) if c["kind"] == "direction" and c["preset"] == "moderate"]
    pixels = np.stack([transform_clip(world.render(c), flip=False, resolution=world.TRAIN_SIZE) for c in clips])
    b, f = pixels.shape[:2]
    scale = md.config.vae.scaling_factor
    mean, _ = md.vae.encode(jnp.asarray(pixels.reshape((b * f,) + pixels.shape[2:]), jnp.float32))
    latents = (mean * scale).reshape((b, f) + mean.shape[1:])  # (B, F, h, w, 4), the posterior means
    contexts = [md.text_encoder(jnp.asarray(tokenize(md.tokenizer, caps)))
                for caps in ([c.caption for c in clips], [opposite_caption(c.caption) for c in clips])]
    animator = md.config.unet.in_channels == 9
    if predict is None:
        if animator:
            mask = jnp.asarray(affinity.preset_coefficients("moderate", f), jnp.float32)
            mask = jnp.broadcast_to(mask[None, :, None, None, None], (b, f, 1, 1, 1))
            unet = jax.jit(lambda x, t, c, use: md.unet(x, t, c, mask=mask * use, condition=latents[:, :1] * use))
        else:
            unet = jax.jit(lambda x, t, c, use: md.unet(x, t, c))
        predict = lambda x, t, c, noise, use: unet(x, t, c, jnp.float32(use))  # noqa: E731
    scheduler = schedulers.from_dict(md.scheduler)
    alphas = schedulers.alphas_cumprod(scheduler)

    def decoded(x0):
        frames = md.vae.decode((x0 / scale).reshape((b * f,) + x0.shape[2:]))
        return (np.clip(np.asarray(frames, np.float64), -1, 1).reshape(pixels.shape) + 1) / 2

    first = [track((p[:1] + 1) / 2, c.colour, c.background)[0][0] for p, c in zip(pixels, clips)]

    def frame0_error(video):
        return float(np.mean([np.linalg.norm(track(v[:1], c.colour, c.background)[0][0] - true)
                              for v, c, true in zip(video, clips, first)]))

    rows = []
    for level in levels:
        noise = jax.random.normal(jax.random.key(level), latents.shape)
        t = jnp.full((b,), level)
        x_t = schedulers.add_noise(alphas, latents, noise, t)
        alpha, sigma = np.sqrt(alphas[level]), np.sqrt(1 - alphas[level])
        x0 = lambda c, use=True: schedulers.x0_eps(  # noqa: E731
            scheduler.prediction_type, predict(x_t, t, c, noise, use), x_t, alpha, sigma)[0]
        videos = [decoded(x0(c)) for c in contexts]
        shifts = [float(np.mean([shift_along(v, c) for v, c in zip(video, clips)])) for video in videos]
        row = {"t": level, "true": shifts[0], "opposite": shifts[1], "frame0": None, "frame0_uncond": None}
        if animator:
            row.update(frame0=frame0_error(videos[0]), frame0_uncond=frame0_error(decoded(x0(contexts[0], False))))
        rows.append(row)
    truth = float(np.mean([shift_along((p + 1) / 2, c) for p, c in zip(pixels, clips)]))
    return {"truth": truth, "rows": rows}


def main(args) -> int:
    result = probe(args.model)
    print(f"the clips move {result['truth']:.2f} px along their direction. Per noise level: x0's shift (px) with the "
          "true / opposite word; frame 0's object off the image's (px) with / without the condition:")
    for row in result["rows"]:
        keep = "" if row["frame0"] is None else f"   frame 0 off by {row['frame0']:5.2f} / {row['frame0_uncond']:5.2f}"
        print(f"  t = {row['t']:4d}: {row['true']:+6.2f} / {row['opposite']:+6.2f}{keep}")
    return 0
