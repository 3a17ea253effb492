"""orbax checkpoints of a run: the TrainState (trainable weights, optimizer state, step, RNG) and every process's
data-iterator state (JSON).

Saves are asynchronous (training goes on while arrays are written) and atomic: orbax writes into a temporary
folder and marks a step complete only at the end, so a run killed during a save resumes from the step before.
Restoring takes the target shardings of the current mesh, so a run saved on one mesh shape resumes on another.
A complete but unreadable checkpoint (a truncated data file, emptied metadata: a disk or copy fault) is named and
set aside as `<step>.corrupt`, and the newest readable one is used, unless `on_corrupt="refuse"`.
"""

import json
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils


def gather_json(value) -> list:
    """[value of process 0, value of process 1, ...] on every process (JSON-serialisable values)."""
    if jax.process_count() == 1:
        return [value]
    raw = np.frombuffer(json.dumps(value).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.array([raw.size], np.int32)).reshape(-1)
    buf = np.zeros(int(sizes.max()), np.uint8)
    buf[:raw.size] = raw
    rows = multihost_utils.process_allgather(buf)
    return [json.loads(bytes(rows[i, :sizes[i]]).decode()) for i in range(len(sizes))]


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be restored."""


class Checkpointer:
    def __init__(self, directory, keep: int, async_save: bool = True):
        self.directory = epath.Path(directory)
        self.directory = self.directory if self.directory.is_absolute() else self.directory.resolve()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state) -> None:
        """Starts saving `state` (a pytree of global arrays) and this process's `data_state` at `step`."""
        data = {"processes": gather_json(data_state)}
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        data=ocp.args.JsonSave(data)), force=True)

    def restore(self, step: int, abstract_state, data: bool = True):
        """(state placed as `abstract_state`'s shardings say, this process's data-iterator state or None)."""
        args = {"state": ocp.args.StandardRestore(abstract_state)} | ({"data": ocp.args.JsonRestore()} if data else {})
        out = self.manager.restore(step, args=ocp.args.Composite(**args))
        if not data:
            return out.state, None
        processes = out.data["processes"]
        if len(processes) != jax.process_count():
            raise ValueError(f"checkpoint {step} in {self.directory} holds the data-iterator states of "
                             f"{len(processes)} processes; this run has {jax.process_count()}. Resume with the "
                             "same number of hosts (the device count per host may change).")
        return out.state, processes[jax.process_index()]

    def restore_latest(self, abstract_state, on_corrupt: str = "fallback", data: bool = True, log=print):
        """(step, (state, data state)) of the newest readable checkpoint, or (None, None) where there is none.

        A newest checkpoint that fails to restore is named (`log`) and renamed `<step>.corrupt` (kept to inspect,
        out of the way of the step that will be saved again), then the one before is tried; with
        on_corrupt="refuse" it raises CheckpointError instead. The data-iterator check of `restore` is not a
        corruption: it raises ValueError as it is."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                return step, self.restore(step, abstract_state, data)
            except ValueError as e:
                if "data-iterator states" in str(e):
                    raise
                error = e
            except Exception as e:  # orbax, tensorstore and JSON raise many kinds for damaged files
                error = e
            reason = (str(error).strip().splitlines() or [""])[0][:200]
            message = f"checkpoint {step} in {self.directory} cannot be read ({type(error).__name__}: {reason})"
            if on_corrupt == "refuse":
                raise CheckpointError(f"{message}; move it away to resume from an earlier one, or set "
                                      "checkpoint.on_corrupt=fallback") from error
            if jax.process_index() == 0:
                (self.directory / str(step)).rename(self.directory / f"{step}.corrupt-{int(time.time())}")
            multihost_utils.sync_global_devices(f"pia-jax set aside checkpoint {step}")
            self.manager.reload()
            log(f"{message}; set aside as {step}.corrupt-*, trying the one before")
        return None, None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
