"""The PIA training step compiled for real TPU slices on a machine without a TPU (libtpu only): per-chip memory
against the chip's HBM, FLOPs, HBM bytes and collective bytes by kind, compile time, and a roofline estimate of the
step time and clips/s. Nothing runs, so no time is measured: the step time is an ESTIMATE (see `estimate`).

    python3.12 -m venv v && . v/bin/activate && pip install "jax==0.11.2" libtpu flax optax safetensors ml_dtypes \
        transformers pillow pyyaml && pip install --no-deps -e .
    python bench/tpu_aot.py --topology v5p:4x4x4 --fsdp 4             # one row, printed as a JSON line
    python bench/tpu_aot.py --table --out bench/tpu_aot.jsonl          # the BENCHMARKS.md table (hours on 2 cores)

`--table` runs each row of TABLE in its own process (a row holds ~11 GB of host memory while XLA:TPU compiles the
SD1.5 step) and appends its JSON line to --out; rows already there are skipped, so a stopped table resumes. The step
is train.py's own (`Trainer` over `state.abstract_setup`: the real shardings, optimizer and "auto" attention, which
takes Pallas splash attention inside shard_map at >= 1024 tokens). One libtpu process may run at a time unless
ALLOW_MULTIPLE_LIBTPU_LOAD=1.
"""

import argparse
import collections
import gzip
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

# Public per-chip peaks (bf16 dense TFLOP/s, HBM GB/s, HBM GiB, ICI GB/s: the vendor's per-chip interconnect
# bandwidth in Gbit/s / 8). Assumptions of the estimate, not measurements.
CHIPS = {"v5p": (459.0, 2765.0, 95.0, 600.0), "v5e": (197.0, 819.0, 16.0, 200.0),
         "v6e": (918.0, 1640.0, 32.0, 448.0), "v4": (275.0, 1200.0, 32.0, 300.0)}
HEADROOM = 0.10  # a config fits when arguments + temporaries stay under 90 % of HBM

# libtpu flags that make the weight all-gathers asynchronous and overlap them with compute; a row with
# flags="overlap" compiles with them in LIBTPU_INIT_ARGS. (MaxText's v5e set, with async collective fusion, is
# refused for v5p by libtpu 0.0.52: "not supported/recommended on platforms other than TPU v5e".)
FLAGS = {None: "", "overlap": " ".join((
    "--xla_enable_async_all_gather=true", "--xla_enable_async_all_reduce=true",
    "--xla_tpu_overlap_compute_collective_tc=true"))}

# The table, in the order it runs: SD1.5, 16 frames at 256² (the recipe), 4 clips per chip unless said, on four
# slices (v5p-128, v6e-256, v5e-256, v5p-1024), then 512² and the variants (overlap flags, fsdp size, remat).
BASE = dict(config="sd15", frames=16, size=256, clips_per_chip=4, accum=1, fsdp=1, remat=None, attention="auto",
            flags=None)
TABLE = [
    dict(BASE, topology="v5p:4x4x4"),
    dict(BASE, topology="v5p:4x4x4", fsdp=4),
    dict(BASE, topology="v6e:16x16", fsdp=4, clips_per_chip=2),
    dict(BASE, topology="v5e:16x16", fsdp=8, clips_per_chip=1),
    dict(BASE, topology="v5p:8x8x8", fsdp=4),
    dict(BASE, topology="v5p:4x4x4", fsdp=4, size=512, clips_per_chip=1),
    dict(BASE, topology="v5p:4x4x4", fsdp=4, flags="overlap"),
    dict(BASE, topology="v5p:4x4x4", fsdp=8),
    dict(BASE, topology="v5p:4x4x4", fsdp=4, remat="dots_saveable"),
    dict(BASE, topology="v6e:16x16", fsdp=4, remat="dots_saveable"),
]
KEYS = tuple(BASE) + ("topology",)
COLLECTIVE = re.compile(r"^\s*(?:ROOT )?%\S+ = (.*?) (all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)"
                        r"(-start)?\(", re.M)
SHAPE = re.compile(r"(pred|s8|u8|s16|u16|s32|u32|bf16|f16|f32|s64|u64|f64)\[([\d,]*)\]")
BYTES = dict(pred=1, s8=1, u8=1, s16=2, u16=2, bf16=2, f16=2, s32=4, u32=4, f32=4, s64=8, u64=8, f64=8)


def collective_bytes(hlo: str) -> dict:
    """{kind: {ops, GB, dtypes}} over the program's collectives; an op's bytes are those of its results (a combined
    op returns a tuple of arrays: their sum; an async `-start` op returns (operands, results): the second half),
    i.e. the gathered weights, the reduced gradients. Ops in a loop body count once (the table's rows have no loop)."""
    out = collections.defaultdict(lambda: [0, 0, set()])
    for m in COLLECTIVE.finditer(hlo):
        arrays = SHAPE.findall(m.group(1))
        arrays = arrays[len(arrays) // 2:] if m.group(3) else arrays
        row = out[m.group(2)]
        row[0] += 1
        row[1] += sum(BYTES[t] * _prod(dims) for t, dims in arrays)
        row[2] |= {t for t, _ in arrays}
    return {k: {"ops": n, "GB": round(b / 1e9, 3), "dtypes": sorted(d)} for k, (n, b, d) in sorted(out.items())}


PLUMBING = ("get-tuple-element", "tuple", "bitcast", "parameter", "constant")


def hlo_bytes(hlo: str) -> float:
    """HBM bytes of one step read from the program: over the entry computation's instructions (fusions, copies,
    custom calls, collectives; not tuple plumbing), the bytes of each result and operand. XLA's own
    cost_analysis()["bytes accessed"] agrees within 3 % for a plain program (v5p fsdp 4: 451 against 465 GB) but
    counts a shard_map program's ~4x (the data-parallel step: 1,488 against 326 GB), so the estimate uses this."""
    entry = hlo[hlo.index("\nENTRY "):]
    entry = entry[:entry.index("\n}\n")]
    size, total = {}, 0
    for m in re.finditer(r"^\s*(?:ROOT )?(%[\w.\-]+) = (.*?) ([\w\-]+)\((.*?)\)(?:, |$)", entry, re.M):
        name, shape, op, args = m.groups()
        size[name] = sum(BYTES[t] * _prod(d) for t, d in SHAPE.findall(shape))
        if op not in PLUMBING:
            total += size[name] + sum(size.get(a, 0) for a in re.findall(r"%[\w.\-]+", args))
    return total


def _prod(dims: str) -> int:
    n = 1
    for d in filter(None, dims.split(",")):
        n *= int(d)
    return n


def estimate(chip: str, model_flops: float, hbm_bytes: float, collectives: dict, clips: int) -> dict:
    """Step time as max(model FLOPs / peak, HBM bytes / bandwidth) plus the collective bytes over the ICI bandwidth
    (all-reduce counted twice, as a ring moves it; no overlap with compute assumed): an estimate from public peaks,
    not a measurement. HBM bytes: `hlo_bytes` (whole operands; a Pallas kernel's own traffic counts as its operands
    and results); FLOPs: the model's, counted on the jaxpr (XLA's count misses the Pallas kernels)."""
    tflops, hbm, _, ici = CHIPS[chip]
    compute = max(model_flops / (tflops * 1e12), hbm_bytes / (hbm * 1e9))
    comm = sum(v["GB"] * (2 if k == "all-reduce" else 1) for k, v in collectives.items()) / ici
    step = compute + comm
    return {"compute_s": round(compute, 4), "collective_s": round(comm, 4), "step_s": round(step, 4),
            "clips_per_s_per_chip": round(clips / step, 2)}


def compile_row(row: dict, hlo_path: str | None = None) -> dict:
    import jax
    from jax.experimental import topologies

    from pia_jax.sharding import make_mesh
    from pia_jax.training import state as state_lib
    from pia_jax.training import step as step_lib
    from pia_jax.training.config import ModelConfig, OptimConfig

    topo = topologies.get_topology_desc(platform="tpu", topology_name=row["topology"])
    chips, chip = len(topo.devices), row["topology"].split(":")[0]
    mesh = make_mesh(fsdp=row["fsdp"], devices=topo.devices)
    setup = state_lib.abstract_setup(ModelConfig(init=row["config"], remat_policy=row["remat"],
                                                 attention=row["attention"]))
    trainer = step_lib.Trainer(setup, state_lib.make_optimizer(OptimConfig()), mesh)
    clips = row["clips_per_chip"] * chips
    batch = trainer.batch_shapes(row["accum"], clips, row["frames"], row["size"])
    start = time.perf_counter()
    compiled = trainer.lower(trainer.abstract_state(), batch).compile()
    compile_s = time.perf_counter() - start
    hlo = compiled.as_text()
    if hlo_path:  # plain text, or gzip for a name ending in .gz
        (gzip.open if hlo_path.endswith(".gz") else open)(hlo_path, "wt").write(hlo)
    mem, cost = compiled.memory_analysis(), compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    used = mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
    hbm = CHIPS[chip][2] * 2**30
    flops_chip = trainer.count_flops(batch) / chips
    collectives = collective_bytes(hlo)
    hbm_bytes = hlo_bytes(hlo)
    est = estimate(chip, flops_chip, hbm_bytes, collectives, row["clips_per_chip"] * row["accum"])
    gib = lambda n: round(n / 2**30, 2)  # noqa: E731
    return dict(row, chips=chips, hosts=len({d.process_index for d in topo.devices}), kind=topo.devices[0].device_kind,
                mesh=dict(mesh.shape), compile_s=round(compile_s, 1), jax=jax.__version__,
                per_chip_GiB=dict(argument=gib(mem.argument_size_in_bytes), temp=gib(mem.temp_size_in_bytes),
                                  output=gib(mem.output_size_in_bytes), alias=gib(mem.alias_size_in_bytes),
                                  total=gib(used), hbm=CHIPS[chip][2]),
                fits=bool(used <= (1 - HEADROOM) * hbm), model_tflop_per_chip=round(flops_chip / 1e12, 2),
                xla_tflop_per_chip=round(cost.get("flops", 0.0) / 1e12, 2),
                hbm_GB_per_chip=round(hbm_bytes / 1e9, 1),
                xla_bytes_accessed_GB=round(cost.get("bytes accessed", 0.0) / 1e9, 1), collectives=collectives,
                custom_calls=dict(collections.Counter(re.findall(r'custom_call_target="([^"]+)"', hlo))),
                estimate=dict(est, clips_per_s_per_slice=round(est["clips_per_s_per_chip"] * chips, 1)))


def run_table(out: Path, rows: list[dict]):
    """Each row not yet in `out`, in a fresh process; a failed row is recorded with its error and not retried."""
    done = {json.dumps({k: r[k] for k in KEYS}, sort_keys=True) for r in map(json.loads, out.open())} \
        if out.exists() else set()
    for row in rows:
        key = json.dumps({k: row[k] for k in KEYS}, sort_keys=True)
        if key in done:
            continue
        print(f"compiling {key} ...", flush=True)
        env = dict(os.environ, LIBTPU_INIT_ARGS=(os.environ.get("LIBTPU_INIT_ARGS", "") + " " + FLAGS[row["flags"]]))
        hlo = out.with_name(f"{out.stem}-row{rows.index(row)}.hlo.gz")  # kept for later analysis
        proc = subprocess.run([sys.executable, __file__, "--row", key, "--hlo", str(hlo)], capture_output=True,
                              text=True, env=env)
        line = proc.stdout.strip().splitlines()[-1] if proc.returncode == 0 and proc.stdout.strip() else json.dumps(
            dict(row, error=(proc.stderr.strip().splitlines() or ["no output"])[-1][:500]))
        with out.open("a") as f:
            f.write(line + "\n")
        print(line, flush=True)


def markdown(rows: list[dict]) -> str:
    """The table of BENCHMARKS.md from result lines (rows that failed are listed with their error)."""
    head = ("| slice (chips) | image, clips/chip | mesh | remat, flags, notes | per-chip GiB: args + temp = total (HBM) "
            "| fits (>= 10 % free) | model TFLOP/chip | HBM GB/chip: HLO (XLA) | collectives GB/chip: gather / reduce "
            "| compile | est. step s | est. clips/s per chip / per slice |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        slice_ = f"{r['topology']} ({r.get('chips', '?')})"
        what = f"{r['size']}², {r['clips_per_chip']}"
        knobs = " / ".join(str(x) for x in (r["remat"], r["flags"]) if x) or "-"
        if "error" in r:
            lines.append(f"| {slice_} | {what} | fsdp {r['fsdp']} | {knobs} | failed: {r['error'][:120]} |"
                         + " |" * 7)
            continue
        m, c, e = r["per_chip_GiB"], r["collectives"], r["estimate"]
        gb = lambda kind: c.get(kind, {}).get("GB", 0)  # noqa: E731
        if "bf16" in c.get("all-reduce", {}).get("dtypes", ["bf16"]):  # compiled before step.data_parallel
            knobs = "bf16 reduce" if knobs == "-" else knobs + ", bf16 reduce"
        lines.append(
            f"| {slice_} | {what} | data {r['mesh']['data']} x fsdp {r['mesh']['fsdp']} | {knobs} "
            f"| {m['argument']} + {m['temp']} = {m['total']} ({m['hbm']:g}) | {'yes' if r['fits'] else '**no**'} "
            f"| {r['model_tflop_per_chip']} | {r['hbm_GB_per_chip']} ({r.get('xla_bytes_accessed_GB', '-')}) "
            f"| {gb('all-gather'):.2f} / "
            f"{gb('all-reduce') + gb('reduce-scatter'):.2f} | {r['compile_s'] / 60:.0f} min | {e['step_s']} "
            f"| {e['clips_per_s_per_chip']} / {e['clips_per_s_per_slice']:g} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--topology", default="v5p:2x2x2", help="a libtpu topology name, e.g. v5p:4x4x4, v6e:16x16")
    p.add_argument("--config", default=BASE["config"], help="pia_jax.models.config model: sd15, tiny")
    p.add_argument("--frames", type=int, default=BASE["frames"])
    p.add_argument("--size", type=int, default=BASE["size"])
    p.add_argument("--clips-per-chip", type=int, default=BASE["clips_per_chip"])
    p.add_argument("--accum", type=int, default=BASE["accum"], help="micro-batches per step")
    p.add_argument("--fsdp", type=int, default=BASE["fsdp"])
    p.add_argument("--remat", default=None, help="a remat policy (pia_jax.models.unet.REMAT_POLICIES)")
    p.add_argument("--attention", default=BASE["attention"])
    p.add_argument("--flags", choices=[k for k in FLAGS if k], help="libtpu flags (FLAGS) to compile with")
    p.add_argument("--hlo", help="write the compiled HLO text here")
    p.add_argument("--row", help=argparse.SUPPRESS)
    p.add_argument("--table", action="store_true", help="compile every row of TABLE not yet in --out")
    p.add_argument("--out", default="bench/tpu_aot.jsonl")
    p.add_argument("--markdown", action="store_true", help="print the results in --out as BENCHMARKS.md's table")
    a = p.parse_args()
    if a.markdown:
        return print(markdown([json.loads(line) for line in Path(a.out).open()]))
    if a.table:
        return run_table(Path(a.out), TABLE)
    row = json.loads(a.row) if a.row else dict(
        config=a.config, frames=a.frames, size=a.size, clips_per_chip=a.clips_per_chip, accum=a.accum, fsdp=a.fsdp,
        remat=a.remat, attention=a.attention, flags=a.flags, topology=a.topology)
    if row["flags"] and not a.row:  # libtpu reads its flags when it loads: a fresh process
        os.execve(sys.executable, [sys.executable, __file__, "--row", json.dumps(row)] + (["--hlo", a.hlo] if a.hlo
                  else []), dict(os.environ, LIBTPU_INIT_ARGS=FLAGS[row["flags"]]))
    print(json.dumps(compile_row(row, a.hlo)), flush=True)


if __name__ == "__main__":
    main()
