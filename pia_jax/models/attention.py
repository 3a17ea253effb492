"""The one attention function every call site goes through, with a per-site kernel choice.

Kernels: "xla" runs everywhere (softmax in fp32). "cudnn" is cuDNN flash attention through
`jax.nn.dot_product_attention`: on an H100 it is ~6x faster than XLA for 64x64 spatial self-attention, break-even
at 16x16 and 2-4x slower for temporal attention (16-frame sequences). "auto" takes cuDNN only where it applies and
pays off (on TPU: splash, below); elsewhere it takes XLA, in query chunks where the full logits would be large.
"chunked" is XLA attention over blocks of CHUNK_QUERIES queries, each block rematerialized in the backward pass: the
same math per query row, with memory bounded by one block's logits instead of all of them (at 64x64 latents one
UNet self-attention over 32 frames would otherwise hold 32 x 8 x 4096^2 fp32 logits, 16 GiB).
"splash" is Pallas' TPU flash attention (splash attention): "auto" takes it on TPU for self-attention over
SPLASH_MIN_QUERY_LEN tokens and more (no logits in memory at all); off TPU it runs in Pallas' interpreter (tests).
Its speed on a TPU is not measured yet (no TPU was lent). XLA cannot partition a Pallas (Mosaic) kernel, so on a
mesh of several devices it runs inside `shard_map`, each device attending over its own videos.

"auto" decides for the devices a program is compiled for: the mesh given to `compiling_for` (the Trainer and the
sampler trace under it; a TPU program can be compiled on a CPU host, bench/tpu_aot.py), else jax's default backend.
"short" computes attention over few keys (temporal: 16 frames) with broadcast products and sums instead of batched
matmuls, avoiding the head-layout transposes; opt-in until a GPU run confirms the device-less estimate (BENCHMARKS.md).
"""

import contextlib
import contextvars
import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

KERNELS = ("xla", "cudnn", "chunked", "splash", "short", "auto")
CUDNN_MIN_QUERY_LEN = 1024  # below ~32x32 tokens XLA is as fast (measured on H100, bf16)
CHUNK_QUERIES = 1024
CHUNK_MIN_LOGITS = 4096 * 4096  # "auto" chunks XLA attention from 64x64-token self-attention up
SPLASH_MIN_QUERY_LEN = 1024  # 32x32 tokens and up; an estimate, as for cuDNN (not measured on a TPU)
SPLASH_BLOCK = 128  # query/key block of the splash kernel; sequences must be multiples of it


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


_TARGET: contextvars.ContextVar = contextvars.ContextVar("attention_target", default=(None, False))


@contextlib.contextmanager
def compiling_for(mesh: jax.sharding.Mesh | None, manual: bool = False):
    """Within this block, "auto" chooses kernels for `mesh`'s devices and Pallas kernels are partitioned over it;
    `manual`: the code already runs per device (inside a shard_map over the mesh), so they are called as they are.
    Read while a function is traced: jax reuses a traced function for the same input shapes, so trace each
    `jax.jit` object for one mesh only (as Trainer and Animator do)."""
    token = _TARGET.set((mesh, manual))
    try:
        yield
    finally:
        _TARGET.reset(token)


_QUERY_DEVICES: contextvars.ContextVar = contextvars.ContextVar("query_devices", default=1)


@contextlib.contextmanager
def queries_split(devices: int):
    """Within this block each attention's query sequence is split over `devices` devices in contiguous blocks
    (frames folded into a cross-attention's queries under the frame split, frame_split.py): "auto" chooses chunks by
    one device's part, and a chunk holds CHUNK_QUERIES rows on each device. Read while a function is traced."""
    token = _QUERY_DEVICES.set(devices)
    try:
        yield
    finally:
        _QUERY_DEVICES.reset(token)


def _on_tpu() -> bool:
    mesh, _ = _TARGET.get()
    return (mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()) == "tpu"


def _per_device(fn, mesh: jax.sharding.Mesh | None, batch: int):
    """fn over a batch (leading dim) as one `shard_map`ped program on a mesh of several devices: each device runs
    it on its slice of the batch (over every mesh axis whose devices the batch divides, the rest replicated)."""
    if mesh is None or mesh.size == 1:
        return fn
    axes, n = [], 1
    for name in mesh.axis_names:
        if batch % (n * mesh.shape[name]) == 0:
            axes.append(name)
            n *= mesh.shape[name]
    spec = P(tuple(axes)) if axes else P()
    return jax.shard_map(fn, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False)


def pick_kernel(kernel: str, q_len: int, head_dim: int, dtype, kv_len: int | None = None) -> str:
    if kernel not in KERNELS:
        raise ValueError(f"attention kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel != "auto":
        return kernel
    kv_len = q_len if kv_len is None else kv_len
    if _on_tpu() and q_len == kv_len and q_len >= SPLASH_MIN_QUERY_LEN and q_len % SPLASH_BLOCK == 0:
        return "splash"
    fits = (jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0
            and head_dim <= _cudnn_max_head_dim())
    if fits and q_len >= CUDNN_MIN_QUERY_LEN:
        return "cudnn"
    q_len = -(-q_len // _QUERY_DEVICES.get())  # one device's queries decide (queries_split)
    return "chunked" if q_len > CHUNK_QUERIES and q_len * kv_len >= CHUNK_MIN_LOGITS else "xla"


def _chunked(q, k, v):
    """Query chunks taken with a stride (chunk j: rows j, j+n, j+2n, ...): where the query rows are split over
    devices in contiguous blocks (frames folded into the sequence, frame_split.py), each chunk keeps that split and
    every device attends over its own rows; contiguous chunks would each lie on one device, and GSPMD would gather
    them to all (bench/sample_aot.py measured 5.4 TB per chip per 64-frame video)."""
    b, lq, h, d = q.shape
    size = CHUNK_QUERIES * _QUERY_DEVICES.get()  # CHUNK_QUERIES rows on each device holding a part (queries_split)
    n = -(-lq // size)
    q = jnp.pad(q, ((0, 0), (0, n * size - lq), (0, 0), (0, 0)))  # padded query rows are dropped below
    blocks = jnp.moveaxis(q.reshape(b, size, n, h, d), 2, 0)  # (n, B, C, H, D): row c*n + j in block j
    attend = jax.checkpoint(lambda qc: jax.nn.dot_product_attention(qc, k, v, implementation="xla"))
    out = jnp.moveaxis(jax.lax.map(attend, blocks), 0, 2)  # (B, C, n, H, D)
    return out.reshape(b, n * size, h, d)[:, :lq]


@functools.cache
def _splash_kernel(heads: int, q_len: int, kv_len: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as splash
    mask = splash.MultiHeadMask([splash.FullMask((q_len, kv_len))] * heads)
    b = SPLASH_BLOCK
    blocks = splash.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                               block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    with jax.ensure_compile_time_eval():  # concrete mask tables: the cached kernel outlives the trace building it
        return splash.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash(q, k, v):
    b, lq, h, d = q.shape
    lk = k.shape[1]
    if lq % SPLASH_BLOCK or lk % SPLASH_BLOCK:
        raise ValueError(f"splash attention needs sequence lengths that are multiples of {SPLASH_BLOCK}, got "
                         f"{lq}, {lk}")
    pad = -d % 128  # TPU lanes: head dims 40/80/160 padded with zeros, which change neither logits nor kept outputs
    q = q * jnp.asarray(d ** -0.5, q.dtype)  # the kernel does not scale
    to_kernel = lambda t: jnp.pad(t, ((0, 0), (0, 0), (0, 0), (0, pad))).swapaxes(1, 2)  # noqa: E731  (B, H, L, D')
    attend = jax.vmap(_splash_kernel(h, lq, lk, not _on_tpu()))
    mesh, manual = _TARGET.get()
    out = _per_device(attend, None if manual else mesh, b)(to_kernel(q), to_kernel(k), to_kernel(v))
    return out.swapaxes(1, 2)[..., :d]


def _short(q, k, v):
    """Attention over a few keys (temporal: 16 frames) as broadcast products and sums in fp32. XLA fuses these into
    reductions over the (B, L, H, D) layout the projections produce; its batched matmuls would first move the heads
    before the sequence and back (transposes) for tiny 16 x 16 products."""
    f32 = jnp.float32
    logits_BxLqxLkxH = (q[:, :, None].astype(f32) * k[:, None].astype(f32)).sum(-1) * (q.shape[-1] ** -0.5)
    p = jax.nn.softmax(logits_BxLqxLkxH, axis=2)
    return (p[..., None] * v[:, None].astype(f32)).sum(2).astype(q.dtype)


def dot_product_attention(q, k, v, *, kernel: str = "xla", causal: bool = False):
    """softmax(q k^T / sqrt(d)) v for q: (B, Lq, H, D), k/v: (B, Lk, H, D) -> (B, Lq, H, D)."""
    kernel = pick_kernel(kernel, q.shape[1], q.shape[-1], q.dtype, k.shape[1])
    if kernel == "splash" and not causal:
        return _splash(q, k, v)
    if kernel == "short" and not causal:
        return _short(q, k, v)
    if kernel == "chunked" and not causal:
        return _chunked(q, k, v)
    if kernel in ("xla", "chunked", "splash", "short"):  # causal attention only runs over 77 text tokens: plain XLA
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="xla")
    kv_len = k.shape[1]
    pad = -kv_len % 8  # cuDNN's backward pass rejects e.g. 77 text tokens; padded keys are masked out by length
    if pad:
        k, v = (jnp.pad(t, ((0, 0), (0, pad), (0, 0), (0, 0))) for t in (k, v))
    lengths = jnp.full((q.shape[0],), kv_len, jnp.int32) if pad else None
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal, key_value_seq_lengths=lengths,
                                        implementation="cudnn")
