"""A tiny random-weight PIA model directory and an input image, so the sampler runs end to end with no downloads.

    python -m pia_jax.toy.demo demo      # writes demo/model (TINY config, random weights) and demo/image.png

The tokenizer is a hand-made CLIP-style byte-level BPE vocabulary (real CLIP files cannot be fetched here); the
videos it makes are noise-like, since the weights are random. For real results, convert real weights with
convert_torch_weights.py.
"""

import json
import sys
from pathlib import Path

import numpy as np


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


def write_demo(root) -> tuple[Path, Path]:
    """(model directory, image) under `root`; the model has the TINY architecture with random weights."""
    from flax import nnx
    from PIL import Image

    from pia_jax.models import config
    from pia_jax.models.text_encoder import CLIPTextModel
    from pia_jax.models.unet import UNetMotionModel
    from pia_jax.models.vae import AutoencoderKL
    from pia_jax.sampling import schedulers
    from pia_jax.weights import model_dir

    root = Path(root)
    write_vocab(root / "tokenizer")
    cfg, rngs = config.TINY, nnx.Rngs(0)
    models = {"unet": UNetMotionModel(cfg.unet, rngs=rngs), "vae": AutoencoderKL(cfg.vae, rngs=rngs),
              "text_encoder": CLIPTextModel(cfg.text, rngs=rngs)}
    path = model_dir.save_model_dir(root / "model", cfg, models, tokenizer=root / "tokenizer",
                                    scheduler=schedulers.to_dict(schedulers.PIA_DDIM), force=True)
    y, x = np.mgrid[0:48, 0:64]
    image = np.stack([x * 4, y * 5, 255 - 2 * x - 2 * y], -1).clip(0, 255).astype(np.uint8)  # a colour gradient
    Image.fromarray(image).save(root / "image.png")
    return path, root / "image.png"


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m pia_jax.toy.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("folder", nargs="?", default="demo", help="where model/ and image.png go (default: demo)")
    args = p.parse_args(argv)
    root = Path(args.folder).absolute()
    blocker = next(q for q in (root, *root.parents) if q.exists())
    if not blocker.is_dir():
        p.error(f"{args.folder} must be a folder, but {blocker} is a file")
    model, image = write_demo(root)
    print(f"wrote {model} and {image}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
