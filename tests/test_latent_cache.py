"""The latent cache (prepare_dataset.py --latents, data.latents=true): what preparation stores, what the loader makes
of it, that a step on cached latents is the pixel step without the encode, and the checks that refuse a cache made
for other clips or by another VAE. A one-block model, 2-frame clips of 8x8 pixels and 3 short videos keep the whole
file to seconds of compilation on CPU."""

import dataclasses
import functools
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pia_jax.data import (
    PIXEL_VALUES,
    DataConfig,
    LatentMismatch,
    Loader,
    dataset_metadata,
    draw,
    generic_rows,
    make_example,
    open_dataset,
    transform_clip,
)
from pia_jax.data import latents as latents_lib
from pia_jax.data.affinity_scores import affinity_from_scores, frame_scores, score_matrix
from pia_jax.data.builder import prepare
from pia_jax.data.loader import sample_rng
from pia_jax.models import config as model_config
from pia_jax.training import config as config_lib
from pia_jax.training import loop
from pia_jax.training import state as state_lib
from pia_jax.training.step import Trainer, pia_loss
from pia_jax.weights.model_dir import save_model_dir
from tests.assets import all_frames, mp4, write_vocab

# test_train.py's SMALL cut to one UNet block: every kind of layer, the shortest compilations
ONE_BLOCK = model_config.PIAConfig(
    unet=dataclasses.replace(model_config.TINY.unet, in_channels=4, block_out_channels=(32,), layers_per_block=1,
                             down_block_types=("CrossAttnDownBlockMotion",),
                             up_block_types=("CrossAttnUpBlockMotion",)),
    vae=dataclasses.replace(model_config.TINY.vae, block_out_channels=(32,)),
    text=dataclasses.replace(model_config.TINY.text, num_hidden_layers=1))
FRAMES, SIZE, CLIPS = 2, 8, 3
CFG = DataConfig(n_frames=FRAMES, stride=2, resolution=SIZE, latents=True)
LENGTHS = (9, 12, 15)


def video(num_frames: int) -> bytes:
    return mp4(num_frames, 24, 32)


def make_model_dir(root, config=ONE_BLOCK, seed=0):
    write_vocab(root / "tokenizer")
    models = state_lib.abstract_models(config, config_lib.ModelConfig())
    flat = {part: state_lib.random_weights(models[part], seed + i) for i, part in enumerate(models)}
    return str(save_model_dir(root / "model", config, flat, tokenizer=root / "tokenizer"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("latent-model"))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("latent-videos")
    lines = ["path,caption"]
    for i, n in enumerate(LENGTHS):
        (root / f"v{i}.mp4").write_bytes(video(n))
        lines.append(f"v{i}.mp4,clip number {i}")
    (root / "clips.csv").write_text("\n".join(lines) + "\n")
    return root


def spec(model_dir, **kwargs) -> latents_lib.LatentSpec:
    return latents_lib.LatentSpec(model_dir=model_dir, **{"clips": CLIPS, "seed": 3, "n_frames": FRAMES, "stride": 2,
                                                           "resolution": SIZE, **kwargs})


@pytest.fixture(scope="module")
def dataset(model_dir, source, tmp_path_factory):
    return prepare(generic_rows(source / "clips.csv"), tmp_path_factory.mktemp("latent-ds") / "ds",
                   min_frames=FRAMES, workers=2, latents=spec(model_dir))


@functools.cache
def vae_encode(model_dir):
    enc = latents_lib.Encoder(model_dir, batch=FRAMES)
    return lambda frames: enc(frames.astype(np.float32))


def test_score_matrix_columns_are_frame_scores():
    clip = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3)).astype(np.float32)
    scores = score_matrix(clip)
    assert scores.shape == (4, 4) and scores.dtype == np.float64
    for c in range(4):
        np.testing.assert_array_equal(scores[:, c], frame_scores(clip, c))  # bit for bit


def test_prepared_latents_round_trip(dataset, model_dir):
    """Every cached clip is the pixel path's clip for its draws: posterior equal to encoding that clip directly,
    scores equal to frame_scores, and make_example's mask coefficients for those draws come out of the scores."""
    path, report = dataset
    meta = report["latents"]
    assert report["examples"] == 3 and meta["clips"] == CLIPS and meta["latent_shape"] == [FRAMES, SIZE, SIZE, 4]
    assert meta["bytes_per_clip"] == 2 * FRAMES * SIZE * SIZE * 4 * 4 and meta["vae"]["scaling_factor"] == 0.18215
    assert dataset_metadata(path)[0][1]["latents"] == meta
    records, pixel_cfg, compared = open_dataset(path), dataclasses.replace(CFG, latents=False), 0
    for i in range(len(records)):
        r = records[i]
        assert r["latent_mean"].shape == (CLIPS, FRAMES, SIZE, SIZE, 4) and r["latent_mean"].dtype == np.float32
        frames = all_frames(r["video"])
        for j in range(CLIPS):
            d = draw(r["num_frames"], pixel_cfg, latents_lib.clip_rng(3, r["key"], j))
            np.testing.assert_array_equal(r["latent_indices"][j], d.indices)
            assert r["latent_flip"][j] == d.flip
            pixels = transform_clip(frames[d.indices], d.flip, SIZE)
            mean, logvar = vae_encode(model_dir)(pixels)
            # the same fp32 program on the same frames (the cache encoded 6 per call, here 2): 1e-6 covers the order
            np.testing.assert_allclose(r["latent_mean"][j], mean, rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(r["latent_logvar"][j], logvar, rtol=1e-6, atol=1e-6)
            np.testing.assert_array_equal(r["latent_scores"][j], score_matrix((pixels / 2 + 0.5) * 255))
            # make_example from the same generator draws the same clip, then the condition frame and dropouts
            ex = make_example(r, pixel_cfg, latents_lib.clip_rng(3, r["key"], j), np.float32)
            np.testing.assert_array_equal(ex["pixel_values"], pixels)
            if ex["use_condition"]:
                c = ex["cond_frame"]
                np.testing.assert_array_equal(ex["affinity"], affinity_from_scores(r["latent_scores"][j][:, c], c))
                compared += 1
    assert compared >= 3


def test_latent_loader_draws_clip_condition_and_dropout(dataset, tmp_path):
    path, _ = dataset
    records = open_dataset(path)
    write_vocab(tmp_path / "tok")
    from pia_jax.models.tokenizer import load_tokenizer, tokenize
    tok = load_tokenizer(tmp_path / "tok")
    with Loader(records, tok, CFG, batch_size=3, seed=5, num_workers=2) as loader:
        batches = [next(loader) for _ in range(2)]
    assert set(batches[0]) == {"latent_mean", "latent_logvar", "input_ids", "affinity", "cond_frame", "use_condition"}
    perm = [np.random.default_rng([5, e]).permutation(3) for e in (0, 1)]  # one step per epoch
    for epoch, batch in enumerate(batches):
        for i in range(3):
            r = records[int(perm[epoch][i])]
            d = latents_lib.draw_latent(CLIPS, CFG, sample_rng(5, epoch, i))
            np.testing.assert_array_equal(batch["latent_mean"][i], r["latent_mean"][d.clip])
            np.testing.assert_array_equal(batch["latent_logvar"][i], r["latent_logvar"][d.clip])
            assert batch["cond_frame"][i] == d.cond_frame and batch["use_condition"][i] == d.use_condition
            coef = (affinity_from_scores(r["latent_scores"][d.clip][:, d.cond_frame], d.cond_frame)
                    if d.use_condition else np.zeros(FRAMES, np.float32))
            np.testing.assert_array_equal(batch["affinity"][i], coef)
            np.testing.assert_array_equal(batch["input_ids"][i],
                                          tokenize(tok, ["" if d.drop_caption else r["caption"]])[0])


def max_rel(a: dict, b: dict) -> float:
    return max(float(np.abs(a[k] - b[k]).max() / max(np.abs(b[k]).max(), 1e-12)) for k in b)


# Tolerance: fp32 everywhere, the same VAE weights and math; only where the encode runs differs (before the step, as
# preparation does, or inside it). Measured: 0 (XLA:CPU gives both encodes the same values); 1e-6 relative stated,
# for backends that fuse the encode differently inside the step.
LATENT_TOL = 1e-6


def test_latent_step_equals_the_pixel_step(model_dir):
    """With the same posterior noise (same keys), the loss and every gradient of the PIA objective on a clip's
    cached posterior equal those on the clip's uint8 pixels (which the step maps to [-1, 1] with PIXEL_VALUES)."""
    model = config_lib.ModelConfig(model_dir=model_dir, compute_dtype="fp32", frozen_dtype="fp32", attention="xla")
    s = state_lib.build(model)
    rng = np.random.default_rng(1)
    levels = rng.integers(0, 256, (1, FRAMES, SIZE, SIZE, 3), dtype=np.uint8)
    # XLA:CPU's backend optimisations off (half the compile time) for every program here, the cache's encode too
    jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
    encode = jit(lambda weights, x: state_lib.merge(s.graphs.vae, weights).encode(x))
    mean, logvar = jax.device_get(encode(s.frozen["vae"], PIXEL_VALUES[levels[0]]))  # what the cache stores
    common = {"input_ids": rng.integers(1, 100, (1, 77)).astype(np.int32),
              "affinity": np.array([[1.0, 0.6]], np.float32), "cond_frame": np.array([0], np.int32),
              "use_condition": np.array([True])}
    keys = jax.vmap(lambda k: jax.random.split(k, 3))(jax.random.split(jax.random.key(7), 1))
    loss_and_grads = jit(jax.value_and_grad(functools.partial(pia_loss, graphs=s.graphs, scheduler=s.scheduler,
                                                              scaling=s.config.vae.scaling_factor)))
    run = lambda mb: jax.device_get(loss_and_grads(s.trainable, s.frozen, mb=mb, keys_Bx3=keys))  # noqa: E731
    loss_pixels, grads_pixels = run({"pixel_values": levels, **common})
    loss_latents, grads_latents = run({"latent_mean": mean[None], "latent_logvar": logvar[None], **common})
    print("loss", loss_pixels, "relative differences: loss", abs(loss_latents / loss_pixels - 1), "gradients",
          max_rel(grads_latents, grads_pixels))
    np.testing.assert_allclose(loss_latents, loss_pixels, rtol=LATENT_TOL)
    assert max_rel(grads_latents, grads_pixels) < LATENT_TOL
    # another posterior (a log-variance of 2) moves the loss far more than that: the posterior is what is compared
    loss_other, _ = run({"latent_mean": mean[None], "latent_logvar": np.full_like(logvar[None], 2.0), **common})
    assert abs(loss_other - loss_pixels) > 1e3 * LATENT_TOL * abs(loss_pixels)


def test_flops_without_the_encode(model_dir):
    """The latent batch's step counts exactly the VAE encode of k x B x F frames fewer FLOPs (abstract shapes only)."""
    from pia_jax.sharding import make_mesh
    from pia_jax.training.metrics import count_flops
    model = config_lib.ModelConfig(model_dir=model_dir, attention="xla")
    tr = Trainer(state_lib.abstract_setup(model), state_lib.make_optimizer(config_lib.OptimConfig()),
                 make_mesh(devices=jax.devices()[:1]))
    pixels, cached = tr.batch_shapes(2, 3, FRAMES, SIZE), tr.batch_shapes(2, 3, FRAMES, SIZE, latents=jnp.bfloat16)
    assert pixels["pixel_values"].dtype == jnp.uint8 and "pixel_values" not in cached
    assert cached["latent_mean"].shape == (2, 3, FRAMES, SIZE, SIZE, 4)
    assert cached["latent_logvar"].dtype == jnp.bfloat16
    encode = count_flops(lambda w, x: state_lib.merge(tr.setup.graphs.vae, w).encode(x), tr.frozen["vae"],
                         jax.ShapeDtypeStruct((3 * FRAMES, SIZE, SIZE, 3), jnp.float32))
    assert encode > 0 and tr.count_flops(pixels) - tr.count_flops(cached) == 2 * encode


def copy_model_dir(src, dst, change):
    shutil.copytree(src, dst)
    change(dst)
    return str(dst)


def test_mismatches_are_refused_clearly(dataset, model_dir, source, tmp_path):
    path, _ = dataset
    meta = dataset_metadata(path)
    assert latents_lib.check(meta, CFG, model_dir)["clips"] == CLIPS  # the fitting run passes
    for change, message in ((dict(resolution=16), "data.resolution=16 but the latents were made with resolution=8"),
                            (dict(n_frames=4), "data.n_frames=4"), (dict(stride=1), "data.stride=1"),
                            (dict(flip=False), "data.flip=False")):
        with pytest.raises(LatentMismatch, match=message):
            latents_lib.check(meta, dataclasses.replace(CFG, **change), model_dir)

    def rescale(d):
        stored = json.loads((d / "config.json").read_text())
        stored["model"]["vae"]["scaling_factor"] = 0.13025
        (d / "config.json").write_text(json.dumps(stored))
    with pytest.raises(LatentMismatch, match="VAE scaling_factor: 0.13025 in model.model_dir, 0.18215"):
        latents_lib.check(meta, CFG, copy_model_dir(model_dir, tmp_path / "rescaled", rescale))
    other = make_model_dir(tmp_path / "other", seed=10)  # same config, other weights
    with pytest.raises(LatentMismatch, match="VAE weights differ"):
        latents_lib.check(meta, CFG, other)
    with pytest.raises(LatentMismatch, match="needs model.model_dir"):
        latents_lib.check(meta, CFG, None)
    # through the run's own check (loop.check_data, which make_loader calls): a fitting run, a dataset without
    # latents, the vae task
    cfg = config_lib.from_dict(config_lib.TrainConfig, {
        "workdir": str(tmp_path / "run"), "model": {"model_dir": model_dir},
        "data": {"path": str(path), "n_frames": FRAMES, "stride": 2, "resolution": SIZE, "latents": True}})
    assert loop.check_data(cfg)["vae_sha256"] == meta[0][1]["latents"]["vae_sha256"]
    plain, _ = prepare(generic_rows(source / "clips.csv"), tmp_path / "plain", min_frames=FRAMES, workers=1)
    with pytest.raises(LatentMismatch, match="holds no cached latents: prepare it with prepare_dataset.py --latents"):
        loop.check_data(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=str(plain))))
    with pytest.raises(ValueError, match="the vae task trains the VAE on pixels"):
        loop.check_data(dataclasses.replace(cfg, task="vae"))


def test_prepare_cli_bf16_cache_reuse_and_refusals(dataset, model_dir, source, tmp_path, capsys):
    """prepare_dataset.py --latents: the same clips as the fixture's (same seed), stored in bf16 (the fp32 values
    rounded once); a rerun reuses it, other cache settings are refused without --force, a bad model is an error."""
    import prepare_dataset

    def cli(*extra):
        code = prepare_dataset.main(["csv", "--csv", str(source / "clips.csv"), "--min-frames", "2", "--workers", "1",
                                     "--out", str(tmp_path / "ds"), "--latent-seed", "3", "--n-frames", "2",
                                     "--stride", "2", "--resolution", "8", "--latent-clips", "3", *extra])
        out = capsys.readouterr()
        return code, out.out, out.err

    code, out, _ = cli("--latents", model_dir, "--latent-dtype", "bf16")
    assert code == 0 and "(3 videos, 0 skipped; 3 cached clips per video, 2 KiB each (bf16))" in out
    fp32, bf16 = open_dataset(dataset[0]), open_dataset(tmp_path / "ds")
    for i in range(3):
        assert bf16[i]["latent_mean"].dtype == jnp.bfloat16
        for k in ("latent_mean", "latent_logvar"):
            np.testing.assert_array_equal(bf16[i][k], fp32[i][k].astype(jnp.bfloat16))
        np.testing.assert_array_equal(bf16[i]["latent_scores"], fp32[i]["latent_scores"])
    code, out, _ = cli("--latents", model_dir, "--latent-dtype", "bf16")
    assert code == 0 and "already holds this dataset; reusing it" in out
    code, _, err = cli("--latents", model_dir, "--latent-dtype", "fp16")
    assert code == 2 and "prepared from other inputs (latents: " in err and "--force" in err
    code, _, err = cli("--latents", str(tmp_path / "no-model"))
    assert code == 2 and "error: model directory" in err and "does not exist" in err
