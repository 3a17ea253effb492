"""Which scheduler config a converted model directory stores (`config.json`'s "scheduler"): the one its motion
weights' source recommends, from `models.config.SCHEDULER_PRESETS`.

- PIA and AnimateDiff: PIA's DDIM config (linear betas 0.00085-0.012, leading spacing, steps_offset 1).
- AnimateLCM (wangfuyun/AnimateLCM: the diffusers MotionAdapter folder at the repository's root, or the original
  AnimateDiff-layout `AnimateLCM_sd15_t2v.ckpt`; its spatial LoRA `AnimateLCM_sd15_t2v_lora.safetensors` is a kohya
  LoRA for --lora, at 0.8 as its README merges it): the base model's config with linear betas, which is PIA's; LCM's
  own keys (original_inference_steps 50, timestep_scaling 10) are diffusers' defaults. Sample with `--scheduler lcm`.
- AnimateDiff-Lightning (ByteDance/AnimateDiff-Lightning `animatediff_lightning_{N}step_diffusers.safetensors`, a
  diffusers MotionAdapter state dict in one file, or the `_comfyui` file in the AnimateDiff layout): linear betas and
  trailing timestep spacing, as its README sets EulerDiscreteScheduler. Sample with `--scheduler euler`.

The name of the motion file or folder picks the preset unless one is given; the conversion log says which.
"""

from pathlib import Path

from pia_jax.models.config import SCHEDULER_PRESETS


def scheduler_preset(motion: Path, name: str | None = None) -> str:
    """`name` if given (checked), else 'lightning' for a motion file or folder named like AnimateDiff-Lightning's,
    'animatelcm' for AnimateLCM's, otherwise 'pia'."""
    if name is not None:
        if name not in SCHEDULER_PRESETS:
            raise ValueError(f"scheduler config must be one of {', '.join(SCHEDULER_PRESETS)}, got {name!r}")
        return name
    stem = Path(motion).name.lower()
    return "lightning" if "lightning" in stem else "animatelcm" if "animatelcm" in stem else "pia"
