"""The toy world's commands.

    python -m pia_jax.toy train --out runs/toy          # world, data, vae, t2i, motion, pia, eval; resumable
    python -m pia_jax.toy evaluate --model models/toy --out runs/toy/eval   # held-out metrics, contact sheet
    python -m pia_jax.toy probe --model models/toy      # by noise level: x0's motion, frame 0 vs the image
    python -m pia_jax.toy probe --model models/toy --trajectory   # the same along the sampler's DDIM steps
"""

import argparse
import sys


def main(argv=None) -> int:
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
        from pia_jax.weights.model_dir import ModelDirError, read_config
        try:
            read_config(args.model)
        except ModelDirError as e:
            print(f"error: {e}", file=sys.stderr)
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
