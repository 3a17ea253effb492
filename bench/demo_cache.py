"""The README demo twice with an empty persistent compilation cache: the cold run compiles, the warm one loads.

    python -m bench.demo_cache

Runs `python -m pia_jax.toy.demo` once, then the README's sample.py command twice in fresh processes with
PIA_JAX_CACHE_DIR set to a new temporary folder, and prints each run's summary line and wall time.
"""

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main():
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run([sys.executable, "-m", "pia_jax.toy.demo", str(tmp / "demo")], check=True, capture_output=True)
        env = dict(os.environ, PIA_JAX_CACHE_DIR=str(tmp / "xla"))
        command = [sys.executable, "sample.py", "--model", str(tmp / "demo/model"), "--image",
                   str(tmp / "demo/image.png"), "--prompt", "a cat", "--frames", "8", "--steps", "4", "--out",
                   str(tmp / "demo/cat.gif")]
        for run in ("cold", "warm"):
            start = time.perf_counter()
            out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout.strip()
            print(f"{run}: {time.perf_counter() - start:.1f} s wall | {out.split(' | ', 1)[1]}", flush=True)


if __name__ == "__main__":
    main()
