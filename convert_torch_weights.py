"""Converts PyTorch checkpoints into one pia-jax model directory that sample.py and train.py load without torch.

  # SD1.5 (diffusers folder) + the official PIA weights
  python convert_torch_weights.py --base stable-diffusion-v1-5 --motion pia.ckpt --out models/pia-sd15
  # a civitai DreamBooth model + PIA + a LoRA at 0.8
  python convert_torch_weights.py --base rcnzCartoon3d_v10.safetensors --config-from stable-diffusion-v1-5 \
      --motion pia.ckpt --lora my_style.safetensors:0.8 --out models/pia-cartoon --dtype bf16
  # AnimateDiff v2 text-to-video with a camera motion LoRA; v3 with its adapter LoRA
  python convert_torch_weights.py --base stable-diffusion-v1-5 --motion mm_sd_v15_v2.ckpt \
      --motion-lora v2_lora_ZoomIn.ckpt:0.8 --out models/animatediff-v2-zoom
  python convert_torch_weights.py --base stable-diffusion-v1-5 --motion v3_sd15_mm.ckpt \
      --lora v3_sd15_adapter.ckpt --out models/animatediff-v3

See README.md for every option and `pia_jax/weights/convert/build.py` for the order of work and the conv_in rule.
"""

import argparse
import sys
from pathlib import Path

from pia_jax.models.config import DTYPES, SCHEDULER_PRESETS
from pia_jax.weights.convert.build import Request, convert


def lora_arg(text: str) -> tuple[Path, float]:
    """FILE or FILE:MULT."""
    path, sep, mult = text.rpartition(":")
    try:
        return (Path(path), float(mult)) if sep else (Path(text), 1.0)
    except ValueError:  # a ':' that is part of the path
        return Path(text), 1.0


def parse(argv=None) -> Request:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", type=Path, required=True,
                   help="SD1.5-family base: a diffusers folder or a single-file LDM .safetensors/.ckpt (e.g. civitai)")
    p.add_argument("--motion", type=Path, required=True,
                   help="pia.ckpt, a diffusers PIA condition-adapter folder, or AnimateDiff motion modules "
                        "(mm_sd_v15_v2.ckpt; then the UNet takes 4 channels unless --widen-conv-in)")
    p.add_argument("--out", type=Path, required=True, help="output model directory")
    p.add_argument("--config-from", type=Path,
                   help="diffusers SD1.5 folder with the tokenizer and configs (needed for a single-file base)")
    p.add_argument("--vae", type=Path, help="a separate VAE (LDM file or diffusers folder) replacing the base VAE")
    p.add_argument("--lora", type=lora_arg, action="append", default=[], metavar="FILE[:MULT]",
                   help="kohya or diffusers LoRA merged with multiplier MULT (default 1); repeat for several")
    p.add_argument("--motion-lora", type=lora_arg, action="append", default=[], metavar="FILE[:MULT]",
                   help="AnimateDiff motion LoRA (v2_lora_ZoomIn.ckpt, ..., or diffusers' copy) merged into the motion "
                        "modules with multiplier MULT (default 1); repeat for several")
    p.add_argument("--legacy-lora-alpha", action="store_true",
                   help="the PIA reference's LoRA merge: W += MULT * up @ down, ignoring the file's alpha and rank")
    p.add_argument("--conv-in", choices=("auto", "base", "motion"), default="auto",
                   help="where conv_in channels 0-3 and its bias come from: auto = base for a single-file "
                        "(personalized) base, motion for a diffusers folder (as the reference)")
    p.add_argument("--widen-conv-in", action="store_true",
                   help="for AnimateDiff motion modules: add zero-initialized condition channels (PIA training start)")
    p.add_argument("--motion-heads", type=int, help="motion-module attention heads (default: adapter config or 8)")
    p.add_argument("--extract-ema", action="store_true", help="take the UNet from the file's model_ema.* weights")
    p.add_argument("--norm-semantics", choices=("pia", "diffusers"), default="pia",
                   help="GroupNorm statistics as PIA trained them (default) or as diffusers' UNetMotionModel computes")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="storage dtype of the weights")
    p.add_argument("--scheduler-config", choices=list(SCHEDULER_PRESETS),
                   help="the scheduler config stored with the model: pia (DDIM), animatelcm (for --scheduler lcm), "
                        "lightning (trailing spacing, for --scheduler euler); default: by the motion file's name")
    p.add_argument("--ip-adapter", type=Path, metavar="FILE",
                   help="IP-Adapter SD1.5 weights (ip-adapter_sd15.bin or .safetensors), added to the model with "
                        "--image-encoder")
    p.add_argument("--image-encoder", type=Path, metavar="DIR",
                   help="the IP-Adapter's image encoder: a transformers CLIPVisionModelWithProjection folder "
                        "(h94/IP-Adapter models/image_encoder, OpenCLIP ViT-H/14)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    a = p.parse_args(argv)
    return Request(base=a.base, motion=a.motion, out=a.out, vae=a.vae, loras=tuple(a.lora), config_from=a.config_from,
                   motion_loras=tuple(a.motion_lora),
                   ip_adapter=a.ip_adapter, image_encoder=a.image_encoder,
                   conv_in=a.conv_in, legacy_lora_alpha=a.legacy_lora_alpha, extract_ema=a.extract_ema,
                   widen_conv_in=a.widen_conv_in, motion_heads=a.motion_heads, norm_semantics=a.norm_semantics,
                   dtype=a.dtype, force=a.force, scheduler_config=a.scheduler_config)


def main(argv=None) -> int:
    request = parse(argv)
    try:
        convert(request)
    except (ValueError, OSError) as e:  # WeightLoadError and ModelDirError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
