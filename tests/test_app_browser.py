"""The web UI in a real browser, and its API: `python -m pia_jax.app` serving the shipped toy model on 127.0.0.1,
driven by Chromium through Playwright (Debian's `chromium`, launched by path: Playwright cannot download its own
browsers here), and by gradio_client.

Under CI (CI set, as .ci/run runs) a missing browser or package fails the test; elsewhere it is skipped and says so.
A screenshot of the page after the generation goes to $PIA_APP_SCREENSHOT when set (docs/app.png was made so).
"""

import importlib.util
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import av
import pytest
from PIL import Image

import sample
from pia_jax.app import plan

ROOT = Path(__file__).resolve().parents[1]
TOY, IMAGE = ROOT / "models" / "toy", ROOT / "docs" / "toy" / "image.png"
PROMPT = "a green cross moves right on a gray background"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = [pytest.mark.xdist_group("app"),  # one server for the module, on one worker
              pytest.mark.skipif(not (TOY / "config.json").exists(), reason="models/toy is not in this checkout")]


def _need(what: str, present: bool):
    if present:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{what} is missing under CI: .ci/run installs it (apt-get install chromium; the test extra)")
    pytest.skip(f"{what} is missing: apt-get install chromium, pip install -e '.[test]'")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The app as a user starts it, in its own process: one CPU device (the tests' 8 fake ones are left out)."""
    _need("gradio", importlib.util.find_spec("gradio") is not None)
    out, port = tmp_path_factory.mktemp("app"), _free_port()
    with open(out / "server.log", "w") as log:  # a cache of its own, which the command lines it prints name
        proc = subprocess.Popen([sys.executable, "-m", "pia_jax.app", "--model", "models/toy", "--port", str(port),
                                 "--out", str(out / "results"), "--compile-cache", str(out / "cache")],
                                cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait_until_served(proc, url, out / "server.log")
        yield url, out
    finally:
        proc.terminate()
        proc.wait(30)


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
    return env


def _wait_until_served(proc, url: str, log: Path, seconds: float = 120):
    deadline = time.monotonic() + seconds
    while True:
        assert proc.poll() is None, f"the app exited:\n{log.read_text()}"
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            assert time.monotonic() < deadline, f"the app did not serve in {seconds} s:\n{log.read_text()}"
            time.sleep(0.5)


def _frames(data: bytes, path: Path) -> int:
    path.write_bytes(data)
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def _browser():
    _need("chromium", Path(CHROMIUM).exists())
    _need("playwright", importlib.util.find_spec("playwright") is not None)
    from playwright.sync_api import sync_playwright
    return sync_playwright


def _expected_error(request: dict, tmp_path: Path) -> str:
    """sample.py's message for the same values (the app must show it, word for word)."""
    a = plan.namespace(TOY, request, tmp_path / "x")
    with pytest.raises(ValueError) as e:
        sample.plan(sample.build_parser().parse_args(plan.command(a)[2:]))
    return str(e.value)


def test_the_page_animates_the_image_and_shows_its_parameters(server, tmp_path):
    url, out = server
    with _browser()() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1300})
        page.goto(url)
        page.locator("#pia-image input[type=file]").set_input_files(str(IMAGE))
        page.locator("#pia-prompt textarea").fill(PROMPT)
        page.locator("#pia-frames input").fill("8")
        page.locator("#pia-steps input").fill("4")
        page.locator("#pia-guidance input").fill("4")  # as the README's toy command
        page.locator("#pia-generate").click()
        # the progress bar: the runner's reports reach the page (compiling takes seconds; the steps go by fast)
        page.get_by_text("compiling the sampler").first.wait_for(timeout=60_000)
        video = page.locator("#pia-video video")
        video.wait_for(timeout=180_000)  # the first request compiles the sampler (~15-30 s on 2 shared cores)
        served = page.request.get(video.get_attribute("src"))
        assert served.ok and _frames(served.body(), tmp_path / "served.mp4") == 8
        history = page.locator("#pia-history").inner_text()
        request = int(re.match(r"#(\d+) ", history).group(1))  # the newest entry comes first
        assert '"frames": 8' in history and '"steps": 4' in history and f'"prompt": "{PROMPT}"' in history
        assert "python sample.py --model models/toy" in history and "--frames 8 --steps 4 --guidance 4.0" in history
        gif = page.locator("#pia-history a[href$='.gif']").first.get_attribute("href")
        with Image.open(_download(url, gif, tmp_path / "served.gif")) as im:
            assert im.n_frames == 8
        status = page.locator("#pia-status").inner_text()
        assert re.search(r"compiled \d+ program\(s\) in [\d.]+s \(cache .*: \d+ hit\(s\), \d+ miss\(es\)\)",
                         status), status
        if os.environ.get("PIA_APP_SCREENSHOT"):
            page.evaluate("window.scrollTo(0, 0)")  # the click scrolled to the button
            page.screenshot(path=os.environ["PIA_APP_SCREENSHOT"])

        bad = {"image": str(IMAGE), "prompt": PROMPT, "frames": 8, "steps": 4, "affinity": "1, 0.5"}
        page.locator("#pia-affinity textarea, #pia-affinity input").fill(bad["affinity"])
        page.locator("#pia-generate").click()
        message = _expected_error({**bad, "negative_prompt": ""}, tmp_path)
        page.locator("#pia-status").get_by_text(message).wait_for(timeout=30_000)
        assert "Traceback" not in page.content()
        browser.close()
    log = (out / "server.log").read_text()  # each step of the compiled loop was reported as it was ready
    steps = re.findall(rf"\[request {request:04d}\] denoising (\d)/4", log)
    assert steps == ["1", "2", "3", "4"], log[-3000:]


def _download(url: str, href: str, path: Path) -> Path:
    with urllib.request.urlopen(url.rstrip("/") + href) as r:
        path.write_bytes(r.read())
    return path


def test_the_api_animates_and_reuses_the_compiled_programs(server, tmp_path):
    url, _ = server
    _need("gradio_client", importlib.util.find_spec("gradio_client") is not None)
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError
    client = Client(url, verbose=False)
    settings = {"frames": 8, "steps": 4, "negative_prompt": "", "seed": 1}
    records = []
    for seed in (1, 2):  # the second request compiles nothing, whatever ran before
        mp4, gif, record = client.predict(handle_file(str(IMAGE)), PROMPT, {**settings, "seed": seed},
                                          api_name="/animate")
        records.append(record)
    assert _frames(Path(mp4).read_bytes(), tmp_path / "api.mp4") == 8
    with Image.open(gif) as im:
        assert im.n_frames == 8
    assert records[1]["params"]["seed"] == 2 and records[1]["params"]["frames"] == 8
    assert "no compiling: the programs of an earlier request were reused" in records[1]["status"]
    # the command line the app prints makes the same video (its programs come from the app's compile cache)
    argv = shlex.split(records[1]["command"])
    assert argv[:2] == ["python", "sample.py"]
    argv[argv.index("--out") + 1] = str(tmp_path / "cli")
    subprocess.run([sys.executable, *argv[1:]], cwd=ROOT, env=_env(), check=True, capture_output=True, timeout=300)
    (made,) = (tmp_path / "cli").glob("*.gif")
    assert made.name == Path(gif).name and made.read_bytes() == Path(gif).read_bytes()
    with pytest.raises(AppError, match="the toy model does not know the words dog"):
        client.predict(handle_file(str(IMAGE)), "a red dog", settings, api_name="/animate")
