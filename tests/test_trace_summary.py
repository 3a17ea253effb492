"""bench/trace_summary.py (the `profile` part of bench/gpu.py) on hand-made perfetto traces: which events count as
kernels, their kinds, and the per-step figures, computed by hand below. Kernel names are of the forms cuDNN, cuBLASLt
and XLA give on Hopper (a GPU's real trace is checked only where a GPU session runs bench/gpu.py)."""

import gzip
import json

from bench import trace_summary


def meta(pid, name, tid=None):
    kind = "thread_name" if tid is not None else "process_name"
    return {"ph": "M", "pid": pid, "tid": tid, "name": kind, "args": {"name": name}}


def span(pid, tid, name, ts, dur, **args):
    return {"ph": "X", "pid": pid, "tid": tid, "name": name, "ts": ts, "dur": dur, "args": args}


GPU_TRACE = {"traceEvents": [
    meta(1, "/device:GPU:0"), meta(1, "Stream #7(Compute)", 7), meta(1, "XLA Ops", 8), meta(2, "/host:CPU"),
    meta(2, "python", 3),
    span(1, 7, "sm90_xmma_fprop_implicit_gemm_bf16bf16_nhwc", 0, 100, hlo_op="custom-call.1"),
    span(1, 7, "sm90_xmma_fprop_implicit_gemm_bf16bf16_nhwc", 100, 100, hlo_op="custom-call.2"),
    span(1, 7, "nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NTN", 200, 50),
    span(1, 7, "cudnn_generated_fort_native_sdpa_sm90_flash_fprop", 250, 30),  # cuDNN, but attention
    span(1, 7, "loop_convert_fusion_3", 280, 10),  # a dtype conversion, no convolution
    span(1, 7, "input_reduce_fusion_2", 290, 4),
    span(1, 7, "wrapped_transpose_5", 294, 6),
    span(1, 8, "fusion.1", 0, 300),  # the derived XLA Ops line repeats the kernels' time: not counted
    span(2, 3, "PjitFunction(cfg_step)", 0, 1000),  # host: not counted when there are device kernels
]}


def test_device_kernels_kinds_and_per_step_figures():
    s = trace_summary.summarize(GPU_TRACE, steps=2)
    assert (s["source"], s["lines"], s["kernels"]) == ("device", ["Stream #7(Compute)"], 7)
    assert s["busy_ms_per_step"] == 0.15 and s["span_ms_per_step"] == 0.15  # 300 us of kernels over 2 steps
    by_kind = {k: (v["n"], v["ms"]) for k, v in s["by_kind_ms_per_step"].items()}
    assert by_kind == {"convolution": (1, 0.1), "gemm": (0.5, 0.025), "attention": (0.5, 0.015),
                       "other_fusion": (0.5, 0.005), "copy_transpose": (0.5, 0.003), "reduction": (0.5, 0.002)}
    assert next(iter(s["by_kind_ms_per_step"])) == "convolution"  # largest first
    first = s["top"][0]
    assert (first["kind"], first["count"], first["ms_total"], first["share"]) == ("convolution", 2, 0.2, 0.6667)


def test_host_only_trace_still_summarised(tmp_path):
    """A CPU trace has no device process: its host events are summarised, those without an HLO op as the runtime's."""
    trace = {"traceEvents": [meta(5, "/host:CPU"), meta(5, "tf_XLAEigen", 9),
                             span(5, 9, "convolution.3", 0, 40, hlo_op="convolution.3"),
                             span(5, 9, "ThunkExecutor::Execute", 0, 60)]}
    path = tmp_path / "t.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump(trace, f)
    s = trace_summary.summarize(trace_summary.load(path), steps=1)
    assert s["source"] == "host" and s["kernels"] == 2
    assert {k: v["ms"] for k, v in s["by_kind_ms_per_step"].items()} == {"host_runtime": 0.06, "convolution": 0.04}
