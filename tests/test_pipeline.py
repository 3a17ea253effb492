"""End-to-end sampling against diffusers' PIAPipeline, and the pipeline's sharding, caching and seeding.

The oracle is PIAPipeline with a tiny random model in `diffusers` norm semantics (what diffusers' UNetMotionModel
computes), the same weights, the same injected initial noise and VAE posterior noise, the same affinity preset,
scheduler, guidance and steps. Both sides run in fp32 on CPU and differ only in summation order through ~60 network
evaluations (text encoder, VAE encode, 2 x 6 UNet passes, VAE decode): each contributes ~1e-6 of the output scale
(see test_unet/test_vae), so TOL = 1e-4 of the frame range bounds the sum with room, while a wrong channel order,
CFG branch order, scheduler coefficient or latent scaling changes frames by 1e-2 or more.
"""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from pia_jax import affinity, config
from pia_jax.pipeline import Animator, SampleOptions
from tests import torch_models as tm
from tests.assets import write_vocab
from tests.oracle import assert_close

TOL = 1e-4
CFG = dataclasses.replace(config.TINY, unet=dataclasses.replace(config.TINY.unet, norm_semantics="diffusers"))
FRAMES, H, W = 6, 32, 48  # latents 16 x 24 (the tiny VAE downsamples by 2)
PROMPT, NEGATIVE = "hello cat", "cat"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("pia")
    write_vocab(root / "tokenizer")  # PIAPipeline pads to the tokenizer's model_max_length, which SD1.5 sets:
    (root / "tokenizer" / "tokenizer_config.json").write_text('{"model_max_length": 77}')
    modules = {"unet": tm.unet_motion(CFG.unet, seed=1), "vae": tm.vae(CFG.vae, seed=2),
               "text_encoder": tm.clip_text(CFG.text, seed=3)}
    path = tm.write_model_dir(root / "model", CFG, modules["unet"], modules["vae"], modules["text_encoder"],
                              root / "tokenizer")
    return path, modules, root / "tokenizer"


@pytest.fixture(scope="module")
def animator(tiny):
    return Animator.load(tiny[0])


def image(seed=0):
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


def diffusers_video(tiny, img, scheduler, steps, guidance, post_seed, latents_nchw, motion_scale=0, strength=1.0):
    from diffusers import PIAPipeline
    from transformers import CLIPTokenizer
    _, modules, tok = tiny
    pipe = PIAPipeline(vae=modules["vae"], text_encoder=modules["text_encoder"],
                       tokenizer=CLIPTokenizer.from_pretrained(str(tok)), unet=modules["unet"], scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        out = pipe(image=Image.fromarray(img), prompt=PROMPT, negative_prompt=NEGATIVE, num_frames=FRAMES, height=H,
                   width=W, num_inference_steps=steps, guidance_scale=guidance, motion_scale=motion_scale,
                   strength=strength, generator=torch.Generator().manual_seed(post_seed),
                   latents=torch.from_numpy(latents_nchw), output_type="np")
    return np.asarray(out.frames)


def posterior_noise(seed):
    """The noise diffusers' posterior `sample(generator)` draws first from a fresh generator, channels-last."""
    return torch.randn((1, 4, H // 2, W // 2), generator=torch.Generator().manual_seed(seed)).numpy().transpose(
        0, 2, 3, 1)


def ddim():
    from diffusers import DDIMScheduler
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear", steps_offset=1,
                         clip_sample=False, set_alpha_to_one=True)


@pytest.mark.parametrize("kind", ["ddim", "dpmpp_2m"])
def test_matches_diffusers_pia_pipeline(tiny, animator, kind):
    from diffusers import DPMSolverMultistepScheduler
    img = image()
    noise = np.random.default_rng(5).standard_normal((1, FRAMES, H // 2, W // 2, 4)).astype(np.float32)
    if kind == "ddim":
        scheduler, steps, karras = ddim(), 6, False
    else:  # the fast solver with Karras sigmas, configured from the same (PIA) betas and spacing
        scheduler = DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear",
                                                steps_offset=1, timestep_spacing="leading", use_karras_sigmas=True)
        steps, karras = 5, True
    expected = diffusers_video(tiny, img, scheduler, steps, 7.5, 11, noise.transpose(0, 4, 1, 2, 3))
    mask = affinity.preset_coefficients("small", FRAMES)[None]
    got = animator(img[None], [PROMPT], [NEGATIVE], mask, SampleOptions(steps=steps, scheduler=kind, karras=karras),
                   noise=noise, posterior_noise=posterior_noise(11))
    assert got.videos.shape == expected.shape == (1, FRAMES, H, W, 3)
    assert_close(got.videos, expected, TOL, f"{kind} video vs PIAPipeline")


def test_strength_and_no_guidance_match_diffusers(tiny, animator):
    """strength < 1 starts from the condition latent noised to the first kept step (diffusers draws that noise after
    the posterior noise; we take it as the `noise` input), and guidance 1 runs a single branch."""
    img = image(1)
    post = posterior_noise(3)
    g = torch.Generator().manual_seed(3)
    torch.randn((1, 4, H // 2, W // 2), generator=g)  # the posterior draw
    start_noise = torch.randn((1, 4, FRAMES, H // 2, W // 2), generator=g).numpy()
    ignored = np.zeros((1, 4, FRAMES, H // 2, W // 2), np.float32)  # replaced by the noised image in diffusers
    expected = diffusers_video(tiny, img, ddim(), 8, 1.0, 3, ignored, motion_scale=2, strength=0.6)
    got = animator(img[None], [PROMPT], [NEGATIVE], affinity.preset_coefficients("large", FRAMES)[None],
                   SampleOptions(steps=8, guidance_scale=1.0, strength=0.6),
                   noise=start_noise.transpose(0, 2, 3, 4, 1), posterior_noise=post)
    assert_close(got.videos, expected, TOL, "strength 0.6, no CFG")


def test_seeds_devices_and_no_recompilation(tiny, animator):
    """A video depends only on its inputs and seed: the same on 8 devices (batch padded 3 -> 8) as on one device,
    the same alone as in a batch; a second call with the same shapes compiles nothing."""
    import jax
    from jax.sharding import Mesh
    imgs = np.stack([image(i) for i in range(3)])
    masks = np.stack([affinity.preset_coefficients(p, FRAMES) for p in ("small", "loop_large", "style_small")])
    opts = SampleOptions(steps=3, scheduler="dpmpp_2m")
    args = (imgs, ["hello", "cat", "hello cat"], ["", "", "dog"], masks, opts)
    one = Animator(animator.model, Mesh(np.array(jax.devices()[:1]), ("data",)))
    a = one(*args, seeds=[1, 2, 3])
    compiled = one.compilations
    b = one(*args, seeds=[1, 2, 3])
    assert one.compilations == compiled == 3, "the second call with the same shapes must not compile"
    np.testing.assert_array_equal(a.videos, b.videos)  # a seed fully determines the output on a backend

    assert len(jax.devices()) == 8
    many = animator(*args, seeds=[1, 2, 3])
    # fp32 on the same CPU; only the per-device batch differs, which may change reduction order at ~1e-7
    assert_close(many.videos, a.videos, 1e-5, "8 devices vs 1")
    alone = one(imgs[1:2], ["cat"], [""], masks[1:2], opts, seeds=[2])
    assert_close(alone.videos[0], a.videos[1], 1e-5, "alone vs in a batch")
    np.testing.assert_array_equal(alone.noise[0], a.noise[1])
    assert not np.allclose(a.videos[0], a.videos[1])
