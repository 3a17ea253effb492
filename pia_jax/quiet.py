"""For command lines only (it sets process-wide variables; a library leaves them alone): hide what is not the
user's business.

  * transformers' advisory warnings, e.g. its 'PyTorch was not found' on every run (pia-jax asks it only for a
    tokenizer);
  * XLA's C++ logs below FATAL, e.g. its "Very slow compile? If you want to file a bug ..." banner when a compile
    takes over two minutes (SD1.5's training step on a small machine). jaxlib reads TF_CPP_MIN_LOG_LEVEL once, when
    it loads, so this must run before anything imports jax (tests/test_hardening.py checks each command line).
    Errors still reach the user as Python exceptions; `TF_CPP_MIN_LOG_LEVEL=0` (any value set) brings the logs back.
"""

import os


def command_line() -> None:
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
