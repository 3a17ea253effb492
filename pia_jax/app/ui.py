"""The page and its API: `build(runner)` -> gr.Blocks.

Left, the inputs: the model, the image (and an optional last-frame keyframe), the prompts, a prompt map, the seed,
and a section per group of `cases.Settings` fields (controls.py). Right, the result: the video, its MP4 and GIF
files, the status line (what was loaded, compiled or reused; or the error, as sample.py words it). Below, the history
of this app's results. Every event that uses the device shares one queue slot (`DEVICE`): one request at a time.

The API (`gradio_client`): `/animate` takes an image file, a prompt and a dict of the other request keys (plan.py;
a batch file's keys: `frames`, `steps`, `guidance`, ...) and returns the first video's MP4, its GIF and the
request's record (parameters, command line, files, status); an input error comes back as the client's AppError
with the message the page would show.
"""

import random

import gradio as gr

from pia_jax.app import controls, plan
from pia_jax.app.history import render
from pia_jax.app.runner import Runner

DEVICE = "device"  # the concurrency id of every event that runs on the device
ERRORS = (ValueError, OSError, FloatingPointError)  # what sample.py reports as an error, not a crash
MAX_SEED = 2 ** 32 - 1


def _run_inputs(runner: Runner) -> dict:
    """The controls of one run's inputs that are not Settings fields (plan.RUN), by request key."""
    with gr.Row():
        image = gr.Image(type="filepath", image_mode=None, label="image (--image)", height=220,
                         elem_id="pia-image")
        last = gr.Image(type="filepath", image_mode=None, label="last frame, optional (--keyframe LAST:IMAGE)",
                        height=220, elem_id="pia-last-frame")
    prompt = gr.Textbox(label="prompt (--prompt)", lines=2, elem_id="pia-prompt")
    negative = controls.control("negative_prompt", plan.default_negative_prompt(runner.model_dir))
    with gr.Accordion("Prompt travel", open=False):
        prompt_map = gr.Textbox(label="prompt map (--prompt-map)", lines=3, elem_id="pia-prompt-map",
                                info="instead of the prompt: one 'FRAME: prompt' per line, the first at frame 0")
    with gr.Row():
        seed = gr.Number(value=plan.RUN["seed"][0], step=1, label="seed (--seed)", elem_id="pia-seed")
        dice = gr.Button("random seed", elem_id="pia-random-seed", scale=0)
        num_videos = gr.Number(value=plan.RUN["num_videos"][0], step=1, label="number of videos (--num-videos)",
                               info="seeds seed, seed+1, ...", elem_id="pia-num-videos")
        fps = gr.Number(value=plan.RUN["fps"][0], label="fps (--fps)", elem_id="pia-fps")
    dice.click(lambda: random.randint(0, MAX_SEED), outputs=seed, api_visibility="private", queue=False)
    return {"image": image, "last_frame": last, "prompt": prompt, "negative_prompt": negative,
            "prompt_map": prompt_map, "seed": seed, "num_videos": num_videos, "fps": fps}


def _settings_inputs() -> dict:
    out = {}
    for name, keys in controls.sections().items():
        with gr.Accordion(name, open=name in ("Motion", "Sampling", "Video")):
            for i in range(0, len(keys), 3):  # three controls a row
                with gr.Row():
                    out.update({k: controls.control(k) for k in keys[i:i + 3]})
    return out


def _generate(runner: Runner, inputs: dict):
    """The Generate button: the page's values -> (video, files, status, history); errors go to the status line."""
    def generate(values: dict, progress=gr.Progress()):  # noqa: B008 (gradio finds the bar by this default)
        request = {k: values[c] for k, c in inputs.items()}
        try:
            entry = runner.generate(request, progress)
        except ERRORS as e:
            return gr.skip(), gr.skip(), f"**error:** {e}", gr.skip()
        files = [str(f[fmt]) for f in entry.files for fmt in plan.FORMATS]
        return str(entry.files[0]["mp4"]), files, entry.status, render(runner.history)
    return generate


def _animate(runner: Runner):
    def animate(image, prompt, settings, progress=gr.Progress()):  # noqa: B008
        """An image file, a prompt and a dict of the other request keys -> (MP4, GIF, the request's record)."""
        if settings is not None and not isinstance(settings, dict):
            raise gr.Error(f"settings must be a dict of request keys, got {type(settings).__name__}")
        try:
            entry = runner.generate({**(settings or {}), "image": image, "prompt": prompt}, progress)
        except ERRORS as e:
            raise gr.Error(str(e)) from None
        return str(entry.files[0]["mp4"]), str(entry.files[0]["gif"]), entry.record()
    return animate


def _api(runner: Runner):
    """The `/animate` endpoint's own (hidden) components."""
    with gr.Column(visible=False):
        image, prompt, settings = gr.Image(type="filepath", image_mode=None), gr.Textbox(), gr.JSON()
        mp4, gif, record, button = gr.Video(), gr.File(), gr.JSON(), gr.Button()
    button.click(_animate(runner), [image, prompt, settings], [mp4, gif, record], api_name="animate",
                 concurrency_limit=1, concurrency_id=DEVICE)


def _select(runner: Runner):
    def select(name):
        try:
            return runner.select(name), plan.default_negative_prompt(runner.model_dir)
        except ERRORS as e:
            return f"**error:** {e}", gr.skip()
    return select


def build(runner: Runner) -> gr.Blocks:
    with gr.Blocks(title="PIA (pia-jax)") as demo:
        gr.Markdown("# Animate an image with PIA\nThe same inputs and checks as `sample.py`; each result keeps its "
                    "parameters and the command line that makes it again.")
        with gr.Row():
            with gr.Column(scale=1):
                model = gr.Dropdown(list(runner.models), value=runner.selected, label="model",
                                    interactive=len(runner.models) > 1, elem_id="pia-model")
                inputs = _run_inputs(runner)
                inputs.update(_settings_inputs())
                go = gr.Button("Generate", variant="primary", elem_id="pia-generate")
            with gr.Column(scale=1):
                video = gr.Video(label="video", autoplay=True, loop=True, height=320, elem_id="pia-video")
                files = gr.Files(label="MP4 and GIF", elem_id="pia-files")
                status = gr.Markdown(f"model {runner.selected} ({runner.model_dir})", elem_id="pia-status")
                gr.Markdown("### History")
                history = gr.HTML(render(runner.history), elem_id="pia-history")
        go.click(_generate(runner, inputs), set(inputs.values()), [video, files, status, history],
                 api_visibility="undocumented", concurrency_limit=1, concurrency_id=DEVICE)
        model.change(_select(runner), model, [status, inputs["negative_prompt"]], api_visibility="private",
                     concurrency_limit=1, concurrency_id=DEVICE)
        demo.load(lambda: render(runner.history), outputs=history, api_visibility="private", queue=False)
        _api(runner)
    return demo
