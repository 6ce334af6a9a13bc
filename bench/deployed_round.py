"""Deployed-round overhead: what a real round costs beyond the sites' own training.

Starts ``moma-server --insecure`` and two ``moma-client`` sites on loopback (real SuperLink,
SuperNodes and ClientApp processes), runs a few rounds of a tiny model, and prints per round:
wall time, the slowest site's training time, and their difference (the overhead: messages,
ClientApp process start and imports, checks, aggregation, evaluation). Figures, not a test.

    .venv/bin/python bench/deployed_round.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deploy.runtime import free_port  # noqa: E402
from tests.helpers import IMAGE_SIZE, TARGET_CLASSES, tiny_teacher  # noqa: E402

BIN = Path(sys.executable).parent


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--n", type=int, default=96, help="training images per site")
    p.add_argument("--out", type=Path, default=Path("runs/bench-perf"))
    p.add_argument("--keep", default=None, help="work in this folder and keep its logs")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep) if args.keep else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        teacher = tiny_teacher(root / "teacher.safetensors")
        port, procs = free_port(), []
        env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}

        t0 = time.time()

        def start(name: str, cmd: list[str], env: dict[str, str] = env) -> None:
            """Start ``cmd``; its output goes to ``<name>.log``, each line stamped with the
            seconds since the benchmark started (for tracing where a round's time goes)."""
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    env=env, start_new_session=True)
            procs.append(proc)

            def copy(path: Path = root / f"{name}.log") -> None:
                with open(path, "w", encoding="utf-8") as out:
                    for line in iter(proc.stdout.readline, b""):
                        out.write(f"{time.time() - t0:8.2f} "
                                  f"{line.decode(errors='replace').rstrip()}\n")
                        out.flush()

            threading.Thread(target=copy, daemon=True).start()

        start("server", [str(BIN / "moma-server"), "--teacher", str(teacher), "--name", "b",
                         "--runs-dir", str(root / "runs"), "--port", str(port), "--insecure",
                         "--rounds", str(args.rounds), "--classes", ",".join(TARGET_CLASSES),
                         "--run-config",
                         f"image-size={IMAGE_SIZE} batch-size=16 queue-size=64 "
                         'optimizer="adamw" lr=0.003 augment="flip"'])
        # one torch thread per site: two sites share these 2 cores as two machines would
        # not, and two sites' busy-waiting thread pools on the same cores slow both tenfold
        site_env = {**env, "OMP_NUM_THREADS": "1"}
        for i in range(2):
            start(f"site-{i}", [str(BIN / "moma-client"), "--server", f"127.0.0.1:{port}",
                                "--data", "synthetic:target", "--site-index", str(i),
                                "--num-sites", "2", "--n", str(args.n), "--cache-dir",
                                str(root / f"site-{i}"), "--insecure",
                                "--clientappio-port", str(free_port())], site_env)
        try:
            rc = procs[0].wait(1800)
        finally:
            for proc in procs:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        if rc != 0:
            print((root / "server.log").read_text()[-3000:])
            return 1
        results = json.loads((root / "runs" / "b" / "results.json").read_text())
        print(f"{'round':>5} {'wall s':>8} {'train s':>8} {'overhead s':>10} {'MB down':>8}")
        rows = ["## Deployed round overhead (2 sites on loopback, `bench/deployed_round.py`)", "",
                f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores, one torch thread "
                "per site. Overhead = round wall time − the slowest site's training time (goal "
                "≤ 10 s). Round 1 also holds the first contact (the teacher-status query, the "
                "teacher's transfer and check); the last round also the final evaluation.", "",
                "| round | wall s | slowest site's training s | overhead s | MB down |",
                "|---|---|---|---|---|"]
        for r in results["rounds"]:
            train = max(s["metrics"].get("train-time-s", 0.0) for s in r["sites"].values())
            print(f"{r['round']:>5} {r['wall_s']:>8.1f} {train:>8.1f} "
                  f"{r['wall_s'] - train:>10.1f} {r['bytes_down'] / 1e6:>8.2f}")
            rows.append(f"| {r['round']} | {r['wall_s']:.1f} | {train:.1f} | "
                        f"{r['wall_s'] - train:.1f} | {r['bytes_down'] / 1e6:.2f} |")
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "deployed_round.md").write_text("\n".join(rows) + "\n")
    return 0


if __name__ == "__main__":
    started = time.time()
    code = main()
    print(f"(total {time.time() - started:.0f} s, {os.cpu_count()} cores)")
    raise SystemExit(code)
