"""The web UI (`python -m pipeline ui`) as a user meets it: the server in a subprocess, driven through
Debian's headless Chromium (playwright, never a browser of its own). Binding and the access token; then one
user's session: a new project, concepts of each type, a caption flagged and written, a refused setting
beside its field, cache then train on the tiny model, progress and the sample grid, the browser closed
and the UI restarted while the run goes on, a second tab's run refused as the CLI refuses it, stop and
resume, the cache page. Each page's screenshot goes to docs/ui/ (docs/ui.md shows them)."""

import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import tomlkit

from pipeline.config import load_config
from pipeline.train.sinks import read_records
from pipeline.ui import runs

pytestmark = pytest.mark.ui

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "docs" / "ui"
CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


class Server:
    """`python -m pipeline ui` in a subprocess; its address (and token) read from what it prints."""

    def __init__(self, projects: Path, host: str = "127.0.0.1"):
        self.log = projects.parent / f"ui-{time.monotonic_ns()}.log"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen([sys.executable, "-m", "pipeline", "ui", "--host", host, "--port", "0",
                                      "--projects", str(projects)], stdout=subprocess.DEVNULL,
                                     stderr=open(self.log, "w"), env=env)
        deadline = time.monotonic() + 120
        while not (m := re.search(r"ui: (http://\S+)", self.log.read_text())):
            assert self.proc.poll() is None and time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.2)
        self.address = m.group(1)
        self.url = self.address.split("?")[0].rstrip("/")
        self.port = int(self.url.rsplit(":", 1)[1])

    def stop(self):
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=60)


def _get(port: int, path: str, headers: dict | None = None, method: str = "GET", body: str | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request(method, path, body=body, headers=headers or {})
    r = conn.getresponse()
    return r.status, r.read().decode(), dict(r.getheaders())


def test_loopback_by_default_and_a_token_elsewhere(tmp_path):
    local = Server(tmp_path / "projects")
    try:
        assert local.url.startswith("http://127.0.0.1:") and "token" not in local.address
        assert _get(local.port, "/")[0] == 200
        status, body, _ = _get(local.port, "/", {"Host": "evil.example:80"})  # DNS rebinding
        assert status == 403 and body.startswith("error: ") and body.count("\n") == 1
        status, body, _ = _get(local.port, "/new", {"Host": f"127.0.0.1:{local.port}", "Origin": "http://evil.example",
                                                    "Content-Type": "application/x-www-form-urlencoded"},
                               "POST", "name=x")
        assert status == 403 and "another site" in body
        assert not (tmp_path / "projects" / "x.toml").exists()
    finally:
        local.stop()
    public = Server(tmp_path / "projects", host="0.0.0.0")
    try:
        token = re.search(r"\?token=(\S+)", public.address).group(1)
        assert f"access token {token}" in public.log.read_text()
        status, body, _ = _get(public.port, "/")
        assert status == 403 and body == "error: this UI needs its access token: open the address it printed at start (…/?token=…)\n"
        assert _get(public.port, "/?token=wrong")[0] == 403
        status, _, headers = _get(public.port, f"/?token={token}")
        assert status == 303 and token in headers["set-cookie"]
        assert _get(public.port, "/", {"Cookie": f"prior_lora_ui_token={token}"})[0] == 200
        assert _get(public.port, "/", {"Authorization": f"Bearer {token}"})[0] == 200
    finally:
        public.stop()


@pytest.fixture
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium): the UI tests drive it")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield b
        b.close()
        del profile


def _shot(page, name):
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def _wait(page, condition, what, timeout=300):
    """Poll the page (the UI refreshes its panel every second) until condition(page) holds."""
    deadline = time.monotonic() + timeout
    while not condition(page):
        assert time.monotonic() < deadline, f"waited {timeout} s for {what}: {page.locator('main').inner_text()[:3000]}"
        page.wait_for_timeout(500)


def _step(page) -> int:
    return int(page.locator("#step").inner_text().split("/")[0])


def _job(page, index: int):
    return page.locator("tr.job").nth(index)


def test_a_project_from_new_to_a_resumed_run(browser, tiny_assets, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_assets / "data", data)
    uncaptioned = sorted((data / "standard").glob("*.png"))[0]
    uncaptioned.with_suffix(".txt").unlink()
    projects = tmp_path / "projects"
    server = Server(projects)
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    try:
        # a new project: its model's family detected
        page.goto(server.url + "/")
        page.fill("input[name=name]", "teapot")
        page.fill("input[name='model.path']", str(tiny_assets / "model"))
        page.fill("input[name='concepts[0].folder']", str(data / "standard"))
        _shot(page, "home")
        page.click("#create")
        page.wait_for_load_state()
        assert page.url.endswith("/p/teapot") and page.locator("#family").inner_text() == "flux"
        config = projects / "teapot.toml"
        # concepts of each type
        for folder, kind in (("prior", "prior"), ("heldout-prior", "validation-prior")):
            page.fill("#add-concept input[name=folder]", str(data / folder))
            page.select_option("#add-concept select[name=type]", kind)
            page.click("#add-concept button")
            page.wait_for_load_state()
        doc = tomlkit.parse(config.read_text())
        assert [(c["type"], c.get("prior", False)) for c in doc["concepts"]] == [
            ("standard", False), ("prior", False), ("validation", True)]
        # the image without a caption is flagged; its caption written in place
        flagged = page.locator("figure.missing-caption")
        flagged.first.wait_for()  # the page the last add redirected to (a click does not wait for it)
        assert flagged.count() == 1 and uncaptioned.name in flagged.inner_text()
        flagged.locator("textarea").fill("a photo of sks teapot")
        flagged.locator("button").click()
        page.wait_for_load_state()
        assert uncaptioned.with_suffix(".txt").read_text() == "a photo of sks teapot\n"
        assert page.locator("figure.missing-caption").count() == 0
        # a refused setting: the CLI's message beside its field, the file unchanged, the typed value kept
        before = config.read_bytes()
        page.fill("input[name='optimizer.lr']", "-1")
        page.click("#save")
        page.wait_for_load_state()
        error = page.locator(".error[data-key='optimizer.lr']")
        assert error.inner_text().endswith("config key 'optimizer.lr' must be > 0, got -1.0")
        assert page.input_value("input[name='optimizer.lr']") == "-1" and config.read_bytes() == before
        _shot(page, "project-refused")
        # no max_steps: the run's length is epochs times an epoch's steps, which the runs page works out
        settings = {"data.resolution": "64", "train.epochs": "100", "optimizer.lr": "0.001",
                    "lora.rank": "4", "cache.variants": "2", "train.checkpoint_every": "1", "validation.every": "0"}
        for key, value in settings.items():
            page.fill(f"input[name='{key}']", value)
        page.fill("textarea[name='validation.prompts']", "a photo of sks teapot")
        page.click("#save")
        page.wait_for_load_state()
        assert page.locator(".error").count() == 0
        # the same file the CLI reads: a key set there by hand shows too (no state of the UI's own)
        doc = tomlkit.parse(config.read_text())
        doc["model"]["max_sequence_length"] = 32
        doc["validation"]["steps"] = 2
        doc["train"]["batch_size"] = 2
        config.write_text(tomlkit.dumps(doc))
        page.reload()
        assert page.input_value("input[name='train.epochs']") == "100"
        _shot(page, "project")

        # cache, then train; progress as it goes
        page.goto(server.url + "/p/teapot/runs")
        page.click("#start")
        _wait(page, lambda p: p.locator("#state").inner_text() == "training" and _step(p) >= 1, "training")
        total = page.locator("#step").inner_text().split("/")[1].strip()  # before or after an epoch is done
        assert total.isdigit(), page.locator("#step").inner_text()
        assert page.locator("#loss-prior").inner_text() != "-" or page.locator("#loss-standard").inner_text() != "-"
        # the browser closes and the UI restarts: the run goes on, and the new UI finds it
        context.close()
        server.stop()
        server = Server(projects)
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        page = context.new_page()
        page.goto(server.url + "/p/teapot/runs")
        assert page.locator("#state").inner_text() == "training"
        assert _job(page, 0).locator(".state").inner_text() == "running"
        # a second tab starting a run into the same output folder: the CLI's refusal
        tab = context.new_page()
        tab.goto(server.url + "/p/teapot/runs")
        tab.click("#start")
        _wait(tab, lambda p: _job(p, 0).locator(".state").inner_text() == "ended, exit 2", "the refusal")
        message = _job(tab, 0).locator(".message").inner_text()
        assert message.startswith("error: train.output_dir '") and "is in use by another training" in message
        assert "\n" not in message
        tab.close()
        page.reload()
        _wait(page, lambda p: p.locator(".samples img").count() >= 1, "the step-0 sample grid")
        _shot(page, "runs-training")
        # the total shown is the train stage's count: an epoch's steps, as the run recorded them, times 100
        out = Path(load_config(config).train.output_dir)
        records = lambda: read_records(out / "metrics.jsonl")  # noqa: E731
        _wait(page, lambda p: any(r.get("epoch") == 1 for r in records()), "a whole epoch")
        per_epoch = sum(1 for r in records() if r.get("epoch") == 0)
        assert int(total) == 100 * per_epoch == runs.planned_steps(load_config(config))
        # stop: Ctrl-C's handling, the checkpoints kept
        _job(page, 1).locator("button.stop").click()
        _wait(page, lambda p: _job(p, 1).locator(".state").inner_text() == "ended, exit 130", "the stop")
        assert _job(page, 1).locator(".message").inner_text().startswith("interrupted: ")
        _wait(page, lambda p: p.locator("#state").inner_text() == "idle", "the lock released")
        stopped = _step(page)
        assert per_epoch < stopped < int(total)
        # resume: a plain rerun goes on from the newest checkpoint (made to end soon)
        page.goto(server.url + "/p/teapot")
        page.fill("input[name='train.max_steps']", str(stopped + 2))
        page.click("#save")
        page.wait_for_load_state()
        assert page.locator(".error").count() == 0
        page.goto(server.url + "/p/teapot/runs")
        page.click("#start")
        _wait(page, lambda p: _job(p, 0).locator(".state").inner_text() == "ended, exit 0", "the resumed run")
        assert "train: going on with the run" in _job(page, 0).locator(".notes").inner_text()
        _wait(page, lambda p: p.locator("#lora").inner_text() == "written", "the LoRA")
        assert page.locator("#step").inner_text() == f"{stopped + 2} / {stopped + 2}"
        grids = page.locator(".samples figure")
        assert grids.count() == 2 and f"step {stopped + 2}: a photo of sks teapot" in grids.nth(0).inner_text()
        href = grids.nth(0).locator("a").get_attribute("href")
        response = page.goto(server.url + href)
        assert response.status == 200 and response.headers["content-type"] == "image/png"
        # settings as a diff between runs: an earlier run (made here from the newest checkpoint's record, with
        # another rank) against the current run, whose LoRA file records what the config file says now
        newest = sorted((out / "checkpoints").glob("step-*"))[-1]
        state = json.loads((newest / "state.json").read_text())
        state["config"]["lora"]["rank"] = 8
        (out / "previous" / "earlier" / "checkpoints" / newest.name).mkdir(parents=True)
        (out / "previous" / "earlier" / "checkpoints" / newest.name / "state.json").write_text(json.dumps(state))
        page.goto(server.url + "/p/teapot/runs")
        assert "lora.rank 8 -> 4" in page.locator("#previous").inner_text()
        assert page.locator("#settings-diff").inner_text().strip() == "lora.rank 8 -> 4"
        _shot(page, "runs")
        page.select_option("#compare-old", "current")
        page.select_option("#compare-new", "config")
        page.click("#compare button")
        assert page.locator("#settings-diff").inner_text().strip() == "the same settings"
        # the cache page: status; prune (dry run, with an option), verify --repair --rehash: the CLI's commands
        page.goto(server.url + "/p/teapot/cache")
        assert page.locator("#cache-status tr").count() > 2
        page.check("#keep-dtypes")
        page.click("#prune-dry")
        output = page.locator("#cache-output").inner_text()
        assert "$ python -m pipeline cache prune --dry-run --keep-dtypes --config " in output
        assert "prune: would remove (dry run, nothing changed)" in output
        page.check("#repair")
        page.check("#rehash")
        page.click("#verify")
        output = page.locator("#cache-output").inner_text()
        assert "$ python -m pipeline cache verify --repair --rehash --config " in output
        assert "no fingerprint changed" in output and "repair: 0 entries recomputed" in output
        assert re.search(r"verify: \d+ entries checked, 0 damaged", output)
        _shot(page, "cache")
    finally:
        with contextlib.suppress(Exception):
            context.close()
        server.stop()
        for record in (projects / ".ui" / "jobs").glob("*.json"):  # no run outlives the test
            with contextlib.suppress(Exception):
                os.killpg(json.loads(record.read_text())["pid"], signal.SIGKILL)
