"""Programs compiled ahead of time, for sampling (`Animator`) and training (`Trainer`) alike.

A `Program` is a pure function, jit-compiled for one device mesh, with an explicit cache of its executables by a
key the caller chooses (what the program is specialised for: shapes, static settings). So compiling is timed apart
from running, a second call with the same key provably compiles nothing, and a program compiles from shapes alone
(`jax.ShapeDtypeStruct` arguments) to read its memory needs or its HLO before any data exists.

A key need not name every argument: weights that stay the same for a program's life (an Animator's, a Trainer's
frozen ones) are left out, so finding an executable never walks them.
"""

import time

import jax
import numpy as np

from pia_jax.models import attention


class Program:
    """`fn` compiled for `mesh`. `settings=True`: its first argument is a hashable settings object (a frozen
    dataclass), static (the executable takes the other arguments); `jit_options`: jax.jit's shardings and
    donations."""

    def __init__(self, fn, mesh: jax.sharding.Mesh, *, settings: bool = False, **jit_options):
        self.jitted = jax.jit(fn, static_argnums=(0,) if settings else (), **jit_options)
        self.mesh = mesh
        self.executables = {}
        self.compiles, self.seconds = 0, 0.0

    def lower(self, *args):
        """The program lowered for this mesh's devices ("auto" kernels for them, Pallas kernels per device)."""
        with attention.compiling_for(self.mesh):
            return self.jitted.lower(*args)

    def get(self, key, *args):
        """The executable for `key`, compiled from `args` (arrays or shapes) the first time (timed: `seconds`)."""
        exe = self.executables.get(key)
        if exe is None:
            begin = time.perf_counter()
            with attention.compiling_for(self.mesh):
                exe = self.executables[key] = self.lower(*args).compile()
            self.compiles += 1
            self.seconds += time.perf_counter() - begin
        return exe


def signature(tree) -> tuple:
    """The structure, shapes, dtypes and placements of a pytree of arrays or shapes: a key part for programs
    compiled for them."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, tuple((np.shape(x), getattr(x, "dtype", type(x)), getattr(x, "sharding", None)) for x in leaves)
