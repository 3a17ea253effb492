"""Trains PIA's condition branch (conv_in) and motion modules, the reference recipe (pia_reference.md §5), on one
device, a GPU box or a TPU pod.

    # one GPU: a converted model directory (convert_torch_weights.py) and a prepared dataset (prepare_dataset.py)
    python train.py configs/one_gpu.yaml workdir=runs/pia model.model_dir=models/sd15-animatediff data.path=data/webvid
    # TPU pod: the same command on every host; --distributed joins them (cluster auto-detection)
    python train.py configs/tpu_pod.yaml --distributed workdir=gs://my-bucket/runs/pia ...
    # export the newest checkpoint of a run as a model directory for sample.py (also done when a run completes)
    python train.py configs/one_gpu.yaml workdir=runs/pia --export runs/pia/model

Overrides are `section.key=value` (values parsed as YAML), e.g. optim.lr=5e-5 mesh.fsdp=4 data.batch_size=32. A run
resumes from its newest checkpoint in {workdir}/checkpoints; SIGTERM saves one and exits with status 0.
"""

import argparse
import json
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.add_argument("--distributed", action="store_true",
                   help="jax.distributed.initialize() with cluster auto-detection (TPU pods, SLURM, Open MPI)")
    p.add_argument("--coordinator", help="host:port of process 0, for a multi-process run without auto-detection")
    p.add_argument("--num-processes", type=int)
    p.add_argument("--process-id", type=int)
    p.add_argument("--export", metavar="DIR", help="only export the newest checkpoint to DIR as a model directory")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax
    if args.coordinator:
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    elif args.distributed:
        jax.distributed.initialize()

    from pia_jax.sharding import make_mesh
    from pia_jax.training import config as config_lib, loop, tasks
    from pia_jax.training.checkpoint import Checkpointer

    from etils import epath
    cfg = config_lib.load(args.config, args.overrides)
    if cfg.compilation_cache:
        jax.config.update("jax_compilation_cache_dir", cfg.compilation_cache)
    workdir = epath.Path(cfg.workdir)
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(json.dumps(config_lib.to_dict(cfg), indent=2) + "\n")
    trainer = tasks.make_trainer(cfg, make_mesh(cfg.mesh.data, cfg.mesh.fsdp))

    if args.export:
        ckpt = Checkpointer(workdir / "checkpoints", cfg.checkpoint.keep)
        step = ckpt.latest_step()
        if step is None:
            print(f"no checkpoint in {ckpt.directory}", file=sys.stderr)
            return 1
        state, _ = ckpt.restore(step, trainer.abstract_state(), data=False)
        ckpt.close()
        tasks.export(args.export, trainer, state.params, cfg)
        print(f"exported step {step} to {args.export}")
        return 0

    loader = loop.make_loader(cfg, trainer.setup.tokenizer, trainer.setup.config.text.vocab_size)
    try:
        result = loop.run(cfg, trainer, loader)
        if result.status == "done":
            tasks.export(workdir / "model", trainer, result.state.params, cfg, loader)
    except loop.NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        getattr(loader, "close", lambda: None)()
    if result.status == "done":
        if jax.process_index() == 0:
            print(f"done: {cfg.steps} steps; model exported to {workdir / 'model'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
