"""DP-SGD settings sweep: which part of the student to train, batch, learning rate, clipping.

Runs federated arms of ``moma-bench accuracy`` (the product's simulated federation, scored as
the benchmark scores: every held-out image by its own site's model) at one privacy level over a
grid of DP-SGD settings, one seed, and prints pooled accuracy and macro-F1 of each, so that
the product's DP defaults come from a measurement. Figures, not a test::

    python bench/dp_sweep.py --epsilon 8 --tasks different --out runs/dp-sweep

Every configuration trains the CE objective with DP-SGD at every site and the noise multiplier
each site derives for the run (``dp-target-epsilon``); a non-private FedAvg CE arm of the same
scenario is the reference. Results: ``<out>/sweep-<task>-eps<ε>.json`` (written after each
configuration: a run stopped part-way keeps what it measured) and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from server import benchmark as B  # noqa: E402
from server.benchmark_arms import Arm, run_arm  # noqa: E402

#: (name, dp-trainable, batch size, physical batch, optimizer, lr, clipping norm)
GRID = (
    ("head-b32-adamw3e-3", "head", 32, 0, "adamw", 3e-3, 1.0),
    ("head-b128-adamw3e-3", "head", 128, 32, "adamw", 3e-3, 1.0),
    ("head-b128-adamw1e-2", "head", 128, 32, "adamw", 1e-2, 1.0),
    ("head-b128-sgd0.5", "head", 128, 32, "sgd", 0.5, 1.0),
    ("last-b32-adamw3e-3", "last-stage", 32, 0, "adamw", 3e-3, 1.0),
    ("last-b128-adamw3e-3", "last-stage", 128, 32, "adamw", 3e-3, 1.0),
    ("last-b128-adamw1e-2", "last-stage", 128, 32, "adamw", 1e-2, 1.0),
    ("last-b128-adamw3e-3-c0.1", "last-stage", 128, 32, "adamw", 3e-3, 0.1),
    ("all-b128-adamw3e-3", "all", 128, 32, "adamw", 3e-3, 1.0),
)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epsilon", type=float, default=8.0)
    p.add_argument("--tasks", nargs="+", default=["different"], choices=["same", "different"])
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", nargs="*", default=None, help="configuration names to run")
    p.add_argument("--out", type=Path, default=Path("runs/dp-sweep"))
    a = p.parse_args()
    args = B.check_options(B.parser().parse_args(
        ["accuracy", "--sites", str(a.sites), "--tasks", *a.tasks, "--seeds", "0", "1", "2",
         "--out", str(a.out)]))
    for sc in [B.check_scenario(s, args) for s in B.scenarios(args)]:
        B.ensure_teacher(args, sc)
        path = a.out / f"sweep-{sc.task}-eps{a.epsilon:g}.json"
        rows = json.loads(path.read_text()) if path.is_file() else {}
        arms = [Arm("no-dp-fedavg-ce", "federated", "ce")]
        for name, trainable, batch, physical, opt, lr, clip in GRID:
            if a.only and name not in a.only:
                continue
            arms.append(Arm(name, "federated", "ce", settings=(
                ("dp", "dp-sgd"), ("dp_trainable", trainable), ("batch_size", batch),
                ("dp_physical_batch", physical), ("optimizer", opt), ("lr", lr),
                ("dp_max_grad_norm", clip), ("dp_target_epsilon", a.epsilon))))
        for arm_ in arms:
            if arm_.name in rows:
                continue
            t0 = time.time()
            folder = a.out / sc.name / f"seed-{a.seed}"
            try:
                r = run_arm(arm_, sc, a.seed, folder, folder / "runs" / f"{arm_.name}.log")
                rows[arm_.name] = {"accuracy": r["pooled"]["accuracy"],
                                   "macro_f1": r["pooled"]["macro_f1"],
                                   "privacy": r.get("privacy"), "wall_s": time.time() - t0}
            except Exception as exc:  # noqa: BLE001 (a configuration that fails is a result)
                rows[arm_.name] = {"error": str(exc)[:300]}
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(rows, indent=2))
            print(f"{sc.name} {arm_.name}: {rows[arm_.name]}", flush=True)
        print(f"\n{sc.name}, ε = {a.epsilon:g}, seed {a.seed}:")
        for name, r in rows.items():
            if "error" in r:
                print(f"  {name:28s} failed: {r['error']}")
            else:
                print(f"  {name:28s} accuracy {r['accuracy']:.3f}  macro-F1 {r['macro_f1']:.3f}"
                      f"  ({r['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
