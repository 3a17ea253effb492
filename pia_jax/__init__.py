"""pia-jax: PIA (Personalized Image Animator) in JAX/Flax NNX.

Modules: config (configs as data), unet + motion (the video UNet with PIA's condition input), vae, text_encoder,
tokenizer, attention (kernel choice per call site), layers (shared blocks), weights (strict PyTorch loading).
"""
