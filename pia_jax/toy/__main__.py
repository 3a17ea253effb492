"""The toy world's commands.

    python -m pia_jax.toy train --out runs/toy          # world, data, vae, t2i, motion, pia, eval; resumable
    python -m pia_jax.toy evaluate --model models/toy --out runs/toy/eval   # held-out metrics, contact sheet
    python -m pia_jax.toy probe --model models/toy      # by noise level: x0's motion, frame 0 vs the image
    python -m pia_jax.toy probe --model models/toy --trajectory   # the same along the sampler's DDIM steps
"""

import argparse
import sys
from pathlib import Path


def check_toy_model(path, animator: bool) -> list[str]:
    """What makes the model directory at `path` not a toy-world model, read from its config and tokenizer files
    only: the world's frame size, its caption words, and (`animator`) a PIA UNet."""
    from pia_jax.toy import vocab, world
    from pia_jax.weights.model_dir import read_config

    config = read_config(path)[0]
    problems = []
    words = vocab.read_vocab(Path(path) / "tokenizer")
    if words is None:
        problems.append("it has no readable tokenizer/vocab.json or tokenizer/tokenizer.json")
    elif not vocab.is_toy_vocab(words):
        missing = [w for w in world.vocabulary() if w + "</w>" not in words]
        problems.append(f"its tokenizer is not the toy world's ({len(words)} tokens"
                        + (f"; lacks the caption words {', '.join(missing[:6])})" if missing else ")"))
    factor = config.vae.latent_factor * 2 ** (len(config.unet.block_out_channels) - 1)
    if world.TRAIN_SIZE % factor:
        problems.append(f"it takes frames in multiples of {factor} px, the world's are {world.TRAIN_SIZE} px")
    if animator and config.unet.in_channels != 9:
        problems.append(f"its UNet takes {config.unet.in_channels} channels, not an animator's 9 (PIA)")
    return problems


def main(argv=None) -> int:
    from pia_jax import quiet
    quiet.command_line()  # before jax loads; a command line may change the process's logging, the library does not
    p = argparse.ArgumentParser(prog="python -m pia_jax.toy", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="run every stage of the toy recipe not yet done under --out")
    t.add_argument("--out", required=True, help="folder of the run (stages resume from what is there)")
    t.add_argument("--clips", type=int, default=None, help="training clips in the world (default 3000)")
    t.add_argument("--set", action="append", default=[], metavar="STAGE:KEY=VALUE",
                   help="a train.py override for one stage, e.g. pia:steps=100 (repeatable)")
    e = sub.add_parser("evaluate", help="measure a model on the held-out combinations")
    from pia_jax.toy import evaluate
    evaluate.add_arguments(e)
    pr = sub.add_parser("probe", help="by noise level: x0's shift and how well its frame 0 keeps the image")
    pr.add_argument("--model", required=True, help="a toy model directory (PIA or 4-channel text-to-video)")
    pr.add_argument("--trajectory", action="store_true",
                    help="follow 25-step DDIM trajectories from noise instead (PIA models), measuring each step's x0")
    pr.add_argument("--guidance", type=float, nargs="+", default=[1.0, 4.0], help="with --trajectory: the scales")
    args = p.parse_args(argv)
    from pia_jax.sampling import compile_cache
    compile_cache.enable("default")  # the sampler's programs are kept on disk (a library's Animator leaves it off)

    if args.command in ("evaluate", "probe"):  # a wrong --model fails here, before anything is loaded
        from pia_jax.weights.model_dir import ModelDirError
        try:
            problems = check_toy_model(args.model, args.command == "evaluate" or args.trajectory)
        except ModelDirError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if problems:
            print(f"error: {args.model} is not a toy-world model: " + "; ".join(problems)
                  + " (python -m pia_jax.toy train makes one)", file=sys.stderr)
            return 2
    if args.command == "evaluate":
        return evaluate.main(args)
    if args.command == "probe":
        from pia_jax.toy import probe
        return probe.main(args)
    from pia_jax.toy import recipe
    overrides = {}
    for item in args.set:
        stage, sep, kv = item.partition(":")
        if not sep or stage not in recipe.TRAINED or "=" not in kv:
            p.error(f"--set takes STAGE:KEY=VALUE with STAGE one of {', '.join(recipe.TRAINED)}; got {item!r}")
        overrides.setdefault(stage, []).append(kv)
    if args.clips is not None and args.clips < 64:
        p.error(f"--clips must be at least 64 (one batch), got {args.clips}")
    out = Path(args.out).absolute()
    blocker = next(q for q in (out, *out.parents) if q.exists())
    if not blocker.is_dir():  # mkdir would fail deep in the recipe
        p.error(f"--out must be a folder, but {blocker} is a file")
    try:
        timings = recipe.train(args.out, clips=args.clips or recipe.CLIPS, overrides=overrides)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    model_s = sum(s for stage, s in timings.items() if stage != "eval")  # the 2-hour budget is the model's
    print(f"done: the model in {model_s:.0f} s ({args.out}/pia/model), its evaluation in "
          f"{timings.get('eval', 0):.0f} s ({args.out}/eval)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
