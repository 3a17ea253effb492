"""Reading compiled XLA programs (`compiled.as_text()`) in tests."""

import re

import jax

_DTYPES = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}


def weight_shapes(tree) -> set:
    """{(HLO dtype, shape)} of the matrices and kernels in a pytree of weights."""
    return {(_DTYPES.get(str(x.dtype), str(x.dtype)), tuple(x.shape)) for x in jax.tree.leaves(tree) if x.ndim >= 2}


def _hlo_computations(text: str) -> dict:
    """{name: body text} of an HLO module's computations."""
    out, name = {}, None
    for line in text.splitlines():
        if line and not line.startswith(" ") and "{" in line and not line.startswith("HloModule"):
            name = line.split()[1] if line.startswith("ENTRY") else line.split()[0]
            out[name.lstrip("%")] = []
        elif name is not None:
            out[name.lstrip("%")].append(line)
    return {k: "\n".join(v) for k, v in out.items()}


FREE = {"parameter", "get-tuple-element", "tuple", "bitcast"}  # no data moves


def weight_work_in_loop_body(hlo: str, weight_shapes: set) -> list:
    """The instructions of a while loop's body (nested loops included) that compute an array of a weight's shape:
    a transpose, copy, dtype convert or fusion of a weight, i.e. work on loop-invariant weights (such as the
    re-layout of convolution kernels for cuDNN) that would run every step instead of once before the loop.
    Re-indexing folded into a consumer (a dot reading a transposed operand) is free and not counted."""
    comps = _hlo_computations(hlo)
    seen, todo = set(), re.findall(r"body=%?([\w.\-]+)", hlo)
    while todo:
        name = todo.pop()
        if name in seen or name not in comps:
            continue
        seen.add(name)
        todo += re.findall(r"body=%?([\w.\-]+)", comps[name])
    found = []
    for name in seen:
        for line in comps[name].splitlines():
            m = re.match(r"\s*(?:ROOT )?%[\w.\-]+ = (\w+)\[([\d,]*)\](?:\{[^}]*\})? ([\w\-]+)\(", line)
            if m and m.group(3) not in FREE and \
                    (m.group(1), tuple(int(d) for d in m.group(2).split(",") if d)) in weight_shapes:
                found.append(line.strip())
    return found
