"""What a sampling call takes besides its inputs (`SampleOptions`), their checks against a model, and its result.

Each option is declared once, as a field with its default, help and choices (`opt`); `sample.py`'s flags and a
batch file's keys are made from these fields and from `cases.Settings`' (the per-video ones). `metadata["key"]`
names a field on the command line and in batch files where that name differs from the field's (guidance_scale:
`--guidance`, `guidance:`).

The checks need only the model's config and scheduler config (config.json), so a command line or a batch file
runs them before any weight is read or anything is compiled. This module imports no jax.
"""

import dataclasses
from dataclasses import dataclass

import numpy as np

from pia_jax.models.config import SCHEDULER_KINDS, PIAConfig, SchedulerConfig, opt
from pia_jax.sampling.windows import NOISE_TYPES, WEIGHTINGS, WindowSchedule, check_window

DEFAULT_CONTEXT_LENGTH = 16  # what PIA and AnimateDiff were trained on
_WINDOW_OPTIONS = ("context_mode", "context_stride", "context_weighting", "window_batch")  # only with windows
CONTEXT_MODES = ("attention", "unet")
DEFAULT_CONTEXT_MODE = "attention"
FRAMES_PER_DEVICE = 4  # without windows a video's frames split over devices in groups of at least this many

# The reference's negative prompt when a config gives none (PIA i2v_pipeline.py DEFAULT_N_PROMPT).
DEFAULT_NEGATIVE_PROMPT = (
    "wrong white balance, dark, sketches,worst quality,low quality, deformed, distorted, disfigured, bad eyes, "
    "wrong lips,weird mouth, bad teeth, mutated hands and fingers, bad anatomy,wrong anatomy, amputation, "
    "extra limb, missing limb, floating,limbs, disconnected limbs, mutation, ugly, disgusting, bad_pictures, "
    "negative_hand-neg")


def key(f: dataclasses.Field) -> str:
    """A field's name on the command line (dashes for underscores) and in batch files."""
    return f.metadata.get("key", f.name)


@dataclass(frozen=True)
class SampleOptions:
    """Long videos (pia_jax.sampling.windows): context windows of `context_length` frames every `context_stride`
    frames, blended with `context_weighting`, inside the motion modules' temporal attention (`context_mode`
    "attention", FreeNoise as diffusers) or around the whole UNet ("unet").

    `scheduler`, `clip_skip`, `decode_chunk`, the window fields but `free_noise`, `devices_per_video` and whether
    guidance is on (> 1) shape the compiled programs; everything else is their data: changing it compiles nothing."""
    steps: int = opt(25, "denoising steps")
    scheduler: str = opt("ddim", "the sampler (pia_jax.sampling.schedulers; the model directory holds its config): "
                                 "lcm for AnimateLCM (4-8 steps, guidance 1-2), euler for AnimateDiff-Lightning "
                                 "(its 2/4/8 steps, guidance 1)", SCHEDULER_KINDS)
    karras: bool = opt(False, "Karras sigmas (dpmpp_2m)")
    guidance_scale: float = opt(7.5, "classifier-free guidance scale (<= 1: off, a batch of half the size)",
                                key="guidance")
    strength: float = opt(1.0, "< 1 starts from the condition image noised to step int(steps * (1 - strength))")
    eta: float = opt(0.0, "DDIM eta (stochasticity)")
    clip_skip: int | None = opt(None, "use the text encoder's hidden state this many layers before the last "
                                       "(diffusers' clip_skip)")
    decode_chunk: int = opt(4, "frames per video decoded at once")
    context_length: int | None = opt(None, "context window length, at most the frames (default: windows of 16 only "
                                           "past the motion modules' positions; a length always windows, and one "
                                           "as long as the video is one window: the plain sampler)")
    context_mode: str | None = opt(
        None, "where windows blend: attention = inside the motion modules' temporal attention, every other layer "
              "sees each frame once, in chunks of context-length frames (FreeNoise, matches diffusers' "
              "enable_free_noise); unet = the whole UNet per window, noise predictions blended (memory bounded by "
              "--window-batch whatever the frames, but ~length/stride times the UNet work). Default attention: the "
              "published FreeNoise, ~3x less compute at stride 4; unet when memory is the limit (README)",
        CONTEXT_MODES)
    context_stride: int = opt(4, "frames between window starts")
    context_weighting: str = opt("pyramid", "blend weights of overlapping windows", WEIGHTINGS)
    window_batch: int = opt(1, "context mode unet: windows per UNet call (memory grows with it, not with the "
                                 "frames)")
    free_noise: str = opt("none", "FreeNoise rescheduling of the seeded noise (needs context windows; refused with "
                                  "--noise, which is used as given: reschedule it before saving it)",
                          ("none", *NOISE_TYPES))
    devices_per_video: int | None = opt(
        None, "devices one video runs on: guidance's two halves (2) times its context windows (context mode unet), "
              "its chunks of context-length frames (attention mode) or, without windows, its frames in groups of "
              f"{FRAMES_PER_DEVICE} spread over them (default: as many as it can use while every video of the batch "
              "has its own; devices left over stay idle)")
    ip_adapter_scale: float | None = opt(
        None, "IP-Adapter image prompt strength, for a model converted with --ip-adapter (default there 1.0, as "
              "diffusers; 0 disables it); the image is --ip-adapter-image, else the condition image")

    @property
    def cfg(self) -> bool:
        return self.guidance_scale > 1

    @property
    def step_noise(self) -> bool:
        """Whether the sampler draws noise between steps (DDIM with eta > 0, LCM), from each video's seed."""
        return self.eta > 0 or self.scheduler == "lcm"

    def image_prompt_scale(self, config: PIAConfig) -> float:
        """The IP-Adapter scale, the default filled in: 1.0 on a model with an IP-Adapter, else 0."""
        if self.ip_adapter_scale is not None:
            return float(self.ip_adapter_scale)
        return 1.0 if config.ip_adapter is not None else 0.0

    @property
    def mode(self) -> str:
        """The context mode, the default filled in."""
        return self.context_mode or DEFAULT_CONTEXT_MODE

    def window(self, num_frames: int, max_positions: int) -> WindowSchedule | None:
        """The context-window schedule for a video of `num_frames` frames, or None (the UNet sees every frame). Its
        tail rule is diffusers' in attention mode (the oracle there), exact in unet mode (windows.py)."""
        if self.context_length is None and num_frames <= max_positions:
            return None
        length = DEFAULT_CONTEXT_LENGTH if self.context_length is None else self.context_length
        check_window(num_frames, length, self.context_stride, max_positions)
        return WindowSchedule(num_frames, length, self.context_stride, self.context_weighting,
                              "diffusers" if self.mode == "attention" else "exact")

    def device_parts(self, num_frames: int, max_positions: int) -> int:
        """What one video's devices may split beyond guidance's two halves (sharding.sampler_split's `parts`): its
        context windows in context mode unet, its chunks of context-length frames in context mode attention (the
        UNet's `frame_chunk`: each device then holds about a chunk's frames, models/frame_split.py), and without
        windows its frames in groups of FRAMES_PER_DEVICE (split as attention mode's one chunk is)."""
        window = self.window(num_frames, max_positions)
        if window is None:
            return max(1, num_frames // FRAMES_PER_DEVICE)
        return len(window.frames) if self.mode == "unet" else -(-num_frames // window.length)

    def check_frames(self, num_frames: int, config: PIAConfig):
        """ValueError when this model cannot make `num_frames` frames with these window options."""
        if self.window_batch < 1:
            raise ValueError(f"window batch must be >= 1, got {self.window_batch}")
        if self.context_length is not None and self.context_length > num_frames:
            raise ValueError(f"context length {self.context_length} is longer than the video's {num_frames} frames: "
                             f"give {num_frames} or less (or more frames)")
        window = self.window(num_frames, config.unet.motion_max_seq_length)
        if self.free_noise != "none" and window is None:
            raise ValueError("free noise reschedules the noise by context windows: give a context length")
        unused = [key(f).replace("_", " ") for f in dataclasses.fields(self) if f.name in _WINDOW_OPTIONS
                  and getattr(self, f.name) != f.default]
        if unused and window is None:  # set but silently unused: the video fits the motion modules
            raise ValueError(f"{', '.join(unused)}: used only by context windows, which a {num_frames}-frame video "
                             f"gets past the motion modules' {config.unet.motion_max_seq_length} positions or with a "
                             "context length: give a context length, or drop them")
        if self.window_batch != 1 and self.mode == "attention":
            raise ValueError(f"window batch {self.window_batch}: windows per UNet call, used only by context mode "
                             "unet (attention mode runs the UNet once on all frames): give --context-mode unet, or "
                             "drop it")

    def check_choices(self):
        """ValueError naming the first field whose value is not one of its choices."""
        for f in dataclasses.fields(self):
            choices, value = f.metadata.get("choices"), getattr(self, f.name)
            unset = value is None and f.default is None  # a default filled in later (context_mode)
            if choices is not None and value not in choices and not unset:
                raise ValueError(f"{key(f).replace('_', ' ')} must be one of {', '.join(map(str, choices))}, got "
                                 f"{value!r}")

    def check(self, config: PIAConfig, scheduler: SchedulerConfig):
        """Raises ValueError naming the option when this model cannot sample with these options."""
        from pia_jax.sampling.schedulers import check_steps  # the module imports jax; check_steps needs none
        self.check_choices()
        check_steps(scheduler, self.steps, self.strength, self.scheduler)
        if not self.eta >= 0:  # also NaN
            raise ValueError(f"eta must be >= 0, got {self.eta}")
        if self.eta > 0 and self.scheduler != "ddim":
            raise ValueError(f"eta (DDIM noise) has no effect with the {self.scheduler} scheduler; leave it at 0")
        if self.karras and self.scheduler != "dpmpp_2m":
            raise ValueError(f"Karras sigmas apply to the dpmpp_2m scheduler, not {self.scheduler}")
        if not np.isfinite(self.guidance_scale):
            raise ValueError(f"guidance must be a finite number, got {self.guidance_scale}")
        layers = config.text.num_hidden_layers
        if self.clip_skip is not None and not 0 <= self.clip_skip <= layers:
            raise ValueError(f"clip skip must be in [0, {layers}] for this model's {layers}-layer text encoder, got "
                             f"{self.clip_skip}")
        if self.devices_per_video is not None and self.devices_per_video < 1:
            raise ValueError(f"devices per video must be >= 1, got {self.devices_per_video}")
        if self.decode_chunk < 1:
            raise ValueError(f"decode chunk must be >= 1 frame, got {self.decode_chunk}")
        self.check_ip_adapter(config)

    def check_ip_adapter(self, config: PIAConfig):
        """ValueError for an IP-Adapter scale this model cannot use."""
        scale = self.ip_adapter_scale
        if scale is not None and not np.isfinite(scale):
            raise ValueError(f"ip adapter scale must be a finite number, got {scale}")
        if scale and config.ip_adapter is None:
            raise ValueError(f"ip adapter scale {scale}: this model has no IP-Adapter; convert it with "
                             "convert_torch_weights.py --ip-adapter FILE --image-encoder DIR (or drop the option)")


@dataclass
class Result:
    videos: np.ndarray  # (B, F, H, W, 3) uint8, or float32 in [0, 1] when asked for
    noise: np.ndarray  # (B, F, h, w, 4) the initial noise used
    posterior_noise: np.ndarray  # (B, h, w, 4) the VAE posterior noise used
    seconds: dict  # wall time per phase ('compile' counted apart)
    batch_size: int = 0  # videos per device group (sharding.sampler_split) per batch
    cache: dict | None = None  # persistent compilation cache {'hits', 'misses'} during this call
