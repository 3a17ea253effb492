"""Few-step text-to-video from converted AnimateLCM and AnimateDiff-Lightning files against diffusers.

The downloads are written in their real layouts with tiny random weights: a diffusers SD1.5 folder as the base;
AnimateLCM's repository root (a diffusers MotionAdapter folder: config.json + diffusion_pytorch_model.safetensors),
its original-layout `AnimateLCM_sd15_t2v.ckpt` and its spatial LoRA `AnimateLCM_sd15_t2v_lora.safetensors` (kohya
`lora_unet_<diffusers module>` keys with alphas on LCM-LoRA's target modules, alpha/rank = 1/8: the scale
AnimateLCM's own loader hard-codes);
AnimateDiff-Lightning's `animatediff_lightning_4step_diffusers.safetensors` (a MotionAdapter state dict: its README
loads it with `MotionAdapter().load_state_dict`, strict, which the oracle does too) and its `_comfyui` twin (the
AnimateDiff layout).

Oracle: diffusers' `AnimateDiffPipeline` set up as each README says (LCMScheduler / EulerDiscreteScheduler
`.from_config` of an SD1.5 scheduler config with linear betas, + trailing spacing for Lightning; the LCM LoRA through
`load_lora_weights` + `set_adapters([...], [0.8])`), with our seeded initial noise and, for LCM, our per-step noise
in place of its generator's. Both sides run fp32 and differ by summation order (~1e-6 of the scale per UNet call,
tests/test_unet.py): the float frames differ by at most 1.1e-6 here (both samplers), so as 8-bit levels they may
differ by one where the rounding falls between them; asserted: one level, and FRAME_TOL = 2e-5 on the float frames.
That tolerance has teeth: starting Euler from the noise itself instead of diffusers' init_noise_sigma-scaled noise
(0.23 % smaller) moves the frames by 4.4e-4 and still passes the one-level test.
"""

import dataclasses

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import convert_torch_weights
from pia_jax.models import config
from pia_jax.sampling import noise as noise_lib
from pia_jax.weights import read_state_dict
from pia_jax.weights.convert import animatediff
from pia_jax.weights.convert import diffusers_folder as dfolder
from tests import ldm_writer
from tests import torch_models as tm
from tests.helpers import kohya
from tests.oracle import numpy_state, randomize

# One pytest-xdist worker runs the module, so the downloads fixture is written once.
pytestmark = [pytest.mark.filterwarnings("ignore:::peft", "ignore:::diffusers"), pytest.mark.xdist_group("few_step")]
UNET = dataclasses.replace(  # AnimateDiff v2's layout (mid-block motion module, 32 positions), small
    config.TINY.unet, in_channels=4, norm_semantics="diffusers", block_out_channels=(16, 32),
    down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"),
    up_block_types=("UpBlockMotion", "CrossAttnUpBlockMotion"), layers_per_block=1, num_attention_heads=2,
    motion_num_attention_heads=2, norm_num_groups=4, motion_mid_block=True, motion_max_seq_length=32)
CFG = dataclasses.replace(config.TINY, unet=UNET)
FRAMES, H, W, SEED, PROMPT, NEGATIVE = 4, 16, 16, 7, "a cat walking", "bad quality"
FRAME_TOL = 2e-5  # frames in [0, 1]; measured 1.1e-6 (see the module docstring)
LCM_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                    "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")


@pytest.fixture(scope="module")
def downloads(tmp_path_factory):
    root = tmp_path_factory.mktemp("few-step")
    base = root / "epiCRealism"
    models = tm.write_diffusers_base(base, CFG, seed=0)
    (base / "tokenizer" / "tokenizer_config.json").write_text('{"model_max_length": 77}')
    lcm_dir = root / "AnimateLCM"
    lcm = tm.write_motion_adapter(lcm_dir, UNET, seed=1)
    state = {k: v.detach().clone() for k, v in lcm.state_dict().items()}
    torch.save(ldm_writer.animatediff_checkpoint(state, UNET.motion_max_seq_length),
               lcm_dir / "AnimateLCM_sd15_t2v.ckpt")
    unet_sd = numpy_state(models["unet"])
    targets = [m for m in unet_sd if m.endswith(".weight") and m[:-7].endswith(LCM_LORA_TARGETS)]
    save_file(kohya(unet_sd, "lora_unet", [m[:-7] for m in targets], seed=2, rank=4, alpha=0.5, conv_rank=4,
                    conv_alpha=0.5), str(lcm_dir / "AnimateLCM_sd15_t2v_lora.safetensors"))
    lightning = randomize(tm.motion_adapter(UNET), 3).eval()
    state = {k: v.detach().clone() for k, v in lightning.state_dict().items()}
    save_file({k: v.numpy() for k, v in state.items()}, str(root / "animatediff_lightning_4step_diffusers.safetensors"))
    comfy = ldm_writer.animatediff_checkpoint(state, UNET.motion_max_seq_length)
    save_file({k: v.numpy() for k, v in comfy.items()}, str(root / "animatediff_lightning_4step_comfyui.safetensors"))
    return root, models


def convert(root, out, motion, *extra) -> str:
    args = ["--base", root / "epiCRealism", "--motion", motion, "--out", out, "--norm-semantics", "diffusers",
            "--motion-heads", UNET.motion_num_attention_heads, *extra]
    assert convert_torch_weights.main([str(a) for a in args]) == 0
    return str(out)


def test_each_release_layout_converts_to_the_same_motion_modules(downloads):
    """AnimateLCM's folder and .ckpt, and Lightning's diffusers and ComfyUI files, hold the same tensors in two
    layouts: both read to the same motion modules (exactly), with the mid block and 32 positions."""
    root, _ = downloads
    folder, _ = dfolder.read_component(root / "AnimateLCM", "motion")
    pairs = ((folder, read_state_dict(root / "AnimateLCM" / "AnimateLCM_sd15_t2v.ckpt")),
             (load_file(str(root / "animatediff_lightning_4step_diffusers.safetensors")),
              read_state_dict(root / "animatediff_lightning_4step_comfyui.safetensors")))
    for diffusers_layout, original_layout in pairs:
        (a, _, info_a), (b, _, info_b) = map(animatediff.convert_motion_checkpoint, (diffusers_layout, original_layout))
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
        for info in (info_a, info_b):
            assert (info["mid_block"], info["max_seq_length"], info["conv_in_channels"]) == (True, 32, None)


def reference_pipeline(root, models, adapter, scheduler):
    from diffusers import AnimateDiffPipeline, DDIMScheduler
    from transformers import CLIPTokenizer
    sd15 = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                         clip_sample=False, set_alpha_to_one=False)  # SD1.5's (and epiCRealism's) scheduler config
    pipe = AnimateDiffPipeline(vae=models["vae"], text_encoder=models["text_encoder"],
                               tokenizer=CLIPTokenizer.from_pretrained(str(root / "epiCRealism" / "tokenizer")),
                               unet=models["unet"], motion_adapter=adapter, scheduler=scheduler(sd15.config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_frames(pipe, noise, guidance, negative=None) -> np.ndarray:
    with torch.no_grad():
        return pipe(prompt=PROMPT, negative_prompt=negative, num_frames=FRAMES, height=H, width=W,
                    num_inference_steps=4, guidance_scale=guidance, output_type="np",
                    latents=torch.from_numpy(noise.transpose(0, 4, 1, 2, 3))).frames[0]


def check_frames(got, expected, what):
    """Within one 8-bit level, and the float frames within FRAME_TOL."""
    levels = [np.round(np.clip(f, 0, 1) * 255).astype(np.int32) for f in (got, expected)]
    err = float(np.abs(got - expected).max())
    print(f"{what}: max frame difference {err:.3g}, levels {np.abs(levels[0] - levels[1]).max()}")
    assert np.abs(levels[0] - levels[1]).max() <= 1, what
    assert err <= FRAME_TOL, what


def test_few_step_text_to_video_matches_diffusers(downloads, tmp_path, capsys, monkeypatch):
    """Converted by convert_torch_weights.py (the scheduler config picked by the motion name), sampled by one
    Animator: Lightning's 4-step diffusers file with euler (4 steps, guidance 1: no unconditional half), then, its
    UNet swapped in (update_unet: the same architecture, no new UNet compile), base + AnimateLCM's folder + its LoRA
    at 0.8 with lcm (4 steps, guidance 2, step noise from the seed)."""
    from diffusers import EulerDiscreteScheduler, LCMScheduler, MotionAdapter
    from diffusers.schedulers import scheduling_lcm

    from pia_jax.sampling.animator import Animator
    from pia_jax.sampling.options import SampleOptions
    from pia_jax.weights.model_dir import load_model_dir, read_config

    root, models = downloads
    motion = root / "animatediff_lightning_4step_diffusers.safetensors"
    lora = root / "AnimateLCM" / "AnimateLCM_sd15_t2v_lora.safetensors"
    lightning = convert(root, tmp_path / "lightning", motion)
    lcm = convert(root, tmp_path / "lcm", root / "AnimateLCM", "--lora", f"{lora}:0.8")
    log = capsys.readouterr().out
    assert "scheduler config: lightning (by the motion name)" in log and "scheduler config: animatelcm" in log
    assert read_config(lcm)[1] == config.to_dict(config.SCHEDULER_PRESETS["animatelcm"])
    animator = Animator.load(lightning)
    assert animator.scheduler_config == config.SCHEDULER_PRESETS["lightning"]  # LCM's steps ignore the spacing
    noise, keys = noise_lib.draw([SEED], CFG.vae.latent_shape(H, W, FRAMES))[::2]
    euler = SampleOptions(steps=4, scheduler="euler", guidance_scale=1.0)
    assert not euler.cfg
    got_euler = animator((H, W), [PROMPT], [""], np.ones((1, FRAMES)), euler, seeds=[SEED],
                         float_frames=True).videos[0]
    animator.update_unet(load_model_dir(lcm).unet)
    got_lcm = animator((H, W), [PROMPT], [NEGATIVE], np.ones((1, FRAMES)),
                       SampleOptions(steps=4, scheduler="lcm", guidance_scale=2.0), seeds=[SEED],
                       float_frames=True).videos[0]

    adapter = MotionAdapter(block_out_channels=UNET.block_out_channels, motion_layers_per_block=1,
                            motion_num_attention_heads=UNET.motion_num_attention_heads, motion_norm_num_groups=4)
    adapter.load_state_dict({k: torch.from_numpy(v) for k, v in load_file(str(motion)).items()})  # strict, as README
    pipe = reference_pipeline(root, models, adapter, lambda c: EulerDiscreteScheduler.from_config(
        c, timestep_spacing="trailing", beta_schedule="linear"))
    check_frames(got_euler, reference_frames(pipe, noise, 1.0), "lightning")

    steps = [np.asarray(noise_lib.step_noise(keys, i, noise.shape[1:])).transpose(0, 4, 1, 2, 3) for i in range(4)]
    draws = iter(steps)
    monkeypatch.setattr(scheduling_lcm, "randn_tensor", lambda shape, **kw: torch.from_numpy(next(draws).copy()))
    pipe = reference_pipeline(root, models, MotionAdapter.from_pretrained(str(root / "AnimateLCM")),
                              lambda c: LCMScheduler.from_config(c, beta_schedule="linear"))
    pipe.load_lora_weights(str(lora), adapter_name="lcm-lora")
    pipe.set_adapters(["lcm-lora"], [0.8])
    check_frames(got_lcm, reference_frames(pipe, noise, 2.0, NEGATIVE), "animatelcm")
    assert len(list(draws)) == 1  # 3 of the 4 steps drew noise: the last returns the denoised sample


def test_scheduler_config_choice(downloads):
    """--scheduler-config overrides the name's guess; a bad name is refused before any reading."""
    from pia_jax.weights.convert.presets import scheduler_preset
    root, _ = downloads
    assert scheduler_preset(root / "mm_sd_v15_v2.ckpt") == "pia"
    assert scheduler_preset(root / "AnimateLCM") == "animatelcm"
    assert scheduler_preset(root / "animatediff_lightning_8step_comfyui.safetensors") == "lightning"
    assert scheduler_preset(root / "animatediff_lightning_8step_comfyui.safetensors", "pia") == "pia"
    with pytest.raises(SystemExit):
        convert_torch_weights.parse(["--base", "b", "--motion", "m", "--out", "o", "--scheduler-config", "lcm"])


def test_pia_image_animation_with_lcm_matches_diffusers(tmp_path, monkeypatch):
    """PIA models may sample with lcm too (no distilled PIA weights exist: this checks the plumbing, not quality): a
    small random PIA model (9-channel conv_in, no mid-block motion module), 4 LCM steps at guidance 2, against
    diffusers' PIAPipeline with LCMScheduler, our initial noise, posterior noise and step noise. Float frames within
    1e-4 of the range, as tests/test_sampling.py (~20 network evaluations of ~1e-6 each; measured 1.3e-6)."""
    from diffusers import LCMScheduler, PIAPipeline
    from diffusers.schedulers import scheduling_lcm
    from PIL import Image
    from transformers import CLIPTokenizer

    from pia_jax.sampling import Animator, SampleOptions, affinity
    from tests.assets import write_vocab
    from tests.oracle import assert_close

    cfg = dataclasses.replace(CFG, unet=dataclasses.replace(UNET, in_channels=9, motion_mid_block=False))
    write_vocab(tmp_path / "tokenizer")
    (tmp_path / "tokenizer" / "tokenizer_config.json").write_text('{"model_max_length": 77}')
    unet, vae, text = tm.unet_motion(cfg.unet, seed=4), tm.vae(cfg.vae, seed=5), tm.clip_text(cfg.text, seed=6)
    path = tm.write_model_dir(tmp_path / "pia", cfg, unet, vae, text, tmp_path / "tokenizer")
    img = np.random.default_rng(2).integers(0, 256, (H, W, 3), dtype=np.uint8)
    shape = cfg.vae.latent_shape(H, W, FRAMES)
    noise = np.random.default_rng(6).standard_normal((1,) + shape).astype(np.float32)
    post = torch.randn((1, 4) + shape[1:3], generator=torch.Generator().manual_seed(13))  # the posterior's draw
    post = post.numpy().transpose(0, 2, 3, 1)
    got = Animator.load(path)(img[None], [PROMPT], [NEGATIVE], affinity.preset_affinity("small", FRAMES)[None],
                              SampleOptions(steps=4, scheduler="lcm", guidance_scale=2.0), seeds=[SEED],
                              noise=noise, posterior_noise=post, float_frames=True)

    keys = noise_lib.draw([SEED], shape)[2]
    draws = iter([np.asarray(noise_lib.step_noise(keys, i, shape)).transpose(0, 4, 1, 2, 3) for i in range(3)])
    monkeypatch.setattr(scheduling_lcm, "randn_tensor", lambda shape, **kw: torch.from_numpy(next(draws).copy()))
    pipe = PIAPipeline(vae=vae, text_encoder=text, unet=unet,
                       tokenizer=CLIPTokenizer.from_pretrained(str(tmp_path / "tokenizer")),
                       scheduler=LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear"))
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        expected = pipe(image=Image.fromarray(img), prompt=PROMPT, negative_prompt=NEGATIVE, num_frames=FRAMES,
                        height=H, width=W, num_inference_steps=4, guidance_scale=2.0, motion_scale=0,
                        generator=torch.Generator().manual_seed(13), output_type="np",
                        latents=torch.from_numpy(noise.transpose(0, 4, 1, 2, 3))).frames
    assert_close(got.videos, np.asarray(expected), 1e-4, "PIA with lcm vs PIAPipeline")
