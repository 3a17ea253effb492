"""The networks, pure NNX and free of file I/O: configs as data (`config`), shared blocks (`layers`), the one
attention function (`attention`), the video UNet with PIA's condition input (`unet`, `motion`), the VAE (`vae`), the
CLIP text tower and its tokenizer (`text_encoder`, `tokenizer`), and shape-only models (`abstract`).

`build(config, part)` is the one place that maps a model part to its class and config.
"""

PARTS = ("unet", "vae", "text_encoder")
IP_ADAPTER_PARTS = ("image_encoder", "image_proj")  # optional: a model with an IP-Adapter (config.ip_adapter) has them


def classes(config) -> dict:
    """{part: (NNX class, its config)} of a PIAConfig (imported here so that `pia_jax.models.config` needs no jax)."""
    from pia_jax.models.text_encoder import CLIPTextModel
    from pia_jax.models.unet import UNetMotionModel
    from pia_jax.models.vae import AutoencoderKL
    parts = {"unet": (UNetMotionModel, config.unet), "vae": (AutoencoderKL, config.vae),
             "text_encoder": (CLIPTextModel, config.text)}
    if config.ip_adapter is not None:
        from pia_jax.models.clip_vision import CLIPVisionModelWithProjection
        from pia_jax.models.ip_adapter import ImageProjection
        parts.update(image_encoder=(CLIPVisionModelWithProjection, config.ip_adapter),
                     image_proj=(ImageProjection, config.ip_adapter))
    return parts


def build(config, part: str, **kwargs):
    """The shape-only model (nothing allocated) of one part of a PIAConfig; `kwargs` go to its constructor (dtype,
    param_dtype, attention kernels, remat policy)."""
    from pia_jax.models.abstract import abstract_model
    parts = classes(config)
    if part not in parts:
        raise ValueError(f"part must be one of {tuple(parts)} for this config, got {part!r}")
    cls, cfg = parts[part]
    return abstract_model(cls, cfg, **kwargs)
