"""The web UI (`python -m pia_jax.app --model models/toy`): a Gradio page and API over one loaded `Animator`.

  plan.py      a request (the page's values, or the API's dict) -> the videos sample.py would make from them,
               checked by sample.py's own checks, and the equivalent sample.py command line; no gradio, no jax
  controls.py  a page control per `cases.Settings` field, made from its declaration (type, default, help, choices)
  runner.py    the loaded model: loads once, plans the batch size, samples with per-step progress, writes MP4 + GIF
               into a folder per request; no gradio
  history.py   the results since the app started, each with its parameters (JSON) and command line, as HTML
  ui.py        the Blocks: the page, its events and the `/animate` API endpoint
  __main__.py  the command line: model folder, host, port, output folder, compile cache
"""
