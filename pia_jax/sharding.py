"""One table of sharding rules: which mesh axes each weight and each batch is split over.

The device mesh has two logical axes. `data`: plain data parallelism, weights replicated. `fsdp`: data parallelism
whose devices also split the weights and the optimizer state between them (ZeRO-3 storage). A batch is split over
both axes by video, never by frame, so the motion modules' frame<->site reshapes need no communication.
"""

import re

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")

# (regex searched in the NNX parameter path, PartitionSpec of the trailing dimensions); the first match wins.
# Specs are right-aligned to the parameter's rank, so one rule covers conv (H, W, I, O) and linear (I, O) kernels.
# A dimension that the axis size does not divide (conv_out's 4 channels, 77 positions) stays replicated.
RULES = (
    (r"\.(bias|scale)$", P()),  # vectors: a few KB each, not worth a gather
    (r"\.embedding$", P("fsdp", None)),  # (vocabulary or positions, width)
    (r"\.kernel$", P("fsdp")),  # output channels
)


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> jax.sharding.Mesh:
    """A (data, fsdp) mesh over `devices` (all by default); -1 for one axis takes the devices left over.

    Devices are ordered by process, so each process's devices hold one contiguous block of every batch, in process
    order: the rows that process's data loader made. fsdp groups of up to a host's devices stay within a host.
    """
    devices = sorted(jax.devices() if devices is None else devices, key=lambda d: (d.process_index, d.id))
    n = len(devices)
    if data == -1:
        data = n // fsdp
    elif fsdp == -1:
        fsdp = n // data
    if data * fsdp != n:
        raise ValueError(f"mesh data={data} x fsdp={fsdp} does not match the {n} devices")
    # Auto axes: jit's explicit in/out shardings fix the layout at the boundary, XLA propagates inside.
    return jax.sharding.Mesh(np.array(devices).reshape(data, fsdp), MESH_AXES,
                             axis_types=(jax.sharding.AxisType.Auto,) * 2)


def param_spec(path: str, shape: tuple, mesh: jax.sharding.Mesh, rules=RULES) -> P:
    for pattern, spec in rules:
        if re.search(pattern, path):
            break
    else:
        return P()
    spec = (None,) * (len(shape) - len(spec)) + tuple(spec)[-len(shape):] if shape else ()
    fits = lambda axes, dim: axes is None or dim % np.prod([mesh.shape[a] for a in np.atleast_1d(axes)]) == 0
    return P(*(axes if fits(axes, dim) else None for axes, dim in zip(spec, shape)))


def param_shardings(shapes: dict, mesh: jax.sharding.Mesh, rules=RULES) -> dict:
    """{path: NamedSharding} for a flat {NNX path: array or ShapeDtypeStruct} dict."""
    return {k: NamedSharding(mesh, param_spec(k, tuple(v.shape), mesh, rules)) for k, v in shapes.items()}


def batch_sharding(mesh: jax.sharding.Mesh, batch_dim: int = 0) -> NamedSharding:
    """Arrays whose dimension `batch_dim` indexes videos, split over all batch axes (leading dims replicated)."""
    return NamedSharding(mesh, P(*(None,) * batch_dim, BATCH_AXES))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
