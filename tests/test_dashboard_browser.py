"""The dashboard page in headless Chromium (Debian's /usr/bin/chromium through Playwright):
markup in site and run names shows as text and never runs; a live two-site federation on
loopback (real moma-server and moma-client processes) shows round 2's metrics while round 3
runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deploy.lifecycle import stop_groups
from deploy.runtime import free_port
from tests.helpers import IMAGE_SIZE, TARGET_CLASSES, tiny_teacher

pytestmark = pytest.mark.slow
CHROMIUM = Path("/usr/bin/chromium")
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (Debian package chromium)")
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="playwright is not installed in this environment")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield b
        b.close()


SITE_MARKUP = ['<script>window.__pwned=1</script>', '"><img src=x onerror="window.__pwned=2">']
RUN_MARKUP = '<script>"><img src=x onerror=window.__pwned=3>'


def test_markup_in_names_is_shown_as_text(browser, tmp_path):
    """Site names, a run name, a security event and a live message holding markup appear
    literally and nothing in them runs (checked without relying on the CSP: no element was made
    from them either)."""
    from bench.dashboard_render import synthetic_results, write_run
    from server.dashboard import Dashboard

    folder = write_run(tmp_path / "runs", RUN_MARKUP, synthetic_results(3, 3, names=SITE_MARKUP))
    (folder / "security.jsonl").write_text(json.dumps(
        {"time": "now", "event": "key-in-use", "site": SITE_MARKUP[0], "key_sha256": "ab" * 32,
         "holder": SITE_MARKUP[1], "peer": "1.2.3.4"}) + "\n")
    (folder / "live.json").write_text(json.dumps(
        {"state": "training", "round": 4, "num_rounds": 5, "message": SITE_MARKUP[1],
         "sites": [{"node_id": 1, "site_name": SITE_MARKUP[0], "status": "training"}],
         "waiting_for": [SITE_MARKUP[1]], "end": None}))
    with Dashboard(tmp_path / "runs", port=0, current=RUN_MARKUP) as dash:
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(dash.url)
        page.wait_for_selector("body[data-rendered]", timeout=120_000)
        assert page.evaluate("window.__pwned") is None
        assert page.evaluate("document.querySelectorAll('img').length") == 0
        assert page.evaluate("document.scripts.length") == 1  # dashboard.js only
        for name in SITE_MARKUP:
            assert name in page.inner_text("#sites-table")
        assert SITE_MARKUP[0] in page.inner_text("#live-training")
        assert SITE_MARKUP[1] in page.inner_text("#live-message")
        assert SITE_MARKUP[0] in page.inner_text("#security-table")
        assert RUN_MARKUP in page.inner_text("#run-select")
        assert page.evaluate("document.body.dataset.run") == RUN_MARKUP
        assert errors == []
        page.close()


class _Processes:
    def __init__(self, root: Path) -> None:
        self.root, self.procs = root, {}

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "wb")
        self.procs[name] = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"})
        return self.procs[name]

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def stop_all(self) -> None:
        stop_groups(self.procs.values())


@pytest.fixture
def processes(tmp_path):
    procs = _Processes(tmp_path)
    yield procs
    procs.stop_all()


@pytest.mark.timeout(2400)
def test_live_federation_shows_round_2_while_round_3_runs(browser, processes, tmp_path):
    """moma-server --insecure with two moma-client sites on loopback, 5 rounds: the page (polling
    every 0.4 s) shows round 2's global metrics, as results.json has them, while the round in
    progress is 3; a screenshot of that moment is a PNG."""
    teacher = tiny_teacher(tmp_path / "teacher.safetensors")
    port, dash_port = free_port(), free_port()
    processes.start("server", [
        str(BIN / "moma-server"), "--teacher", str(teacher), "--name", "live",
        "--runs-dir", str(tmp_path / "runs"), "--port", str(port), "--insecure",
        "--rounds", "5", "--eval-source", "synthetic:target", "--eval-sites", "2",
        "--classes", ",".join(TARGET_CLASSES), "--dashboard-port", str(dash_port),
        "--run-config", f"image-size={IMAGE_SIZE} batch-size=16 queue-size=64 "
        'optimizer="adamw" lr=0.003 augment="flip" min-train-nodes=2 min-available-nodes=2 '
        "round-timeout=600"])
    for i in range(2):
        processes.start(f"site-{i}", [
            str(BIN / "moma-client"), "--server", f"127.0.0.1:{port}", "--data",
            "synthetic:target", "--site-index", str(i), "--num-sites", "2", "--n", "96",
            "--cache-dir", str(tmp_path / f"site-{i}"), "--site-name", f"site-{i}",
            "--insecure", "--clientappio-port", str(free_port())])
    server = processes.procs["server"]
    deadline = time.time() + 1200  # a busy 2-core machine starts a federation slowly
    while "dashboard: http" not in processes.log("server"):
        assert server.poll() is None, "moma-server exited:\n" + processes.log("server")[-3000:]
        assert time.time() < deadline, "no dashboard:\n" + processes.log("server")[-3000:]
        time.sleep(0.5)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(f"http://127.0.0.1:{dash_port}/?poll=400")
    seen = None
    while time.time() < deadline:
        seen = page.evaluate("""() => ({
            row2: !!document.querySelector('#rounds-table tr[data-round="2"]'),
            live: document.getElementById('live-round').textContent,
            rounds: document.body.dataset.rounds,
            acc2: (document.querySelector('#rounds-table tr[data-round="2"] td:nth-child(3)')
                   || {}).textContent})""")
        if seen["row2"] and seen["live"] == "3":
            break
        assert seen["rounds"] in (None, "0", "1", "2"), f"round 3 ended unseen: {seen}"
        assert server.poll() is None, "moma-server exited:\n" + processes.log("server")[-3000:]
        time.sleep(0.2)
    else:
        pytest.fail(f"the page never showed round 2 while round 3 ran: {seen}\n"
                    + processes.log("server")[-3000:])
    shot = tmp_path / "dashboard.png"
    page.screenshot(path=str(shot), full_page=True)
    png = shot.read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    results = json.loads((tmp_path / "runs" / "live" / "results.json").read_text())
    assert seen["acc2"] == f"{results['rounds'][1]['server_eval']['accuracy']:.3f}"
    live = tmp_path / "runs" / "live" / "live.json"
    if live.exists():  # the ServerApp's own account of the round in progress
        assert json.loads(live.read_text())["round"] >= 3
    page.close()
