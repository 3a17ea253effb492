"""The sampler's denoise program compiled without a device, for one H100 and for TPU v5e / v6e with 1 and 8 chips:
per-chip memory against the chip's HBM, FLOPs, HBM bytes and collective bytes per video, compile time, and a
roofline estimate of the seconds per video (`estimate`). Nothing runs, so no time is measured: it is an ESTIMATE.

    /work/venv312/bin/python bench/sample_aot.py --target v5e --chips 8 --frames 64     # one row, a JSON line
    /work/venv312/bin/python bench/sample_aot.py --table --only v5e --stop-at 12:03      # rows of TABLE not done
    /work/venv312/bin/python bench/sample_aot.py --rescore     # score the rows again from their kept HLO
    /work/venv312/bin/python bench/sample_aot.py --markdown    # BENCHMARKS.md's table

(a python3.12 venv with jax==0.11.2, libtpu, jax[cuda13], flax, and `pip install --no-deps -e .`). The program is
the one `sample.py` runs: SD1.5 PIA (random weights, shapes only), bf16, DDIM with guidance, SampleOptions'
defaults (one video, context mode attention, windows of 16 frames every 4 past 32 frames), the whole loop in one
program. It is built by the Animator's own code (`Animator.split_for`, `_settings`, `_compile`, `_denoise_fn`)
on an Animator that holds weight shapes instead of weights (`abstract_animator`); only the denoise program
compiles, the encode and decode programs are traced for their output shapes. The layout is the one the sampler
picks for one video on the chips (`sharding.sampler_split`, read at run time and recorded per row).

`--table` runs each row in its own process (XLA:TPU holds ~11 GB of host memory while it compiles SD1.5), one at a
time, waiting while /proc/meminfo shows less than --min-free-gb available, compiling HEAD's committed package
(`snapshot`; the commit is recorded), and appends its JSON line to --out; rows already there are skipped, so a
stopped table resumes (`--fresh`: rows compiled at another commit are compiled again). The compiled HLO is kept in
HLO_DIR for `--rescore`.
"""

import argparse
import collections
import functools
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from tpu_aot import BYTES, CHIPS, HEADROOM, SHAPE

# H100 (perf_notes.md's roofline numbers: achievable dense bf16 TFLOP/s, HBM GB/s; HBM GiB; no interconnect used)
PEAKS = dict(CHIPS, h100=(790.0, 3000.0, 79.1, 0.0))
TOPOLOGY = {("v5e", 1): "v5e:1x1", ("v5e", 8): "v5e:2x4", ("v6e", 1): "v6e:1x1", ("v6e", 8): "v6e:2x4"}
HLO_DIR = Path("/tmp/sample_aot_hlo")  # the compiled programs (tens of MB each: not committed)
STEPS = 25  # sample.py's default: the loop's trip count (data to the program) for the estimate
BASE = {"config": "sd15", "size": 512, "videos": 1, "steps": STEPS, "program_mesh": "animator"}
# in the order they run: the H100, then per TPU generation 1 and 8 chips side by side, frames growing
# program_mesh "split": the denoise program compiled for the devices of the call's split instead of all the
# Animator's. cefb619..f9a138a built splash attention's shard_map over all the Animator's devices while one video's
# arrays live on the first two, or under the split's (video, cfg, window) mesh: lowering failed on a TPU slice;
# since 9644dba the sampler traces for the split itself and both compile the same program (the tiny model's HLO
# at b579468, metadata aside, is identical)
TABLE = [dict(BASE, target="h100", chips=1, frames=f) for f in (16, 64, 256)] + [
    dict(BASE, target=t, chips=c, frames=f, program_mesh=m) for t in ("v5e", "v6e") for f in (16, 64, 256)
    for c, m in ((1, "animator"), (8, "animator"), (8, "split"))]
KEYS = tuple(BASE) + ("target", "chips", "frames")
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
PLUMBING = ("get-tuple-element", "tuple", "bitcast", "parameter", "constant", "after-all", "partition-id",
            "replica-id")
INSTRUCTION = re.compile(r"^\s*(?:ROOT )?(%[\w.\-]+) = (.*?) ([\w\-]+)\((.*?)\)(.*)$")


def _devices(target: str, chips: int):
    """The target's devices (no hardware needed) and its chip name."""
    from jax.experimental import topologies
    if target == "h100":
        from gpu_aot import H100
        if chips != 1:
            raise ValueError("the H100 target is one GPU")
        return topologies.get_topology_desc(platform="cuda", target_config=H100, topology="1x1x1").devices, "h100"
    return topologies.get_topology_desc(platform="tpu", topology_name=TOPOLOGY[target, chips]).devices, target


class _ShapesOnly:
    """Stands in for the encode and decode programs: traced (the denoise program's inputs are encode's outputs),
    never compiled."""

    def __init__(self, fn, mesh):
        import jax
        self.jitted, self.mesh = jax.jit(fn, static_argnums=0), mesh

    def get(self, key, *args):
        from pia_jax.models import attention
        with attention.compiling_for(self.mesh):
            return self.jitted.trace(*args)


def abstract_animator(cfg, devices, donate: bool):
    """An Animator over `devices` holding its weights' shapes (bf16, replicated) instead of weights: what
    `Animator.__init__` sets up that the compile path reads (it would place real weights on the devices), and
    `_weights` giving their shapes on the split's devices."""
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh

    from pia_jax import compiled
    from pia_jax.models import PARTS, build
    from pia_jax.sampling import animator as anim_lib
    from pia_jax.sampling import schedulers

    class ShapesAnimator(anim_lib.Animator):
        def _weights(self, phase: str):  # the weights' shapes, replicated on the devices of the split in use
            text, vae, unet = (anim_lib._shapes(x, self._replicated) for x in self._leaves)
            return {"encode": (text, vae), "denoise": unet, "decode": vae}[phase]

    a = ShapesAnimator.__new__(ShapesAnimator)
    a.config, a.scheduler_config, a.latent_factor = cfg, schedulers.PIA_DDIM, cfg.vae.latent_factor
    a.text_to_video, a._image = cfg.unet.in_channels == 4, ()
    a.mesh = Mesh(np.array(devices), ("data",))
    a._use_split((a.devices, 1, 1))
    graphs, leaves = zip(*(anim_lib.Graph.split(build(cfg, p, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16))
                           for p in ("text_encoder", "vae", "unet")))
    assert set(PARTS) == {"text_encoder", "vae", "unet"} and cfg.ip_adapter is None
    a._leaves = leaves
    a._parts = parts = anim_lib.Parts(*graphs, cfg.vae.scaling_factor, a.text_to_video)
    a._encode = _ShapesOnly(functools.partial(anim_lib._encode_fn, parts), a.mesh)
    a._decode = _ShapesOnly(functools.partial(anim_lib._decode_fn, parts), a.mesh)
    a._denoise = compiled.Program(functools.partial(anim_lib._denoise_fn, parts), a.mesh, settings=True,
                                  donate_argnames=("latents", "solver_state") if donate else ())
    return a


def _computations(hlo: str) -> tuple[dict, str]:
    """{name: body lines} of an HLO module's computations, and the entry's name."""
    comps = {m.group(2): m.group(3).splitlines() for m in re.finditer(
        r"^(ENTRY )?(%[\w.\-]+) .*?\{\n(.*?)\n\}$", hlo, re.MULTILINE | re.DOTALL)}
    return comps, re.search(r"^ENTRY (%[\w.\-]+)", hlo, re.MULTILINE).group(1)


LAID_OUT = re.compile(SHAPE.pattern + r"(\{[^}]*\})?")


def _array_bytes(shape: str) -> int:
    """Bytes of the arrays in an HLO shape that live in HBM: not those an XLA:TPU layout places in another memory
    space (S(1): the core's VMEM, S(2): SMEM)."""
    return sum(BYTES[t] * math.prod(int(d) for d in filter(None, dims.split(",")))
               for t, dims, layout in LAID_OUT.findall(shape) if not re.search(r"S\(\d+\)", layout))


def _trip_count(comps: dict, attributes: str) -> int | None:
    """A while loop's trip count: XLA:GPU's known_trip_count, or (XLA:TPU gives none) the constant its condition
    compares the counter against (counter < N, from 0 by 1: how jax lowers scan and fori_loop with static bounds);
    None for the denoising loop, whose bounds are data."""
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"', attributes)
    if known:
        return int(known.group(1))
    cond = "\n".join(comps[re.search(r"condition=(%[\w.\-]+)", attributes).group(1)])
    root = re.search(r"ROOT %\S+ = pred\[\]\S* compare\((%[\w.\-]+), (%[\w.\-]+)\), direction=LT", cond)
    bound = root and re.search(re.escape(root.group(2)) + r" = s32\[\]\S* constant\((\d+)\)", cond)
    counter = root and re.search(re.escape(root.group(1)) + r" = s32\[\]\S* get-tuple-element\(\S+\), index=0", cond)
    return int(bound.group(1)) if bound and counter else None


def _dims(shape: str) -> list[int]:
    """The dimensions of the first array in an HLO shape."""
    return [int(d) for d in filter(None, SHAPE.search(shape).group(2).split(","))]


def _taps(lhs: list, rhs: list, lhs_labels: str, rhs_labels: str, window: str) -> int:
    """Multiply-adds per output element of a convolution: the kernel's input features times, per spatial dim, the
    window taps that meet the input (min(window, input size): XLA:TPU writes some matmuls as a convolution whose
    window spans a fully padded input). A spatial dim with lhs_dilate = the window size is a batch dim (XLA:TPU's
    batched matmuls): one tap."""
    window = (re.search(r"window=\{([^}]*)\}", window) or re.match("", "")).group(0)
    size = re.search(r"size=([\dx]+)", window)
    size = size.group(1).split("x") if size else []
    dilate = re.search(r"lhs_dilate=([\dx]+)", window)
    dilate = dilate.group(1).split("x") if dilate else ["1"] * len(size)
    taps = rhs[rhs_labels.index("i")]
    for k, (n, d) in enumerate(zip(size, dilate)):
        if n != d:
            taps *= min(int(n), lhs[lhs_labels.index(str(k))])
    return taps


def _flops(var: str, op: str, shape: str, args: str, rest: str, shapes: dict, comps: dict, cache: dict) -> float:
    """FLOPs of one HLO instruction: its convolutions and dots (XLA:TPU writes matmuls as convolutions), inside a
    fusion's computation too; cuDNN convolution and attention calls; Pallas splash attention (its q, k, v from the
    call's operand layouts: 4·q elements·kv length, the head dim as the kernel pads it). Other calls count 0."""
    names = re.findall(r"%[\w.\-]+", args)
    out = math.prod(_dims(shape)) if SHAPE.search(shape) else 0
    labels = re.search(r"dim_labels=(\w+)_(\w+)->", rest)
    if op == "fusion":
        callee = re.search(r"calls=(%[\w.\-]+)", rest).group(1)
        if callee not in cache:
            cache[callee], inner = 0.0, {}
            for line in comps.get(callee, ()):
                m = INSTRUCTION.match(line)
                if m:
                    inner[m.group(1)] = m.group(2)
                    cache[callee] += _flops(*m.group(1, 3, 2, 4, 5), inner, comps, cache)
        return cache[callee]
    if (op == "convolution" or (op == "custom-call" and "conv" in rest)) and labels and len(names) > 1:
        return 2.0 * out * _taps(_dims(shapes[names[0]]), _dims(shapes[names[1]]), *labels.groups(), rest)
    if op == "dot":
        lhs, contract = _dims(shapes[names[0]]), re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest).group(1)
        return 2.0 * out * math.prod(lhs[int(i)] for i in filter(None, contract.split(",")))
    if op == "custom-call" and "fmha" in rest:  # cuDNN: q, k (batch, length, heads, head dim)
        return 4.0 * math.prod(_dims(shapes[names[0]])) * _dims(shapes[names[1]])[1]
    if op == "custom-call" and "splash_mha" in var:  # Pallas: q, k, v (batch, heads, length, head dim) last
        q, k = SHAPE.findall(rest.split("operand_layout_constraints=")[-1])[-3:-1]
        return 4.0 * math.prod(int(d) for d in q[1].split(",")) * int(k[1].split(",")[-2])
    return 0.0


def _slicing(callee: str, comps: dict, cache: dict) -> tuple[dict, int | None]:
    """What a fused computation touches of its operands and result: {parameter number: bytes read} for a parameter
    read only through dynamic-slice (its slices) or only as the buffer a dynamic-update-slice updates in place (0),
    and the bytes written when its root is such an update (the update's), else None (all of it)."""
    key = ("slicing", callee)
    if key not in cache:
        defs, params, uses = {}, {}, collections.defaultdict(list)
        root = None
        for line in comps.get(callee, ()):
            m = INSTRUCTION.match(line)
            if not m:
                continue
            var, shape, op, args, _ = m.groups()
            names = re.findall(r"%[\w.\-]+", args)
            defs[var] = (op, names, _array_bytes(shape))
            if op == "parameter":
                params[var] = int(args)
            for i, x in enumerate(names):
                uses[x].append((op, i, _array_bytes(shape)))
            root = var if line.lstrip().startswith("ROOT") else root
        read = {}
        for var, number in params.items():
            if uses[var] and all(op == "dynamic-slice" and i == 0 for op, i, _ in uses[var]):
                read[number] = sum(n for _, _, n in uses[var])
            elif uses[var] and all(op == "dynamic-update-slice" and i == 0 for op, i, _ in uses[var]):
                read[number] = 0
        op, names, _ = defs.get(root, (None, [], 0))
        written = defs[names[1]][2] if op == "dynamic-update-slice" and names[1] in defs else None
        cache[key] = (read, written)
    return cache[key]


def _touched(op: str, args: str, rest: str, size: dict, result: int, comps: dict, cache: dict) -> int:
    """HBM bytes an instruction reads and writes: its operands and result, except that a dynamic slice reads its
    slice and a dynamic-update-slice (in place) writes and reads its update only, fused or not (a loop over frame
    chunks slices one buffer per iteration: counting the whole buffer would count it once per chunk)."""
    names = re.findall(r"%[\w.\-]+", args)
    operands = [size.get(x, 0) for x in names]
    if op == "dynamic-slice":
        return 2 * result
    if op == "dynamic-update-slice":
        return 2 * operands[1] + sum(operands[2:])
    if op != "fusion":
        return result + sum(operands)
    read, written = _slicing(re.search(r"calls=(%[\w.\-]+)", rest).group(1), comps, cache)
    return (result if written is None else min(result, written)) + sum(
        min(n, read.get(i, n)) for i, n in enumerate(operands))


def _async_slice_bytes(op: str, args: str, rest: str, size: dict, shapes: dict) -> int:
    """HBM bytes of XLA:TPU's asynchronous dynamic slice (the slice, `dynamic_slice_sizes` of its buffer, read
    where the buffer is in HBM) or dynamic update (the update written into its buffer in place, and read where it
    is in HBM)."""
    names = re.findall(r"%[\w.\-]+", args)
    kind, _ = SHAPE.search(shapes.get(names[0], "pred[]")).groups()
    if op == "dynamic-slice-start":
        sizes = re.search(r"dynamic_slice_sizes=\{([\d,]*)\}", rest)
        return BYTES[kind] * math.prod(int(d) for d in sizes.group(1).split(",")) if size.get(names[0]) else 0
    update = sum(BYTES[t] * math.prod(int(d) for d in filter(None, dims.split(",")))
                 for t, dims in SHAPE.findall(shapes.get(names[1], "")))
    return update * (bool(size.get(names[0])) + bool(size.get(names[1])))


def _named(line: str) -> tuple[str, str, str]:
    """(op, result shape, op_name) of an HLO instruction line, shortened for `--top`."""
    m, name = INSTRUCTION.match(line), re.search(r'op_name="([^"]*)"', line)
    return m.group(3), m.group(2)[:90], name.group(1)[-90:] if name else ""


def program_cost(hlo: str, steps: int, chip: str, kernels: list | None = None) -> dict:
    """HBM bytes, FLOPs, kernel time and collective bytes of one run of the program on one chip, read from its HLO.
    Each top-level instruction is a kernel: its bytes are its result and operands in HBM (not tuple plumbing; an
    async -start / -done pair once), its time max(FLOPs / peak, bytes / bandwidth) (`_flops`). A while loop's body
    counts times its trip count (`_trip_count`; the denoising loop's is data: `steps`), called computations once.
    Collective bytes are those of an op's results (an async -start op's second half). `kernels`: a list that gets
    (seconds over all runs, runs, op, result shape, op_name) per kernel (`--top`)."""
    comps, entry = _computations(hlo)
    tflops, bandwidth = PEAKS[chip][0] * 1e12, PEAKS[chip][1] * 1e9
    out = {"bytes": 0, "flops": 0.0, "kernel_s": 0.0, "collectives": collections.defaultdict(lambda: [0, 0]),
           "unknown_loops": 0}
    cache = {}

    def kernel(times: int, nbytes: int, flops: float, line: str = ""):
        out["bytes"] += times * nbytes
        out["flops"] += times * flops
        out["kernel_s"] += times * max(flops / tflops, nbytes / bandwidth)
        if kernels is not None and line:
            kernels.append((times * max(flops / tflops, nbytes / bandwidth), times) + _named(line))

    def walk(name: str, times: int):
        size, shapes, started = {}, {}, {}
        for line in comps[name]:
            m = INSTRUCTION.match(line)
            if not m:
                continue
            var, shape, op, args, rest = m.groups()
            size[var], shapes[var] = _array_bytes(shape), shape
            operands = sum(size.get(x, 0) for x in re.findall(r"%[\w.\-]+", args))
            if op == "while":
                trip = _trip_count(comps, rest)
                out["unknown_loops"] += trip is None
                walk(re.search(r"body=(%[\w.\-]+)", rest).group(1), times * (trip or steps))
            elif op in ("call", "conditional"):
                for callee in re.findall(r"(?:to_apply|branch_computations=\{|true_computation|false_computation)="
                                         r"?(%[\w.\-]+)", rest):
                    walk(callee, times)
            elif op in ("dynamic-slice-start", "dynamic-update-slice-start"):  # XLA:TPU's async (V)MEM copies
                started[var] = _async_slice_bytes(op, args, rest, size, shapes)
            elif op.endswith("-start"):  # an async op: its operands counted with its -done's result
                started[var] = operands
            elif op in ("dynamic-slice-done", "dynamic-update-slice-done"):
                kernel(times, started.get(args.strip(), 0), 0.0, line)
            elif op.endswith("-done"):
                kernel(times, size[var] + started.get(args.strip(), 0), 0.0, line)
            elif op not in PLUMBING:
                kernel(times, _touched(op, args, rest, size, size[var], comps, cache),
                       _flops(var, op, shape, args, rest, shapes, comps, cache), line)
            kind = op.removesuffix("-start")
            if kind in COLLECTIVES:
                arrays = SHAPE.findall(shape)
                arrays = arrays[len(arrays) // 2:] if op.endswith("-start") else arrays
                out["collectives"][kind][0] += times
                out["collectives"][kind][1] += times * sum(BYTES[t] * math.prod(
                    int(d) for d in filter(None, dims.split(","))) for t, dims in arrays)

    walk(entry, 1)
    out["collectives"] = {k: {"ops": n, "GB": round(b / 1e9, 3)} for k, (n, b) in sorted(out["collectives"].items())}
    return out


def estimate(chip: str, cost: dict, model_flops: float) -> dict:
    """Seconds for one run of the program on one chip (all chips run alike), from public peaks (PEAKS), not
    measured: `s_per_call` = the per-kernel roofline, sum over kernels of max(FLOPs / peak, HBM bytes / bandwidth)
    (`program_cost`), plus the collective bytes over the ICI bandwidth (all-reduce counted twice, as a ring moves
    it; not overlapped). Beside it the whole-program bounds: max(model FLOPs / peak, bytes / bandwidth) (perfect
    overlap, below) and their sum (none, above), each plus the collectives."""
    tflops, hbm, _, ici = PEAKS[chip]
    compute, memory = model_flops / (tflops * 1e12), cost["bytes"] / (hbm * 1e9)
    gb = sum(v["GB"] * (2 if k == "all-reduce" else 1) for k, v in cost["collectives"].items())
    comm = gb / ici if gb else 0.0
    return {"flop_s": round(compute, 3), "hbm_s": round(memory, 3), "collective_s": round(comm, 3),
            "s_per_call": round(cost["kernel_s"] + comm, 2), "s_per_call_lower": round(max(compute, memory) + comm, 2),
            "s_per_call_upper": round(compute + memory + comm, 2)}


class _Recording:
    """The denoise program, keeping the arguments it was compiled for (to count their FLOPs)."""

    def __init__(self, program):
        self.program, self.args = program, None

    def get(self, key, *args):
        self.args = args
        return self.program.get(key, *args)


def model_flops(animator) -> float:
    """Matmul and convolution FLOPs of one pass of the denoise program's loop body (all chips together), counted on
    its jaxpr with XLA attention (same math as the cuDNN / splash kernels, whose FLOPs a count cannot see)."""
    from pia_jax.models import attention
    from pia_jax.sampling.animator import _denoise_fn
    from pia_jax.training.metrics import count_flops
    settings, *args = animator._denoise.args
    saved = attention._cudnn_max_head_dim, attention._on_tpu
    attention._cudnn_max_head_dim, attention._on_tpu = (lambda: 0), (lambda: False)
    try:  # "auto" picks XLA attention (the CPU's choice) whatever the devices the program is traced for
        return count_flops(functools.partial(_denoise_fn, animator._parts, settings), *args)
    finally:
        attention._cudnn_max_head_dim, attention._on_tpu = saved


def _hopper():
    """What "auto" attention picks on a Hopper GPU; cuDNN's own check would ask a device that is not there."""
    import jax._src.cudnn.fused_attention_stablehlo as fused

    from pia_jax.models import attention
    attention._cudnn_max_head_dim = lambda: 256
    fused.check_compute_capability = lambda cc: True


def build_program(row: dict):
    """(animator, denoise executable, settings) for a row, the sampler's own layout and settings for its call."""
    from pia_jax.models import config
    from pia_jax.sampling import SampleOptions, schedulers
    devices, chip = _devices(row["target"], row["chips"])
    a = abstract_animator(config.MODELS[row["config"]], devices, donate=True)  # donated as on any accelerator
    a._denoise = _Recording(a._denoise)
    options = SampleOptions(steps=row["steps"])
    a._use_split(a.split_for(row["videos"], row["frames"], options))  # as plan_batch_size, for this call
    if row.get("program_mesh") == "split":  # a workaround, not what sample.py runs (TABLE)
        a._denoise.program.mesh = a._encode.mesh = a._decode.mesh = a._split
    per_batch = -(-row["videos"] // a.groups) * a.groups
    settings = a._settings(options, row["frames"])
    # Animator._schedule, without placing it on devices that are not here
    schedule = schedulers.make_schedule(options.scheduler, a.scheduler_config, options.steps, options.strength,
                                        length=a.scheduler_config.num_train_timesteps)
    if chip == "h100":
        _hopper()
    exe = a._compile(per_batch, row["size"], row["size"], row["frames"], settings, schedule).denoise
    return a, exe, settings, chip, per_batch


def _git(*args) -> str:
    return subprocess.run(("git", *args), capture_output=True, text=True, check=False,
                          cwd=Path(__file__).parents[1]).stdout.strip()


def snapshot() -> Path:
    """pia_jax as committed at HEAD, exported (git archive) to /tmp/pia_src/COMMIT: what the table compiles, so
    work in progress in this shared working tree is not measured."""
    commit = _git("rev-parse", "--short", "HEAD")
    where = Path("/tmp/pia_src") / commit
    if not (where / "pia_jax").exists():
        where.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(("git", "archive", "HEAD", "pia_jax"), capture_output=True, check=True,
                                 cwd=Path(__file__).parents[1]).stdout
        subprocess.run(("tar", "-x", "-C", str(where)), input=archive, check=True)
    return where


def _source() -> dict:
    """The code compiled: a snapshot of a commit, or this working tree (its commit, and the package's files changed
    beside it: another engineer's work in progress would be compiled too)."""
    import pia_jax
    where = Path(pia_jax.__file__).parents[1]
    if where.parent == Path("/tmp/pia_src"):
        return {"commit": where.name, "uncommitted": []}
    return {"commit": _git("rev-parse", "--short", "HEAD"),
            "uncommitted": sorted(line[3:] for line in _git("status", "--porcelain", "--", "pia_jax").splitlines())}


def recount_row(row: dict) -> float:
    """A row's model FLOPs (all chips, per call) from the traced program alone, nothing compiled: for rows whose
    count picked the TPU kernels (before model_flops forced XLA attention: splash's FLOPs are not seen)."""
    from pia_jax.sampling import SampleOptions, schedulers
    devices, _ = _devices(row["target"], row["chips"])
    from pia_jax.models import config
    a = abstract_animator(config.MODELS[row["config"]], devices, donate=True)
    a._denoise = _Recording(None)
    a._denoise.get = lambda key, *args: setattr(a._denoise, "args", args)
    options = SampleOptions(steps=row["steps"])
    a._use_split(a.split_for(row["videos"], row["frames"], options))
    schedule = schedulers.make_schedule(options.scheduler, a.scheduler_config, options.steps, options.strength,
                                        length=a.scheduler_config.num_train_timesteps)
    a._compile(-(-row["videos"] // a.groups) * a.groups, row["size"], row["size"], row["frames"],
               a._settings(options, row["frames"]), schedule)
    return round(model_flops(a) * row["steps"] / 1e12, 2)


def compile_row(row: dict, hlo_path: str | None = None) -> dict:
    import gzip
    import inspect

    import jax

    from pia_jax.sampling import animator
    if row.get("program_mesh") == "split" and "compiling_for(settings.split)" in inspect.getsource(animator):
        return dict(row, source=_source(), same_as="animator")  # the sampler traces for its split (9644dba)
    a, exe, settings, chip, per_batch = build_program(row)
    hlo = exe.as_text()
    if hlo_path:
        with gzip.open(hlo_path, "wt") as f:
            f.write(hlo)
    mem, cost = exe.memory_analysis(), exe.cost_analysis()
    cost = (cost[0] if isinstance(cost, list) else cost) or {}  # none from XLA:GPU without a device
    used = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
    gib = lambda n: round(n / 2**30, 2)
    w = settings.window
    result = dict(row, source=_source(), kind=a.mesh.devices.flat[0].device_kind, layout=dict(a._split.shape),
                  batch_videos=per_batch, context=None if w is None else {
                      "mode": settings.context_mode, "length": w.length, "stride": w.stride, "windows": len(w.frames),
                      "window_batch": settings.window_batch},
                  compile_s=round(a._denoise.program.seconds, 1), jax=jax.__version__,
                  per_chip_GiB={"argument": gib(mem.argument_size_in_bytes), "output": gib(mem.output_size_in_bytes),
                                "temp": gib(mem.temp_size_in_bytes), "alias": gib(mem.alias_size_in_bytes),
                                "total": gib(used), "hbm": PEAKS[chip][2]},
                  fits=bool(used <= (1 - HEADROOM) * PEAKS[chip][2] * 2**30),
                  model_tflop_total=round(model_flops(a) * row["steps"] / 1e12, 2),
                  xla_tflop_per_chip_loop_once=round(cost.get("flops", 0.0) / 1e12, 2))
    return score(result, hlo)


def score(result: dict, hlo: str) -> dict:
    """A row's HLO-read costs and estimate (`program_cost`, `estimate`), added to or replacing those in `result`."""
    chip = result["target"]
    if "model_tflop_total" not in result:  # rows compiled before it was kept divided by every chip
        result = dict(result, model_tflop_total=result["model_tflop_per_chip"] * result["chips"])
    used = math.prod(result["layout"].values())  # chips the split uses (the others idle)
    result = dict(result, chips_used=used, model_tflop_per_chip=round(result["model_tflop_total"] / used, 2))
    cost = program_cost(hlo, result["steps"], chip)
    est = estimate(chip, cost, result["model_tflop_per_chip"] * 1e12)
    return dict(result, hbm_GB_per_chip=round(cost["bytes"] / 1e9, 1),
                hlo_tflop_per_chip=round(cost["flops"] / 1e12, 2),
                loops_without_trip_count=cost["unknown_loops"], collectives=cost["collectives"],
                custom_calls=dict(collections.Counter(re.findall(r'custom_call_target="([^"]+)"', hlo))),
                estimate=dict(est, s_per_video=round(est["s_per_call"] / result["videos"], 2),
                              s_per_video_full_batch=round(est["s_per_call"] / result["batch_videos"], 2)))


def top(hlo_path: str, chip: str, n: int = 25):
    """The `n` kernels of a kept HLO that take longest by the roofline over a 25-step video, with their share."""
    import gzip
    with gzip.open(hlo_path, "rt") as f:
        hlo = f.read()
    kernels = []
    cost = program_cost(hlo, STEPS, chip, kernels)
    for seconds, runs, op, shape, name in sorted(kernels, reverse=True)[:n]:
        print(f"{seconds:8.3f} s {100 * seconds / cost['kernel_s']:5.1f} % x{runs:<7} {op:22} {shape:60} {name}")
    print(f"{cost['kernel_s']:8.3f} s in all (kernels; collectives apart)")


def _available_gb() -> float:
    with open("/proc/meminfo") as f:
        return int(next(line for line in f if line.startswith("MemAvailable")).split()[1]) / 2**20


def _hlo_path(row: dict, commit: str) -> Path:
    split = "-split" if row.get("program_mesh") == "split" else ""
    return HLO_DIR / f"{row['target']}x{row['chips']}{split}-{row['frames']}-{commit}.hlo.gz"


def _row_key(row: dict) -> str:
    """A row's identity (KEYS, BASE's values for keys older lines lack) as a string."""
    return json.dumps({k: row.get(k, BASE.get(k)) for k in KEYS}, sort_keys=True)


def run_table(out: Path, rows: list[dict], min_free_gb: float, stop_at: float | None, worktree: bool, fresh: bool):
    """Each row not yet in `out` (`fresh`: not yet compiled at this commit), one process at a time once enough host
    memory is free, compiling HEAD's snapshot (or, `worktree`, this working tree); a failed row is recorded with its
    error; a row still compiling at `stop_at` (epoch seconds) is killed and left for a later run."""
    src = {} if worktree else {"PYTHONPATH": str(snapshot())}
    commit = _git("rev-parse", "--short", "HEAD")
    done = {_row_key(r) for r in map(json.loads, out.open())
            if not fresh or r.get("source", {}).get("commit") == commit} if out.exists() else set()
    for i, row in enumerate(rows):
        key = _row_key(row)
        if key in done:
            continue
        while _available_gb() < min_free_gb and (stop_at is None or time.time() < stop_at):
            print(f"{_available_gb():.1f} GB available, waiting for {min_free_gb}", flush=True)
            time.sleep(60)
        if stop_at is not None and time.time() >= stop_at:
            return print("deadline reached", flush=True)
        print(f"compiling {key} ...", flush=True)
        env = dict(os.environ, JAX_SKIP_CUDA_CONSTRAINTS_CHECK="1", **src)
        hlo = _hlo_path(row, commit)  # kept for later analysis
        HLO_DIR.mkdir(exist_ok=True)
        try:
            proc = subprocess.run([sys.executable, __file__, "--row", key, "--hlo", str(hlo)], capture_output=True,
                                  check=False, text=True, env=env,
                                  timeout=None if stop_at is None else stop_at - time.time())
        except subprocess.TimeoutExpired:
            print(f"stopped at the deadline: {key}", flush=True)
            return
        errors = [line for line in proc.stderr.splitlines() if re.match(r"[\w.]+(Error|Exception)\b", line)]
        line = proc.stdout.strip().splitlines()[-1] if proc.returncode == 0 and proc.stdout.strip() else json.dumps(
            dict(row, source={"commit": commit, "uncommitted": []} if src else _source(),
                 error=(errors or proc.stderr.strip().splitlines() or ["no output"])[-1][:1000]))
        with out.open("a") as f:
            f.write(line + "\n")
        print(line, flush=True)


def rescore(out: Path):
    """Every row of `out` whose HLO is kept (HLO_DIR) scored again by this file's `score` (the program is not
    compiled again); `out` rewritten in place, rows without HLO kept as they are."""
    import gzip
    rows = []
    for r in map(json.loads, out.open()):
        hlo = _hlo_path(r, r.get("source", {}).get("commit", ""))
        if "error" not in r and "same_as" not in r and hlo.exists():
            with gzip.open(hlo, "rt") as f:
                r = score({k: v for k, v in r.items() if k != "estimate"}, f.read())
        rows.append(r)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))


def markdown(rows: list[dict]) -> str:
    """BENCHMARKS.md's table from result lines (failed rows with their error): the newest line of each row (KEYS),
    in TABLE's order, without the `split` workaround's where sample.py's own program compiled; the older lines stay
    in the JSON lines file."""
    newest = {_row_key(r): r for r in rows}
    order = [_row_key(r) for r in TABLE]
    rows = sorted(newest.values(), key=lambda r: order.index(_row_key(r)))
    where = lambda r: (r["target"], r["chips"], r["frames"])  # noqa: E731
    ran = {where(r) for r in rows if r.get("program_mesh") == "animator" and "error" not in r}
    rows = [r for r in rows if r.get("program_mesh") != "split" or where(r) not in ran]
    head = ("| target | chips: video x cfg x window (videos per call) | frames (windows) | commit | per-chip GiB: args "
            "+ temp = total (HBM) | fits | TFLOP/chip per call: model (HLO) | HBM GB/chip per call | collectives "
            "GB/chip per call | compile | est. s/video: per-kernel roofline (whole-program bounds) "
            "| est. s/video with every video of the call used |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in (r for r in rows if "same_as" not in r):
        commit = r.get("source", {}).get("commit", "-")
        if "error" in r:
            lines.append(f"| {r['target']} | {r['chips']} | {r['frames']} | {commit} | failed: {r['error'][:150]} |"
                         + " |" * 6)
            continue
        m, e, lay = r["per_chip_GiB"], r["estimate"], r["layout"]
        chips = f"{r['chips']}{'*' if r.get('program_mesh') == 'split' else ''}"
        windows = f" ({r['context']['windows']})" if r["context"] else ""
        coll = sum(v["GB"] for v in r["collectives"].values())
        lines.append(
            f"| {r['target']} | {chips}: {lay['video']} x {lay['cfg']} x {lay['window']} ({r['batch_videos']}) "
            f"| {r['frames']}{windows} | {commit} | {m['argument']} + {m['temp']} = {m['total']} ({m['hbm']:g}) "
            f"| {'yes' if r['fits'] else '**no**'} | {r['model_tflop_per_chip']:,.0f} ({r['hlo_tflop_per_chip']:,.0f}) "
            f"| {r['hbm_GB_per_chip']:,.0f} | {coll:,.1f} | {r['compile_s'] / 60:.1f} min "
            f"| **{e['s_per_video']}** ({e['s_per_call_lower']}-{e['s_per_call_upper']}) "
            f"| {e['s_per_video_full_batch']} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="h100", choices=("h100", "v5e", "v6e"))
    p.add_argument("--chips", type=int, choices=(1, 8), help="chips (default 1); with --table: rows of this many")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--size", type=int, default=BASE["size"], help="pixels (height = width)")
    p.add_argument("--config", default=BASE["config"], help="pia_jax.models.config.MODELS: sd15, tiny")
    p.add_argument("--hlo", help="write the compiled HLO here (gzip)")
    p.add_argument("--row", help=argparse.SUPPRESS)
    p.add_argument("--recount", help=argparse.SUPPRESS)
    p.add_argument("--table", action="store_true", help="compile every row of TABLE not yet in --out")
    p.add_argument("--only", help="with --table: rows of this target only (h100, v5e, v6e)")
    p.add_argument("--min-free-gb", type=float, default=13.0, help="host memory available before a row starts")
    p.add_argument("--stop-at", help="with --table: UTC time HH:MM today to kill a row still compiling and stop")
    p.add_argument("--fresh", action="store_true", help="with --table: rows compiled at another commit count as "
                   "not done (compiled again, both lines kept)")
    p.add_argument("--worktree", action="store_true", help="with --table: compile this working tree, not HEAD's "
                   "snapshot")
    p.add_argument("--out", default="bench/sample_aot.jsonl")
    p.add_argument("--top", metavar="HLO", help="list the longest kernels of a kept HLO (HLO_DIR) for --target")
    p.add_argument("--rescore", action="store_true", help="score the rows in --out again from their kept HLO")
    p.add_argument("--markdown", action="store_true", help="print the results in --out as BENCHMARKS.md's table")
    a = p.parse_args()
    if a.rescore:
        return rescore(Path(a.out))
    if a.top:
        return top(a.top, a.target or "v6e")
    if a.markdown:
        return print(markdown([json.loads(line) for line in Path(a.out).open()]))
    if a.table:
        stop = None
        if a.stop_at:
            now, (hh, mm) = time.gmtime(), map(int, a.stop_at.split(":"))
            stop = time.time() + (hh * 3600 + mm * 60) - (now.tm_hour * 3600 + now.tm_min * 60 + now.tm_sec)
        rows = [r for r in TABLE if a.only in (None, r["target"]) and a.chips in (None, r["chips"])]
        return run_table(Path(a.out), rows, a.min_free_gb, stop, a.worktree, a.fresh)
    if a.recount:
        return print(json.dumps({"model_tflop_total": recount_row(json.loads(a.recount))}), flush=True)
    row = json.loads(a.row) if a.row else dict(BASE, target=a.target, chips=a.chips or 1, frames=a.frames, size=a.size,
                                                config=a.config)
    print(json.dumps(compile_row(row, a.hlo)), flush=True)


if __name__ == "__main__":
    main()
