"""Programs compiled for a real multi-chip TPU slice on this CPU machine (libtpu, no TPU: device-less AOT compiles,
as bench/tpu_aot.py does for the SD1.5 table). Skipped where libtpu is not installed (the `test` extra installs it).

"auto" attention must choose for the chips the program is compiled for, not for this process's CPU backend, and
Pallas' splash kernel must be partitioned by hand (shard_map): XLA refuses to partition a Mosaic kernel.
"""

import importlib.util
import os

import jax
import jax.numpy as jnp
import pytest

from pia_jax.models import attention
from pia_jax.sharding import batch_sharding, make_mesh

pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu (pip install libtpu)")


@pytest.fixture(scope="module")
def tpu_mesh():
    """The (data 4, fsdp 2) mesh over the 8 chips of a v5p-16 slice (two hosts), as train.py would build it."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # pytest-xdist workers may each load libtpu
    from jax.experimental import topologies
    topo = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x2")
    return make_mesh(4, 2, devices=topo.devices)


def compile_attention(q):
    """Self-attention over q's tokens, forward and backward, compiled. A new function each call: jax reuses a traced
    function's kernel choice (made at trace time) for the same input shapes."""
    loss = lambda q: attention.dot_product_attention(q, q, q, kernel="auto").astype(jnp.float32).sum()  # noqa: E731
    return jax.jit(jax.grad(loss)).lower(q).compile().as_text()


def test_auto_attention_compiles_on_a_multi_chip_tpu_mesh(tpu_mesh, monkeypatch):
    # 16 frames of 32x32 latent tokens (256² training) with SD1.5's first head dim, split over the 8 chips
    q = jax.ShapeDtypeStruct((16, 1024, 8, 40), jnp.bfloat16, sharding=batch_sharding(tpu_mesh))
    with attention.compiling_for(tpu_mesh):
        assert "tpu_custom_call" in compile_attention(q)  # the splash kernel, chosen for the TPU from this CPU process
    # without compiling_for, "auto" decides for this process's backend (CPU) and takes XLA attention
    assert "tpu_custom_call" not in compile_attention(q)
    # the kernel left to XLA's partitioner (the bug this guards against) does not compile on several chips
    monkeypatch.setattr(attention, "_per_device", lambda fn, mesh, batch: fn)
    with attention.compiling_for(tpu_mesh), pytest.raises(NotImplementedError, match="automatically partitioned"):
        compile_attention(q)
