"""Sampling options declared once: sample.py's flags, a batch file's keys and the per-video settings are made from
the fields of SampleOptions and cases.Settings; input checking imports no jax; saved noise is written atomically."""

import dataclasses
import subprocess
import sys

import numpy as np
import pytest

import sample
from pia_jax.sampling import cases
from pia_jax.sampling.options import SampleOptions, key


def test_input_checking_imports_no_jax():
    """The light modules (and sample.py's parser and checks) load without jax, so a bad input is refused without
    jax's import time; jax comes in with the model check (`cases.plan`) and the Animator."""
    code = ("import sys\n"
            "import sample\n"
            "from pia_jax.sampling import affinity, cases, keyframes, options, prompt_travel, windows\n"
            "sample.build_parser().parse_args(['--model', 'm', '--image', 'x.png', '--prompt', 'a'])\n"
            "cases.videos_from_values(None, ['a cat'], [1], cases.Settings(frames=48, motion='loop_small'))\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'flax')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_every_field_is_a_flag_and_a_batch_key():
    names = {f.name for f in dataclasses.fields(cases.Settings)}
    assert {f.name for f in dataclasses.fields(SampleOptions)} < names
    assert {f.name for f in cases.FIELDS} == names
    defaults = sample.build_parser().parse_args(["--model", "m"])
    for f in cases.FIELDS:
        assert f.metadata["help"], f.name
        assert getattr(defaults, f.name) == f.default, f.name
        assert key(f) in cases.CASE_KEYS, f.name
    assert key(next(f for f in cases.FIELDS if f.name == "guidance_scale")) == "guidance"
    assert cases.Settings().options() == SampleOptions()


def test_flags_and_batch_keys_make_the_same_settings(tmp_path):
    values = {"guidance": 3, "eta": 0.5, "steps": 7, "clip_skip": 1, "context_length": 8, "context_stride": 2,
              "context_weighting": "flat", "window_batch": 2, "free_noise": "repeat_context", "frames": 24,
              "motion": "large", "size": 256, "decode_chunk": 2, "negative_prompt": ""}
    argv = ["--model", "m", "--image", "x.png", "--prompt", "a"]
    for k, v in values.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    a = sample.build_parser().parse_args(argv)
    from_flags = cases.Settings(**{f.name: getattr(a, f.name) for f in cases.FIELDS})
    (tmp_path / "x.png").touch()
    keys = ", ".join(f"{k}: {v!r}" for k, v in values.items())
    (tmp_path / "cases.yaml").write_text(f"cases: [{{image: x.png, prompt: a, {keys}}}]")
    (video,) = cases.read_batch_file(tmp_path / "cases.yaml", cases.Settings(), 42)
    assert video.settings == from_flags
    options = from_flags.options()
    assert type(options) is SampleOptions and options.guidance_scale == 3.0 and type(options.guidance_scale) is float
    assert (options.eta, options.window_batch, options.free_noise) == (0.5, 2, "repeat_context")


@pytest.mark.parametrize("field, value, message", [
    ("scheduler", "pndm", "scheduler must be one of ddim, dpmpp_2m, lcm, euler, got 'pndm'"),
    ("context_weighting", "steep", "context weighting must be one of flat, pyramid, delayed_reverse_sawtooth"),
    ("free_noise", "shuffle", "free noise must be one of none, random, shuffle_context, repeat_context"),
])
def test_choices_are_checked_from_the_fields(field, value, message):
    with pytest.raises(ValueError, match=message):
        SampleOptions(**{field: value}).check_choices()


@pytest.mark.parametrize("raw, message", [
    ("{guidance: fast}", "key 'guidance' must be a number"),
    ("{clip_skip: 1.5}", "key 'clip_skip' must be an integer or null"),
    ("{context_weighting: steep}", "key 'context_weighting' must be one of flat, pyramid, delayed_reverse_sawtooth"),
    ("{karras: 'yes'}", "key 'karras' must be true or false"),
    ("{negative_prompt: [a]}", "key 'negative_prompt' must be a string or null"),
    ("{motion: []}", "key 'motion' must be a preset name or PIA index, or a non-empty list of them"),
    ("{guidance_scale: 3}", "unknown keys ['guidance_scale']"),
])
def test_batch_keys_are_typed_from_the_fields(tmp_path, raw, message):
    (tmp_path / "cases.yaml").write_text(f"defaults: {raw}\ncases: [{{prompt: a}}]")
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        cases.read_batch_file(tmp_path / "cases.yaml", cases.Settings(), 42)


def test_saved_noise_is_complete_or_absent(tmp_path, monkeypatch):
    paths = cases.output_paths(tmp_path / "out.gif", "v", True, ["gif"])
    noise, post = np.ones((1, 2, 4, 4, 4), np.float32), np.ones((1, 4, 4, 4), np.float32)
    written = cases.save_noise(paths, noise, post)
    assert [p.name for p in written] == ["out_noise.npy", "out_posterior_noise.npy"]
    np.testing.assert_array_equal(np.load(written[0]), noise)
    before = sorted(tmp_path.iterdir())

    def torn(f, array):  # half a file, then the disk fills up
        f.write(b"\x93NUMPY half")
        raise OSError("no space left on device")

    monkeypatch.setattr(np, "save", torn)
    with pytest.raises(OSError, match="no space"):
        cases.save_noise(paths, 2 * noise, 2 * post)
    monkeypatch.undo()
    assert sorted(tmp_path.iterdir()) == before  # no temporary left behind
    np.testing.assert_array_equal(np.load(written[0]), noise)  # the old file is untouched
