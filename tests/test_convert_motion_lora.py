"""AnimateDiff motion LoRAs (`--motion-lora`) and AnimateDiff v3's adapter LoRA (`--lora v3_sd15_adapter.ckpt`),
written at the tiny size in the real file formats, against diffusers' loaders and hand merges (issue 31).

Formats: AnimateDiff's own motion LoRA (v2_lora_ZoomIn.ckpt: a torch pickle, AnimateDiff motion-module names,
`attention_blocks.A.processor.to_q_lora.down.weight`), diffusers' converted copy (safetensors, `unet.` + diffusers
motion-module names, same factors), a PEFT file with alphas in its metadata, and the v3 adapter (a torch pickle of
attention-processor factors on the spatial transformers without the `unet.` prefix). Ranks differ from layer to
layer, as every format allows.

Tolerances: merged weights against a float64 hand merge, 1e-6 of max|W| (fp32 rounding of W + s up @ down, factors
O(|W|)); converted weights against diffusers' fused ones, the same 1e-6 (tests/test_convert_lora.py: only the
summation order of the rank-r product differs; a missing, doubled or wrongly scaled LoRA is off by O(0.1)); the
sampled video against diffusers' AnimateDiffPipeline, 1 uint8 level (fp32 both sides, summation order only, as
tests/test_context_modes.py).
"""

import dataclasses
import json
import re

import jax
import numpy as np
import pytest
import torch
from diffusers import (
    AnimateDiffPipeline,
    AutoencoderKL,
    DDIMScheduler,
    MotionAdapter,
    UNet2DConditionModel,
    UNetMotionModel,
)
from flax import nnx
from peft import LoraConfig
from PIL import Image
from safetensors.numpy import save_file
from transformers import CLIPTextModel, CLIPTokenizer

import convert_torch_weights
import sample
from pia_jax.weights import WeightLoadError, model_dir, read_state_dict
from pia_jax.weights.convert import build
from pia_jax.weights.convert.animatediff import convert_motion_checkpoint
from pia_jax.weights.convert.lora import merge_loras, read_lora
from pia_jax.weights.convert.motion_lora import NO_MID_BLOCK, check, merge_motion_loras
from tests import ldm_writer
from tests import torch_models as tm
from tests.assets import SMALL
from tests.helpers import load_ours, te_state
from tests.oracle import numpy_state, randomize, rel_err

WEIGHT_TOL = 1e-6
# SMALL (tests/assets.py): every kind of layer at the shortest compile; 4-channel UNet, no mid-block motion module
V2 = dataclasses.replace(SMALL.unet, motion_mid_block=True, motion_max_seq_length=24)  # mm_sd_v15_v2
V3 = dataclasses.replace(SMALL.unet, motion_max_seq_length=32)  # v3_sd15_mm: no mid block, no conv_in
PIA = dataclasses.replace(SMALL.unet, in_channels=9)  # pia.ckpt: 9-channel conv_in, no mid block
TO_ANIMATEDIFF = {"attn1": "attention_blocks.0", "attn2": "attention_blocks.1"}
pytestmark = pytest.mark.filterwarnings("ignore:::peft", "ignore:::diffusers")


def torch_state(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def factors(state: dict, layers, seed, rank=lambda n: 2 + n % 3) -> dict:
    """{layer: (down (r, in), up (out, r))}, random, the rank varying from layer to layer."""
    rng = np.random.default_rng(seed)
    out = {}
    for n, layer in enumerate(layers):
        w = state[layer + ".weight"]
        r = rank(n)
        out[layer] = ((0.3 * rng.standard_normal((r, w.shape[1]))).astype(np.float32),
                      (0.3 * rng.standard_normal((w.shape[0], r))).astype(np.float32))
    return out


def processor_key(layer: str, part: str, animatediff_names: bool) -> str:
    """`...attn1.to_out.0` -> `...attn1.processor.to_out_lora.down.weight`, in AnimateDiff names if asked."""
    attention, projection = re.fullmatch(r"(.+)\.(to_q|to_k|to_v|to_out)(?:\.0)?", layer).groups()
    if animatediff_names:
        attention = re.sub(r"(motion_modules\.\d+)\.transformer_blocks\.(\d+)\.(attn[12])",
                           lambda m: f"{m[1]}.temporal_transformer.transformer_blocks.{m[2]}.{TO_ANIMATEDIFF[m[3]]}",
                           attention)
    return f"{attention}.processor.{projection}_lora.{part}.weight"


def processor_file(lora: dict, prefix="", animatediff_names=False) -> dict:
    return {prefix + processor_key(layer, part, animatediff_names): f
            for layer, pair in lora.items() for part, f in zip(("down", "up"), pair)}


def attention_layers(state: dict, where: str) -> list[str]:
    return sorted(k[:-7] for k in state if where in k and re.search(r"\.attn[12]\.(to_[qkv]|to_out\.0)\.weight$", k))


def by_hand(weight, pair, multiplier, scale=1.0):
    down, up = (np.asarray(f, np.float64) for f in pair)
    return np.asarray(weight, np.float64) + multiplier * scale * up @ down


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """The downloads: SD1.5 folder, mm_sd_v15_v2.ckpt, pia.ckpt-layout and v3_sd15_mm.ckpt motion modules, a camera
    motion LoRA for v2 in AnimateDiff's and diffusers' formats, a PEFT motion LoRA, and a v3 adapter LoRA."""
    root = tmp_path_factory.mktemp("motion-lora")
    s = {"root": root, "sd": root / "stable-diffusion-v1-5"}
    s["sd_models"] = tm.write_diffusers_base(s["sd"], SMALL, seed=0)
    (s["sd"] / "tokenizer" / "tokenizer_config.json").write_text('{"model_max_length": 77}')  # for CLIPTokenizer
    for name, cfg, seed in (("v2", V2, 5), ("pia", PIA, 4), ("v3", V3, 6)):
        adapter = randomize(tm.motion_adapter(cfg), seed).eval()
        adapter.save_config(root / f"{name}-config")
        torch.save(ldm_writer.animatediff_checkpoint(torch_state(adapter), cfg.motion_max_seq_length),
                   root / f"{name}.ckpt")
        s[name] = root / f"{name}.ckpt"
    v2_motion = convert_motion_checkpoint(read_state_dict(s["v2"]))[0]
    s["camera"] = factors(v2_motion, attention_layers(v2_motion, "motion_modules"), seed=7)  # mid block included
    torch.save({k: torch.from_numpy(v) for k, v in processor_file(s["camera"], animatediff_names=True).items()},
               root / "v2_lora_ZoomIn.ckpt")
    save_file(processor_file(s["camera"], prefix="unet."), str(root / "zoom-in-diffusers.safetensors"))
    s["peft"] = factors(v2_motion, attention_layers(v2_motion, "up_blocks.1.motion_modules"), seed=8, rank=lambda n: 4)
    peft = {f"unet.{layer}.lora_{ab}.weight": f for layer, pair in s["peft"].items() for ab, f in zip("AB", pair)}
    config = {f"unet.{k}": v for k, v in LoraConfig(r=4, lora_alpha=2, target_modules=sorted(s["peft"])).to_dict()
              .items()}
    save_file(peft, str(root / "peft.safetensors"), {"lora_adapter_metadata": json.dumps(config, default=list)})
    unet = numpy_state(s["sd_models"]["unet"])
    s["adapter_lora"] = factors(unet, attention_layers(unet, "attentions."), seed=9)
    torch.save({k: torch.from_numpy(v) for k, v in processor_file(s["adapter_lora"]).items()},
               root / "v3_sd15_adapter.ckpt")
    return s


def cli(*args) -> int:
    return convert_torch_weights.main([str(a) for a in args])


def converted(tmp_path, *args):
    out = tmp_path / "out"
    assert cli("--out", out, "--norm-semantics", "diffusers", "--motion-heads", SMALL.unet.motion_num_attention_heads,
               *args) == 0
    return out


def assert_same_weights(out, torch_unet):
    """Every parameter of the converted UNet equals the torch model's, mapped by the strict diffusers key map."""
    md = model_dir.load_model_dir(out, tokenizer=False)
    expected = load_ours(md.config.unet, numpy_state(torch_unet))
    ours, theirs = (jax.tree.leaves(nnx.state(m, nnx.Param)) for m in (md.unet, expected))
    assert len(ours) == len(theirs) == len(model_dir.flat_params(md.unet))
    assert max(rel_err(a, b) for a, b in zip(ours, theirs)) <= WEIGHT_TOL


def fuse_motion_loras(pipe, loras):
    """diffusers' motion LoRA merge: load_lora_weights per file, set_adapters with the multipliers, fuse_lora."""
    names = [f"motion{i}" for i in range(len(loras))]
    for name, (path, _) in zip(names, loras):
        pipe.load_lora_weights(str(path), adapter_name=name)
    pipe.set_adapters(names, adapter_weights=[m for _, m in loras])
    pipe.fuse_lora(adapter_names=names)
    pipe.unload_lora_weights()


def adapter_merged_unet(src, multiplier):
    """The SD1.5 UNet with the v3 adapter LoRA fused by diffusers, from the file as it is (no `unet.` prefix, which
    `load_lora_weights` filters on: `load_lora_adapter(prefix=None)` reads it)."""
    unet = UNet2DConditionModel.from_pretrained(src["sd"] / "unet")
    unet.load_lora_adapter(str(src["root"] / "v3_sd15_adapter.ckpt"), prefix=None, adapter_name="adapter")
    unet.set_adapters(["adapter"], weights=[multiplier])
    unet.fuse_lora(adapter_names=["adapter"])
    unet.unload_lora()
    return unet


def motion_oracle(s, name, cfg_unet=None):
    """diffusers' UNetMotionModel from the SD1.5 UNet and the motion file (from_single_file, as a user loads it)."""
    adapter = MotionAdapter.from_single_file(str(s[name]), config=str(s["root"] / f"{name}-config"),
                                             local_files_only=True)
    return UNetMotionModel.from_unet2d(cfg_unet or UNet2DConditionModel.from_pretrained(s["sd"] / "unet"), adapter)


# ---------------------------------------------------------------------------------------------------------------
# motion LoRAs


def test_motion_lora_formats_equal_a_hand_merge(src):
    """AnimateDiff's file, diffusers' copy and (for its layers) the PEFT file merge to W + m (alpha / r) up @ down on
    the layers they name, mid block included for v2 modules; nothing else changes."""
    motion = convert_motion_checkpoint(read_state_dict(src["v2"]))[0]
    animatediff_file = read_lora(src["root"] / "v2_lora_ZoomIn.ckpt")
    merged, [report] = merge_motion_loras(motion, [(animatediff_file, 0.7)])
    assert sorted(report.motion) == sorted(src["camera"]) and report.ignored == {}
    assert any(layer.startswith("mid_block.") for layer in report.motion)
    for key in motion:
        layer = key.removesuffix(".weight")
        if layer in src["camera"]:
            assert merged[key].dtype == np.float32
            assert rel_err(merged[key], by_hand(motion[key], src["camera"][layer], 0.7)) <= WEIGHT_TOL, key
        else:
            assert merged[key] is motion[key], key
    diffusers_copy, _ = merge_motion_loras(motion, [(read_lora(src["root"] / "zoom-in-diffusers.safetensors"), 0.7)])
    assert all(np.array_equal(diffusers_copy[k], merged[k]) for k in motion)
    peft, [report] = merge_motion_loras(motion, [(read_lora(src["root"] / "peft.safetensors"), -0.5)])
    assert sorted(report.motion) == sorted(src["peft"])
    for layer, pair in src["peft"].items():  # lora_alpha 2 over rank 4
        assert rel_err(peft[layer + ".weight"], by_hand(motion[layer + ".weight"], pair, -0.5, 0.5)) <= WEIGHT_TOL


def test_cli_v2_with_two_motion_loras_matches_diffusers(src, tmp_path, capsys):
    """mm_sd_v15_v2 + the camera LoRA (diffusers' copy) at 0.8 + the PEFT LoRA at -0.5: every UNet weight equals
    diffusers' UNetMotionModel with both loaded by AnimateDiffPipeline.load_lora_weights, set_adapters and
    fuse_lora, mid block included (both through the same strict key map; the v3 test compares videos)."""
    loras = [(src["root"] / "zoom-in-diffusers.safetensors", 0.8), (src["root"] / "peft.safetensors", -0.5)]
    out = converted(tmp_path, "--base", src["sd"], "--motion", src["v2"],
                    *[a for path, m in loras for a in ("--motion-lora", f"{path}:{m}")])
    log = capsys.readouterr().out
    assert f"motion lora: {loras[0][0]} x0.8: {len(src['camera'])} motion-module layers\n" in log
    pipe = AnimateDiffPipeline(vae=None, text_encoder=None, tokenizer=None, unet=motion_oracle(src, "v2"),
                               motion_adapter=None, scheduler=None)
    fuse_motion_loras(pipe, loras)
    assert_same_weights(out, pipe.unet)
    report = json.loads((out / "sources.json").read_text())["report"]
    assert [r["motion layers"] for r in report["motion_loras"]] == [len(src["camera"]), len(src["peft"])]


def test_pia_motion_modules_skip_and_report_the_mid_block(src, tmp_path, capsys):
    """pia.ckpt has no mid-block motion module: the camera LoRA's mid-block keys are named in the report with the
    reason and counted in the log; every other layer is merged."""
    out = converted(tmp_path, "--base", src["sd"], "--motion", src["pia"], "--motion-lora",
                    src["root"] / "v2_lora_ZoomIn.ckpt")
    log = capsys.readouterr().out
    mid = sorted(k for k in processor_file(src["camera"], animatediff_names=True) if k.startswith("mid_block."))
    assert len(mid) == 16  # to_q/k/v/out of both attentions, down and up
    layers = len(src["camera"]) - 8
    assert f"{layers} motion-module layers, 16 tensors skipped: {NO_MID_BLOCK}" in log
    assert f"16 {NO_MID_BLOCK}" in log  # the ignored-tensors line
    [summary] = json.loads((out / "sources.json").read_text())["report"]["motion_loras"]
    assert summary["motion layers"] == layers and summary["ignored"] == dict.fromkeys(mid, NO_MID_BLOCK)


# ---------------------------------------------------------------------------------------------------------------
# AnimateDiff v3: the adapter LoRA and the motion modules


def test_v3_adapter_lora_equals_diffusers_and_a_hand_merge(src):
    """v3_sd15_adapter.ckpt's format through `--lora`'s merge against diffusers loading the same file into the UNet
    (`load_lora_adapter(prefix=None)`: the file has no `unet.` prefix, which `load_lora_weights` filters on) and
    against AnimateDiff's W += scale * up @ down."""
    base_unet = src["sd_models"]["unet"]
    unet, text = numpy_state(base_unet), te_state(src["sd_models"]["text_encoder"])
    path = src["root"] / "v3_sd15_adapter.ckpt"
    merged, _, [report] = merge_loras(unet, text, [(read_lora(path), 0.9)])
    assert sorted(report.unet) == sorted(src["adapter_lora"]) and report.text_encoder == []
    oracle = UNet2DConditionModel.from_config(base_unet.config)
    oracle.load_state_dict(base_unet.state_dict())
    oracle.load_lora_adapter(str(path), prefix=None, adapter_name="adapter")
    oracle.set_adapters(["adapter"], weights=[0.9])
    oracle.fuse_lora(adapter_names=["adapter"])
    oracle.unload_lora()
    expected = numpy_state(oracle)
    for key in unet:
        layer = key.removesuffix(".weight")
        if layer in src["adapter_lora"]:
            assert rel_err(merged[key], expected[key]) <= WEIGHT_TOL, key
            assert rel_err(merged[key], by_hand(unet[key], src["adapter_lora"][layer], 0.9)) <= WEIGHT_TOL, key
        else:
            assert np.array_equal(merged[key], unet[key]) and np.array_equal(expected[key], unet[key]), key


def test_cli_v3_with_adapter_and_motion_lora_samples_diffusers_video(src, tmp_path):
    """v3_sd15_mm.ckpt (no mid block, no conv_in) + the adapter LoRA (--lora, 0.9) + the PEFT motion LoRA
    (--motion-lora, -0.5): a 4-channel text-to-video model whose weights equal diffusers' (adapter fused into the
    UNet, the motion LoRA by AnimateDiffPipeline.load_lora_weights) and whose sample.py video, from the noise it
    saved, is diffusers' AnimateDiffPipeline video within 1 uint8 level (fp32 both sides: ~1e-5 of drift over 2
    DDIM steps with guidance and the VAE; frames truncated to uint8, so one level where a value sits at a step)."""
    out = converted(tmp_path, "--base", src["sd"], "--motion", src["v3"], "--lora",
                    f"{src['root'] / 'v3_sd15_adapter.ckpt'}:0.9", "--motion-lora",
                    f"{src['root'] / 'peft.safetensors'}:-0.5")
    md = model_dir.load_model_dir(out, tokenizer=False)
    assert (md.config.unet.in_channels, md.config.unet.motion_mid_block) == (4, False)
    pipe = AnimateDiffPipeline(vae=AutoencoderKL.from_pretrained(src["sd"] / "vae"),
                               text_encoder=CLIPTextModel.from_pretrained(src["sd"] / "text_encoder"),
                               tokenizer=CLIPTokenizer.from_pretrained(str(src["sd"] / "tokenizer")),
                               unet=motion_oracle(src, "v3", adapter_merged_unet(src, 0.9)), motion_adapter=None,
                               scheduler=DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear",
                                                       steps_offset=1, clip_sample=False, set_alpha_to_one=True))
    pipe.set_progress_bar_config(disable=True)
    fuse_motion_loras(pipe, [(src["root"] / "peft.safetensors", -0.5)])
    assert_same_weights(out, pipe.unet)

    args = ("--model", out, "--prompt", "hello cat", "--negative-prompt", "cat", "--frames", 3, "--steps", 2,
            "--guidance", 7.5, "--height", 16, "--width", 24, "--seed", 3, "--format", "png", "--save-noise",
            "--no-progress", "--compile-cache", "off", "--out", tmp_path / "v3.png")
    assert sample.main([str(a) for a in args]) == 0
    (folder,) = tmp_path.glob("v3*_frames")
    got = np.stack([np.asarray(Image.open(f)) for f in sorted(folder.glob("*.png"))]).astype(np.int32)
    noise = np.load(str(folder).removesuffix("_frames") + "_noise.npy")
    with torch.no_grad():
        expected = pipe(prompt="hello cat", negative_prompt="cat", num_frames=3, height=16, width=24,
                        num_inference_steps=2, guidance_scale=7.5, output_type="np",
                        latents=torch.from_numpy(noise).permute(0, 4, 1, 2, 3).contiguous()).frames[0]
    want = (np.clip(expected, 0, 1) * 255).astype(np.int32)  # truncated, as sample.py writes them
    assert got.shape == want.shape == (3, 16, 24, 3)
    print(f"max {np.abs(got - want).max()} levels; {np.mean((want > 0) & (want < 255)):.2f} of values unsaturated")
    assert np.mean((want > 0) & (want < 255)) > 0.5 and np.abs(got - want).max() <= 1  # a video, not a clipped blank


# ---------------------------------------------------------------------------------------------------------------
# bad inputs: a clear error before any model is read


def truncated(src, name):
    path = src["root"] / f"truncated-{name}"
    source = src["root"] / name
    path.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    return path


def rank_mismatch(src):
    """One layer whose up factor has rank 1 where its down has 2..4: no valid LoRA in any format."""
    state = read_lora(src["root"] / "zoom-in-diffusers.safetensors")
    key = next(k for k in state if k.endswith("to_q_lora.up.weight"))
    state[key] = np.ascontiguousarray(state[key][:, :1])
    save_file(state, str(src["root"] / "rank.safetensors"))
    return src["root"] / "rank.safetensors"


BAD = {  # case: (arguments after --base/--motion, parts of the message)
    "motion LoRA as --lora": (lambda s: ["--lora", s["root"] / "v2_lora_ZoomIn.ckpt"],
                              ["--lora", "v2_lora_ZoomIn.ckpt", "AnimateDiff motion LoRA", "pass it with --motion-lora"]),
    "spatial LoRA as --motion-lora": (lambda s: ["--motion-lora", s["root"] / "v3_sd15_adapter.ckpt"],
                                      ["--motion-lora", "no motion_modules keys", "goes to --lora"]),
    "truncated motion LoRA": (lambda s: ["--motion-lora", truncated(s, "v2_lora_ZoomIn.ckpt")],
                              ["truncated-v2_lora_ZoomIn.ckpt", "truncated, corrupt"]),
    "truncated adapter LoRA": (lambda s: ["--lora", truncated(s, "v3_sd15_adapter.ckpt")],
                               ["truncated-v3_sd15_adapter.ckpt", "truncated, corrupt"]),
    "rank mismatch in a layer": (lambda s: ["--motion-lora", rank_mismatch(s)],
                                 ["rank.safetensors", "down and up factors of different ranks", ", 1) for"]),
    "motion modules as --motion-lora": (lambda s: ["--motion-lora", s["v2"]],
                                        ["keys that are not motion-module LoRA factors", "norm.weight"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_lora_fails_before_any_model_is_read(src, tmp_path, capsys, monkeypatch, case):
    """Each wrong file is named before the base model is read (read_base would fail the test)."""
    arguments, message = BAD[case]
    monkeypatch.setattr(build, "read_base", lambda *a: pytest.fail("the base model was read"))
    assert cli("--out", tmp_path / "out", "--base", src["sd"], "--motion", src["v2"], *arguments(src)) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and all(part in err for part in message), err
    assert not (tmp_path / "out").exists()


def test_motion_lora_check_names_wrong_kinds():
    """Without files: LyCORIS kinds and unpaired factors are named."""
    key = "down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.processor."
    z = np.zeros((2, 32), np.float32)
    for state, part in (({key + "to_q_lora.down.weight": z}, "without their up/down partner"),
                        ({key + "to_q.hada_w1_a": z}, "LyCORIS LoHa"), ({}, "holds no keys")):
        with pytest.raises(WeightLoadError, match=part):
            check(0, state)
