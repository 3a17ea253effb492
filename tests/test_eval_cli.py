"""evaluate.py end to end: a tiny CLIP converted from the transformers layout, a tiny random PIA model, and a
2-case AnimateBench-layout folder (one style in each case-file form); then scoring the videos it made."""

import csv
import json
import shutil

import numpy as np
import pytest
import yaml
from PIL import Image

import evaluate
from pia_jax import media
from tests.eval_assets import write_tiny_pia_model, write_transformers_clip

PRESETS = ("small", "moderate", "large")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    model = write_tiny_pia_model(root / "demo" / "model")
    write_transformers_clip(root / "clip-src", seed=2)
    bench = root / "bench"
    rng = np.random.default_rng(0)
    for style, name in (("cartoon", "1.png"), ("real", "lighthouse.jpg")):
        (bench / "img" / style).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(bench / "img" / style / name)
    (bench / "configs").mkdir()
    (bench / "configs" / "cartoon.yaml").write_text(yaml.safe_dump(
        {"seed": 3, "cases": [{"image": "1.png", "prompts": ["hello cat"]}]}))
    (bench / "configs" / "real.yaml").write_text(yaml.safe_dump(  # PIA's example-config form
        {"prompts": [["lightning, lighthouse"]], "n_prompt": ["dark"], "generate": {"global_seed": 5},
         "validation_data": {"input_name": "lighthouse"}}))
    (root / "models.yaml").write_text(yaml.safe_dump({"cartoon": str(model), "real": "demo/model"}))  # relative
    return root


def run(capsys, *args):
    code = evaluate.main([str(a) for a in args])
    return code, capsys.readouterr()


def test_bench_end_to_end(setup, capsys):
    root = setup
    code, io = run(capsys, "convert-clip", root / "clip-src", "--out", root / "clip")
    assert code == 0, io.err
    out = root / "results"
    code, io = run(capsys, "bench", root / "bench", "--clip", root / "clip", "--models", root / "models.yaml",
                   "--out", out, "--frames", 8, "--steps", 2, "--size", 32, "--devices", 1)
    assert code == 0, io.err
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert [(r["style"], r["case"], r["motion"]) for r in rows] == [
        (s, c, p) for s, c in (("cartoon", "1-0"), ("real", "lighthouse-0")) for p in PRESETS]
    assert [r["seed"] for r in rows] == ["3"] * 3 + ["5"] * 3
    for r in rows:
        assert r["main"] == str(int(r["motion"] == "small"))
        for key in ("image_alignment", "text_alignment", "frame_consistency"):
            assert -1 <= float(r[key]) <= 1 and 0 <= float(r[f"{key}_scaled"]) <= 250
        assert float(r["flow_mean"]) >= 0 and r["dynamic"] in ("0.0", "1.0") and -1 <= float(r["ssim"]) <= 1
        assert -1 <= float(r["controllability"]) <= 1 or r["controllability"] == "nan"
    # requested motion is the preset's 1 - mean affinity at 8 frames: small < moderate < large
    requested = [float(r["requested_motion"]) for r in rows[:3]]
    assert requested == sorted(requested)
    summary = (out / "summary.md").read_text()
    assert "| cartoon | 1 |" in summary and "| real | 1 |" in summary and "| **all** | 2 |" in summary
    # 32 x 32 after the long side is shrunk to 32 (48 x 40 -> 32 x 26 -> multiples of 8: 32 x 24)
    with Image.open(out / "videos" / "cartoon" / "1-0-large.gif") as gif:
        assert gif.n_frames == 8 and gif.size == (24, 32)
    with Image.open(out / "sheets" / "real" / "lighthouse-0.png") as sheet:  # 3 rows; image + 8 frames
        assert sheet.size == (9 * (24 + 4), 3 * (32 + 4))  # each tile framed by 2 white px
    with Image.open(out / "motion.png") as plot:
        assert plot.size[0] > 300

    # the same cases scored from existing videos, without sampling or a PIA model: for "real" the GIFs just
    # written (every preset), for "cartoon" a still video equal to the input image (PNG frames, main preset only)
    videos = root / "existing"
    shutil.copytree(out / "videos" / "real", videos / "real")
    still = np.stack([np.asarray(Image.open(root / "bench" / "img" / "cartoon" / "1.png"))] * 8)
    media.write_png_frames(videos / "cartoon" / "1-0", still)
    code, io = run(capsys, "bench", root / "bench", "--videos", videos, "--out", root / "rescored",
                   "--clip", root / "clip")
    assert code == 0, io.err
    again = list(csv.DictReader(open(root / "rescored" / "scores.csv")))
    assert [(r["case"], r["motion"]) for r in again] == [("1-0", "small")] + [("lighthouse-0", p) for p in PRESETS]
    copy = again[0]  # known answers: identical to the image, no motion, no ranking of one video
    assert copy["psnr"] == "inf" and float(copy["ssim"]) == 1 and float(copy["flow_mean"]) < 0.005
    assert copy["dynamic"] == "0.0" and copy["controllability"] == "nan"
    assert float(copy["image_alignment"]) == pytest.approx(1, abs=1e-6)  # fp32 normalisation rounding
    assert float(copy["frame_consistency"]) == pytest.approx(1, abs=1e-6)
    for a, b in zip(again[1:], rows[3:]):  # the GIF palette (256 colours) moves the CLIP scores only a little
        assert float(a["image_alignment"]) == pytest.approx(float(b["image_alignment"]), abs=0.05)

    # one video
    code, io = run(capsys, "score", "--video", out / "videos" / "real" / "lighthouse-0-small.gif",
                   "--image", root / "bench" / "img" / "real" / "lighthouse.jpg", "--prompt", "lighthouse",
                   "--clip", root / "clip", "--out", root / "one.json")
    assert code == 0, io.err
    scores = json.loads((root / "one.json").read_text())
    assert json.loads(io.out) == scores and {"text_alignment_scaled", "psnr", "dynamic"} <= set(scores)


def test_bad_inputs_fail_before_work(setup, tmp_path, capsys):
    root = setup
    bench = root / "bench"
    cases = [
        (["bench", tmp_path / "nothing", "--model", root / "demo" / "model", "--out", tmp_path / "o"], "no case files"),
        (["bench", bench, "--model", tmp_path / "nomodel", "--out", tmp_path / "o"], "does not exist"),
        (["bench", bench, "--model", root / "demo" / "model", "--out", tmp_path / "o", "--presets", "huge"],
         "unknown affinity preset"),
        (["bench", bench, "--videos", tmp_path, "--out", tmp_path / "o"], "no video in"),
        (["bench", bench, "--model", root / "demo" / "model", "--out", tmp_path / "o", "--clip", tmp_path],
         "convert-clip"),
        (["bench", bench, "--model", root / "demo" / "model", "--out", root / "bench"], "--force"),
        (["score", "--video", tmp_path / "v.gif", "--image", tmp_path / "i.png", "--prompt", "x"], "not found"),
        (["convert-clip", tmp_path, "--out", tmp_path / "c"], "none of"),
    ]
    map_file = tmp_path / "map.yaml"
    map_file.write_text("cartoon: x\n")
    cases.append((["bench", bench, "--models", map_file, "--out", tmp_path / "o"], "no model for the styles ['real']"))
    for args, message in cases:
        code, io = run(capsys, *args)
        assert code == 2 and io.err.startswith("error:") and message in io.err, (args, io.err)
        assert not (tmp_path / "o").exists() and not (tmp_path / "c").exists()


def test_summary_means():
    from pia_jax.eval.bench import summary_markdown
    row = lambda style, main, **kw: {"style": style, "main": main, "image_alignment_scaled": 250.0, "psnr": 30.0,
                                     "controllability": float("nan"), **kw}  # noqa: E731
    rows = [row("a", 1, psnr=float("inf"), controllability=1.0), row("a", 1, image_alignment_scaled=200.0),
            row("b", 1), row("b", 0, image_alignment_scaled=0.0)]  # not the main preset: left out
    lines = summary_markdown(rows).splitlines()
    assert lines[0] == "| style | videos | image align. (x250) | PSNR (dB) | controllability |"
    # infinite PSNR counts as 100 dB; NaN controllability (no ranking) is left out of the mean
    assert lines[2:] == ["| a | 2 | 225 | 65 | 1 |", "| b | 1 | 250 | 30 | nan |",
                         "| **all** | 3 | 233.3 | 53.33 | 1 |"]


def test_case_file_errors(tmp_path):
    from pia_jax.eval.bench import BenchError, read_cases
    (tmp_path / "configs").mkdir()
    (tmp_path / "img" / "s").mkdir(parents=True)
    (tmp_path / "configs" / "s.yaml").write_text("cases: [{image: 1.png, prompt: a}]\n")
    with pytest.raises(BenchError, match="1.png not found"):
        read_cases(tmp_path)
    (tmp_path / "configs" / "s.yaml").write_text("validation_data: {input_name: cat}\nprompts: [a]\n")
    with pytest.raises(BenchError, match=r"no image cat\.\*"):
        read_cases(tmp_path)
    (tmp_path / "configs" / "s.yaml").write_text("cases: [{image: 1.png}]\n")
    with pytest.raises(BenchError, match="needs 'image' and 'prompts'"):
        read_cases(tmp_path)


def test_a_one_frame_video_is_refused_before_scoring(tmp_path, capsys, monkeypatch):
    from pia_jax.eval import scores

    monkeypatch.setattr(scores, "score_video", lambda *a, **k: pytest.fail("scored"))
    frame = np.full((1, 16, 16, 3), 128, np.uint8)
    media.write_gif(tmp_path / "v.gif", frame, fps=8)
    Image.fromarray(frame[0]).save(tmp_path / "i.png")
    code, io = run(capsys, "score", "--video", tmp_path / "v.gif", "--image", tmp_path / "i.png", "--prompt", "x")
    assert code == 2 and "v.gif has 1 frame; scoring needs a video of at least 2 frames" in io.err, io.err


@pytest.mark.parametrize("args", [("score", "--video", "gs://b/v.gif", "--image", "i.png", "--prompt", "p"),
                                  ("score", "--video", "v.gif", "--image", "gs://b/i.png", "--prompt", "p"),
                                  ("bench", "gs://b/bench", "--out", "r", "--model", "m")])
def test_an_object_store_path_is_refused_by_name(args, capsys):
    """evaluate.py reads local files: a gs:// argument is named and refused before any work (it used to become a local
    'gs:/b/...' path and fail as 'not found')."""
    with pytest.raises(SystemExit) as e:
        evaluate.main(list(args))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "gs://b/" in err and "local files only" in err, err
