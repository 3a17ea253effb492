"""LoRA merging against diffusers' own loader (`load_lora_weights` + `fuse_lora`) on a tiny SD1.5-shaped UNet and CLIP
text encoder, and against hand computations where diffusers differs from kohya or does not load a case."""

import copy
import json
import re

import diffusers
import numpy as np
import pytest
from peft import LoraConfig
from safetensors.numpy import save_file

from pia_jax.models.config import TINY
from pia_jax.weights import WeightLoadError
from pia_jax.weights.convert.lora import merge_loras, read_lora
from tests.helpers import by_hand, kohya, modules, te_state
from tests.oracle import numpy_state, randomize, rel_err
from tests.torch_models import clip_text, unet2d

# Both sides compute W + s * (up @ down) in float32 from the same float32 factors; only the summation order of the
# rank-r products (BLAS matmul here, peft's conv2d for 3x3 kernels) and the rounding of s may differ: a few ulps of
# max|W| (the random deltas are O(|W|)), so 1e-6 * max|W| per tensor. Measured: bit-identical. A missing alpha/rank,
# a squared multiplier or a delta on the wrong module gives O(0.1).
TOL = 1e-6

# peft's warnings about a second adapter in one model and, in the LDM test, a module diffusers' mapping drops
pytestmark = pytest.mark.filterwarnings("ignore:::peft")


@pytest.fixture(scope="module")
def base():
    unet, text = randomize(unet2d(TINY.unet), seed=0).eval(), clip_text(TINY.text, seed=1)
    return unet, text, numpy_state(unet), te_state(text)


def save(tmp_path, name, lora, metadata=None):
    path = tmp_path / f"{name}.safetensors"
    save_file(lora, str(path), metadata=metadata)
    return path


def diffusers_merge(base, paths, multipliers, **load_kwargs):
    """diffusers' fused weights: load_lora_weights per file, set_adapters with the multipliers, fuse_lora."""
    unet, text, _, _ = base
    pipe = diffusers.StableDiffusionPipeline(
        vae=None, text_encoder=copy.deepcopy(text), tokenizer=None, unet=copy.deepcopy(unet), scheduler=None,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    names = [f"lora{i}" for i in range(len(paths))]
    for name, path in zip(names, paths):
        pipe.load_lora_weights(str(path), adapter_name=name, **load_kwargs)
    pipe.set_adapters(names, adapter_weights=list(multipliers))
    pipe.fuse_lora(adapter_names=names)
    pipe.unload_lora_weights()
    return numpy_state(pipe.unet), te_state(pipe.text_encoder)


def assert_merged(ours, expected, original, skip=()):
    """Same keys, every tensor within TOL, and the same (non-empty) set of changed tensors."""
    assert ours.keys() == expected.keys() == original.keys()
    changed = {k for k in original if not np.array_equal(expected[k], original[k])} - set(skip)
    assert changed and changed == {k for k in original if not np.array_equal(ours[k], original[k])} - set(skip)
    for k in changed:
        assert ours[k].dtype == original[k].dtype and rel_err(ours[k], expected[k]) <= TOL, k


def test_kohya_locon_lora_on_every_module_matches_diffusers(base, tmp_path):
    """Every linear/conv of the UNet (attention, ff, 1x1 proj_in/out and shortcuts, 3x3 resnet/sampler/conv_in/out
    LoCon, time embedding) and of the text encoder, alpha != rank, multiplier 0.7."""
    _, _, unet, text = base
    before = {k: v.copy() for k, v in {**unet, **text}.items()}
    lora = {**kohya(unet, "lora_unet", modules(unet), seed=0), **kohya(text, "lora_te", modules(text), seed=1)}
    ours_unet, ours_text, [report] = merge_loras(unet, text, [(lora, 0.7)])
    ref_unet, ref_text = diffusers_merge(base, [save(tmp_path, "a", lora)], [0.7])
    assert_merged(ours_unet, ref_unet, unet)
    assert_merged(ours_text, ref_text, text)
    assert sorted(report.unet) == sorted(modules(unet)) and sorted(report.text_encoder) == sorted(modules(text))
    assert report.ignored == {}
    assert all(np.array_equal(v, before[k]) for k, v in {**unet, **text}.items())  # inputs untouched
    assert ours_unet["conv_norm_out.weight"] is unet["conv_norm_out.weight"]  # unchanged tensors are not copied


def test_two_loras_at_once_match_diffusers(base, tmp_path):
    _, _, unet, text = base
    attention = [m for m in modules(unet) if ".attn" in m]
    first = {**kohya(unet, "lora_unet", attention, seed=2), **kohya(text, "lora_te", modules(text), seed=3)}
    second = kohya(unet, "lora_unet", attention[::2] + [m for m in modules(unet) if "resnets" in m], seed=4, rank=8,
                   alpha=16.0, conv_rank=3, conv_alpha=1.0)
    ours_unet, ours_text, reports = merge_loras(unet, text, [(first, 0.7), (second, -0.4)])
    ref_unet, ref_text = diffusers_merge(base, [save(tmp_path, "a", first), save(tmp_path, "b", second)], [0.7, -0.4])
    assert_merged(ours_unet, ref_unet, unet)
    assert_merged(ours_text, ref_text, text)
    assert [len(r.unet) for r in reports] == [len(attention), len(second) // 3]
    assert [len(r.text_encoder) for r in reports] == [len(modules(text)), 0]


def test_per_module_alpha_and_missing_alpha(base):
    """kohya scales each module by its own alpha / rank, and by 1 without `.alpha`. diffusers' loader does not for
    attention projections: its alpha_pattern names them `...attn1.processor.to_q_lora.down.weight` (UNet) or
    `...self_attn` (text encoder), which match no peft module, so they get the file's most common alpha instead. Hence
    a hand computation here."""
    _, _, unet, text = base
    q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    names = [(unet, "lora_unet", q, 1.0), (unet, "lora_unet", q.replace("to_q", "to_k"), 6.0),
             (text, "lora_te", "text_model.encoder.layers.0.self_attn.q_proj", 0.5),
             (text, "lora_te", "text_model.encoder.layers.1.mlp.fc2", None)]
    lora = {}
    for i, (state, prefix, name, alpha) in enumerate(names):
        lora.update(kohya(state, prefix, [name], seed=10 + i, rank=4, alpha=alpha))
    merged_unet, merged_text, _ = merge_loras(unet, text, [(lora, 0.7)])
    for state, prefix, name, alpha in names:
        merged = merged_unet if prefix == "lora_unet" else merged_text
        expected = by_hand(state[name + ".weight"], lora, f"{prefix}_{name.replace('.', '_')}", 0.7,
                           (alpha or 4) / 4)
        assert rel_err(merged[name + ".weight"], expected) <= TOL, name


def test_legacy_alpha_is_the_pia_repo_merge(base):
    """PIA's convert_lora_model_level: W += multiplier * up @ down, the file's alpha and the rank ignored."""
    _, _, unet, text = base
    names = {"lora_unet": ["down_blocks.1.resnets.0.conv1", "up_blocks.2.attentions.1.proj_out",
                           "mid_block.attentions.0.transformer_blocks.0.attn2.to_v"],
             "lora_te": ["text_model.encoder.layers.1.self_attn.out_proj"]}
    lora = {**kohya(unet, "lora_unet", names["lora_unet"], seed=5), **kohya(text, "lora_te", names["lora_te"], seed=6)}
    merged_unet, merged_text, _ = merge_loras(unet, text, [(lora, 0.8)], legacy_alpha=True)
    for prefix, merged, state in (("lora_unet", merged_unet, unet), ("lora_te", merged_text, text)):
        for name in names[prefix]:
            expected = by_hand(state[name + ".weight"], lora, f"{prefix}_{name.replace('.', '_')}", 0.8, 1.0)
            assert rel_err(merged[name + ".weight"], expected) <= TOL, name


def test_1x1_factors_in_either_layout(base):
    """A LoRA for a 1x1 conv (SD1.5's proj_in/proj_out, conv_shortcut) may be stored linear-shaped (r, in), and one for
    a linear conv-shaped (r, in, 1, 1); both merge as their counterpart. (diffusers' loader rejects the first with a
    size mismatch, so the reference is the other layout, itself checked against diffusers above.)"""
    _, _, unet, text = base
    names = [m for m in modules(unet) if m.endswith(("proj_in", "proj_out", "conv_shortcut", "attn1.to_q"))]
    reference = kohya(unet, "lora_unet", names, seed=7)
    swapped = {k: v[..., None, None] if "_attn1_to_q." in k and v.ndim == 2 else v  # same values, other layouts
               for k, v in kohya(unet, "lora_unet", names, seed=7, layout_1x1="linear").items()}
    assert {v.ndim for k, v in swapped.items() if "proj_in.lora" in k} == {2}
    assert {v.ndim for k, v in swapped.items() if "to_q.lora" in k} == {4}
    expected, _, _ = merge_loras(unet, text, [(reference, 0.7)])
    merged, _, _ = merge_loras(unet, text, [(swapped, 0.7)])
    assert all(np.array_equal(merged[k], expected[k]) for k in unet)


def test_diffusers_formats_match_diffusers(base, tmp_path):
    """diffusers/peft-format files: peft's lora_A/lora_B with the alphas in the safetensors metadata (a uniform one
    and a per-module alpha_pattern), and, without metadata (alpha = rank), the older lora.down/lora_linear_layer and
    attention-processor (`processor.to_q_lora.down`) names."""
    _, _, unet, text = base
    rng = np.random.default_rng(8)
    peft = {}
    for prefix, state, names in (("unet", unet, [m for m in modules(unet) if m.startswith("down_blocks.0.")]),
                                 ("text_encoder", text, modules(text))):
        for name in names:
            out, fan_in, *kernel = state[name + ".weight"].shape
            key = f"{prefix}.{name.removeprefix('text_model.')}"  # as peft saves a transformers 5 CLIPTextModel
            r = 2 if kernel == [3, 3] else 4
            peft[f"{key}.lora_A.weight"] = (0.1 * rng.standard_normal((r, fan_in, *kernel))).astype(np.float32)
            peft[f"{key}.lora_B.weight"] = (0.1 * rng.standard_normal((out, r) + (1, 1) * bool(kernel))).astype(
                np.float32)
    # what diffusers' save_lora_weights writes: each component's peft LoraConfig, keys prefixed with the component
    configs = {"unet": LoraConfig(r=4, lora_alpha=8, alpha_pattern={"proj_in": 2, "conv1": 3},
                                  rank_pattern={"conv1": 2, "conv2": 2, "downsamplers.0.conv": 2}),
               "text_encoder": LoraConfig(r=4, lora_alpha=3)}
    metadata = {f"{prefix}.{k}": v for prefix, config in configs.items() for k, v in config.to_dict().items()}
    for prefix in configs:
        metadata[f"{prefix}.target_modules"] = sorted({k.split(".lora_")[0].removeprefix(prefix + ".") for k in peft
                                                        if k.startswith(prefix + ".")})
    path = save(tmp_path, "peft", peft, {"lora_adapter_metadata": json.dumps(metadata, default=list)})
    merged_unet, merged_text, _ = merge_loras(unet, text, [(read_lora(path), 0.7)])
    ref_unet, ref_text = diffusers_merge(base, [path], [0.7])
    assert_merged(merged_unet, ref_unet, unet)
    assert_merged(merged_text, ref_text, text)

    for variant in ("lora.down", "processor"):
        lora = {old_diffusers_name(k, variant == "processor"): v for k, v in peft.items()}
        assert len(lora) == len(peft) and lora.keys() != peft.keys()
        merged_unet, merged_text, _ = merge_loras(unet, text, [(lora, 0.7)])
        ref_unet, ref_text = diffusers_merge(base, [save(tmp_path, variant, lora)], [0.7])
        assert_merged(merged_unet, ref_unet, unet)
        assert_merged(merged_text, ref_text, text)


def old_diffusers_name(key, attention_processors):
    """peft's lora_A/lora_B key in the older diffusers names: lora.down/up (UNet), lora_linear_layer.down/up (text
    encoder) and, before diffusers 0.14, attention processors' to_q_lora.down/up (with `processor.` in the UNet)."""
    def down_up(m):
        return "down" if m[m.lastindex] == "A" else "up"
    if attention_processors:
        key = re.sub(r"\.(to_[qkv]|to_out)(?:\.0)?\.lora_([AB])\.", lambda m: f".processor.{m[1]}_lora.{down_up(m)}.",
                     key)
        key = re.sub(r"\.([qkv]|out)_proj\.lora_([AB])\.", lambda m: f".to_{m[1]}_lora.{down_up(m)}.", key)
    layer = "lora_linear_layer" if key.startswith("text_encoder.") else "lora"
    return re.sub(r"\.lora_([AB])\.", lambda m: f".{layer}.{down_up(m)}.", key)


def test_fp16_factors_and_fp16_weights(base, tmp_path):
    """fp16 LoRA tensors (diffusers upcasts them to the fp32 model's dtype: same merge), and fp16 base weights: the
    merge runs in fp32 and rounds once, to the fp16 of the exact result."""
    _, _, unet, text = base
    names = [m for m in modules(unet) if m.startswith("up_blocks.1.")]
    lora = kohya(unet, "lora_unet", names, seed=9, dtype=np.float16)
    merged_unet, _, _ = merge_loras(unet, text, [(lora, 0.7)])
    ref_unet, _ = diffusers_merge(base, [save(tmp_path, "fp16", lora)], [0.7])
    assert_merged(merged_unet, ref_unet, unet)

    half = {k: v.astype(np.float16) for k, v in unet.items()}
    merged, _, _ = merge_loras(half, text, [(lora, 0.7)])
    for name in names:
        r = 2 if half[name + ".weight"].shape[2:] == (3, 3) else 4
        exact = by_hand(half[name + ".weight"].astype(np.float64), lora, f"lora_unet_{name.replace('.', '_')}", 0.7,
                        (1.5 if r == 2 else 2.0) / r)
        # an fp32 merge rounded once to fp16: within one fp16 ulp (<= 2^-10 relative) of the exact result
        assert merged[name + ".weight"].dtype == np.float16
        assert np.all(np.abs(merged[name + ".weight"] - exact) <= 2.0 ** -10 * np.abs(exact) + 2.0 ** -24), name


# Original-SD (LDM) names of the tiny UNet's modules (3 levels, 2 layers per block; SD1.5 has 4 levels), written out
# by hand from the LDM UNet's layout: input_blocks 1-2 | 3 (op) | 4-5 | 6 (op) | 7-8, output_blocks 3 per level.
LDM_NAMES = {
    "input_blocks_0_0": "conv_in",
    "time_embed_0": "time_embedding_linear_1",
    "time_embed_2": "time_embedding_linear_2",
    "input_blocks_1_0_in_layers_2": "down_blocks_0_resnets_0_conv1",
    "input_blocks_2_1_transformer_blocks_0_attn2_to_k": "down_blocks_0_attentions_1_transformer_blocks_0_attn2_to_k",
    "input_blocks_3_0_op": "down_blocks_0_downsamplers_0_conv",
    "input_blocks_4_0_skip_connection": "down_blocks_1_resnets_0_conv_shortcut",
    "input_blocks_5_1_proj_in": "down_blocks_1_attentions_1_proj_in",
    "input_blocks_8_0_emb_layers_1": "down_blocks_2_resnets_1_time_emb_proj",
    "middle_block_0_out_layers_3": "mid_block_resnets_0_conv2",
    "middle_block_1_transformer_blocks_0_ff_net_2": "mid_block_attentions_0_transformer_blocks_0_ff_net_2",
    "middle_block_2_in_layers_2": "mid_block_resnets_1_conv1",
    "output_blocks_2_0_skip_connection": "up_blocks_0_resnets_2_conv_shortcut",
    "output_blocks_2_1_conv": "up_blocks_0_upsamplers_0_conv",  # no attention in this level: upsampler at index 1
    "output_blocks_3_1_proj_out": "up_blocks_1_attentions_0_proj_out",
    "output_blocks_5_2_conv": "up_blocks_1_upsamplers_0_conv",
    "output_blocks_8_1_transformer_blocks_0_ff_net_2": "up_blocks_2_attentions_2_transformer_blocks_0_ff_net_2",
    "out_2": "conv_out",
}


def test_ldm_named_kohya_lora(base, tmp_path):
    """An LDM-named kohya LoRA merges as the same LoRA with diffusers names. diffusers (given unet_config, which maps
    LDM blocks) agrees on all modules but one: its mapping sends output_blocks_2_1_conv (the upsampler of an up block
    without attentions) to `attentions` and silently drops it."""
    _, _, unet, text = base
    by_kohya_name = {m.replace(".", "_"): m for m in modules(unet)}
    names = [by_kohya_name[v] for v in LDM_NAMES.values()]
    lora = kohya(unet, "lora_unet", names, seed=11)
    to_ldm = {f"lora_unet_{v}": f"lora_unet_{k}" for k, v in LDM_NAMES.items()}
    ldm = {to_ldm[k.split(".")[0]] + k[k.index("."):]: v for k, v in lora.items()}
    reference, _, _ = merge_loras(unet, text, [(lora, 0.7)])
    merged, _, [report] = merge_loras(unet, text, [(ldm, 0.7)])
    assert all(np.array_equal(merged[k], reference[k]) for k in unet) and sorted(report.unet) == sorted(names)
    ref_unet, _ = diffusers_merge(base, [save(tmp_path, "ldm", ldm)], [0.7], unet_config=base[0].config)
    dropped = "up_blocks.0.upsamplers.0.conv.weight"
    assert np.array_equal(ref_unet[dropped], unet[dropped])
    assert_merged(merged, ref_unet, unet, skip={dropped})


def test_bundled_embeddings_are_ignored_and_reported(base):
    _, _, unet, text = base
    lora = kohya(text, "lora_te", ["text_model.encoder.layers.0.mlp.fc1"], seed=12)
    lora["bundle_emb.mystyle.string_to_param.*"] = np.zeros((2, 32), np.float32)
    _, _, [report] = merge_loras(unet, text, [(lora, 1.0)])
    assert report.text_encoder == ["text_model.encoder.layers.0.mlp.fc1"] and report.unet == []
    assert list(report.ignored) == ["bundle_emb.mystyle.string_to_param.*"]


QKV = [f"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_{x}" for x in "qkv"]
Q = "lora_unet_" + QKV[0].replace(".", "_")
K = Q.replace("attn1_to_q", "attn2_to_k")
Z = np.zeros((4, 32), np.float32)
# case: (a broken copy of a valid kohya LoRA `good` for QKV and two text encoder layers, what the error must say)
BAD = {
    "sdxl": (lambda good: {**good, "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": Z,
                           "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": Z},
             ["this looks like an SDXL LoRA", "PIA uses SD1.5", "'lora_te1_text_model_encoder_layers_0_mlp_fc1"]),
    "loha": (lambda good: {f"{Q}.hada_w1_a": Z, f"{Q}.hada_w1_b": Z, f"{Q}.alpha": np.float32(1)},
             ["LyCORIS LoHa", f"'{Q}.hada_w1_a'", "expected plain LoRA/LoCon"]),
    "lokr": (lambda good: {f"{Q}.lokr_w1": Z, f"{Q}.lokr_w2": Z}, ["LyCORIS LoKr", f"'{Q}.lokr_w1'"]),
    "dora": (lambda good: {**good, f"{Q}.dora_scale": np.ones((1, 32), np.float32)}, ["DoRA", f"'{Q}.dora_scale'"]),
    "motion": (lambda good: {"down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0."
                             "attention_blocks.0.to_q.processor.to_q_lora.down.weight": Z},
               ["AnimateDiff motion LoRA"]),
    "unknown module": (lambda good: {**good, "lora_unet_down_blocks_7_resnets_0_conv1.lora_down.weight": Z,
                                     "lora_unet_down_blocks_7_resnets_0_conv1.lora_up.weight": Z.T},
                       ["keys that match no module", "'lora_unet_down_blocks_7_resnets_0_conv1.lora_down.weight'"]),
    "no module": (lambda good: {k.replace("down_blocks_0_attentions_0", "blocks_3").replace("text_model_", "te_"): v
                                for k, v in good.items()},  # e.g. a LoRA for another architecture
                  ["none of its keys matches a module", "'lora_unet_blocks_3_transformer_blocks_0_attn1_to_q.alpha'"]),
    "shape": (lambda good: {**good, f"{K}.lora_down.weight": np.zeros((4, 1024)), f"{K}.lora_up.weight": Z.T},
              ["shapes that do not fit", "(4, 1024)", "attn2.to_k.weight (32, 32)"]),  # SD2's context dim: 1024
    "rank": (lambda good: {**good, f"{Q}.lora_up.weight": np.zeros((32, 3), np.float32)},
             ["down and up factors of different ranks", "down (4, 32) / up (32, 3)"]),
    "unpaired": (lambda good: {k: v for k, v in good.items() if k != f"{Q}.lora_up.weight"},
                 ["without their up/down partner", f"'{Q}.lora_down.weight'"]),
    "unrecognised": (lambda good: {**good, "model.diffusion_model.out.2.weight": Z},
                     ["unrecognised keys", "'model.diffusion_model.out.2.weight'", "expected plain LoRA/LoCon"]),
    "empty": (lambda good: {}, ["holds no keys"]),
    "twice": (lambda good: {**good, **{k.replace(Q, "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"): v
                                       for k, v in good.items() if Q in k}},  # diffusers and LDM name of one module
              ["several keys for the same module", "input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_down"]),
    "many": (lambda good: {**good, **{f"unet.foo.{i}.weight": Z for i in range(15)}},
             ["unrecognised keys", "... and 5 more (15 in total)"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_lora_is_rejected_with_a_clear_message(base, case):
    _, _, unet, text = base
    text_names = ["text_model.encoder.layers.0.mlp.fc1", "text_model.encoder.layers.1.self_attn.q_proj"]
    good = {**kohya(unet, "lora_unet", QKV, seed=13), **kohya(text, "lora_te", text_names, seed=14)}
    merge_loras(unet, text, [(good, 1.0)])
    with pytest.raises(WeightLoadError) as err:
        merge_loras(unet, text, [(good, 1.0), (BAD[case][0](good), 1.0)])
    message = str(err.value)
    assert message.startswith("cannot merge LoRA 1: ")
    for part in BAD[case][1]:
        assert part in message, (part, message)


def test_rslora_metadata_is_rejected(tmp_path):
    name = "down_blocks.0.attentions.0.proj_in"
    lora = {f"unet.{name}.lora_A.weight": np.zeros((4, 32, 1, 1), np.float32),
            f"unet.{name}.lora_B.weight": np.zeros((32, 4, 1, 1), np.float32)}
    metadata = {"unet.r": 4, "unet.lora_alpha": 8, "unet.use_rslora": True}
    with pytest.raises(WeightLoadError, match="rsLoRA/DoRA scaling"):
        read_lora(save(tmp_path, "rslora", lora, {"lora_adapter_metadata": json.dumps(metadata)}))
