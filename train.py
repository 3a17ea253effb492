"""Trains PIA's condition branch (conv_in) and motion modules, the reference recipe, on one device, a GPU box or a
TPU pod.

    # one GPU: a converted model directory (convert_torch_weights.py) and a prepared dataset (prepare_dataset.py)
    python train.py configs/one_gpu.yaml workdir=runs/pia model.model_dir=models/pia-init data.path=data/webvid
    # TPU pod: the same command on every host; --distributed joins them (cluster auto-detection)
    python train.py configs/tpu_pod.yaml --distributed workdir=gs://my-bucket/runs/pia ...
    # export the newest checkpoint of a run as a model directory for sample.py (also done when a run completes)
    python train.py configs/one_gpu.yaml workdir=runs/pia model.model_dir=models/pia-init --export runs/pia/model

Overrides are `section.key=value` (values parsed as YAML), e.g. optim.lr=5e-5 mesh.fsdp=4 data.batch_size=32. A run
resumes from its newest readable checkpoint in {workdir}/checkpoints. Resuming with other hyperparameters than the
workdir's config.json is refused, listing them, unless on_change=apply (then they apply from the resumed step on).

Exit status: 0 done (or exported); 2 a bad config or input, or a non-finite loss (on_nonfinite=stop); after SIGTERM
(pre-emption) a checkpoint is saved and the status is `sigterm_exit_code` (0 unless set, e.g. 143 = 128 + SIGTERM
for supervisors that restart only failed jobs); 1 anything else (a traceback).
"""

import argparse
import json
import sys
import textwrap


def config_table() -> str:
    from pia_jax.training.config import describe
    rows = describe()
    width = max(len(k) for k, *_ in rows)
    lines = ["override keys (key, type, default: meaning):"]
    for key, tp, default, help in rows:
        text = f"{key:<{width}}  {tp}, {default}: {help}"
        lines += textwrap.wrap(text, 116, initial_indent="  ", subsequent_indent=" " * (width + 4))
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, epilog=config_table(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides (listed below)")
    p.add_argument("--distributed", action="store_true",
                   help="jax.distributed.initialize() with cluster auto-detection (TPU pods, SLURM, Open MPI)")
    p.add_argument("--coordinator", help="host:port of process 0, for a multi-process run without auto-detection")
    p.add_argument("--num-processes", type=int)
    p.add_argument("--process-id", type=int)
    p.add_argument("--export", metavar="DIR", help="only export the newest checkpoint to DIR as a model directory")
    return p.parse_args(argv)


class InputError(ValueError):
    pass


def check_inputs(cfg, workdir, exporting: bool) -> None:
    """What the config points at, checked before any model is built: the devices, the model directory, the
    dataset, the validation images, and a resumed workdir's config.json (see on_change)."""
    import jax

    from pia_jax.sharding import make_mesh
    from pia_jax.training import config as config_lib
    n = jax.device_count()
    try:
        make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
    except ValueError as e:
        raise InputError(f"{e} (set mesh.data and mesh.fsdp)") from None
    if cfg.data.batch_size % n:
        raise InputError(f"data.batch_size={cfg.data.batch_size} must be a multiple of the {n} devices")
    if cfg.model.model_dir:
        from pia_jax.weights.model_dir import ModelDirError, read_config
        try:
            read_config(cfg.model.model_dir)
        except ModelDirError as e:
            raise InputError(f"model.model_dir: {e}") from None
    _check_workdir(workdir)
    if cfg.data.path and not exporting:
        _check_dataset(cfg)
    if not exporting:
        from pia_jax.training.loop import check_data
        try:
            check_data(cfg)  # data.latents: a cache made for other clips or by another VAE is refused here
        except ValueError as e:
            raise InputError(str(e)) from None
    if cfg.validation.every:
        from etils import epath
        missing = [p for p in cfg.validation.images if not epath.Path(p).is_file()]
        if missing:
            raise InputError(f"validation.images not found: {missing}")
    stored = workdir / "config.json"
    if not exporting and stored.exists() and any(p.name.isdigit() for p in (workdir / "checkpoints").glob("*")):
        try:
            old = json.loads(stored.read_text())
        except ValueError as e:
            raise InputError(f"{stored} is not valid JSON ({e}); restore it or remove it") from None
        fixed, changed = config_lib.changes(old, cfg)
        if fixed or (changed and cfg.on_change == "refuse"):
            lines = "\n".join(f"  {k}: {a!r} -> {b!r}" for k, a, b in fixed + changed)
            advice = ("these cannot change in a resumed run; use a new workdir" if fixed else
                      "pass on_change=apply to resume with the new values (logged), or use a new workdir")
            raise InputError(f"{workdir} holds a run with other settings than this one ({stored}):\n{lines}\n{advice}")
        for k, a, b in changed:
            print(f"resuming with {k} changed: {a!r} -> {b!r} (on_change=apply)", flush=True)


def _check_workdir(workdir):
    """A workdir that is, or lies under, a file: refused before anything is built (mkdir would fail later)."""
    from pia_jax import files
    found = files.nearest_existing(workdir) if files.is_local(workdir) else workdir
    if found.exists() and not found.is_dir():
        raise InputError(f"workdir {workdir}: {found} is a file, not a folder; give a new folder or a run's workdir")


def _check_dataset(cfg):
    """The prepared dataset opens and fills at least one global batch (the loader is made after the model)."""
    from pia_jax.data import open_dataset
    try:
        records = open_dataset(cfg.data.path)
    except FileNotFoundError as e:
        raise InputError(f"data.path: {e}; make one with prepare_dataset.py") from None
    if len(records) < cfg.data.batch_size:
        raise InputError(f"data.batch_size={cfg.data.batch_size} is larger than the {len(records)} examples of "
                         f"{cfg.data.path}: one global batch cannot be filled; lower data.batch_size or prepare "
                         "more clips")


def main(argv=None) -> int:
    from pia_jax import quiet
    quiet.command_line()  # before jax loads; a command line may change the process's logging, the library does not
    args = parse_args(argv)
    from pia_jax.training import config as config_lib
    try:
        cfg = config_lib.check(config_lib.load(args.config, args.overrides), data=not args.export)
    except config_lib.ConfigError as e:
        print(f"error: {e} (train.py --help lists every key)", file=sys.stderr)
        return 2

    import jax
    if args.coordinator:
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    elif args.distributed:
        jax.distributed.initialize()
    from etils import epath
    workdir = epath.Path(cfg.workdir)
    try:
        check_inputs(cfg, workdir, bool(args.export))
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from pia_jax import files
    from pia_jax.sharding import make_mesh
    from pia_jax.training import tasks
    if cfg.compilation_cache:
        jax.config.update("jax_compilation_cache_dir", cfg.compilation_cache)
    if jax.process_index() == 0 and not args.export:
        workdir.mkdir(parents=True, exist_ok=True)
        with files.atomic_write(workdir / "config.json") as tmp:  # a resumed run compares it with its config
            tmp.write_text(json.dumps(config_lib.to_dict(cfg), indent=2) + "\n")
    print(f"building the model from {cfg.model.model_dir or 'random weights: ' + cfg.model.init} on "
          f"{jax.device_count()} {jax.devices()[0].platform} devices (the first step then compiles, minutes for "
          "SD1.5)...", flush=True)
    trainer = tasks.make_trainer(cfg, make_mesh(cfg.mesh.data, cfg.mesh.fsdp))
    return export_latest(cfg, workdir, trainer, args.export) if args.export else train(cfg, workdir, trainer)


def export_latest(cfg, workdir, trainer, out) -> int:
    """--export: the newest checkpoint of the workdir as a model directory in `out`."""
    from pia_jax.training import tasks
    from pia_jax.training.checkpoint import Checkpointer, CheckpointError
    from pia_jax.training.state import weights_to_export
    ckpt = Checkpointer(workdir / "checkpoints", cfg.checkpoint.keep)
    try:
        step, restored = ckpt.restore_latest(trainer.abstract_state(), cfg.checkpoint.on_corrupt, data=False)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        ckpt.close()
    if step is None:
        print(f"error: no checkpoint in {ckpt.directory}", file=sys.stderr)
        return 2
    tasks.export(out, trainer, weights_to_export(restored[0]), cfg)
    print(f"exported step {step} to {out}")
    return 0


def train(cfg, workdir, trainer) -> int:
    """The run, validated with a `Validator` where configured, then exported to {workdir}/model."""
    import jax

    from pia_jax.training import loop, tasks
    from pia_jax.training.checkpoint import CheckpointError
    from pia_jax.training.state import weights_to_export
    from pia_jax.training.validation import Validator
    validate = Validator(cfg, trainer) if cfg.validation.every else None
    loader = loop.make_loader(cfg, trainer.setup.tokenizer, trainer.setup.config.text.vocab_size)
    try:
        result = loop.run(cfg, trainer, loader, validate)
        if result.status != "preempted":  # the VAE task's export measures its latent scale on the loader's clips
            tasks.export(workdir / "model", trainer, weights_to_export(result.state), cfg, loader)
    except (loop.NonFiniteError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        getattr(loader, "close", lambda: None)()
    if result.status == "preempted":
        return cfg.sigterm_exit_code
    if jax.process_index() == 0:
        print(f"done: {cfg.steps} steps; model exported to {workdir / 'model'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
