"""How long the dashboard takes to render a large run in headless Chromium.

Synthesises ``results.json`` with ``--sites`` × ``--rounds`` (default 100 × 100: every site
trains and reports its validation metrics every round), serves it with the dashboard
(in-process, loopback) and loads the page ``--repeats`` times in Debian's Chromium; prints, for
each load, the time from navigation start until the page has fetched the run and drawn every
plot and table (the ``data-rendered`` attribute the page sets, from ``performance.now()``) and
the rendering alone (``data-render-ms``), then the median.

    .venv/bin/python bench/dashboard_render.py [--sites 100] [--rounds 100] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CHROMIUM = "/usr/bin/chromium"
TERMS = ("train-ce", "train-kl", "train-nce", "train-nce-shuffled", "train-retrieval")


def synthetic_results(sites: int, rounds: int, seed: int = 0,
                      names: list[str] | None = None) -> dict:
    """A results.json (schema 2) of ``sites`` sites × ``rounds`` rounds; ``names`` sets the
    first site names (the escaping test puts markup there)."""
    rng = random.Random(seed)
    names = list(names or []) + [f"hospital-{i:03d}" for i in range(len(names or []), sites)]
    nodes = {str(10**18 + i * 7919): names[i] for i in range(sites)}
    classes = ["benign", "grade_1", "grade_2", "grade_3"]

    def evals(level: float) -> dict:
        acc = min(1.0, max(0.0, level + rng.gauss(0, 0.03)))
        return {"loss": 1.5 - acc, "accuracy": acc, "macro-f1": acc * 0.95,
                "kappa": 2 * acc - 1, "num-examples": 60}

    out_rounds = []
    for r in range(1, rounds + 1):
        level = 0.25 + 0.6 * (1 - 0.97 ** r)
        site_entries, fed_sites = {}, {}
        for i, (node, name) in enumerate(nodes.items()):
            failed = (i + r) % 37 == 0
            metrics = {k: rng.uniform(0, 5) for k in TERMS}
            metrics["dp-epsilon"] = 0.1 * r
            site_entries[node] = {
                "site_name": name, "status": "failed" if failed else "ok",
                "reason": "out-of-memory" if failed else None, "bytes_down": 840_000,
                "bytes_up": 420_000, "teacher_sent": r == 1, "teacher_bytes": 0,
                "num_examples": 480, "metrics": {} if failed else metrics,
                "incoming_eval": evals(level)}
            fed_sites[node] = {**evals(level), "site-name": name}
        acc = level + rng.gauss(0, 0.02)
        out_rounds.append({
            "round": r, "status": "ok",
            "train": {k: rng.uniform(0, 5) for k in TERMS},
            "incoming_eval": evals(level), "sites": site_entries, "failed_sites": [],
            "examples": {n: 480 for n in nodes}, "bytes_down": 840_000 * sites,
            "bytes_up": 420_000 * sites, "start_digest": "0" * 64, "end_digest": "0" * 64,
            "wall_s": rng.uniform(5, 20),
            "server_eval": {"accuracy": acc, "macro_f1": acc * 0.95, "kappa": 2 * acc - 1,
                            "loss": 1.0, "num_examples": 400},
            "checkpoint": f"checkpoints/global-round-{r:03d}.safetensors",
            "federated_eval": {"accuracy": level, "macro_f1": level, "kappa": level,
                               "loss": 1.0, "num_examples": 60 * sites},
            "federated_eval_sites": fed_sites})
    return {"schema_version": 2, "teacher_sha256": "ab" * 32, "started": time.time(),
            "config": {"objective": "moma", "num-rounds": rounds, "classes": ",".join(classes),
                       "round-timeout": 600.0, "run-name": "bench"},
            "rounds": out_rounds, "final": None}


def write_run(runs_dir: Path, name: str, results: dict) -> Path:
    folder = runs_dir / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(results))
    return folder


def measure(url: str, repeats: int) -> list[tuple[float, float]]:
    """(ms from navigation start to rendered, ms of rendering) per page load."""
    from playwright.sync_api import sync_playwright

    times = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            for _ in range(repeats):
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.goto(url)
                page.wait_for_selector("body[data-rendered]", timeout=120_000)
                times.append((float(page.evaluate("document.body.dataset.rendered")),
                              float(page.evaluate("document.body.dataset.renderMs"))))
                page.close()
        finally:
            browser.close()
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    from server.dashboard import Dashboard

    with tempfile.TemporaryDirectory() as tmp:
        folder = write_run(Path(tmp), "bench", synthetic_results(args.sites, args.rounds))
        size = (folder / "results.json").stat().st_size
        with Dashboard(Path(tmp), port=0, current="bench") as dash:
            times = measure(f"{dash.url}?poll=600000#bench", args.repeats)
    for i, (total, render) in enumerate(times, 1):
        print(f"load {i}: rendered {total:.0f} ms after navigation start (render {render:.0f} ms)")
    print(f"{args.sites} sites x {args.rounds} rounds (results.json {size / 1e6:.1f} MB): median "
          f"{statistics.median(t for t, _ in times):.0f} ms to rendered, "
          f"{statistics.median(r for _, r in times):.0f} ms rendering")
    return 0


if __name__ == "__main__":
    sys.exit(main())
