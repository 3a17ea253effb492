"""Serves the web UI on one model, or on a folder of model directories (a picker lists them):

  python -m pia_jax.app --model models/toy                      # http://127.0.0.1:7860
  python -m pia_jax.app --model models/ --host 0.0.0.0 --port 8000

Each request's videos, inputs and parameters go to <--out>/<NNNN>/ (never over an earlier result). The model is
checked and loaded before the page opens; its compiled programs are reused across requests and kept in the
persistent compilation cache, as sample.py's are.
"""

import argparse
import os
import sys
from pathlib import Path


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a converted model directory, or a folder of them")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="also serve through a public Gradio share link")
    p.add_argument("--out", default="outputs/app", help="folder of the requests' folders")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                   help="compute dtype (auto: bf16 on GPU/TPU, fp32 on CPU)")
    p.add_argument("--compile-cache", default="default", metavar="DIR|off",
                   help="persistent compilation cache folder (as sample.py's; 'off' disables it)")
    return p


def find_models(path) -> dict:
    """{name: model directory}: `path` itself if it holds a config.json, else its sub-folders that do."""
    path = Path(path)
    if (path / "config.json").is_file():
        return {path.name: path}
    found = {p.name: p for p in sorted(path.iterdir()) if (p / "config.json").is_file()} if path.is_dir() else {}
    if not found:
        raise ValueError(f"{path} is neither a model directory (with config.json) nor a folder of them")
    return found


def check(a) -> dict:
    """Every check before anything is loaded -> {name: model directory}."""
    models = find_models(a.model)
    from pia_jax.weights import model_dir
    for path in models.values():
        model_dir.check_model_dir(path)
    out = Path(a.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder")
    from pia_jax.sampling import compile_cache
    compile_cache.check(a.compile_cache)
    return models


def main(argv=None) -> int:
    from pia_jax import quiet
    quiet.command_line()  # before jax loads; a command line may change the process's logging, the library does not
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    a = build_parser().parse_args(argv)
    try:
        models = check(a)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from pia_jax.app.runner import Runner
    from pia_jax.app.ui import build
    runner = Runner(models, a.out, a.dtype, a.compile_cache)
    print(f"loading {runner.model_dir}", file=sys.stderr, flush=True)
    runner.load()  # before the page opens: a request then only compiles, once per shape
    Path(a.out).mkdir(parents=True, exist_ok=True)
    demo = build(runner)
    demo.queue(default_concurrency_limit=1)
    demo.launch(server_name=a.host, server_port=a.port, share=a.share, allowed_paths=[str(Path(a.out).resolve())],
                footer_links=["api"], show_error=True)  # an unexpected error's message (no traceback) in the page
    return 0


if __name__ == "__main__":
    sys.exit(main())
