"""Where does a toy model decide the motion? Held-out clips are rendered, noised to t, denoised by one UNet call,
and the predicted x0 is decoded and tracked: its shift from the first frame to the last along the clip's direction,
with the true caption and with the opposite direction word.

    python -m pia_jax.toy probe --model models/toy

A model that decides the motion moves its x0 along the caption (and against it for the opposite word) where the
motion is no longer visible in the noisy frames (t >= ~800 at 8x8 latents); one that only copies visible motion
moves it at low t and not at high t, whatever the caption (docs/toy/EVAL.md). A PIA model gets the moderate
preset's mask and frame 0 as its condition; a 4-channel (text-to-video) model gets the caption only.
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
    """{"truth": mean px the clips move, "rows": [{t, true, opposite}]} over the moderate held-out direction cases.
    `predict(x_t, t, context, noise)` replaces the UNet (tests give it the true noise)."""
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
    if predict is None:
        if md.config.unet.in_channels == 9:
            mask = jnp.asarray(affinity.preset_coefficients("moderate", f), jnp.float32)
            mask = jnp.broadcast_to(mask[None, :, None, None, None], (b, f, 1, 1, 1))
            unet = jax.jit(lambda x, t, c: md.unet(x, t, c, mask=mask, condition=latents[:, :1]))
        else:
            unet = jax.jit(lambda x, t, c: md.unet(x, t, c))
        predict = lambda x, t, c, noise: unet(x, t, c)  # noqa: E731
    scheduler = schedulers.from_dict(md.scheduler)
    alphas = schedulers.alphas_cumprod(scheduler)

    def moved(x0):
        frames = md.vae.decode((x0 / scale).reshape((b * f,) + x0.shape[2:]))
        video = (np.clip(np.asarray(frames, np.float64), -1, 1).reshape(pixels.shape) + 1) / 2
        return float(np.mean([shift_along(v, c) for v, c in zip(video, clips)]))

    rows = []
    for level in levels:
        noise = jax.random.normal(jax.random.key(level), latents.shape)
        t = jnp.full((b,), level)
        x_t = schedulers.add_noise(alphas, latents, noise, t)
        alpha, sigma = np.sqrt(alphas[level]), np.sqrt(1 - alphas[level])
        shifts = [moved(schedulers.x0_eps(scheduler.prediction_type, predict(x_t, t, c, noise), x_t, alpha, sigma)[0])
                  for c in contexts]
        rows.append({"t": level, "true": shifts[0], "opposite": shifts[1]})
    truth = float(np.mean([shift_along((p + 1) / 2, c) for p, c in zip(pixels, clips)]))
    return {"truth": truth, "rows": rows}


def main(args) -> int:
    result = probe(args.model)
    print(f"the clips move {result['truth']:.2f} px along their direction; x0's shift (px), true / opposite word:")
    for row in result["rows"]:
        print(f"  t = {row['t']:4d}: {row['true']:+6.2f} / {row['opposite']:+6.2f}")
    return 0
