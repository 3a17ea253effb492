"""How many videos fit on a device at once: measured from the compiled programs, not guessed.

XLA reports for a compiled program the bytes of its arguments, outputs and temporaries (`memory_analysis()`; per
device for a program split over devices). The weights stay resident between phases and are counted once, as
already used; a batch needs, on top, the largest of its phases' other bytes. The free memory is the accelerator's
limit minus what is in use (the weights included), or on CPU the host's available memory (/proc/meminfo), shared
by its devices, with a safety margin.
"""

import jax

MARGIN = 0.85  # of the free memory a batch may plan to use: allocator fragmentation, host-side copies


def tree_bytes(tree) -> int:
    """Bytes one device holds of a replicated pytree of arrays."""
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def program_bytes(compiled, resident: int) -> int:
    """Peak bytes of one run of a compiled program beyond the `resident` (weight) arguments it takes."""
    m = compiled.memory_analysis()
    if m is None:
        raise RuntimeError("this backend reports no memory analysis; pass an explicit batch size")
    return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes - resident


def _host_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        import os
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def free_bytes(devices) -> int:
    """Bytes a batch may use on each of `devices` (the smallest)."""
    per_device = []
    for d in devices:
        stats = d.memory_stats() if hasattr(d, "memory_stats") else None
        if stats and "bytes_limit" in stats:
            per_device.append(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
        else:  # CPU: one host memory for all its devices
            per_device.append(_host_available() // max(1, sum(x.platform == d.platform for x in devices)))
    return int(min(per_device) * MARGIN)


def gib(n: int) -> str:
    return f"{n / 2 ** 30:.2f} GiB"
