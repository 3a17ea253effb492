"""Executables stored on disk (pia_jax.compiled.store): a later Program loads them without lowering or compiling,
runs them to the same bits, and never uses a stale, corrupt or foreign entry. (A resumed training run loading its
stored step: tests/test_train_run.py, beside the uninterrupted run it is compared with.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from pia_jax import compiled
from pia_jax.compiled import store


def double_sin(x, y):
    return {"out": jnp.sin(x) * 2 + y, "sum": x.sum()}


def program(notes=None, identity="test"):
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    return compiled.Program(double_sin, mesh, identity=identity, note=None if notes is None else notes.append)


def no_lowering(*_):
    raise AssertionError("a stored program was traced and lowered again")


ARGS = (np.arange(6, dtype=np.float32).reshape(2, 3), np.float32(0.5))


def test_a_stored_program_loads_without_lowering_and_runs_to_the_same_bits(executable_store, monkeypatch):
    first = program()
    want = first.get("k", *ARGS)(*ARGS)
    assert (first.compiles, first.loaded) == (1, 0) and len(list(executable_store.glob("*.pkl"))) == 1
    monkeypatch.setattr(store, "save", lambda *a: pytest.fail("a note wrote the executable again"))
    assert first.remember("k", "flops", lambda: 42) == 42
    monkeypatch.undo()
    monkeypatch.setattr(compiled.Program, "lower", no_lowering)
    second = program()
    got = second.get("k", *ARGS)(*ARGS)
    assert (second.compiles, second.loaded) == (0, 1)
    assert all(np.array_equal(got[k], want[k]) for k in want)
    assert second.remember("k", "flops", no_lowering) == 42  # stored with the executable: not computed again


def test_a_damaged_or_foreign_notes_file_is_not_believed(executable_store):
    first = program()
    first.get("k", *ARGS)
    first.remember("k", "flops", lambda: 42)
    notes = next(executable_store.glob("*.notes.json"))
    for text, value in (('{"parts": {"source": "another"}, "notes": {"flops": 1}}', 7), ("{", 8)):
        notes.write_text(text)
        again = program()
        again.get("k", *ARGS)
        assert again.loaded == 1 and again.remember("k", "flops", lambda value=value: value) == value


def test_other_shapes_are_another_entry(executable_store):
    program().get("k", *ARGS)
    other = program()
    other.get("k8", np.zeros((8,), np.float32), np.float32(0))
    assert (other.compiles, other.loaded) == (1, 0) and len(list(executable_store.glob("*.pkl"))) == 2


@pytest.mark.parametrize("change", ["source", "versions"])
def test_a_stale_entry_is_named_and_replaced_never_used(executable_store, monkeypatch, change):
    program().get("k", *ARGS)
    if change == "source":  # the code changed since the entry was stored
        store.source.cache_clear()
        monkeypatch.setattr(store, "source", lambda: "another")
    else:  # an upgraded jax
        monkeypatch.setattr(jax, "__version__", "0.0.1")
    notes = []
    stale = program(notes)
    stale.get("k", *ARGS)
    assert (stale.compiles, stale.loaded) == (1, 0)
    assert len(notes) == 1 and f"stale ({change} changed)" in notes[0]
    again = program()  # the entry was replaced by the program of this code and these versions
    again.get("k", *ARGS)
    assert (again.compiles, again.loaded) == (0, 1)


def test_an_argument_placed_otherwise_is_stale(executable_store):
    program().get("k", *ARGS)
    notes = []
    other = program(notes)
    moved = jax.device_put(ARGS[0], jax.devices()[1])  # same key, same shapes: another device
    other.get("k", moved, ARGS[1])
    assert other.compiles == 1 and "arguments changed" in notes[0]


@pytest.mark.parametrize("damage", ["truncated", "garbage", "foreign executable"])
def test_a_damaged_entry_is_named_and_never_used(executable_store, damage):
    want = program().get("k", *ARGS)(*ARGS)
    path = next(executable_store.glob("*.pkl"))
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    elif damage == "garbage":
        path.write_bytes(b"not a pickle")
    else:  # a well-formed entry whose executable bytes are not an executable
        import pickle
        entry = pickle.loads(path.read_bytes())
        entry["executable"] = (b"\0" * 64,) + tuple(entry["executable"][1:])
        path.write_bytes(pickle.dumps(entry))
    notes = []
    fresh = program(notes)
    got = fresh.get("k", *ARGS)(*ARGS)
    assert (fresh.compiles, fresh.loaded) == (1, 0) and "could not be loaded" in notes[0]
    assert np.array_equal(got["out"], want["out"])


def test_nothing_is_stored_without_an_identity_or_a_cache(executable_store, tmp_path):
    program(identity=None).get("k", *ARGS)
    assert not executable_store.exists()
    jax.config.update("jax_compilation_cache_dir", None)
    program().get("k", *ARGS)
    assert not executable_store.exists()


def test_a_program_with_a_host_callback_runs_and_says_it_is_not_stored(executable_store):
    """jax cannot serialize an executable holding a Python callback: the run goes on, compiled, with a note."""
    def with_callback(x):
        jax.debug.callback(lambda v: None, x)
        return x + 1
    notes = []
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    prog = compiled.Program(with_callback, mesh, identity="cb", note=notes.append)
    assert float(prog.get("k", np.float32(1))(np.float32(1))) == 2.0
    assert not list(executable_store.glob("*.pkl"))
    assert len(notes) == 1 and "cannot be stored" in notes[0] and "compiles in every run" in notes[0]
