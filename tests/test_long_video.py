"""Long videos and prompt travel on a tiny 4-channel (text-to-video) UNet against diffusers, at the UNet level and
through sample.py with one window. The many-window command-line cases of both context modes are in
tests/test_context_modes.py (which replaced the FreeNoise + prompt-travel sampling loop that was here).

The memory-bounded alternative, `windowed_eps` (whole UNet per window), has no diffusers counterpart; its oracle is
diffusers' UNetMotionModel run on each window with the per-frame text slice, blended by the weighted mean formula.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from pia_jax import weights
from pia_jax.models import config
from pia_jax.models.abstract import abstract_model
from pia_jax.models.text_encoder import CLIPTextModel
from pia_jax.models.tokenizer import load_tokenizer, tokenize
from pia_jax.models.unet import UNetMotionModel
from pia_jax.sampling import prompt_travel, windows
from tests import torch_models as tm
from tests.assets import write_vocab
from tests.oracle import assert_close, numpy_state

UNET_TOL = 2e-5  # one UNet evaluation, fp32 both sides (tests/test_unet.py)
# Small enough to compile fast; still cross-attention down/up blocks, a plain down/up block and the mid block.
UNET = dataclasses.replace(
    config.TINY.unet, in_channels=4, norm_semantics="diffusers", block_out_channels=(16, 32),
    down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"),
    up_block_types=("UpBlockMotion", "CrossAttnUpBlockMotion"), layers_per_block=1, num_attention_heads=2,
    motion_num_attention_heads=2, norm_num_groups=4)
CFG = dataclasses.replace(config.TINY, unet=UNET)
STRIDE, H, W = 2, 16, 16  # latents 8 x 8
NEGATIVE, STEPS, GUIDANCE = "cat", 3, 7.5


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tok_dir = tmp_path_factory.mktemp("t2v") / "tokenizer"
    write_vocab(tok_dir)
    (tok_dir / "tokenizer_config.json").write_text('{"model_max_length": 77}')
    unet, text = tm.unet_motion(UNET, seed=1), tm.clip_text(CFG.text, seed=3)
    ours_unet = weights.load_state_dict(abstract_model(UNetMotionModel, UNET),
                                        numpy_state(unet), weights.DIFFUSERS_UNET)
    state = {("" if k.startswith("text_model.") else "text_model.") + k: v for k, v in numpy_state(text).items()}
    ours_text = weights.load_state_dict(abstract_model(CLIPTextModel, CFG.text), state,
                                        weights.TRANSFORMERS_CLIP_TEXT)
    return {"unet": unet, "text": text, "tok_dir": tok_dir, "ours_unet": ours_unet, "ours_text": ours_text}


def jit_unet(model, **static):
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda st, x, t, ctx: nnx.merge(graphdef, st)(x, t, ctx, **static))
    return lambda x, t, ctx: fn(state, x, t, ctx)


def per_frame_text(models, prompts: dict, num_frames):
    """Our prompt travel: encode each key's prompt, interpolate to (num_frames, 77, D)."""
    keys = sorted(prompts)
    ids = tokenize(load_tokenizer(models["tok_dir"]), [prompts[k] for k in keys])
    embeds = models["ours_text"](jnp.asarray(ids))
    return prompt_travel.interpolate(embeds, *prompt_travel.interpolation(keys, num_frames))


def torch_unet_per_frame(model, x, t, context_BxFxTxD):
    """diffusers' UNetMotionModel with one text state per frame, (b*f, T, D) as its FreeNoise path passes them."""
    b, f = x.shape[:2]
    ctx = np.asarray(context_BxFxTxD).reshape((b * f,) + context_BxFxTxD.shape[2:])
    with torch.no_grad():
        out = model(torch.from_numpy(np.asarray(x)).permute(0, 4, 1, 2, 3), torch.tensor(t), torch.from_numpy(ctx))
    return out.sample.permute(0, 2, 3, 4, 1).numpy()


def test_per_frame_context_and_full_windows(models):
    """Per-frame text states (b, f, T, D) against diffusers given one state per frame, and given the same state on
    every frame (what the per-video path computes: tests/test_unet.py); windowed eps with a window as long as the video equals the plain UNet (the
    blend divides w·eps by w: within fp32 rounding, bounded by UNET_TOL; one fusion window: tests/test_windows.py)."""
    rng = np.random.default_rng(0)
    b, f, t = 2, 6, 500
    x = rng.standard_normal((b, f, 8, 8, 4), np.float32)
    per_video = rng.standard_normal((b, 77, 32), np.float32)
    per_frame = rng.standard_normal((b, f, 77, 32), np.float32)
    unet = models["ours_unet"]
    full = windows.WindowSchedule(f, 16, 4, "pyramid")
    graphdef, state = nnx.split(unet)

    @jax.jit
    def run(st, x, ctx):
        model = nnx.merge(graphdef, st)
        eps = lambda xw, fr: model(xw, t, jnp.take(ctx, fr[0], axis=1))
        return model(x, t, ctx), windows.windowed_eps(eps, x, full)

    plain, windowed = run(state, x, per_frame)
    assert_close(plain, torch_unet_per_frame(models["unet"], x, t, per_frame), UNET_TOL, "per-frame context")
    assert_close(windowed, plain, UNET_TOL, "windowed eps, one window")
    shared, _ = run(state, x, np.repeat(per_video[:, None], f, axis=1))
    assert_close(shared, tm.run_unet_motion(models["unet"], x, t, per_video), UNET_TOL, "one text on every frame")


def test_windowed_eps_matches_per_window_diffusers(models):
    """Context windows at the noise-prediction level on a 20-frame video (windows 0-7, 4-11, 8-15, 12-19), two
    windows per UNet batch, prompt travel context sliced per window: against diffusers' UNetMotionModel on each
    window and the weighted mean sum_w w·eps_w / sum_w w computed here in float64."""
    n, t = 20, 700
    sched = windows.WindowSchedule(n, 8, 4, "pyramid")
    x = np.random.default_rng(1).standard_normal((1, n, 8, 8, 4)).astype(np.float32)
    context = np.asarray(per_frame_text(models, {0: "hello cat", 12: "a dog"}, n))[None]  # (1, n, 77, D)
    graphdef, state = nnx.split(models["ours_unet"])

    @jax.jit
    def run(st, x, ctx):
        model = nnx.merge(graphdef, st)

        def eps(xw, frames_KxL):  # xw (b·k, L, ...): the context's windows folded the same way
            return model(xw, t, windows.take_windows(ctx, frames_KxL))
        return windows.windowed_eps(eps, x, sched, window_batch=2)

    got = run(state, x, context)
    acc, den = np.zeros(x.shape), np.zeros(n)
    for frames, w in zip(sched.frames, sched.weights):
        acc[:, frames] += w[None, :, None, None, None] * torch_unet_per_frame(models["unet"], x[:, frames], t,
                                                                             context[:, frames])
        den[frames] += w
    assert_close(got, acc / den[None, :, None, None, None], UNET_TOL, "windowed eps vs per-window diffusers")


def test_per_frame_context_must_match_the_frames(models):
    x = np.zeros((1, 4, 8, 8, 4), np.float32)
    with pytest.raises(ValueError, match=r"per-frame text states must be \(b, f, T, D\) = \(1, 4, ...\)"):
        models["ours_unet"](x, 1, np.zeros((1, 3, 77, 32), np.float32))


def test_text_to_video_cli_matches_diffusers_animatediff(models, tmp_path, capsys):
    """sample.py on a 4-channel model directory: text-to-video without --image, a prompt map (travel), the injected
    noise, against AnimateDiffPipeline with the same prompt dict (free noise on, one window of all frames, so nothing
    is rescheduled). Frames are written as 8-bit PNGs: the float frames agree to ~1e-5 (as the latents do,
    tests/test_context_modes.py), so the written values differ by at most one level where the rounding falls between them."""
    from diffusers import AnimateDiffPipeline, DDIMScheduler
    from PIL import Image
    from transformers import CLIPTokenizer

    import sample

    frames = 8
    vae = tm.vae(CFG.vae, seed=2)
    path = tm.write_model_dir(tmp_path / "t2v", CFG, models["unet"], vae, models["text"], models["tok_dir"])
    noise = torch.randn((1, 4, frames, H // 2, W // 2), generator=torch.Generator().manual_seed(3))
    pipe = AnimateDiffPipeline(vae=vae, text_encoder=models["text"],
                               tokenizer=CLIPTokenizer.from_pretrained(str(models["tok_dir"])),
                               unet=tm.unet_motion(UNET, seed=1), motion_adapter=tm.motion_adapter(UNET),
                               scheduler=DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear",
                                                       steps_offset=1, clip_sample=False, set_alpha_to_one=True))
    pipe.set_progress_bar_config(disable=True)
    pipe.enable_free_noise(context_length=frames, context_stride=STRIDE)
    with torch.no_grad():
        expected = pipe(prompt={0: "hello cat", 5: "a dog"}, negative_prompt=NEGATIVE, num_frames=frames, height=H,
                        width=W, num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=noise,
                        output_type="np").frames[0]
    np.save(tmp_path / "noise.npy", noise.numpy().transpose(0, 2, 3, 4, 1))
    np.save(tmp_path / "post.npy", np.zeros((1, H // 2, W // 2, 4), np.float32))
    code = sample.main([str(a) for a in (
        "--model", path, "--prompt-map", "0:hello cat", "5:a dog", "--negative-prompt", NEGATIVE, "--frames", frames,
        "--steps", STEPS, "--guidance", GUIDANCE, "--height", H, "--width", W, "--noise", tmp_path / "noise.npy",
        "--posterior-noise", tmp_path / "post.npy", "--format", "png", "--out", tmp_path / "out", "--no-progress",
        "--compile-cache", "off")])
    io = capsys.readouterr()
    assert code == 0, io.err
    written = sorted((tmp_path / "out" / "t2v-hello-cat-travel-42_frames").glob("*.png"))
    got = np.stack([np.asarray(Image.open(f)) for f in written]).astype(np.int32)
    assert got.shape == (frames, H, W, 3)
    want = np.round(np.clip(expected, 0, 1) * 255).astype(np.int32)
    assert np.abs(got - want).max() <= 1, np.abs(got - want).max()
