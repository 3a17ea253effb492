"""End-to-end sampling against diffusers' PIAPipeline, and the sampler's sharding, compiling, batching and seeding.

The oracle is PIAPipeline with a tiny random model in `diffusers` norm semantics (what diffusers' UNetMotionModel
computes), the same weights, the same injected initial noise and VAE posterior noise, the same affinity preset,
scheduler, guidance and steps. Both sides run in fp32 on CPU and differ only in summation order through ~60 network
evaluations (text encoder, VAE encode, 2 x 6 UNet passes, VAE decode): each contributes ~1e-6 of the output scale
(see test_unet/test_vae), so TOL = 1e-4 of the frame range bounds the sum with room, while a wrong channel order,
CFG branch order, scheduler coefficient or latent scaling changes frames by 1e-2 or more.
"""

import dataclasses

import jax
import numpy as np
import pytest
import torch
from PIL import Image

from pia_jax.models import config
from pia_jax.sampling import Animator, SampleOptions, affinity
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
    mask = affinity.preset_affinity("small", FRAMES)[None]
    got = animator(img[None], [PROMPT], [NEGATIVE], mask, SampleOptions(steps=steps, scheduler=kind, karras=karras),
                   noise=noise, posterior_noise=posterior_noise(11), float_frames=True)
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
    got = animator(img[None], [PROMPT], [NEGATIVE], affinity.preset_affinity("large", FRAMES)[None],
                   SampleOptions(steps=8, guidance_scale=1.0, strength=0.6),
                   noise=start_noise.transpose(0, 2, 3, 4, 1), posterior_noise=post, float_frames=True)
    assert_close(got.videos, expected, TOL, "strength 0.6, no CFG")


def test_seeds_devices_and_no_recompilation(tiny, animator):
    """A video depends only on its inputs and seed: the same on 8 devices (3 videos on 3 pairs) as on one device,
    the same alone as in a batch; a second call with the same shapes compiles nothing."""
    from jax.sharding import Mesh
    imgs = np.stack([image(i) for i in range(3)])
    masks = np.stack([affinity.preset_affinity(p, FRAMES) for p in ("small", "loop_large", "style_small")])
    opts = SampleOptions(steps=3, scheduler="dpmpp_2m")
    args = (imgs, ["hello", "cat", "hello cat"], ["", "", "dog"], masks, opts)
    one = Animator.load(tiny[0], mesh=Mesh(np.array(jax.devices()[:1]), ("data",)))
    a = one(*args, seeds=[1, 2, 3], float_frames=True)
    compiled = one.compilations
    b = one(*args, seeds=[1, 2, 3], float_frames=True)
    assert compiled == 3, "encode, denoise and decode compile once for a batch that fits in memory"
    assert one.compilations == compiled, "the second call with the same shapes must not compile"
    np.testing.assert_array_equal(a.videos, b.videos)  # a seed fully determines the output on a backend

    assert len(jax.devices()) == 8
    many = animator(*args, seeds=[1, 2, 3], float_frames=True)
    # fp32 on the same CPU; only the per-device batch differs, which may change reduction order at ~1e-7
    assert_close(many.videos, a.videos, 1e-5, "8 devices vs 1")
    alone = one(imgs[1:2], ["cat"], [""], masks[1:2], opts, seeds=[2], float_frames=True)
    assert_close(alone.videos[0], a.videos[1], 1e-5, "alone vs in a batch")
    np.testing.assert_array_equal(alone.noise[0], a.noise[1])
    assert not np.allclose(a.videos[0], a.videos[1])


def test_loop_compiles_once_for_any_steps_strength_guidance_eta(animator):
    """The denoising loop is one program per (shape, scheduler kind, guidance on/off): calls with other step counts,
    strengths, guidance scales and eta compile nothing new (Karras sigmas and DPM-Solver: test_schedulers.py)."""
    img, mask = image(2)[None, :16, :16], affinity.preset_affinity("small", 2)[None]  # a shape no other test uses
    before = (animator._encode.compiles, animator._denoise.compiles, animator._decode.compiles)
    for options in (SampleOptions(steps=2), SampleOptions(steps=3, strength=0.7, guidance_scale=3.0, eta=0.5),
                    SampleOptions(steps=1, guidance_scale=12.0)):
        animator(img, ["hello"], ["cat"], mask, options, seeds=[5])
    assert (animator._encode.compiles, animator._denoise.compiles, animator._decode.compiles) == \
        tuple(b + 1 for b in before)


def test_batches_equal_videos_one_by_one(tiny, tmp_path, monkeypatch):
    """A batch file of 4 videos on 2 devices with memory for one video per device runs as 2 batches through the same
    programs, and every video equals the same video made alone (bit for bit: the same program on the same data)."""
    from jax.sharding import Mesh

    from pia_jax.sampling import cases, memory
    Image.fromarray(image(3)).save(tmp_path / "img.png")
    (tmp_path / "cases.yaml").write_text(f"""
defaults: {{frames: 3, steps: 2, size: 16, scheduler: dpmpp_2m}}
cases:
  - {{image: {tmp_path / 'img.png'}, prompts: [hello, cat, hello cat], motion: [small, loop_small], seed: 1}}
""")
    videos = cases.read_batch_file(tmp_path / "cases.yaml", cases.Settings(), 42)[:4]
    plan = cases.plan(tiny[0], videos, tmp_path / "out")
    (group,) = plan.groups
    two = Animator.load(tiny[0], mesh=Mesh(np.array(jax.devices()[:2]), ("data",)))
    one, two_videos = (two.batch_bytes(n, group.height, group.width, group.frames, group.options) for n in (1, 2))
    assert two_videos > one > 0
    monkeypatch.setattr(memory, "free_bytes", lambda devices: (one + two_videos) // 2)  # room for one per device
    args = (np.stack(group.images), [v.prompt for v in videos], [v.negative_prompt for v in videos],
            np.stack([v.affinity for v in videos]), group.options)
    together = two(*args, seeds=[v.seed for v in videos])
    assert together.batch_size == 1 and together.videos.shape == (4, 3, 8, 16, 3)  # 48x32 -> 16x10 -> 16x8
    assert together.videos.dtype == np.uint8
    with pytest.raises(ValueError, match="batch size 2 needs .* use a batch size of at most 1"):
        two(*args, seeds=[v.seed for v in videos], batch_size=2)
    for i, v in enumerate(videos):
        alone = two(*(a[i:i + 1] for a in args[:4]), dataclasses.replace(group.options, devices_per_video=1),
                    seeds=[v.seed])  # one device per video as in the batch (alone it would get 2: guidance's halves)
        np.testing.assert_array_equal(alone.videos[0], together.videos[i])
    # encode, denoise and decode for 1 and 2 videos per device (measured above; 2 is also the planner's first try,
    # which does not fit); none for the batches themselves; and the three for a lone video on one device (no
    # padding copy on the other: sharding.sampler_split)
    assert two.compilations == 3 * 3


def test_no_weight_work_inside_the_loop(animator):
    """The compiled loop's body computes nothing of a weight's shape (no re-layout, cast or copy of a weight per
    step: XLA keeps such loop-invariant work out of the loop). The detector is checked on a loop that does scale a
    weight every step. On a GPU, tests/test_gpu.py runs the same check where convolutions want cuDNN layouts.
    The video is 24x40 (latents 12x20, 6x10, 3x5 in the UNet's levels): at 2x2 latents XLA:CPU computes a
    convolution with its operands swapped, reversing that (tiny) kernel every step, and activations of such
    sizes share shapes with weights, which the detector cannot tell apart."""
    import jax.numpy as jnp

    from tests.hlo import weight_shapes, weight_work_in_loop_body
    (_, _), (exe, _), (_, _) = animator._executables(animator.devices, 24, 40, 3, SampleOptions())
    assert "while" in exe.as_text()
    assert weight_work_in_loop_body(exe.as_text(), weight_shapes(animator._unet)) == []

    w = jnp.ones((48, 40), jnp.float32)  # the control: (w * i) depends on the step, so it must stay in the body
    control = jax.jit(lambda w, x, n: jax.lax.fori_loop(0, n, lambda i, x: jnp.tanh(x @ (w * i).T) @ w, x)).lower(
        w, jnp.ones((2, 40)), 3).compile().as_text()
    assert weight_work_in_loop_body(control, {("f32", (48, 40))})


def test_the_denoiser_is_not_a_mutable_hook(animator):
    """What the compiled loop denoises with follows from its static options alone: a public attribute read at trace
    time (and absent from the compile key) was silently ignored when set after a first call."""
    assert not hasattr(animator, "denoiser")


def test_new_unet_weights_run_the_same_programs(animator):
    """update_unet swaps the weights the programs take as arguments: the next call compiles nothing (their keys do
    not look at the weights, so no call walks them) and uses the new weights; other dtypes are refused."""
    img, mask = image(2)[None, :16, :24], affinity.preset_affinity("small", 2)[None]
    run = lambda: animator(img, ["hello"], ["cat"], mask, SampleOptions(steps=1), seeds=[5]).videos  # noqa: E731
    before, kept = run(), list(animator._unet)
    compiled = animator.compilations
    try:
        animator.update_unet(animator._parts.unet.merge([x * 1.5 for x in kept]))
        assert not np.array_equal(run(), before)
        assert animator.compilations == compiled
        with pytest.raises(ValueError, match="shapes and dtypes"):
            animator.update_unet(animator._parts.unet.merge([x.astype("bfloat16") for x in kept]))
    finally:
        animator.update_unet(animator._parts.unet.merge(kept))
    np.testing.assert_array_equal(run(), before)


def test_an_animator_changes_no_process_settings(tiny, tmp_path, monkeypatch):
    """A library's constructor leaves jax's global settings alone: the compilation cache is the CLIs' choice."""
    monkeypatch.setenv("PIA_JAX_CACHE_DIR", str(tmp_path / "xla"))  # what the cache would use if turned on
    settings = lambda: (jax.config.jax_compilation_cache_dir,  # noqa: E731
                        jax.config.jax_persistent_cache_min_compile_time_secs)
    before = settings()
    Animator.load(tiny[0])
    assert settings() == before and not (tmp_path / "xla").exists()


def test_persistent_compilation_cache(tiny, tmp_path):
    """A second animator (a new process, as far as jax's in-memory caches go) compiles nothing: its three programs
    are loaded as stored executables (pia_jax.compiled.store: no tracing or lowering), and the videos are equal."""
    from pia_jax.sampling import compile_cache
    img, mask = image(4)[None, :16, :24], affinity.preset_affinity("small", 2)[None]
    try:
        runs, animators = [], []
        for _ in range(2):
            jax.clear_caches()
            animators.append(Animator.load(tiny[0], compile_cache_dir=tmp_path / "xla"))
            runs.append(animators[-1](img, ["hello"], ["cat"], mask, SampleOptions(steps=2), seeds=[1]))
    finally:
        compile_cache.enable("off")
    programs = lambda a: (a._encode, a._denoise, a._decode)  # noqa: E731
    assert [(p.compiles, p.loaded) for p in programs(animators[0])] == [(1, 0)] * 3
    assert [(p.compiles, p.loaded) for p in programs(animators[1])] == [(0, 1)] * 3
    assert runs[0].cache["misses"] >= 3 and runs[1].cache["misses"] == 0
    assert list((tmp_path / "xla").glob("jit__denoise_fn-*"))  # jax's own cache has them too
    assert len(list((tmp_path / "xla" / "pia_jax_executables").glob("*.pkl"))) == 3
    np.testing.assert_array_equal(runs[0].videos, runs[1].videos)


def test_freenoise_shuffles_have_their_own_key(animator, monkeypatch):
    """Each random use of a seed has its own key: the FreeNoise shuffles' key is neither of the noise keys nor any
    step's DDIM noise key (it used to be step 1's), and adding it left the noise keys, so every video, unchanged."""
    from pia_jax.sampling import animator as animator_lib
    from pia_jax.sampling import noise
    seed = 12345
    init, post, step, shuffles = noise.video_keys(seed)
    old = jax.random.split(noise.seed_key(seed), 3)  # the keys the videos were made with before
    data = lambda k: tuple(np.asarray(jax.random.key_data(k)).tolist())  # noqa: E731
    assert [data(k) for k in (init, post, step)] == [data(k) for k in old]
    used = {data(init), data(post)} | {data(jax.random.fold_in(step, i)) for i in range(1000)}
    assert data(shuffles) not in used
    seen = []

    def record(key, *args):  # the key the sampler shuffles with; stop before anything compiles
        seen.append(data(key))
        raise KeyboardInterrupt

    monkeypatch.setattr(animator_lib, "shuffle_permutations", record)
    options = SampleOptions(steps=2, context_length=4, context_stride=2, free_noise="shuffle_context")
    with pytest.raises(KeyboardInterrupt):
        animator(image(4)[None, :16, :24], ["a cat"], [""], np.ones((1, 8), np.float32), options, seeds=[seed])
    assert seen == [data(shuffles)]
