"""sample.py: the command line on a tiny converted model, and every bad input failing before any model loads."""

import dataclasses
import shutil
import types

import av
import numpy as np
import pytest
from PIL import Image

import sample
from pia_jax.models import config
from tests import torch_models as tm
from tests.assets import write_vocab

CFG = dataclasses.replace(config.TINY, unet=dataclasses.replace(config.TINY.unet, norm_semantics="pia"))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    write_vocab(root / "tokenizer")
    path = tm.write_model_dir(root / "model", CFG, tm.unet_motion(CFG.unet), tm.vae(CFG.vae), tm.clip_text(CFG.text),
                              root / "tokenizer")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(root / "img.png")
    return path, root / "img.png"


def run(capsys, *args):
    code = sample.main([str(a) for a in args])
    return code, capsys.readouterr()


def test_cli_writes_gif_mp4_png_and_noise(model, tmp_path, capsys):
    path, img = model
    out = tmp_path / "out" / "cat.gif"
    code, io = run(capsys, "--model", path, "--image", img, "--prompt", "hello cat", "--frames", 5, "--steps", 2,
                   "--seed", 1, 2, "--format", "gif,mp4,png", "--out", out, "--motion", "loop_small",
                   "--save-noise", "--size", 32)
    assert code == 0, io.err
    # 60x40 -> long side 32 -> 32x21 -> multiples of 8: 32x16
    for seed in (1, 2):
        stem = out.with_name(f"cat-img-hello-cat-{seed}")  # --out stem, image stem, prompt slug, seed
        with Image.open(stem.with_suffix(".gif")) as gif:
            assert gif.n_frames == 5 and gif.size == (32, 16)
        with av.open(str(stem.with_suffix(".mp4"))) as mp4:
            frames = list(mp4.decode(video=0))
            assert len(frames) == 5 and (frames[0].width, frames[0].height) == (32, 16)
        assert len(list(stem.with_name(stem.name + "_frames").glob("*.png"))) == 5
        assert np.load(stem.with_name(stem.name + "_noise.npy")).shape == (1, 5, 8, 16, 4)
    assert "wrote" in io.out and "denoise" in io.out and "compile" in io.out and "cache off" in io.out
    assert "denoising step 2/2" in io.err  # progress per step
    # each slow phase says so as it starts (a cold start spends most of a minute loading and compiling)
    assert io.err.index("] loading ") < io.err.index("] compiling the sampler for 1 video shape(s) (cache off") \
        < io.err.index("denoising step 2/2")

    # the saved noise reproduces the video exactly when fed back in (and no seed is needed then)
    again = tmp_path / "again.gif"
    stem = out.with_name("cat-img-hello-cat-1")
    code, io = run(capsys, "--model", path, "--image", img, "--prompt", "hello cat", "--frames", 5, "--steps", 2,
                   "--out", again, "--motion", "loop_small", "--size", 32, "--format", "png",
                   "--noise", stem.with_name(stem.name + "_noise.npy"),
                   "--posterior-noise", stem.with_name(stem.name + "_posterior_noise.npy"))
    assert code == 0, io.err
    for a, b in zip(sorted(again.with_name("again_frames").glob("*.png")),
                    sorted(stem.with_name(stem.name + "_frames").glob("*.png"))):
        np.testing.assert_array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))


def test_yaml_batch(model, tmp_path, capsys):
    path, img = model
    cases = tmp_path / "cases.yaml"
    cases.write_text(f"""
defaults: {{frames: 3, steps: 1, size: 32}}
cases:
  - image: {img}
    prompts: [hello, cat]
    motion: [small, style_large]
    seed: 7
  - name: second
    image: {img}
    prompt: dog
    affinity: [1, 0.5, 0.25]
""")
    code, io = run(capsys, "--model", path, "--config", cases, "--out", tmp_path / "videos")
    assert code == 0, io.err
    names = sorted(p.name for p in (tmp_path / "videos").glob("*.gif"))
    assert names == ["img-cat-small-7.gif", "img-cat-style_large-7.gif", "img-hello-small-7.gif",
                     "img-hello-style_large-7.gif", "second-dog-custom-42.gif"]


def test_yaml_keyframes_plan_as_cli(model, tmp_path, monkeypatch):
    """A batch file's `keyframes:` (both spellings, paths relative to the file) plans the video of the same
    --keyframe flags: the same images in keyframe order, keyframe frames, affinity, prompt, seed and options; only
    the name differs (a batch file's names carry the motion). Planning only: nothing loads or samples."""
    path, img = model
    monkeypatch.setattr("pia_jax.sampling.animator.Animator.load", lambda *a, **k: pytest.fail("the model was loaded"))
    shutil.copy(img, tmp_path / "first.png")
    Image.fromarray(255 - np.asarray(Image.open(img))).save(tmp_path / "last.png")
    plan = lambda *args: sample.plan(sample.build_parser().parse_args(  # noqa: E731
        ["--model", str(path), "--out", str(tmp_path / "out"), *map(str, args)]))[0]
    cli = plan("--keyframe", f"0:{tmp_path / 'first.png'}", "--keyframe", f"23:{tmp_path / 'last.png'}", "--prompt",
               "a cat", "--motion", "moderate", "--seed", 5, "--frames", 24, "--steps", 1, "--size", 32,
               "--context-length", 16)
    (group,) = cli.groups
    (video,) = group.videos
    assert group.keyframes == [0, 23] and video.name == "first-a-cat-5"
    assert not np.array_equal(group.images[0][0], group.images[0][1])  # so a swapped keyframe order would show
    np.testing.assert_array_equal(video.affinity, video.affinity[::-1])  # keys at both ends: symmetric distances
    for spelling in ("{0: first.png, 23: last.png}", "['23:last.png', '0:first.png']"):
        (tmp_path / "cases.yaml").write_text(f"""
defaults: {{frames: 24, steps: 1, size: 32, context_length: 16}}
cases: [{{keyframes: {spelling}, prompt: a cat, motion: moderate, seed: 5}}]
""")
        (g,) = plan("--config", tmp_path / "cases.yaml").groups
        (v,) = g.videos
        assert v.name == "first-a-cat-moderate-5"
        assert (g.keyframes, g.height, g.width, g.frames, g.options) == (group.keyframes, group.height, group.width,
                                                                          group.frames, group.options)
        np.testing.assert_array_equal(np.stack(g.images), np.stack(group.images))
        for field in ("image", "keyframes", "prompt", "negative_prompt", "seed", "settings"):
            assert getattr(v, field) == getattr(video, field), field
        np.testing.assert_array_equal(v.affinity, video.affinity)


YAML_CASES = {  # a batch file's case -> (what the error names)
    "bad_scheduler": ("{{image: {img}, prompt: x, scheduler: pndm}}", "case 0: key 'scheduler' must be one of"),
    "prompt_list": ("{{image: {img}, prompt: [a, b]}}", "key 'prompt' must be a string (several prompts go in a "
                                                        "list under 'prompts:')"),
    "karras_string": ("{{name: k, image: {img}, prompt: x, karras: 'no'}}", "case 0 (k): key 'karras' must be true "
                                                                              "or false"),
    "steps_float": ("{{image: {img}, prompt: x, steps: 2.5}}", "key 'steps' must be an integer"),
    "cond_and_affinity": ("{{image: {img}, prompt: x, frames: 2, affinity: [1, 0.5], cond_frame: 1}}",
                          "key 'affinity': the condition frame places a motion preset"),
    "typo": ("{{image: {img}, prompt: x, sed: 1}}", "unknown keys ['sed']"),
    # keyframes: a mapping {frame: path} or a list of 'frame:path' strings, instead of 'image' and 'cond_frame'
    "keyframes_string": ("{{keyframes: '0:{img}', prompt: x}}",
                         "case 0: key 'keyframes' must be a mapping {frame: image path} or a list of 'frame:path'"),
    "keyframes_and_image": ("{{image: {img}, keyframes: {{0: {img}}}, prompt: x}}",
                            "case 0: key 'keyframes' replaces 'image' and 'cond_frame'"),
    "keyframes_and_cond_frame": ("{{keyframes: {{0: {img}}}, cond_frame: 0, prompt: x}}",
                                 "case 0: key 'keyframes' replaces 'image' and 'cond_frame'"),
    "keyframe_outside": ("{{name: kf, keyframes: {{0: {img}, 16: {img}}}, prompt: x}}",
                         "case 0 (kf): key 'keyframes': keyframe frame(s) [16] outside the video: frames are 0..15"),
    "keyframe_overlap": ("{{keyframes: ['0:{img}', '0:{img}'], prompt: x}}",
                         "case 0: key 'keyframes': keyframe has frame 0 twice"),
    "keyframe_not_int": ("{{keyframes: ['a:{img}'], prompt: x}}",
                         "case 0: key 'keyframes': keyframe key 'a' is not an integer frame index"),
    "keyframes_loop": ("{{keyframes: {{0: {img}, 15: {img}}}, motion: loop_small, prompt: x}}",
                       "case 0: key 'motion': loop presets return to a single image"),
    "keyframe_missing": ("{{keyframes: {{0: {img}, 15: nope.png}}, prompt: x}}",
                         "case 0: key 'keyframes': image not found: "),  # then the path beside the batch file
    "image_missing": ("{{image: nope.png, prompt: x}}", "case 0: key 'image': image not found: "),
}


@pytest.mark.parametrize("args, message", [
    (["--image", "{missing}", "--prompt", "x"], "image not found"),
    (["--image", "{img}", "--prompt", "x", "--motion", "huge"], "unknown"),
    (["--image", "{img}", "--prompt", "x", "--frames", "0"], "frames must be >= 1"),
    (["--image", "{img}", "--prompt", "x", "--affinity", "1,0.5"], "frame"),
    (["--image", "{img}", "--prompt", "x", "--height", "100", "--width", "64"], "multiple of 8"),
    (["--image", "{img}", "--prompt", "x", "--height", "64"], "both height and width"),
    (["--image", "{img}", "--prompt", "x", "--out", "{dir}"], "directory"),
    (["--image", "{img}", "--prompt", "x", "--out", "{blocked}/a.gif"], "cannot write"),
    (["--image", "{img}", "--prompt", "x", "--format", "avi"], "unknown output format"),
    (["--image", "{img}", "--prompt", "x", "--strength", "0"], "strength"),
    (["--image", "{img}", "--prompt", "x", "--noise", "{bad_noise}"], "has shape"),
    (["--image", "{img}"], "--prompt are required"),
    # the checks that used to fail late, after loading and compiling
    (["--image", "{img}", "--prompt", "x", "--steps", "1001"], "steps must be in [1, 1000]"),
    (["--image", "{img}", "--prompt", "x", "--steps", "10", "--strength", "0.05"],
     "strength 0.05 leaves no step of 10"),
    (["--image", "{img}", "--prompt", "x", "--eta", "-0.5"], "eta must be >= 0"),
    (["--image", "{img}", "--prompt", "x", "--clip-skip", "3"], "clip skip must be in [0, 2]"),
    (["--image", "{img}", "--prompt", "x", "--num-videos", "0"], "number of videos must be >= 1"),
    (["--image", "{img}", "--prompt", "x", "--fps", "0"], "fps must be in (0, 50]"),
    (["--image", "{img}", "--prompt", "x", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["--image", "{img}", "--prompt", "x", "--affinity", "1 0.5", "--frames", "2", "--cond-frame", "1"],
     "the condition frame places a motion preset"),
    (["--image", "{img}", "--prompt", "x", "--karras"], "Karras sigmas apply to the dpmpp_2m scheduler"),
    (["--image", "{img}", "--prompt", "x", "--scheduler", "pndm"], "scheduler must be one of ddim, dpmpp_2m, lcm"),
    (["--image", "{img}", "--prompt", "a cat", "a cat!"], "the same output name (img-a-cat-42)"),
    # long videos: the window must fit the motion modules' 32 positions and cover the video
    (["--image", "{img}", "--prompt", "x", "--frames", "48", "--context-length", "40"],
     "context window of 40 frames is longer than the motion modules' 32 positions"),
    (["--image", "{img}", "--prompt", "x", "--frames", "48", "--context-stride", "20"], "context stride must be in"),
    (["--image", "{img}", "--prompt", "x", "--frames", "48", "--context-weighting", "steep"],
     "weighting must be one of"),
    (["--image", "{img}", "--prompt", "x", "--frames", "48", "--free-noise", "shuffle"], "free noise must be one of"),
    (["--image", "{img}", "--prompt", "x", "--free-noise", "shuffle_context"], "give a context length"),
    (["--image", "{img}", "--prompt", "x", "--frames", "48", "--cond-frame", "48"], "outside the video"),
    # keyframes
    (["--keyframe", "0:{img}", "--keyframe", "16:{img}", "--prompt", "x"], "outside the video: frames are 0..15"),
    (["--keyframe", "0:{img}", "--keyframe", "0:{img}", "--prompt", "x"], "has frame 0 twice"),
    (["--keyframe", "a:{img}", "--prompt", "x"], "key 'a' is not an integer frame index"),
    (["--image", "{img}", "--keyframe", "0:{img}", "--prompt", "x"], "--keyframe replaces --image"),
    # prompt travel
    (["--image", "{img}", "--prompt-map", "0:a cat", "x:a dog"], "key 'x' is not an integer frame index"),
    (["--image", "{img}", "--prompt-map", "0:a cat", "0:a dog"], "has frame 0 twice"),
    (["--image", "{img}", "--prompt-map", "0:a cat", "16:a dog"], "outside the video: frames are 0..15"),
    (["--image", "{img}", "--prompt-map", "4:a cat"], "needs a prompt at frame 0"),
    (["--image", "{img}", "--prompt", "x", "--prompt-map", "0:a cat"], "give --prompt or --prompt-map"),
    (["--prompt", "x"], "needs an image"),
    # issue 29: inputs that used to be accepted and ignored, or failed late or with a traceback
    (["--image", "{img}", "--prompt", "x", "--context-length", "20"],
     "context length 20 is longer than the video's 16 frames"),
    (["--image", "{img}", "--prompt", "x", "--context-stride", "2", "--window-batch", "2"],
     "context stride, window batch: used only by context windows, which a 16-frame video gets past"),
    (["--keyframe", "-1:{img}", "--prompt", "x"], "keyframe frame(s) [-1] outside the video"),
    (["--image", "{img}", "--prompt", "x", "--out", "{blocked}"], "blocked is a file, not a folder"),
    (["--image", "{img}", "--prompt", "x", "--out", "{blocked}/sub/a.gif"], "blocked is a file, not a folder"),
    (["--image", "{img}", "--prompt", "x", "--compile-cache", "{blocked}/xla"],
     "the compilation cache folder {blocked}/xla cannot be made: {blocked} is a file"),
    *[(["--config", "{%s}" % k], message) for k, (_, message) in YAML_CASES.items()],
])
def test_bad_input_fails_before_loading(model, tmp_path, capsys, monkeypatch, args, message):
    path, img = model
    monkeypatch.setattr("pia_jax.sampling.animator.Animator.load", lambda *a, **k: pytest.fail("the model was loaded"))
    (tmp_path / "dir.gif").mkdir()
    (tmp_path / "blocked").write_text("a file where a folder should be")
    np.save(tmp_path / "bad_noise.npy", np.zeros((1, 16, 8, 8, 4), np.float32))
    fill = {"missing": tmp_path / "nope.png", "img": img, "dir": tmp_path / "dir.gif", "blocked": tmp_path / "blocked",
            "bad_noise": tmp_path / "bad_noise.npy"}
    for key, (case, _) in YAML_CASES.items():
        (tmp_path / f"{key}.yaml").write_text(f"cases: [{case.format(img=img)}]")
        fill[key] = tmp_path / f"{key}.yaml"
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    code, io = run(capsys, "--model", path, *[a.format(**fill) for a in args])
    message = message.replace("{blocked}", str(fill["blocked"]))
    assert code == 2 and message in io.err and io.err.startswith("error: "), io.err
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before, "a failed run wrote files"


def test_late_failure_leaves_no_output_folder(model, tmp_path, capsys, monkeypatch):
    """A run that fails after the checks (here: sizing the batches) leaves no empty --out folder behind."""
    def refuse(*a, **k):
        raise ValueError("no batch fits")
    monkeypatch.setattr("pia_jax.sampling.animator.Animator.load",
                        lambda *a, **k: types.SimpleNamespace(plan_batch_size=refuse, compile_cache=None))
    path, img = model
    code, io = run(capsys, "--model", path, "--image", img, "--prompt", "x", "--out", tmp_path / "out" / "deep")
    assert code == 2 and "no batch fits" in io.err and list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def t2v_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2v")
    write_vocab(root / "tokenizer")
    cfg = dataclasses.replace(CFG, unet=dataclasses.replace(CFG.unet, in_channels=4))
    return tm.write_model_dir(root / "model", cfg, tm.unet_motion(cfg.unet), tm.vae(cfg.vae), tm.clip_text(cfg.text),
                              root / "tokenizer")


@pytest.mark.parametrize("args, message", [
    (["--size", "30"], "size must be a multiple of 8 in 8..2048, got 30"),
    (["--size", "0"], "size must be a multiple of 8 in 8..2048, got 0"),
    (["--size", "-8"], "size must be a multiple of 8 in 8..2048, got -8"),
    (["--height", "20", "--width", "16"], "height must be a multiple of 8"),
    (["--motion", "large"], "no condition image or motion mask, so motion would have no effect"),
    (["--cond-frame", "3"], "so cond frame would have no effect"),
    (["--affinity", "1 0.5", "--frames", "2"], "so affinity would have no effect"),
])
def test_text_to_video_bad_input_fails_before_loading(t2v_model, tmp_path, capsys, monkeypatch, args, message):
    """A 4-channel (text-to-video) model: the size is checked as an image's; image-only options are refused."""
    monkeypatch.setattr("pia_jax.sampling.animator.Animator.load", lambda *a, **k: pytest.fail("the model was loaded"))
    code, io = run(capsys, "--model", t2v_model, "--prompt", "x", "--out", tmp_path / "out", *args)
    assert code == 2 and message in io.err and io.err.startswith("error: "), io.err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("damage, message", [
    ("truncate", "cannot read"),  # a download or copy cut short
    ("other_config", "does not match its config.json"),  # weights of another architecture
    ("no_tokenizer", "has no tokenizer"),
])
def test_bad_model_files_fail_before_loading(model, tmp_path, capsys, monkeypatch, damage, message):
    path, img = model
    monkeypatch.setattr("pia_jax.sampling.animator.Animator.load", lambda *a, **k: pytest.fail("the model was loaded"))
    broken = shutil.copytree(path, tmp_path / "model")
    if damage == "truncate":
        data = (broken / "unet.safetensors").read_bytes()
        (broken / "unet.safetensors").write_bytes(data[: len(data) * 3 // 4])
    elif damage == "other_config":
        meta = (broken / "config.json").read_text()
        (broken / "config.json").write_text(meta.replace('"cross_attention_dim": 32', '"cross_attention_dim": 48'))
    else:
        shutil.rmtree(broken / "tokenizer")
    code, io = run(capsys, "--model", broken, "--image", img, "--prompt", "x", "--out", tmp_path / "x.gif")
    assert code == 2 and message in io.err, io.err


def test_bad_model_directory(tmp_path, capsys):
    code, io = run(capsys, "--model", tmp_path / "none", "--image", "x.png", "--prompt", "x")
    assert code == 2 and "does not exist" in io.err
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text('{"format": "pia-jax-model", "version": 1, "parts": ["unet"]}')
    code, io = run(capsys, "--model", tmp_path / "half", "--image", "x.png", "--prompt", "x")
    assert code == 2 and "incomplete" in io.err


def test_one_window_equals_plain_sampler(model):
    """Whole-UNet windows (context mode unet; attention mode's one window: tests/test_context_modes.py): a window as
    long as the video is the plain sampler: one window, weight w/w = 1 on every frame. The two programs differ only
    in the scan around the UNet call and the division by the weight sum, so in fp32 they agree to rounding (1e-5 of
    the [0, 1] frame range; a wrong frame order or weighting changes frames by > 1e-2)."""
    from pia_jax.sampling import Animator, SampleOptions
    path, _ = model
    animator = Animator.load(path, compile_cache_dir=None)
    img = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)[None]
    affinity = np.asarray([[1.0, 0.9, 0.8, 0.7, 0.6, 0.5]], np.float32)

    def options(**kw):
        return SampleOptions(steps=2, **kw, **({"context_mode": "unet"} if "context_length" in kw else {}))
    run_ = lambda prompt="a cat", **kw: animator(img, [prompt], ["dog"], affinity, options(**kw),  # noqa: E731
                                                 seeds=[3], float_frames=True).videos
    plain = run_()
    np.testing.assert_allclose(run_(context_length=6), plain, atol=1e-5)
    # two overlapping windows do change the video (the windows are really used)
    windows = run_(context_length=4, context_stride=2)
    assert np.abs(windows - plain).max() > 1e-3
    # prompt travel through the windows: a one-key map is the plain prompt on every frame (per-frame cross-attention
    # instead of the per-video fast path: the same sums, rounding only); a second key changes the later frames
    np.testing.assert_allclose(run_({0: "a cat"}, context_length=4, context_stride=2), windows, atol=1e-5)
    travel = run_({0: "a cat", 5: "a red dog running"}, context_length=4, context_stride=2)
    assert np.abs(travel[:, -1] - windows[:, -1]).max() > 1e-3
    # keyframes at 0 and the last frame, through the windows: the same image at both is the one-image video (every
    # frame's condition latent is that image's); another image at the last frame changes it
    keyed = lambda last: animator(np.stack([img, last], axis=1), ["a cat"], ["dog"], affinity,  # noqa: E731
                                  options(context_length=4, context_stride=2), seeds=[3],
                                  float_frames=True, keyframes=[0, 5]).videos
    np.testing.assert_allclose(keyed(img), windows, atol=1e-5)
    assert np.abs(keyed(255 - img)[:, -1] - windows[:, -1]).max() > 1e-2


def test_long_video_windows_cli(model, tmp_path, capsys):
    """48 frames (past the motion modules' 32 positions) through context windows and FreeNoise; and a window as
    long as the video equals the plain sampler."""
    path, img = model
    out = tmp_path / "long.gif"
    code, io = run(capsys, "--model", path, "--prompt", "a cat", "--frames", 48, "--steps", 1,
                   "--size", 16, "--context-stride", 8, "--free-noise", "shuffle_context", "--context-mode", "unet",
                   "--window-batch", 2,
                   "--out", out, "--no-progress", "--keyframe", f"0:{img}", "--keyframe", f"47:{img}")
    assert code == 0, io.err
    with Image.open(out) as gif:  # keyframes at 0 and the last frame
        assert gif.n_frames == 48
