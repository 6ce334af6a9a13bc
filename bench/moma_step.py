"""P1: the cost of one MoMA training step relative to the distillation floor.

The floor is what any teacher-student step must pay: the student's forward, backward and
optimiser step plus one teacher forward on the same batch. Measured on the CPU with one thread,
in one process, the variants interleaved (floor, KD, MoMA at each K) and repeated; the figure is
the median step time of a variant divided by the median floor. Figures, not a test.

    .venv/bin/python bench/moma_step.py [--quick] [--out runs/bench-perf]

Writes ``p1_moma_step.json`` and a Markdown section ``p1_moma_step.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moma_core.models import create_classifier, features_and_logits  # noqa: E402
from moma_core.objectives import ObjectiveConfig, build_objective  # noqa: E402

SIZES = {  # name: (timm model, image size, batch)
    "tiny": ("test_efficientnet", 64, 32),
    "b0": ("efficientnet_b0", 224, 16),
}


def _floor_step(student, teacher, optimizer, x, y):
    _, z_s = features_and_logits(student, x)
    with torch.no_grad():
        teacher(x)
    loss = F.cross_entropy(z_s, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def _objective_step(student, objective, optimizer, x, y):
    loss, _ = objective.loss(student, x, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    objective.after_step(student)


def measure(size: str, queue_sizes: list[int], reps: int, warmup: int = 2) -> dict:
    model_name, image, batch = SIZES[size]
    torch.manual_seed(0)
    teacher = create_classifier(model_name, 4)
    variants = {}

    def add(name, kind, k=None, **options):
        student = create_classifier(model_name, 4)
        student.load_state_dict(teacher.state_dict())
        student.train()
        if kind == "floor":
            t = create_classifier(model_name, 4).eval()
            opt = torch.optim.SGD(student.parameters(), lr=1e-3, momentum=0.9)
            variants[name] = lambda x, y: _floor_step(student, t, opt, x, y)
            return
        cfg = ObjectiveConfig(kind=kind, queue_size=k or 4096, **options)
        obj = build_objective(cfg, student, teacher, same_task=True).train()
        params = list(student.parameters()) + list(obj.trainable_parameters())
        opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
        variants[name] = lambda x, y: _objective_step(student, obj, opt, x, y)

    add("floor", "floor")
    add("kd", "kd")
    for k in queue_sizes:
        add(f"moma K={k}", "moma", k)
    add(f"moma K={queue_sizes[0]} kl after-update", "moma", queue_sizes[0],
        kl_teacher="after-update")
    x = torch.randn(batch, 3, image, image)
    y = torch.randint(0, 4, (batch,))
    times: dict[str, list[float]] = {name: [] for name in variants}
    for rep in range(warmup + reps):
        for name, step in variants.items():
            start = time.perf_counter()
            step(x, y)
            if rep >= warmup:
                times[name].append(time.perf_counter() - start)
    floor = statistics.median(times["floor"])
    return {"model": model_name, "image": image, "batch": batch, "reps": reps,
            "floor_s": floor,
            "ratios": {n: statistics.median(t) / floor for n, t in times.items() if n != "floor"}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the tiny model only, fewer repetitions")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--out", type=Path, default=Path("runs/bench-perf"))
    args = p.parse_args()
    torch.set_num_threads(1)
    default_k = ObjectiveConfig().queue_size
    plan = [("tiny", [default_k, 16384], args.reps or 15)]
    if not args.quick:
        plan.append(("b0", [default_k, 16384], args.reps or 5))
    results = []
    for size, ks, reps in plan:
        r = measure(size, ks, reps)
        results.append(r)
        print(f"{r['model']} {r['image']}px B={r['batch']}: floor {r['floor_s'] * 1000:.0f} ms; "
              + ", ".join(f"{n} {v:.2f}x" for n, v in r["ratios"].items()), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or
            platform.machine(), "torch": torch.__version__, "threads": 1,
            "default_queue_size": default_k}
    (args.out / "p1_moma_step.json").write_text(json.dumps({"meta": meta, "results": results},
                                                           indent=2))
    lines = ["## P1: MoMA step / distillation floor", "",
             f"{meta['date']}, {meta['machine']}, torch {meta['torch']}, CPU, 1 thread; floor = "
             "student forward+backward+SGD step + teacher forward; medians of interleaved "
             "repetitions. Goal ≤ 1.15 at the default K "
             f"({default_k}).", "",
             "| model | input | batch | floor (ms) | " + " | ".join(results[0]["ratios"]) + " |",
             "|---|---|---|---|" + "---|" * len(results[0]["ratios"])]
    for r in results:
        lines.append(f"| {r['model']} | {r['image']} px | {r['batch']} | "
                     f"{r['floor_s'] * 1000:.0f} | "
                     + " | ".join(f"{v:.2f}×" for v in r["ratios"].values()) + " |")
    (args.out / "p1_moma_step.md").write_text("\n".join(lines) + "\n")
    print(f"→ {args.out / 'p1_moma_step.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
