"""``moma-simulate``: the whole federation on one machine through Flower's simulation engine.

The same ServerApp round loop (:func:`server.server_app.run_federation`) and the same ClientApp
as a deployment; N simulated sites from the synthetic generator (each its own stain/scanner
style, optional Dirichlet label skew) or from a user's dataset split by a partitioner. With
``--demo`` it first trains a small teacher on the synthetic source task if none is given, and
compares the federation with local-only training of each site in the report.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from moma_core.cli.common import run_cli
from moma_core.config import AGGREGATIONS, RunConfig
from moma_core.data.synthetic import TARGET_CLASSES
from moma_core.partition import PARTITIONERS, partition
from moma_core.progress import console
from server.baseline import local_only_section
from server.results import RunResults


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moma-simulate", description=__doc__.splitlines()[0])
    p.add_argument("--name", default="simulation", help="run name: results in runs/<name>/")
    p.add_argument("--runs-dir", type=Path, default=Path("runs"))
    p.add_argument("--demo", action="store_true",
                   help="small CPU settings, train the teacher if missing, local-only baseline")
    p.add_argument("--teacher", type=Path, default=None, help="teacher .safetensors")
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--objective", choices=["moma", "kd", "ce"], default="moma")
    p.add_argument("--student-model", default=None)
    p.add_argument("--aggregation", choices=AGGREGATIONS, default="fedavg")
    p.add_argument("--fedbn", action="store_true", help="keep normalisation layers local")
    p.add_argument("--local-epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default=None)
    p.add_argument("--augment", choices=["randaugment", "flip", "none"], default=None)
    p.add_argument("--queue-size", type=int, default=None)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--n", type=int, default=None, help="synthetic: training images per site")
    p.add_argument("--label-skew", type=float, default=0.0,
                   help="synthetic: Dirichlet α of each site's class mix (0: balanced)")
    p.add_argument("--data", default=None, help="a user dataset to split among the sites")
    p.add_argument("--partitioner", choices=PARTITIONERS, default="iid")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet α (partitioner)")
    p.add_argument("--resume", action="store_true", help="continue runs/<name>/")
    p.add_argument("--no-local-baseline", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    return p


DEMO = {"rounds": 5, "local_epochs": 2, "lr": 0.003, "optimizer": "adamw", "augment": "flip",
        "queue_size": 1024, "image_size": 48, "n": 240, "student_model": "test_efficientnet"}
DEFAULT = {"rounds": 10, "local_epochs": 1, "lr": 0.01, "optimizer": "sgd",
           "augment": "randaugment", "queue_size": 4096, "image_size": 64, "n": 800,
           "student_model": None}


def settings(args: argparse.Namespace) -> argparse.Namespace:
    base = DEMO if args.demo else DEFAULT
    for k, v in base.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def ensure_teacher(args: argparse.Namespace) -> Path:
    """The given teacher, or (demo) one trained on the synthetic source task."""
    if args.teacher is not None:
        if not args.teacher.is_file():
            raise ValueError(f"teacher {args.teacher} not found")
        return args.teacher
    if not args.demo and args.objective != "ce":
        raise ValueError("--teacher is required (or use --demo to train one)")
    path = args.runs_dir / "teachers" / f"demo-{args.student_model}-{args.image_size}px.safetensors"
    if path.is_file():
        console.print(f"using the demo teacher {path}")
        return path
    from moma_core.cli.teacher import parser as teacher_parser
    from moma_core.cli.teacher import train_teacher

    console.print("training the demo teacher on the synthetic source task …")
    targs = teacher_parser().parse_args([
        "--model", args.student_model, "--out", str(path), "--n", "800", "--epochs", "6",
        "--image-size", str(args.image_size), "--lr", "0.003", "--optimizer", "adamw",
        "--augment", "flip", "--batch-size", "32",
        "--seed", str(args.seed), "--device", "cpu"])
    train_teacher(targs)
    return path


def site_configs(args: argparse.Namespace, out_dir: Path) -> tuple[list[dict], tuple[str, ...]]:
    """Node configs of the simulated sites, and the task's classes."""
    cache = out_dir / "site-cache"
    if args.data is None:
        rng = np.random.default_rng(args.seed)
        sites = []
        for i in range(args.sites):
            cfg = {"data-path": "synthetic:target", "cache-dir": str(cache / f"site-{i}"),
                   "site-index": i, "num-sites": args.sites, "n": args.n,
                   "site-name": f"site-{i}", "device": "cpu", "data-seed": args.seed}
            if args.label_skew > 0:
                probs = rng.dirichlet([args.label_skew] * len(TARGET_CLASSES))
                probs = np.maximum(probs, 0.02)
                cfg["class-probs"] = ",".join(f"{p / probs.sum():.4f}" for p in probs)
            sites.append(cfg)
        return sites, TARGET_CLASSES
    return _partitioned_sites(args, out_dir, cache)


def _partitioned_sites(args, out_dir: Path, cache: Path):
    from moma_core.data.datasets import load_dataset

    ds = load_dataset(args.data, split="train")
    samples = getattr(ds, "samples", None)
    if samples is None:
        raise ValueError("partitioning needs a dataset of image files (ImageFolder or CSV); "
                         "for NPZ give each simulated site its own file")
    domains = _domains(args.data) if args.partitioner == "domain" else None
    parts = partition(ds.targets, args.sites, args.partitioner, args.alpha, args.seed, domains)
    sites = []
    for i, idx in enumerate(parts):
        manifest = out_dir / "sites" / f"site-{i}.csv"
        manifest.parent.mkdir(parents=True, exist_ok=True)
        with open(manifest, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "label"])
            for j in idx:
                path, label = samples[j]
                w.writerow([str(Path(path).resolve()), ds.classes[label]])
        sites.append({"data-path": str(manifest), "cache-dir": str(cache / f"site-{i}"),
                      "site-name": f"site-{i}", "device": "cpu"})
    return sites, tuple(ds.classes)


def _domains(path: str) -> list[str]:
    if not str(path).endswith(".csv"):
        raise ValueError("the domain partitioner needs a CSV manifest with a 'domain' column")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "domain" not in rows[0]:
        raise ValueError(f"{path}: no 'domain' column for the domain partitioner")
    return [r["domain"] for r in rows]


def simulate(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    args = settings(args)
    out_dir = (args.runs_dir / args.name).resolve()
    if args.demo and not args.resume and out_dir.exists():
        console.print(f"replacing the previous demo run {out_dir}")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    teacher = ensure_teacher(args) if args.objective != "ce" else None
    if args.student_model is None:
        from moma_core.checkpoint import read_sidecar

        args.student_model = read_sidecar(teacher)["architecture"]["model_name"]
    sites, classes = site_configs(args, out_dir)
    run = RunConfig(run_name=args.name, num_rounds=args.rounds, student_model=args.student_model,
                    classes=",".join(classes), image_size=args.image_size,
                    objective=args.objective, local_epochs=args.local_epochs,
                    batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
                    augment=args.augment, queue_size=args.queue_size,
                    aggregation=args.aggregation, fedbn=args.fedbn,
                    min_train_nodes=args.sites, min_available_nodes=args.sites,
                    seed=args.seed)
    eval_source = "synthetic:target" if args.data is None else ""
    (out_dir / "sites.json").write_text(json.dumps(sites, indent=2))
    os.environ["MOMA_SIM_SITES"] = str(out_dir / "sites.json")
    console.print(f"simulating {args.sites} sites × {args.rounds} rounds of {args.objective} "
                  f"({args.student_model}, {args.aggregation}) → {out_dir}")
    final = run_simulated(run, out_dir.parent, teacher, eval_source, args.resume, args.sites)
    if args.demo and not args.no_local_baseline and args.data is None:
        console.print("local-only baseline: each site alone, same objective and budget …")
        section = local_only_section(run, sites, teacher, eval_source, out_dir)
        results = RunResults(out_dir)
        results.data = json.loads(results.path.read_text())
        results.write_report([section])
    console.print(f"done in {time.perf_counter() - started:.0f} s: "
                  f"{out_dir}/results.json, report.md, curves.png")
    return final


def run_simulated(run: RunConfig, runs_dir: Path, teacher: Path | None, eval_source: str,
                  resume: bool, num_sites: int, client_app=None) -> dict:
    """Run :func:`run_federation` as a ServerApp in Flower's simulation engine.

    ``client_app`` defaults to the product's ClientApp (tests wrap it to observe messages).
    """
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from client.client_app import app as default_client_app
    from server.server_app import run_federation

    client_app = client_app or default_client_app

    final: dict = {}
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        final.update(run_federation(grid, run, runs_dir / run.run_name,
                                    teacher_path=str(teacher or ""), eval_source=eval_source,
                                    resume=resume, eval_sites=num_sites))

    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
               "init_args": {"num_cpus": max(os.cpu_count() or 1, 1), "log_to_driver": True}}
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=num_sites,
                   backend_config=backend)
    if not final:
        raise RuntimeError("the simulated federation did not finish; see the log above")
    return final


def _quiet_engine_logs() -> None:
    """Show the engines' messages once and only those that matter to a user.

    Flower logs through its own console handler (INFO and up): its records no longer also reach
    the root handler (DEBUG lines, warnings twice). Dropped: the notice that ``run_simulation``
    is deprecated in favour of ``flwr run`` (the in-process engine is used on purpose, so that a
    failing ServerApp fails this command; see docs/federation.md) and Ray's tip on GPU
    visibility (simulated sites train on the CPU).
    """
    flwr_log = logging.getLogger("flwr")
    flwr_log.propagate = False
    flwr_log.addFilter(lambda r: "`run_simulation` function is deprecated" not in r.getMessage())
    warnings.filterwarnings("ignore", message="Tip: In future versions of Ray",
                            category=FutureWarning)


@run_cli
def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("moma").setLevel(logging.INFO)
    _quiet_engine_logs()
    try:
        simulate(parser().parse_args())
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
