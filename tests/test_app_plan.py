"""The web UI without a browser: a request -> sample.py's parsed command line, plan and messages (pia_jax/app/plan.py),
the controls made from the option declarations, and bad input refused before the model loads.

The oracle is sample.py itself: the app's command line, parsed by sample.py's parser, must give the app's namespace,
and sample.py's `plan` on it the app's videos or the app's error message, word for word.
"""

import dataclasses
from pathlib import Path

import numpy as np
import pytest

import sample
from pia_jax.app import plan
from pia_jax.models.config import opt
from pia_jax.sampling import cases
from pia_jax.sampling.options import DEFAULT_NEGATIVE_PROMPT

ROOT = Path(__file__).resolve().parents[1]
TOY, IMAGE = ROOT / "models" / "toy", ROOT / "docs" / "toy" / "image.png"
PROMPT = "a green cross moves right on a gray background"
BASE = {"image": str(IMAGE), "prompt": PROMPT, "negative_prompt": "", "frames": 8, "steps": 4}
pytestmark = pytest.mark.skipif(not (TOY / "config.json").exists(), reason="models/toy is not in this checkout")

REQUESTS = {
    "plain": BASE,
    "last frame keyframe": {**BASE, "last_frame": str(IMAGE), "motion": "moderate"},
    "prompt map": {**BASE, "prompt": "", "prompt_map": "0: a red circle moves left\n\n 4: a red circle grows "},
    "every kind of value": {**BASE, "scheduler": "dpmpp_2m",
                            "karras": True, "guidance": 4, "strength": 0.75, "clip_skip": "1", "size": 256,
                            "affinity": "1, 0.9, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8", "seed": 7, "num_videos": 3,
                            "fps": 12.5, "context_length": "8", "decode_chunk": 2.0},
}


def _sample_args(argv):
    assert argv[:2] == ["python", "sample.py"]
    return sample.build_parser().parse_args(sample.attach_values(argv[2:]))


@pytest.mark.parametrize("name", REQUESTS)
def test_the_command_line_is_what_the_app_runs(name, tmp_path):
    a = plan.namespace(TOY, REQUESTS[name], tmp_path / "0001", compile_cache="off")
    assert vars(_sample_args(plan.command(a))) == vars(a)


def test_the_reference_negative_prompt_is_sample_py_s_default(tmp_path):
    a = plan.namespace(TOY, {**BASE, "negative_prompt": DEFAULT_NEGATIVE_PROMPT}, tmp_path / "0001")
    argv = plan.command(a)
    assert a.negative_prompt is None and "--negative-prompt" not in argv  # the short command line
    assert vars(_sample_args(argv)) == vars(a)


@pytest.mark.parametrize("name", REQUESTS)
def test_the_app_plans_the_videos_sample_py_plans(name, tmp_path):
    a = plan.namespace(TOY, REQUESTS[name], tmp_path / "0001", compile_cache="off")
    ours, theirs = plan.check(a), sample.plan(_sample_args(plan.command(a)))[0]
    assert [(g.height, g.width, g.frames, g.options, g.keyframes) for g in ours.groups] == \
           [(g.height, g.width, g.frames, g.options, g.keyframes) for g in theirs.groups]
    for v, w in zip(ours.videos, theirs.videos, strict=True):
        assert (v.name, v.prompt, v.negative_prompt, v.seed, v.settings, v.keyframes) == \
               (w.name, w.prompt, w.negative_prompt, w.seed, w.settings, w.keyframes)
        np.testing.assert_array_equal(v.affinity, w.affinity)
    assert ours.formats == ["mp4", "gif"]


def test_the_requests_values_reach_the_plan(tmp_path):
    """Hand-checked: what the 'every kind' request asks for is what the plan holds."""
    p = plan.check(plan.namespace(TOY, REQUESTS["every kind of value"], tmp_path / "0001"))
    (g,) = p.groups
    assert [v.seed for v in g.videos] == [7, 8, 9] and g.frames == 8
    assert (g.options.scheduler, g.options.karras, g.options.guidance_scale, g.options.strength, g.options.clip_skip,
            g.options.context_length, g.options.decode_chunk) == ("dpmpp_2m", True, 4.0, 0.75, 1, 8, 2)
    assert g.videos[0].negative_prompt == ""
    np.testing.assert_allclose(g.videos[0].affinity, [1, 0.9] + [0.8] * 6)
    keyed = plan.check(plan.namespace(TOY, REQUESTS["last frame keyframe"], tmp_path / "0002"))
    assert keyed.groups[0].keyframes == [0, 7]


BAD = {  # request -> a piece of the message (the whole message is compared with sample.py's)
    "no prompt": ({**BASE, "prompt": " "}, "--prompt are required"),
    "prompt and prompt map": ({**BASE, "prompt_map": "0: a red circle"}, "not both"),
    "cond frame with a last frame": ({**BASE, "last_frame": str(IMAGE), "cond_frame": 2}, "--keyframe replaces"),
    "affinity count": ({**BASE, "affinity": "1, 0.5"}, "one affinity value per frame (8)"),
    "unknown word": ({**BASE, "prompt": "a red dog"}, "does not know the words dog"),
    "default negative prompt on the toy model": ({**BASE, "negative_prompt": DEFAULT_NEGATIVE_PROMPT},
                                                 "--negative-prompt ''"),
    "scheduler": ({**BASE, "scheduler": "euler_x"}, "scheduler must be one of"),
    "missing image": ({**BASE, "image": "nowhere.png"}, "not found"),
    "prompt map without frame 0": ({**BASE, "prompt": "", "prompt_map": "3: a red circle"}, "at frame 0"),
    "steps": ({**BASE, "steps": 0}, "steps"),
    "fps": ({**BASE, "fps": 0}, "fps must be in"),
    "eta with dpmpp": ({**BASE, "scheduler": "dpmpp_2m", "eta": 0.5}, "eta"),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_input_gets_sample_py_s_message(name, tmp_path):
    request, piece = BAD[name]
    a = plan.namespace(TOY, request, tmp_path / "0001")
    with pytest.raises((ValueError, OSError)) as ours:
        plan.check(a)
    with pytest.raises((ValueError, OSError)) as theirs:
        sample.plan(_sample_args(plan.command(a)))
    assert str(ours.value) == str(theirs.value)
    assert piece in str(ours.value)


@pytest.mark.parametrize("request_, message", [
    ({"frame": 8}, "unknown keys ['frame']; allowed: ["),
    ({"frames": 8.5}, "frames must be an integer, got 8.5"),
    ({"frames": "eight"}, "frames must be an integer, got 'eight'"),
    ({"karras": "yes"}, "karras must be true or false, got 'yes'"),
    ({"guidance": [4]}, "guidance must be a number, got [4]"),
    ({"steps": None}, "steps: give a value"),
])
def test_requests_of_unknown_keys_or_wrong_types_are_refused(request_, message):
    with pytest.raises(ValueError) as e:
        plan.typed(request_)
    assert str(e.value).startswith(message)


def test_typed_fills_defaults_and_reads_text_fields():
    r = plan.typed({"frames": 8.0, "clip_skip": " ", "context_length": "12", "negative_prompt": "", "affinity": ""})
    assert (r["frames"], r["clip_skip"], r["context_length"], r["negative_prompt"], r["affinity"]) == \
           (8, None, 12, "", None)  # '' is no negative prompt; a blank number or affinity is 'not given'
    assert r["steps"] == cases.Settings.steps and r["seed"] == 42 and r["fps"] == 8.0


def test_the_toy_model_gets_no_negative_prompt_by_default(tmp_path):
    assert plan.default_negative_prompt(TOY) == ""
    (tmp_path / "tokenizer").mkdir()  # a CLIP tokenizer (not the toy's) knows the reference's words
    assert plan.default_negative_prompt(tmp_path) == DEFAULT_NEGATIVE_PROMPT


def test_every_option_gets_a_control_in_one_section(monkeypatch):
    gr = pytest.importorskip("gradio")
    from pia_jax.app import controls
    placed = [k for keys in controls.sections().values() for k in keys] + list(controls.PROMPT_FIELDS)
    assert sorted(placed) == sorted(plan.FIELDS)
    kinds = {k: type(controls.control(k)) for k in ("scheduler", "karras", "steps", "clip_skip", "motion")}
    assert kinds == {"scheduler": gr.Dropdown, "karras": gr.Checkbox, "steps": gr.Number, "clip_skip": gr.Textbox,
                     "motion": gr.Dropdown}
    assert controls.control("scheduler").choices == [(k, k) for k in cases.SampleOptions.__dataclass_fields__[
        "scheduler"].metadata["choices"]]
    if "context_mode" in plan.FIELDS:  # being added (unset: the sampler picks): a blank choice leaves it unset
        mode = controls.control("context_mode")
        assert mode.choices[0] == ("not given", "") and mode.value == ""
        assert plan.typed({"context_mode": ""})["context_mode"] is None
    # an option declared tomorrow appears under "More options", from its declaration alone
    @dataclasses.dataclass(frozen=True)
    class Tomorrow(cases.Settings):
        new_option: str | None = opt(None, "a new option", ("a", "b"))

    monkeypatch.setattr(cases, "Settings", Tomorrow)
    monkeypatch.setitem(plan.FIELDS, "new_option", dataclasses.fields(Tomorrow)[-1])
    assert "new_option" in controls.sections()[controls.OTHER]
    new = controls.control("new_option")
    assert new.choices == [("not given", ""), ("a", "a"), ("b", "b")] and new.info == "a new option (--new-option)"
    assert plan.typed({"new_option": "b"})["new_option"] == "b"


def test_bad_input_is_refused_before_the_model_loads(tmp_path):
    from pia_jax.app.runner import Runner
    runner = Runner({"toy": TOY}, tmp_path / "out")
    with pytest.raises(ValueError, match="one affinity value per frame"):
        runner.generate(BAD["affinity count"][0])
    assert runner.animator is None and runner.history == []
    assert not (tmp_path / "out" / "0001").exists()  # the request's folder (its copied image) is gone


def test_each_step_of_the_loop_is_reported_as_it_is_ready():
    """The Animator's progress calls (phase, done, total), as its batches make them, become gr.Progress values."""
    from pia_jax.app.runner import _progress
    seen = []
    step = _progress(lambda value, desc: seen.append((value, desc)), batches=2)
    for _ in range(2):
        step("encode", 0, 1)
        step("encode", 1, 1)
        for i in range(1, 4):
            step("denoise", i, 3)
        step("decode", 8, 8)
    assert seen[:5] == [(0.0, "batch 1/2: encoding the prompt and image"), ((1, 3), "batch 1/2: denoising"),
                        ((2, 3), "batch 1/2: denoising"), ((3, 3), "batch 1/2: denoising"),
                        (1.0, "batch 1/2: decoded 8 frames")]
    assert seen[5:7] == [(0.0, "batch 2/2: encoding the prompt and image"), ((1, 3), "batch 2/2: denoising")]
    assert len(seen) == 10


class _TooLarge:
    """An Animator stand-in whose memory plan refuses the batch, as Animator.plan_batch_size words it."""
    compile_cache, compilations, programs_loaded, compile_seconds, devices = None, 0, 0, 0.0, 1

    def plan_batch_size(self, videos, height, width, frames, *args, **kwargs):
        raise ValueError(f"one {frames}-frame {width}x{height} video needs 80.0 GiB per device, 1.0 GiB are free; "
                         "use fewer frames or a smaller size")


def test_a_request_too_large_for_the_device_shows_the_batch_size_reason(tmp_path):
    gr = pytest.importorskip("gradio")
    from pia_jax.app import ui
    from pia_jax.app.runner import Runner
    runner = Runner({"toy": TOY}, tmp_path / "out")
    runner.animator, runner.loaded = _TooLarge(), "toy"
    inputs = {k: object() for k in BASE}  # the page's controls, by request key
    video, files, status, history = ui._generate(runner, inputs)({inputs[k]: v for k, v in BASE.items()})
    assert status == ("**error:** one 8-frame 32x32 video needs 80.0 GiB per device, 1.0 GiB are free; use fewer "
                      "frames or a smaller size")
    assert video == files == history == gr.skip()  # the page keeps the last result
    assert runner.history == [] and not (tmp_path / "out" / "0001").exists()


def test_a_folder_of_models_is_a_picker_and_picking_unloads(tmp_path, capsys):
    from pia_jax.app.__main__ import find_models, main
    from pia_jax.app.runner import Runner
    for name in ("b", "a"):
        (tmp_path / "models" / name).mkdir(parents=True)
        (tmp_path / "models" / name / "config.json").write_text("{}")
    (tmp_path / "models" / "notes").mkdir()
    models = find_models(tmp_path / "models")
    assert list(models) == ["a", "b"] and find_models(TOY) == {"toy": TOY}
    runner = Runner(models, tmp_path / "out")
    runner.animator, runner.loaded = object(), "a"
    assert runner.select("b") == f"model b selected ({tmp_path / 'models' / 'b'})"
    assert runner.animator is None and runner.loaded is None
    with pytest.raises(ValueError, match="unknown model 'c'; the app serves a, b"):
        runner.select("c")
    assert main(["--model", str(tmp_path / "models" / "notes")]) == 2  # refused before anything loads
    assert "is neither a model directory (with config.json) nor a folder of them" in capsys.readouterr().err


def test_the_status_line_says_whether_programs_were_compiled_loaded_or_reused():
    from types import SimpleNamespace

    from pia_jax.app.runner import _status
    animator = SimpleNamespace(compile_cache="/c", groups=1, devices_per_group=2)
    seconds, cache = {"load": 0, "denoise": 2.0}, {"hits": 1, "misses": 2}
    line = lambda made: _status(seconds, animator, made, 3.25, cache, 1)  # noqa: E731
    assert "compiled 3 program(s) in 3.2s (cache /c: 1 hit(s), 2 miss(es))" in line((3, 0))
    assert "compiled 1 program(s) in 3.2s (cache /c: 1 hit(s), 2 miss(es)), loaded 2 stored" in line((1, 2))
    assert "no compiling: 3 program(s) loaded from stored executables in 3.2s" in line((0, 3))
    assert "no compiling: the programs of an earlier request were reused" in line((0, 0))
    assert line((0, 0)).endswith("batch 1 video(s) x 1 device group(s) of 2 device(s)")
