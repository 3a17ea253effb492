"""A two-process `jax.distributed` run on localhost through train.py (4 fake CPU devices per process, the same
8-device mesh as the single-process runs) trains, checkpoints and exports like the single-process run."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import orbax.checkpoint as ocp

from pia_jax.training import config as config_lib
from pia_jax.weights.model_dir import flat_params, load_model_dir
from tests.test_train import max_rel, train_config
from tests.test_train_run import STEPS, uninterrupted  # noqa: F401  (a fixture: the single-process run)

ROOT = Path(__file__).parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path, uninterrupted):  # noqa: F811
    _, expected, _ = uninterrupted
    config = tmp_path / "config.yaml"
    cfg = train_config(tmp_path / "run", steps=STEPS, export_dtype="fp32")
    config.write_text(json.dumps(config_lib.to_dict(cfg)))  # JSON is YAML
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "PYTHONPATH": str(ROOT)}
    port = free_port()
    procs = [subprocess.Popen([sys.executable, str(ROOT / "train.py"), str(config), "mesh.data=4", "mesh.fsdp=2",
                               f"--coordinator=localhost:{port}", "--num-processes=2", f"--process-id={i}"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    print(outs[0][-2000:])
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
