"""Two-process `jax.distributed` runs on localhost through train.py (4 fake CPU devices per process, the same
8-device mesh as the single-process runs): PIA trains, checkpoints and exports like the single-process run, and a
base task whose weights are split across both hosts exports them once."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp

from pia_jax.training import config as config_lib
from pia_jax.weights.model_dir import flat_params, load_model_dir
from tests.helpers import STEPS, max_rel, model_dir, train_config

ROOT = Path(__file__).parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def train_on_two_processes(tmp_path, cfg, *overrides) -> list[str]:
    """train.py with `cfg` on two local processes; their outputs, after checking both exit 0."""
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps(config_lib.to_dict(cfg)))  # JSON is YAML
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "PYTHONPATH": str(ROOT)}
    port = free_port()
    procs = [subprocess.Popen([sys.executable, str(ROOT / "train.py"), str(config), *overrides,
                               f"--coordinator=localhost:{port}", "--num-processes=2", f"--process-id={i}"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    print(outs[0][-2000:])
    return outs


def test_two_processes_match_one(tmp_path, uninterrupted):
    _, expected, _ = uninterrupted
    cfg = train_config(tmp_path / "run", steps=STEPS, export_dtype="fp32")
    outs = train_on_two_processes(tmp_path, cfg, "mesh.data=4", "mesh.fsdp=2")
    assert "on 8 devices" in outs[0] and f"step {STEPS}:" in outs[0]
    # Same mesh and batches as the single-process run; the cross-process reductions (gloo) may sum in another
    # order, hence the tolerance of test_train.py rather than bit equality.
    exported = flat_params(load_model_dir(tmp_path / "run" / "model", tokenizer=False).unet)
    assert max_rel({k: exported[k] for k in expected}, expected) < 1e-4
    # the checkpoint holds both processes' data-iterator states
    manager = ocp.CheckpointManager(tmp_path / "run" / "checkpoints", item_names=("state", "data"))
    assert manager.latest_step() == STEPS
    data = manager.restore(STEPS, args=ocp.args.Composite(data=ocp.args.JsonRestore())).data
    assert data == {"processes": [{"step": STEPS}, {"step": STEPS}]}


def test_two_processes_export_a_base_task_sharded_across_them(tmp_path):
    """The vae task on one fsdp group of all 8 devices: every VAE kernel is split across the two hosts (neither can
    read it whole). The export gathers the weights on both, measures the latent scale on both hosts' clips and
    process 0 writes the model directory once."""
    cfg = train_config(tmp_path / "run", steps=2, task="vae", export_dtype="fp32",
                       **{"model.trainable": "['.']", "data.n_frames": 1})
    outs = train_on_two_processes(tmp_path, cfg, "mesh.data=1", "mesh.fsdp=8")
    assert "done: 2 steps" in outs[0] and "done" not in outs[1]
    start, out = load_model_dir(model_dir(), tokenizer=False), load_model_dir(tmp_path / "run" / "model")
    before, after = flat_params(start.vae), flat_params(out.vae)
    assert before.keys() == after.keys() and any(not np.array_equal(after[k], before[k]) for k in before)
    assert all(np.array_equal(a, b) for a, b in zip(flat_params(start.unet).values(), flat_params(out.unet).values()))
    sources = json.loads((tmp_path / "run" / "model" / "sources.json").read_text())
    assert out.config.vae.scaling_factor != start.config.vae.scaling_factor and sources["report"]["task"] == "vae"
    assert not [p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(".")]  # no second writer's copy
