"""The attention kernels that run everywhere: chunked XLA attention equals plain XLA attention (values; gradients
both against float64 torch), and "auto" picks chunks only for large logits. (cuDNN is checked on a GPU in test_gpu.py.)

Chunking splits the queries only, so each output row is the same softmax over the same keys: the two agree to fp32
rounding of differently fused matmuls (~1e-7 of the output scale); TOL = 1e-6 catches any mis-assembled block
(a swapped or shifted block changes rows by O(1)).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from pia_jax.models import attention
from tests.oracle import assert_close

TOL = 1e-6
GRAD_TOL = 2e-6  # gradients against float64: assert_gradients_match_float64


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(attention, "CHUNK_QUERIES", 256)  # several blocks and a ragged last one at test sizes


def qkv(lq=700, lk=300, b=2, h=3, d=16, seed=0):
    r = np.random.default_rng(seed)
    return [jnp.asarray(r.standard_normal(s), jnp.float32) for s in ((b, lq, h, d), (b, lk, h, d), (b, lk, h, d))]


@pytest.mark.parametrize("lq, lk", [(700, 300), (256, 77), (1, 5)])
def test_chunked_equals_xla(small_chunks, lq, lk):
    q, k, v = qkv(lq, lk)
    expected = attention.dot_product_attention(q, k, v, kernel="xla")
    assert_close(jax.jit(lambda *a: attention.dot_product_attention(*a, kernel="chunked"))(q, k, v), expected, TOL,
                 f"chunked attention {lq}x{lk}")


def torch_gradients(q, k, v, w):
    """d sum(w * attention(q, k, v)) / d (q, k, v) in float64 by torch's autograd: the independent oracle."""
    import torch
    t = [torch.tensor(np.asarray(a), dtype=torch.float64).transpose(1, 2).requires_grad_() for a in (q, k, v)]
    out = torch.nn.functional.scaled_dot_product_attention(*t)  # (B, H, L, D)
    (out * torch.tensor(np.asarray(w), dtype=torch.float64).transpose(1, 2)).sum().backward()
    return [a.grad.transpose(1, 2).numpy() for a in t]


def assert_gradients_match_float64(kernel, q, k, v):
    """dK and dV sum over every query row, and chunks add their rows' parts in another order than one matmul, so two
    fp32 kernels differ by both their roundings (chunked vs XLA: 1.1e-6 on dV). Against float64 each kernel is held
    to GRAD_TOL: a sum over 700 rows rounds to ~sqrt(700) * 2^-24 = 1.6e-6 of its terms' scale (measured against
    float64 on dV: XLA 7.3e-7, chunked 3.5e-7, short 2e-7). A lost or doubled block is off by O(1)."""
    w = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)
    grad = lambda kernel: jax.jit(jax.grad(  # noqa: E731
        lambda q, k, v: jnp.sum(w * attention.dot_product_attention(q, k, v, kernel=kernel)), argnums=(0, 1, 2)))
    expected = torch_gradients(q, k, v, w)
    for kern in ("xla", kernel):  # XLA's own fp32 rounding shows the bound is not loose for the kernel tested
        for got, exp, name in zip(grad(kern)(q, k, v), expected, "qkv"):
            assert_close(got, exp, GRAD_TOL, f"{kern}: d loss / d {name} vs float64")


def test_chunked_gradients_match_float64(small_chunks):
    assert_gradients_match_float64("chunked", *qkv())


def test_short_equals_xla():
    """The broadcast-and-sum kernel for temporal attention: the same fp32 math, another summation order."""
    q, k, v = qkv(16, 16, b=3, h=4, d=40)
    assert_close(jax.jit(lambda *a: attention.dot_product_attention(*a, kernel="short"))(q, k, v),
                 attention.dot_product_attention(q, k, v, kernel="xla"), TOL, "short attention")
    assert_gradients_match_float64("short", q, k, v)


def test_auto_picks_chunks_for_large_logits_off_cuda():
    assert attention.pick_kernel("auto", 4096, 40, jnp.float32) == "chunked"  # 64x64 latents: 4096^2 logits
    assert attention.pick_kernel("auto", 4096, 40, jnp.float32, kv_len=77) == "xla"  # cross-attention to text
    assert attention.pick_kernel("auto", 1024, 40, jnp.float32) == "xla"  # 32x32 latents
    assert attention.pick_kernel("auto", 16, 40, jnp.float32) == "xla"  # temporal
    q, k, v = qkv(8, 8)  # causal requests never take the chunked path
    assert_close(attention.dot_product_attention(q, k, v, kernel="chunked", causal=True),
                 attention.dot_product_attention(q, k, v, kernel="xla", causal=True), 0, "causal")


# Splash attention runs here in Pallas' interpreter (slow: one small case). It is the same softmax in another
# summation order (online softmax over 128-key blocks, zero-padded head dims) with q scaled before the product,
# not the logits after: fp32 agrees to ~1e-6 of the output scale (measured 1.3e-6 here), so 1e-5; a mis-scaled or
# mis-padded result is off by O(1).
def test_splash_equals_xla():
    q, k, v = qkv(256, 256, b=1, h=2, d=40)  # SD1.5's smallest head dim, padded to 128 lanes inside
    assert_close(jax.jit(lambda *a: attention.dot_product_attention(*a, kernel="splash"))(q, k, v),
                 attention.dot_product_attention(q, k, v, kernel="xla"), 1e-5, "splash attention")


def test_auto_picks_splash_on_tpu_for_long_self_attention(monkeypatch):
    monkeypatch.setattr(attention, "_on_tpu", lambda: True)
    assert attention.pick_kernel("auto", 4096, 40, jnp.bfloat16) == "splash"  # 64x64 latents
    assert attention.pick_kernel("auto", 1024, 80, jnp.float32) == "splash"  # 32x32 latents
    assert attention.pick_kernel("auto", 4096, 40, jnp.bfloat16, kv_len=77) == "xla"  # cross-attention to text
    assert attention.pick_kernel("auto", 256, 160, jnp.bfloat16) == "xla"  # 16x16: short
    assert attention.pick_kernel("auto", 16, 40, jnp.bfloat16) == "xla"  # temporal
    assert attention.pick_kernel("auto", 4160, 40, jnp.bfloat16) == "chunked"  # 65x64: not whole blocks


def _fake_mesh(platform: str, n: int = 8):
    """What `compiling_for` reads of a mesh: its devices' platform (a TPU mesh cannot be built without libtpu)."""
    from types import SimpleNamespace
    return SimpleNamespace(devices=np.array([SimpleNamespace(platform=platform)] * n), size=n)


def test_auto_decides_for_the_devices_compiled_for():
    """The CPU process compiling a TPU program picks the TPU's kernel, and a CPU program keeps XLA's."""
    assert attention.pick_kernel("auto", 1024, 40, jnp.bfloat16) == "xla"  # this process's backend: CPU
    with attention.compiling_for(_fake_mesh("tpu")):
        assert attention.pick_kernel("auto", 1024, 40, jnp.bfloat16) == "splash"
        with attention.compiling_for(_fake_mesh("cpu")):
            assert attention.pick_kernel("auto", 1024, 40, jnp.bfloat16) == "xla"
    assert attention.pick_kernel("auto", 1024, 40, jnp.bfloat16) == "xla"  # the setting ends with its block


def test_splash_on_a_mesh_runs_per_device():
    """On 8 devices the splash kernel runs inside shard_map, each device on its videos: values and gradients equal
    XLA attention (tolerance as test_splash_equals_xla), for a batch the mesh divides and one it does not (then
    the mesh axes that divide it split it, the others replicate)."""
    from pia_jax.sharding import make_mesh
    mesh = make_mesh(4, 2)
    for batch in (8, 2):
        q, k, v = qkv(128, 128, b=batch, h=1, d=40)
        w = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)

        def loss(kernel):
            return jax.value_and_grad(lambda q, k, v, w: jnp.sum(
                w * attention.dot_product_attention(q, k, v, kernel=kernel)), argnums=(0, 1, 2))

        with attention.compiling_for(mesh):
            lowered = jax.jit(loss("splash")).lower(q, k, v, w)
            assert "shard_map" in lowered.as_text() or "manual_computation" in lowered.as_text()
            value, grads = lowered.compile()(q, k, v, w)
        expected_value, expected = loss("xla")(q, k, v, w)
        assert_close(value, expected_value, 1e-5, f"splash on a mesh, batch {batch}: loss")
        for g, e, name in zip(grads, expected, "qkv"):
            assert_close(g, e, 1e-5, f"splash on a mesh, batch {batch}: d loss / d {name}")


def test_chunked_keeps_a_query_split_over_devices(small_chunks):
    """Frames folded into the query sequence and split over 4 devices in contiguous blocks (frame_split.py):
    each query chunk keeps that split, so the compiled program moves no queries between devices (with contiguous
    chunks GSPMD all-gathered them, 5.4 TB per chip per 64-frame video, BENCHMARKS.md); values as XLA's (TOL).
    Under `queries_split(4)` (the UNet says so) a chunk holds CHUNK_QUERIES rows per device: 3 chunks, not 12."""
    from jax.sharding import Mesh, NamedSharding
    mesh = Mesh(np.array(jax.devices()[:4]), ("window",))
    q, k, v = qkv(4 * 256 * 3, 77, b=2, h=2, d=16)  # 192 rows per device
    rows = NamedSharding(mesh, P(None, "window"))
    q = jax.device_put(q, rows)
    expected = attention.dot_product_attention(q, k, v, kernel="xla")
    for devices, chunks in ((1, 12), (4, 3)):
        with attention.queries_split(devices):
            fn = jax.jit(lambda *a: attention.dot_product_attention(*a, kernel="chunked"), out_shardings=rows)
            lowered = fn.lower(q, k, v)
        hlo = lowered.compile().as_text()
        assert not [op for op in ("all-gather", "all-to-all", "collective-permute", "all-reduce") if op in hlo], hlo
        assert f"tensor<{chunks}x2x{256 * devices}x2x16xf32>" in lowered.as_text(), devices  # (n, B, C, H, D)
        assert_close(fn(q, k, v), expected, TOL, f"chunked, rows split, queries_split({devices})")


def test_auto_chunks_by_one_devices_queries():
    """64 frames x 4096 tokens folded into a cross-attention's queries (77 text keys) take chunks on one device, and
    plain XLA where 4 devices each hold 16 frames' queries (attention.queries_split, set by the UNet)."""
    assert attention.pick_kernel("auto", 64 * 4096, 40, jnp.float32, kv_len=77) == "chunked"
    with attention.queries_split(4):
        assert attention.pick_kernel("auto", 64 * 4096, 40, jnp.float32, kv_len=77) == "xla"
        assert attention.pick_kernel("auto", 256 * 4096, 40, jnp.float32, kv_len=77) == "chunked"
