"""train.py's command line: every config or input error is one `error:` line naming the valid keys or values, exit
status 2, before any model is built; --help lists every key; resuming with other hyperparameters is refused or
applied as `on_change` says; the SIGTERM exit status is configurable. Nothing here compiles a model."""

import dataclasses
import json
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from pia_jax.training import config as config_lib
from pia_jax.training import state as state_lib
from tests.helpers import model_dir, setup, train_config

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT))
import train  # noqa: E402


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = train.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def good(tmp_path):
    """A valid config file (the tests' small model, synthetic data) and the overrides that break it one way each."""
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(config_lib.to_dict(train_config(tmp_path / "run"))))
    return path


BAD = [  # (overrides, what the error line must say)
    (["optimm.lr=1"], "unknown key(s) optimm; the keys of the config are: task, workdir, steps,"),
    (["optim.lrr=1"], "unknown key(s) optim.lrr; the keys of optim are: lr, b1, b2,"),
    (["optim.lr=fast"], "optim.lr must be float, got 'fast'"),
    (["steps=1.5"], "steps must be int, got 1.5"),
    (["steps=0"], "must be >= 1: steps=0"),
    (["log.tensorboard=maybe"], "log.tensorboard must be bool, got 'maybe'"),
    (["model.compute_dtype=bfloat16"], "model.compute_dtype must be one of ['fp32', 'bf16', 'fp16']"),
    (["on_nonfinite=ignore"], "on_nonfinite must be one of ['stop', 'skip']"),
    (["data.sim_range=[0.2]"], "data.sim_range must be a list of 2 values"),
    (["optim=3"], "optim must be a mapping"),
    (["optim.ema_decay=1"], "optim.ema_decay must be in [0, 1)"),
    (["optim.lr"], "not of the form section.key=value"),
    (["model.model_dir=null"], "give exactly one of model.model_dir=DIR"),
    (["data.synthetic=false"], "give exactly one of data.path=DIR"),
    (["model.model_dir={tmp}/nowhere"], "model.model_dir: model directory"),
    (["data.synthetic=false", "data.path={tmp}/nodata"], "data.path: no prepared dataset"),
    (["data.batch_size=6"], "data.batch_size=6 must be a multiple of the 8 devices"),
    (["mesh.fsdp=3"], "does not match the 8 devices"),
    (["task=vae", "data.latents=true"], "the vae task trains the VAE on pixels"),  # loop.check_data, before building
    (["validation.every=5", "validation.images=[{tmp}/x.png]", "validation.prompts=[a]"],
     "validation.images not found"),
    (["workdir={tmp}/c.yaml"], "c.yaml is a file, not a folder"),  # was a FileExistsError traceback
    (["workdir={tmp}/c.yaml/run"], "c.yaml is a file, not a folder"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_config_errors_are_one_line_exit_2(capsys, tmp_path, good, overrides, message):
    code, out, err = run_cli(capsys, good, *(o.format(tmp=tmp_path) for o in overrides))
    assert code == 2 and err.startswith("error: ") and message in err, err
    assert "Traceback" not in err and "building the model" not in out  # stopped before any model work


def test_batch_larger_than_the_dataset_fails_before_building(capsys, tmp_path, good, monkeypatch):
    """It used to fail in the loader, after the model was built, leaving a workdir and its config.json behind."""
    import pia_jax.data
    monkeypatch.setattr(pia_jax.data, "open_dataset", lambda path: [{}] * 5)  # a prepared dataset of 5 clips
    code, out, err = run_cli(capsys, good, "data.synthetic=false", f"data.path={tmp_path}/data")
    assert code == 2 and f"data.batch_size=8 is larger than the 5 examples of {tmp_path}/data" in err, err
    assert "building the model" not in out and not (tmp_path / "run").exists()


def test_bad_config_files(capsys, tmp_path):
    code, _, err = run_cli(capsys, tmp_path / "missing.yaml")
    assert code == 2 and "error: cannot read the config file" in err
    (tmp_path / "bad.yaml").write_text("steps: [1\n")
    code, _, err = run_cli(capsys, tmp_path / "bad.yaml")
    assert code == 2 and "is not valid YAML" in err


def test_help_lists_every_key_with_default_and_meaning(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # undo the wrapping
    for key, tp, default, meaning in config_lib.describe():
        assert f"{key} {tp}, {default}: {' '.join(meaning.split())}" in text
    assert {"optim.lr", "checkpoint.on_corrupt", "sigterm_exit_code", "on_change"} <= {
        k for k, *_ in config_lib.describe()}


def resumed_workdir(tmp_path, **old):
    """A workdir whose run (config.json) was made with `old` overrides and has a checkpoint (only its folder: the
    comparison happens before any checkpoint is read)."""
    workdir = tmp_path / "run"
    (workdir / "checkpoints" / "2").mkdir(parents=True)
    (workdir / "config.json").write_text(json.dumps(config_lib.to_dict(train_config(workdir, **old))))
    return workdir


def test_resume_with_changed_hyperparameters_is_refused_listing_them(capsys, tmp_path, good):
    resumed_workdir(tmp_path)
    code, _, err = run_cli(capsys, good, "optim.lr=5e-4", "optim.grad_accum=2", "data.batch_size=16", "steps=9",
                           "log.every=3")
    assert code == 2
    assert "optim.lr: 0.001 -> 0.0005" in err and "optim.grad_accum: 1 -> 2" in err
    assert "data.batch_size: 8 -> 16" in err and "on_change=apply" in err
    assert "steps" not in err and "log.every" not in err  # free to change on resume
    stored = json.loads((tmp_path / "run" / "config.json").read_text())
    assert stored["optim"]["lr"] == 1e-3  # left as it was


def test_resume_with_on_change_apply_logs_the_changes(capsys, tmp_path):
    workdir = resumed_workdir(tmp_path)
    cfg = train_config(workdir, **{"optim.lr": 5e-4, "on_change": "apply"})
    train.check_inputs(cfg, workdir, exporting=False)
    assert "resuming with optim.lr changed: 0.001 -> 0.0005 (on_change=apply)" in capsys.readouterr().out
    with pytest.raises(train.InputError, match="(?s)model.trainable.*cannot change in a resumed run"):
        train.check_inputs(train_config(workdir, **{"model.trainable": "[x]", "on_change": "apply"}), workdir, False)


def test_resume_of_a_run_older_than_a_config_key_takes_its_default(capsys, tmp_path):
    # a run stored before optim.ema_decay existed resumes as long as the key keeps its default (0: off)
    workdir = resumed_workdir(tmp_path)
    stored = json.loads((workdir / "config.json").read_text())
    del stored["optim"]["ema_decay"]
    (workdir / "config.json").write_text(json.dumps(stored))
    train.check_inputs(train_config(workdir), workdir, exporting=False)
    assert "changed" not in capsys.readouterr().out
    with pytest.raises(train.InputError, match="(?s)optim.ema_decay.*cannot change in a resumed run"):
        train.check_inputs(train_config(workdir, **{"optim.ema_decay": 0.99, "on_change": "apply"}), workdir, False)


def test_resumed_optimizer_uses_the_new_hyperparameters():
    """A checkpointed optimizer state carries no hyperparameter that the config sets: updating it with an optimizer
    made from a new config uses the new learning rate and weight decay (hand-computed first AdamW step)."""
    old = state_lib.make_optimizer(config_lib.OptimConfig(lr=1e-3, warmup_steps=0))
    new = state_lib.make_optimizer(config_lib.OptimConfig(lr=5e-4, weight_decay=0.5, clip_norm=100.0))
    params, grads = {"w": jnp.full(3, 2.0)}, {"w": jnp.array([1.0, -1.0, 4.0])}
    updates, state = new.update(grads, old.init(params), params)
    # first Adam step: m/(sqrt(v)+eps) = sign(g); AdamW adds weight_decay * w; scaled by -lr
    expected = -5e-4 * (np.sign([1.0, -1.0, 4.0]) + 0.5 * 2.0)
    # fp32 bias corrections and eps=1e-8 move each value by a few 1e-9 (1e-5 of lr): far below the 5e-4 steps
    # that telling the old lr or weight decay from the new ones needs
    np.testing.assert_allclose(updates["w"], expected, rtol=0, atol=1e-8)
    assert float(state[1].hyperparams["learning_rate"]) == np.float32(5e-4)


def test_ema_of_the_weights_follows_the_warmed_up_decay():
    """optim.ema_decay keeps, as the optimizer chain's last state, the moving average of the weights each step
    produces, with decay 0 at the first update and min(0.9, (1 + n) / (10 + n)) at update n > 0 (diffusers'
    EMAModel; tests/test_train_oracle.py runs it beside ours); weights_to_export returns it (the last weights
    without it). Hand-computed in float64 from the weights the chain itself produced; fp32 rounding only (1e-6)."""
    cfg = config_lib.OptimConfig(lr=0.1, weight_decay=0.0, clip_norm=100.0, ema_decay=0.9)
    tx = state_lib.make_optimizer(cfg)
    params, grads = {"w": jnp.array([1.0, -2.0])}, {"w": jnp.array([0.5, 1.0])}
    opt_state, ema = tx.init(params), np.array([1.0, -2.0])
    for n in range(6):
        updates, opt_state = tx.update(grads, opt_state, params)
        params = {"w": params["w"] + updates["w"]}
        d = min(0.9, (1 + n) / (10 + n)) if n else 0.0  # 0, 0.18, 0.25, ... then 0.9 from n = 71 on
        ema = d * ema + (1 - d) * np.asarray(params["w"], np.float64)
    state = train_state(params, opt_state)
    np.testing.assert_allclose(state_lib.weights_to_export(state)["w"], ema, rtol=1e-6)
    assert int(opt_state[-1].count) == 6 and not np.allclose(ema, params["w"])
    plain = state_lib.make_optimizer(dataclasses.replace(cfg, ema_decay=0.0))
    assert state_lib.weights_to_export(train_state(params, plain.init(params))) is params


def train_state(params, opt_state):
    from pia_jax.training.step import TrainState
    return TrainState(jnp.int32(0), params, opt_state, None)


def test_export_needs_the_model_not_the_data(capsys, tmp_path, good):
    code, _, err = run_cli(capsys, good, "model.model_dir=null", "data.synthetic=false", "--export", tmp_path / "m")
    assert code == 2 and "give exactly one of model.model_dir=DIR" in err and "data.path" not in err


def test_sigterm_exit_code_and_build_line(capsys, tmp_path, good, monkeypatch):
    """After a pre-emption train.py exits with sigterm_exit_code; before building it says what it is doing."""
    from pia_jax.training import loop
    built = setup()
    monkeypatch.setattr(state_lib, "build", lambda model, seed, task: built)  # the same model, built once per session
    monkeypatch.setattr(loop, "run", lambda cfg, trainer, loader, validate: loop.Result(None, "preempted", 0))
    code, out, _ = run_cli(capsys, good, "sigterm_exit_code=143")
    assert code == 143 and f"building the model from {model_dir()}" in out
