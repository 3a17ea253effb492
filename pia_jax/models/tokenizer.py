"""CLIP tokenization as the SD1.5 pipelines do it: BOS, BPE tokens, EOS, padded and truncated to 77 ids.

The tokenizer itself is transformers' `CLIPTokenizer`, read from local files only (never the hub).
"""

import os
from pathlib import Path

import numpy as np

# Either of these file sets makes a CLIP tokenizer folder: the BPE vocabulary and merges, or a serialized
# `tokenizers` file.
_FILE_SETS = (("vocab.json", "merges.txt"), ("tokenizer.json",))


def _is_tokenizer_dir(path: Path) -> bool:
    return any(all((path / name).is_file() for name in files) for files in _FILE_SETS)


def load_tokenizer(path):
    """Loads a `CLIPTokenizer` from `path`: the folder holding vocab.json + merges.txt (or tokenizer.json), or a
    diffusers model folder whose `tokenizer/` subfolder holds them."""
    from transformers import CLIPTokenizer  # imported here so the JAX model code never needs transformers

    path = Path(path).expanduser()
    for folder in (path, path / "tokenizer"):
        if _is_tokenizer_dir(folder):
            # tokenizer_config.json / special_tokens_map.json, where present, set the special tokens (e.g. the pad
            # token); without them CLIPTokenizer's defaults are <|startoftext|>, <|endoftext|> for EOS, pad, unk.
            return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    wanted = " or ".join(" + ".join(files) for files in _FILE_SETS)
    state = "does not exist" if not path.exists() else "has no tokenizer files"
    raise FileNotFoundError(f"no CLIP tokenizer at {str(path)!r}: the path {state}; expected {wanted} in it or in "
                            f"its 'tokenizer/' subfolder")


def tokenize(tokenizer, prompts: list[str], max_length: int = 77) -> np.ndarray:
    """Token ids (B, max_length) int32: BOS, prompt tokens, EOS, then the tokenizer's pad token.

    Prompts longer than max_length - 2 tokens are cut so that the sequence still ends in EOS, as in the diffusers
    SD pipelines (which then warn; we do not).
    """
    if isinstance(prompts, str):  # a bare string would otherwise be tokenized character by character
        prompts = [prompts]
    ids = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True,
                    return_tensors="np")["input_ids"]
    return np.asarray(ids, dtype=np.int32)
