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
