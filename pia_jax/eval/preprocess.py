"""CLIP's image preprocessing (transformers' `CLIPImageProcessor`, step for step): it lives in `pia_jax.media`
(floor 2), which sampling (IP-Adapter's image encoder) and eval (the CLIP metric model) both import."""

from pia_jax.media import clip_preprocess, resized_size

__all__ = ["clip_preprocess", "resized_size"]
