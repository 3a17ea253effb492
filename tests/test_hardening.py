"""Issue 29's hardening, round two: what the command lines keep out of the user's way."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_no_pytorch_advice_when_a_command_line_loads_a_tokenizer(tmp_path):
    # transformers without torch (as installed for sampling) advises on every import that PyTorch was not found
    from tests.assets import write_vocab
    write_vocab(tmp_path)
    code = ("import sys; sys.modules['torch'] = None\n"
            "from pia_jax import quiet\nfrom pia_jax.models import tokenizer\n"
            f"{{}}tokenizer.load_tokenizer({str(tmp_path)!r})\n")
    for call, advised in (("", True), ("quiet.command_line(); ", False)):
        run = subprocess.run([sys.executable, "-c", code.format(call)], cwd=ROOT, capture_output=True, text=True,
                             env={k: v for k, v in os.environ.items() if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"})
        assert run.returncode == 0, run.stderr
        assert ("PyTorch was not found" in run.stderr) == advised, run.stderr


# Records TF_CPP_MIN_LOG_LEVEL when jaxlib first loads (what XLA's C++ logging reads, once), then runs a command
# line's --help and imports jax if that did not.
_FIRST_JAX_LOAD = """
import importlib, importlib.abc, os, sys
seen = []
class Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "jaxlib" and not seen:
            seen.append(os.environ.get("TF_CPP_MIN_LOG_LEVEL"))
sys.meta_path.insert(0, Watch())
try:
    importlib.import_module({module!r}).main(["--help"])
except SystemExit:
    pass
import jax
print("level when jaxlib loaded:", seen)
"""


@pytest.mark.parametrize("module", ["sample", "evaluate", "train", "pia_jax.toy.__main__", "pia_jax.app.__main__"])
def test_each_command_line_quiets_libraries_before_jax_loads(module):
    """XLA's "Very slow compile? ... file a bug" banner (and transformers' advice) stay out of normal runs: each
    command line sets TF_CPP_MIN_LOG_LEVEL before jaxlib loads (set later, jaxlib ignores it). Checked by hand: a
    150 s CPU compile printed the banner without it and nothing with it."""
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "TRANSFORMERS_NO_ADVISORY_WARNINGS")}
    run = subprocess.run([sys.executable, "-c", _FIRST_JAX_LOAD.format(module=module)], cwd=ROOT,
                         capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    assert "level when jaxlib loaded: ['3']" in run.stdout, run.stdout
