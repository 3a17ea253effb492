"""Small on-disk assets for tests: a CLIP-style tokenizer vocabulary made by hand (no hub access here)."""

from pia_jax.demo import MERGES, byte_chars, write_vocab  # noqa: F401
