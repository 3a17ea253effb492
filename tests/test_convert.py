"""convert_torch_weights.py end to end: random-weight models written in the formats users download, converted through
the CLI, loaded with `load_model_dir` and run against the PyTorch models that diffusers' own loaders build from the
same files (`from_pretrained`, `from_single_file` with a local `config=`, `MotionAdapter.from_single_file`,
`load_lora_weights` + `fuse_lora`, `UNetMotionModel.from_unet2d`), so a wrong key map cannot pass by mirroring itself.

Tolerances (max abs error over max |expected|): both sides compute in fp32 and differ only in summation order, as in
tests/test_unet.py (UNet, measured ~2e-6, TOL 2e-5), test_vae.py (1e-4) and test_text_encoder.py (1e-5); a wrong
weight or channel shows up at 1e-3 or more. Weight-level checks (conv_in rule, VAE override, dtypes, full size) are
exact; LoRA merges checked by hand allow a few float32 ulps (1e-6 of |W|).
"""

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, MotionAdapter, StableDiffusionPipeline, UNet2DConditionModel, UNetMotionModel
from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm, load_single_file_checkpoint
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from transformers import CLIPTextModel

import convert_torch_weights
from pia_jax.models.abstract import abstract_model
from pia_jax.models.config import SD15_PIA, TINY
from pia_jax.models.text_encoder import CLIPTextModel as JaxText
from pia_jax.models.tokenizer import load_tokenizer, tokenize
from pia_jax.models.unet import UNetMotionModel as JaxUNet
from pia_jax.models.vae import AutoencoderKL as JaxVAE
from pia_jax.weights import model_dir, param_shapes
from pia_jax.weights.convert.build import Request, convert
from tests import ldm_writer
from tests import torch_models as tm
from tests.assets import write_vocab
from tests.oracle import assert_close, numpy_state, randomize, rel_err
from tests.helpers import by_hand, kohya, modules, te_state

UNET_TOL, VAE_TOL, TEXT_TOL, LORA_TOL = 2e-5, 1e-4, 1e-5, 1e-6
V2 = dataclasses.replace(TINY.unet, in_channels=4, motion_mid_block=True, motion_max_seq_length=24)  # mm_sd_v15_v2
pytestmark = pytest.mark.filterwarnings("ignore:::peft", "ignore:::diffusers")

RUN_UNET = nnx.jit(lambda m, x, t, ctx, mask, cond: m(x, t, ctx, mask, cond))
RUN_TEXT = nnx.jit(lambda m, ids: m(ids))
DECODE = nnx.jit(JaxVAE.decode)


def torch_state(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def hwio(weight):
    """torch conv OIHW -> our HWIO."""
    return np.asarray(weight).transpose(2, 3, 1, 0)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """Every input kind, in its on-disk format, with its own random weights."""
    root = tmp_path_factory.mktemp("downloads")
    s = SimpleNamespace(root=root, sd=root / "stable-diffusion-v1-5", adapter_dir=root / "PIA-condition-adapter",
                        pia=root / "pia.ckpt", pia_cfg=root / "pia-config", v2=root / "mm_sd_v15_v2.ckpt",
                        v2_cfg=root / "v2-config", civitai=root / "rcnzCartoon3d_v10.safetensors",
                        lora=root / "style.safetensors", lora2=root / "detail.safetensors",
                        vae_ckpt=root / "vae-ft-mse-840000-ema-pruned.ckpt", vae_dir=root / "sd-vae-ft-mse")
    s.sd_models = tm.write_diffusers_base(s.sd, TINY, seed=0)
    s.adapter = tm.write_motion_adapter(s.adapter_dir, TINY.unet, seed=3)
    for path, cfg_dir, cfg, seed in ((s.pia, s.pia_cfg, TINY.unet, 4), (s.v2, s.v2_cfg, V2, 5)):
        adapter = randomize(tm.motion_adapter(cfg), seed).eval()
        adapter.save_config(cfg_dir)  # diffusers' from_single_file oracle reads the architecture from here
        torch.save(ldm_writer.animatediff_checkpoint(torch_state(adapter), cfg.motion_max_seq_length), path)
    s.pia_state = {k: v.numpy() for k, v in torch.load(s.pia, weights_only=True).items()}
    # a civitai DreamBooth model: one fp16 LDM file with the DDPM buffers and CLIP position_ids
    unet, vae, text = randomize(tm.unet2d(TINY.unet), 10).eval(), tm.vae(TINY.vae, 11), tm.clip_text(TINY.text, 12)
    ldm = ldm_writer.ldm_checkpoint(torch_state(unet), unet.config, torch_state(vae), vae.config, torch_state(text))
    save_file({k: v.half().numpy() if v.is_floating_point() else v.numpy() for k, v in ldm.items()}, str(s.civitai))
    s.civitai_state = load_file(str(s.civitai))
    # kohya LoRAs for it: every UNet/text module (LoCon on the 3x3 convs, conv_in included), and a second one
    unet_sd, text_sd = numpy_state(unet), te_state(text)
    s.loras = {s.lora: {**kohya(unet_sd, "lora_unet", modules(unet_sd), seed=20),
                        **kohya(text_sd, "lora_te", modules(text_sd), seed=21)},
               s.lora2: kohya(unet_sd, "lora_unet", [m for m in modules(unet_sd) if ".attn" in m or "resnets" in m],
                              seed=22, rank=8, alpha=16.0, conv_rank=3, conv_alpha=1.0)}
    for path, lora in s.loras.items():
        save_file(lora, str(path))
    # separate VAEs: an LDM training checkpoint (no prefix, loss tensors, state_dict wrapper) and a diffusers folder
    s.vae_models = {s.vae_ckpt: tm.vae(TINY.vae, 30), s.vae_dir: tm.vae(TINY.vae, 31)}
    torch.save({"state_dict": ldm_writer.vae_file(torch_state(s.vae_models[s.vae_ckpt]), vae.config)}, s.vae_ckpt)
    s.vae_models[s.vae_dir].save_pretrained(s.vae_dir)
    return s


def cli(*args) -> int:
    return convert_torch_weights.main([str(a) for a in args])


def converted(tmp_path, *args, name="out", heads=TINY.unet.motion_num_attention_heads):
    """Runs the CLI and returns the output folder. Tiny models are compared with diffusers, whose UNetMotionModel has
    its own GroupNorm semantics; their motion modules have 4 heads, which a .ckpt cannot tell (pia.ckpt's 8 are the
    default), so `heads` is passed unless None."""
    out = tmp_path / name
    assert cli("--out", out, "--norm-semantics", "diffusers", *(("--motion-heads", heads) if heads else ()), *args) == 0
    return out


def stored(out, part="unet") -> dict:
    return load_file(str(out / f"{part}.safetensors"))


def inputs(cfg, seed=0, b=1, f=3, h=8, w=8):
    rng = np.random.default_rng(seed)
    return dict(sample=rng.standard_normal((b, f, h, w, 4), np.float32), t=np.array([537] * b),
                context=rng.standard_normal((b, 7, cfg.cross_attention_dim), np.float32),
                mask=rng.uniform(0.2, 1.0, (b, f, 1, 1, 1)).astype(np.float32),
                condition=rng.standard_normal((b, 1, h, w, 4), np.float32))


def check_unet(md, torch_unet, what):
    x = inputs(md.config.unet)
    if md.config.unet.in_channels == 4:
        x["mask"] = x["condition"] = None
    expected = tm.run_unet_motion(torch_unet, x["sample"], x["t"], x["context"], x["mask"], x["condition"])
    got = RUN_UNET(md.unet, x["sample"], x["t"], x["context"], x["mask"], x["condition"])
    assert_close(got, expected, UNET_TOL, f"{what} UNet")


def check_vae(md, torch_vae, what):
    z = np.random.default_rng(1).standard_normal((1, 4, 4, 4), np.float32)
    with torch.no_grad():
        expected = torch_vae.decode(torch.from_numpy(z.transpose(0, 3, 1, 2))).sample.numpy().transpose(0, 2, 3, 1)
    assert_close(DECODE(md.vae, jnp.asarray(z)), expected, VAE_TOL, f"{what} VAE decode")


def check_text(md, torch_text, what):
    ids = np.random.default_rng(2).integers(0, TINY.text.vocab_size, (1, 77)).astype(np.int32)
    with torch.no_grad():
        expected = torch_text(torch.from_numpy(ids.astype(np.int64))).last_hidden_state.numpy()
    assert_close(RUN_TEXT(md.text_encoder, jnp.asarray(ids)), expected, TEXT_TOL, f"{what} text encoder")


def fused(unet, text, loras):
    """diffusers' LoRA merge: load_lora_weights per file, set_adapters with the multipliers, fuse_lora."""
    pipe = StableDiffusionPipeline(vae=None, text_encoder=text, tokenizer=None, unet=unet, scheduler=None,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    names = [f"lora{i}" for i in range(len(loras))]
    for name, (path, _) in zip(names, loras):
        pipe.load_lora_weights(str(path), adapter_name=name)
    pipe.set_adapters(names, adapter_weights=[m for _, m in loras])
    pipe.fuse_lora(adapter_names=names)
    pipe.unload_lora_weights()
    return pipe.unet, pipe.text_encoder


def single_file_oracle(s, loras=()):
    """(UNet2DConditionModel, AutoencoderKL, CLIPTextModel) as diffusers loads the civitai file, LoRAs fused."""
    checkpoint = load_single_file_checkpoint(str(s.civitai), local_files_only=True)
    kw = dict(local_files_only=True, torch_dtype=torch.float32)
    unet = UNet2DConditionModel.from_single_file(checkpoint, config=str(s.sd / "unet"), **kw)
    vae = AutoencoderKL.from_single_file(checkpoint, config=str(s.sd / "vae"), **kw)
    text = create_diffusers_clip_model_from_ldm(CLIPTextModel, checkpoint, config=str(s.sd), subfolder="text_encoder",
                                                **kw)
    if loras:
        unet, text = fused(unet, text, loras)
    return unet.eval(), vae.eval(), text.eval()


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def check_sources(out, expected_roles):
    """Every recorded source file has its true size and hash; the report counts every parameter of every part."""
    record = json.loads((out / "sources.json").read_text())
    assert [s["role"] for s in record["sources"]] == expected_roles
    for source in record["sources"]:
        root = Path(source["path"])
        assert source["files"]
        for name, info in source["files"].items():
            file = root / name if root.is_dir() else root
            assert info == {"bytes": file.stat().st_size, "sha256": sha256(file)}, file
    md = model_dir.load_model_dir(out, tokenizer=False)
    assert record["report"]["converted"] == {p: len(model_dir.flat_params(getattr(md, p))) for p in model_dir.PARTS}
    return record["report"]


# ---------------------------------------------------------------------------------------------------------------
# each input kind against diffusers


def test_sd15_folder_and_diffusers_pia_adapter(src, tmp_path, capsys):
    out = converted(tmp_path, "--base", src.sd, "--motion", src.adapter_dir, heads=None)  # from its config.json
    log = capsys.readouterr().out
    assert "unet 884 tensors, vae 124 tensors, text_encoder 36 tensors, fp32" in log and "conv_in rule 'motion'" in log
    md = model_dir.load_model_dir(out)
    assert (md.config.unet.in_channels, md.config.unet.norm_semantics, md.config.unet.motion_num_attention_heads) == (
        9, "diffusers", 4)
    assert json.loads((out / "config.json").read_text())["scheduler"]["beta_schedule"] == "linear"
    # the reference's rule with SD1.5 itself as base: all of conv_in from the PIA weights
    ref = UNetMotionModel.from_unet2d(UNet2DConditionModel.from_pretrained(src.sd / "unet"),
                                      MotionAdapter.from_pretrained(src.adapter_dir))
    ref.conv_in.load_state_dict(src.adapter.conv_in.state_dict())
    check_unet(md, ref.eval(), "diffusers folders")
    check_vae(md, AutoencoderKL.from_pretrained(src.sd / "vae").eval(), "diffusers folders")
    check_text(md, CLIPTextModel.from_pretrained(src.sd / "text_encoder").eval(), "diffusers folders")
    np.testing.assert_array_equal(tokenize(md.tokenizer, ["hello cat"]),
                                  tokenize(load_tokenizer(src.sd / "tokenizer"), ["hello cat"]))
    report = check_sources(out, ["base", "motion", "tokenizer"])
    assert report["motion"] == {"converted": 392, "ignored": {"position tables (recomputed by the model)": 15}}
    assert "ignored 15 source tensors, by rule: 15 position tables (recomputed by the model)" in log


def test_civitai_file_pia_ckpt_and_two_loras(src, tmp_path):
    loras = [(src.lora, 0.8), (src.lora2, -0.4)]
    out = converted(tmp_path, "--base", src.civitai, "--config-from", src.sd, "--motion", src.pia,
                    *[a for path, m in loras for a in ("--lora", f"{path}:{m}")])
    md = model_dir.load_model_dir(out)
    unet, vae, text = single_file_oracle(src, loras)
    adapter = MotionAdapter.from_single_file(str(src.pia), config=str(src.pia_cfg), local_files_only=True)
    check_unet(md, UNetMotionModel.from_unet2d(unet, adapter).eval(), "civitai + pia.ckpt + 2 LoRAs")
    check_vae(md, vae, "civitai")
    check_text(md, text, "civitai + 2 LoRAs")
    report = check_sources(out, ["base", "config_from", "lora", "lora", "motion", "tokenizer"])
    assert report["base"] == {"converted": {"unet": 494, "vae": 124, "text_encoder": 36},
                              "ignored": {"ddpm schedule": 12, "text position_ids": 1}}
    pairs = [[k for k in src.loras[path] if k.startswith(prefix) and k.endswith(".lora_down.weight")]
             for path, _ in loras for prefix in ("lora_unet", "lora_te")]
    assert [n for r in report["loras"] for n in (r["unet modules"], r["text_encoder modules"])] == list(map(len, pairs))


@pytest.mark.parametrize("widen", [False, True])
def test_animatediff_v2_motion_modules(src, tmp_path, widen):
    """mm_sd_v15_v2.ckpt (mid-block module, no conv_in) makes a 4-channel text-to-video UNet; --widen-conv-in adds
    PIA's condition channels as zeros (training start), so whatever the mask and condition, the output is the
    4-channel model's."""
    out = converted(tmp_path, "--base", src.sd, "--motion", src.v2, *["--widen-conv-in"] * widen)
    md = model_dir.load_model_dir(out, tokenizer=False)
    assert (md.config.unet.in_channels, md.config.unet.motion_mid_block) == (9 if widen else 4, True)
    assert md.config.unet.motion_max_seq_length == 24
    ref = UNetMotionModel.from_unet2d(
        UNet2DConditionModel.from_pretrained(src.sd / "unet"),
        MotionAdapter.from_single_file(str(src.v2), config=str(src.v2_cfg), local_files_only=True)).eval()
    if not widen:
        check_unet(md, ref, "AnimateDiff v2")
        return
    kernel = stored(out)["conv_in.kernel"]
    assert not kernel[:, :, 4:].any()
    np.testing.assert_array_equal(kernel[:, :, :4], hwio(src.sd_models["unet"].conv_in.weight.detach()))
    x = inputs(md.config.unet, seed=3)
    expected = tm.run_unet_motion(ref, x["sample"], x["t"], x["context"])
    assert_close(RUN_UNET(md.unet, x["sample"], x["t"], x["context"], x["mask"], x["condition"]), expected, UNET_TOL,
                 "widened AnimateDiff v2 with a random condition")


# ---------------------------------------------------------------------------------------------------------------
# conv_in rule, VAE override, LoRA scaling, dtypes, EMA


@pytest.mark.parametrize("base", ["folder", "file"])
@pytest.mark.parametrize("rule", ["auto", "base", "motion"])
def test_conv_in_rule(src, tmp_path, base, rule):
    args = ("--base", src.sd) if base == "folder" else ("--base", src.civitai, "--config-from", src.sd)
    out = converted(tmp_path, *args, "--motion", src.pia, "--conv-in", rule)
    kernel, bias = stored(out)["conv_in.kernel"], stored(out)["conv_in.bias"]
    if base == "folder":
        base_w, base_b = (v.detach().numpy() for v in (src.sd_models["unet"].conv_in.weight,
                                                       src.sd_models["unet"].conv_in.bias))
    else:
        base_w, base_b = (src.civitai_state[f"model.diffusion_model.input_blocks.0.0.{k}"] for k in ("weight", "bias"))
    from_base = rule == "base" or (rule == "auto" and base == "file")
    np.testing.assert_array_equal(kernel[:, :, 4:], hwio(src.pia_state["conv_in.weight"])[:, :, 4:])
    latent_channels = base_w if from_base else src.pia_state["conv_in.weight"][:, :4]
    np.testing.assert_array_equal(kernel[:, :, :4], hwio(latent_channels))
    np.testing.assert_array_equal(bias, base_b if from_base else src.pia_state["conv_in.bias"])


def test_conv_in_lora_delta_in_motion_mode(src, tmp_path):
    """A LoRA on conv_in adds to channels 0-3 of PIA's own conv_in, as the reference merges it into the 9-channel
    layer; condition channels and bias stay PIA's."""
    out = converted(tmp_path, "--base", src.civitai, "--config-from", src.sd, "--motion", src.pia, "--conv-in",
                    "motion", "--lora", f"{src.lora}:0.8")
    kernel, bias = stored(out)["conv_in.kernel"], stored(out)["conv_in.bias"]
    pia = src.pia_state["conv_in.weight"]
    expected = by_hand(pia[:, :4], src.loras[src.lora], "lora_unet_conv_in", 0.8, 1.5 / 2)  # conv alpha / rank
    assert rel_err(kernel[:, :, :4], hwio(expected)) <= LORA_TOL
    np.testing.assert_array_equal(kernel[:, :, 4:], hwio(pia)[:, :, 4:])
    np.testing.assert_array_equal(bias, src.pia_state["conv_in.bias"])


@pytest.mark.parametrize("kind", ["ldm_ckpt", "diffusers_folder"])
def test_separate_vae_replaces_the_base_vae(src, tmp_path, kind):
    vae = src.vae_ckpt if kind == "ldm_ckpt" else src.vae_dir
    out = converted(tmp_path, "--base", src.civitai, "--config-from", src.sd, "--motion", src.pia, "--vae", vae)
    md = model_dir.load_model_dir(out, parts=("vae",), tokenizer=False)
    if kind == "ldm_ckpt":
        ref = AutoencoderKL.from_single_file(str(vae), config=str(src.sd / "vae"), local_files_only=True)
    else:
        ref = AutoencoderKL.from_pretrained(vae)
    check_vae(md, ref.eval(), f"VAE override ({kind})")
    assert_close(stored(out, "vae")["decoder.conv_out.kernel"],
                 hwio(src.vae_models[vae].decoder.conv_out.weight.detach()), 0, "override's own weight")
    assert json.loads((out / "sources.json").read_text())["report"]["vae"]["converted"] == {"vae": 124}


def test_multi_lora_scaling_and_legacy_alpha(src, tmp_path):
    """kohya scaling is checked against diffusers above; here the PIA repo's legacy merge, W += m * up @ down (alpha
    and rank ignored), summed over two LoRAs, on a UNet linear, a 3x3 LoCon conv and a text-encoder linear."""
    out = converted(tmp_path, "--base", src.civitai, "--config-from", src.sd, "--motion", src.pia,
                    "--lora", f"{src.lora}:0.8", "--lora", f"{src.lora2}:-0.4", "--legacy-lora-alpha")
    unet, text = stored(out), stored(out, "text_encoder")
    attn = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    conv = "up_blocks.1.resnets.0.conv1"
    ldm = {attn: "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
           conv: "model.diffusion_model.output_blocks.3.0.in_layers.2.weight",
           "text_model.encoder.layers.1.self_attn.v_proj":
               "cond_stage_model.transformer.text_model.encoder.layers.1.self_attn.v_proj.weight"}
    for name, key in ldm.items():
        prefix = "lora_te" if name.startswith("text_model") else "lora_unet"
        kohya_key = f"{prefix}_{name.replace('.', '_')}"
        expected = by_hand(src.civitai_state[key].astype(np.float64), src.loras[src.lora], kohya_key, 0.8, 1.0)
        if f"{kohya_key}.lora_down.weight" in src.loras[src.lora2]:
            expected = by_hand(expected, src.loras[src.lora2], kohya_key, -0.4, 1.0)
        ours = text[name.removeprefix("text_model.") + ".kernel"] if prefix == "lora_te" else unet[name + ".kernel"]
        ours = ours.T if ours.ndim == 2 else ours.transpose(3, 2, 0, 1)
        assert rel_err(ours, expected) <= LORA_TOL, name


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_storage_dtypes_are_the_fp32_values_rounded(src, tmp_path, dtype):
    args = ("--base", src.sd, "--motion", src.adapter_dir)
    reference = converted(tmp_path, *args, name="fp32")
    out = converted(tmp_path, *args, "--dtype", dtype)
    assert json.loads((out / "config.json").read_text())["storage_dtype"] == dtype
    numpy_dtype = {"bf16": ml_dtypes.bfloat16, "fp16": np.float16}[dtype]
    for part in model_dir.PARTS:
        ours, full = stored(out, part), stored(reference, part)
        assert ours.keys() == full.keys() and {v.dtype for v in ours.values()} == {np.dtype(numpy_dtype)}
        bad = [k for k in full if not np.array_equal(ours[k], full[k].astype(numpy_dtype))]
        assert not bad, f"{part}: {bad[:5]}"
    md = model_dir.load_model_dir(out, parts=("unet",), tokenizer=False)  # stored bf16/fp16, computed in fp32
    assert md.unet.conv_in.kernel.get_value().dtype == jnp.float32


def test_extract_ema_from_a_ckpt(src, tmp_path):
    """A full training checkpoint (.ckpt, state_dict wrapper) with an EMA copy: --extract-ema takes the UNet from it."""
    unet, ema = randomize(tm.unet2d(TINY.unet), 40), randomize(tm.unet2d(TINY.unet), 41)
    vae, text = src.sd_models["vae"], src.sd_models["text_encoder"]
    ckpt = ldm_writer.ldm_checkpoint(torch_state(unet), unet.config, torch_state(vae), vae.config, torch_state(text),
                                     ema=torch_state(ema))
    torch.save({"state_dict": ckpt, "global_step": 1}, tmp_path / "v1-5-pruned.ckpt")
    common = ("--base", tmp_path / "v1-5-pruned.ckpt", "--config-from", src.sd, "--motion", src.pia)
    for flag, expected in (((), unet), (("--extract-ema",), ema)):
        out = converted(tmp_path, *common, *flag, name=f"out{len(flag)}")
        np.testing.assert_array_equal(stored(out)["down_blocks.1.resnets.0.conv2.kernel"],
                                      hwio(expected.down_blocks[1].resnets[0].conv2.weight.detach()))


# ---------------------------------------------------------------------------------------------------------------
# bad input: a clear message, a non-zero exit code, nothing left behind


def sdxl_file(path):
    save_file({"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": np.ones(8, np.float16),
               "model.diffusion_model.label_emb.0.0.weight": np.ones((8, 8), np.float16)}, str(path))


def sd2_file(path):
    save_file({"cond_stage_model.model.transformer.resblocks.0.ln_1.weight": np.ones(8, np.float16),
               "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight":
                   np.ones((320, 1024), np.float16)}, str(path))


def wide_motion_file(path):
    """AnimateDiff modules for a UNet of other widths (64, 128, 128)."""
    cfg = dataclasses.replace(TINY.unet, block_out_channels=(64, 128, 128))
    torch.save(ldm_writer.animatediff_checkpoint(torch_state(tm.motion_adapter(cfg)), 32), path)


def eight_channel_file(path, src):
    torch.save({k: torch.from_numpy(v[:, :8] if k == "conv_in.weight" else v) for k, v in src.pia_state.items()}, path)


def truncated(path, source):
    path.write_bytes(source.read_bytes()[: source.stat().st_size // 2])


def foreign_lora(path):
    """A kohya LoRA for a module no SD1.5 UNet has."""
    save_file({"lora_unet_input_blocks_99_1_proj.lora_down.weight": np.ones((4, 8), np.float32),
               "lora_unet_input_blocks_99_1_proj.lora_up.weight": np.ones((8, 4), np.float32)}, str(path))


def sdxl_folder(path, src):
    for part in ("unet", "vae", "text_encoder", "tokenizer"):
        (path / part).mkdir(parents=True)
        for file in (src.sd / part).glob("*.json"):
            (path / part / file.name).write_text(file.read_text())
    config = json.loads((path / "unet" / "config.json").read_text())
    (path / "unet" / "config.json").write_text(json.dumps({**config, "addition_embed_type": "text_time"}))


BAD = {  # name: (arguments after --out, writer of the bad file, parts of the expected message)
    "sdxl checkpoint": (lambda s, t: ["--base", t / "sdxl.safetensors", "--config-from", s.sd, "--motion", s.pia],
                        lambda s, t: sdxl_file(t / "sdxl.safetensors"), ["SDXL checkpoint", "SD1.x-family"]),
    "sdxl folder": (lambda s, t: ["--base", t / "sdxl", "--motion", s.pia], lambda s, t: sdxl_folder(t / "sdxl", s),
                    ["SDXL UNet", "SD1.5-family"]),
    "sd2 checkpoint": (lambda s, t: ["--base", t / "sd2.safetensors", "--config-from", s.sd, "--motion", s.pia],
                       lambda s, t: sd2_file(t / "sd2.safetensors"), ["Stable Diffusion 2.x", "OpenCLIP"]),
    "motion for other widths": (lambda s, t: ["--base", s.sd, "--motion", t / "mm.ckpt"],
                                lambda s, t: wide_motion_file(t / "mm.ckpt"),
                                ["motion modules are for a UNet with blocks (64, 128, 128)", "(32, 64, 64)"]),
    "motion with 8-channel conv_in": (lambda s, t: ["--base", s.sd, "--motion", t / "pia8.ckpt"],
                                      lambda s, t: eight_channel_file(t / "pia8.ckpt", s),
                                      ["conv_in takes 8 input channels", "PIA's takes 9"]),
    "truncated pia.ckpt": (lambda s, t: ["--base", s.sd, "--motion", t / "pia.ckpt"],
                           lambda s, t: truncated(t / "pia.ckpt", s.pia), ["pia.ckpt", "truncated, corrupt"]),
    "truncated single file": (lambda s, t: ["--base", t / "m.safetensors", "--config-from", s.sd, "--motion", s.pia],
                              lambda s, t: truncated(t / "m.safetensors", s.civitai),
                              ["m.safetensors", "truncated, corrupt"]),
    "garbage LoRA": (lambda s, t: ["--base", s.sd, "--motion", s.pia, "--lora", t / "x.safetensors"],
                     lambda s, t: (t / "x.safetensors").write_bytes(os.urandom(1000)), ["x.safetensors", "corrupt"]),
    "LoRA matching nothing": (lambda s, t: ["--base", s.sd, "--motion", s.pia, "--lora", t / "other.safetensors"],
                              lambda s, t: foreign_lora(t / "other.safetensors"),
                              ["none of its keys matches a module", "lora_unet_input_blocks_99_1_proj"]),
    "no --config-from": (lambda s, t: ["--base", s.civitai, "--motion", s.pia], None,
                         ["single-file base", "--config-from"]),
    "missing file": (lambda s, t: ["--base", s.sd, "--motion", t / "pia.ckpt"], None, ["pia.ckpt", "does not exist"]),
    "output under a file": (lambda s, t: ["--base", s.sd, "--motion", s.pia, "--out", t / "file" / "out"],  # last wins
                            lambda s, t: (t / "file").write_text("x"), ["cannot create the output",
                                                                       "not a writable folder"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_fails_clearly_and_leaves_nothing(src, tmp_path, capsys, case):
    arguments, write, message = BAD[case]
    if write is not None:
        write(src, tmp_path)
    before = sorted(tmp_path.rglob("*"))
    assert cli("--out", tmp_path / "models" / "pia", *arguments(src, tmp_path)) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and all(part in err for part in message), err
    assert sorted(tmp_path.rglob("*")) == before  # no output, no temporary sibling, no parent folder


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_unwritable_output_folder(src, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert cli("--out", locked / "pia", "--base", src.sd, "--motion", src.pia) == 1
    assert "not a writable folder" in capsys.readouterr().err and not any(locked.iterdir())


def test_existing_output_needs_force(src, tmp_path, capsys):
    out = tmp_path / "pia"
    out.mkdir()
    (out / "keep").write_text("mine")
    assert cli("--out", out, "--base", src.sd, "--motion", src.pia) == 1
    assert "already exists; pass --force" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["pia"] and [p.name for p in out.iterdir()] == ["keep"]


def test_killed_conversion_leftovers_are_removed(src, tmp_path, capsys):
    """A killed conversion leaves its hidden temporary folder (named after its process, now gone): the next
    conversion to the same output removes it and says so; one of a running process is left alone."""
    import subprocess
    dead = subprocess.Popen(["true"])
    dead.wait()  # its process id now belongs to no process
    stale = tmp_path / f".pia.{dead.pid}-0123abcd.tmp"
    running = tmp_path / f".pia.{os.getppid()}-0123abcd.tmp"
    for folder in (stale, running):
        folder.mkdir()
        (folder / "unet.safetensors").write_bytes(b"half")
    assert cli("--out", tmp_path / "pia", "--base", src.sd, "--motion", src.pia) == 0
    captured = capsys.readouterr()
    assert f"removed {stale}, left by an interrupted write (process {dead.pid})" in captured.err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([running.name, "pia"])


def failing_writer(monkeypatch, error):
    """The safetensors writer completes one part, then fails (disk full) or is interrupted (Ctrl-C)."""
    real = model_dir.write_safetensors

    def write(path, tensors, dtype=None):
        real(path, tensors, dtype)
        raise error

    monkeypatch.setattr(model_dir, "write_safetensors", write)


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_interrupted_conversion_leaves_nothing(src, tmp_path, monkeypatch, error):
    failing_writer(monkeypatch, error)
    request = Request(base=src.sd, motion=src.pia, out=tmp_path / "models" / "pia")
    with pytest.raises(type(error)):
        convert(request, log=lambda *_: None)
    assert not any(tmp_path.iterdir())


def test_force_replaces_only_with_a_complete_directory(src, tmp_path, monkeypatch, capsys):
    out = tmp_path / "pia"
    args = ("--out", out, "--base", src.sd, "--motion", src.pia)
    assert cli(*args) == 0
    (out / "keep").write_text("old model")
    with monkeypatch.context() as m:
        failing_writer(m, OSError(28, "No space left on device"))
        assert cli(*args, "--force", "--dtype", "bf16") == 1
    assert "No space left on device" in capsys.readouterr().err
    assert (out / "keep").is_file() and json.loads((out / "config.json").read_text())["storage_dtype"] == "fp32"
    assert cli(*args, "--force", "--dtype", "bf16") == 0
    assert not (out / "keep").exists() and json.loads((out / "config.json").read_text())["storage_dtype"] == "bf16"
    assert [p.name for p in tmp_path.iterdir()] == ["pia"]


# ---------------------------------------------------------------------------------------------------------------
# full size


def empty_sd15_models():
    """SD1.5's diffusers UNet, PIA adapter, VAE and CLIP on the meta device: names, shapes and configs, no memory."""
    from accelerate import init_empty_weights
    with init_empty_weights():
        n = len(SD15_PIA.vae.block_out_channels)
        vae = AutoencoderKL(block_out_channels=SD15_PIA.vae.block_out_channels, layers_per_block=2,
                            down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n)
        return (tm.unet2d(SD15_PIA.unet), tm.motion_adapter(SD15_PIA.unet), vae,
                CLIPTextModel(tm.clip_text_config(SD15_PIA.text)))


@pytest.fixture
def big_tmp(tmp_path):
    """tmp_path, removed afterwards: pytest keeps the folders of recent runs, and this one gets 6 GB."""
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_full_sd15_civitai_file_and_pia_ckpt(big_tmp):
    """The real SD1.5 + PIA architecture (860M UNet, 417M motion, 84M VAE, 123M CLIP parameters): a civitai-style fp16
    LDM file and an fp16 pia.ckpt, random weights, converted to fp16. Every parameter is written with its model's
    shape (the strict mapping, then this header check), and sampled tensors of each part equal their source exactly,
    located by the LDM / AnimateDiff names written out here by hand."""
    unet, adapter, vae, text = empty_sd15_models()
    configs = big_tmp / "stable-diffusion-v1-5"
    unet.save_config(configs / "unet")
    vae.save_config(configs / "vae")
    text.config.save_pretrained(configs / "text_encoder")
    write_vocab(configs / "tokenizer")
    rng = np.random.default_rng(0)
    pool = rng.standard_normal(48_000_000, dtype=np.float32).astype(np.float16)  # > the largest tensor (38M)

    def random(module):  # each tensor a distinct random window of the pool: no generation cost per tensor
        return {k: torch.from_numpy(pool[(o := rng.integers(len(pool) - v.numel() + 1)):o + v.numel()].reshape(v.shape))
                for k, v in module.state_dict().items()}

    ldm = ldm_writer.ldm_checkpoint(random(unet), unet.config, random(vae), vae.config, random(text))
    ldm = {k: v.numpy() for k, v in ldm.items()}
    save_file(ldm, str(big_tmp / "model.safetensors"))
    pia = {k: v.clone() for k, v in ldm_writer.animatediff_checkpoint(random(adapter), 32).items()}
    torch.save(pia, big_tmp / "pia.ckpt")
    pia = {k: v.numpy() for k, v in pia.items()}

    out = convert(Request(base=big_tmp / "model.safetensors", config_from=configs, motion=big_tmp / "pia.ckpt",
                          out=big_tmp / "out", dtype="fp16"), log=lambda *_: None)
    config = model_dir.read_config(out)[0]
    assert config == SD15_PIA
    for part, cls, cfg in (("unet", JaxUNet, config.unet), ("vae", JaxVAE, config.vae),
                           ("text_encoder", JaxText, config.text)):
        with safe_open(str(out / f"{part}.safetensors"), "np") as f:
            assert {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()} == param_shapes(
                abstract_model(cls, cfg)), part
    unet_key, vae_key = "model.diffusion_model.", "first_stage_model."
    text_key, mm = "cond_stage_model.transformer.text_model.", "temporal_transformer.transformer_blocks.0."
    expected = {"unet": {
        "conv_in.kernel": hwio(np.concatenate([ldm[unet_key + "input_blocks.0.0.weight"], pia["conv_in.weight"][:, 4:]],
                                              axis=1)),
        "conv_in.bias": ldm[unet_key + "input_blocks.0.0.bias"],
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.kernel":
            ldm[unet_key + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"].T,
        "up_blocks.3.resnets.2.conv_shortcut.kernel": hwio(ldm[unet_key + "output_blocks.11.0.skip_connection.weight"]),
        "up_blocks.2.upsamplers.0.conv.kernel": hwio(ldm[unet_key + "output_blocks.8.2.conv.weight"]),
        "mid_block.resnets.1.time_emb_proj.kernel": ldm[unet_key + "middle_block.2.emb_layers.1.weight"].T,
        "down_blocks.3.motion_modules.1.transformer_blocks.0.ff.net.0.proj.kernel":
            pia[f"down_blocks.3.motion_modules.1.{mm}ff.net.0.proj.weight"].T,
        "up_blocks.0.motion_modules.2.transformer_blocks.0.norm3.scale":
            pia[f"up_blocks.0.motion_modules.2.{mm}ff_norm.weight"],
        "up_blocks.3.motion_modules.0.transformer_blocks.0.attn2.to_out.0.kernel":
            pia[f"up_blocks.3.motion_modules.0.{mm}attention_blocks.1.to_out.0.weight"].T,
    }, "vae": {
        "decoder.up_blocks.0.resnets.2.conv1.kernel": hwio(ldm[vae_key + "decoder.up.3.block.2.conv1.weight"]),
        "encoder.mid_block.attentions.0.to_q.kernel": ldm[vae_key + "encoder.mid.attn_1.q.weight"][:, :, 0, 0].T,
        "quant_conv.kernel": hwio(ldm[vae_key + "quant_conv.weight"]),
    }, "text_encoder": {
        "embeddings.token_embedding.embedding": ldm[text_key + "embeddings.token_embedding.weight"],
        "encoder.layers.11.self_attn.q_proj.kernel": ldm[text_key + "encoder.layers.11.self_attn.q_proj.weight"].T,
        "final_layer_norm.bias": ldm[text_key + "final_layer_norm.bias"],
    }}
    for part, tensors in expected.items():
        with safe_open(str(out / f"{part}.safetensors"), "np") as f:
            for name, value in tensors.items():
                np.testing.assert_array_equal(f.get_tensor(name), value, err_msg=f"{part} {name}")
