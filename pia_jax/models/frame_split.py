"""One video's frames over several devices inside the UNet (GSPMD; issue 30): the spatial layers split each chunk
of frames over a mesh axis, the motion modules (which attend over the frames) split their spatial sites over it,
and XLA moves the activations between the two layouts (all-to-alls). Only where each row lives changes: every row
is computed as on one device.

The caller names the axis (`UNetMotionModel(..., frame_axis=)`, plain data) and traces the UNet under its mesh
(`jax.sharding.use_abstract_mesh`), so the models import no sharding rules. Through the blocks the axis rides with
the chunk count, as a `Chunks` where a plain count went before.
"""

import contextlib
import contextvars
import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P


@dataclasses.dataclass(frozen=True)
class Chunks:
    """A UNet call's chunking: `n` chunks of frames (or sites) run one after another, each chunk's rows split over
    the mesh axis `axis`."""
    n: int
    axis: str


def of(chunks) -> tuple[int, str | None]:
    """(count, mesh axis or None) of a chunk count or a `Chunks`."""
    return (chunks.n, chunks.axis) if isinstance(chunks, Chunks) else (chunks, None)


def devices(axis: str | None) -> int:
    """Devices on mesh axis `axis` of the mesh being traced under (1 for None)."""
    if axis is None:
        return 1
    mesh = jax.sharding.get_abstract_mesh()
    if axis not in mesh.axis_names:
        raise ValueError(f"frame axis {axis!r} is not an axis of the mesh the UNet is traced under "
                         f"{tuple(mesh.axis_names)}: trace it under jax.sharding.use_abstract_mesh(mesh)")
    return mesh.shape[axis]


_ROWS_DEVICES: contextvars.ContextVar = contextvars.ContextVar("rows_devices", default=1)


def rows_devices() -> int:
    """Devices the rows being traced are split over: w inside a `chunked` function, else 1 (read by the spatial
    cross-attention, which folds a chunk's frames into one query sequence: attention.queries_split)."""
    return _ROWS_DEVICES.get()


@contextlib.contextmanager
def _rows_on(devices: int):
    token = _ROWS_DEVICES.set(devices)
    try:
        yield
    finally:
        _ROWS_DEVICES.reset(token)


def over(a, axis: str | None):
    """`a` (b, rows, ...) with its rows split over mesh axis `axis` (the batch as XLA has it, the rest whole)."""
    return a if axis is None else jax.lax.with_sharding_constraint(a, P(P.UNCONSTRAINED, axis))


def chunked(fn, arrays: tuple, chunks: int, axis: str):
    """fn on `chunks` chunks along dimension 1 of `arrays` ((b, T, ...) each), one after another (a `lax.map`):
    fn(*(b, k, ...)) -> (b, k, ...), each chunk's k rows split over mesh axis `axis` (w devices, k/w rows each).
    -> (b, T, ...), its rows split over the axis in contiguous blocks, one per device. A device's part of chunk i
    is rows i·k/w .. (i+1)·k/w - 1 of its block, so going in and out of the chunks moves no data between devices.
    T is zero-padded at its end to whole chunks (those rows are computed and dropped)."""
    b, t = arrays[0].shape[:2]
    w = devices(axis)
    per = -(-t // (chunks * w))  # rows per device and chunk
    n = -(-t // (w * per))  # chunks (fewer than asked when they would be all padding)

    def cut(a):  # (b, T, ...) -> (n, b, w·per, ...)
        a = jnp.pad(a, [(0, 0), (0, w * n * per - t)] + [(0, 0)] * (a.ndim - 2))
        a = jnp.moveaxis(a.reshape((b, w, n, per) + a.shape[2:]), 2, 0)
        return a.reshape((n, b, w * per) + a.shape[4:])

    def one(xs):
        with _rows_on(w):
            return over(fn(*(over(a, axis) for a in xs)), axis)

    xs = tuple(map(cut, arrays))
    out = jax.lax.map(one, xs) if n > 1 else one(tuple(a[0] for a in xs))[None]
    out = jnp.moveaxis(out.reshape((n, b, w, per) + out.shape[3:]), 0, 2)
    return over(out.reshape((b, w * n * per) + out.shape[4:])[:, :t], axis)


def frame_rows(fn, chunks: Chunks, frames: int, rows: tuple, context=None):
    """The UNet's `frame_chunks` with each chunk's frames split over `chunks.axis`: fn(*rows, context) (fn(*rows)
    without a context) on `chunks.n` chunks of each clip's frames. rows: (b*f, ...), frames fastest; context: None,
    (b, T, D) per video (whole on every device) or (b, f, T, D) per frame (cut with the rows)."""
    b = rows[0].shape[0] // frames
    per_frame = context is not None and context.ndim == 4
    ctx = () if context is None or per_frame else (context,)
    clips = tuple(r.reshape((b, frames) + r.shape[1:]) for r in rows) + ((context,) if per_frame else ())

    def one(*a):  # (b, k, ...) each; fn takes the rows as (b*k, ...)
        out = fn(*(x.reshape((-1,) + x.shape[2:]) for x in a[:len(rows)]), *(a[len(rows):] or ctx))
        return out.reshape(a[0].shape[:2] + out.shape[1:])

    out = chunked(one, clips, chunks.n, chunks.axis)
    return out.reshape((b * frames,) + out.shape[2:])
