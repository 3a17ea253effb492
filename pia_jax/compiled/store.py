"""Compiled executables kept on disk, so a later process (a resumed training run, a warm `sample.py`) skips
tracing, lowering and compiling a program it has run before.

jax's persistent compilation cache (pia_jax.sampling.compile_cache, train.py's `compilation_cache`) skips only the
XLA compile: its key is a hash of the lowered program, so every process still traces and lowers first (most of a
resumed run's start at SD1.5 size). Here the key is computed without tracing, from what decides the program:
  * `name`: the function and the caller's key for it (shapes, static settings) and, hashed, `repr(fn)` (a
    functools.partial's repr names the model graphs it closes over) and the caller's `identity` (what the repr
    cannot show, e.g. the training config behind an optax transformation);
  * checked parts, each hashed on its own so a mismatch can be named: this package's source, the library versions,
    the devices (platform, kinds, ids, process), jax's flags and XLA's environment, and the arguments' shapes,
    dtypes and shardings with jit's options.
An entry is one file per name in a folder beside jax's cache. A stale entry (a checked part differs: new code, an
upgraded jax, another GPU) or an unreadable one is ignored with a note, never used, and replaced by the new
program. Written atomically (pia_jax.files); local or gs://.

The files are pickles (jax's PyTreeDefs of the inputs and outputs beside the serialized executable), so the folder
must be as trusted as the code: it is the user's own cache folder, the same trust jax's cache gets.
"""

import functools
import hashlib
import io
import json
import os
import pickle
import re
import sys
from pathlib import Path

import jax
from jax.experimental import serialize_executable

from pia_jax import files

FOLDER = "pia_jax_executables"  # inside jax's compilation cache folder
_LIBRARIES = ("jax", "jaxlib", "flax", "optax", "numpy", "ml_dtypes")
_ENV = ("XLA_FLAGS", "LIBTPU_INIT_ARGS", "NVIDIA_TF32_OVERRIDE")
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def folder() -> str | None:
    """Where entries live: beside jax's persistent compilation cache, off when that is off."""
    cache = jax.config.jax_compilation_cache_dir
    return cache and f"{str(cache).rstrip('/')}/{FOLDER}"


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def describe(obj) -> str:
    """A repr that is the same in every process: object addresses dropped (a function is then named by its
    module and name; its code is covered by `source()` and the library versions)."""
    return _ADDRESS.sub("", repr(obj))


@functools.lru_cache(maxsize=1)
def source() -> str:
    """A hash of every Python file of the pia_jax package: a code change makes every entry stale."""
    root, digest = Path(__file__).resolve().parents[1], hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:20]


def checked_parts(mesh, args, jit_options: dict) -> dict:
    """What an entry must agree on to be used, each part hashed (see the module docstring)."""
    from pia_jax.compiled import signature  # the package imports this module
    devices = [(d.id, d.process_index, d.device_kind) for d in mesh.devices.flat]
    client = mesh.devices.flat[0].client
    versions = {n: getattr(sys.modules.get(n), "__version__", None) for n in _LIBRARIES}
    return {"source": source(), "versions": _hash(repr(sorted(versions.items()))),
            "devices": _hash(repr((client.platform, client.platform_version, devices, jax.process_index(),
                                   jax.process_count(), describe(mesh)))),
            "flags": _hash(describe(sorted(jax.config.values.items())) + repr([os.environ.get(k) for k in _ENV])),
            "arguments": _hash(describe((signature(args), jit_options)))}


def entry_name(fn, key, identity: str) -> str:
    """The file an executable of `fn` for `key` is kept in (the same name in every run of the same program)."""
    what = getattr(fn, "func", fn)
    label = re.sub(r"\W+", "_", getattr(what, "__name__", "program")).strip("_")[:40]
    return f"{label}-{_hash(describe(fn) + chr(0) + describe(key) + chr(0) + identity)}-p{jax.process_index()}"


def load(where: str, name: str, parts: dict, note) -> tuple[object, dict] | None:
    """(the executable, its stored notes) of entry `name` if it exists and agrees on every checked part; else
    None, with a `note` saying why an existing entry was not used."""
    path = files.path(where) / f"{name}.pkl"
    if not path.exists():
        return None
    try:
        entry = pickle.loads(path.read_bytes())
        stale = [k for k in parts if entry["parts"].get(k) != parts[k]]
        if stale:
            note(f"stored executable {name} is stale ({', '.join(stale)} changed): compiling it again")
            return None
        by_id = {d.id: d for d in jax.devices()}
        devices = [by_id[i] for i in entry["devices"]]  # the executable's own device assignment, in its order
        return serialize_executable.deserialize_and_load(*entry["executable"], execution_devices=devices), \
            {**entry["notes"], **_later_notes(path.with_suffix(".notes.json"), parts)}
    except Exception as e:  # noqa: BLE001 (a truncated, foreign or corrupt file, whatever fails: never used)
        note(f"stored executable {name} could not be loaded ({type(e).__name__}: {str(e)[:200]}): compiling it "
             f"again")
        return None


def save(where: str, name: str, parts: dict, executable, notes: dict, note) -> bool:
    """Writes entry `name` (atomically); False, with a note, when the executable cannot be serialized (e.g. it
    holds a host callback)."""
    try:
        serialized = serialize_executable.serialize(executable)
    except Exception as e:  # noqa: BLE001 (whatever serialization refuses: the run goes on without storing)
        note(f"executable {name} cannot be stored ({type(e).__name__}: {str(e)[:200]}); it compiles in every run")
        return False
    # the devices it runs on, in its order (jax's serializer keeps them only by reference; a private field, as in
    # jax.experimental.serialize_executable itself)
    devices = [d.id for d in executable._executable._unloaded_executable.device_list]
    buffer = io.BytesIO()
    pickle.dump({"parts": parts, "executable": serialized, "devices": devices, "notes": notes}, buffer)
    with files.atomic_write(f"{where}/{name}.pkl") as tmp:
        Path(tmp).write_bytes(buffer.getvalue())
    return True


def save_notes(where: str, name: str, parts: dict, notes: dict):
    """Notes learnt after entry `name` was written (`Program.remember`), kept beside it in a small JSON file with
    the checked parts, so that they count only for the executable they were learnt about."""
    with files.atomic_write(f"{where}/{name}.notes.json") as tmp:
        Path(tmp).write_text(json.dumps({"parts": parts, "notes": notes}))


def _later_notes(path, parts: dict) -> dict:
    """The notes of `save_notes` for an entry that agrees on `parts` ({} when none, or another program's)."""
    try:
        later = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):  # a damaged notes file: the notes are computed again
        return {}
    return dict(later.get("notes", {})) if later.get("parts") == parts else {}
