"""GPU-only checks (skipped elsewhere; run with `PIA_TEST_GPU=1 pytest tests/test_gpu.py` on a CUDA machine).

cuDNN flash attention must agree with the XLA kernel at every call site it is picked for, in both directions
(gradients too, for training), the full model in bf16 must stay close to fp32, and the sampling loop must not
re-lay weights in every step.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pia_jax.models import attention, config
from pia_jax.models.unet import UNetMotionModel
from tests.oracle import assert_close

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU")

# bf16 keeps 8 significant bits (relative rounding 2^-9 ~ 2e-3 per value); two bf16 attention kernels with
# different accumulation orders agree to a few 1e-3 of the output scale, so 2e-2 is a bound no layout bug passes.
ATTN_TOL = 2e-2


# (batch, q_len, kv_len, heads, head_dim): spatial self-attention at 64x64 and 32x32 latents, cross-attention to
# 77 text tokens (frames folded into the query), and the 1280-channel level (head dim 160).
@pytest.mark.parametrize("shape", [(2, 4096, 4096, 8, 40), (2, 1024, 1024, 8, 80), (2, 16384, 77, 8, 40),
                                   (4, 1024, 77, 8, 160)])
def test_cudnn_attention_matches_xla(shape):
    b, lq, lk, h, d = shape
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (b, lq, h, d), jnp.bfloat16)
    k, v = (jax.random.normal(key, (b, lk, h, d), jnp.bfloat16) for key in keys[1:3])
    cot = jax.random.normal(keys[3], (b, lq, h, d), jnp.bfloat16)
    assert attention.pick_kernel("auto", lq, d, jnp.bfloat16) == "cudnn"

    @jax.jit(static_argnums=0)
    def run(kernel, q, k, v, cot):
        out, vjp = jax.vjp(lambda q, k, v: attention.dot_product_attention(q, k, v, kernel=kernel), q, k, v)
        return (out, *vjp(cot))

    for name, a, b_ in zip(("out", "dq", "dk", "dv"), run("cudnn", q, k, v, cot), run("xla", q, k, v, cot)):
        assert_close(np.asarray(a, np.float32), np.asarray(b_, np.float32), ATTN_TOL, f"{name} {shape}")


def test_bf16_unet_close_to_fp32():
    """Full SD1.5 + PIA UNet, bf16 compute (cuDNN attention where picked) vs fp32 compute (XLA, highest precision).
    Tolerance 5e-2: bf16 rounding (~2e-3 per op) compounds over ~60 layers; measured values are recorded in the
    test output. A wrong kernel or layout gives O(1) errors."""
    cfg = config.SD15_PIA.unet
    model32 = UNetMotionModel(cfg, rngs=nnx.Rngs(0), attention_kernels={"self": "xla", "cross": "xla"})
    graphdef, state = nnx.split(model32)
    graphdef16 = nnx.graphdef(nnx.eval_shape(lambda: UNetMotionModel(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16,
                                                                      param_dtype=jnp.bfloat16)))
    state16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), state)
    rng = np.random.default_rng(0)
    args = (jnp.asarray(rng.standard_normal((1, 4, 32, 32, 4)), jnp.float32), jnp.int32(400),
            jnp.asarray(rng.standard_normal((1, 77, 768)), jnp.float32),
            jnp.full((1, 4, 1, 1, 1), 0.8), jnp.asarray(rng.standard_normal((1, 1, 32, 32, 4)), jnp.float32))
    with jax.default_matmul_precision("highest"):
        ref = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a))(state, *args)
    got = jax.jit(lambda s, *a: nnx.merge(graphdef16, s)(*a))(state16, *args)
    assert np.isfinite(np.asarray(got)).all()
    assert_close(np.asarray(got), np.asarray(ref), 5e-2, "bf16 vs fp32 UNet")


def test_no_weight_work_inside_the_sampling_loop():
    """On a GPU the convolutions want their kernels in cuDNN's layout: the compiled denoising loop must re-lay the
    weights once, before the loop, not in every step (the detector of tests/test_sampling.py)."""
    from pia_jax.models.text_encoder import CLIPTextModel
    from pia_jax.models.vae import AutoencoderKL
    from pia_jax.sampling import Animator, SampleOptions
    from tests.hlo import weight_shapes, weight_work_in_loop_body
    cfg, make = config.TINY, {"rngs": nnx.Rngs(0), "dtype": jnp.bfloat16, "param_dtype": jnp.bfloat16}
    animator = Animator(cfg, UNetMotionModel(cfg.unet, **make), AutoencoderKL(cfg.vae, **make),
                        CLIPTextModel(cfg.text, **make), tokenizer=None, compile_cache_dir="off")
    (_, _), (exe, _), (_, _) = animator._executables(1, 64, 64, 16, SampleOptions())
    assert weight_work_in_loop_body(exe.as_text(), weight_shapes(animator._unet)) == []
