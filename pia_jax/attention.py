"""The one attention function every call site goes through, with a per-site kernel choice.

Kernels: "xla" runs everywhere (softmax in fp32). "cudnn" is cuDNN flash attention through
`jax.nn.dot_product_attention`: on an H100 it is ~6x faster than XLA for 64x64 spatial self-attention, break-even
at 16x16 and 2-4x slower for temporal attention (16-frame sequences). "auto" takes cuDNN only where it applies and
pays off, so CPU/TPU runs and fp32 runs always get XLA.
"""

import functools

import jax
import jax.numpy as jnp

KERNELS = ("xla", "cudnn", "auto")
CUDNN_MIN_QUERY_LEN = 1024  # below ~32x32 tokens XLA is as fast (measured on H100, bf16)


@functools.cache
def _cudnn_max_head_dim() -> int:
    """cuDNN flash attention takes head dims up to 256 on Hopper and newer, 128 before; 0 where no CUDA GPU."""
    try:
        dev = jax.devices()[0]
    except RuntimeError:
        return 0
    if dev.platform != "gpu" or "cuda" not in dev.client.platform_version.lower():
        return 0
    major = int(str(dev.compute_capability).split(".")[0])
    return 256 if major >= 9 else 128 if major >= 8 else 0


def pick_kernel(kernel: str, q_len: int, head_dim: int, dtype) -> str:
    if kernel not in KERNELS:
        raise ValueError(f"attention kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel != "auto":
        return kernel
    fits = (jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0
            and head_dim <= _cudnn_max_head_dim())
    return "cudnn" if fits and q_len >= CUDNN_MIN_QUERY_LEN else "xla"


def dot_product_attention(q, k, v, *, kernel: str = "xla", causal: bool = False):
    """softmax(q k^T / sqrt(d)) v for q: (B, Lq, H, D), k/v: (B, Lk, H, D) -> (B, Lq, H, D)."""
    kernel = pick_kernel(kernel, q.shape[1], q.shape[-1], q.dtype)
    if kernel == "xla":
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="xla")
    kv_len = k.shape[1]
    pad = -kv_len % 8  # cuDNN's backward pass rejects e.g. 77 text tokens; padded keys are masked out by length
    if pad:
        k, v = (jnp.pad(t, ((0, 0), (0, pad), (0, 0), (0, 0))) for t in (k, v))
    lengths = jnp.full((q.shape[0],), kv_len, jnp.int32) if pad else None
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal, key_value_seq_lengths=lengths,
                                        implementation="cudnn")
