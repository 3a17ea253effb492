"""Where a profiled program's device time goes: a jax.profiler perfetto trace (perfetto_trace.json.gz) summarised
as the top kernels by total time and totals by kind of kernel.

    python -m bench.trace_summary OUT/profile.trace.json.gz [--steps 3]   # the summary as one JSON line

On a GPU the kernels are the events on the device's stream lines ("Stream #N(...)" of process "/device:GPU:0");
the trace's derived lines (XLA Ops, XLA Modules, Steps, ...) repeat the same time and are left out. A trace with no
device process (CPU: XLA runs on host threads) is summarised from its host events instead, which nest, so their
times overlap: `source` says which. Kinds come from the kernel's name and its HLO op (the `hlo_op` argument): the
names cuDNN, cuBLAS(Lt) and XLA give their kernels on Hopper, so a kernel no pattern matches counts as "other
fusions" and the top list shows it by name.
"""

import argparse
import collections
import gzip
import json
import re
import sys

# checked in this order: cuDNN's fused attention before its convolutions, convolutions before GEMMs (cuDNN's
# implicit-GEMM convolutions have "gemm" in their names); "convert" (dtype conversion fusions) is no convolution
KINDS = (("attention", re.compile(r"sdpa|fmha|flash|attention|mha_", re.IGNORECASE)),
         ("convolution", re.compile(r"conv(?!ert)|fprop|dgrad|wgrad|implicit|cudnn", re.IGNORECASE)),
         ("gemm", re.compile(r"gemm|nvjet|cublas|matmul|cutlass|xmma|wgmma|dot", re.IGNORECASE)),
         ("copy_transpose", re.compile(r"copy|transpose|memcpy|memset", re.IGNORECASE)),
         ("reduction", re.compile(r"reduce|reduction", re.IGNORECASE)))
DERIVED_LINES = re.compile(r"XLA Ops|XLA Modules|Steps|Framework|Source|TensorFlow|Launch", re.IGNORECASE)


def kind(name: str, hlo_op: str = "") -> str:
    """The kind of a kernel, from its name, else from its HLO op's name; 'other_fusion' when neither says."""
    for text in (name, hlo_op):
        for label, pattern in KINDS:
            if text and pattern.search(text):
                return label
    return "other_fusion"


def kernel_events(trace: dict) -> tuple[list[dict], str, list[str]]:
    """(the kernel events, 'device' or 'host', the names of the lines they come from)."""
    events = trace.get("traceEvents", [])
    processes, threads = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            processes[e["pid"]] = e["args"]["name"]
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[(e["pid"], e.get("tid"))] = e["args"]["name"]
    spans = [e for e in events if e.get("ph") == "X" and "dur" in e]
    device = {pid for pid, name in processes.items() if name.startswith("/device:")}
    on_device = [e for e in spans if e["pid"] in device]
    if not on_device:
        return spans, "host", sorted({threads.get((e["pid"], e.get("tid")), "?") for e in spans})
    def line(e):
        return threads.get((e["pid"], e.get("tid")), "")
    streams = [e for e in on_device if line(e).startswith("Stream")]
    chosen = streams or [e for e in on_device if not DERIVED_LINES.search(line(e))]
    return chosen, "device", sorted({line(e) for e in chosen})


def summarize(trace: dict, steps: int, top: int = 25) -> dict:
    """The summary (times in ms; per step = total / `steps`)."""
    events, source, lines = kernel_events(trace)
    by_name = collections.defaultdict(lambda: [0, 0.0, ""])  # name -> [count, total us, an HLO op]
    for e in events:
        entry = by_name[e["name"]]
        entry[0] += 1
        entry[1] += e["dur"]
        entry[2] = entry[2] or str((e.get("args") or {}).get("hlo_op", ""))
    def label(name, op):  # host events with no HLO op are the runtime's own (dispatch, waiting), not kernels
        return kind(name, op) if source == "device" or op else "host_runtime"
    kinds = collections.defaultdict(lambda: [0, 0.0])
    for name, (count, us, op) in by_name.items():
        kinds[label(name, op)][0] += count
        kinds[label(name, op)][1] += us
    total = sum(us for _, us, _ in by_name.values())
    ranked = sorted(by_name.items(), key=lambda item: -item[1][1])[:top]
    span = (max(e["ts"] + e["dur"] for e in events) - min(e["ts"] for e in events)) if events else 0.0
    def ms(us):
        return round(us / 1e3, 3)
    return {"source": source, "lines": lines[:8], "steps": steps, "kernels": len(events),
            "kernels_per_step": round(len(events) / steps, 1), "busy_ms_per_step": ms(total / steps),
            "span_ms_per_step": ms(span / steps),
            "by_kind_ms_per_step": {k: {"n": round(n / steps, 1), "ms": ms(us / steps), "share": round(us / total, 3)}
                                    for k, (n, us) in sorted(kinds.items(), key=lambda item: -item[1][1])},
            "top": [{"name": name[:120], "hlo_op": op[:60], "kind": label(name, op), "count": count,
                     "ms_total": ms(us), "share": round(us / total, 4)} for name, (count, us, op) in ranked]}


def load(path) -> dict:
    with gzip.open(path, "rt") as f:
        return json.load(f)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("trace", help="a perfetto_trace.json.gz (or the .trace.json.gz beside it)")
    p.add_argument("--steps", type=int, default=3, help="how many steps the trace holds (per-step figures)")
    p.add_argument("--top", type=int, default=25)
    a = p.parse_args(argv)
    print(json.dumps(summarize(load(a.trace), a.steps, a.top)))


if __name__ == "__main__":
    sys.exit(main())
