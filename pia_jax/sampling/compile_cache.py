"""The persistent compilation cache: compiled programs are kept on disk, so a second run with the same model
architecture, shapes and jax version loads them instead of compiling (seconds instead of minutes at SD1.5 size).

On by default for the CLIs (sample.py, evaluate.py, `python -m pia_jax.toy`; an `Animator` built in a user's
program leaves jax's settings alone unless given `compile_cache_dir`): `$PIA_JAX_CACHE_DIR` if set ('off' disables
it), else `$XDG_CACHE_HOME/pia_jax/xla` (`~/.cache/pia_jax/xla`); an object-store URL (gs://bucket/cache) works too,
as jax reads and writes it through etils (a pod's hosts can share one). A cache folder the user already gave jax
(`jax_compilation_cache_dir`) is left as it is. Hits and misses are counted from jax's monitoring events.

jax 0.10 writes no cache entry for a program holding a host callback (jax/_src/compiler.py `_cache_write`), which
is why the denoising loop reports progress without one (see pia_jax.sampling.animator).
"""

import os
from pathlib import Path

import jax
from jax import monitoring

from pia_jax import files

ENV = "PIA_JAX_CACHE_DIR"
_EVENTS = {"/jax/compilation_cache/cache_hits": "hits", "/jax/compilation_cache/cache_misses": "misses"}
_counts = {"hits": 0, "misses": 0}
_listening = False
_ours: str | None = None  # the folder this module set, to tell it from a user's own setting


def default_dir() -> Path | None:
    env = os.environ.get(ENV)
    if env is not None:
        return None if env.strip().lower() in ("", "off", "none") else Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pia_jax" / "xla"


def check(where="default"):
    """ValueError, before any work, when the cache folder `enable(where)` would use cannot be made: it, or its
    nearest existing ancestor, is a file (jax would fail on it once the model is loaded)."""
    if where is None or str(where).lower() == "off" or not files.is_local(where):
        return  # an object store (gs://...): jax and the executable store write there through etils
    path = default_dir() if where == "default" else Path(where).expanduser()
    found = path and files.nearest_existing(path)
    if found and not found.is_dir():
        raise ValueError(f"the compilation cache folder {path} cannot be made: {found} is a file; give a folder with "
                         f"--compile-cache DIR (or ${ENV}), or 'off'")


def _count(event: str, **_):
    if event in _EVENTS:
        _counts[_EVENTS[event]] += 1


def enable(where="default") -> str | None:
    """Turns the cache on at `where` ('default': see the module docstring; a folder), or off ('off': a cache set
    here is turned off, a user's own is left), or leaves jax's setting alone (None); returns the folder in use."""
    global _listening, _ours
    if not _listening:
        monitoring.register_event_listener(_count)
        _listening = True
    current = jax.config.jax_compilation_cache_dir
    if where is None or current and current != _ours:  # the user's own choice wins
        return current
    path = None if str(where).lower() == "off" else (
        default_dir() if where == "default" else Path(where).expanduser() if files.is_local(where) else where)
    from jax.experimental.compilation_cache import compilation_cache
    if path is None:
        if current:  # ours: turn it off
            jax.config.update("jax_compilation_cache_dir", None)
            compilation_cache.reset_cache()
            _ours = None
        return None
    if str(path) != current:
        if files.is_local(path):  # an object store has no folders to make
            path.mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", str(path))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # the sampler's small programs too
        compilation_cache.reset_cache()  # so a cache first looked up without a folder now uses this one
        _ours = str(path)
    return str(path)


def counts() -> dict:
    """{'hits': n, 'misses': n} since the process started (take differences around a call)."""
    return dict(_counts)
