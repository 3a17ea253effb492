"""The PyTorch reference models (diffusers/transformers) built to match our configs, with random weights."""

import numpy as np
import torch

from pia_jax.config import UNetConfig
from tests.oracle import numpy_state, randomize

_2D = {"CrossAttnDownBlockMotion": "CrossAttnDownBlock2D", "DownBlockMotion": "DownBlock2D",
       "CrossAttnUpBlockMotion": "CrossAttnUpBlock2D", "UpBlockMotion": "UpBlock2D"}


def unet2d(cfg: UNetConfig):
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel(
        in_channels=4, out_channels=cfg.out_channels, block_out_channels=cfg.block_out_channels,
        down_block_types=tuple(_2D[t] for t in cfg.down_block_types),
        up_block_types=tuple(_2D[t] for t in cfg.up_block_types), layers_per_block=cfg.layers_per_block,
        attention_head_dim=cfg.num_attention_heads, cross_attention_dim=cfg.cross_attention_dim,
        norm_num_groups=cfg.norm_num_groups, norm_eps=cfg.norm_eps)


def motion_adapter(cfg: UNetConfig):
    from diffusers import MotionAdapter
    return MotionAdapter(
        block_out_channels=cfg.block_out_channels, motion_layers_per_block=cfg.layers_per_block,
        motion_num_attention_heads=cfg.motion_num_attention_heads, motion_norm_num_groups=cfg.norm_num_groups,
        motion_max_seq_length=cfg.motion_max_seq_length, use_motion_mid_block=cfg.motion_mid_block,
        conv_in_channels=cfg.in_channels if cfg.in_channels != 4 else None)


def unet_motion(cfg: UNetConfig, seed=0):
    """diffusers UNetMotionModel = UNet2DConditionModel + MotionAdapter, every weight random (incl. zero-inits)."""
    from diffusers import UNetMotionModel
    model = UNetMotionModel.from_unet2d(unet2d(cfg), motion_adapter(cfg))
    return randomize(model, seed).eval()


def run_unet_motion(model, sample, t, context, mask=None, condition=None):
    """Runs the torch model on our channels-last inputs: sample (b, f, h, w, c), context (b, n, d)."""
    b, f = sample.shape[:2]
    x = torch.from_numpy(np.asarray(sample)).permute(0, 4, 1, 2, 3)  # -> (b, c, f, h, w)
    if mask is not None:  # PIA's channel order: [latent | mask | condition latent]
        m = torch.from_numpy(np.broadcast_to(mask, sample.shape[:4] + (1,)).copy()).permute(0, 4, 1, 2, 3)
        c = torch.from_numpy(np.broadcast_to(condition, sample.shape).copy()).permute(0, 4, 1, 2, 3)
        x = torch.cat([x, m, c], dim=1)
    ctx = torch.from_numpy(np.asarray(context)).repeat_interleave(f, dim=0)  # diffusers expects one per frame
    with torch.no_grad():
        out = model(x, torch.tensor(t), ctx).sample  # (b, c, f, h, w)
    return out.permute(0, 2, 3, 4, 1).numpy()


__all__ = ["unet2d", "motion_adapter", "unet_motion", "run_unet_motion", "numpy_state"]
