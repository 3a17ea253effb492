"""Small on-disk assets for tests: a CLIP-style tokenizer vocabulary made by hand (no hub access here)."""

import json


def byte_chars() -> list[str]:
    """The 256 printable characters byte-level BPE (GPT-2, CLIP) stands in for the bytes 0..255, in byte order:
    printable Latin-1 bytes map to themselves, the rest to code points from 256 up."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


MERGES = ["h e", "l l", "he ll", "hell o</w>", "c a", "ca t</w>"]


def write_vocab(folder):
    """CLIP's vocabulary layout: the byte characters, their end-of-word forms, the merge results, then BOS/EOS."""
    chars = byte_chars()
    tokens = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")
    return vocab
