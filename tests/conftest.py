"""Tests run on CPU with 8 fake devices, so sharding is testable without accelerators.

PIA_TEST_GPU=1 leaves the platform alone instead, for the GPU-only checks in test_gpu.py.
"""

import os

os.environ.setdefault("PIA_JAX_CACHE_DIR", "off")  # tests write no compilation cache unless one asks

if os.environ.get("PIA_TEST_GPU") != "1":
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

    import jax  # noqa: E402  (must come after the environment is set)

    jax.config.update("jax_platforms", "cpu")
    try:
        jax.config.update("jax_num_cpu_devices", 8)
    except (AttributeError, RuntimeError):  # older jax has no such option; the XLA flag above covers it
        pass


import ctypes  # noqa: E402
import gc  # noqa: E402

import pytest  # noqa: E402

try:  # glibc: big buffers (>= 4 MiB) always get their own mapping, so freeing one returns it to the OS at once
    _LIBC = ctypes.CDLL("libc.so.6")
    _LIBC.mallopt(-3, 4 << 20)  # M_MMAP_THRESHOLD, fixed (glibc would otherwise raise it after each large free)
except (OSError, AttributeError):  # another C library: nothing to tune
    _LIBC = None


@pytest.fixture(autouse=True, scope="module")
def _release_memory_after_each_module():
    """Full-size tests hold GBs of weights; handing them back between modules keeps the suite's peak near the
    largest module's (CI allows 10 GB) rather than growing with what the heap keeps of earlier ones. JAX's compiled
    functions stay cached: test modules share trainers (tests/test_train.py)."""
    yield
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


# Modules whose full-SD1.5-size tests hold GBs of weights run first, while the process holds little else, so the
# suite's peak memory is theirs alone rather than theirs on top of what earlier modules left in the heap.
_HEAVY_FIRST = ("test_unet.py", "test_convert.py", "test_convert_ldm.py", "test_text_encoder.py", "test_vae.py",
                "test_eval_clip.py", "test_ip_adapter.py")


def pytest_configure(config):  # pytest-xdist registers it too; without xdist the marker is inert
    config.addinivalue_line("markers", "xdist_group(name): tests that one pytest-xdist worker runs together")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(_HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: other modules keep their order
    # Under pytest-xdist (`-n 2 --dist loadgroup`, the README's command) one worker runs every heavy module, one at
    # a time, so two full-size models are never in memory at once; the other tests go to whichever worker is free
    # (grouping each module on one worker, to share its compiled functions, measured slower: 16:44 against 15:22;
    # a module whose costly module-scoped fixture would otherwise run on both workers groups itself with a
    # `pytestmark = pytest.mark.xdist_group(...)`, e.g. test_context_modes.py's sample.py batch).
    for item in items:
        if item.path.name in rank:
            item.add_marker(pytest.mark.xdist_group("heavy"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """A whole training run of tests.helpers' model (STEPS steps on a 4 x 2 mesh): (workdir, its final weights on the
    host, the clips it drew in order)."""
    from pia_jax.training import loop
    from tests.helpers import STEPS, host, loader, train_config, trainer
    workdir = tmp_path_factory.mktemp("uninterrupted")
    data = loader()
    result = loop.run(train_config(workdir, steps=STEPS), trainer(4, 2), data)
    return workdir, host(result.state.params), data.seen


@pytest.fixture
def executable_store(tmp_path):
    """jax's persistent compilation cache pointed at a fresh folder for one test: the folder of the executables
    stored beside it (pia_jax.compiled.store)."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    from pia_jax.compiled.store import FOLDER
    old = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "xla"))
    compilation_cache.reset_cache()
    yield tmp_path / "xla" / FOLDER
    jax.config.update("jax_compilation_cache_dir", old)
    compilation_cache.reset_cache()
