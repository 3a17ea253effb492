"""The results since the app started, newest first, as HTML: each with its files, the exact parameters as JSON and
the `sample.py` command line that makes the same videos. No gradio."""

import dataclasses
import html
import json
from pathlib import Path
from urllib.parse import quote


@dataclasses.dataclass
class Entry:
    index: int  # the request's number; its folder is <out>/<index:04d>
    when: str  # HH:MM:SS
    model: str
    params: dict  # the typed request (plan.typed), its inputs as the copies in the request's folder
    command: str  # the equivalent sample.py command line
    files: list  # [{"name": video name, "mp4": path, "gif": path}]
    status: str  # what loading, compiling and sampling took

    def record(self) -> dict:
        """What the request's folder keeps as params.json (and the API returns)."""
        files = [{k: str(v) for k, v in f.items()} for f in self.files]
        return {"index": self.index, "model": self.model, "params": self.params, "command": self.command,
                "files": files, "status": self.status}


_WRAP = ' style="white-space: pre-wrap; word-break: break-all"'


def file_url(path) -> str:
    """The URL at which the app serves a file of its output folder (launched with it in `allowed_paths`)."""
    return "/gradio_api/file=" + quote(str(Path(path).resolve()))


def render(entries: list) -> str:
    if not entries:
        return "<p>No results yet: the videos this app makes are listed here, newest first.</p>"
    return "\n".join(_entry(e, open_=i == 0) for i, e in enumerate(reversed(entries)))


def _entry(e: Entry, open_: bool) -> str:
    links = " ".join(f'<a href="{file_url(f[fmt])}" download>{html.escape(Path(f[fmt]).name)}</a>'
                     for f in e.files for fmt in ("mp4", "gif"))
    params = html.escape(json.dumps(e.params))
    return (f'<details class="pia-history-entry"{" open" if open_ else ""}>'
            f"<summary>#{e.index} {e.when} · {html.escape(e.model)} · {len(e.files)} video(s)</summary>"
            f"<p>{links}</p><p>{html.escape(e.status)}</p>"
            f"<p>Parameters:</p><pre{_WRAP}>{params}</pre>"
            f"<p>The same videos from a shell:</p><pre{_WRAP}>{html.escape(e.command)}</pre></details>")
