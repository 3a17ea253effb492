"""Long videos through sample.py in both context modes, against independent oracles (issue 28).

One run of the command line, as a user makes it: a batch file of six 42-frame text-to-video cases on one tiny
converted model (random weights, real formats), each with a 3-key prompt map, 16-frame windows, strides 4 and 8,
every weighting, every FreeNoise noise type (the seeded noise rescheduled by our rule, saved with --save-noise and
given to the oracle: torch cannot draw JAX's permutations, and test_windows.py compares the rescheduling itself with
diffusers'), and a 40x24 image: a 5x3 latent, odd in both sides, so the UNet's upsampling is cut back to the skips'
size. Every case has a tail window (42 - 16 is not a multiple of 4 or 8), where diffusers' tail rule applies.
  attention (FreeNoise): diffusers' `AnimateDiffPipeline` + `enable_free_noise` with the saved noise as latents.
  unet: a loop written here around diffusers' `UNetMotionModel`: the whole UNet on each window with its frames'
        prompt-travel text (diffusers' `_encode_prompt_free_noise`), the predictions blended by the weighted mean
        sum_w w·eps_w / sum_w w (windows and weights from diffusers' `FreeNoiseTransformerBlock`), guidance, DDIM
        (diffusers' `DDIMScheduler`), diffusers' decode.
fp32 on both sides (they differ only in summation order, ~1e-6 of the scale per network evaluation: test_unet.py),
frames written as 8-bit PNGs (truncated, PIA's rule, applied to the oracle too): a value next to a level boundary may
land on the neighbouring level, so the bound is 1 level; a wrong window, weight, tail rule or text slice moves
frames by tens of levels (issue 28 measured 63-165 levels between the modes; the other tail rule in attention mode:
74 levels, test_the_oracle_check_catches_the_other_tail_rule). The run uses one device, as a
one-GPU user's would (the tests' 8 fake CPU devices would pad the batch with 7 copies of the video).
"""

import copy
import dataclasses

import jax
import numpy as np
import pytest
import torch
from PIL import Image

import sample
from pia_jax.models import config
from tests import torch_models as tm
from tests.assets import write_vocab
from tests.oracle import assert_close, rel_err

# One pytest-xdist worker runs the module, so its sample.py batch (cli_run: ~30 s of compiling) is made once.
pytestmark = pytest.mark.xdist_group("context_modes")

UNET = dataclasses.replace(
    config.TINY.unet, in_channels=4, norm_semantics="diffusers", block_out_channels=(16, 32),
    down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"),
    up_block_types=("UpBlockMotion", "CrossAttnUpBlockMotion"), layers_per_block=1, num_attention_heads=2,
    motion_num_attention_heads=2, norm_num_groups=4)
VAE = config.VAEConfig(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4)  # 8x: odd latents
CFG = dataclasses.replace(config.TINY, unet=UNET, vae=VAE)
FRAMES, LENGTH, H, W, STEPS, GUIDANCE = 42, 16, 40, 24, 2, 7.5
PROMPTS, NEGATIVE = {0: "hello cat", 17: "a dog", 33: "cat"}, "cat"
# (name, mode, stride, weighting, noise type)
CASES = [("a4p", "attention", 4, "pyramid", "shuffle_context"), ("a8f", "attention", 8, "flat", "repeat_context"),
         ("a8s", "attention", 8, "delayed_reverse_sawtooth", "none"),
         ("u4p", "unet", 4, "pyramid", "repeat_context"), ("u8f", "unet", 8, "flat", "none"),
         ("u4s", "unet", 4, "delayed_reverse_sawtooth", "shuffle_context")]


def ddim():
    from diffusers import DDIMScheduler
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear", steps_offset=1,
                         clip_sample=False, set_alpha_to_one=True)


@pytest.fixture(scope="module")
def t2v(tmp_path_factory):
    """The torch parts and our converted model directory of them. Torch runs on one thread in this module (CI
    runs two test processes on two cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("context_modes")
    write_vocab(root / "tokenizer")
    (root / "tokenizer" / "tokenizer_config.json").write_text('{"model_max_length": 77}')
    parts = {"unet": tm.unet_motion(UNET, seed=1), "vae": tm.vae(VAE, seed=2), "text": tm.clip_text(CFG.text, seed=3),
             "tok_dir": root / "tokenizer", "root": root}
    parts["path"] = tm.write_model_dir(root / "model", CFG, parts["unet"], parts["vae"], parts["text"],
                                       root / "tokenizer")
    yield parts
    torch.set_num_threads(threads)


def run_cli(root, path, cases, out, animator=None):
    """sample.py on a batch file of `cases` -> {name: (frames (F, H, W, 3) int, noise (1, F, h, w, 4))}, and the
    Animator it loaded (`animator`: one to use instead of loading the model again)."""
    from pia_jax.sampling import Animator
    lines = [f"  - {{name: {n}, context_mode: {m}, context_stride: {s}, context_weighting: {w}, free_noise: {z}}}"
             for n, m, s, w, z in cases]
    prompt_map = ", ".join(f"{k}: {v}" for k, v in PROMPTS.items())
    (root / f"{out}.yaml").write_text(
        f"defaults: {{frames: {FRAMES}, context_length: {LENGTH}, height: {H}, width: {W}, steps: {STEPS}, "
        f"guidance: {GUIDANCE}, negative_prompt: {NEGATIVE}, prompt_map: {{{prompt_map}}}, seed: 5}}\n"
        "cases:\n" + "\n".join(lines) + "\n")
    loaded, load = [animator], Animator.load

    def keep(*args, **kwargs):
        if loaded[-1] is None:
            loaded.append(load(*args, **kwargs))
        return loaded[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(jax, "local_devices", lambda *a, **k: jax.devices()[:1])
        mp.setattr(Animator, "load", keep)
        code = sample.main([str(a) for a in ("--model", path, "--config", root / f"{out}.yaml", "--format", "png",
                                             "--out", root / out, "--save-noise", "--no-progress",
                                             "--compile-cache", "off")])
    assert code == 0
    videos = {}
    for name, *_ in cases:
        (folder,) = (root / out).glob(f"{name}-*_frames")
        frames = np.stack([np.asarray(Image.open(f)) for f in sorted(folder.glob("*.png"))]).astype(np.int32)
        videos[name] = frames, np.load(str(folder).removesuffix("_frames") + "_noise.npy")
    return videos, loaded[-1]


@pytest.fixture(scope="module")
def cli_run(t2v):
    """The six cases, made by one sample.py run -> ({name: (frames (F, H, W, 3) int, noise (1, F, h, w, 4))},
    torch parts and the Animator sample.py loaded)."""
    out, animator = run_cli(t2v["root"], t2v["path"], CASES, "out")
    return out, {**t2v, "pipe": pipeline(t2v), "animator": animator, "oracle": {}}


def pipeline(parts):
    """AnimateDiffPipeline on a copy of the UNet (enable_free_noise swaps its motion blocks)."""
    from diffusers import AnimateDiffPipeline
    from transformers import CLIPTokenizer
    pipe = AnimateDiffPipeline(vae=parts["vae"], text_encoder=parts["text"],
                               tokenizer=CLIPTokenizer.from_pretrained(str(parts["tok_dir"])),
                               unet=copy.deepcopy(parts["unet"]), motion_adapter=tm.motion_adapter(UNET),
                               scheduler=ddim())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def unet_mode_oracle(pipe, unet, latents, stride, weighting):
    """Whole-UNet windows around diffusers' UNetMotionModel (module doc); latents (1, 4, F, h, w) -> frames."""
    from diffusers.models.attention import FreeNoiseTransformerBlock as Block
    spans = Block._get_frame_indices(pipe.unet.down_blocks[0].motion_modules[0].transformer_blocks[0], FRAMES)
    taken = [a for a, _ in spans]
    if spans[-1][1] != FRAMES:  # a window ending at the last frame, adding only the frames past the previous one
        spans, taken = spans + [(FRAMES - LENGTH, FRAMES)], taken + [spans[-1][1]]
    w = torch.tensor(Block._get_frame_weights(None, LENGTH, weighting))
    embeds, _ = pipe._encode_prompt_free_noise(PROMPTS, FRAMES, "cpu", 1, True, NEGATIVE)  # [neg, pos] per frame
    embeds = embeds.reshape(2, FRAMES, *embeds.shape[1:])
    scheduler = ddim()
    scheduler.set_timesteps(STEPS)
    x = latents
    for t in scheduler.timesteps:
        acc, den = torch.zeros((2,) + x.shape[1:]), torch.zeros(FRAMES)
        for (a, b), first in zip(spans, taken):
            wj = torch.where(torch.arange(a, b) >= first, w, 0.0)
            ctx = embeds[:, a:b].reshape(2 * LENGTH, *embeds.shape[2:])
            eps = unet(torch.cat([x[:, :, a:b]] * 2), t, encoder_hidden_states=ctx).sample
            acc[:, :, a:b] += eps * wj[None, None, :, None, None]
            den[a:b] += wj
        eps = acc / den[None, None, :, None, None]
        x = scheduler.step(eps[:1] + GUIDANCE * (eps[1:] - eps[:1]), t, x).prev_sample
    video = pipe.decode_latents(x, 16)
    return pipe.video_processor.postprocess_video(video=video, output_type="np")[0]


def oracle_frames(parts, case, noise) -> np.ndarray:
    """The oracle's frames of a case (CASES) from its saved noise, as sample.py writes them (truncated to 8 bits),
    (F, H, W, 3) int; computed once per case."""
    name, mode, stride, weighting, _ = case
    if name in parts["oracle"]:
        return parts["oracle"][name]
    latents = torch.from_numpy(noise).permute(0, 4, 1, 2, 3).contiguous()  # (1, 4, F, h, w)
    assert latents.shape == (1, 4, FRAMES, 5, 3)
    pipe = parts["pipe"]
    pipe.enable_free_noise(context_length=LENGTH, context_stride=stride, weighting_scheme=weighting)
    with torch.no_grad():
        if mode == "attention":
            expected = pipe(prompt=PROMPTS, negative_prompt=NEGATIVE, num_frames=FRAMES, height=H, width=W,
                            num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=latents,
                            output_type="np").frames[0]
        else:
            expected = unet_mode_oracle(pipe, parts["unet"], latents, stride, weighting)
    parts["oracle"][name] = (np.clip(expected, 0, 1) * 255).astype(np.int32)  # truncated, as sample.py writes them
    return parts["oracle"][name]


@pytest.mark.parametrize("name, mode, stride, weighting, noise_type", CASES)
def test_cli_long_video_matches_oracle(cli_run, name, mode, stride, weighting, noise_type):
    out, parts = cli_run
    got, noise = out[name]
    want = oracle_frames(parts, (name, mode, stride, weighting, noise_type), noise)
    assert got.shape == want.shape == (FRAMES, H, W, 3)
    diff = np.abs(got - want)
    print(f"{name}: max {diff.max()} levels, {np.mean(diff > 0):.4f} of values off by one")
    assert diff.max() <= 1, diff.max()


def test_the_oracle_check_catches_the_other_tail_rule(cli_run):
    """Negative control for the tail rule (issue 28): case a4p again through sample.py (the Animator of cli_run: only
    the denoise program compiles again), its windows given tail rule "exact" in place of diffusers', is far outside
    the 1-level bound of test_cli_long_video_matches_oracle. 42 - 16 = 26 = 6·4 + 2: the tail window adds frames 40
    and 41, pyramid weights 2 and 1 there; diffusers divides both by 2, "exact" by 2 and 1. Measured: frame 41 off by
    74 levels, frame 40 by 16 (it attends to 41 in the tail window), the others by 1-3 (the motion modules'
    GroupNorm pools over all frames); asserted: more than 20 levels on the tail's frames."""
    from pia_jax.sampling.options import SampleOptions
    out, parts = cli_run
    case = CASES[0]
    window = SampleOptions.window

    def other_tail(self, num_frames, max_positions):
        schedule = window(self, num_frames, max_positions)
        assert schedule is not None and schedule.tail == "diffusers"  # attention mode's rule, about to be swapped
        return dataclasses.replace(schedule, tail="exact")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SampleOptions, "window", other_tail)
        compiled = parts["animator"].compilations
        videos, _ = run_cli(parts["root"], parts["path"], [case], "other_tail", parts["animator"])
        assert parts["animator"].compilations == compiled + 1  # the denoise program alone
    got, noise = videos[case[0]]
    np.testing.assert_array_equal(noise, out[case[0]][1])
    diff = np.abs(got - oracle_frames(parts, case, noise))
    tail = FRAMES - (FRAMES - LENGTH) % case[2]
    print(f"tail rule exact vs diffusers' oracle: max levels by frame {diff.max(axis=(1, 2, 3)).tolist()}")
    assert diff[tail:].max() > 20 * 1  # 20 times the bound the test applies


# ---- the PIA image-to-video path (9-channel UNet, PIA's pooled ResNet norms), keyframes, both modes ----

PIA_UNET = dataclasses.replace(UNET, in_channels=9, norm_semantics="pia")
UNET_TOL = 2e-5  # one guided UNet evaluation, fp32 both sides (tests/test_unet.py)


@pytest.fixture(scope="module")
def pia_unet(t2v):
    """The torch PIA UNet both PIA tests use (random weights; the tests copy it before changing it), built after
    t2v has set torch's threads."""
    return tm.unet_motion(PIA_UNET, seed=4)


def torch_pia(unet, frames, fused=None):
    """A copy of the torch UNet with PIA's norm semantics for clips of `frames` frames (torch_models.pia_reference)
    and, with `fused` = (length, stride, weighting), diffusers' FreeNoise blocks in its motion modules."""
    import types

    from diffusers.pipelines.free_noise_utils import AnimateDiffFreeNoiseMixin
    model = tm.pia_reference(copy.deepcopy(unet), frames)
    if fused is not None:
        owner = types.SimpleNamespace(_free_noise_context_length=fused[0], _free_noise_context_stride=fused[1],
                                      _free_noise_weighting_scheme=fused[2], device="cpu", dtype=torch.float32)
        for block in [*model.down_blocks, *model.up_blocks]:
            AnimateDiffFreeNoiseMixin._enable_free_noise_in_block(owner, block)
    return model


def test_pia_two_windows_with_keyframes_equal_the_blend_by_hand(pia_unet):
    """The sampler's two denoisers (loop.fused: attention mode, loop.windowed: unet mode) on a 6-frame PIA video with
    keyframes at 0 and 5 (a per-frame condition latent), per-frame affinity and guidance, in two 4-frame windows
    (0-3 and 2-5, pyramid weights [1, 2, 2, 1]). attention: diffusers' UNet with PIA's norms and FreeNoise motion
    blocks on all 6 frames; unet: that UNet (norms pooled over the window's 4 frames) on each window, the guided
    predictions blended here, (w·eps_0-3 + w·eps_2-5) / (w + w) per frame."""
    from flax import nnx

    from pia_jax import weights
    from pia_jax.models.abstract import abstract_model
    from pia_jax.models.unet import UNetMotionModel
    from pia_jax.sampling import loop, windows
    rng = np.random.default_rng(0)
    f, t, guidance = 6, 600, 6.0
    x = rng.standard_normal((1, f, 4, 4, 4)).astype(np.float32)
    text = rng.standard_normal((1, 2, 77, 32)).astype(np.float32)  # [negative, prompt]
    mask = np.float32([[1.0, 0.8, 0.6, 0.6, 0.8, 1.0]])
    keys = rng.standard_normal((2, 4, 4, 4)).astype(np.float32)
    cond = keys[np.asarray([0, 0, 0, 1, 1, 1])][None]  # each frame's nearest keyframe's latent
    base = pia_unet
    ours = weights.load_state_dict(abstract_model(UNetMotionModel, PIA_UNET), tm.numpy_state(base),
                                   weights.DIFFUSERS_UNET)
    graphdef, state = nnx.split(ours)
    attention_w = windows.WindowSchedule(f, 4, 2, "pyramid", "diffusers")
    unet_w = windows.WindowSchedule(f, 4, 2, "pyramid", "exact")

    @jax.jit
    def both(state, x, text, mask, cond):
        unet = nnx.merge(graphdef, state)
        args = (unet, x, t, text, mask, cond, guidance, True)
        return loop.fused(loop.guided_eps, attention_w)(*args), loop.windowed(loop.guided_eps, unet_w)(*args)

    got_attention, got_unet = both(state, x, text, mask, cond)

    def guided(model, frames):
        neg, pos = (tm.run_unet_motion(model, x[:, frames], t, text[:, i], mask[:, frames, None, None, None],
                                       cond[:, frames]) for i in (0, 1))
        return neg + guidance * (pos - neg)

    fused = torch_pia(base, f, (4, 2, "pyramid"))
    tm_unet = torch_pia(base, 4)
    w = np.float64([1, 2, 2, 1])[None, :, None, None, None]
    acc, den = np.zeros(x.shape), np.zeros(f)
    for frames in (np.arange(0, 4), np.arange(2, 6)):
        acc[:, frames] += w * guided(tm_unet, frames)
        den[frames] += w.ravel()
    assert_close(got_attention, guided(fused, np.arange(f)), UNET_TOL, "attention mode vs FreeNoise torch UNet")
    assert_close(got_unet, acc / den[None, :, None, None, None], UNET_TOL, "unet mode vs the blend by hand")
    assert rel_err(got_attention, got_unet) > 1e-2  # the modes differ: each check sees its own algorithm


def test_pia_one_window_is_the_plain_sampler(t2v, pia_unet, tmp_path):
    """Through the Animator (the sampler sample.py drives): a PIA video with keyframes at 0 and 5 and one window as
    long as the video, in each mode, is the plain sampler: w·x / w on every frame; the programs differ in the
    scan or blend around the same sums, so in fp32 the float frames agree to rounding (1e-5 of the [0, 1] range;
    a wrong frame order, weight or keyframe moves them by > 1e-2, test_sample.py)."""
    from jax.sharding import Mesh

    from pia_jax.sampling import Animator, SampleOptions
    write_vocab(tmp_path / "tokenizer")
    cfg = dataclasses.replace(CFG, unet=PIA_UNET)
    path = tm.write_model_dir(tmp_path / "model", cfg, pia_unet, t2v["vae"], t2v["text"], tmp_path / "tokenizer")
    animator = Animator.load(path, mesh=Mesh(np.asarray(jax.devices()[:1]), ("data",)))
    images = np.random.default_rng(1).integers(0, 256, (1, 2, 16, 16, 3), dtype=np.uint8)
    affinity = np.float32([[1.0, 0.8, 0.6, 0.6, 0.8, 1.0]])
    run = lambda **kw: animator(images, ["hello cat"], ["dog"], affinity, SampleOptions(steps=2, **kw),
                                seeds=[3], float_frames=True, keyframes=[0, 5]).videos
    plain = run()
    for mode in ("attention", "unet"):
        np.testing.assert_allclose(run(context_length=6, context_mode=mode), plain, atol=1e-5, err_msg=mode)


@pytest.mark.parametrize("args, message", [
    (["--context-mode", "unet"], "context mode: used only by context windows, which a 16-frame video gets past"),
    (["--context-mode", "attention", "--frames", "8"], "context mode: used only by context windows"),
    (["--frames", "40", "--context-mode", "ring"], "context mode must be one of attention, unet, got 'ring'"),
    (["--frames", "40", "--window-batch", "2"], "window batch 2: windows per UNet call, used only by context mode unet"),
    (["--frames", "40", "--free-noise", "shuffle_context", "--noise", "{noise}"],
     "--free-noise reschedules the seeded noise; --noise is used as it is"),
])
def test_bad_context_options_fail_before_loading(t2v, tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.setattr("pia_jax.sampling.animator.Animator.load", lambda *a, **k: pytest.fail("the model was loaded"))
    np.save(tmp_path / "noise.npy", np.zeros((1, 40, 5, 3, 4), np.float32))
    code = sample.main(["--model", str(t2v["path"]), "--prompt", "cat", "--height", str(H), "--width", str(W),
                        "--out", str(tmp_path / "out"), *[a.format(noise=tmp_path / "noise.npy") for a in args]])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and message in err, err
    assert not (tmp_path / "out").exists()
