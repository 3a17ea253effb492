"""GroupNorm's one-pass statistics on adversarial inputs, against float64 two-pass statistics (issue 28).

Real SD1.5 activations carry large outliers and offsets that random-weight parity tests never produce. Each case is
one GroupNorm on fp32 (or bf16) inputs, compared with the float64 definition on the same input values.

Tolerance: 5e-5 of max(1, |expected|) per element (the outputs have unit scale; the relative part covers the
outlier's own value, ~100). fp32 summation order alone gives ~3e-7 here; the worst case of the subsample shift
(deviations concentrated on the subsampled positions) measured 6e-6; the former first-value shift measured 9e-4
with a 100-sigma outlier at a group's first element, which the last test checks is still caught.
"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from pia_jax.models.layers import GroupNorm

TOL = 5e-5
FRAMES, GROUPS, EPS = 8, 8, 1e-5
SHAPE = (2 * FRAMES, 16, 16, 64)  # 2 clips of 8 frames, 16x16, 8 groups of 8 channels: 16384 values per group
K = SHAPE[-1] // GROUPS


def reference(x, frames=FRAMES, groups=GROUPS):
    g = np.asarray(x, np.float64).reshape(x.shape[0] // frames, -1, groups, x.shape[-1] // groups)
    mean, var = g.mean(axis=(1, 3), keepdims=True), g.var(axis=(1, 3), keepdims=True)
    return ((g - mean) / np.sqrt(var + EPS)).reshape(x.shape)


def error(got, expected) -> float:
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    return float((np.abs(got - expected) / np.maximum(1.0, np.abs(expected))).max())


RUN = nnx.jit(lambda m, x, frames: m(x, frames=frames), static_argnums=2)


def ours(x, frames=FRAMES, groups=GROUPS, dtype=jnp.float32):
    return np.asarray(RUN(GroupNorm(groups, x.shape[-1], EPS, dtype=dtype), jnp.asarray(x), frames)
                      .astype(jnp.float32))


def base(seed=0):
    return np.random.default_rng(seed).standard_normal(SHAPE).astype(np.float32)


def outlier(at, value=100.0):
    """A 100-sigma value at the first, a middle or the last position of group 1 of the second clip (frame, h, w, c)."""
    x = base()
    index = {"first": (FRAMES, 0, 0, K), "middle": (FRAMES + 3, 7, 5, K + 4),
             "last": (2 * FRAMES - 1, 15, 15, 2 * K - 1)}[at]
    x[index] = value
    return x


def strided():
    """The subsample shift's worst case: +1000 on exactly the positions it averages (every 32nd)."""
    x = base().reshape(2, -1, SHAPE[-1])
    x[:, ::GroupNorm.SHIFT_STRIDE] += 1e3
    return x.reshape(SHAPE)


def half(axis):
    x = base()
    if axis == "frames":
        x[:FRAMES // 2] += 1e3  # the first half of the first clip's frames
    else:
        x[..., ::2] += 1e3  # every other channel: half of each group
    return x


CASES = {
    "outlier first": lambda: outlier("first"),
    "outlier middle": lambda: outlier("middle"),
    "outlier last": lambda: outlier("last"),
    "1e4-sigma outlier first": lambda: outlier("first", 1e4),
    "dc offset 1e4": lambda: base() * 0.5 + 1e4,
    "offset on half the frames": lambda: half("frames"),
    "offset on half the channels": lambda: half("channels"),
    "offset on the subsampled positions": strided,
}


@pytest.mark.parametrize("case", list(CASES))
def test_statistics_match_float64_on_adversarial_inputs(case):
    x = CASES[case]()
    assert error(ours(x), reference(x)) <= TOL


def test_small_maps_and_one_frame():
    """Fewer positions than the subsample stride (a 4x4 map, frames=1): the shift is the first position's mean."""
    x = np.random.default_rng(1).standard_normal((3, 4, 4, 32)).astype(np.float32)
    x[1, 0, 0, :4] = 100.0
    assert error(ours(x, frames=1, groups=4), reference(x, frames=1, groups=4)) <= TOL


@pytest.mark.parametrize("case", ["outlier first", "dc offset 1e4"])
def test_bf16_inputs(case):
    """bf16 activations (the sampler's compute dtype): statistics in fp32 from the bf16 values. With fp32 outputs the
    tolerance is as above; with bf16 outputs each value is the fp32 result rounded to bf16: within half a bf16 step
    (2^-8 relative: bf16 keeps 8 significant bits) plus the fp32 tolerance of the float64 result."""
    x = CASES[case]().astype(ml_dtypes.bfloat16)
    expected = reference(x.astype(np.float32))
    assert error(ours(x), expected) <= TOL
    got = ours(x, dtype=jnp.bfloat16)
    assert np.all(np.abs(got - expected) <= 2.0 ** -8 * np.abs(expected) * (1 + TOL)
                  + TOL * np.maximum(1.0, np.abs(expected)))


def test_first_value_shift_fails_the_outlier_case():
    """The cases are adversarial enough: the former shift (each group's first value) misses TOL on a 100-sigma outlier
    there, with everything else as in GroupNorm."""
    @jax.jit
    def first_value_shift(x):
        d = x.reshape(2, -1, GROUPS, K) - x.reshape(2, -1, GROUPS, K)[:, :1, :, :1]
        m1, m2 = d.mean(axis=(1, 3), keepdims=True), jnp.square(d).mean(axis=(1, 3), keepdims=True)
        return ((d - m1) * jax.lax.rsqrt(jnp.maximum(m2 - m1 * m1, 0.0) + EPS)).reshape(x.shape)

    x = outlier("first")
    assert error(first_value_shift(jnp.asarray(x)), reference(x)) > 10 * TOL
