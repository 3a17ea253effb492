"""What a sampling call takes besides its inputs (`SampleOptions`), their checks against a model, and its result.

The checks need only the model's config and scheduler config (config.json), so a command line or a batch file
runs them before any weight is read or anything is compiled.
"""

from dataclasses import dataclass

import numpy as np

from pia_jax import schedulers
from pia_jax.config import PIAConfig

# The reference's negative prompt when a config gives none (PIA i2v_pipeline.py DEFAULT_N_PROMPT).
DEFAULT_NEGATIVE_PROMPT = (
    "wrong white balance, dark, sketches,worst quality,low quality, deformed, distorted, disfigured, bad eyes, "
    "wrong lips,weird mouth, bad teeth, mutated hands and fingers, bad anatomy,wrong anatomy, amputation, "
    "extra limb, missing limb, floating,limbs, disconnected limbs, mutation, ugly, disgusting, bad_pictures, "
    "negative_hand-neg")


@dataclass(frozen=True)
class SampleOptions:
    """Everything but `scheduler`, `clip_skip`, `decode_chunk` and whether guidance is on (> 1) is data of the
    compiled programs: changing it compiles nothing."""
    steps: int = 25
    scheduler: str = "ddim"  # ddim | dpmpp_2m (see pia_jax.schedulers; the model directory holds the config)
    karras: bool = False  # Karras sigmas for dpmpp_2m
    guidance_scale: float = 7.5  # <= 1 turns classifier-free guidance off (a batch of half the size)
    strength: float = 1.0  # < 1: start from the condition image noised to step int(steps * (1 - strength))
    eta: float = 0.0  # DDIM stochasticity
    clip_skip: int | None = None
    decode_chunk: int = 4  # frames per video decoded at once

    @property
    def cfg(self) -> bool:
        return self.guidance_scale > 1

    def check(self, config: PIAConfig, scheduler: schedulers.SchedulerConfig):
        """Raises ValueError naming the option when this model cannot sample with these options."""
        if self.scheduler not in schedulers.KINDS:
            raise ValueError(f"unknown scheduler {self.scheduler!r}; choose from {schedulers.KINDS}")
        schedulers.check_steps(scheduler, self.steps, self.strength)
        if not self.eta >= 0:  # also NaN
            raise ValueError(f"eta must be >= 0, got {self.eta}")
        if self.eta > 0 and self.scheduler != "ddim":
            raise ValueError(f"eta (DDIM noise) has no effect with the {self.scheduler} scheduler; leave it at 0")
        if self.karras and self.scheduler == "ddim":
            raise ValueError("Karras sigmas apply to the dpmpp_2m scheduler, not ddim")
        if not np.isfinite(self.guidance_scale):
            raise ValueError(f"guidance must be a finite number, got {self.guidance_scale}")
        layers = config.text.num_hidden_layers
        if self.clip_skip is not None and not 0 <= self.clip_skip <= layers:
            raise ValueError(f"clip skip must be in [0, {layers}] for this model's {layers}-layer text encoder, got "
                             f"{self.clip_skip}")
        if self.decode_chunk < 1:
            raise ValueError(f"decode chunk must be >= 1 frame, got {self.decode_chunk}")


@dataclass
class Result:
    videos: np.ndarray  # (B, F, H, W, 3) uint8, or float32 in [0, 1] when asked for
    noise: np.ndarray  # (B, F, h, w, 4) the initial noise used
    posterior_noise: np.ndarray  # (B, h, w, 4) the VAE posterior noise used
    seconds: dict  # wall time per phase ('compile' counted apart)
    batch_size: int = 0  # videos per device per batch
    cache: dict | None = None  # persistent compilation cache {'hits', 'misses'} during this call
