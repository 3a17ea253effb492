"""A CLIP-format BPE tokenizer learned from the toy world's words, so every caption word is one token.

CLIP's vocabulary layout (as `pia_jax.toy.demo`): the 256 byte characters, their end-of-word forms, one token per merge,
then <|startoftext|> and <|endoftext|>. The merges are learned by plain BPE on the distinct words (the most
frequent adjacent pair first, ties broken alphabetically), which encodes each of those words back to one token;
any other text still tokenizes, character by character.
"""

import collections
import json
import re
from pathlib import Path

from pia_jax.toy.demo import byte_chars


def learn_merges(words) -> list[tuple[str, str]]:
    """BPE merges until every word is a single symbol; words as CLIP splits them (last character + '</w>')."""
    seqs = [tuple(w[:-1]) + (w[-1] + "</w>",) for w in sorted(set(words))]
    merges = []
    while any(len(s) > 1 for s in seqs):
        pairs = collections.Counter(p for s in seqs for p in zip(s, s[1:]))
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged = []
        for s in seqs:
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            merged.append(tuple(out))
        seqs = merged
    return merges


def write_tokenizer(folder, words) -> Path:
    """vocab.json + merges.txt under `folder`; returns the folder."""
    merges = learn_merges(words)
    chars = byte_chars()
    tokens = chars + [c + "</w>" for c in chars]
    tokens += [a + b for a, b in merges if a + b not in tokens]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    return folder


def read_vocab(folder) -> dict | None:
    """A CLIP tokenizer folder's {token: id}, from vocab.json or a saved tokenizer.json, read without transformers
    (None if neither is readable)."""
    folder = Path(folder)
    for name, get in (("vocab.json", lambda d: d), ("tokenizer.json", lambda d: d["model"]["vocab"])):
        try:
            vocab = get(json.loads((folder / name).read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(vocab, dict):
            return vocab
    return None


def is_toy_vocab(vocab: dict | None) -> bool:
    """Whether a vocabulary is the toy world's: every caption word one token, and small. CLIP's own also holds the
    words, but as 49408 tokens, and spells words it lacks in sub-words; the toy's spells them letter by letter."""
    from pia_jax.models.config import TOY
    from pia_jax.toy.world import vocabulary
    return vocab is not None and len(vocab) <= TOY.text.vocab_size and all(w + "</w>" in vocab for w in vocabulary())


def unknown_words(vocab: dict, prompt: str) -> list[str]:
    """The words of `prompt` that a toy vocabulary does not hold as one token (CLIP lower-cases text first)."""
    words = re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", prompt.lower())
    return list(dict.fromkeys(w for w in words if w + "</w>" not in vocab))


def check_prompts(model_dir, videos) -> None:
    """Raises ValueError naming the words of the videos' prompts (`cases.Video`s) that the toy world's tokenizer
    does not know, if `model_dir` has one: it would spell them letter by letter into embeddings the model never
    trained on, so the video would silently ignore them. Other models' tokenizers pass unchecked."""
    from pia_jax.toy.world import vocabulary

    words = read_vocab(Path(model_dir) / "tokenizer")
    if not is_toy_vocab(words):
        return
    for v in videos:
        texts = [("prompt", p) for p in (v.prompt.values() if isinstance(v.prompt, dict) else [v.prompt])]
        for kind, text in texts + [("negative prompt", v.negative_prompt)]:
            unknown = unknown_words(words, text)
            if unknown:
                hint = " (it was trained with none: pass --negative-prompt '')" if kind == "negative prompt" else ""
                raise ValueError(f"the toy model does not know the words {', '.join(unknown)} of the {kind} "
                                 f"{text!r}{hint}; it knows: {' '.join(vocabulary())}")
