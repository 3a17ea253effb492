"""AnimateDiff/PIA motion-checkpoint conversion against diffusers' `MotionAdapter.from_single_file`.

Random-weight diffusers MotionAdapters are written in AnimateDiff's naming, with the `pos_encoder.pe` tables
AnimateDiff stores, by a test-side writer; our converted dict must equal both the adapter the file came from and
what diffusers loads from the file (it keeps PIA's 9-channel conv_in, so it is the oracle for that too). Conversion
only renames tensors, so every comparison is exact (np.array_equal, every key on both sides).
"""

import dataclasses

import numpy as np
import pytest
import torch
from diffusers import MotionAdapter

from pia_jax import weights
from pia_jax.models.config import SD15_PIA, TINY
from pia_jax.weights.convert.animatediff import convert_motion_checkpoint
from tests import torch_models as tm
from tests.ldm_writer import animatediff_checkpoint
from tests.oracle import numpy_state, randomize

PIA = TINY.unet  # 9-channel conv_in, no mid block: pia.ckpt's layout
V2 = dataclasses.replace(TINY.unet, in_channels=4, motion_mid_block=True, motion_max_seq_length=24)  # mm_sd_v15_v2
V3 = dataclasses.replace(TINY.unet, in_channels=4)  # v3_sd15_mm.ckpt: PIA's modules without conv_in, no mid block


def adapter_keys(state: dict) -> dict:
    """A MotionAdapter state dict without diffusers' position tables (buffers the models recompute)."""
    return {k: v for k, v in state.items() if not k.endswith("pos_embed.pe")}


def assert_same(ours: dict, expected: dict, what: str):
    assert ours.keys() == expected.keys(), f"{what}: keys differ: {sorted(set(ours) ^ set(expected))[:10]}"
    bad = [k for k in expected if not np.array_equal(ours[k], expected[k])]
    assert not bad, f"{what}: {len(bad)} of {len(expected)} tensors differ, e.g. {bad[:5]}"


def oracle(checkpoint, folder, **kwargs) -> dict:
    adapter = MotionAdapter.from_single_file(checkpoint, config=str(folder), local_files_only=True, **kwargs)
    return adapter_keys(numpy_state(adapter))


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """{name: (random adapter, its config folder, its UNetConfig)} for the PIA and the AnimateDiff v2/v3 layouts."""
    out = {}
    for seed, (name, cfg) in enumerate((("pia", PIA), ("v2", V2), ("v3", V3))):
        adapter = randomize(tm.motion_adapter(cfg), seed).eval()
        folder = tmp_path_factory.mktemp(name)
        adapter.save_config(folder)
        out[name] = (adapter, folder, cfg)
    return out


def torch_state(module) -> dict:
    return {k: v.detach() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("name", ["pia", "v2", "v3"])
def test_file_matches_diffusers_single_file(adapters, tmp_path, name):
    adapter, folder, cfg = adapters[name]
    path = tmp_path / "mm.ckpt"
    torch.save(animatediff_checkpoint(torch_state(adapter), cfg.motion_max_seq_length), path)  # as pia.ckpt: no wrapper
    motion, spatial, info = convert_motion_checkpoint(weights.read_state_dict(path))
    expected = adapter_keys(numpy_state(adapter))
    assert_same(motion, oracle(str(path), folder), "vs diffusers")
    assert_same(motion, expected, "vs the source adapter")
    assert spatial == {}
    modules = 2 * 3 + 3 * 3 + (name == "v2")
    assert info == {"conv_in_channels": 9 if name == "pia" else None, "block_out_channels": (32, 64, 64),
                    "mid_block": name == "v2", "max_seq_length": cfg.motion_max_seq_length, "layers_per_block": 2,
                    "ignored": {"position tables (recomputed by the model)": 2 * modules}}


def test_wrapped_and_diffusers_named_inputs(adapters, tmp_path):
    """DDP's `module.` prefix inside a {"state_dict": ...} wrapper, fp16 tensors, and a diffusers-named adapter
    (with diffusers' own position tables) all give the same result."""
    adapter = adapters["pia"][0]
    expected = adapter_keys(numpy_state(adapter))
    half = {k: v.half() for k, v in torch_state(adapter).items()}
    torch.save({"state_dict": {"module." + k: v for k, v in animatediff_checkpoint(half, 32).items()}},
               tmp_path / "wrapped.ckpt")
    motion, _, info = convert_motion_checkpoint(weights.read_state_dict(tmp_path / "wrapped.ckpt"))
    assert {v.dtype for v in motion.values()} == {np.dtype(np.float16)}
    assert_same(motion, {k: v.astype(np.float16) for k, v in expected.items()}, "wrapped fp16 file")
    motion, spatial, same_info = convert_motion_checkpoint(numpy_state(adapter))
    assert_same(motion, expected, "diffusers-named adapter")
    assert spatial == {} and same_info == {**info, "ignored": {"position tables (recomputed by the model)": 15}}


def test_full_pia_unet_splits_into_spatial_and_motion():
    """A PIA-trained UNet saved whole: motion modules in AnimateDiff naming, spatial weights in diffusers naming.
    Merging the two parts again (as diffusers' from_unet2d does) gives back the trained UNet."""
    full = tm.unet_motion(dataclasses.replace(PIA, norm_semantics="diffusers"), seed=5)
    motion, spatial, info = convert_motion_checkpoint(
        {k: v.numpy() for k, v in animatediff_checkpoint(torch_state(full), 32).items()})
    assert motion.keys() == adapter_keys(numpy_state(tm.motion_adapter(PIA))).keys()
    assert spatial.keys() == tm.unet2d(PIA).state_dict().keys()
    assert spatial["conv_in.weight"].shape[1] == 4 and info["conv_in_channels"] == 9
    assert_same(weights.merge_unet_and_adapter(spatial, motion), adapter_keys(numpy_state(full)), "merged again")


def zeros(*shape):
    return np.broadcast_to(np.zeros((), np.float32), shape)  # any shape, no memory


def sdxl_motion_modules() -> dict:
    """mm_sdxl_v10_beta.ckpt's key names and shapes (3 blocks of 320/640/1280 channels), without the memory."""
    from accelerate import init_empty_weights
    with init_empty_weights():
        adapter = MotionAdapter(block_out_channels=(320, 640, 1280), motion_layers_per_block=2,
                                motion_num_attention_heads=8, motion_norm_num_groups=32, use_motion_mid_block=False)
    return {k: zeros(*v.shape) for k, v in animatediff_checkpoint(adapter.state_dict(), 32).items()}


def wrong_inputs(state: dict) -> dict:
    """name -> (state dict builder, substrings the error must contain); `state` is the tiny PIA layout in
    AnimateDiff naming."""
    pe = "down_blocks.1.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.1.pos_encoder.pe"
    angles = np.arange(32)[:, None] * 1e4 ** (-np.arange(32) / 32)
    concatenated = np.concatenate([np.sin(angles), np.cos(angles)], 1)[None]  # [sin | cos], not interleaved
    lora = ("down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.processor."
            "to_q_lora.down.weight")
    last_up = "up_blocks.2.motion_modules.2."
    return {
        "sdxl": (sdxl_motion_modules, ["SDXL motion modules", "(320, 640, 1280)", "mm_sdxl"]),
        "motion_lora": (lambda: {lora: zeros(4, 320), lora.replace(".down.", ".up."): zeros(320, 4)},
                        ["motion LoRA", "pass it with --motion-lora"]),
        "ldm_base": (lambda: {"model.diffusion_model.input_blocks.0.0.weight": zeros(320, 4, 3, 3)},
                     ["no motion-module keys", "an LDM (original SD) checkpoint"]),
        "lora": (lambda: {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": zeros(4, 320)},
                 ["no motion-module keys", "a LoRA"]),
        "position_encoding": (lambda: {**state, pe: concatenated},
                              [pe, "position encoding differs", "interleaved"]),
        "stray_keys": (lambda: {**state, "down_blocks.0.motion_modules.0.temporal_transformer.extra.weight": zeros(3),
                        "optimizer_step": zeros(1)},
                       ["2 tensors are neither", "temporal_transformer.extra.weight", "optimizer_step"]),
        "missing_module": (lambda: {k: v for k, v in state.items() if not k.startswith(last_up)},
                           ["irregular motion-module layout", "per up block [3, 3, 2]"]),
    }


@pytest.mark.parametrize("case", ["sdxl", "motion_lora", "ldm_base", "lora", "position_encoding", "stray_keys",
                                  "missing_module"])
def test_wrong_inputs_are_named(adapters, case):
    state = {k: v.numpy() for k, v in animatediff_checkpoint(torch_state(adapters["pia"][0]), 32).items()}
    build, expected = wrong_inputs(state)[case]
    with pytest.raises(weights.WeightLoadError) as err:
        convert_motion_checkpoint(build())
    for part in expected:
        assert part in str(err.value), (part, str(err.value))


def test_sd15_size_pia_checkpoint_matches_diffusers(tmp_path):
    """pia.ckpt's full layout (20 motion modules at 320..1280 channels, 9-channel conv_in) in fp16, against the
    same oracle; the checkpoint dict goes to both sides in memory (the tiny tests cover the file)."""
    from accelerate import init_empty_weights
    with init_empty_weights():
        adapter = tm.motion_adapter(SD15_PIA.unet)
    adapter = adapter.half().to_empty(device="cpu")  # dtype first: on meta tensors it costs nothing
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in adapter.parameters():
            p.uniform_(-1, 1, generator=g)  # every tensor distinct, much faster than randn at 417M parameters
    adapter.save_config(tmp_path)
    checkpoint = animatediff_checkpoint(adapter.state_dict(), 32)
    motion, spatial, info = convert_motion_checkpoint({k: v.numpy() for k, v in checkpoint.items()})
    assert spatial == {}
    assert info == {"conv_in_channels": 9, "block_out_channels": (320, 640, 1280, 1280), "mid_block": False,
                    "max_seq_length": 32, "layers_per_block": 2,
                    "ignored": {"position tables (recomputed by the model)": 40}}
    assert_same(motion, oracle(checkpoint, tmp_path, torch_dtype=torch.float16), "SD1.5-size PIA layout")
