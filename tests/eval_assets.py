"""Test assets for the evaluation package: transformers CLIPModels with random weights, tiny and ViT-L/14 size,
and a CLIPModel folder written in the real (Hugging Face) layout."""

import dataclasses
import json

import numpy as np
import torch

from pia_jax import models
from pia_jax.eval.clip import CLIPConfig, VisionConfig
from pia_jax.models.config import TextConfig
from tests.assets import write_vocab
from tests.oracle import randomize

# tiny towers of different widths, so a text/vision mix-up cannot go unnoticed; 32 px images in 8 px patches
TINY_CLIP = CLIPConfig(
    text=TextConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
    vision=VisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                        image_size=32, patch_size=8),
    projection_dim=24, eos_token_id=519, resize=32)
VOCAB_EOS = 519  # <|endoftext|> of tests.assets.write_vocab's 520-token vocabulary


def transformers_config(cfg: CLIPConfig, legacy_eos=False):
    """legacy_eos: `eos_token_id: 2` as in openai/clip-vit-large-patch14's config.json, which makes transformers
    pool the text at the largest token id (argmax) instead of the first EOS."""
    from transformers import CLIPConfig as TorchCLIPConfig
    t, v = cfg.text, cfg.vision
    eos, bos = (2, 0) if legacy_eos else (cfg.eos_token_id, cfg.eos_token_id - 1)
    return TorchCLIPConfig(
        text_config=dict(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                         num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
                         max_position_embeddings=t.max_position_embeddings, layer_norm_eps=t.layer_norm_eps,
                         hidden_act="quick_gelu", eos_token_id=eos, bos_token_id=bos),
        vision_config=dict(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                           num_hidden_layers=v.num_hidden_layers, num_attention_heads=v.num_attention_heads,
                           image_size=v.image_size, patch_size=v.patch_size, layer_norm_eps=v.layer_norm_eps,
                           hidden_act="quick_gelu"),
        projection_dim=cfg.projection_dim, attn_implementation="eager")


def torch_clip(cfg: CLIPConfig, seed=0, legacy_eos=False):
    """A transformers CLIPModel with every weight random. Built on the meta device and then filled, so the full
    ViT-L/14 skips transformers' own (slow, discarded) initialisation."""
    from transformers import CLIPModel
    with torch.device("meta"):
        model = CLIPModel(transformers_config(cfg, legacy_eos))
    model = model.to_empty(device="cpu")
    for name, buf in model.named_buffers():  # position_ids: to_empty leaves them uninitialised
        if name.endswith("position_ids"):
            buf.copy_(torch.arange(buf.shape[-1]).expand_as(buf))
    return randomize(model.eval(), seed)


def write_transformers_clip(folder, cfg: CLIPConfig = TINY_CLIP, seed=0, bin_format=False, shard=None,
                            legacy_eos=False):
    """A CLIPModel folder as Hugging Face ships one: config.json, weights (`shard`: shards of at most that size),
    tokenizer, preprocessor_config.json."""
    model = torch_clip(cfg, seed, legacy_eos)
    model.save_pretrained(str(folder), **({"max_shard_size": shard} if shard else {}))
    if bin_format:  # transformers 5 writes safetensors only; older releases wrote pytorch_model.bin like this
        for f in folder.glob("*.safetensors"):
            f.unlink()
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    write_vocab(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": cfg.resize},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": cfg.vision.image_size,
                                                             "width": cfg.vision.image_size},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(cfg.image_mean),
        "image_std": list(cfg.image_std)}))
    return model


def random_ids(cfg: CLIPConfig, lengths, seed=0) -> np.ndarray:
    """(B, 77) ids: BOS, random body, EOS then EOS padding at each given length (as CLIP's tokenizer pads)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, cfg.eos_token_id - 1, (len(lengths), cfg.text.max_position_embeddings))
    ids[:, 0] = cfg.eos_token_id - 1
    for row, n in zip(ids, lengths):
        row[n:] = cfg.eos_token_id
    return ids.astype(np.int32)


def micro_pia_config():
    """TINY with a two-level UNet of one layer per block: every kind of block still runs (cross-attention,
    motion modules, skips, up/down sampling) and the sampler compiles in half the time."""
    from pia_jax.models import config
    unet = dataclasses.replace(config.TINY.unet, block_out_channels=(32, 32), layers_per_block=1,
                               down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"),
                               up_block_types=("UpBlockMotion", "CrossAttnUpBlockMotion"))
    return dataclasses.replace(config.TINY, unet=unet)


def write_tiny_pia_model(path, cfg=None, seed=0):
    """A small PIA model directory (`micro_pia_config` by default) with random weights, as `python -m
    pia_jax.toy.demo` writes one, but drawn from the parameter shapes with numpy (seconds) instead of running every
    layer's initialiser (a minute on a busy 2-core machine). Kernels ~ N(0, 1/fan_in), norm scales 1, biases 0,
    embeddings N(0, 0.02^2)."""
    from pia_jax import weights
    from pia_jax.sampling import schedulers
    from pia_jax.weights import model_dir
    cfg = cfg or micro_pia_config()

    rng = np.random.default_rng(seed)

    def draw(name, shape):
        leaf = name.rpartition(".")[2]
        if leaf == "scale":
            return np.ones(shape, np.float32)
        if leaf == "bias":
            return np.zeros(shape, np.float32)
        std = np.prod(shape[:-1]) ** -0.5 if leaf == "kernel" else 0.02
        return (std * rng.standard_normal(shape)).astype(np.float32)

    parts = {}
    for part in models.PARTS:
        shapes = weights.param_shapes(models.build(cfg, part))
        parts[part] = {name: draw(name, shape) for name, shape in shapes.items()}
    write_vocab(path.parent / f"{path.name}-tokenizer")
    return model_dir.save_model_dir(path, cfg, parts, tokenizer=path.parent / f"{path.name}-tokenizer",
                                    scheduler=schedulers.to_dict(schedulers.PIA_DDIM))
