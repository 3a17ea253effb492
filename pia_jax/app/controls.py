"""A page control per `cases.Settings` field, made from its declaration (type, default, help, choices), as
sample.py makes a flag per field: an option declared in `SampleOptions` or `Settings` appears on the page with no
edit here (in its section if `SECTIONS` names it, else under "More options"). A control's info ends with its
sample.py flag, which the error messages name."""

import gradio as gr

from pia_jax.app import plan
from pia_jax.sampling import cases
from pia_jax.sampling.affinity import PRESETS

# Where a field goes on the page (a name not declared is passed over); a field not named here goes to OTHER.
SECTIONS = {
    "Motion": ("motion", "affinity", "cond_frame"),
    "Sampling": ("scheduler", "steps", "guidance", "strength", "eta", "karras", "clip_skip"),
    "Video": ("frames", "size", "height", "width"),
    "Long videos": ("context_length", "context_mode", "context_stride", "context_weighting", "window_batch",
                    "free_noise"),
    "IP-Adapter": ("ip_adapter_scale", "ip_adapter_image"),
}
OTHER = "More options"
PROMPT_FIELDS = ("negative_prompt",)  # beside the prompt, not in a section


def sections() -> dict:
    """{section: [request keys]} in page order, every Settings field in exactly one."""
    placed = {k for keys in SECTIONS.values() for k in keys} | set(PROMPT_FIELDS)
    out = {name: [k for k in keys if k in plan.FIELDS] for name, keys in SECTIONS.items()}
    out[OTHER] = [k for k in plan.FIELDS if k not in placed]
    return out


def info(k: str) -> str:
    f = plan.FIELDS[k]
    return f"{f.metadata['help']} (--{k.replace('_', '-')})"


def control(k: str, value=None) -> gr.components.Component:
    """The control of the Settings field with request key `k`, holding its default (or `value`)."""
    f = plan.FIELDS[k]
    value = f.default if value is None else value
    common = {"label": plan.label(k), "info": info(k), "elem_id": f"pia-{k}"}
    choices = f.metadata.get("choices")
    tp = cases.value_type(f)
    if k in plan.IMAGE_FIELDS:  # an image takes no info text: the flag goes in its label; empty is 'not given'
        return gr.Image(type="filepath", image_mode=None, height=160, elem_id=common["elem_id"],
                        label=f"{common['label']} (--{k.replace('_', '-')}; empty: not given)")
    if k == "motion":  # its declaration takes a name or a PIA index; the page offers the names
        return gr.Dropdown([p.name for p in PRESETS], value=value, **common)
    if choices is not None:  # an option that may be left unset gets a blank choice: 'not given'
        unset = [("not given", "")] if plan.nullable(f) else []
        return gr.Dropdown(unset + [(str(c), c) for c in choices], value="" if value is None else value, **common)
    if tp is bool:
        return gr.Checkbox(value=value, **common)
    if tp in (int, float) and value is not None:  # no rounding: plan.typed refuses 8.5 frames rather than make 8
        return gr.Number(value=value, step=1 if tp is int else 0.05, **common)
    # text, and numbers that may be left unset (a number field sends 0 for blank): blank is 'not given'
    return gr.Textbox(value="" if value is None else value, lines=2 if k in PROMPT_FIELDS else 1,
                      placeholder="not given" if value is None else None, **common)
