"""Turning PyTorch checkpoints (LDM single files, AnimateDiff/PIA motion modules, kohya LoRAs) into diffusers-named
numpy state dicts, which `pia_jax.weights` then loads strictly into the NNX models."""
