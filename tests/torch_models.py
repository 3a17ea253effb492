"""The PyTorch reference models (diffusers/transformers) built to match our configs, with random weights."""

import numpy as np
import torch

from pia_jax.models.config import PIAConfig, TextConfig, UNetConfig, VAEConfig
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
    """diffusers UNetMotionModel = UNet2DConditionModel + MotionAdapter, every weight random (incl. zero-inits).

    Built from the two configs alone (the parts on the meta device, `load_weights=False`): `randomize` draws every
    weight anyway, and at full size the parts would hold another 5 GB beside the model."""
    from accelerate import init_empty_weights
    from diffusers import UNetMotionModel
    with init_empty_weights():
        parts = unet2d(cfg), motion_adapter(cfg)
    return randomize(UNetMotionModel.from_unet2d(*parts, load_weights=False), seed).eval()


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


class Over5D(torch.nn.Module):
    """GroupNorm of a (b*f, c, h, w) tensor computed on its (b, c, f, h, w) view: stats pooled over frames."""

    def __init__(self, norm, frames):
        super().__init__()
        self.norm, self.frames = norm, frames

    def forward(self, x):
        bf, c, h, w = x.shape
        x5 = x.reshape(bf // self.frames, self.frames, c, h, w).permute(0, 2, 1, 3, 4)
        return self.norm(x5).permute(0, 2, 1, 3, 4).reshape(bf, c, h, w)


class PerFrame(torch.nn.Module):
    """GroupNorm of a (b, c, f, h, w) tensor applied to each frame separately."""

    def __init__(self, norm):
        super().__init__()
        self.norm = norm

    def forward(self, x):
        b, c, f, h, w = x.shape
        y = self.norm(x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w))
        return y.reshape(b, f, c, h, w).permute(0, 2, 1, 3, 4)


def pia_reference(model, frames):
    """diffusers' UNetMotionModel rewired (in place) to the PIA reference's GroupNorm semantics for clips of
    `frames` frames: ResNet norms and conv_norm_out pool their statistics over the clip's frames (torch GroupNorm on
    5-D tensors), motion-module norms act per frame. The parameters stay the same objects."""
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D
    for module in list(model.modules()):
        if isinstance(module, ResnetBlock2D):
            module.norm1, module.norm2 = Over5D(module.norm1, frames), Over5D(module.norm2, frames)
        elif isinstance(module, AnimateDiffTransformer3D):
            module.norm = PerFrame(module.norm)
    model.conv_norm_out = Over5D(model.conv_norm_out, frames)
    return model


def vae(cfg: VAEConfig, seed=0):
    from diffusers import AutoencoderKL
    n = len(cfg.block_out_channels)
    ref = AutoencoderKL(
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, latent_channels=cfg.latent_channels,
        block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
        norm_num_groups=cfg.norm_num_groups, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, scaling_factor=cfg.scaling_factor)
    return randomize(ref, seed=seed).eval()


def clip_text_config(cfg: TextConfig):
    from transformers import CLIPTextConfig
    return CLIPTextConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                          intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
                          num_attention_heads=cfg.num_attention_heads,
                          max_position_embeddings=cfg.max_position_embeddings, layer_norm_eps=cfg.layer_norm_eps,
                          hidden_act="quick_gelu", attn_implementation="eager",
                          bos_token_id=cfg.vocab_size - 2, eos_token_id=cfg.vocab_size - 1)


def clip_text(cfg: TextConfig, seed=0):
    from transformers import CLIPTextModel
    torch.manual_seed(seed)
    return randomize(CLIPTextModel(clip_text_config(cfg)).eval(), seed=seed)


def write_diffusers_base(folder, cfg: PIAConfig, seed=0) -> dict:
    """A diffusers SD1.5-layout folder (unet/, vae/, text_encoder/, tokenizer/) with random weights, as
    save_pretrained writes it; returns the torch modules."""
    from tests.assets import write_vocab
    modules = {"unet": randomize(unet2d(cfg.unet), seed).eval(), "vae": vae(cfg.vae, seed + 1),
               "text_encoder": clip_text(cfg.text, seed + 2)}
    for name, module in modules.items():
        module.save_pretrained(f"{folder}/{name}")
    write_vocab(__import__("pathlib").Path(folder) / "tokenizer")
    return modules


def write_motion_adapter(folder, cfg: UNetConfig, seed=0):
    """A diffusers MotionAdapter folder (PIA condition-adapter layout for a 9-channel config), random weights."""
    adapter = randomize(motion_adapter(cfg), seed).eval()
    adapter.save_pretrained(str(folder))
    return adapter


__all__ = ["unet2d", "motion_adapter", "unet_motion", "run_unet_motion", "Over5D", "PerFrame", "pia_reference",
           "numpy_state", "vae", "clip_text", "write_diffusers_base", "write_motion_adapter"]


def write_model_dir(path, cfg: PIAConfig, unet, vae_model, text_model, tokenizer_dir):
    """Our converted model directory from torch modules (UNetMotionModel, AutoencoderKL, CLIPTextModel), through
    the strict loaders; the conversion CLI is tested on its own."""
    from pia_jax import weights
    from pia_jax.models.abstract import abstract_model
    from pia_jax.models.text_encoder import CLIPTextModel
    from pia_jax.models.unet import UNetMotionModel
    from pia_jax.models.vae import AutoencoderKL
    from pia_jax.sampling import schedulers
    from pia_jax.weights import model_dir

    def flat(cls, c, module, keymap):
        abstract = abstract_model(cls, c)  # traced once per config, without nnx.eval_shape's quadratic cost
        return model_dir.flat_params(weights.load_state_dict(abstract, numpy_state(module), keymap))

    models = {"unet": flat(UNetMotionModel, cfg.unet, unet, weights.DIFFUSERS_UNET),
              "vae": flat(AutoencoderKL, cfg.vae, vae_model, weights.DIFFUSERS_VAE),
              "text_encoder": flat(CLIPTextModel, cfg.text, text_model, weights.TRANSFORMERS_CLIP_TEXT)}
    return model_dir.save_model_dir(path, cfg, models, tokenizer=tokenizer_dir,
                                    scheduler=schedulers.to_dict(schedulers.PIA_DDIM))
