"""The networks, pure NNX and free of file I/O: configs as data (`config`), shared blocks (`layers`), the one
attention function (`attention`), the video UNet with PIA's condition input (`unet`, `motion`), the VAE (`vae`), the
CLIP text tower and its tokenizer (`text_encoder`, `tokenizer`), and shape-only models (`abstract`).

`build(config, part)` is the one place that maps a model part to its class and config.
"""

PARTS = ("unet", "vae", "text_encoder")


def classes(config) -> dict:
    """{part: (NNX class, its config)} of a PIAConfig (imported here so that `pia_jax.models.config` needs no jax)."""
    from pia_jax.models.text_encoder import CLIPTextModel
    from pia_jax.models.unet import UNetMotionModel
    from pia_jax.models.vae import AutoencoderKL
    return {"unet": (UNetMotionModel, config.unet), "vae": (AutoencoderKL, config.vae),
            "text_encoder": (CLIPTextModel, config.text)}


def build(config, part: str, **kwargs):
    """The shape-only model (nothing allocated) of one part of a PIAConfig; `kwargs` go to its constructor (dtype,
    param_dtype, attention kernels, remat policy)."""
    from pia_jax.models.abstract import abstract_model
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    cls, cfg = classes(config)[part]
    return abstract_model(cls, cfg, **kwargs)
