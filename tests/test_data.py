"""The training input pipeline on small synthetic videos: preparation, clip sampling, transforms, loader.

Sizes are cut down (8 frames, stride 2, 32x32 crops, 64x48 videos) so the whole file runs in seconds on CPU.
"""

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from pia_jax.data import (
    DataConfig,
    Loader,
    VideoError,
    decode_frames,
    draw,
    generic_rows,
    open_dataset,
    probe,
    sample_window,
    transform_clip,
    webvid_rows,
)
from pia_jax.data.affinity_scores import affinity_from_scores, frame_scores
from pia_jax.data.builder import prepare
from pia_jax.data.clips import PIXEL_VALUES, crop_offset, quantize, resized_size
from pia_jax.data.loader import sample_rng
from pia_jax.models.tokenizer import load_tokenizer, tokenize
from tests.assets import all_frames, write_vocab
from tests.helpers import encode_video

ROOT = Path(__file__).resolve().parents[1]

CFG = DataConfig(n_frames=8, stride=2, resolution=32)
# WebVid-style rows: name -> frame count (None: no such file); v4 sits in a page_dir subfolder.
LENGTHS = {"v0": 40, "v1": 57, "v2": 80, "v3": 66, "v4": 70, "short": 5, "garbage": None, "truncated": None,
           "nowhere": None}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    (root / "page").mkdir()
    for name, n in LENGTHS.items():
        if n is not None:
            (root / ("page" if name == "v4" else "") / f"{name}.mp4").write_bytes(encode_video(n))
    (root / "garbage.mp4").write_bytes(b"not a video " * 100)
    whole = (root / "v2.mp4").read_bytes()
    (root / "truncated.mp4").write_bytes(whole[:len(whole) // 2])  # mp4 keeps its index at the end
    with open(root / "webvid.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["videoid", "name", "page_dir"])
        w.writerows([name, f"a clip called {name}", "page"] for name in LENGTHS)
    return root


@pytest.fixture(scope="module")
def dataset(source, tmp_path_factory):
    path, report = prepare(webvid_rows(source / "webvid.csv", source), tmp_path_factory.mktemp("ds"),
                           min_frames=CFG.n_frames, workers=2)
    return path, report


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    write_vocab(folder)
    return load_tokenizer(folder)


def batches(records, tokenizer, n, **kwargs):
    kwargs = {"batch_size": 2, "seed": 0, "num_workers": 2, **kwargs}
    with Loader(records, tokenizer, CFG, **kwargs) as loader:
        return [next(loader) for _ in range(n)], loader.get_state()


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ---------------------------------------------------------------------------------------------------------------
# Sources and preparation


def test_sources(source, tmp_path):
    rows = {r.key: r for r in webvid_rows(source / "webvid.csv", source)}
    assert rows["v0"].path == str(source / "v0.mp4") and rows["v4"].path == str(source / "page" / "v4.mp4")
    assert rows["nowhere"].path is None and rows["v1"].caption == "a clip called v1"

    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.mp4").write_bytes(b"x")
    with open(tmp_path / "list.csv", "w", newline="") as f:
        csv.writer(f).writerows([["path", "caption"], ["sub/a.mp4", "relative"], [str(source / "v0.mp4"), "absolute"],
                                 ["gone.mp4", "missing"]])
    got = [(r.path, r.caption) for r in generic_rows(tmp_path / "list.csv")]
    assert got == [(str(tmp_path / "sub" / "a.mp4"), "relative"), (str(source / "v0.mp4"), "absolute"),
                   (None, "missing")]
    (tmp_path / "bad.csv").write_text("file,text\na,b\n")
    with pytest.raises(ValueError, match="missing column"):
        list(generic_rows(tmp_path / "bad.csv"))


def test_prepare_counts_and_round_trip(dataset, source):
    path, report = dataset
    assert report["examples"] == 5
    assert report["skipped"] == {"too_short": 1, "corrupt": 2, "missing": 1}
    assert sorted(key for key, _ in report["skipped_examples"]["corrupt"]) == ["garbage", "truncated"]
    records = open_dataset(path.parent.parent)  # the folder given to prepare works as well
    by_key = {records[i]["key"]: records[i] for i in range(len(records))}
    assert sorted(by_key) == ["v0", "v1", "v2", "v3", "v4"]
    for key, r in by_key.items():
        assert (r["num_frames"], r["height"], r["width"]) == (LENGTHS[key], 48, 64)
        assert r["caption"] == f"a clip called {key}" and len(r["pts"]) == LENGTHS[key]
        where = source / ("page" if key == "v4" else "") / f"{key}.mp4"
        assert r["video"] == where.read_bytes()  # stored as they were
    # A second run finds the finished dataset and reuses it.
    again, report2 = prepare(webvid_rows(source / "webvid.csv", source), path.parent.parent, min_frames=8)
    assert again == path and report2["skipped"] == report["skipped"]


def test_killed_preparation_leaves_no_dataset(source, tmp_path, capsys):
    """SIGKILL in the middle of preparing: nothing is in the output folder; the next run removes the killed run's
    hidden folder, saying so, and completes."""
    out = tmp_path / "ds"
    script = textwrap.dedent(f"""
        import os, signal
        from pia_jax.data.builder import prepare
        from pia_jax.data.sources import webvid_rows

        def rows():
            for i, row in enumerate(webvid_rows({str(source / "webvid.csv")!r}, {str(source)!r})):
                if i == 3:
                    os.kill(os.getpid(), signal.SIGKILL)
                yield row

        prepare(rows(), {str(out)!r}, min_frames=8, workers=1)
    """)
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, cwd=repo, env=env)
    assert done.returncode == -9, done.stderr.decode()[-2000:]
    assert not out.exists() and [p.name.split("-")[0] for p in tmp_path.iterdir()] == [".ds.tmp"]
    path, report = prepare(webvid_rows(source / "webvid.csv", source), out, min_frames=8, workers=1)
    assert len(open_dataset(path)) == report["examples"] == 5
    assert "left by a killed preparation" in capsys.readouterr().out and os.listdir(tmp_path) == ["ds"]


def write_list(path, rows, header=("path", "caption")):
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return path


def prepare_cli(capsys, *argv):
    import prepare_dataset
    code = prepare_dataset.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_no_usable_video_fails_leaving_nothing(source, tmp_path, capsys):
    listing = write_list(tmp_path / "list.csv", [[str(source / "garbage.mp4"), "x"], ["gone.mp4", "y"]])
    code, out, err = prepare_cli(capsys, "csv", "--csv", listing, "--min-frames", 8, "--out", tmp_path / "a" / "b")
    assert code == 2 and "error: no usable video among the 2 rows ({'corrupt': 1, 'missing': 1})" in err
    assert '"corrupt": 1' in out  # the skip report
    assert sorted(os.listdir(tmp_path)) == ["list.csv"]  # neither the dataset nor the folders made for it


def test_cli_bad_sources_are_clear_errors(source, tmp_path, capsys):
    code, _, err = prepare_cli(capsys, "csv", "--csv", tmp_path / "none.csv", "--out", tmp_path / "o")
    assert code == 2 and "error: cannot read the CSV" in err and "none.csv" in err
    wrong = write_list(tmp_path / "w.csv", [["a", "b"]], header=("file", "text"))
    code, _, err = prepare_cli(capsys, "csv", "--csv", wrong, "--out", tmp_path / "o")
    assert code == 2 and "missing column(s) ['path', 'caption']; a csv CSV needs ['path', 'caption']" in err
    code, _, err = prepare_cli(capsys, "webvid", "--csv", wrong, "--videos", tmp_path / "nope", "--out", tmp_path)
    assert code == 2 and "the video folder" in err and "does not exist" in err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    listing = write_list(tmp_path / "l.csv", [[str(source / "v0.mp4"), "x"]])
    code, _, err = prepare_cli(capsys, "csv", "--csv", listing, "--min-frames", 8, "--out", tmp_path / "full")
    assert code == 2 and "neither a prepared dataset nor an empty folder" in err
    assert os.listdir(tmp_path / "full") == ["notes.txt"]


def test_cli_other_inputs_refused_or_replaced_with_force(source, tmp_path, capsys):
    first = write_list(tmp_path / "one.csv", [[str(source / "v0.mp4"), "first"]])
    second = write_list(tmp_path / "two.csv", [[str(source / "v1.mp4"), "second"], [str(source / "v2.mp4"), "2"]])
    out = tmp_path / "ds"
    assert prepare_cli(capsys, "csv", "--csv", first, "--min-frames", 8, "--out", out)[0] == 0
    code, out_text, _ = prepare_cli(capsys, "csv", "--csv", first, "--min-frames", 8, "--out", out)
    assert code == 0 and "already holds this dataset; reusing it" in out_text
    code, _, err = prepare_cli(capsys, "csv", "--csv", second, "--min-frames", 8, "--out", out)
    assert code == 2 and "holds a dataset prepared from other inputs (csv: " in err and "--force" in err
    assert [open_dataset(out)[i]["caption"] for i in range(1)] == ["first"]  # untouched
    assert prepare_cli(capsys, "csv", "--csv", second, "--min-frames", 8, "--out", out, "--force")[0] == 0
    records = open_dataset(out)
    assert sorted(records[i]["caption"] for i in range(len(records))) == ["2", "second"]
    assert sorted(os.listdir(tmp_path)) == ["ds", "one.csv", "two.csv"]  # no temporary or old folder left


def test_cli_parts(source, tmp_path, capsys):
    """prepare_dataset.py on a generic CSV in two parts; opening the parent folder concatenates them."""
    import prepare_dataset

    with open(tmp_path / "list.csv", "w", newline="") as f:
        rows = [[str(source / f"{k}.mp4"), k] for k in ("v0", "v1", "v2", "short")]
        csv.writer(f).writerows([["path", "caption"], *rows])
    for k in (0, 1):
        assert prepare_dataset.main(["csv", "--csv", str(tmp_path / "list.csv"), "--part", f"{k}/2", "--min-frames",
                                     "8", "--workers", "1", "--out", str(tmp_path / "parts" / f"part-{k}")]) == 0
    assert "(1 videos, 1 skipped)" in capsys.readouterr().out  # part 1: v1 and the short one
    records = open_dataset(tmp_path / "parts")
    assert len(records) == 3 and sorted(records[i]["caption"] for i in range(3)) == ["v0", "v1", "v2"]
    with pytest.raises(SystemExit):
        prepare_dataset.main(["csv", "--csv", "x.csv", "--out", "y", "--part", "2/2"])


# ---------------------------------------------------------------------------------------------------------------
# Decoding, clip sampling, transforms


def test_probe_and_decode(source):
    data = (source / "v2.mp4").read_bytes()
    info, ref = probe(data), all_frames(data)
    assert (info.num_frames, info.height, info.width) == (80, 48, 64) and len(ref) == 80
    for indices in ([0, 1, 2], [5, 9, 13, 17, 21, 25, 29, 33], [70, 79], [40, 40, 41], [12, 24, 36]):
        np.testing.assert_array_equal(decode_frames(data, indices, info.pts), ref[indices])  # seeking
        np.testing.assert_array_equal(decode_frames(data, indices), ref[indices])  # counting from the start
    # Timestamps that do not match the file make seeking miss frames; decoding falls back to counting.
    np.testing.assert_array_equal(decode_frames(data, [30, 31], info.pts + 7), ref[[30, 31]])
    with pytest.raises(VideoError, match="corrupt"):
        decode_frames(data, [85])
    with pytest.raises(VideoError, match="corrupt"):
        probe(b"\x00" * 1000)


def test_sample_window():
    # T = size + 1 = 17: the reference's begin range [0, T - size - 1] is {0}; linspace(0, 15, 8) truncated.
    np.testing.assert_array_equal(sample_window(17, 8, 2, np.random.default_rng(0)), [0, 2, 4, 6, 8, 10, 12, 15])
    # The PIA defaults at T = 65: begin 0, linspace(0, 63, 16) truncated.
    np.testing.assert_array_equal(sample_window(65, 16, 4, np.random.default_rng(1)),
                                  [0, 4, 8, 12, 16, 21, 25, 29, 33, 37, 42, 46, 50, 54, 58, 63])
    # Shorter than the window: the whole video; linspace(0, 11, 8) = 0, 1.57, 3.14, ... truncated.
    np.testing.assert_array_equal(sample_window(12, 8, 2, np.random.default_rng(2)), [0, 1, 3, 4, 6, 7, 9, 11])
    with pytest.raises(VideoError, match="too_short"):
        sample_window(7, 8, 2, np.random.default_rng(0))
    # Long videos: begin is uniform over [0, T - size - 1], both ends reached, the window always full.
    begins = set()
    for seed in range(400):
        idx = sample_window(30, 8, 2, np.random.default_rng(seed))
        begins.add(int(idx[0]))
        assert idx[-1] == idx[0] + 15 and np.all(np.diff(idx) >= 2)
    assert begins == set(range(30 - 16))


def test_resize_crop_geometry():
    assert resized_size(336, 596, 256) == (256, 454)  # the long side truncates (454.09)
    assert resized_size(600, 256, 256) == (600, 256)
    assert resized_size(48, 64, 32) == (32, 42)  # 42.67 -> 42
    assert crop_offset(455, 256) == 100 and crop_offset(457, 256) == 100  # round half to even, as torchvision
    # A known image: a horizontal ramp of width 64 resizes to a ramp; the flip reverses it before the crop.
    ramp = np.broadcast_to(np.arange(64, dtype=np.uint8)[None, None, :, None] * 4, (1, 64, 64, 3))
    out = transform_clip(np.ascontiguousarray(ramp), False, 32)
    flipped = transform_clip(np.ascontiguousarray(ramp), True, 32)
    np.testing.assert_allclose(flipped, out[:, :, ::-1], atol=1e-6)
    assert np.all(np.diff(out[0, 0, :, 0]) > 0) and out.min() >= -1 and out.max() <= 1
    np.testing.assert_allclose(transform_clip(np.full((2, 48, 64, 3), 255, np.uint8), False, 32), 1.0, atol=1e-6)


def test_transform_matches_torchvision_resize():
    """torchvision's Resize(S, antialias=True) on a float tensor is F.interpolate(bilinear, antialias=True)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    for h, w, size in ((48, 64, 32), (64, 45, 32), (90, 160, 40), (20, 24, 32), (168, 298, 128)):
        frames = rng.integers(0, 256, (2, h, w, 3), dtype=np.uint8)
        for flip in (False, True):
            t = torch.from_numpy(frames).permute(0, 3, 1, 2).double() / 255.0  # float64: the exact result
            t = t.flip(-1) if flip else t
            # torchvision: short side -> size, long side int(size * long / short); crop at int(round(excess / 2))
            rh, rw = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
            t = torch.nn.functional.interpolate(t, size=(rh, rw), mode="bilinear", align_corners=False,
                                                antialias=True)
            top, left = int(round((rh - size) / 2)), int(round((rw - size) / 2))
            want = ((t[:, :, top:top + size, left:left + size] - 0.5) / 0.5).permute(0, 2, 3, 1).numpy()
            np.testing.assert_allclose(transform_clip(frames, flip, size), want, atol=1e-5)


def test_pixels_travel_as_uint8(dataset, tokenizer):
    """uint8 levels: exact for a clip that needs no resize (PIXEL_VALUES is transform_clip's arithmetic), within half
    a level (0.5/255 in [0, 1] units) of the float clip for a resized one; the loader's batches are uint8."""
    frames = np.random.default_rng(0).integers(0, 256, (3, 32, 40, 3), dtype=np.uint8)
    exact = transform_clip(frames, True, 32)  # short side 32 already: cropped, not resized
    np.testing.assert_array_equal(quantize(exact), frames[:, :, ::-1][:, :, 4:36])
    np.testing.assert_array_equal(PIXEL_VALUES[quantize(exact)], exact)  # bit for bit
    resized = transform_clip(frames, False, 24)
    error = np.abs(PIXEL_VALUES[quantize(resized)] - resized) / 2  # in [0, 1] units
    assert 0.4 / 255 < error.max() <= 0.5 / 255 + 1e-7
    records = open_dataset(dataset[0])
    (levels,), _ = batches(records, tokenizer, 1)
    assert levels["pixel_values"].dtype == np.uint8


def test_dropout_rates():
    """Over 20000 samples the rates are within 5 standard deviations of p (binomial; draws are deterministic)."""
    n, cfg = 20000, DataConfig(n_frames=8, stride=2, resolution=32)
    draws = [draw(40, cfg, sample_rng(0, 0, position)) for position in range(n)]
    for p, hits in ((cfg.caption_dropout, sum(d.drop_caption for d in draws)),
                    (cfg.condition_dropout, sum(not d.use_condition for d in draws)),
                    (0.5, sum(d.flip for d in draws))):
        assert abs(hits / n - p) < 5 * np.sqrt(p * (1 - p) / n), (p, hits / n)
    counts = np.bincount([d.cond_frame for d in draws], minlength=8)
    assert len(counts) == 8 and np.all(np.abs(counts / n - 1 / 8) < 5 * np.sqrt(1 / 8 * 7 / 8 / n))


# ---------------------------------------------------------------------------------------------------------------
# Loader


def test_batches_follow_the_reference_recipe(dataset, tokenizer):
    path, _ = dataset
    records = open_dataset(path)
    (b0, b1), _ = batches(records, tokenizer, 2)
    assert b0["pixel_values"].shape == (2, 8, 32, 32, 3) and b0["pixel_values"].dtype == np.uint8
    assert b0["input_ids"].shape == (2, 77) and b0["input_ids"].dtype == np.int32
    assert b0["affinity"].dtype == np.float32 and b0["cond_frame"].dtype == np.int32
    assert b0["use_condition"].dtype == bool
    # Rebuild each sample of the first batches from its draws, independently decoded and scored.
    perm = np.random.default_rng([0, 0]).permutation(len(records))
    for step, batch in enumerate((b0, b1)):
        for i in range(2):
            position = step * 2 + i
            record = records[int(perm[position])]
            d = draw(record["num_frames"], CFG, sample_rng(0, 0, position))
            pixels = transform_clip(all_frames(record["video"])[d.indices], d.flip, 32)
            np.testing.assert_array_equal(batch["pixel_values"][i], quantize(pixels))
            assert batch["cond_frame"][i] == d.cond_frame and batch["use_condition"][i] == d.use_condition
            caption = "" if d.drop_caption else record["caption"]
            np.testing.assert_array_equal(batch["input_ids"][i], tokenize(tokenizer, [caption])[0])
            coef = (affinity_from_scores(frame_scores((pixels / 2 + 0.5) * 255, d.cond_frame), d.cond_frame)
                    if d.use_condition else np.zeros(8, np.float32))
            np.testing.assert_array_equal(batch["affinity"][i], coef)


def test_determinism_and_host_sharding(dataset, tokenizer):
    records = open_dataset(dataset[0])
    # Same seed, different worker counts and prefetch depths: the same batches, across epoch boundaries.
    one, _ = batches(records, tokenizer, 5, num_workers=1, prefetch=0)
    assert_batches_equal(one, batches(records, tokenizer, 5, num_workers=3, prefetch=3)[0])
    other, _ = batches(records, tokenizer, 5, seed=1)
    assert not np.array_equal(one[0]["pixel_values"], other[0]["pixel_values"])
    # Two hosts with 1 example each: their batches put together are the single-host batch of 2, whose examples are
    # distinct positions of the epoch's permutation, so the hosts read disjoint examples.
    hosts = [batches(records, tokenizer, 5, batch_size=1, process_index=h, process_count=2)[0] for h in (0, 1)]
    for step, whole in enumerate(one):
        for k in whole:
            np.testing.assert_array_equal(np.concatenate([hosts[0][step][k], hosts[1][step][k]]), whole[k])


def test_state_resume(dataset, tokenizer):
    records = open_dataset(dataset[0])
    straight, _ = batches(records, tokenizer, 7)
    first, state = batches(records, tokenizer, 3)
    state = json.loads(json.dumps(state))  # as a checkpoint stores it
    assert state["epoch"] == 1 and state["step"] == 1  # 2 steps per epoch
    with Loader(records, tokenizer, CFG, batch_size=2, seed=0, num_workers=2) as loader:
        next(loader)  # a used loader: its prefetched batches must be dropped
        loader.set_state(state)
        rest = [next(loader) for _ in range(4)]
    assert_batches_equal(first + rest, straight)
    with Loader(records, tokenizer, CFG, batch_size=1, seed=0) as loader, pytest.raises(ValueError, match="global"):
        loader.set_state(state)


class Damaged:
    """A dataset where some records fail only at load time."""

    def __init__(self, records, bad: dict):
        self.records, self.bad = records, bad

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        r = self.records[i]
        if self.bad.get(i) == "bytes":
            r["video"] = b"\x00" * 2000  # prepared as fine, garbage now
        elif self.bad.get(i) == "record":
            raise KeyError("damaged record")
        return r


def test_load_time_failures_are_skipped(dataset, tokenizer):
    records = open_dataset(dataset[0])
    perm = np.random.default_rng([0, 0]).permutation(5)
    bad = {int(perm[0]): "bytes", int(perm[3]): "record"}  # positions 0 and 3 of epoch 0
    damaged = Damaged(records, bad)
    got, state = batches(damaged, tokenizer, 2)
    assert state["skipped"] == {"corrupt": 1, "error": 1}
    # The failed position takes the next record instead, with the draws of its second attempt.
    for position in (0, 3):
        index = (int(perm[position]) + 1) % 5
        while index in bad:
            index = (index + 1) % 5
        attempts = (index - int(perm[position])) % 5
        record = records[index]
        d = draw(record["num_frames"], CFG, sample_rng(0, 0, position, attempts))
        pixels = transform_clip(all_frames(record["video"])[d.indices], d.flip, 32)
        np.testing.assert_array_equal(got[position // 2]["pixel_values"][position % 2], quantize(pixels))
    # Deterministic, counts included.
    again, state2 = batches(damaged, tokenizer, 2, num_workers=1)
    assert_batches_equal(got, again)
    assert state2 == state
    # Nothing usable at all: a clear error instead of a silent endless loop.
    with Loader(Damaged(records, {i: "bytes" for i in range(5)}), tokenizer, CFG, batch_size=2,
                max_attempts=5) as loader, pytest.raises(RuntimeError, match="looks broken"):
        next(loader)


def test_cli_prints_no_tfds_progress_bars(source, tmp_path):
    """tfds' tqdm bars (its splits, examples and shuffling of a temporary folder) are not the user's business."""
    listing = write_list(tmp_path / "l.csv", [[str(source / "v0.mp4"), "x"]])
    run = subprocess.run([sys.executable, str(ROOT / "prepare_dataset.py"), "csv", "--csv", str(listing),
                          "--min-frames", "8", "--out", str(tmp_path / "ds")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "dataset:" in run.stdout and "%|" not in run.stderr and "Shuffling" not in run.stderr, run.stderr
