"""convert_torch_weights.py on the full SD1.5 + PIA architecture: wall time and peak host memory per conversion.

    python -m bench.convert --workdir /tmp/pia-convert-bench

Writes random-weight inputs once (kept in --workdir for reruns), in the formats users download:
  folder:  a diffusers SD1.5 folder (fp32 safetensors, as stable-diffusion-v1-5) + pia.ckpt (fp32 torch pickle)
  civitai: a single-file LDM .safetensors (fp16, as civitai DreamBooth models) + pia.ckpt + a kohya LoRA (rank 32 on
           every UNet attention/feed-forward linear and the CLIP linears, fp16)
then converts each (fp32 output) in a fresh child process and reports its wall time and peak resident memory
(the resident-set high-water mark, which includes the interpreter with jax/torch imported, also reported) against the
size of the model in fp32.
"""

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

GiB = 1 << 30


def peak_rss_gib() -> float:
    """This process's resident-memory high-water mark. Linux's VmHWM: getrusage's ru_maxrss would do, but it carries
    the parent's peak over fork + exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / GiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB  # KiB; not Linux: no fork carry-over


def write_inputs(root: Path):
    """The random-weight input files; tensors are distinct windows of one random pool (generating 1.5G normal
    values would dominate the setup)."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    from pia_jax.models.config import SD15_PIA
    from pia_jax.weights.model_dir import write_safetensors
    from tests import ldm_writer
    from tests import torch_models as tm
    from tests.assets import write_vocab
    from tests.test_convert_lora import kohya, modules

    with init_empty_weights():
        n = len(SD15_PIA.vae.block_out_channels)
        models = {"unet": tm.unet2d(SD15_PIA.unet), "adapter": tm.motion_adapter(SD15_PIA.unet),
                  "vae": AutoencoderKL(block_out_channels=SD15_PIA.vae.block_out_channels, layers_per_block=2,
                                       down_block_types=("DownEncoderBlock2D",) * n,
                                       up_block_types=("UpDecoderBlock2D",) * n),
                  "text_encoder": CLIPTextModel(tm.clip_text_config(SD15_PIA.text))}
    rng = np.random.default_rng(0)
    pool = rng.standard_normal(64 << 20, dtype=np.float32) * 0.02

    def random(module) -> dict:
        return {k: pool[(o := rng.integers(len(pool) - v.numel() + 1)):o + v.numel()].reshape(v.shape)
                for k, v in module.state_dict().items()}

    sd = root / "stable-diffusion-v1-5"
    for part, stem in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                       ("text_encoder", "model")):
        (sd / part).mkdir(parents=True)
        write_safetensors(sd / part / f"{stem}.safetensors", random(models[part]))
        (models[part].config.save_pretrained if part == "text_encoder" else models[part].save_config)(sd / part)
    write_vocab(sd / "tokenizer")
    pia = ldm_writer.animatediff_checkpoint({k: torch.from_numpy(v.copy()) for k, v in random(
        models["adapter"]).items()}, 32)
    torch.save(pia, root / "pia.ckpt")
    del pia
    unet, vae, text = (random(models[p]) for p in ("unet", "vae", "text_encoder"))
    ldm = ldm_writer.ldm_checkpoint(unet, models["unet"].config, vae, models["vae"].config, text)
    write_safetensors(root / "rcnzCartoon3d_v10.safetensors", {k: np.asarray(v).astype(np.float16)
                                                               if np.asarray(v).dtype.kind == "f" else np.asarray(v)
                                                               for k, v in ldm.items()})
    del ldm
    text = {"text_model." + k.removeprefix("text_model."): v for k, v in text.items()}
    attention = [m for m in modules(unet) if "attn" in m or "ff.net" in m]
    write_safetensors(root / "style.safetensors", {
        **kohya(unet, "lora_unet", attention, seed=1, rank=32, alpha=16.0, dtype=np.float16),
        **kohya(text, "lora_te", modules(text), seed=2, rank=32, alpha=16.0, dtype=np.float16)})


CASES = {
    "folder": lambda r: ["--base", r / "stable-diffusion-v1-5", "--motion", r / "pia.ckpt"],
    "civitai": lambda r: ["--base", r / "rcnzCartoon3d_v10.safetensors", "--config-from", r / "stable-diffusion-v1-5",
                          "--motion", r / "pia.ckpt", "--lora", f"{r / 'style.safetensors'}:0.8"],
}


def child(case: str, root: Path):
    """One conversion in this process; prints a JSON line."""
    import torch  # noqa: F401  (imported to read .ckpt files: part of the baseline, not the conversion)

    import convert_torch_weights  # imports jax, flax and the models

    baseline = peak_rss_gib()
    out = root / f"out-{case}"
    start = time.perf_counter()
    code = convert_torch_weights.main([str(a) for a in CASES[case](root) + ["--out", out, "--force"]])
    seconds = time.perf_counter() - start
    size = sum(f.stat().st_size for f in out.glob("*.safetensors")) / GiB
    shutil.rmtree(out)  # 5.5 GiB each
    print(json.dumps({"case": case, "code": code, "seconds": seconds, "peak_gib": peak_rss_gib(),
                      "baseline_gib": baseline, "model_gib": size}))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/pia-convert-bench"))
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a.child, a.workdir)
    if not (a.workdir / "style.safetensors").is_file():
        start = time.perf_counter()
        a.workdir.mkdir(parents=True, exist_ok=True)
        write_inputs(a.workdir)
        print(f"wrote the inputs to {a.workdir} in {time.perf_counter() - start:.0f} s")
    for case in a.cases:
        run = subprocess.run([sys.executable, "-m", "bench.convert", "--workdir", str(a.workdir), "--child", case],
                             capture_output=True, text=True)
        result = json.loads(run.stdout.strip().splitlines()[-1]) if run.returncode == 0 else None
        if not result or result["code"] != 0:
            sys.exit(f"{case} failed:\n{run.stdout}\n{run.stderr}")
        r = result
        print(f"{case:8s} {r['seconds']:5.1f} s, peak RSS {r['peak_gib']:.2f} GiB (of which {r['baseline_gib']:.2f} "
              f"GiB interpreter + imports) for a {r['model_gib']:.2f} GiB fp32 model: "
              f"{(r['peak_gib'] - r['baseline_gib']) / r['model_gib']:.2f} model copies")


if __name__ == "__main__":
    main()
