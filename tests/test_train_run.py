"""The training run on 8 fake CPU devices: kill-and-resume, resuming on another mesh, pre-emption (SIGTERM),
non-finite steps, an interrupted save, metrics, validation videos and export. Uses tests/helpers.py's cached trainers
and conftest.py's `uninterrupted` run."""

import os
import re
import shutil
import signal

import jax
import numpy as np
import pytest

from pia_jax import compiled
from pia_jax.compiled import store
from pia_jax.sharding import make_mesh
from pia_jax.training import loop, tasks
from pia_jax.training import step as step_lib
from pia_jax.training.checkpoint import Checkpointer, CheckpointError
from pia_jax.weights.model_dir import flat_params, load_model_dir
from tests.helpers import STEPS, encode_video, host, loader, max_rel, setup, train_config, trainer
from tests.test_stored_executables import no_lowering


class Hooked:
    """A loader that calls hook(batch number, batch) on each batch it hands out (to inject faults)."""

    def __init__(self, inner, hook):
        self.inner, self.hook, self.count = inner, hook, 0

    def __next__(self):
        batch = next(self.inner)
        self.count += 1
        return self.hook(self.count, batch) or batch

    def get_state(self):
        return self.inner.get_state()

    def set_state(self, state):
        self.inner.set_state(state)


def saved_params(workdir, step, tr):
    ckpt = Checkpointer(workdir / "checkpoints", keep=10)
    state, data_state = ckpt.restore(step, tr.abstract_state())
    ckpt.close()
    return host(state.params), data_state


def test_kill_and_resume_is_exact(tmp_path, uninterrupted):
    _, expected, expected_order = uninterrupted
    cfg = train_config(tmp_path, steps=STEPS)
    first = loader()
    loop.run(train_config(tmp_path, steps=2), trainer(4, 2), first)  # "killed" after step 2 ...
    # ... including in the middle of saving step 3: orbax's unfinished temporary folder must be ignored
    (tmp_path / "checkpoints" / "3.orbax-checkpoint-tmp-1234").mkdir()
    second = loader()
    result = loop.run(cfg, trainer(4, 2), second)
    assert first.seen + second.seen == expected_order  # the resumed run continued with the next unseen batch
    got = host(result.state.params)
    assert all(np.array_equal(got[k], expected[k]) for k in expected)  # bit-identical


def test_resume_on_another_mesh(tmp_path, uninterrupted):
    """Trained on 8 devices (data 4 x fsdp 2, weights and Adam state split in two) up to step 2, resumed on one
    device (the single-device trainer test_train.py compiles anyway: one compilation fewer than another mesh)."""
    workdir, expected, _ = uninterrupted
    shutil.copytree(workdir / "checkpoints" / "2", tmp_path / "checkpoints" / "2")
    result = loop.run(train_config(tmp_path, steps=STEPS), trainer(1, 1), loader())
    assert max_rel(host(result.state.params), expected) < 1e-4  # other summation order only (see test_train.py)


def copy_checkpoints(src, dst, steps):
    for step in steps:
        shutil.copytree(src / "checkpoints" / str(step), dst / "checkpoints" / str(step))


@pytest.mark.parametrize("damage", ["truncated", "empty_metadata"])
def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path, uninterrupted, capsys, damage):
    """A complete checkpoint 4 with a truncated array file (or an emptied metadata file) is named, set aside, and
    the run resumes from checkpoint 2, ending bit-identical to the uninterrupted run; on_corrupt=refuse stops."""
    workdir, expected, _ = uninterrupted
    copy_checkpoints(workdir, tmp_path, (2, 4))
    state_dir = tmp_path / "checkpoints" / "4" / "state"
    if damage == "truncated":
        biggest = max((p for p in state_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
        biggest.write_bytes(biggest.read_bytes()[:100])
    else:
        (state_dir / "_METADATA").write_text("")
    with pytest.raises(CheckpointError, match="checkpoint 4 in .* cannot be read"):
        loop.run(train_config(tmp_path, steps=STEPS, **{"checkpoint.on_corrupt": "refuse"}), trainer(4, 2), loader())
    result = loop.run(train_config(tmp_path, steps=STEPS), trainer(4, 2), loader())
    out = capsys.readouterr().out
    assert "warning: checkpoint 4 in" in out and "cannot be read" in out and "resumed from step 2" in out
    got = host(result.state.params)
    assert all(np.array_equal(got[k], expected[k]) for k in expected)
    assert len(list((tmp_path / "checkpoints").glob("4.corrupt-*"))) == 1  # kept to inspect, out of the way


def tensorboard_events(logdir):
    """The events of the TensorBoard files in logdir, as written so far."""
    from tensorboardX.proto import event_pb2
    for events in logdir.glob("events.out.tfevents.*"):
        raw = events.read_bytes()
        while raw:  # TFRecord framing: length (8 bytes), its CRC (4), the record, its CRC (4)
            n = int.from_bytes(raw[:8], "little")
            yield event_pb2.Event.FromString(raw[12:12 + n])
            raw = raw[16 + n:]


def test_tensorboard_flushed_at_each_checkpoint(tmp_path):
    """When the batch after checkpoint 2 is drawn (a kill -9 could come now), steps 1-2 are on disk already."""
    seen = {}

    def look(count, batch):
        if count == 3:
            seen["steps"] = {e.step for e in tensorboard_events(tmp_path / "tensorboard") if e.summary.value}
    loop.run(train_config(tmp_path, steps=3), trainer(4, 2), Hooked(loader(), look))
    assert seen["steps"] == {1, 2}


def test_sigterm_saves_and_stops(tmp_path):
    def preempt(count, batch):
        if count == 2:
            os.kill(os.getpid(), signal.SIGTERM)
    previous = signal.getsignal(signal.SIGTERM)
    result = loop.run(train_config(tmp_path, steps=STEPS), trainer(4, 2), Hooked(loader(), preempt))
    assert result.status == "preempted" and int(result.state.step) == 2
    assert Checkpointer(tmp_path / "checkpoints", keep=10).latest_step() == 2
    assert signal.getsignal(signal.SIGTERM) is previous  # the handler is uninstalled


def nan_at_batch(n):
    def hook(count, batch):
        if count == n:  # a NaN affinity reaches the UNet's input (conditioned clip or not: NaN x 0 is NaN)
            return {**batch, "affinity": np.full_like(batch["affinity"], np.nan)}
    return hook


def test_nonfinite_stops_keeping_the_last_good_checkpoint(tmp_path):
    """Checkpoints at steps 2 and 4: the non-finite step 3 is seen after step 4 was dispatched (metrics are read one
    step late), and still nothing after checkpoint 2 is saved."""
    with pytest.raises(loop.NonFiniteError, match="step 3: non-finite.*last good checkpoint is step 2"):
        loop.run(train_config(tmp_path, steps=STEPS), trainer(4, 2), Hooked(loader(), nan_at_batch(3)))
    assert Checkpointer(tmp_path / "checkpoints", keep=10).latest_step() == 2


def test_nonfinite_skip(tmp_path, capsys):
    cfg = train_config(tmp_path, steps=3, on_nonfinite="skip", **{"checkpoint.every": 1})
    result = loop.run(cfg, trainer(4, 2), Hooked(loader(), nan_at_batch(2)))
    assert result.skipped == 1 and result.status == "done"
    before, _ = saved_params(tmp_path, 1, trainer(4, 2))
    after, _ = saved_params(tmp_path, 2, trainer(4, 2))
    assert all(np.array_equal(before[k], after[k]) for k in before)  # the skipped step changed nothing
    assert all(np.isfinite(v).all() for v in host(result.state.params).values())
    out = capsys.readouterr().out
    assert "step 2: non-finite" in out and "skipped (1 so far)" in out


def test_pipelined_run_equals_the_synchronous_one(tmp_path, monkeypatch, capsys):
    """Checkpointing every step, each step is finished before the next is drawn; checkpointing only at the end, step
    n + 1 is dispatched and batch n + 2 drawn before step n's metrics are read. Same weights, same logged values, a
    non-finite step skipped either way."""
    events, logged = [], []
    step_scalars = loop.metrics_lib.step_scalars

    def read(metrics, *args):
        events.append("read")
        logged.append({k: float(v) for k, v in metrics.items() if k != "finite"})
        return step_scalars(metrics, *args)

    class Recorded:  # the trainer, noting each dispatched step
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def step(self, state, batch):
            events.append("dispatch")
            return self.inner.step(state, batch)

    monkeypatch.setattr(loop.metrics_lib, "step_scalars", read)
    hook = lambda count, batch: events.append("draw") or nan_at_batch(3)(count, batch)
    runs = {}
    for every in (1, STEPS):
        events.clear()
        cfg = train_config(tmp_path / str(every), steps=STEPS, on_nonfinite="skip", **{"checkpoint.every": every})
        result = loop.run(cfg, Recorded(trainer(4, 2)), Hooked(loader(), hook))
        runs[every] = host(result.state.params), list(logged), list(events), result.skipped
        logged.clear()
    assert runs[1][2] == ["draw", "dispatch", "read"] * STEPS
    assert runs[STEPS][2] == ["draw", "dispatch", "draw", "dispatch", "read", "draw", "dispatch", "read", "draw",
                              "dispatch", "read", "read"]
    (sync, sync_logged, _, sync_skipped), (piped, piped_logged, _, piped_skipped) = runs[1], runs[STEPS]
    assert sync_skipped == piped_skipped == 1 and len(piped_logged) == STEPS
    np.testing.assert_equal(piped_logged, sync_logged)  # NaN (step 3) counts as equal to NaN
    assert all(np.array_equal(piped[k], sync[k]) for k in sync)
    out = capsys.readouterr().out
    assert out.count("step 3: non-finite") == 2 and "skipped (1 so far)" in out
    assert re.findall(r"\] step (\d+): loss", out) == ["1", "2", "3", "4"] * 2  # every step logged, in order


def test_metrics_logged_to_stdout_and_tensorboard(uninterrupted, capsys):
    workdir, _, _ = uninterrupted
    assert len(list((workdir / "tensorboard").glob("events.out.tfevents.*"))) == 1
    tags = {v.tag for event in tensorboard_events(workdir / "tensorboard") for v in event.summary.value}
    assert {"train/loss", "train/lr", "train/grad_norm_unclipped", "perf/clips_per_second", "perf/step_seconds",
            "perf/tflops_per_device"} <= tags


def test_validation_writes_videos(tmp_path):
    """The validation hook samples fixed image/prompt pairs with the current weights through pia_jax.sampling, logs
    their scores, and a later validation reuses the compiled sampler with the new weights."""
    from PIL import Image

    from pia_jax.training.metrics import Writer
    from pia_jax.training.validation import Validator
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (12, 20, 3), np.uint8)).save(tmp_path / "image.png")
    cfg = train_config(tmp_path, **{"validation.images": f"[{tmp_path / 'image.png'}]",
                                    "validation.prompts": "[a cat]", "validation.steps": 2})
    tr = trainer(1, 1)
    writer = Writer(tmp_path, 1, 1, 0, tensorboard=False, progress_bar=False)
    logged = []
    writer.scalars = lambda step, values, force=False: logged.append((step, values))
    validate = Validator(cfg, tr)
    validate(tr.init_state(0), 7, writer)
    assert (tmp_path / "validation" / "step_0000007" / "0.gif").stat().st_size > 0
    # evaluate.py's motion and fidelity scores of the video, logged at the validation step (no SSIM: the test's
    # frames are smaller than its 11-pixel window)
    (step, scores), = logged
    assert step == 7 and {"validation/flow_mean", "validation/dynamic", "validation/psnr"} <= set(scores), scores
    assert all(np.isfinite(v) for v in scores.values()) and 0 < scores["validation/psnr"] <= 100
    compiled = validate.animator.compilations
    validate(tr.init_state(1), 8, writer)
    assert (tmp_path / "validation" / "step_0000008" / "0.gif").stat().st_size > 0
    assert validate.animator.compilations == compiled, "the second validation must not compile again"


def test_export_is_a_model_directory(tmp_path, uninterrupted):
    _, params, _ = uninterrupted
    tasks.export(tmp_path / "model", trainer(4, 2), jax.device_put(params), train_config(export_dtype="fp32"))
    md = load_model_dir(tmp_path / "model")
    s = setup()
    unet = flat_params(md.unet)
    assert md.config.unet.in_channels == 9 and md.tokenizer is not None
    assert all(np.array_equal(unet[k], params[k]) for k in params)
    assert all(np.array_equal(unet[k], s.frozen["unet"][k]) for k in s.frozen["unet"])  # full precision, not bf16


def test_trains_on_a_prepared_dataset(tmp_path):
    """The whole data path into the step: videos -> prepare_dataset's ArrayRecord shards -> the real Loader (clips,
    affinity, dropout, tokens) -> 2 sharded steps; the checkpoint records where the loader stands."""
    import csv

    from pia_jax.data import generic_rows
    from pia_jax.data.builder import prepare
    with open(tmp_path / "clips.csv", "w", newline="") as f:
        rows = csv.writer(f)
        rows.writerow(["path", "caption"])
        for i in range(10):
            (tmp_path / f"v{i}.mp4").write_bytes(encode_video(12 + i))
            rows.writerow([f"v{i}.mp4", "hello cat" if i % 2 else "a cat"])
    path, report = prepare(generic_rows(tmp_path / "clips.csv"), tmp_path / "ds", min_frames=4, workers=2)
    assert report["examples"] == 10
    cfg = train_config(tmp_path / "run", steps=2, **{"data.path": str(path), "data.stride": 2, "data.workers": 2})
    data = loop.make_loader(cfg, setup().tokenizer, setup().config.text.vocab_size)
    try:
        result = loop.run(cfg, trainer(4, 2), data)
    finally:
        data.close()
    assert result.status == "done" and int(result.state.step) == 2
    params = host(result.state.params)
    assert all(np.isfinite(v).all() for v in params.values())
    assert any(not np.array_equal(params[k], v) for k, v in host(trainer(4, 2).init_state(0).params).items())
    _, data_state = saved_params(tmp_path / "run", 2, trainer(4, 2))
    # 10 clips make one global batch of 8 per epoch (the partial one is dropped): two batches = two epochs done
    assert (data_state["epoch"], data_state["step"]) == (2, 0)


def test_a_resumed_training_run_loads_its_step_and_ends_bit_identical(tmp_path, executable_store, uninterrupted,
                                                                      monkeypatch, capsys):
    """Steps 1-2 in one process, 3-4 after a restart with a fresh trainer (as train.py builds it): the step is loaded
    from the store (not traced, lowered or compiled) with its FLOP count, and the weights equal the uninterrupted
    run's to the bit. A changed optimizer setting is another program: it would compile."""
    _, expected, _ = uninterrupted
    devices = make_mesh(4, 2, devices=jax.devices()[:8])  # tasks.make_trainer: as train.py builds the trainer
    loop.run(train_config(tmp_path, steps=2), tasks.make_trainer(train_config(tmp_path), devices), loader())
    assert len(list(executable_store.glob("train_step-*.pkl"))) == 1
    monkeypatch.setattr(compiled.Program, "lower", no_lowering)
    monkeypatch.setattr(step_lib, "count_flops", no_lowering)
    resumed = tasks.make_trainer(train_config(tmp_path), devices)
    result = loop.run(train_config(tmp_path, steps=STEPS), resumed, loader())
    assert (resumed.program.compiles, resumed.program.loaded) == (0, 1)
    assert "loaded the stored step" in capsys.readouterr().out
    got = host(result.state.params)
    assert all(np.array_equal(got[k], expected[k]) for k in expected)  # bit-identical

    other = tasks.make_trainer(train_config(tmp_path, **{"optim.lr": 2e-3}), devices).program
    (key, (_, name, _)), = resumed.program.entries.items()
    assert store.entry_name(other.fn, key, other.identity) != name
    assert not (executable_store / f"{store.entry_name(other.fn, key, other.identity)}.pkl").exists()
