"""LDM single-file conversion against diffusers' own single-file loaders.

Random-weight diffusers/transformers models are written as LDM checkpoints by an independent test-side writer
(tests/ldm_writer.py); our converted dicts must equal both the models the file came from and what diffusers'
`from_single_file` loaders build from the same file. Conversion only renames and reshapes tensors, so every
comparison is exact (np.array_equal, every key on both sides). Everything is local: `config=` points at folders
holding the models' config.json, with local_files_only=True.
"""

import dataclasses

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    create_diffusers_clip_model_from_ldm,
    load_single_file_checkpoint,
)
from transformers import CLIPTextModel

from pia_jax import weights
from pia_jax.models.abstract import abstract_model
from pia_jax.models.config import SD15_PIA, TINY
from pia_jax.weights.convert.ldm import convert_ldm_vae, split_ldm_checkpoint
from tests import ldm_writer
from tests import torch_models as tm
from tests.oracle import numpy_state, randomize


def text_keys(sd: dict) -> dict:
    """transformers >= 5.6 keeps CLIPTextModel's weights without the `text_model.` level that files have."""
    return {k.removeprefix("text_model."): v for k, v in sd.items()}


def assert_same(ours: dict, expected: dict, what: str):
    """Exact equality, key by key (values compared after numpy promotion, so fp16 in a file equals its exact fp32
    upcast in a model)."""
    assert ours.keys() == expected.keys(), f"{what}: keys differ: {sorted(set(ours) ^ set(expected))[:10]}"
    bad = [k for k in expected if not np.array_equal(ours[k], expected[k])]
    assert not bad, f"{what}: {len(bad)} of {len(expected)} tensors differ, e.g. {bad[:5]}"


def oracle_parts(path_or_dict, configs, **kwargs) -> dict:
    """What diffusers' single-file loaders make of a checkpoint: UNet, VAE and (as its pipeline loader does) CLIP."""
    checkpoint = (load_single_file_checkpoint(str(path_or_dict), local_files_only=True)
                  if not isinstance(path_or_dict, dict) else path_or_dict)
    unet = UNet2DConditionModel.from_single_file(checkpoint, config=str(configs / "unet"), local_files_only=True,
                                                 **kwargs)
    vae = AutoencoderKL.from_single_file(checkpoint, config=str(configs / "vae"), local_files_only=True)
    text = create_diffusers_clip_model_from_ldm(CLIPTextModel, checkpoint, config=str(configs), local_files_only=True,
                                                subfolder="text_encoder")
    return {"unet": numpy_state(unet), "vae": numpy_state(vae), "text_encoder": text_keys(numpy_state(text))}


def save(sd: dict, path, dtype=None):
    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file
        save_file(sd, str(path))
    else:
        torch.save({"state_dict": sd, "global_step": 10}, path)
    return path


def save_configs(folder, unet, vae, text):
    unet.save_config(folder / "unet")
    vae.save_config(folder / "vae")
    text.config.save_pretrained(folder / "text_encoder")
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    models = {"unet": randomize(tm.unet2d(TINY.unet), 1), "ema": randomize(tm.unet2d(TINY.unet), 2),
              "vae": tm.vae(TINY.vae, 3), "text_encoder": tm.clip_text(TINY.text, 4)}
    folder = tmp_path_factory.mktemp("ldm")
    save_configs(folder, models["unet"], models["vae"], models["text_encoder"])
    states = {part: {k: v.detach() for k, v in m.state_dict().items()} for part, m in models.items()}
    expected = {part: numpy_state(m) for part, m in models.items()}
    expected["text_encoder"] = text_keys(expected["text_encoder"])
    ldm = ldm_writer.ldm_checkpoint(states["unet"], models["unet"].config, states["vae"], models["vae"].config,
                                    states["text_encoder"])
    return dict(folder=folder, models=models, states=states, expected=expected, ldm=ldm)


def split(sd, **kwargs):
    return split_ldm_checkpoint({k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in sd.items()},
                                TINY.unet, TINY.vae, **kwargs)


@pytest.mark.parametrize("name,dtype", [("model.ckpt", torch.float32), ("model.safetensors", torch.float16)])
def test_tiny_file_matches_diffusers_single_file(tiny, tmp_path, name, dtype):
    path = save(tiny["ldm"], tmp_path / name, dtype)
    parts, report = split_ldm_checkpoint(weights.read_state_dict(path), TINY.unet, TINY.vae)
    assert report == {"converted": {"unet": 494, "vae": 124, "text_encoder": 36},
                      "ignored": {"ddpm schedule": 12, "text position_ids": 1}}
    oracle, stored = oracle_parts(path, tiny["folder"]), np.dtype(str(dtype).removeprefix("torch."))
    for part in ("unet", "vae", "text_encoder"):
        ours = text_keys(parts[part]) if part == "text_encoder" else parts[part]
        assert {v.dtype for v in ours.values()} == {stored}  # no silent casts
        assert_same(ours, oracle[part], f"{part} vs diffusers")
        source = {k: v.astype(stored) for k, v in tiny["expected"][part].items()}
        assert_same(ours, source, f"{part} vs the source model")


def test_ema_weights_extracted_only_on_request(tiny, tmp_path):
    sd = ldm_writer.ldm_checkpoint(tiny["states"]["unet"], tiny["models"]["unet"].config,
                                   ema=tiny["states"]["ema"])
    path = save(sd, tmp_path / "ema.ckpt")
    checkpoint = weights.read_state_dict(path)
    raw, report = split_ldm_checkpoint(checkpoint, TINY.unet, TINY.vae)
    assert report["ignored"] == {"ddpm schedule": 12, "ema bookkeeping": 2, "ema unet (not extracted)": 494}
    ema, report = split_ldm_checkpoint(checkpoint, TINY.unet, TINY.vae, extract_ema=True)
    assert report["ignored"] == {"ddpm schedule": 12, "ema bookkeeping": 2, "non-ema unet (replaced)": 494}
    assert raw.keys() == ema.keys() == {"unet"}
    assert_same(raw["unet"], tiny["expected"]["unet"], "non-EMA UNet vs its source")
    assert_same(ema["unet"], tiny["expected"]["ema"], "EMA UNet vs its source")
    folder = str(tiny["folder"] / "unet")
    for extract, ours in ((False, raw), (True, ema)):
        ref = UNet2DConditionModel.from_single_file(str(path), config=folder, local_files_only=True,
                                                    extract_ema=extract)
        assert_same(ours["unet"], numpy_state(ref), f"extract_ema={extract} vs diffusers")


def test_extract_ema_on_a_file_without_ema_weights_fails(tiny):
    with pytest.raises(weights.WeightLoadError, match="no model_ema.* weights.*emaonly.*extract_ema=False"):
        split(tiny["ldm"], extract_ema=True)
    sd = ldm_writer.ldm_checkpoint(tiny["states"]["unet"], tiny["models"]["unet"].config, ema=tiny["states"]["ema"])
    gone = sorted(k for k in sd if k.startswith("model_ema.diffusion_modelinput_blocks"))[:12]
    with pytest.raises(weights.WeightLoadError) as err:
        split({k: v for k, v in sd.items() if k not in gone}, extract_ema=True)
    assert "12 UNet weights have no EMA copy" in str(err.value) and gone[0] in str(err.value)
    assert "... and 2 more" in str(err.value)


def test_text_encoder_without_text_model_level(tiny):
    """Files written with old transformers versions lack `text_model.`; diffusers' CLIP loader does not recognize
    them (it looks for cond_stage_model.transformer.text_model.*), so the source model is the reference here."""
    sd = ldm_writer.ldm_checkpoint(text=tiny["states"]["text_encoder"], legacy_text=True, schedule=False)
    assert not any(".text_model." in k for k in sd)
    parts, report = split(sd)
    assert parts.keys() == {"text_encoder"} and report["ignored"] == {"text position_ids": 1}
    assert all(k.startswith("text_model.") for k in parts["text_encoder"])
    assert_same(text_keys(parts["text_encoder"]), tiny["expected"]["text_encoder"], "legacy text encoder")


def test_separate_vae_file(tiny, tmp_path):
    """A vae-ft-mse-840000-ema-pruned.ckpt-like file: LDM keys without prefix, plus the training loss's tensors."""
    vae, config = tiny["states"]["vae"], tiny["models"]["vae"].config
    path = save(ldm_writer.vae_file(vae, config), tmp_path / "vae.ckpt")
    ours, report = convert_ldm_vae(weights.read_state_dict(path), TINY.vae)
    assert report == {"converted": {"vae": 124}, "ignored": {"vae training loss": 3}}
    ref = AutoencoderKL.from_single_file(str(path), config=str(tiny["folder"] / "vae"), local_files_only=True)
    assert_same(ours, numpy_state(ref), "separate VAE vs diffusers")
    assert_same(ours, tiny["expected"]["vae"], "separate VAE vs its source")
    prefixed = {k: v.numpy() for k, v in ldm_writer.vae_file(vae, config, prefix="first_stage_model.").items()}
    assert_same(convert_ldm_vae(prefixed, TINY.vae)[0], ours, "prefixed VAE file")
    diffusers_named = tiny["expected"]["vae"]
    assert_same(convert_ldm_vae(diffusers_named, TINY.vae)[0], diffusers_named, "diffusers VAE passed through")


def test_converted_parts_load_strictly_into_our_models(tiny):
    """End to end for the VAE and text encoder. (The UNet dict equals diffusers' UNet2DConditionModel state dict
    above, and test_weights loads those; building our UNet here would cost ~10 s of tracing.)"""

    from pia_jax.models.text_encoder import CLIPTextModel as OurText
    from pia_jax.models.vae import AutoencoderKL as OurVAE
    parts, _ = split(tiny["ldm"])
    for cls, config, keymap in ((OurVAE, TINY.vae, weights.DIFFUSERS_VAE),
                                (OurText, TINY.text, weights.TRANSFORMERS_CLIP_TEXT)):
        part = "vae" if cls is OurVAE else "text_encoder"
        weights.load_state_dict(abstract_model(cls, config), parts[part], keymap)


def zeros(*shape):
    return np.broadcast_to(np.zeros((), np.float32), shape)  # any shape, no memory


def wrong_kinds(ldm: dict) -> dict:
    """name -> (state dict, substrings the error must contain)."""
    unet_key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    proj_in = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    mm = "down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.pos_encoder.pe"
    return {
        "sdxl": ({"conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight": zeros(77, 768),
                  "model.diffusion_model.label_emb.0.0.weight": zeros(1280, 2816)}, ["SDXL", "SD1.x"]),
        "sd2_openclip": ({**ldm, "cond_stage_model.model.token_embedding.weight": zeros(49408, 1024)},
                         ["Stable Diffusion 2.x", "OpenCLIP"]),
        "sd2_cross_attention": ({**ldm, unet_key: zeros(32, 1024)}, ["2.x", "1024-d cross-attention"]),
        "sd2_linear_proj_in": ({**ldm, proj_in: zeros(32, 32)}, ["2.x", "linear proj_in"]),
        "cross_attention_dim": ({**ldm, unet_key: zeros(32, 48)}, ["48-d text features", "expects 32"]),
        "inpainting": ({**ldm, "model.diffusion_model.input_blocks.0.0.weight": zeros(32, 9, 3, 3)},
                       ["9 input channels", "inpainting model", "not a PIA base"]),
        "motion_module": ({mm: zeros(1, 32, 320)}, ["not an LDM", "motion modules"]),
        "lora": ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": zeros(4, 320)},
                 ["not an LDM", "a LoRA"]),
        "diffusers_unet": ({"down_blocks.0.resnets.0.conv1.weight": zeros(320, 320, 3, 3)}, ["a diffusers UNet"]),
        "stray_keys": ({**ldm, **{f"model.diffusion_model.extra.{i}.weight": zeros(1) for i in range(11)},
                        "mystery": zeros(1)}, ["12 checkpoint tensors match no conversion rule",
                                               "model.diffusion_model.extra.0.weight", "... and 2 more"]),
    }


@pytest.mark.parametrize("case", ["sdxl", "sd2_openclip", "sd2_cross_attention", "sd2_linear_proj_in",
                                  "cross_attention_dim", "inpainting", "motion_module", "lora", "diffusers_unet",
                                  "stray_keys"])
def test_wrong_checkpoints_are_named(tiny, case):
    sd, expected = wrong_kinds({k: v.numpy() for k, v in tiny["ldm"].items()})[case]
    with pytest.raises(weights.WeightLoadError) as err:
        split(sd)
    for part in expected:
        assert part in str(err.value), (part, str(err.value))


def test_config_that_does_not_fit_the_file_lists_keys(tiny):
    with pytest.raises(weights.WeightLoadError) as err:
        split_ldm_checkpoint({k: v.numpy() for k, v in tiny["ldm"].items()},
                             dataclasses.replace(TINY.unet, layers_per_block=1), TINY.vae)
    assert "UNet: 3 blocks of 1 layers" in str(err.value) and "model.diffusion_model.input_blocks" in str(err.value)


def test_wrong_vae_files_are_named(tiny):
    with pytest.raises(weights.WeightLoadError, match="whole SD checkpoint"):
        convert_ldm_vae({k: v.numpy() for k, v in tiny["ldm"].items()}, TINY.vae)
    with pytest.raises(weights.WeightLoadError, match="not a VAE checkpoint: it looks like a LoRA"):
        convert_ldm_vae({"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": zeros(64, 4)}, TINY.vae)


def fast_random_unet(cfg, seed):
    """A UNet built without running its initializers, then every parameter uniform in [-1, 1) (seeded), in fp16:
    at 860M parameters this is several times faster than initializing and tests.oracle.randomize."""
    from accelerate import init_empty_weights
    with init_empty_weights():
        model = tm.unet2d(cfg)
    model = model.half().to_empty(device="cpu")  # dtype first: on meta tensors it costs nothing
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-1, 1, generator=g)
    return model.eval()


def test_sd15_size_checkpoint_matches_diffusers_single_file(tmp_path):
    """The full SD1.5 layout (4 blocks, 2 layers, 12 text layers) in fp16, against the same loaders. The checkpoint
    dict goes to both sides in memory (from_single_file takes a dict); the tiny tests cover the file formats."""
    models = {"unet": fast_random_unet(SD15_PIA.unet, 1), "vae": tm.vae(SD15_PIA.vae, 2).half(),
              "text_encoder": tm.clip_text(SD15_PIA.text, 3).half()}
    folder = save_configs(tmp_path, *models.values())
    sd = ldm_writer.ldm_checkpoint(models["unet"].state_dict(), models["unet"].config, models["vae"].state_dict(),
                                   models["vae"].config, models["text_encoder"].state_dict())
    parts, report = split_ldm_checkpoint({k: v.numpy() for k, v in sd.items()}, SD15_PIA.unet, SD15_PIA.vae)
    assert report["converted"] == {"unet": 686, "vae": 248, "text_encoder": 196}
    oracle = oracle_parts(sd, folder, torch_dtype=torch.float16)
    for part in ("unet", "vae", "text_encoder"):
        assert_same(text_keys(parts[part]) if part == "text_encoder" else parts[part], oracle[part], part)
