"""Programs compiled ahead of time, for sampling (`Animator`) and training (`Trainer`) alike.

A `Program` is a pure function, jit-compiled for one device mesh, with an explicit cache of its executables by a
key the caller chooses (what the program is specialised for: shapes, static settings). So compiling is timed apart
from running, a second call with the same key provably compiles nothing, and a program compiles from shapes alone
(`jax.ShapeDtypeStruct` arguments) to read its memory needs or its HLO before any data exists.

A key need not name every argument: weights that stay the same for a program's life (an Animator's, a Trainer's
frozen ones) are left out, so finding an executable never walks them.

A program given an `identity` is also kept on disk (pia_jax.compiled.store, beside jax's persistent compilation
cache when that is on): a later process loads it without tracing, lowering or compiling.
"""

import logging
import time

import jax
import numpy as np

from pia_jax.compiled import store
from pia_jax.models import attention


class Program:
    """`fn` compiled for `mesh`. `settings=True`: its first argument is a hashable settings object (a frozen
    dataclass), static (the executable takes the other arguments); `identity`: what decides the program besides
    `repr(fn)`, its arguments and the environment (None: never stored on disk; see store.py); `jit_options`:
    jax.jit's shardings and donations; `note`: where a word about a stored executable not used goes."""

    def __init__(self, fn, mesh: jax.sharding.Mesh, *, settings: bool = False, identity: str | None = None,
                 note=None, **jit_options):
        self.fn, self.jitted = fn, jax.jit(fn, static_argnums=(0,) if settings else (), **jit_options)
        self.mesh, self.identity, self.jit_options = mesh, identity, jit_options
        self.note = note or logging.getLogger(__name__).warning
        self.executables, self.notes = {}, {}  # key -> executable; key -> {name: value} stored with it
        self.entries = {}  # key -> (folder, entry name, checked parts) where it is stored
        self.compiles, self.loaded, self.seconds = 0, 0, 0.0  # compiled here; loaded from disk; both, timed

    def lower(self, *args):
        """The program lowered for this mesh's devices ("auto" kernels for them, Pallas kernels per device)."""
        with attention.compiling_for(self.mesh):
            return self.jitted.lower(*args)

    def get(self, key, *args):
        """The executable for `key`: compiled from `args` (arrays or shapes) the first time, or loaded from disk
        when stored by an earlier process (timed: `seconds`)."""
        exe = self.executables.get(key)
        if exe is None:
            begin = time.perf_counter()
            exe = self.executables[key] = self._load(key, args) or self._compile(key, args)
            self.seconds += time.perf_counter() - begin
        return exe

    def remember(self, key, name: str, compute):
        """A small value about the executable for `key` (got first), e.g. its FLOP count: computed once, then
        stored beside it (a small notes file: the executable is not written again), so a process that loads the
        executable needs no trace to know it."""
        notes = self.notes.setdefault(key, {})
        if name not in notes:
            notes[name] = compute()
            if key in self.executables and key in self.entries:
                store.save_notes(*self.entries[key], notes)
        return notes[name]

    def _load(self, key, args):
        """The stored executable for `key`, if any and still valid; notes where it will be stored otherwise."""
        where = self.identity is not None and store.folder()
        if not where:
            return None
        self.entries[key] = entry = (where, store.entry_name(self.fn, key, self.identity),
                                     store.checked_parts(self.mesh, args, self.jit_options))
        found = store.load(*entry, self.note)
        if found is None:
            return None
        self.loaded += 1
        exe, self.notes[key] = found
        return exe

    def _compile(self, key, args):
        with attention.compiling_for(self.mesh):
            exe = self.lower(*args).compile()
        self.compiles += 1
        self.notes.setdefault(key, {})  # a fact remembered before compiling is kept and stored with it
        self._save(key, exe)
        return exe

    def _save(self, key, exe):
        if key in self.entries:
            store.save(*self.entries[key], exe, self.notes[key], self.note)


def signature(tree) -> tuple:
    """The structure, shapes, dtypes and placements of a pytree of arrays or shapes: a key part for programs
    compiled for them."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, tuple((np.shape(x), getattr(x, "dtype", type(x)), getattr(x, "sharding", None)) for x in leaves)
