"""Writing to object stores (gs://) without a network: fsspec's in-memory filesystem stands in for Google Cloud
Storage (`etils.epath` reaches gs:// through fsspec when TensorFlow is absent). A training export and a media file
land in the bucket, complete, with a model directory's completion mark (config.json) uploaded last; nothing is
written to a local `gs:` folder, as `pathlib` would."""

import importlib
import io
import os
import types

import fsspec
import jax
import numpy as np
import pytest
from etils import epath
from etils.epath import backend
from fsspec.implementations.memory import MemoryFileSystem
from PIL import Image

from pia_jax import media
from pia_jax.weights.model_dir import ModelDirError, read_config


class FakeGCS(MemoryFileSystem):
    """An in-memory bucket store that answers to gs:// like gcsfs (paths without the scheme, no leading slash)."""
    protocol = ("gs", "gcs")
    store, pseudo_dirs = {}, [""]

    @classmethod
    def _strip_protocol(cls, path):
        return str(path).split("://", 1)[-1].strip("/")


@pytest.fixture
def gcs(monkeypatch, tmp_path):
    registry = importlib.import_module("fsspec.registry")._registry  # `fsspec.registry` is a read-only view
    saved = {k: registry.get(k) for k in ("gs", "gcs")}
    for name in ("gs", "gcs"):
        fsspec.register_implementation(name, FakeGCS, clobber=True)
    backend.fsspec_backend._get_filesystem.cache_clear()
    FakeGCS.store.clear()
    monkeypatch.chdir(tmp_path)  # a local "gs:" folder would appear here
    yield FakeGCS.store
    for name, cls in saved.items():
        registry.pop(name, None) if cls is None else fsspec.register_implementation(name, cls, True)
    backend.fsspec_backend._get_filesystem.cache_clear()
    assert os.listdir(tmp_path) == []


def test_training_export_to_a_bucket(gcs):
    from pia_jax.training import tasks
    from tests.helpers import setup, train_config
    params, trainer = jax.device_put(setup().trainable), types.SimpleNamespace(setup=setup())  # all export uses
    for _ in range(2):  # the second export replaces the first
        tasks.export("gs://bucket/run/model", trainer, params, train_config(export_dtype="fp32"))
        keys = [k for k in gcs if k.startswith("bucket/run/model/")]
        names = [k.removeprefix("bucket/run/model/") for k in keys]
        assert set(names) >= {"unet.safetensors", "vae.safetensors", "text_encoder.safetensors", "sources.json",
                              "tokenizer/tokenizer.json"}
        assert names[-1] == "config.json" and names.count("config.json") == 1  # the completion mark, uploaded last
    header = epath.Path("gs://bucket/run/model/unet.safetensors").read_bytes()
    assert int.from_bytes(header[:8], "little") > 0 and len(header) > 8 * len(setup().trainable)
    with pytest.raises(ModelDirError, match="read from a local disk"):
        read_config("gs://bucket/run/model")


def test_media_writer_to_a_bucket(gcs):
    frames = np.random.default_rng(0).integers(0, 255, (3, 16, 24, 3), np.uint8)
    media.write_gif("gs://bucket/run/validation/step_0000007/0.gif", frames)
    data = epath.Path("gs://bucket/run/validation/step_0000007/0.gif").read_bytes()
    with Image.open(io.BytesIO(data)) as gif:
        assert (gif.n_frames, gif.size) == (3, (24, 16))
    assert list(gcs) == ["bucket/run/validation/step_0000007/0.gif"]
    with pytest.raises(media.MediaError, match="is a directory"):
        media.write_gif("gs://bucket/run/validation", frames)


def test_sample_cli_reads_and_writes_a_bucket(gcs, tmp_path_factory, capsys):
    """sample.py with --image, --out and --save-noise on gs://: the image is read and every output uploaded through
    pia_jax.files (no local `gs:` folder); a model directory on a bucket is refused before anything loads."""
    import dataclasses

    import sample
    from pia_jax.models import config
    from tests import torch_models as tm
    from tests.assets import write_vocab
    cfg = dataclasses.replace(config.TINY, unet=dataclasses.replace(config.TINY.unet, norm_semantics="pia"))
    root = tmp_path_factory.mktemp("bucket_model")
    write_vocab(root / "tokenizer")
    model = tm.write_model_dir(root / "model", cfg, tm.unet_motion(cfg.unet), tm.vae(cfg.vae),
                               tm.clip_text(cfg.text), root / "tokenizer")
    png = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 24, 3), np.uint8)).save(png, format="PNG")
    epath.Path("gs://bucket/in/cat.png").write_bytes(png.getvalue())
    args = ["--image", "gs://bucket/in/cat.png", "--prompt", "a cat", "--frames", "3", "--steps", "1", "--size",
            "24", "--no-progress", "--format", "gif,png", "--save-noise", "--out", "gs://bucket/out/cat.gif"]
    from pia_jax.sampling import compile_cache
    try:  # the compilation cache and the stored executables on the bucket too (a pod's hosts can share them)
        assert sample.main(["--model", str(model), *args, "--compile-cache", "gs://bucket/cache"]) == 0
        assert jax.config.jax_compilation_cache_dir == "gs://bucket/cache"
    finally:
        compile_cache.enable("off")
    assert "wrote gs://bucket/out/cat.gif" in capsys.readouterr().out
    stored = [k for k in gcs if k.startswith("bucket/cache/pia_jax_executables/")]
    assert len(stored) == 3 and all(k.endswith(".pkl") for k in stored)  # encode, denoise, decode
    assert sorted(k for k in gcs if k.startswith("bucket/out/")) == [
        "bucket/out/cat.gif", "bucket/out/cat_frames/0000.png", "bucket/out/cat_frames/0001.png",
        "bucket/out/cat_frames/0002.png", "bucket/out/cat_noise.npy", "bucket/out/cat_posterior_noise.npy"]
    with Image.open(io.BytesIO(epath.Path("gs://bucket/out/cat.gif").read_bytes())) as gif:
        assert (gif.n_frames, gif.size) == (3, (24, 16))
    assert sample.main(["--model", "gs://bucket/model", *args]) == 2
    assert "model directories are read from a local disk; copy 'gs://bucket/model'" in capsys.readouterr().err
