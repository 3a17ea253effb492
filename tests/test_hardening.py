"""Issue 29's hardening, round two: what the command lines keep out of the user's way."""

import inspect
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
            "from pia_jax.models import tokenizer\n"
            f"{{}}tokenizer.load_tokenizer({str(tmp_path)!r})\n")
    for call, advised in (("", True), ("tokenizer.quiet_advice(); ", False)):
        run = subprocess.run([sys.executable, "-c", code.format(call)], cwd=ROOT, capture_output=True, text=True,
                             env={k: v for k, v in os.environ.items() if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"})
        assert run.returncode == 0, run.stderr
        assert ("PyTorch was not found" in run.stderr) == advised, run.stderr


@pytest.mark.parametrize("module", ["sample", "evaluate", "train", "pia_jax.toy.__main__"])
def test_each_command_line_quiets_the_advice(module):
    import importlib
    assert "quiet_advice()" in inspect.getsource(importlib.import_module(module).main)
