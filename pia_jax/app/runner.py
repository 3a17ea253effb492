"""The app's one loaded model and its requests, one at a time: check (plan.py, before anything is loaded or
compiled), load the model if it is not, plan the batch size (which compiles the programs, or finds them compiled by
an earlier request or in the persistent cache), sample with per-step progress, write MP4 and GIF into the request's
own folder <out>/<NNNN>/ (never over an earlier result). No gradio: progress goes to a `report(value, desc)`
function (a `gr.Progress` is one), errors are raised as sample.py's are (ValueError, OSError, FloatingPointError).
"""

import gc
import json
import math
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np

from pia_jax import media
from pia_jax.app import plan
from pia_jax.app.history import Entry
from pia_jax.sampling import cases


def _silent(*_):
    pass


class Runner:
    def __init__(self, models: dict, out, dtype: str = "auto", compile_cache: str = "default"):
        """`models`: {name: model directory}, the first selected; `out`: the folder of the requests' folders."""
        self.models, self.out = dict(models), Path(out)
        self.dtype, self.compile_cache = dtype, compile_cache
        self.selected = next(iter(self.models))
        self.animator, self.loaded = None, None  # the loaded Animator and its model's name
        self.history: list[Entry] = []  # since the app started, oldest first
        self.lock = threading.Lock()  # one request at a time on the device (the page's queue also says so)
        done = [int(p.name) for p in self.out.glob("[0-9][0-9][0-9][0-9]") if p.name.isdigit()]
        self.count = max(done, default=0)  # the last request folder, from earlier runs too

    @property
    def model_dir(self) -> Path:
        return Path(self.models[self.selected])

    def select(self, name: str) -> str:
        """Selects a model: the previous one is unloaded (its weights and programs freed), this one loads on the
        next request (`load`)."""
        if name not in self.models:
            raise ValueError(f"unknown model {name!r}; the app serves {', '.join(self.models)}")
        with self.lock:
            if name != self.loaded:
                self.animator, self.loaded = None, None
                gc.collect()  # drops the device buffers and executables the old Animator held
            self.selected = name
        return f"model {name} selected ({self.model_dir})"

    def load(self, report=_silent) -> float:
        """Loads the selected model unless it is loaded; returns the seconds it took."""
        if self.loaded == self.selected:
            return 0.0
        import jax.numpy as jnp

        from pia_jax.sampling import Animator
        report(0.0, f"loading {self.model_dir}")
        start = time.perf_counter()
        self.animator, self.loaded = None, None
        gc.collect()
        dtype = {"auto": None, "fp32": jnp.float32, "bf16": jnp.bfloat16}[self.dtype]
        self.animator = Animator.load(self.model_dir, dtype=dtype, compile_cache_dir=self.compile_cache)
        self.loaded = self.selected
        return time.perf_counter() - start

    def generate(self, request: dict, report=_silent) -> Entry:
        """One request -> its Entry (also appended to the history); every check runs before any loading."""
        with self.lock:
            folder = self.out / f"{self.count + 1:04d}"
            try:
                params = _with_copied_inputs(plan.typed(request), folder)
                a = plan.namespace(self.model_dir, params, folder, self.dtype, self.compile_cache)
                p = plan.check(a)
                entry = self._run(p, a, params, _logged(report, folder.name))
            except BaseException:
                shutil.rmtree(folder, ignore_errors=True)  # nothing half made stays
                raise
            self.count += 1
            self.history.append(entry)
            (folder / "params.json").write_text(json.dumps(entry.record(), indent=1) + "\n")
            return entry

    def _run(self, p: cases.Plan, a, params: dict, report) -> Entry:
        seconds = {"load": self.load(report)}
        animator = self.animator
        from pia_jax.sampling import compile_cache
        cache, compile_seconds = compile_cache.counts(), animator.compile_seconds
        compiles = (animator.compilations, animator.programs_loaded)
        where = f"cache {animator.compile_cache}" if animator.compile_cache else "cache off"
        report(0.0, f"compiling the sampler ({where}; programs compiled earlier are reused)")
        sizes = [animator.plan_batch_size(len(g.videos), g.height, g.width, g.frames, g.options,
                                          text_keys=cases.text_keys(g.videos), keyframes=len(g.keyframes or ()))
                 for g in p.groups]  # ValueError: the batch-size reason (too large for the device)
        files = []
        for g, size in zip(p.groups, sizes):
            result = animator(np.stack(g.images), [v.prompt for v in g.videos], [v.negative_prompt for v in g.videos],
                              np.stack([v.affinity for v in g.videos]), g.options, seeds=[v.seed for v in g.videos],
                              batch_size=size, keyframes=g.keyframes, ip_adapter_images=g.ip_images,
                              progress=_progress(report, _batches(animator, g, size)))
            for k, v in result.seconds.items():
                seconds[k] = seconds.get(k, 0) + v
            files += _write(a, g, result, single=len(p.videos) == 1)
        counts = {k: n - cache[k] for k, n in compile_cache.counts().items()}
        made = (animator.compilations - compiles[0], animator.programs_loaded - compiles[1])
        status = _status(seconds, animator, made, animator.compile_seconds - compile_seconds, counts, max(sizes))
        return Entry(self.count + 1, time.strftime("%H:%M:%S"), self.selected, params,
                     plan.shell(plan.command(a)), files, status)


def _batches(animator, group, size: int) -> int:
    """How many batches the animator runs `group`'s videos in: `size` videos per device group, as many groups as
    its devices split into for this call (the progress bar's total)."""
    groups = animator.split_for(len(group.videos), group.frames, group.options)[0]
    return math.ceil(len(group.videos) / (size * groups))


def _with_copied_inputs(params: dict, folder: Path) -> dict:
    """The request with its images copied into its folder (an upload's temporary file may go; the command line
    must keep working), each under its own name (output names come from the image's stem)."""
    params = dict(params)
    for k in ("image", "last_frame", *plan.IMAGE_FIELDS):
        source = params.get(k) and Path(params[k])
        if source and source.is_file():  # else the checks name what is wrong with it
            target = folder / k / source.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
            params[k] = str(target)
    return params


def _logged(report, request: str):
    """`report`, and each report as a line on stderr (the server's log), as sample.py prints its progress."""
    def both(value, desc):
        report(value, desc)
        done = f" {value[0]}/{value[1]}" if isinstance(value, tuple) else ""
        print(f"[request {request}] {desc}{done}", file=sys.stderr, flush=True)
    return both


def _progress(report, batches: int):
    """The Animator's progress(phase, done, total) -> report(value, desc): per step of the compiled loop, as each
    step's latents are ready on the device."""
    batch = [0]

    def step(phase, done, total):
        if phase == "encode" and done:
            return  # the denoising steps follow at once
        batch[0] += phase == "encode"
        where = f"batch {batch[0]}/{batches}: " if batches > 1 else ""
        if phase == "encode":
            report(0.0, where + "encoding the prompt and image")
        elif phase == "denoise":
            report((done, total), where + "denoising")
        else:
            report(1.0, where + f"decoded {total} frames")
    return step


def _write(a, g: cases.Group, result, single: bool) -> list:
    """Writes a group's videos as MP4 and GIF (each file complete or not at all) -> [{name, mp4, gif}]."""
    written = []
    for i, video in enumerate(g.videos):
        paths = cases.output_paths(a.out, video.name, single, plan.FORMATS)
        for fmt, path in paths.items():
            media.write_video(fmt, path, result.videos[i], a.fps)
        written.append({"name": video.name, **paths})
    return written


def _status(seconds: dict, animator, made: tuple, compile_seconds: float, cache: dict, batch: int) -> str:
    """The compile/cache status line: what this request loaded, compiled (or reused) and sampled. `made`: programs
    (compiled, loaded from stored executables) for this request."""
    compiled, loaded = made
    if compiled:
        where = (f"cache {animator.compile_cache}: {cache['hits']} hit(s), {cache['misses']} miss(es)"
                 if animator.compile_cache else "cache off")
        compiling = f"compiled {compiled} program(s) in {compile_seconds:.1f}s ({where})"
        compiling += f", loaded {loaded} stored" if loaded else ""
    elif loaded:
        compiling = f"no compiling: {loaded} program(s) loaded from stored executables in {compile_seconds:.1f}s"
    else:
        compiling = "no compiling: the programs of an earlier request were reused"
    load = f"loaded the model in {seconds['load']:.1f}s" if seconds["load"] else "the model was in memory"
    sampling = " ".join(f"{k} {seconds.get(k, 0):.1f}s" for k in ("encode", "denoise", "decode"))
    return (f"{load} | {compiling} | {sampling} | batch {batch} video(s) x {animator.groups} device group(s) of "
            f"{animator.devices_per_group} device(s)")
