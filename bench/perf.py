"""Performance harness: the figures of ``runs/bench-perf/summary.md`` (``make bench``).

Every figure is a ratio measured in one process on this machine. Figures, not tests.

- P1 MoMA step / distillation floor (``bench/moma_step.py``; read from its JSON when present,
  ``--p1`` measures it again).
- P2 simulated federation: wall time of the rounds / the sites' own training time (per round:
  Σ site training time / the sites that can train at once), and the start-up (command start
  → ServerApp start: Ray and the app) reported apart. ``--p2-long``: the same with each site
  training 30 s or more per round, against both Σ/CPUs and the makespan of the same site jobs on
  the same CPUs (whole jobs, longest first: what running the sites' training without Flower,
  as many at a time as there are CPUs, would take); and against the makespan of each site's
  whole local work in a round, scoring the incoming student (``eval-time-s``) and training.
- P3 teacher bytes sent per site over all rounds / one teacher package.
- P4 student bytes per round and site (down + up, teacher excluded) / (2 × the student in
  float32), with ``transfer-dtype`` float32 and float16, and float16's accuracy cost (the
  coordinator's held-out accuracy, same seed).
- Loader: images/s the training loader delivers (RandAugment) vs images/s a MoMA step consumes.
- P8 (``--p8``): 100 simulated sites of a tiny model, 2 rounds: peak resident memory of the
  whole process tree (Ray workers included).

    .venv/bin/python bench/perf.py [--p1] [--p2-long] [--p8] [--out runs/bench-perf]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# -- process-tree memory (Linux /proc; no extra dependency) ----------------------------------
def tree_rss_bytes(root: int) -> int:
    """Resident memory of ``root`` and all its descendants."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry))
            rss[int(entry)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo.extend(children.get(pid, []))
    return total


class PeakMemory:
    """Samples the process tree's resident memory every half second while in use."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss_bytes(os.getpid()))
            self._stop.wait(0.5)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


# -- simulated runs ----------------------------------------------------------------------------
def simulated_run(out: Path, name: str, **settings: object) -> tuple[dict, float]:
    """One in-process ``moma-simulate --demo --no-local-baseline`` run with ``settings``
    (:class:`~server.simulation_spec.SimulationSpec` fields); returns results.json and the
    seconds from the call to the ServerApp's start (Ray and app start-up)."""
    from server.simulate import simulate
    from server.simulation_spec import SimulationSpec

    spec = SimulationSpec(demo=True, no_local_baseline=True, name=name, runs_dir=out / "runs",
                          **settings)  # type: ignore[arg-type]
    start = time.time()
    simulate(spec)
    results = json.loads((out / "runs" / name / "results.json").read_text())
    return results, results["started"] - start


def makespan(times: list[float], workers: int) -> float:
    """Wall time of whole jobs on ``workers`` (each job to the least-loaded worker, longest
    first)."""
    loads = [0.0] * max(workers, 1)
    for t in sorted(times, reverse=True):
        loads[loads.index(min(loads))] += t
    return max(loads)


def federation_figures(results: dict, startup_s: float, teacher_bytes: int,
                       student_fp32: int, cpus: int) -> dict:
    """P2, P3 and P4 of one run (see module docstring)."""
    rounds = results["rounds"]
    ratios, job_ratios, work_ratios = [], [], []
    wall_total = train_total = jobs_total = work_total = 0.0
    for r in rounds:
        ok = [s["metrics"] for s in r["sites"].values() if s["status"] == "ok"]
        times = [m.get("train-time-s", 0.0) for m in ok]
        # the site's whole local work: scoring the incoming student, then training
        work = [m.get("train-time-s", 0.0) + m.get("eval-time-s", 0.0) for m in ok]
        ideal = sum(times) / max(min(len(times), cpus), 1)
        wall_total += r["wall_s"]
        train_total += ideal
        jobs, work_span = makespan(times, cpus), makespan(work, cpus)
        jobs_total += jobs
        work_total += work_span
        ratios.append(r["wall_s"] / ideal if ideal else float("nan"))
        job_ratios.append(r["wall_s"] / jobs if jobs else float("nan"))
        work_ratios.append(r["wall_s"] / work_span if work_span else float("nan"))
    sites = {}
    for r in rounds:
        for node, s in r["sites"].items():
            agg = sites.setdefault(node, {"teacher": 0, "student": 0})
            agg["teacher"] += s.get("teacher_bytes", 0)
            agg["student"] += s["bytes_down"] + s["bytes_up"] - s.get("teacher_bytes", 0)
    n_rounds = len(rounds)
    return {
        "rounds": n_rounds, "sites": len(sites), "startup_s": startup_s,
        "p2_round_wall_over_training": wall_total / train_total if train_total else None,
        "p2_per_round": ratios,
        "p2_round_wall_over_site_jobs_makespan": wall_total / jobs_total if jobs_total else None,
        "p2_makespan_per_round": job_ratios,
        "p2_round_wall_over_site_work_makespan": wall_total / work_total if work_total else None,
        "p2_work_makespan_per_round": work_ratios,
        "site_eval_s_per_site_round": [
            round(s["metrics"].get("eval-time-s", 0.0), 1)
            for r in rounds for s in r["sites"].values() if s["status"] == "ok"],
        "site_train_s_per_site_round": [
            round(s["metrics"].get("train-time-s", 0.0), 1)
            for r in rounds for s in r["sites"].values() if s["status"] == "ok"],
        "site_train_s_per_round": train_total / max(n_rounds, 1),
        "p3_teacher_bytes_per_site_over_one_teacher":
            max(a["teacher"] for a in sites.values()) / teacher_bytes,
        "p4_bytes_per_round_per_site_over_2x_fp32":
            sum(a["student"] for a in sites.values()) / len(sites) / n_rounds
            / (2 * student_fp32),
        "accuracy": (rounds[-1].get("server_eval") or {}).get("accuracy"),
    }


def student_fp32_bytes(results: dict) -> int:
    from moma_core.models import Architecture, build_model

    cfg = results["config"]
    arch = Architecture(cfg["student-model"], tuple(cfg["classes"].split(",")),
                        int(cfg["image-size"]))
    return sum(v.numel() * 4 for v in build_model(arch).state_dict().values()
               if v.is_floating_point())


# -- loader vs step ----------------------------------------------------------------------------
def loader_vs_step(batches: int = 20) -> dict:
    import torch

    from moma_core.models import create_classifier
    from moma_core.objectives import ObjectiveConfig, build_objective
    from moma_core.sources import make_loader, open_site_data

    data = open_site_data("synthetic:target", image_size=64, augment="randaugment", n=32 * 24)
    loader = make_loader(data.train, 32, train=True)
    it = iter(loader)
    next(it)
    start, seen = time.perf_counter(), 0
    for _ in range(batches):
        x, _ = next(it)
        seen += len(x)
    loader_rate = seen / (time.perf_counter() - start)
    torch.manual_seed(0)
    teacher = create_classifier("test_efficientnet", 4)
    student = create_classifier("test_efficientnet", 4)
    student.load_state_dict(teacher.state_dict())
    obj = build_objective(ObjectiveConfig(), student, teacher, same_task=True)
    opt = torch.optim.SGD([*student.parameters(), *obj.trainable_parameters()], lr=1e-3)
    x, y = torch.randn(32, 3, 64, 64), torch.randint(0, 4, (32,))
    times = []
    for _ in range(6):
        t = time.perf_counter()
        loss, _ = obj.loss(student, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        obj.after_step(student)
        times.append(time.perf_counter() - t)
    step_rate = 32 / sorted(times[1:])[len(times[1:]) // 2]
    return {"loader_images_per_s": loader_rate, "moma_step_images_per_s": step_rate,
            "loader_over_step": loader_rate / step_rate}


def long_federation(out: Path, cpus: int) -> dict:
    """P2 with 30 s or more of training per site and round (3 sites, 3200 images each, 8 local
    epochs: about 35 s per round on an idle 2-core machine)."""
    print("P2: 3 sites, 30 s or more of training each per round …", flush=True)
    results, startup = simulated_run(out, "perf-long", sites=3, n=3200, local_epochs=8,
                                     rounds=3)
    teacher = Path(results["config"]["teacher-path"])
    figures = federation_figures(results, startup, teacher.stat().st_size,
                                 student_fp32_bytes(results), cpus)
    print("long", json.dumps(figures), flush=True)
    return figures


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/bench-perf"))
    p.add_argument("--p1", action="store_true", help="measure P1 again (bench/moma_step.py)")
    p.add_argument("--p2-long", action="store_true",
                   help="only P2 with 30 s or more of training per site and round (about 5 "
                        "min), added to the figures already in --out")
    p.add_argument("--p8", action="store_true", help="100 simulated sites (slow)")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    import torch

    from server.simulate import usable_cpus

    cpus = usable_cpus()
    figures: dict = {"meta": {"date": time.strftime("%Y-%m-%d"), "cpus": cpus,
                              "out": str(args.out),
                              "machine": platform.machine(), "torch": torch.__version__}}
    if args.p2_long and (args.out / "summary.json").is_file():
        figures = json.loads((args.out / "summary.json").read_text())
        figures["federation_long"] = long_federation(args.out, cpus)
        figures["meta"]["p2_long_date"] = time.strftime("%Y-%m-%d")
        (args.out / "summary.json").write_text(json.dumps(figures, indent=2))
        (args.out / "summary.md").write_text(summary_markdown(figures))
        print(f"→ {args.out / 'summary.md'}")
        return 0
    p1_json = args.out / "p1_moma_step.json"
    if args.p1 or not p1_json.is_file():
        import subprocess

        subprocess.run([sys.executable, str(ROOT / "bench" / "moma_step.py"), "--out",
                        str(args.out)], check=True)
    figures["p1"] = json.loads(p1_json.read_text())["results"]

    print("P2–P4: two simulated federations (float32, float16) …", flush=True)
    for dtype in ("float32", "float16"):
        results, startup = simulated_run(args.out, f"perf-{dtype}", sites=3,
                                         transfer_dtype=dtype)
        teacher = Path(results["config"]["teacher-path"])
        figures[f"federation_{dtype}"] = federation_figures(
            results, startup, teacher.stat().st_size, student_fp32_bytes(results), cpus)
        print(dtype, json.dumps(figures[f"federation_{dtype}"]), flush=True)
    if args.p2_long:
        figures["federation_long"] = long_federation(args.out, cpus)
    print("loader vs step …", flush=True)
    figures["loader"] = loader_vs_step()
    if args.p8:
        print("P8: 100 simulated sites …", flush=True)
        with PeakMemory() as mem:
            started = time.time()
            simulated_run(args.out, "perf-100", sites=100, rounds=2, n=16, local_epochs=1)
        figures["p8"] = {"sites": 100, "rounds": 2, "peak_rss_gb": mem.peak / 1e9,
                         "wall_s": time.time() - started}
    (args.out / "summary.json").write_text(json.dumps(figures, indent=2))
    (args.out / "summary.md").write_text(summary_markdown(figures))
    print(f"→ {args.out / 'summary.md'}")
    return 0


def summary_markdown(f: dict) -> str:
    m = f["meta"]
    lines = ["# Performance figures", "",
             f"{m['date']}, {m['cpus']} CPU cores ({m['machine']}), torch {m['torch']}, no GPU. "
             "Made by `make bench` (`bench/perf.py`, `bench/moma_step.py`).", "",
             "## P1: MoMA step / distillation floor (1 thread)", "",
             "| model | input | batch | " + " | ".join(f["p1"][0]["ratios"]) + " |",
             "|---|---|---|" + "---|" * len(f["p1"][0]["ratios"])]
    for r in f["p1"]:
        lines.append(f"| {r['model']} | {r['image']} px | {r['batch']} | "
                     + " | ".join(f"{v:.2f}×" for v in r["ratios"].values()) + " |")
    lines += ["", "## P2–P4: simulated federation (3 synthetic sites, demo settings)", "",
              "| transfer | start-up s | P2 round wall / site training | site training s per "
              "round | P3 teacher bytes per site / one teacher | P4 bytes per round and site / "
              "(2 × fp32 student) | held-out accuracy |", "|---|---|---|---|---|---|---|"]
    for dtype in ("float32", "float16"):
        r = f[f"federation_{dtype}"]
        acc = "–" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
        lines.append(f"| {dtype} | {r['startup_s']:.0f} | "
                     f"{r['p2_round_wall_over_training']:.2f} | "
                     f"{r['site_train_s_per_round']:.1f} | "
                     f"{r['p3_teacher_bytes_per_site_over_one_teacher']:.3f} | "
                     f"{r['p4_bytes_per_round_per_site_over_2x_fp32']:.3f} | {acc} |")
    if "federation_long" in f:
        r = f["federation_long"]
        lines += ["", "## P2 with 30 s or more of training per site and round (`--p2-long`)", "",
                  f"3 synthetic sites, 3200 images each, 8 local epochs, demo settings otherwise, "
                  f"{r['rounds']} rounds, "
                  f"{f['meta']['cpus']} CPUs; site training per round (s): "
                  f"{', '.join(map(str, r['site_train_s_per_site_round']))}.", "",
                  f"- round wall / (Σ site training / CPUs): "
                  f"{r['p2_round_wall_over_training']:.2f} (per round "
                  f"{', '.join(f'{x:.2f}' for x in r['p2_per_round'])})",
                  f"- round wall / makespan of the same site jobs on the same CPUs: "
                  f"{r['p2_round_wall_over_site_jobs_makespan']:.2f} (per round "
                  f"{', '.join(f'{x:.2f}' for x in r['p2_makespan_per_round'])})",
                  f"- round wall / makespan of the sites' whole local work (scoring the "
                  "incoming student, "
                  f"{', '.join(map(str, r.get('site_eval_s_per_site_round', [])))} s, then "
                  "training): "
                  + (f"{r['p2_round_wall_over_site_work_makespan']:.2f} (per round "
                     f"{', '.join(f'{x:.2f}' for x in r['p2_work_makespan_per_round'])})"
                     if r.get("p2_round_wall_over_site_work_makespan") else "not recorded"),
                  f"- command start → ServerApp start, apart: {r['startup_s']:.0f} s (round 1 "
                  "also holds the sites' first contact: actors, teacher transfer)"]
    lo = f["loader"]
    lines += ["", "## Loader vs training step", "",
              f"RandAugment loader {lo['loader_images_per_s']:.0f} images/s, MoMA step "
              f"(test_efficientnet, 64 px, B=32, all threads) {lo['moma_step_images_per_s']:.0f}"
              f" images/s: loader / step = {lo['loader_over_step']:.2f}."]
    deployed = Path(f["meta"].get("out", "runs/bench-perf")) / "deployed_round.md"
    if deployed.is_file():
        lines += ["", *deployed.read_text().rstrip("\n").splitlines()]
    if "p8" in f:
        lines += ["", "## P8: 100 simulated sites", "",
                  f"2 rounds of a tiny model: peak resident memory of the process tree "
                  f"{f['p8']['peak_rss_gb']:.2f} GB, {f['p8']['wall_s']:.0f} s."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
