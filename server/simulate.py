"""``moma-simulate``: the whole federation on one machine through Flower's simulation engine.

The same ServerApp and ClientApp entry points as a deployment (named by the app folder's
components, as ``moma-server`` submits them) and the same run config (the app folder's
defaults plus this command's settings, validated before anything starts). N simulated sites
come from the synthetic generator (each its own stain/scanner style, optional Dirichlet label
skew) or from a user's dataset split by a partitioner. With ``--demo`` it first trains a small
teacher on the synthetic source task if none is given, and compares the federation with
local-only training of each site in the report. The simulated sites' node configs reach them
through a run-scoped spec file (``runs/<name>/sites.json``, named by the run config's
``simulation-sites``), never through the environment.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import random
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from deploy.app_bundle import COMPONENTS
from moma_core.cli.common import DefaultsHelpFormatter, run_cli
from moma_core.cli.settings_flags import SettingsParser
from moma_core.data.synthetic import TARGET_CLASSES
from moma_core.method_config import SYNTHETIC_N
from moma_core.objective_registry import needs_teacher
from moma_core.partition import PARTITIONERS, partition
from moma_core.progress import console
from moma_protocol.settings import ConfigError, RunConfig, fields_by_key, settings_fields
from server.baseline import check_baseline_privacy, local_only_section
from server.flwr_app import write_app
from server.live import RunEnded
from server.results import RunResults
from server.simulation_spec import SimulationSpec

log = logging.getLogger("moma.simulate")

#: run settings moma-simulate sets itself, from its own options (refused in --run-config)
OWNED = ("run-name", "classes", "min-train-nodes", "min-available-nodes", "output-dir",
         "teacher-path", "eval-source", "eval-sites", "resume", "site-registry",
         "simulation-sites")
#: run settings with a flag of their own (generated from the settings tree); every other one
#: not in OWNED is given with --run-config
FLAGS = ("num-rounds", "objective", "student-model", "aggregation", "fedbn", "local-epochs",
         "batch-size", "lr", "optimizer", "augment", "queue-size", "teacher-update",
         "moma-attention", "image-size", "transfer-dtype", "dp", "dp-noise-multiplier",
         "dp-max-grad-norm", "client-dp", "client-dp-noise-multiplier",
         "client-dp-clipping-norm", "secagg", "client-dp-clipping")
#: flag names that are not the setting's key
FLAG_NAMES = {"num-rounds": "--rounds"}


def parser() -> SettingsParser:
    """Options; a run setting left unset takes its default from the settings tree."""
    p = SettingsParser(prog="moma-simulate", description=__doc__.splitlines()[0],
                       known=fields_by_key(), formatter_class=DefaultsHelpFormatter)
    p.add_argument("--name", default="simulation", help="run name: results in runs/<name>/")
    p.add_argument("--runs-dir", type=Path, default=Path("runs"))
    p.add_argument("--demo", action="store_true",
                   help="small CPU settings, train the teacher if missing, local-only baseline")
    p.add_argument("--teacher", type=Path, default=None, help="teacher .safetensors")
    p.add_argument("--sites", type=int, default=None, help="number of sites (default 3)")
    g = p.add_argument_group("run settings (docs/configuration.md; --demo: a small preset "
                             "for the ones not given)")
    p.add_settings(FLAGS, group=g, names=FLAG_NAMES)
    p.add_run_config(owned=OWNED, group=g)
    p.add_argument("--n", type=int, default=None, help="synthetic: training images per site "
                                                        f"(default {SYNTHETIC_N})")
    p.add_argument("--label-skew", type=float, default=0.0,
                   help="synthetic: Dirichlet α of each site's class mix (0: balanced)")
    p.add_argument("--data", default=None, help="a user dataset to split among the sites")
    p.add_argument("--site-data", nargs="+", default=None, metavar="PATH",
                   help="one dataset per simulated site (folder, CSV or NPZ): real hospitals")
    p.add_argument("--classes", default=None,
                   help="comma-separated class names in label order (default: from the data)")
    p.add_argument("--partitioner", choices=PARTITIONERS, default="iid")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet α (partitioner)")
    p.add_argument("--resume", action="store_true", help="continue runs/<name>/")
    p.add_argument("--no-local-baseline", action="store_true")
    p.add_settings(["seed"])
    p.add_argument("--device", default="cpu",
                   help="where simulated sites train: cpu, cuda or cuda:N")
    p.add_argument("--gpus-per-site", type=float, default=None,
                   help="share of a GPU each simulated site reserves (Ray); default with "
                        "--device cuda: 1/sites of one GPU, at most 1")
    return p


#: ``--demo``: a preset for a CPU laptop (a few minutes), applied where no option was given.
DEMO = {"rounds": 5, "local_epochs": 2, "lr": 0.003, "optimizer": "adamw", "augment": "flip",
        "queue_size": 1024, "image_size": 48, "n": 240, "student_model": "test_efficientnet"}
#: option → run-config key: every run setting moma-simulate takes (a flag's, or --run-config's)
RUN_KEYS = {FLAG_NAMES.get(key, f"--{key}")[2:].replace("-", "_"): key
            for key in settings_fields() if key not in OWNED}


def settings(args: argparse.Namespace) -> argparse.Namespace:
    """Apply the demo preset and check the simulation's own options."""
    if args.demo:
        for k, v in DEMO.items():
            if getattr(args, k) is None:
                setattr(args, k, v)
    if args.n is None:
        args.n = SYNTHETIC_N
    args.sites_given = args.sites is not None
    if args.sites is None:
        args.sites = 3
    if args.sites < 1:
        raise ConfigError(f"--sites {args.sites}: simulate at least 1 site")
    if args.n < 1:
        raise ConfigError(f"--n {args.n}: give at least 1 image per site")
    if args.label_skew < 0 or args.alpha <= 0:
        raise ConfigError("--label-skew must be >= 0 and --alpha > 0")
    if args.site_data is not None:
        if args.data is not None:
            raise ConfigError("--site-data and --data exclude each other")
        if args.sites_given and args.sites != len(args.site_data):
            raise ConfigError(f"--sites {args.sites} but {len(args.site_data)} --site-data "
                              "paths: leave --sites out")
        args.sites = len(args.site_data)
        missing = [p for p in args.site_data if not Path(p).exists()]
        if missing:
            raise ConfigError(f"--site-data {missing[0]}: no such file or directory")
    check_device(args)
    return args


def run_config(args: argparse.Namespace, out_dir: Path, classes: tuple[str, ...],
               teacher: Path | None, model: str | None) -> RunConfig:
    """The run's settings: the tree's defaults, then this command's options (validated)."""
    values = {key: getattr(args, opt) for opt, key in RUN_KEYS.items()
              if getattr(args, opt) is not None}
    if model is not None:
        values["student-model"] = model
    values.update({"run-name": args.name, "classes": ",".join(classes),
                   "min-train-nodes": args.sites, "min-available-nodes": args.sites,
                   "output-dir": str(out_dir.parent), "teacher-path": str(teacher or ""),
                   "eval-source": "synthetic:target" if args.data is None and
                   args.site_data is None else "",
                   "eval-sites": args.sites, "resume": bool(args.resume),
                   "simulation-sites": str(out_dir / "sites.json")})
    return RunConfig.from_flat(values)


def ensure_teacher(args: argparse.Namespace, run: RunConfig) -> Path:
    """The given teacher, or (demo) one trained on the synthetic source task."""
    if args.teacher is not None:
        if not args.teacher.is_file():
            raise ValueError(f"teacher {args.teacher} not found")
        return args.teacher
    if not args.demo:
        raise ValueError("--teacher is required (or use --demo to train one)")
    fed = run.federation
    path = args.runs_dir / "teachers" / f"demo-{fed.student_model}-{fed.image_size}px.safetensors"
    if path.is_file():
        console.print(f"using the demo teacher {path}")
        return path
    from moma_core.cli.teacher import parser as teacher_parser
    from moma_core.cli.teacher import train_teacher

    console.print("training the demo teacher on the synthetic source task …")
    targs = teacher_parser().parse_args([])
    vars(targs).update(model=fed.student_model, out=path, n=SYNTHETIC_N, epochs=6,
                       image_size=fed.image_size, lr=0.003, optimizer="adamw", augment="flip",
                       batch_size=32, seed=fed.seed, device="cpu")
    train_teacher(targs)
    return path


def check_device(args: argparse.Namespace) -> None:
    """``--device`` and ``--gpus-per-site``: valid values, and CUDA present when asked for."""
    if args.device != "cpu" and not (args.device == "cuda" or args.device.startswith("cuda:")
                                     and args.device[5:].isdigit()):
        raise ConfigError(f"--device {args.device!r}: give cpu, cuda or cuda:N")
    if args.gpus_per_site is not None and not 0 <= args.gpus_per_site <= 1:
        raise ConfigError(f"--gpus-per-site {args.gpus_per_site}: give a share from 0 to 1")
    if args.device == "cpu":
        if args.gpus_per_site:
            raise ConfigError("--gpus-per-site needs --device cuda")
        args.gpus_per_site = 0.0
        return
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(f"--device {args.device}: no CUDA device on this machine")
    if args.gpus_per_site is None:
        args.gpus_per_site = min(1.0, 1.0 / max(args.sites, 1))


def backend_config(gpus_per_site: float = 0.0) -> dict:
    """Ray resources: one CPU per simulated site (of this process's CPUs), a GPU share each."""
    return {"client_resources": {"num_cpus": 1, "num_gpus": float(gpus_per_site)},
            "init_args": {"num_cpus": usable_cpus(), "log_to_driver": True}}


def site_configs(args: argparse.Namespace, out_dir: Path, seed: int
                 ) -> tuple[list[dict], tuple[str, ...]]:
    """Node configs of the simulated sites, and the task's classes."""
    cache = out_dir / "site-cache"
    if args.site_data is not None:
        return _site_folders(args, cache)
    if args.data is None:
        rng = np.random.default_rng(seed)
        sites = []
        for i in range(args.sites):
            cfg = {"data-path": "synthetic:target", "cache-dir": str(cache / f"site-{i}"),
                   "site-index": i, "num-sites": args.sites, "n": args.n,
                   "site-name": f"site-{i}", "device": args.device, "data-seed": seed}
            if args.label_skew > 0:
                probs = rng.dirichlet([args.label_skew] * len(TARGET_CLASSES))
                probs = np.maximum(probs, 0.02)
                cfg["class-probs"] = ",".join(f"{p / probs.sum():.4f}" for p in probs)
            sites.append(cfg)
        return sites, TARGET_CLASSES
    return _partitioned_sites(args, out_dir, cache, seed)


def _partitioned_sites(args, out_dir: Path, cache: Path, seed: int):
    from moma_core.data.datasets import load_dataset

    ds = load_dataset(args.data, split="train")
    samples = getattr(ds, "samples", None)
    if samples is None:
        raise ValueError("partitioning needs a dataset of image files (ImageFolder or CSV); "
                         "for NPZ give each simulated site its own file")
    domains = _domains(args.data) if args.partitioner == "domain" else None
    parts = partition(ds.targets, args.sites, args.partitioner, args.alpha, seed, domains)
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
                      "site-name": f"site-{i}", "device": args.device,
                      "allow-outside-paths": True})  # the manifest lists the user's files
    return sites, tuple(ds.classes)


def _site_folders(args: argparse.Namespace, cache: Path) -> tuple[list[dict], tuple[str, ...]]:
    """One simulated site per ``--site-data`` path; the classes from the sites' data check.

    Each site opens its own data, as ``moma-client --check-only`` does. Without ``--classes``
    the run's classes are the sites' class names (sorted when the sites disagree, e.g. a site
    without any image of one class); a site's labels are mapped to them by name.
    """
    from moma_core.sources import open_site_data

    names: list[str] = []
    per_site = []
    for path in args.site_data:
        data = open_site_data(str(path), image_size=32, augment="none")
        per_site.append(list(data.classes))
        name = Path(path).stem or "site"
        names.append(name if name not in names else f"{name}-{len(names)}")
    if args.classes:
        classes = tuple(c.strip() for c in args.classes.split(",") if c.strip())
        unknown = sorted({c for site in per_site for c in site} - set(classes))
        if unknown:
            raise ConfigError(f"--classes {','.join(classes)} lacks {unknown} found in the "
                              "site data")
    elif all(site == per_site[0] for site in per_site):
        classes = tuple(per_site[0])
    else:
        classes = tuple(sorted({c for site in per_site for c in site}))
    sites = [{"data-path": str(Path(p).resolve()), "cache-dir": str(cache / name),
              "site-name": name, "device": args.device} for p, name in zip(args.site_data, names,
                                                                     strict=True)]
    return sites, classes


def _domains(path: str) -> list[str]:
    if not str(path).endswith(".csv"):
        raise ValueError("the domain partitioner needs a CSV manifest with a 'domain' column")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "domain" not in rows[0]:
        raise ValueError(f"{path}: no 'domain' column for the domain partitioner")
    return [r["domain"] for r in rows]


def simulate(spec: SimulationSpec) -> dict:
    """Run the simulated federation ``spec`` asks for (then, for the demo, the local-only
    baseline); returns results.json's final."""
    started = time.perf_counter()
    args = settings(options(spec))
    out_dir = (args.runs_dir / args.name).resolve()
    # validated before anything is written or trained (classes/teacher are filled in below)
    draft = run_config(args, out_dir, TARGET_CLASSES, None, None)
    if args.student_model is not None:
        from server.teacher_package import check_student_model

        check_student_model(draft)
    if wants_local_baseline(args):
        check_baseline_privacy(draft)
    if args.demo and not args.resume and out_dir.exists():
        console.print(f"replacing the previous demo run {out_dir}")
        shutil.rmtree(out_dir)
    distils = needs_teacher(draft.objective.objective)
    # the CE baseline too starts from the teacher when one is given (it is not shipped)
    teacher = ensure_teacher(args, draft) if distils or args.teacher is not None or \
        args.demo else None
    model = None
    if teacher is not None:
        from moma_core.checkpoint import read_sidecar
        from moma_core.models import Architecture
        from server.teacher_package import check_student_fits

        t_arch = read_sidecar(teacher)["architecture"]
        if args.student_model is None:
            model = t_arch["model_name"]
        check_student_fits(run_config(args, out_dir, TARGET_CLASSES, teacher, model),
                           Architecture.from_dict(t_arch))
    out_dir.mkdir(parents=True, exist_ok=True)
    sites, classes = site_configs(args, out_dir, draft.federation.seed)
    if args.classes and args.site_data is None:  # the sites refuse a list that is not theirs
        classes = tuple(c.strip() for c in args.classes.split(",") if c.strip())
    run = run_config(args, out_dir, classes, teacher, model)
    (out_dir / "sites.json").write_text(json.dumps(sites, indent=2))
    fed = run.federation
    console.print(f"simulating {args.sites} sites × {fed.num_rounds} rounds of "
                  f"{run.objective.objective} ({fed.student_model}, {fed.aggregation}) → "
                  f"{out_dir}")
    final = run_simulated(run, args.sites, gpus_per_site=args.gpus_per_site)
    if wants_local_baseline(args):
        console.print("local-only baseline: each site alone, same objective and budget …")
        section = local_only_section(run, sites, teacher, out_dir)
        results = RunResults(out_dir)
        results.data = json.loads(results.path.read_text())
        results.write_report([section])
    console.print(f"done in {time.perf_counter() - started:.0f} s: "
                  f"{out_dir}/results.json, report.md, curves.png")
    return final


def options(spec: SimulationSpec) -> argparse.Namespace:
    """``spec`` as the parsed options the checks below take: the command line's defaults
    (:func:`parser`), then every value of the spec; the run settings it gives are also
    the ones given (``run_settings``, by key), as if by their flags."""
    args = parser().parse_args([])
    vars(args).update(spec.options())
    if isinstance(getattr(args, "run_settings", None), dict):
        args.run_settings = {**args.run_settings, **{
            key: getattr(args, opt) for opt, key in RUN_KEYS.items()
            if getattr(args, opt, None) is not None}}
    return args


def wants_local_baseline(args: argparse.Namespace) -> bool:
    """The demo's local-only baseline runs (synthetic sites, not turned off)."""
    return bool(args.demo and not args.no_local_baseline and args.data is None
                and args.site_data is None)


def run_simulated(run: RunConfig, num_sites: int, client_app=None,
                  gpus_per_site: float = 0.0) -> dict:
    """Run the product's ServerApp and ClientApp in Flower's simulation engine.

    Both sides get the run config a deployment gives them: the app folder's defaults fused
    with ``run`` (Flower's public ``run_simulation`` takes no run config, so its engine entry
    ``_run_simulation`` is called with the app folder and the run, as ``flwr run`` does for a
    local simulation: :func:`server.flwr_compat.run_simulation_engine`). ``client_app``
    defaults to the product's ClientApp, loaded by its component name (tests pass a wrapper to
    observe messages). Returns results.json's final.
    """
    from server.flwr_compat import run_simulation_engine, simulation_run

    out_dir = Path(run.coordinator.output_dir) / run.federation.run_name
    app_dir = write_app(out_dir / "flwr-app")
    overrides = run.to_flat()
    run_id = random.randrange(1, 2**63)
    flwr_run, context = simulation_run(run_id, random.randrange(1, 2**63), overrides, app_dir)
    backend = backend_config(gpus_per_site)
    start_engine(backend)
    run_simulation_engine(flwr_run, context, num_supernodes=num_sites, client_app=client_app,
                          client_app_attr=None if client_app else COMPONENTS["clientapp"],
                          server_app_attr=COMPONENTS["serverapp"], backend_config=backend,
                          app_dir=str(app_dir))
    results = out_dir / "results.json"
    final = json.loads(results.read_text()).get("final") if results.is_file() else None
    if not final:
        raise RuntimeError("the simulated federation did not finish; see the log above")
    return final


ENGINE_START_ATTEMPTS = 2


def start_engine(backend: dict, attempts: int = ENGINE_START_ATTEMPTS) -> None:
    """Start Ray here, in the calling thread, before Flower's engine would.

    Flower starts Ray in a thread of its own; when that start fails, it only logs "Simulation
    Runtime crashed" while the ServerApp goes on waiting for sites that never answer (a round
    timeout per round). Started here, a failed start is an error of this call. Flower then uses
    this instance: it starts Ray only when none is running, and shuts it down at the end.
    The arguments are Flower's (``RayBackend.init_ray``): the backend's init args, no
    dashboard, and this process's import path for the actors (through Ray's runtime
    environment only: this process's own environment is left as it is).
    """
    import ray

    if ray.is_initialized():
        return
    args = {"include_dashboard": False, **backend.get("init_args", {})}
    pythonpath = os.pathsep.join(sys.path)
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    failure: Exception | None = None
    for attempt in range(1, attempts + 1):
        try:
            ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, **args)
            return
        except Exception as exc:  # Ray raises bare Exceptions for a node that did not start
            failure = exc
            ray.shutdown()
            log.warning("the simulation engine (Ray) did not start (attempt %d of %d): %s",
                        attempt, attempts, exc)
    raise RuntimeError(
        f"the simulation engine (Ray) did not start after {attempts} attempts: {failure} "
        "Its logs are in /tmp/ray/session_latest/logs (raylet.err). On a busy machine Ray's "
        "agents can take longer to start than its raylet allows (ray-project/ray#65983): "
        "try again when the machine is less loaded.")


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, not the machine's count)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # not Linux
        return max(os.cpu_count() or 1, 1)


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
        simulate(SimulationSpec.from_args(parser().parse_args()))
    except RunEnded as exc:  # sites missing (3), no round trained (4): docs/deploy.md
        if not getattr(exc, "moma_reported", False):  # the ServerApp's own line said it
            print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
