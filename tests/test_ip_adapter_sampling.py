"""IP-Adapter sampling end to end against diffusers' PIAPipeline (`load_ip_adapter` + `set_ip_adapter_scale`, the
same `ip_adapter_image`), random weights in the real formats (the adapter as an `ip-adapter_sd15.bin` state, the
image encoder as transformers' CLIPVisionModelWithProjection), with guidance, and at scale 0; the pairing of image
tokens with the guidance branches and context windows against a stand-in UNet; bad inputs.

Tolerance: tests/test_sampling.py's TOL (1e-4 of the frame range, fp32 on both sides, only summation order differs;
its argument holds with the image encoder's few extra evaluations, ~1e-6 each: tests/test_ip_adapter.py), well inside
one uint8 level (3.9e-3); the image prompt itself moves these frames by more than 1e-2 (asserted).
"""

import copy
import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from pia_jax import weights
from pia_jax.models.abstract import abstract_model
from pia_jax.models.clip_vision import CLIPVisionModelWithProjection
from pia_jax.models.ip_adapter import ImageProjection
from pia_jax.models.text_encoder import CLIPTextModel
from pia_jax.models.unet import UNetMotionModel
from pia_jax.models.vae import AutoencoderKL
from pia_jax.sampling import Animator, SampleOptions, affinity, schedulers
from pia_jax.weights import model_dir
from pia_jax.weights.convert import ip_adapter as ip_convert
from tests import torch_models as tm
from tests.assets import write_vocab
from tests.oracle import assert_close, numpy_state
from tests.test_ip_adapter import TINY_IP, random_adapter, torch_encoder
from tests.test_sampling import (
    CFG,
    FRAMES,
    NEGATIVE,
    PROMPT,
    TOL,
    H,
    W,
    ddim,
    image,
    posterior_noise,
)

# One pytest-xdist worker runs the module, so the tiny_ip models are written and their Animator compiled once.
pytestmark = pytest.mark.xdist_group("ip_adapter_sampling")

# tests/test_sampling.py's model with a smaller UNet (two blocks of one layer, as tests/test_context_modes.py's),
# whose IP-Adapter layers sit in each kind of cross-attention (down, mid and up blocks): the samplers' compiles and
# the pipelines' runs are what this module's time goes to
SMALL = dataclasses.replace(CFG, unet=dataclasses.replace(
    CFG.unet, block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"),
    up_block_types=("UpBlockMotion", "CrossAttnUpBlockMotion"), layers_per_block=1, num_attention_heads=2,
    motion_num_attention_heads=2, norm_num_groups=4))


def _flat(cls, cfg, state, keymap):
    abstract = abstract_model(cls, cfg)  # nnx.eval_shape is quadratic in the model's size without its workaround
    return model_dir.flat_params(weights.load_state_dict(abstract, state, keymap))


def write_ip_models(root, cfg, without=True):
    """(model directory of `cfg` with an IP-Adapter, the same without (`without`; else None), torch modules, adapter
    state, tokenizer folder) from random weights in the real formats."""
    cfg_ip = dataclasses.replace(cfg, unet=dataclasses.replace(cfg.unet, ip_adapter_tokens=TINY_IP.num_tokens),
                                 ip_adapter=TINY_IP)
    write_vocab(root / "tokenizer")
    (root / "tokenizer" / "tokenizer_config.json").write_text('{"model_max_length": 77}')
    modules = {"unet": tm.unet_motion(cfg.unet, seed=1), "vae": tm.vae(cfg.vae, seed=2),
               "text_encoder": tm.clip_text(cfg.text, seed=3), "image_encoder": torch_encoder(TINY_IP, seed=11)}
    adapter = random_adapter(cfg.unet, TINY_IP, seed=10)
    torch.save(adapter, root / "ip-adapter.bin")
    # the adapter's tensors through the converter's rules (the conversion itself: tests/test_ip_adapter.py)
    image_proj, layers, _, _ = ip_convert.split_adapter(ip_convert.read_adapter_file(root / "ip-adapter.bin"), "test")
    unet_state = numpy_state(modules["unet"])
    base = {"vae": _flat(AutoencoderKL, cfg.vae, numpy_state(modules["vae"]), weights.DIFFUSERS_VAE),
            "text_encoder": _flat(CLIPTextModel, cfg.text, numpy_state(modules["text_encoder"]),
                                  weights.TRANSFORMERS_CLIP_TEXT)}
    if without:
        base["unet"] = _flat(UNetMotionModel, cfg.unet, unet_state, weights.DIFFUSERS_UNET)
    with_ip = {**base, "unet": _flat(UNetMotionModel, cfg_ip.unet,
                                     {**unet_state, **ip_convert.unet_ip_state(layers, cfg_ip.unet)},
                                     weights.DIFFUSERS_UNET),
               "image_encoder": _flat(CLIPVisionModelWithProjection, TINY_IP, numpy_state(modules["image_encoder"]),
                                      ip_convert.TRANSFORMERS_CLIP_VISION),
               "image_proj": _flat(ImageProjection, TINY_IP, image_proj, ip_convert.IMAGE_PROJ)}
    save = lambda name, cfg, models: model_dir.save_model_dir(
        root / name, cfg, models, tokenizer=root / "tokenizer", scheduler=schedulers.to_dict(schedulers.PIA_DDIM))
    return (save("ip", cfg_ip, with_ip), save("base", cfg, base) if without else None, modules, adapter,
            root / "tokenizer")


@pytest.fixture(scope="module")
def tiny_ip(tmp_path_factory):
    """The PIA (9-channel) models of write_ip_models."""
    return write_ip_models(tmp_path_factory.mktemp("pia-ip"), SMALL)


@pytest.fixture(scope="module")
def animator(tiny_ip):
    return Animator.load(tiny_ip[0])


def ip_image():
    """An image prompt of another size and aspect than the video's (CLIP's resize and centre crop apply)."""
    return np.random.default_rng(9).integers(0, 256, (40, 56, 3), dtype=np.uint8)


def extractor():
    """transformers' CLIPImageProcessor as the IP-Adapter's image encoder folder configures it."""
    from transformers import CLIPImageProcessor
    crop = TINY_IP.image_encoder.image_size
    return CLIPImageProcessor(size={"shortest_edge": TINY_IP.resize}, crop_size={"height": crop, "width": crop},
                              image_mean=list(TINY_IP.image_mean), image_std=list(TINY_IP.image_std))


def diffusers_ip_video(tiny_ip, img, ip_img, scale, guidance, steps, post_seed, latents_nchw):
    """PIAPipeline's video after `load_ip_adapter` (scale None: without loading it; ip_adapter_image unused)."""
    from diffusers import PIAPipeline
    from transformers import CLIPTokenizer
    _, _, modules, adapter, tok = tiny_ip
    unet = copy.deepcopy(modules["unet"])  # a copy: load_ip_adapter changes the UNet's processors
    pipe = PIAPipeline(vae=modules["vae"], text_encoder=modules["text_encoder"],
                       tokenizer=CLIPTokenizer.from_pretrained(str(tok)), unet=unet, scheduler=ddim(),
                       image_encoder=modules["image_encoder"], feature_extractor=extractor())
    if scale is not None:
        pipe.load_ip_adapter(adapter, subfolder="", weight_name="")
        pipe.set_ip_adapter_scale(scale)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        out = pipe(image=Image.fromarray(img), prompt=PROMPT, negative_prompt=NEGATIVE, num_frames=FRAMES, height=H,
                   width=W, num_inference_steps=steps, guidance_scale=guidance, motion_scale=0,
                   generator=torch.Generator().manual_seed(post_seed), latents=torch.from_numpy(latents_nchw),
                   ip_adapter_image=None if scale is None else Image.fromarray(ip_img), output_type="np")
    return np.asarray(out.frames)


STEPS = 2


def run_both(tiny_ip, animator, guidance, scale, seed=4):
    """(ours, diffusers') float frames of one video with the same image, image prompt and noise."""
    img = image(seed)
    noise = np.random.default_rng(seed).standard_normal((1, FRAMES, H // 2, W // 2, 4)).astype(np.float32)
    expected = diffusers_ip_video(tiny_ip, img, ip_image(), scale, guidance, STEPS, seed,
                                  noise.transpose(0, 4, 1, 2, 3))
    got = animator(img[None], [PROMPT], [NEGATIVE], affinity.preset_affinity("small", FRAMES)[None],
                   SampleOptions(steps=STEPS, guidance_scale=guidance, ip_adapter_scale=scale or 0.0), noise=noise,
                   posterior_noise=posterior_noise(seed), float_frames=True, ip_adapter_images=[ip_image()])
    return got.videos, expected


def test_matches_diffusers_pia_pipeline_with_ip_adapter(tiny_ip, animator):
    """Guidance on: the unconditional branch gets the projection of zero image embeddings (diffusers' negative
    image embeddings). Scale 0 through the same executable equals PIAPipeline without an IP-Adapter."""
    got, expected = run_both(tiny_ip, animator, 7.5, 0.7)
    assert_close(got, expected, TOL, "IP-Adapter scale 0.7, guidance 7.5 vs PIAPipeline")
    compiled = animator.compilations
    off, plain = run_both(tiny_ip, animator, 7.5, None)
    assert animator.compilations == compiled, "the scale is data: scale 0 runs the same programs"
    assert_close(off, plain, TOL, "IP-Adapter scale 0 vs PIAPipeline without one")
    print(f"the image prompt moves the frames by {np.abs(got - off).max():.3g}")
    assert np.abs(got - off).max() > 1e-2  # the image prompt changes this video


def _gain_unet(x, t, text, image_tokens=None, ip_adapter_scale=None, **_):
    """A stand-in UNet whose prediction is x · (mean of its image tokens · scale), row by row."""
    gain = image_tokens.mean(axis=(1, 2)) * ip_adapter_scale
    return x * gain.reshape((-1,) + (1,) * (x.ndim - 1))


def test_guidance_pairs_the_image_tokens_with_the_text_branches():
    """Guidance on: the negative branch gets the unconditional tokens, the prompt's the image prompt's; off: only
    the image prompt's (as diffusers, which makes no negative image embeddings without guidance)."""
    import jax.numpy as jnp

    from pia_jax.sampling import loop
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 2, 2, 4)).astype(np.float32)
    tokens = rng.standard_normal((2, 2, 4, 8)).astype(np.float32)
    scale = np.asarray([0.5, 2.0], np.float32)
    neg, pos = ((tokens[:, i].mean(axis=(1, 2)) * scale)[:, None, None, None, None] for i in (0, 1))
    text = np.zeros((2, 2, 3, 8), np.float32)
    for cfg, expected in ((True, x * neg + 7.5 * (x * pos - x * neg)), (False, x * pos)):
        got = loop.guided_eps(_gain_unet, jnp.asarray(x), 1, text, None, None, 7.5, cfg, image=(tokens, scale))
        assert_close(np.asarray(got), expected, 1e-6, f"cfg {cfg}")


def test_windows_pair_each_video_with_its_image_tokens():
    """Context windows (both modes, two windows per UNet call) give every window its video's image tokens and scale:
    with a stand-in UNet whose prediction is x · (mean of the image tokens · scale) per row, blending the windows
    (weights normalised per frame) must give back exactly that per video."""
    import jax.numpy as jnp

    from pia_jax.sampling import loop
    from pia_jax.sampling.windows import WindowSchedule

    rng = np.random.default_rng(0)
    b, f = 2, 10
    x = rng.standard_normal((b, f, 2, 2, 4)).astype(np.float32)
    text = np.zeros((b, 2, 3, 8), np.float32)
    tokens = rng.standard_normal((b, 2, 4, 8)).astype(np.float32)
    scale = np.float32(0.8)
    expected = x * (tokens[:, 1].mean(axis=(1, 2)) * scale)[:, None, None, None, None]  # no guidance: the image's
    for mode, denoiser in (("unet", loop.windowed(loop.guided_eps, WindowSchedule(f, 4, 2, "pyramid", "exact"), 2)),
                           ("attention", loop.fused(loop.guided_eps, WindowSchedule(f, 4, 2, "pyramid", "diffusers")))):
        got = denoiser(_gain_unet, jnp.asarray(x), 1, text, None, None, 1.0, False, image=(tokens, scale))
        assert_close(np.asarray(got), expected, 1e-6, f"context mode {mode}")


def test_bad_ip_adapter_inputs_fail_before_loading(tiny_ip, tmp_path, capsys, monkeypatch):
    import sample
    ip_model, base_model = tiny_ip[:2]
    img = tmp_path / "img.png"
    Image.fromarray(image(0)).save(img)
    (tmp_path / "cases.yaml").write_text(f"cases: [{{image: {img}, prompt: x, ip_adapter_image: nope.png}}]")
    monkeypatch.setattr("pia_jax.sampling.animator.Animator.load", lambda *a, **k: pytest.fail("the model was loaded"))
    no_adapter = "has no IP-Adapter; convert it with convert_torch_weights.py --ip-adapter FILE --image-encoder DIR"
    for model, args, message in [
            (base_model, ["--ip-adapter-scale", "0.5"], "ip adapter scale 0.5: this model " + no_adapter),
            (base_model, ["--ip-adapter-image", img], f"ip adapter image: {base_model} " + no_adapter),
            (ip_model, ["--ip-adapter-scale", "nan"], "ip adapter scale must be a finite number, got nan"),
            (ip_model, ["--ip-adapter-image", tmp_path / "nope.png"], f"image not found: {tmp_path / 'nope.png'}"),
            (ip_model, ["--config", tmp_path / "cases.yaml"],
             f"key 'ip_adapter_image': image not found: {tmp_path / 'nope.png'}")]:
        argv = ["--model", model] + ([] if "--config" in args else ["--image", img, "--prompt", "x"]) + args
        code = sample.main([str(a) for a in argv + ["--out", tmp_path / "out"]])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.startswith("error: "), (args, err)
    assert not (tmp_path / "out").exists()


def test_bad_ip_adapter_images_fail_before_compiling(tiny_ip, animator):
    base = Animator.load(tiny_ip[1])
    args = (image(0)[None], [PROMPT], [NEGATIVE], affinity.preset_affinity("small", FRAMES)[None])
    for which, kw, message in [
            (base, {"ip_adapter_images": [ip_image()]}, "ip_adapter_images given to a model without an IP-Adapter"),
            (base, {"options": SampleOptions(ip_adapter_scale=0.3)}, "this model has no IP-Adapter"),
            (animator, {"ip_adapter_images": [ip_image()] * 2}, "1 videos need 1 IP-Adapter images, got 2")]:
        compiled = which.compilations
        with pytest.raises(ValueError, match=message):
            which(*args, seeds=[1], **kw)
        assert which.compilations == compiled


def test_text_to_video_matches_diffusers_animatediff_pipeline_with_ip_adapter(tmp_path):
    """A 4-channel (AnimateDiff) model with an IP-Adapter: the image prompt alone conditions the video (there is no
    condition image), against AnimateDiffPipeline + load_ip_adapter + set_ip_adapter_scale, same noise, guidance on."""
    from diffusers import AnimateDiffPipeline
    from transformers import CLIPTokenizer
    cfg = dataclasses.replace(SMALL, unet=dataclasses.replace(SMALL.unet, in_channels=4))
    path, _, modules, adapter, tok = write_ip_models(tmp_path, cfg, without=False)
    noise = np.random.default_rng(5).standard_normal((1, FRAMES, H // 2, W // 2, 4)).astype(np.float32)
    pipe = AnimateDiffPipeline(vae=modules["vae"], text_encoder=modules["text_encoder"],
                               tokenizer=CLIPTokenizer.from_pretrained(str(tok)), unet=modules["unet"],
                               motion_adapter=None, scheduler=ddim(), feature_extractor=extractor(),
                               image_encoder=modules["image_encoder"])
    pipe.load_ip_adapter(adapter, subfolder="", weight_name="")
    pipe.set_ip_adapter_scale(0.8)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        expected = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, num_frames=FRAMES, height=H, width=W,
                        num_inference_steps=STEPS, guidance_scale=7.5, latents=torch.from_numpy(
                            noise.transpose(0, 4, 1, 2, 3)), ip_adapter_image=Image.fromarray(ip_image()),
                        output_type="np").frames
    animator = Animator.load(path)
    run = lambda scale: animator(
        image(5)[None], [PROMPT], [NEGATIVE], affinity.preset_affinity("small", FRAMES)[None],
        SampleOptions(steps=STEPS, guidance_scale=7.5, ip_adapter_scale=scale), noise=noise,
        posterior_noise=posterior_noise(5), float_frames=True, ip_adapter_images=[ip_image()]).videos
    got, off = run(0.8), run(0.0)
    assert_close(got, np.asarray(expected), TOL, "text-to-video, IP-Adapter 0.8 vs AnimateDiffPipeline")
    print(f"the image prompt moves the frames by {np.abs(got - off).max():.3g}")
    assert np.abs(got - off).max() > 1e-2  # the image prompt moves the frames: the check is not vacuous
