"""The loader is strict: every source key used once, every parameter filled, shapes checked, all errors at once."""

import dataclasses

import numpy as np
import pytest
from flax import nnx

from pia_jax import weights
from pia_jax.models import config
from pia_jax.models.abstract import abstract_model
from pia_jax.models.unet import UNetMotionModel
from pia_jax.models.vae import AutoencoderKL
from tests import torch_models as tm

CFG = dataclasses.replace(config.TINY.unet, norm_semantics="diffusers")


@pytest.fixture(scope="module")
def state():
    return tm.numpy_state(tm.unet_motion(CFG))


def abstract_unet():
    return abstract_model(UNetMotionModel, CFG)


def load_error(state) -> str:
    with pytest.raises(weights.WeightLoadError) as err:
        weights.load_state_dict(abstract_unet(), state, weights.DIFFUSERS_UNET)
    return str(err.value)


def test_complete_state_dict_loads_with_values_in_flax_layout(state):
    model = weights.load_state_dict(abstract_unet(), state, weights.DIFFUSERS_UNET)
    # conv OIHW -> HWIO, linear (out, in) -> (in, out), norm weight -> scale
    np.testing.assert_array_equal(model.conv_in.kernel[...], state["conv_in.weight"].transpose(2, 3, 1, 0))
    mm = model.down_blocks[1].motion_modules[0]
    np.testing.assert_array_equal(mm.proj_in.kernel[...],
                                  state["down_blocks.1.motion_modules.0.proj_in.weight"].T)
    np.testing.assert_array_equal(mm.norm.scale[...], state["down_blocks.1.motion_modules.0.norm.weight"])


def test_missing_key_is_named(state):
    key = "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    message = load_error({k: v for k, v in state.items() if k != key})
    assert "(1 problem)" in message and f"'{key.replace('weight', 'kernel')}'" in message


def test_extra_key_is_named(state):
    message = load_error({**state, "down_blocks.0.resnets.0.bogus.weight": np.zeros(3)})
    assert "(1 problem)" in message and "unexpected source key 'down_blocks.0.resnets.0.bogus.weight'" in message


def test_wrong_shape_is_named(state):
    key = "mid_block.resnets.1.conv1.weight"
    message = load_error({**state, key: np.zeros((64, 64, 1, 1), np.float32)})
    assert "(1 problem)" in message and f"shape mismatch for '{key}': got (64, 64, 1, 1)" in message


def test_all_problems_reported_at_once(state):
    bad = {k: v for k, v in state.items() if not k.startswith("conv_out.")}
    bad["extra.bias"] = np.zeros(2)
    bad["conv_in.bias"] = np.zeros(7)
    message = load_error(bad)
    assert "4 problems" in message
    for part in ("'conv_out.kernel'", "'conv_out.bias'", "'extra.bias'", "shape mismatch for 'conv_in.bias'"):
        assert part in message


def test_legacy_vae_attention_names_load():
    """Older diffusers VAE files name the mid-block attention query/key/value/proj_attn."""
    vae = tm.randomize(__import__("diffusers").AutoencoderKL(
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2))
    state = tm.numpy_state(vae)
    legacy = {}
    for key, value in state.items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            key = key.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        legacy[key] = value
    assert legacy.keys() != state.keys()
    abstract = abstract_model(AutoencoderKL, config.TINY.vae)
    a = weights.load_state_dict(abstract, state, weights.DIFFUSERS_VAE)
    b = weights.load_state_dict(abstract_model(AutoencoderKL, config.TINY.vae), legacy,
                                weights.DIFFUSERS_VAE)
    for (path, x), (_, y) in zip(nnx.to_flat_state(nnx.state(a)), nnx.to_flat_state(nnx.state(b))):
        np.testing.assert_array_equal(x[...], y[...], err_msg=str(path))


def test_safetensors_file_round_trip(tmp_path, state):
    from safetensors.numpy import save_file
    save_file(state, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    read = weights.read_state_dict(tmp_path / "diffusion_pytorch_model.safetensors")
    assert read.keys() == state.keys()
    weights.load_state_dict(abstract_unet(), read, weights.DIFFUSERS_UNET)


def test_torch_pickle_read_safely(tmp_path, state):
    """`.bin`/`.ckpt` pickles go through torch.load(weights_only=True); a bare or wrapped state dict both work."""
    import torch
    tensors = {k: torch.from_numpy(v) for k, v in state.items()}
    torch.save(tensors, tmp_path / "plain.bin")
    torch.save({"state_dict": tensors, "global_step": 3}, tmp_path / "wrapped.ckpt")
    for name in ("plain.bin", "wrapped.ckpt"):
        read = weights.read_state_dict(tmp_path / name)
        assert read.keys() == state.keys()
        np.testing.assert_array_equal(read["conv_in.weight"], state["conv_in.weight"])


def test_merge_unet_and_adapter_matches_diffusers_from_unet2d():
    """Our merge of a UNet2DConditionModel and a 9-channel MotionAdapter equals diffusers' from_unet2d."""
    from diffusers import UNetMotionModel as TorchUNetMotion
    unet2d, adapter = tm.randomize(tm.unet2d(CFG), 3), tm.randomize(tm.motion_adapter(CFG), 4)
    expected = tm.numpy_state(TorchUNetMotion.from_unet2d(unet2d, adapter))
    merged = weights.merge_unet_and_adapter(tm.numpy_state(unet2d), tm.numpy_state(adapter))
    assert merged.keys() == expected.keys()
    for key in expected:
        np.testing.assert_array_equal(merged[key], expected[key], err_msg=key)
    assert not np.array_equal(merged["conv_in.weight"][:, 4:], 0)  # the condition channels came along


@pytest.mark.parametrize("value, dtype", [(np.nan, "fp32"), (1e6, "fp16")])  # 1e6 overflows fp16 to inf
def test_a_non_finite_weight_is_named_at_load(tmp_path, value, dtype):
    from pia_jax import models
    from pia_jax.weights import model_dir

    shapes = weights.param_shapes(models.build(config.TINY, "vae"))
    flat = {name: np.zeros(shape, np.float32) for name, shape in shapes.items()}
    bad = sorted(flat)[3]
    flat[bad].reshape(-1)[-1] = value
    path = model_dir.save_model_dir(tmp_path / "m", config.TINY, {"vae": flat}, dtype=dtype)
    with pytest.raises(model_dir.ModelDirError, match=rf"vae.safetensors in .*: tensor {bad} has 1 non-finite values"):
        model_dir.load_model_dir(path, parts=("vae",), tokenizer=False)
    flat[bad].reshape(-1)[-1] = 0
    model_dir.save_model_dir(path, config.TINY, {"vae": flat}, dtype=dtype, force=True)
    assert model_dir.load_model_dir(path, parts=("vae",), tokenizer=False).vae is not None
