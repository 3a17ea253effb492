"""Context-window schedules, blend weights, FreeNoise noise rescheduling and window fusion against diffusers' own
FreeNoise code (`FreeNoiseTransformerBlock`, `AnimateDiffFreeNoiseMixin`) called on minimal objects, and
`windowed_eps` against a plain-Python blend of per-window predictions."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.models.attention import FreeNoiseTransformerBlock
from diffusers.pipelines.free_noise_utils import AnimateDiffFreeNoiseMixin
from flax import nnx

from pia_jax import weights
from pia_jax.models.layers import Builder
from pia_jax.models.motion import TemporalTransformerBlock
from pia_jax.sampling import windows
from tests.oracle import assert_close, numpy_state, randomize, rel_err

CASES = [(24, 16, 4), (25, 16, 4), (19, 16, 16), (16, 16, 4), (48, 16, 8), (10, 6, 2), (11, 6, 3), (7, 4, 4)]


def diffusers_windows(num_frames, length, stride):
    """(start, end, first frame taken) per window, as FreeNoiseTransformerBlock.forward builds and uses them."""
    block = types.SimpleNamespace(context_length=length, context_stride=stride)
    spans = FreeNoiseTransformerBlock._get_frame_indices(block, num_frames)
    out = [(a, b, a) for a, b in spans]
    if spans[-1][1] != num_frames:  # forward() adds a window ending at the last frame, taking only new frames
        out.append((num_frames - length, num_frames, spans[-1][1]))
    return out


@pytest.mark.parametrize("num_frames, length, stride", CASES)
@pytest.mark.parametrize("weighting", windows.WEIGHTINGS)
def test_schedule_and_weights_match_diffusers(num_frames, length, stride, weighting):
    sched = windows.WindowSchedule(num_frames, length, stride, weighting)
    ref = diffusers_windows(num_frames, length, stride)
    np.testing.assert_array_equal(sched.frames, [np.arange(a, b) for a, b, _ in ref])
    if weighting == "delayed_reverse_sawtooth" and length % 2:
        pytest.skip("diffusers' code makes length + 1 sawtooth weights for odd lengths (documented difference)")
    w = np.asarray(FreeNoiseTransformerBlock._get_frame_weights(None, length, weighting), np.float32)
    np.testing.assert_array_equal(windows.frame_weights(length, weighting), w)
    expected = np.stack([np.where(np.arange(a, b) >= taken, w, 0) for a, b, taken in ref])
    np.testing.assert_array_equal(sched.weights, expected)
    assert (sched.norm > 0).all()


def test_odd_sawtooth_follows_diffusers_docstring():
    assert len(FreeNoiseTransformerBlock._get_frame_weights(None, 5, "delayed_reverse_sawtooth")) == 6
    np.testing.assert_array_equal(windows.frame_weights(5, "delayed_reverse_sawtooth"),
                                  np.float32([0.01, 0.01, 3, 2, 1]))


def test_short_video_is_one_window():
    sched = windows.WindowSchedule(5, 16, 4)
    np.testing.assert_array_equal(sched.frames, [np.arange(5)])


@pytest.mark.parametrize("num_frames, length, stride", [(24, 16, 4), (27, 16, 4), (11, 6, 3), (13, 6, 6)])
@pytest.mark.parametrize("noise_type", windows.NOISE_TYPES)
def test_noise_rescheduling_matches_diffusers(num_frames, length, stride, noise_type):
    """diffusers draws the noise and then one torch.randperm per block from the same generator; we inject the same
    permutations (drawn from a generator in the same state). For repeat_context diffusers is given the first
    window's noise: from its own draw it returns the noise unchanged (its `context_num_frames` compares the window
    length with the string "repeat_context"), which is not the documented repetition."""
    shape = (1, 2, num_frames, 3, 3)
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(shape, generator=g)
    perms = np.asarray([torch.randperm(stride, generator=g).numpy() for _ in range(length, num_frames, stride)])
    pipe = types.SimpleNamespace(_free_noise_context_length=length, _free_noise_context_stride=stride,
                                 _free_noise_noise_type=noise_type, vae_scale_factor=1)
    given = noise[:, :, :length].clone() if noise_type == "repeat_context" else None
    expected = AnimateDiffFreeNoiseMixin._prepare_latents_free_noise(
        pipe, 1, 2, num_frames, 3, 3, torch.float32, "cpu", torch.Generator().manual_seed(7), given)
    got = windows.freenoise_noise(noise.numpy().transpose(0, 2, 3, 4, 1), windows.WindowSchedule(num_frames, length,
                                  stride), noise_type, perms.reshape(-1, stride) if noise_type == "shuffle_context"
                                  else None)
    np.testing.assert_array_equal(np.asarray(got), expected.numpy().transpose(0, 2, 3, 4, 1))


def test_shuffle_permutations_deterministic_per_key():
    a = windows.shuffle_permutations(jax.random.key(3), 40, 16, 4)
    assert a.shape == (6, 4) and all(sorted(p) == [0, 1, 2, 3] for p in a.tolist())
    np.testing.assert_array_equal(a, windows.shuffle_permutations(jax.random.key(3), 40, 16, 4))
    assert not np.array_equal(a, windows.shuffle_permutations(jax.random.key(4), 40, 16, 4))
    src = windows.freenoise_source_frames(40, 16, 4, "shuffle_context", a)
    assert (src < 16).all() and sorted(src[16:20]) == [0, 1, 2, 3]


def block_pair(dim=16, heads=2, seed=0):
    torch_block = randomize(FreeNoiseTransformerBlock(
        dim, heads, dim // heads, cross_attention_dim=None, activation_fn="geglu", double_self_attention=True,
        positional_embeddings="sinusoidal", num_positional_embeddings=32), seed).eval()
    abstract = nnx.eval_shape(lambda: TemporalTransformerBlock(Builder(nnx.Rngs(0)), dim, heads, 32, "xla"))
    state = {k: v for k, v in numpy_state(torch_block).items() if k != "pos_embed.pe"}  # recomputed by our block
    return torch_block, weights.load_state_dict(abstract, state, weights.DIFFUSERS_UNET)


def fused(block, x, sched):
    """Our block with the schedule's windows, jitted (one compilation instead of many eager ones)."""
    graphdef, state = nnx.split(block)
    return np.asarray(jax.jit(lambda st, x: nnx.merge(graphdef, st)(x, sched.arrays()))(state, x))


# fp32 on both sides, only summation order differs (as tests/test_unet.py): measured ~1e-7, bounded at 1e-5.
BLOCK_TOL = 1e-5


@pytest.mark.parametrize("num_frames, length, stride, weighting", [
    (11, 6, 3, "flat"), (10, 6, 2, "pyramid"), (12, 4, 4, "delayed_reverse_sawtooth"), (5, 5, 2, "pyramid")])
def test_window_fusion_matches_diffusers_block(num_frames, length, stride, weighting):
    torch_block, ours = block_pair()
    x = np.random.default_rng(0).standard_normal((3, num_frames, 16)).astype(np.float32)
    torch_block.set_free_noise_properties(length, stride, weighting)
    with torch.no_grad():
        expected = torch_block(torch.from_numpy(x)).numpy()
    got = fused(ours, x, windows.WindowSchedule(num_frames, length, stride, weighting))
    assert_close(got, expected, BLOCK_TOL, f"window fusion {num_frames}/{length}/{stride} {weighting}")


def test_one_fusion_window_is_the_plain_block():
    """A window as long as the video: w·y / w = y, within fp32 rounding (measured ~1e-7; bounded at BLOCK_TOL)."""
    _, ours = block_pair(seed=2)
    x = np.random.default_rng(3).standard_normal((2, 7, 16)).astype(np.float32)
    plain = np.asarray(jax.jit(lambda x: ours(x))(x))
    assert_close(fused(ours, x, windows.WindowSchedule(7, 16, 4, "pyramid")), plain, BLOCK_TOL, "one window")


def test_tail_normalisation_difference_from_diffusers():
    """The one deliberate difference: frames only the added tail window covers. diffusers divides them all by the
    weight w[t] of the first of them; we divide each by its own weight w[j]. So before the feed-forward diffusers'
    tail states are ours times w[j] / w[t] and every other frame is equal; checked with the feed-forward's output
    layer zeroed, so the block returns exactly the blended states."""
    n, length, stride = 11, 6, 3  # windows 0-5, 3-8 and the tail 5-10, which adds frames 9, 10 (positions 4, 5)
    torch_block, ours = block_pair(seed=1)
    with torch.no_grad():
        torch_block.ff.net[2].weight.zero_()
        torch_block.ff.net[2].bias.zero_()
    for p in (ours.ff.net[2].kernel, ours.ff.net[2].bias):
        p[...] = jnp.zeros_like(p[...])
    x = np.random.default_rng(1).standard_normal((2, n, 16)).astype(np.float32)
    torch_block.set_free_noise_properties(length, stride, "pyramid")
    with torch.no_grad():
        expected = torch_block(torch.from_numpy(x)).numpy()
    got = fused(ours, x, windows.WindowSchedule(n, length, stride, "pyramid"))
    w = windows.frame_weights(length, "pyramid")  # [1, 2, 3, 3, 2, 1]
    assert_close(got[:, :10], expected[:, :10], BLOCK_TOL, "frames 0-9 (frame 9: w[4] / w[4] = 1)")
    assert_close(got[:, 10] * w[5] / w[4], expected[:, 10], BLOCK_TOL, "frame 10: diffusers = ours x w[5] / w[4]")
    assert rel_err(got[:, 10], expected[:, 10]) > 0.1  # the difference is real


def blend_reference(eps_fn, latents, sched):
    """Plain-Python weighted mean of per-window predictions: sum_w w·eps_w / sum_w w, frame by frame."""
    acc = np.zeros(latents.shape, np.float64)
    den = np.zeros(latents.shape[1])
    for f, w in zip(sched.frames, sched.weights):
        eps = np.asarray(eps_fn(jnp.asarray(latents[:, f]), jnp.asarray(f[None])))
        acc[:, f] += w[None, :, None] * eps
        den[f] += w
    return acc / den[None, :, None]


def toy_eps(x, frames):
    """Depends on the whole window (its mean) and on absolute frame indices, like a UNet with per-frame inputs."""
    k = frames.shape[0]
    x_BxKxLxC = x.reshape(-1, k, *x.shape[1:])
    out = jnp.tanh(x_BxKxLxC + x_BxKxLxC.mean(axis=2, keepdims=True)) + 0.01 * frames[None, :, :, None]
    return out.reshape(x.shape)


@pytest.mark.parametrize("num_frames, length, stride, weighting", [
    (25, 16, 4, "pyramid"), (11, 6, 3, "flat"), (13, 6, 2, "delayed_reverse_sawtooth")])
def test_windowed_eps_blends_per_window_predictions(num_frames, length, stride, weighting):
    sched = windows.WindowSchedule(num_frames, length, stride, weighting)
    latents = np.random.default_rng(0).standard_normal((2, num_frames, 3)).astype(np.float32)
    expected = blend_reference(toy_eps, latents, sched)
    for k in (1, 2, 3):  # window batches, the last one padded with zero-weight windows
        got = jax.jit(lambda x: windows.windowed_eps(toy_eps, x, sched, window_batch=k))(latents)
        assert_close(got, expected, 1e-6, f"window batch {k}")  # fp32 sums of <= 4 terms vs float64


def test_window_as_long_as_video_is_plain_eps():
    """One window holding every frame: the blend divides w·eps by w; exact for flat weights, and within a rounding
    (1 ulp relative, bounded at 1e-6) for pyramid weights."""
    latents = np.random.default_rng(0).standard_normal((2, 8, 3)).astype(np.float32)
    plain = np.asarray(toy_eps(jnp.asarray(latents), jnp.arange(8)[None]))
    flat = windows.windowed_eps(toy_eps, jnp.asarray(latents), windows.WindowSchedule(8, 8, 4, "flat"))
    np.testing.assert_array_equal(np.asarray(flat), plain)
    pyramid = windows.windowed_eps(toy_eps, jnp.asarray(latents), windows.WindowSchedule(8, 16, 4, "pyramid"))
    assert_close(pyramid, plain, 1e-6, "one pyramid window")


@pytest.mark.parametrize("args, message", [
    ((10, 6, 7), "stride must be in 1..6"), ((10, 6, 0), "stride must be in 1..6"),
    ((40, 33, 4, 32), "longer than the motion modules' 32 positions"), ((10, 0, 1), "at least one frame")])
def test_bad_windows_are_refused(args, message):
    with pytest.raises(ValueError, match=message):
        windows.check_window(*args)


def test_windowed_eps_memory_does_not_grow_with_frames():
    """XLA's compiled temp memory for 32 and 128 frames: a prediction whose activations are 512x the latents (like a
    UNet's) must be live for one window batch only; what grows is O(N · latent) (accumulator, gathers)."""
    w = jnp.linspace(-1, 1, 4 * 2048).reshape(4, 2048)

    def eps(x, frames):
        h = jnp.tanh(x @ w)  # (b·k, L, 8, 8, 2048): 512x a window's latents, materialised by the matmuls
        return h @ w.T

    def temp_bytes(n):
        x = jax.ShapeDtypeStruct((2, n, 8, 8, 4), jnp.float32)
        fn = jax.jit(lambda x: windows.windowed_eps(eps, x, windows.WindowSchedule(n, 16, 4), window_batch=2))
        return fn.lower(x).compile().memory_analysis().temp_size_in_bytes

    latent_bytes = 2 * 128 * 8 * 8 * 4 * 4
    activation_bytes = 512 * 2 * 2 * 16 * 8 * 8 * 4 * 4  # one batch of 2 windows: 32 MiB
    small, large = temp_bytes(32), temp_bytes(128)
    assert small >= activation_bytes  # the activations are really in the measured program
    assert large - small <= 4 * latent_bytes, (small, large)
