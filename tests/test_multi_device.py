"""One video over many devices (issue 30): guidance's two halves on a `cfg` mesh axis, a long video's context windows
(context mode unet) or its frames inside the UNet (context mode attention, and videos without windows: each chunk's
frames in the spatial layers, its sites in the motion modules) on a `window` axis, chosen from the device count and
the batch.

Oracle: the same video on one device. Both sides are fp32 on the same CPU and run the same per-row UNet; the split
only changes which device computes a row and the order of the blend's, the guidance's and the frame-pooled GroupNorm
statistics' sums (an all-reduce or a gather instead of a local sum): measured 4e-6 to 5.5e-6 of the frame range,
guidance 7.5 amplifying the rounding of each UNet evaluation; the bound is 1e-5 of the [0, 1] frame range
(test_sampling.py uses the same for 8 devices vs 1). A wrong branch pairing, window, weight, text slice or frame
order moves frames by > 1e-2 (test_context_modes.py). That the work is split, not replicated, is read from the
compiled denoise program: XLA's per-device FLOP count falls with the devices a video gets.
"""

import dataclasses

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image

import sample
from pia_jax import sharding
from pia_jax.models import attention, config
from pia_jax.sampling import Animator, SampleOptions, loop
from tests import torch_models as tm
from tests.assets import write_vocab
from tests.oracle import assert_close

TOL = 1e-5  # of the [0, 1] range: only summation order differs (module docstring)
UNET = dataclasses.replace(
    config.TINY.unet, in_channels=9, norm_semantics="pia", block_out_channels=(16, 32),
    down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"),
    up_block_types=("UpBlockMotion", "CrossAttnUpBlockMotion"), layers_per_block=1, num_attention_heads=2,
    motion_num_attention_heads=2, norm_num_groups=4)
VAE = config.VAEConfig(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4)  # 8x
CFG = dataclasses.replace(config.TINY, unet=UNET, vae=VAE)
SIZE = 16  # latents 2 x 2


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi")
    write_vocab(root / "tokenizer")
    return tm.write_model_dir(root / "model", CFG, tm.unet_motion(UNET, seed=4), tm.vae(VAE, seed=2),
                              tm.clip_text(CFG.text, seed=3), root / "tokenizer")


def video(animator, frames, options, prompt=None):
    """One PIA video with keyframes at the first and last frame and a prompt map (prompt travel)."""
    images = np.random.default_rng(1).integers(0, 256, (1, 2, SIZE, SIZE, 3), dtype=np.uint8)
    affinity = np.linspace(1.0, 0.6, frames, dtype=np.float32)[None]
    prompt = prompt or {0: "hello cat", frames // 2: "a dog"}
    return animator(images, [prompt], ["dog"], affinity, options, seeds=[3], float_frames=True,
                    keyframes=[0, frames - 1]).videos


def denoise_flops(animator) -> float:
    """XLA's FLOP estimate of one device's part of the last compiled denoise program."""
    exe = list(animator._denoise.executables.values())[-1]
    cost = exe.cost_analysis()
    return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


def test_the_split_follows_the_devices_and_the_batch():
    assert sharding.sampler_split(8, 1, True, 1) == (1, 2, 1)  # one video: guidance's halves on 2, 6 idle
    assert sharding.sampler_split(8, 8, True, 1) == (8, 1, 1)  # a video per device: nothing to split
    assert sharding.sampler_split(8, 3, True, 1) == (3, 2, 1)  # 3 videos on 3 pairs: no padding copy
    assert sharding.sampler_split(8, 12, True, 1) == (6, 1, 1)  # 2 rounds either way: 6 groups, not 8 (4 copies)
    assert sharding.sampler_split(8, 1, True, 13) == (1, 2, 4)  # unet-mode windows over the rest
    assert sharding.sampler_split(8, 1, True, 3) == (1, 2, 3)  # 3 windows: 6 devices of use
    assert sharding.sampler_split(8, 2, True, 13) == (2, 2, 2)
    assert sharding.sampler_split(8, 1, False, 13) == (1, 1, 8)
    assert sharding.sampler_split(8, 1, True, 1, per_video=1) == (1, 1, 1)
    assert sharding.sampler_split(8, 4, True, 13, per_video=6) == (1, 2, 3)  # 4 videos, one at a time, on 6
    with pytest.raises(ValueError, match="devices per video 4: a video can use 2"):
        sharding.sampler_split(8, 1, True, 1, per_video=4)
    with pytest.raises(ValueError, match="devices per video 3: .* as an even number with guidance"):
        sharding.sampler_split(8, 1, True, 13, per_video=3)
    with pytest.raises(ValueError, match=r"must be in 1\.\.8 \(the devices there are\), got 10"):
        sharding.sampler_split(8, 1, True, 13, per_video=10)
    mesh = sharding.sampler_mesh(jax.devices(), (3, 2, 1))
    assert list(mesh.devices.flat) == jax.devices()[:6]
    parts = lambda frames, **k: SampleOptions(**k).device_parts(frames, 32)  # noqa: E731
    assert (parts(16), parts(7), parts(3)) == (4, 1, 1)  # no windows: groups of 4 frames
    assert (parts(64), parts(64, context_mode="unet")) == (4, 13)  # 4 chunks of 16 frames, 13 windows


def test_frame_chunks_over_devices_keep_every_row_in_place():
    """frame_split.frame_rows, the UNet's frame chunks split over 4 devices, with several chunks per device (a
    lax.map) and padding (30 frames: 3 chunks of 4 x 3): every row, and a per-frame text cut with it, comes back
    where it was, exactly (the row-local function sees the same rows). The function is traced knowing its rows are
    split over 4 devices (frame_split.rows_devices, which the cross-attention's chunk choice reads), 1 elsewhere."""
    from pia_jax.models import frame_split
    mesh = sharding.sampler_mesh(jax.devices(), (1, 2, 4))
    rows = np.random.default_rng(0).standard_normal((2 * 30, 3)).astype(np.float32)
    text = np.random.default_rng(1).standard_normal((2, 30, 5, 3)).astype(np.float32)
    seen = []

    def fn(x, ctx):  # row by row, exact in floats (2x is), so any rounding difference is a misplaced row
        seen.append(frame_split.rows_devices())
        return 2 * x + ctx.reshape((-1,) + ctx.shape[2:])[:, 0]

    def split(x, ctx):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return frame_split.frame_rows(fn, frame_split.Chunks(3, "window"), 30, (x,), ctx)
    x = jax.device_put(rows, NamedSharding(mesh, P("cfg")))  # a video per cfg device, as guided_eps places them
    np.testing.assert_array_equal(np.asarray(jax.jit(split)(x, text)), np.asarray(fn(rows, text)))
    assert seen == [4, 1]  # traced inside the split, then called outside it


def test_one_video_over_many_devices_is_the_one_device_video(model, monkeypatch):
    """16 frames with guidance (no windows: cfg = 2 x window = 4, the frames in groups of 4 split inside the UNet as
    attention mode's chunks are; 13 frames: window 3, padded), the same with 2 devices per video (6 idle, no padding
    copies), and 64 frames in context mode unet (13 windows of 16, stride 4: cfg = 2 x window = 4), with keyframes
    and prompt travel: the frames of one device, and each device's share of the denoise work is ~1/8, 1/2 resp. ~1/8
    of the one-device program's. The programs are traced for the layout's devices: attention kernels chosen, and
    Pallas ones partitioned, for the 2 devices the pair uses (over all 8 the splash kernel's shard_map does not
    lower: a TPU slice)."""
    one = Animator.load(model, mesh=Mesh(np.asarray(jax.devices()[:1]), ("data",)))
    many = Animator.load(model)
    assert many.devices == 8
    short = SampleOptions(steps=2)
    expected, flops_one = video(one, 16, short), denoise_flops(one)
    got = video(many, 16, short)
    assert many._split.shape == {"video": 1, "cfg": 2, "window": 4} and many.devices_per_group == 8
    assert_close(got, expected, TOL, "16 frames, cfg x frames over 8 devices")
    print(f"per-device denoise FLOPs, 8 devices / 1: {denoise_flops(many) / flops_one:.3f}")
    assert denoise_flops(many) < 0.2 * flops_one, "each device runs 4 of the 16 frames of one guidance half"
    odd = video(many, 13, short)  # 3 groups of 4+ frames: 13 rows padded to 15 inside the UNet, 2 dropped
    assert many._split.shape == {"video": 1, "cfg": 2, "window": 3}
    assert_close(odd, video(one, 13, short), TOL, "13 frames, cfg x frames over 6 devices")

    pair = dataclasses.replace(short, devices_per_video=2)
    targets, pick = [], attention.pick_kernel
    monkeypatch.setattr(attention, "pick_kernel", lambda *a, **k: targets.append(attention._TARGET.get()[0]) or
                        pick(*a, **k))
    many.plan_batch_size(1, SIZE, SIZE, 16, pair, float_frames=True, text_keys=2, keyframes=2)  # as sample.py does
    assert targets and {m.devices.size for m in targets} == {2}
    compiled = many.compilations
    got = video(many, 16, pair)
    assert many.compilations == compiled, "the plan compiled the split the call runs"
    assert many._split.shape == {"video": 1, "cfg": 2, "window": 1} and many.devices_per_group == 2
    assert_close(got, expected, TOL, "16 frames, cfg over 2 devices")
    print(f"per-device denoise FLOPs, 2 devices / 1: {denoise_flops(many) / flops_one:.3f}")
    assert denoise_flops(many) < 0.6 * flops_one, "each device runs one guidance half of its video"

    long = SampleOptions(steps=2, context_length=16, context_mode="unet")
    # one device runs 4 windows per UNet call (the same sums, grouped as the 4 window devices take them), so both
    # loops have 4 iterations (13 windows padded to 16) and XLA's count of one iteration compares them
    expected = video(one, 64, dataclasses.replace(long, window_batch=4))
    flops_one = denoise_flops(one)
    got = video(many, 64, long)
    assert many._split.shape == {"video": 1, "cfg": 2, "window": 4}
    assert_close(got, expected, TOL, "64 frames, cfg x windows over 8 devices")
    print(f"per-device denoise FLOPs, 8 devices / 1: {denoise_flops(many) / flops_one:.3f}")
    assert denoise_flops(many) < 0.2 * flops_one, "each device runs 1 of the 4 windows of one guidance half"
    with pytest.raises(ValueError, match="devices per video 8: a video can use 4"):
        video(many, 8, SampleOptions(steps=2, devices_per_video=8))  # 8 frames: 2 groups of 4 x guidance


def test_unusable_devices_per_video_fails_before_loading(model, tmp_path, capsys, monkeypatch):
    """sample.py refuses a --devices-per-video the layout rule (sharding.sampler_split) cannot use while planning,
    before any weight is read; a usable one passes the plan."""
    monkeypatch.setattr("pia_jax.sampling.animator.Animator.load", lambda *a, **k: pytest.fail("the model was loaded"))
    Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(tmp_path / "img.png")
    argv = ["--model", str(model), "--image", str(tmp_path / "img.png"), "--prompt", "cat", "--size", str(SIZE),
            "--out", str(tmp_path / "out"), "--frames", "6"]
    assert sample.main(argv + ["--devices-per-video", "4"]) == 2  # 6 frames (one group of 4+) with guidance: 2
    err = capsys.readouterr().err
    assert err.startswith("error: img-cat-42: devices per video 4: a video can use 2"), err
    assert not (tmp_path / "out").exists()
    a = sample.build_parser().parse_args(argv + ["--devices-per-video", "2"])
    assert sample.plan(a)[0].groups[0].options.devices_per_video == 2


def test_attention_mode_splits_a_videos_frames_over_the_devices(model, monkeypatch):
    """32 frames in context mode attention (windows of 8 frames every 4: 4 chunks of 8 frames) with guidance,
    keyframes and prompt travel on 8 devices: cfg 2 x window 4, each device a guidance half of 8 frames in the
    spatial layers and of a quarter of the sites in the motion modules; the frames of one device. Each device's
    FLOPs: measured 0.171 of one device's (0.125 would be an even split; at this tiny size the UNet's 1x1 level has
    one site per video, padded to 4 for the 4 devices, and the sampler's per-video work is not split)."""
    one = Animator.load(model, mesh=Mesh(np.asarray(jax.devices()[:1]), ("data",)))
    many = Animator.load(model)
    options = SampleOptions(steps=2, context_length=8)
    # one device runs its spatial layers on all 32 frames at once (chunking changes no value), so its program has
    # no chunk loop, whose body XLA's FLOP count takes once (8 devices: a chunk each, no loop either)
    with monkeypatch.context() as m:
        m.setattr("pia_jax.sampling.animator.fused", lambda denoiser, window: loop.fused(denoiser, window, False))
        expected, flops_one = video(one, 32, options), denoise_flops(one)
    got = video(many, 32, options)
    assert many._split.shape == {"video": 1, "cfg": 2, "window": 4}
    assert_close(got, expected, TOL, "32 frames, attention mode, cfg x frames over 8 devices")
    print(f"per-device denoise FLOPs, 8 devices / 1: {denoise_flops(many) / flops_one:.3f}")
    assert denoise_flops(many) < 0.25 * flops_one, "each device runs a quarter of a guidance half's frames"
