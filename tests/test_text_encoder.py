"""CLIP text encoder parity against transformers' CLIPTextModel, and the tokenizer on a hand-made vocabulary."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from pia_jax import weights
from pia_jax.models.abstract import abstract_model
from pia_jax.models.config import SD15_PIA, TINY, TextConfig
from pia_jax.models.text_encoder import CLIPTextModel
from pia_jax.models.tokenizer import load_tokenizer, tokenize
from tests.assets import write_vocab
from tests.oracle import assert_close, numpy_state
from tests.torch_models import clip_text

# fp32 on both sides with the same math; only summation order and the sigmoid/rsqrt implementations differ, so
# errors sit at fp32 rounding accumulated over the layers: measured 2e-7..9e-7 (tiny) and 1.2e-6 (12 layers) of the
# output scale. 1e-5 leaves headroom for other BLAS/XLA builds yet catches real bugs: no causal mask or reversed
# positions give O(1), quick_gelu's 1.702 changed to 1.7 gives 6e-4.
FP32_TOL = 1e-5


def build_pair(cfg: TextConfig, seed=0, dtype=jnp.float32):
    """A randomized torch CLIPTextModel and our model loaded from its numpy state dict, keyed as in SD1.5's
    text_encoder/model.safetensors (`text_model.` prefix; transformers 5 drops the prefix in memory)."""
    ref = clip_text(cfg, seed)
    state = {("" if k.startswith("text_model.") else "text_model.") + k: v for k, v in numpy_state(ref).items()}
    model = abstract_model(CLIPTextModel, cfg, dtype=dtype)
    return ref, weights.load_state_dict(model, state, weights.TRANSFORMERS_CLIP_TEXT), state


def reference(ref, ids):
    """transformers' last_hidden_state and its per-layer hidden states (embeddings first, pre-final-LN last)."""
    with torch.no_grad():
        out = ref(torch.from_numpy(np.asarray(ids, np.int64)), output_hidden_states=True)
    # clip_skip relies on this layout: num_layers + 1 entries, the last one before final_layer_norm.
    assert len(out.hidden_states) == ref.config.num_hidden_layers + 1
    return out.last_hidden_state.numpy(), out.hidden_states


def skipped_reference(ref, hidden_states, clip_skip):
    """diffusers' encode_prompt: hidden_states[-(clip_skip + 1)] through final_layer_norm."""
    final_layer_norm = getattr(ref, "text_model", ref).final_layer_norm  # transformers < 5 nests a text_model
    with torch.no_grad():
        return final_layer_norm(hidden_states[-(clip_skip + 1)]).numpy()


def random_ids(cfg, batch, length, seed):
    """BOS-like first token, random body, and EOS/pad-like tail, so every position and a range of ids is used."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, cfg.vocab_size, (batch, length))
    ids[:, 0] = cfg.vocab_size - 2
    ids[:, length // 2:] = cfg.vocab_size - 1
    return ids.astype(np.int32)


@pytest.fixture(scope="module")
def full_pair():
    return build_pair(SD15_PIA.text, seed=1)


@pytest.mark.parametrize("batch,length", [(1, 77), (3, 77), (2, 9)])
def test_tiny_parity(batch, length):
    cfg = TINY.text
    ref, model, _ = build_pair(cfg)
    ids = random_ids(cfg, batch, length, seed=batch)
    expected, hidden = reference(ref, ids)
    assert_close(model(ids), expected, FP32_TOL, "tiny last_hidden_state")
    for skip in (0, 1, 2):  # 2 = every layer skipped: final_layer_norm of the embeddings
        assert_close(model(ids, clip_skip=skip), skipped_reference(ref, hidden, skip), FP32_TOL,
                     f"tiny clip_skip={skip}")


def test_full_parity(full_pair):
    ref, model, _ = full_pair
    cfg = SD15_PIA.text
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.max_position_embeddings) == (49408, 768, 12, 77)
    ids = random_ids(cfg, 2, 77, seed=0)
    expected, hidden = reference(ref, ids)
    run = nnx.jit(lambda m, x, skip: m(x, clip_skip=skip), static_argnums=2)
    assert_close(run(model, ids, None), expected, FP32_TOL, "ViT-L last_hidden_state")
    for skip in (1, 2):
        assert_close(run(model, ids, skip), skipped_reference(ref, hidden, skip), FP32_TOL, f"ViT-L clip_skip={skip}")


def test_state_dict_variants():
    """Older transformers saved the `position_ids` buffer in the state dict, and transformers 5 keeps no
    `text_model.` prefix in memory; every combination must load."""
    cfg = TINY.text
    ref, model, state = build_pair(cfg)
    with_ids = dict(state, **{"text_model.embeddings.position_ids": np.arange(77)[None]})
    without_ids = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    abstract = lambda: abstract_model(CLIPTextModel, cfg)
    ids = random_ids(cfg, 2, 77, seed=5)
    unprefixed = {k.removeprefix("text_model."): v for k, v in with_ids.items()}
    for sd in (with_ids, without_ids, unprefixed):
        loaded = weights.load_state_dict(abstract(), sd, weights.TRANSFORMERS_CLIP_TEXT)
        np.testing.assert_array_equal(np.asarray(loaded(ids)), np.asarray(model(ids)))
    # A key the model does not have is still an error, so the ignore rule is no catch-all.
    with pytest.raises(weights.WeightLoadError, match="text_projection"):
        weights.load_state_dict(abstract(), dict(state, **{"text_projection.weight": np.zeros((32, 32))}),
                                weights.TRANSFORMERS_CLIP_TEXT)


def test_bf16_compute(full_pair):
    """bf16 activations with fp32 parameters and fp32 LayerNorm/softmax, at the full ViT-L size."""
    ref, model32, state = full_pair
    model = abstract_model(CLIPTextModel, SD15_PIA.text, dtype=jnp.bfloat16)
    model = weights.load_state_dict(model, state, weights.TRANSFORMERS_CLIP_TEXT)
    ids = random_ids(SD15_PIA.text, 2, 77, seed=3)
    out = nnx.jit(lambda m, x: m(x))(model, ids)
    assert out.dtype == jnp.bfloat16
    assert bool(jnp.isfinite(out.astype(jnp.float32)).all())
    # bf16 keeps 8 mantissa bits (relative rounding 2^-9 ~ 2e-3 per op); over 12 residual blocks and the final
    # LayerNorm's rescaling the max error lands at ~2e-2 of the output scale (measured 1.6e-2..2.2e-2 over four
    # inputs); 6e-2 still catches any real bug (a wrong op gives O(1)).
    expected = np.asarray(nnx.jit(lambda m, x: m(x))(model32, ids))
    assert_close(np.asarray(out, np.float32), expected, 6e-2, "bf16 vs fp32")


def test_bad_clip_skip_and_length():
    model = CLIPTextModel(TINY.text, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="clip_skip"):
        model(np.zeros((1, 77), np.int32), clip_skip=3)
    with pytest.raises(ValueError, match="78 tokens"):
        model(np.zeros((1, 78), np.int32))


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer on a tiny CLIP-style byte-level BPE vocabulary.

def test_tokenizer(tmp_path):
    vocab = write_vocab(tmp_path / "plain")
    # A diffusers model folder, with the tokenizer_config.json SD1.5 ships (pad token spelled out).
    write_vocab(tmp_path / "model" / "tokenizer")
    (tmp_path / "model" / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
         "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
         "unk_token": "<|endoftext|>"}))
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    # Lowercased; "hello"/"cat" merge fully; "dog" has no merges, so its last byte takes the end-of-word form;
    # "!" is its own pre-token. CLIPTokenizer pads with <|endoftext|> unless configured otherwise.
    body = {
        "Hello cat": [vocab["hello</w>"], vocab["cat</w>"]],
        "dog!": [vocab["d"], vocab["o"], vocab["g</w>"], vocab["!</w>"]],
    }
    for folder in (tmp_path / "plain", tmp_path / "model", str(tmp_path / "model" / "tokenizer")):
        tok = load_tokenizer(folder)
        assert tok.pad_token_id == eos
        ids = tokenize(tok, list(body))
        assert ids.shape == (2, 77) and ids.dtype == np.int32
        for row, toks in zip(ids, body.values()):
            expected = [bos, *toks, eos] + [eos] * (77 - len(toks) - 2)
            assert row.tolist() == expected
        # 100 words -> BOS + the first 75 + EOS.
        long = tokenize(tok, ["hello " * 100])
        assert long.shape == (1, 77) and long[0].tolist() == [bos] + [vocab["hello</w>"]] * 75 + [eos]
        assert tokenize(tok, ["cat"], max_length=5).tolist() == [[bos, vocab["cat</w>"], eos, eos, eos]]


def test_tokenizer_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nowhere")
    (tmp_path / "empty" / "tokenizer").mkdir(parents=True)
    (tmp_path / "empty" / "tokenizer" / "vocab.json").write_text("{}")  # merges.txt missing
    with pytest.raises(FileNotFoundError, match="empty.*no tokenizer files"):
        load_tokenizer(tmp_path / "empty")
