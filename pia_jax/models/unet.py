"""The SD1.5 UNet inflated to video, with AnimateDiff motion modules and PIA's 9-channel condition input.

Activations are channels-last with the frames of each clip folded into the batch, `(b*f, h, w, c)` with f
fastest, so every spatial layer is an image layer; only the motion modules and (in `pia` norm semantics) the
ResNet/output GroupNorm statistics look across frames. Names mirror diffusers' `UNetMotionModel`.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pia_jax.models import attention, frame_split, ip_adapter
from pia_jax.models.config import LATENT_CHANNELS, PIA_IN_CHANNELS, UNetConfig
from pia_jax.models.layers import Attention, Builder, FeedForward, nearest_resize
from pia_jax.models.motion import MotionModule

# Attention kernel per call site (see attention.py): temporal sequences are short, so XLA wins there.
DEFAULT_KERNELS = {"self": "auto", "cross": "auto", "temporal": "xla"}
# Rematerialisation policies (names in jax.checkpoint_policies) for the per-block `remat_policy` option.
REMAT_POLICIES = ("nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable", "everything_saveable")


def timestep_embedding(t, dim: int):
    """[cos | sin] sinusoidal embedding of (b,) timesteps, frequencies 1e4^(-k / (dim/2)), in fp32."""
    half = dim // 2
    freqs = jnp.exp(-np.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class ResnetBlock2D(nnx.Module):
    def __init__(self, mk: Builder, cin, cout, temb_dim, cfg: UNetConfig):
        self.frames_pooled = cfg.pooled("resnet")
        self.norm1 = mk.group_norm(cfg.norm_num_groups, cin, cfg.norm_eps)
        self.conv1 = mk.conv(cin, cout)
        self.time_emb_proj = mk.linear(temb_dim, cout)
        self.norm2 = mk.group_norm(cfg.norm_num_groups, cout, cfg.norm_eps)
        self.conv2 = mk.conv(cout, cout)
        self.conv_shortcut = mk.conv(cin, cout, kernel=1) if cin != cout else None

    def __call__(self, x, temb, frames):
        f = frames if self.frames_pooled else 1
        h = self.conv1(jax.nn.silu(self.norm1(x, f)))
        h = h + self.time_emb_proj(jax.nn.silu(temb))[:, None, None, :]
        h = self.conv2(jax.nn.silu(self.norm2(h, f)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class BasicTransformerBlock(nnx.Module):
    def __init__(self, mk: Builder, dim, heads, context_dim, kernels):
        self.norm1, self.norm2, self.norm3 = (mk.layer_norm(dim) for _ in range(3))
        self.attn1 = Attention(mk, dim, heads, kernel=kernels["self"])
        self.attn2 = Attention(mk, dim, heads, context_dim=context_dim, kernel=kernels["cross"])
        self.ff = FeedForward(mk, dim)

    def __call__(self, x_NxSxC, context):
        x_NxSxC = x_NxSxC + self.attn1(self.norm1(x_NxSxC))
        n, s, c = x_NxSxC.shape
        if context.ndim == 4:  # (b, f, T, D): each frame attends to its own text (prompt travel)
            x_NxSxC = x_NxSxC + self.attn2(self.norm2(x_NxSxC), context.reshape((n,) + context.shape[2:]))
        else:  # (b, T, D): every frame attends to the same text: fold frames into the query sequence, project
            b = context.shape[0]  # k/v once per video; the frames' rows split over devices split the sequence
            x_BxFSxC = x_NxSxC.reshape(b, (n // b) * s, c)
            with attention.queries_split(frame_split.rows_devices()):
                x_BxFSxC = x_BxFSxC + self.attn2(self.norm2(x_BxFSxC), context)
            x_NxSxC = x_BxFSxC.reshape(n, s, c)
        return x_NxSxC + self.ff(self.norm3(x_NxSxC))


class Transformer2DModel(nnx.Module):
    """Spatial transformer: per-frame GroupNorm, 1x1 conv in, self + cross attention + GEGLU, 1x1 conv out."""

    def __init__(self, mk: Builder, channels, heads, context_dim, groups, kernels):
        self.norm = mk.group_norm(groups, channels, 1e-6)
        self.proj_in = mk.conv(channels, channels, kernel=1)
        self.transformer_blocks = nnx.List([BasicTransformerBlock(mk, channels, heads, context_dim, kernels)])
        self.proj_out = mk.conv(channels, channels, kernel=1)

    def __call__(self, x, context):
        n, h, w, c = x.shape
        y = self.proj_in(self.norm(x)).reshape(n, h * w, c)
        for block in self.transformer_blocks:
            y = block(y, context)
        return x + self.proj_out(y.reshape(n, h, w, c))


class Downsample2D(nnx.Module):
    def __init__(self, mk: Builder, channels):
        self.conv = mk.conv(channels, channels, stride=2)  # pad 1: odd sizes round up, as in torch

    def __call__(self, x):
        return self.conv(x)


class Upsample2D(nnx.Module):
    def __init__(self, mk: Builder, channels):
        self.conv = mk.conv(channels, channels)

    def __call__(self, x, size=None):
        return self.conv(nearest_resize(x, size or (2 * x.shape[1], 2 * x.shape[2])))


def frame_chunks(fn, chunks: int, frames: int, rows: tuple, context):
    """fn(*rows, context) with each clip's frames in `chunks` equal chunks run one after another (a `lax.map`), so
    a layer's temporaries hold one chunk: for layers whose output at a frame depends on that frame alone.

    rows: (b*f, ...) arrays, frames fastest (activations, temb); context: (b, T, D) per video, or (b, f, T, D) per
    frame (cut with the rows). Each clip is padded at its end to chunks·k frames (k = ceil(f / chunks)); the padded
    frames are computed and dropped. A `frame_split.Chunks` also splits each chunk's frames over devices.
    """
    if isinstance(chunks, frame_split.Chunks):
        return frame_split.frame_rows(fn, chunks, frames, rows, context)
    if chunks <= 1:
        return fn(*rows, context)
    b = rows[0].shape[0] // frames
    k = -(-frames // chunks)

    def split(a, lead):  # (b, f, ...) -> (chunks, b * k, ...) or, for per-frame text, (chunks, b, k, ...)
        a = jnp.pad(a, [(0, 0), (0, chunks * k - frames)] + [(0, 0)] * (a.ndim - 2))
        a = a.reshape((b, chunks, k) + a.shape[2:]).swapaxes(0, 1)
        return a if lead else a.reshape((chunks, b * k) + a.shape[3:])

    per_frame = context.ndim == 4
    xs = tuple(split(r.reshape((b, frames) + r.shape[1:]), False) for r in rows)
    xs += (split(context, True),) if per_frame else ()
    out = jax.lax.map(lambda a: fn(*a[:len(rows)], a[-1] if per_frame else context), xs)
    out = out.reshape((chunks, b, k) + out.shape[2:]).swapaxes(0, 1)
    return out.reshape((b, chunks * k) + out.shape[3:])[:, :frames].reshape((b * frames,) + out.shape[3:])


class _Layers(nnx.Module):
    """resnet -> [spatial transformer] -> motion module, per layer; the shared body of all UNet blocks."""

    def __init__(self, mk, cfg: UNetConfig, channels, cins, cross_attention, kernels):
        heads, groups = cfg.motion_num_attention_heads, cfg.norm_num_groups
        temb_dim = 4 * cfg.block_out_channels[0]
        self.resnets = nnx.List([ResnetBlock2D(mk, cin, channels, temb_dim, cfg) for cin in cins])
        self.attentions = nnx.List([
            Transformer2DModel(mk, channels, cfg.num_attention_heads, cfg.cross_attention_dim, groups, kernels)
            for _ in cins] if cross_attention else [])
        self.motion_modules = nnx.List([
            MotionModule(mk, channels, heads, groups, cfg.motion_max_seq_length, cfg.pooled("motion"),
                         kernels["temporal"]) for _ in cins])

    def layer(self, i, x, temb, context, frames, windows=None, chunks=1, skip=None):
        """resnet -> [attention] -> motion module on x (with `skip` concatenated first: up blocks); the resnet and
        attention on `chunks` chunks of frames (`frame_chunks`), except a resnet whose GroupNorm statistics pool
        over the frames ('pia' norm semantics), which sees all of them."""
        resnet, pooled = self.resnets[i], self.resnets[i].frames_pooled
        if pooled:
            x = resnet(x if skip is None else jnp.concatenate([x, skip], axis=-1), temb, frames)

        def spatial(x, temb, *rest):
            skip, ctx = rest if len(rest) == 2 else (None, rest[0])
            if not pooled:
                x = resnet(x if skip is None else jnp.concatenate([x, skip], axis=-1), temb, 1)
            return self.attentions[i](x, ctx) if self.attentions else x

        if self.attentions or not pooled:
            rows = (x, temb) if pooled or skip is None else (x, temb, skip)
            x = frame_chunks(spatial, chunks, frames, rows, context)
        return self.motion_modules[i](x, frames, windows, chunks)


class DownBlock(_Layers):
    """CrossAttnDownBlockMotion (cross_attention=True) or DownBlockMotion."""

    def __init__(self, mk, cfg, cin, cout, cross_attention, add_downsample, kernels):
        super().__init__(mk, cfg, cout, [cin] + [cout] * (cfg.layers_per_block - 1), cross_attention, kernels)
        self.downsamplers = nnx.List([Downsample2D(mk, cout)] if add_downsample else [])

    def __call__(self, x, temb, context, frames, windows=None, chunks=1):
        skips = []
        for i in range(len(self.resnets)):
            x = self.layer(i, x, temb, context, frames, windows, chunks)
            skips.append(x)
        if self.downsamplers:
            x = frame_chunks(lambda x, _: self.downsamplers[0](x), chunks, frames, (x,), context)
            skips.append(x)
        return x, skips


class UpBlock(_Layers):
    """CrossAttnUpBlockMotion (cross_attention=True) or UpBlockMotion; consumes one skip per layer."""

    def __init__(self, mk, cfg, prev_cout, cout, skip_channels, cross_attention, add_upsample, kernels):
        self.cins = [(prev_cout if i == 0 else cout) + skip for i, skip in enumerate(skip_channels)]
        super().__init__(mk, cfg, cout, self.cins, cross_attention, kernels)
        self.upsamplers = nnx.List([Upsample2D(mk, cout)] if add_upsample else [])

    def __call__(self, x, skips, temb, context, frames, upsample_size=None, windows=None, chunks=1):
        for i in range(len(self.resnets)):
            x = self.layer(i, x, temb, context, frames, windows, chunks, skip=skips.pop())
        if self.upsamplers:
            x = frame_chunks(lambda x, _: self.upsamplers[0](x, upsample_size), chunks, frames, (x,), context)
        return x


class MidBlock(nnx.Module):
    """resnet -> spatial transformer -> [motion module] -> resnet."""

    def __init__(self, mk, cfg: UNetConfig, kernels):
        c, temb_dim = cfg.block_out_channels[-1], 4 * cfg.block_out_channels[0]
        self.resnets = nnx.List([ResnetBlock2D(mk, c, c, temb_dim, cfg) for _ in range(2)])
        self.attentions = nnx.List([Transformer2DModel(mk, c, cfg.num_attention_heads, cfg.cross_attention_dim,
                                                       cfg.norm_num_groups, kernels)])
        self.motion_modules = nnx.List([
            MotionModule(mk, c, cfg.motion_num_attention_heads, cfg.norm_num_groups, cfg.motion_max_seq_length,
                         cfg.pooled("motion"), kernels["temporal"])] if cfg.motion_mid_block else [])

    def __call__(self, x, temb, context, frames, windows=None, chunks=1):
        pooled = self.resnets[0].frames_pooled  # pooled statistics see every frame: those resnets are not chunked
        # (a two-pass chunked version measured worse, 17.5 vs 11.6 GiB at 128 frames: BENCHMARKS.md, long videos)
        x = self.resnets[0](x, temb, frames) if pooled else x
        x = frame_chunks(lambda x, temb, ctx: self.attentions[0](x if pooled else self.resnets[0](x, temb, 1), ctx),
                         chunks, frames, (x, temb), context)
        if self.motion_modules:
            x = self.motion_modules[0](x, frames, windows, chunks)
        if pooled:
            return self.resnets[1](x, temb, frames)
        return frame_chunks(lambda x, temb, _: self.resnets[1](x, temb, 1), chunks, frames, (x, temb), context)


class TimestepEmbedding(nnx.Module):
    def __init__(self, mk, cin, dim):
        self.linear_1, self.linear_2 = mk.linear(cin, dim), mk.linear(dim, dim)

    def __call__(self, x):
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


class UNetMotionModel(nnx.Module):
    """Noise prediction for video latents.

    __call__(sample, timestep, encoder_hidden_states, mask, condition, temporal_windows, frame_chunk):
      sample (b, f, h, w, 4) noisy latents; timestep scalar or (b,); encoder_hidden_states (b, 77, 768), or
      (b, f, 77, 768) for a text per frame (prompt travel; the per-video form is cheaper when all frames share one);
      mask broadcastable to (b, f, h, w, 1) (per-frame affinity), condition broadcastable to (b, f, h, w, 4)
      (condition-image latent), both only for the 9-channel model (None = zeros, the condition-dropped mode);
      temporal_windows None, or static (frames (W, L), weights (W, L), norm (f,)) arrays: the motion modules attend
      within these frame windows and blend (FreeNoise, `pia_jax.sampling.windows.WindowSchedule.arrays()`), so f
      may exceed motion_max_seq_length; frame_chunk None, or a static int: when f exceeds it, the spatial layers
      run on ceil(f / frame_chunk) chunks of frames and the motion modules on as many chunks of spatial sites,
      one chunk at a time (`frame_chunks`): the same result, with one chunk's temporaries per layer;
      image_tokens (b, ip_adapter_tokens, 768) and ip_adapter_scale (a number or (b,)), only for a UNet with an
      IP-Adapter (`ip_adapter.py`; image_tokens None there: no image prompt); frame_axis None, or the name of an
      axis of the mesh the UNet is traced under (`jax.sharding.use_abstract_mesh`): each chunk's frames (spatial
      layers) and spatial sites (motion modules) are split over its devices, about frame_chunk frames per device
      (`frame_split.py`; the sampler's context mode attention over several devices).
    Returns the predicted noise (b, f, h, w, out_channels) in fp32.

    `remat_policy` (one of REMAT_POLICIES, None = off) recomputes each down/mid/up block's activations in the
    backward pass, keeping only what the policy saves: less memory for training, same outputs.
    """

    def __init__(self, cfg: UNetConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 attention_kernels=None, remat_policy: str | None = None):
        if remat_policy is not None and remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy must be None or one of {REMAT_POLICIES}, got {remat_policy!r}")
        self.config, self.dtype, self.remat_policy = cfg, dtype, remat_policy
        kernels = {**DEFAULT_KERNELS, **(attention_kernels or {})}
        mk = Builder(rngs, dtype, param_dtype)
        chans, n = cfg.block_out_channels, len(cfg.block_out_channels)
        self.conv_in = mk.conv(cfg.in_channels, chans[0])
        self.time_embedding = TimestepEmbedding(mk, chans[0], 4 * chans[0])

        self.down_blocks = nnx.List([
            DownBlock(mk, cfg, chans[max(i - 1, 0)], chans[i], kind == "CrossAttnDownBlockMotion", i < n - 1, kernels)
            for i, kind in enumerate(cfg.down_block_types)])
        self.mid_block = MidBlock(mk, cfg, kernels)
        # skip channels in the order the up blocks pop them: conv_in output, then each down layer/downsampler
        skip_chans = [chans[0]] + [c for i, c in enumerate(chans)
                                   for _ in range(cfg.layers_per_block + (i < n - 1))]
        up = []
        for i, kind in enumerate(cfg.up_block_types):
            cout = chans[n - 1 - i]
            skips = [skip_chans.pop() for _ in range(cfg.layers_per_block + 1)]
            up.append(UpBlock(mk, cfg, chans[n - i] if i else chans[-1], cout, skips,
                              kind == "CrossAttnUpBlockMotion", i < n - 1, kernels))
        self.up_blocks = nnx.List(up)
        self.conv_norm_out = mk.group_norm(cfg.norm_num_groups, chans[0], cfg.norm_eps)
        self.conv_out = mk.conv(chans[0], cfg.out_channels)
        if cfg.ip_adapter_tokens:  # IP-Adapter: decoupled cross-attentions (to_k_ip / to_v_ip)
            ip_adapter.add_ip_attention(self, mk, cfg)

    def __call__(self, sample, timestep, encoder_hidden_states, mask=None, condition=None, temporal_windows=None,
                 frame_chunk: int | None = None, image_tokens=None, ip_adapter_scale=1.0,
                 frame_axis: str | None = None):
        cfg = self.config
        b, f, h, w, _ = sample.shape
        x = sample
        if cfg.in_channels == 9:  # PIA: [noisy latent | affinity mask | condition latent]
            mask = jnp.zeros(()) if mask is None else mask
            condition = jnp.zeros(()) if condition is None else condition
            x = jnp.concatenate([sample, jnp.broadcast_to(mask, (b, f, h, w, 1)).astype(sample.dtype),
                                 jnp.broadcast_to(condition, (b, f, h, w, 4)).astype(sample.dtype)], axis=-1)
        elif mask is not None or condition is not None:
            raise ValueError(f"a {cfg.in_channels}-channel UNet takes no mask/condition input")
        if x.shape[-1] != cfg.in_channels:
            raise ValueError(f"expected {cfg.in_channels} input channels, got {x.shape[-1]}")
        x = x.reshape(b * f, h, w, cfg.in_channels).astype(self.dtype)

        t = jnp.broadcast_to(jnp.asarray(timestep), (b,))
        temb = self.time_embedding(timestep_embedding(t, cfg.block_out_channels[0]).astype(self.dtype))
        temb = jnp.repeat(temb, f, axis=0)  # (b*f, 4*c0), f fastest
        context = encoder_hidden_states.astype(self.dtype)
        if context.ndim == 4 and context.shape[1] == 1:  # one text for all frames: the per-video path
            context = context[:, 0]
        if context.ndim == 4 and context.shape[:2] != (b, f):
            raise ValueError(f"per-frame text states must be (b, f, T, D) = ({b}, {f}, ...), got {context.shape}")
        context = ip_adapter.append_image_tokens(context, image_tokens, ip_adapter_scale, cfg.ip_adapter_tokens)
        win = temporal_windows
        if frame_chunk is not None and frame_chunk < 1:
            raise ValueError(f"frame_chunk must be None or >= 1, got {frame_chunk}")
        n = 1 if frame_chunk is None else -(-f // frame_chunk)
        if frame_axis is not None:  # a device's part of a chunk: about frame_chunk frames
            n = frame_split.Chunks(-(-n // frame_split.devices(frame_axis)), frame_axis)

        x = self.conv_in(x)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = self._run(lambda blk, x, temb, ctx: blk(x, temb, ctx, f, win, n), block, x, temb,
                                       context)
            skips += block_skips
        x = self._run(lambda blk, x, temb, ctx: blk(x, temb, ctx, f, win, n), self.mid_block, x, temb, context)
        for block in self.up_blocks:
            layer_skips = skips[len(skips) - len(block.resnets):]
            del skips[len(skips) - len(block.resnets):]
            # the next block's skips fix the upsampled size (matters when h, w are not multiples of 2**blocks)
            size = skips[-1].shape[1:3] if skips else None
            x = self._run(lambda blk, x, sk, temb, ctx, size=size: blk(x, sk, temb, ctx, f, size, win, n), block,
                          x, layer_skips, temb, context)
        x = jax.nn.silu(self.conv_norm_out(x, f if cfg.pooled("out") else 1))
        x = self.conv_out(x)
        return x.reshape(b, f, h, w, -1).astype(jnp.float32)

    def _run(self, fn, block, *args):
        """fn(block, *args), under `nnx.remat` with the configured policy when rematerialisation is on."""
        if self.remat_policy is None:
            return fn(block, *args)
        return nnx.remat(fn, policy=getattr(jax.checkpoint_policies, self.remat_policy))(block, *args)


def widen_conv_in_kernel(kernel, in_axis: int):
    """A 4-channel conv_in kernel with zero input channels appended up to PIA's input layout
    (`config.PIA_INPUT_CHANNELS`): PIA's training start from plain AnimateDiff. `in_axis` is the input-channel
    axis: 2 in NNX's (kh, kw, in, out) layout, 1 in PyTorch's (out, in, kh, kw). NumPy or JAX arrays."""
    if kernel.shape[in_axis] != LATENT_CHANNELS:
        raise ValueError(f"conv_in has {kernel.shape[in_axis]} input channels; only a {LATENT_CHANNELS}-channel one "
                         "is widened")
    pad = [(0, 0)] * kernel.ndim
    pad[in_axis] = (0, PIA_IN_CHANNELS - LATENT_CHANNELS)
    return np.pad(kernel, pad) if isinstance(kernel, np.ndarray) else jnp.pad(kernel, pad)


def widen_conv_in(unet: UNetMotionModel, rngs: nnx.Rngs) -> UNetMotionModel:
    """A 4-channel UNet with zero-initialized condition channels in conv_in (`widen_conv_in_kernel`).

    The first 4 input channels and the bias are kept, so the widened model computes exactly what the 4-channel one
    did whatever the mask and condition inputs are.
    """
    old = unet.conv_in
    mk = Builder(rngs, old.dtype, old.param_dtype)
    new = mk.conv(PIA_IN_CHANNELS, old.kernel.shape[3])
    new.kernel[...] = widen_conv_in_kernel(old.kernel[...], in_axis=2)
    new.bias[...] = old.bias[...]
    unet.conv_in = new
    unet.config = dataclasses.replace(unet.config, in_channels=PIA_IN_CHANNELS)
    return unet
