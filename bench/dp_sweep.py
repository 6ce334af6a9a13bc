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

``--site-only``: the same student, teacher and data, one site alone and no federation (seconds
per configuration): the wider grid of learning rates and clipping norms that chose the
product's DP defaults (docs/benchmarks.md), ``<out>/site-only-<task>.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moma_bench import benchmark as B  # noqa: E402
from moma_bench.arms import Arm, run_arm  # noqa: E402

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


#: --site-only: (dp-trainable, batch, optimizer, lr, clipping norm) × ε
SITE_GRID = (
    ("head", 32, "sgd", 0.5, 1.0), ("head", 32, "sgd", 2.0, 1.0),
    ("head", 64, "sgd", 2.0, 1.0), ("head", 128, "sgd", 2.0, 1.0),
    ("head", 128, "sgd", 8.0, 1.0), ("head", 32, "adamw", 0.03, 1.0),
    ("head", 128, "adamw", 0.1, 1.0), ("head", 32, "sgd", 4.0, 0.1),
    ("head", 32, "sgd", 8.0, 0.1), ("head", 64, "sgd", 8.0, 0.1),
    ("head", 128, "sgd", 16.0, 0.1), ("head", 64, "adamw", 0.05, 0.1),
    ("last-stage", 64, "sgd", 0.5, 1.0), ("last-stage", 128, "sgd", 1.0, 1.0),
    ("last-stage", 64, "sgd", 0.1, 0.1), ("last-stage", 64, "adamw", 0.003, 0.1),
)


def site_only(sc, out: Path, epsilons: list[float], epochs: int = 10) -> None:
    """One site alone, its student from the scenario's teacher, over :data:`SITE_GRID`."""
    import torch

    from moma_core.checkpoint import load_model
    from moma_core.evaluate import evaluate
    from moma_core.models import Architecture, build_model
    from moma_core.objectives import ObjectiveConfig, build_objective, init_student_from_teacher
    from moma_core.privacy.accounting import default_delta, noise_for_target_epsilon
    from moma_core.privacy.dp_sgd import DPConfig
    from moma_core.sources import make_loader, open_site_data
    from moma_core.train import TrainConfig, train_local

    torch.set_num_threads(1)
    teacher, t_arch, _ = load_model(sc.teacher)
    data = open_site_data("synthetic:target", image_size=t_arch.image_size, augment="flip",
                          seed=0, n=533, site_index=0, num_sites=3)
    path = out / f"site-only-{sc.task}.json"
    rows = json.loads(path.read_text()) if path.is_file() else {}

    def fit(trainable, batch, opt, lr, clip, eps):
        torch.manual_seed(0)
        student = build_model(Architecture(t_arch.model_name, tuple(data.classes),
                                           t_arch.image_size))
        init_student_from_teacher(student, teacher,
                                  classifier=tuple(t_arch.classes) == tuple(data.classes))
        loader = make_loader(data.train, batch, train=True, seed=0)
        n, batches = len(data.train), len(loader)
        private = None
        if eps:
            sigma = noise_for_target_epsilon(eps, default_delta(n), 1 / batches, epochs * batches)
            private = DPConfig(noise_multiplier=sigma, max_grad_norm=clip, trainable=trainable,
                               delta=default_delta(n))
        train_local(student, build_objective(ObjectiveConfig(kind="ce"), student), loader,
                    TrainConfig(epochs=epochs, lr=lr, optimizer=opt, seed=0), privacy=private)
        m = evaluate(student, make_loader(data.val, 128, train=False), len(data.classes))
        return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"]}

    configs = [(g, e) for e in epsilons for g in SITE_GRID] + [(("all", 32, "adamw", 3e-3, 1.0),
                                                                 0.0)]
    for g, eps in configs:
        name = "-".join(map(str, g)) + (f"-eps{eps:g}" if eps else "-no-dp")
        if name not in rows:
            rows[name] = fit(*g, eps)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(rows, indent=2))
        print(f"{sc.name} site 0 {name:40s} accuracy {rows[name]['accuracy']:.3f} macro-F1 "
              f"{rows[name]['macro_f1']:.3f}", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epsilon", type=float, default=8.0)
    p.add_argument("--tasks", nargs="+", default=["different"], choices=["same", "different"])
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", nargs="*", default=None, help="configuration names to run")
    p.add_argument("--out", type=Path, default=Path("runs/dp-sweep"))
    p.add_argument("--site-only", action="store_true",
                   help="one site alone, no federation: the wider grid (seconds each)")
    a = p.parse_args()
    args = B.check_options(B.parser().parse_args(
        ["accuracy", "--sites", str(a.sites), "--tasks", *a.tasks, "--seeds", "0", "1", "2",
         "--out", str(a.out)]))
    for sc in [B.check_scenario(s, args) for s in B.scenarios(args)]:
        B.ensure_teacher(args, sc)
        if a.site_only:
            site_only(sc, a.out, [a.epsilon, 3.0, 1.0] if a.epsilon == 8.0 else [a.epsilon])
            continue
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
