"""``moma-bench accuracy``: local-only, federated and centralised training compared, same budget.

Arms (:mod:`moma_bench.arms`): local-only per site · FedAvg CE-only · FedAvg + KD ·
FedAvg + CRCKD · FedAvg + MoMA · MoMA with FedProx · MoMA with FedBN · centralised MoMA on the
pooled data of all sites — with the same seeds, the same sites and data, the same round-1
student (the teacher's weights where the architectures match) and the same local epochs per
round. Scenarios: the synthetic benchmark (each site its own stain style, Dirichlet label
skew) with a teacher of the *same* task (synthetic target classes: KL on) and of a *different*
task (synthetic source task: KL off, MoMA's main use case), for each ``--sites`` count; or a
user's data (``--site-data A B …``, or ``--data D --partitioner … --sites N``).

Output (``--out``, default ``runs/bench-accuracy/``): ``teachers/`` (trained once, reused),
``<scenario>/seed-<s>/<arm>.json`` (each arm's result, written as soon as it finishes; a rerun
skips the arms that have one, ``--force`` redoes them), the federated runs' folders and logs
under ``<scenario>/seed-<s>/runs/``, ``summary.md``, ``summary.json`` and ``plots/``.
How to read them: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shlex
import statistics
import sys
import time
from dataclasses import replace
from datetime import date
from pathlib import Path

from moma_bench.arms import (
    ARM_NAMES,
    METRICS,
    MOMA_ARMS,
    TERMS,
    Scenario,
    arm,
    one_thread,
    redirected_output,
    run_arm,
    setup,
)
from moma_core.cli.common import run_cli
from moma_core.data.synthetic import TASKS
from moma_core.method_config import OPTIMIZERS
from moma_core.partition import PARTITIONERS
from moma_core.report import markdown_table, plot_curves, write_json
from moma_protocol.settings import AUGMENTS, ConfigError

#: ``--quick``: a few minutes per scenario on a CPU (one seed allowed).
QUICK = {"sites": [3], "seeds": [0], "rounds": 3, "local_epochs": 1, "n": 200,
         "image_size": 32, "eval_n": 120, "queue_size": 256, "teacher_n": 1200,
         "teacher_epochs": 10}
#: the full benchmark (hours on a CPU): 3 and 5 sites, 3 seeds.
FULL = {"sites": [3, 5], "seeds": [0, 1, 2], "rounds": 10, "local_epochs": 1, "n": 400,
        "image_size": 48, "eval_n": 200, "queue_size": 1024, "teacher_n": 4000,
        "teacher_epochs": 15}
#: settings shared by both presets (the demo's CPU settings)
COMMON = {"model": "test_efficientnet", "batch_size": 32, "lr": 0.003, "optimizer": "adamw",
          "augment": "flip", "label_skew": 0.5, "tasks": ["same", "different"]}
TASK_SOURCE = {"same": "synthetic:target", "different": "synthetic:source"}
MIN_SEEDS = 3


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line and exit code 2 (through ``run_cli``)."""

    def error(self, message: str):  # type: ignore[override]
        raise ConfigError(f"{self.prog}: {message}")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="moma-bench", description="MoMA-FL benchmarks")
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("accuracy", help=__doc__.splitlines()[0],
                       description=__doc__.splitlines()[0])
    a.add_argument("--out", type=Path, default=Path("runs/bench-accuracy"))
    a.add_argument("--quick", action="store_true",
                   help="small CPU preset (3 sites, 3 rounds, 32 px, 1 seed allowed)")
    a.add_argument("--arms", nargs="+", default=None, metavar="ARM",
                   help=f"arms to run (default all): {' '.join(ARM_NAMES)}")
    a.add_argument("--seeds", nargs="+", type=int, default=None,
                   help=f"run seeds (at least {MIN_SEEDS}, one with --quick; default 0 1 2)")
    a.add_argument("--force", action="store_true", help="redo arms whose results exist")
    g = a.add_argument_group("synthetic scenarios")
    g.add_argument("--tasks", nargs="+", default=None, metavar="TASK",
                   help="same (teacher on the target classes: KL on) and/or different "
                        "(teacher on the source task: KL off)")
    g.add_argument("--sites", nargs="+", type=int, default=None,
                   help="site counts (default 3 5; --quick 3); with --data: one count")
    g.add_argument("--label-skew", type=float, default=None,
                   help=f"Dirichlet alpha of each site's class mix (default "
                        f"{COMMON['label_skew']}; 0: balanced)")
    g.add_argument("--n", type=int, default=None, help="training images per site")
    g.add_argument("--eval-n", type=int, default=None, help="held-out images per site")
    g.add_argument("--teacher-n", type=int, default=None, help="teacher training images")
    g.add_argument("--teacher-epochs", type=int, default=None)
    g.add_argument("--teacher-model", default=None,
                   help="timm model of the trained teachers (default: --model's). A larger "
                        "teacher than the student is the distillation setting; the student "
                        "then starts from random weights in every arm")
    u = a.add_argument_group("your data")
    u.add_argument("--site-data", nargs="+", default=None, metavar="PATH",
                   help="one dataset per site (ImageFolder folder, CSV or NPZ)")
    u.add_argument("--data", default=None, help="one dataset split among --sites sites")
    u.add_argument("--partitioner", default="iid", help=f"one of {', '.join(PARTITIONERS)}")
    u.add_argument("--alpha", type=float, default=0.5, help="Dirichlet alpha (partitioner)")
    u.add_argument("--classes", default=None, help="comma-separated class names")
    u.add_argument("--teacher", type=Path, default=None,
                   help="teacher .safetensors (default: one trained on the synthetic source "
                        "task, a different task)")
    t = a.add_argument_group("training (every arm)")
    t.add_argument("--rounds", type=int, default=None)
    t.add_argument("--local-epochs", type=int, default=None)
    t.add_argument("--image-size", type=int, default=None, help="default: the preset's, or "
                   "--teacher's")
    t.add_argument("--model", default=None,
                   help="student (and trained teachers') timm model; default "
                        f"{COMMON['model']}, or --teacher's")
    t.add_argument("--batch-size", type=int, default=None)
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--optimizer", default=None)
    t.add_argument("--augment", default=None)
    t.add_argument("--queue-size", type=int, default=None)
    return p


# -- options ----------------------------------------------------------------------------------
def check_options(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the preset's values and refuse what cannot work (:class:`ConfigError`)."""
    preset = {**COMMON, **(QUICK if args.quick else FULL)}
    if args.teacher is not None and args.teacher_model is not None:
        raise ConfigError("--teacher-model is for teachers the benchmark trains, not --teacher")
    user = args.site_data is not None or args.data is not None
    if user:
        for opt in ("tasks", "label_skew", "n", "eval_n"):
            if getattr(args, opt) is not None:
                raise ConfigError(f"--{opt.replace('_', '-')} is for the synthetic scenarios, "
                                  "not --site-data/--data")
        if args.site_data is not None and args.sites is not None:
            raise ConfigError("--site-data: leave --sites out (one site per dataset)")
        if args.site_data is not None:
            args.sites = [len(args.site_data)]
        elif args.sites is None:
            args.sites = [3]
        if args.teacher is not None:  # the student is the teacher's model unless told
            if not args.teacher.is_file():
                raise ConfigError(f"--teacher {args.teacher}: no such file")
            from moma_core.checkpoint import read_sidecar

            t_arch = read_sidecar(args.teacher)["architecture"]
            args.model = args.model or t_arch["model_name"]
            args.teacher_model = t_arch["model_name"]
            args.image_size = args.image_size or int(t_arch.get("image_size", 64))
    elif args.teacher is not None:
        raise ConfigError("--teacher is for --site-data/--data: the synthetic scenarios train "
                          "their own teachers")
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.teacher_model = args.teacher_model or args.model
    for opt in ("model", "teacher_model"):
        check_model_name(f"--{opt.replace('_', '-')}", getattr(args, opt), args.image_size)
    unknown = [a for a in (args.arms or []) if a not in ARM_NAMES]
    if unknown:
        raise ConfigError(f"unknown arm {unknown[0]!r}; choose from {', '.join(ARM_NAMES)}")
    args.arms = [a for a in ARM_NAMES if args.arms is None or a in args.arms]
    if len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
        raise ConfigError(f"--seeds {' '.join(map(str, args.seeds))}: give distinct seeds >= 0")
    if len(args.seeds) < MIN_SEEDS and not args.quick:
        raise ConfigError(f"--seeds: give at least {MIN_SEEDS} seeds for mean ± std "
                          "(e.g. --seeds 0 1 2), or use --quick")
    bad_task = [t for t in args.tasks if t not in TASK_SOURCE]
    if bad_task:
        raise ConfigError(f"unknown task {bad_task[0]!r}; choose same and/or different")
    for opt in ("rounds", "local_epochs", "n", "eval_n", "teacher_n", "teacher_epochs"):
        if getattr(args, opt) is not None and getattr(args, opt) < 1:
            raise ConfigError(f"--{opt.replace('_', '-')} {getattr(args, opt)}: give at least 1")
    if min(args.sites) < 2:
        raise ConfigError(f"--sites {min(args.sites)}: a federation needs at least 2 sites")
    if args.site_data is not None and args.data is not None:
        raise ConfigError("--site-data and --data exclude each other")
    if args.site_data is not None and len(args.site_data) < 2:
        raise ConfigError("--site-data: give one dataset per site, at least 2")
    for path in (args.site_data or []) + ([args.data] if args.data else []):
        if not Path(path).exists():
            raise ConfigError(f"site data {path}: no such file or directory")
    if args.data is not None and len(args.sites) != 1:
        raise ConfigError("--data: give one --sites count")
    for opt, allowed in (("optimizer", OPTIMIZERS), ("augment", AUGMENTS)):
        if getattr(args, opt) not in allowed:
            raise ConfigError(f"--{opt} {getattr(args, opt)!r}: choose one of "
                              f"{', '.join(allowed)}")
    if args.partitioner not in PARTITIONERS:
        raise ConfigError(f"--partitioner {args.partitioner!r}: choose one of "
                          f"{', '.join(PARTITIONERS)}")
    if args.out.exists() and not args.out.is_dir():
        raise ConfigError(f"--out {args.out}: not a folder")
    return args


def scenarios(args: argparse.Namespace) -> list[Scenario]:
    """The scenarios to run, each with its teacher's path (trained later if missing)."""
    train = (("rounds", args.rounds), ("local_epochs", args.local_epochs),
             ("image_size", args.image_size), ("student_model", args.model),
             ("batch_size", args.batch_size), ("lr", args.lr), ("optimizer", args.optimizer),
             ("augment", args.augment), ("queue_size", args.queue_size))
    if args.site_data is not None or args.data is not None:
        data: tuple[tuple[str, object], ...]
        if args.site_data is not None:
            data = (("site_data", tuple(args.site_data)),)
            name = f"site-data-{len(args.site_data)}sites"
        else:
            data = (("data", args.data), ("partitioner", args.partitioner),
                    ("alpha", args.alpha), ("sites", args.sites[0]))
            name = f"data-{args.partitioner}-{args.sites[0]}sites"
        data += (("classes", args.classes),) if args.classes else ()
        teacher = args.teacher or teacher_path(args, "different")
        return [Scenario(name, teacher, data + train,
                         teacher_source="" if args.teacher else TASK_SOURCE["different"],
                         teacher_model=args.teacher_model)]
    return [Scenario(f"{task}-task-{k}sites", teacher_path(args, task),
                     (("sites", k), ("n", args.n), ("label_skew", args.label_skew), *train),
                     args.eval_n, task, TASK_SOURCE[task], args.teacher_model)
            for task in args.tasks for k in args.sites]


def check_model_name(option: str, name: str, image_size: int) -> None:
    """A timm model this machine can build (no weights are downloaded) for these images."""
    import timm

    from moma_core.models import check_input_size

    if not timm.is_model(name):
        raise ConfigError(f"{option} {name!r}: not a timm model name (see timm.list_models())")
    try:
        check_input_size(name, image_size)
    except ValueError as exc:
        raise ConfigError(f"{option}/--image-size: {exc}") from None


def teacher_path(args: argparse.Namespace, task: str) -> Path:
    return args.out / "teachers" / (f"{task}-task-{args.teacher_model}-{args.image_size}px-"
                                    f"n{args.teacher_n}-e{args.teacher_epochs}.safetensors")


def teacher_classes(sc: Scenario) -> tuple[str, ...]:
    """A teacher's classes: its sidecar's, or those it will be trained on."""
    if sc.teacher.is_file():
        from moma_core.checkpoint import read_sidecar

        return tuple(read_sidecar(sc.teacher)["architecture"]["classes"])
    return TASKS[sc.teacher_source.removeprefix("synthetic:")]


def check_scenario(sc: Scenario, args: argparse.Namespace) -> Scenario:
    """Validate the scenario's settings as ``moma-simulate`` does; fill in its task."""
    import tempfile

    from moma_core.objectives import same_task

    with tempfile.TemporaryDirectory() as tmp:
        s = setup(sc, arm("fedavg-moma"), args.seeds[0], Path(tmp))
    same = same_task(teacher_classes(sc), s.run.class_names)
    return replace(sc, task="same" if same else "different")


def ensure_teacher(args: argparse.Namespace, sc: Scenario) -> None:
    """Train the scenario's teacher with ``moma-teacher``'s code unless it exists."""
    if sc.teacher.is_file():
        return
    from moma_core.cli.teacher import parser as teacher_parser
    from moma_core.cli.teacher import train_teacher

    source = sc.teacher_source
    targs = teacher_parser().parse_args([])
    vars(targs).update(model=args.teacher_model, out=sc.teacher, n=args.teacher_n,
                       epochs=args.teacher_epochs, image_size=args.image_size, lr=0.003,
                       optimizer="adamw", augment="flip", batch_size=32, seed=0, device="cpu",
                       source=source, test_n=200)
    start = time.time()
    say(f"teacher for {sc.name}: training {args.teacher_model} on {source} …", end="")
    with redirected_output(sc.teacher.with_suffix(".log")), one_thread():
        _, history = train_teacher(targs)
    test = history[-1].get("test") or {}
    say(f" done in {time.time() - start:.0f} s (test accuracy "
        f"{test.get('accuracy', float('nan')):.3f})")


def fingerprint(args: argparse.Namespace, sc: Scenario, arm_name: str, seed: int) -> str:
    """What an arm's result depends on: a rerun with other settings must not reuse it."""
    teacher = str(sc.teacher)
    if args.teacher is not None:
        from moma_core.checkpoint import sha256_file

        teacher += sha256_file(args.teacher)
    text = json.dumps([sc.sim_args, sc.eval_n, teacher, arm_name, seed])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# -- running ----------------------------------------------------------------------------------
def say(text: str, end: str = "\n") -> None:
    print(text, end=end, flush=True)


def accuracy(args: argparse.Namespace, command: str) -> int:
    """Run every planned arm not done yet, then write the summary; 1 if an arm failed."""
    started = time.time()
    args = check_options(args)
    plan_scenarios = [check_scenario(sc, args) for sc in scenarios(args)]
    plan = [(sc, seed, a) for sc in plan_scenarios for seed in args.seeds for a in args.arms]
    for sc, seed, a in plan:  # refuse stale results before anything is trained
        path = result_path(args.out, sc, seed, a)
        if path.is_file() and not args.force:
            old = json.loads(path.read_text()).get("fingerprint")
            if old != fingerprint(args, sc, a, seed):
                raise ConfigError(f"{path} was made with other settings: use --force to redo "
                                  "it, or another --out")
    say(f"moma-bench accuracy: {len(plan_scenarios)} scenario(s) × {len(args.seeds)} seed(s) "
        f"× {len(args.arms)} arm(s) → {args.out}")
    failed = []
    for i, (sc, seed, a) in enumerate(plan, 1):
        path = result_path(args.out, sc, seed, a)
        head = f"[{i}/{len(plan)}] {sc.name} seed {seed} {a}"
        if path.is_file() and not args.force:
            say(f"{head}: done earlier, kept")
            continue
        spec = arm(a)
        why_not = spec.not_applicable(sc, args.model)
        if why_not:
            write_json(path, {"arm": a, "scenario": sc.name, "seed": seed, "status": "n/a",
                              "reason": why_not, "fingerprint": fingerprint(args, sc, a, seed)})
            say(f"{head}: n/a ({why_not})")
            continue
        ensure_teacher(args, sc)
        say(f"{head} (at {_clock(time.time() - started)}) …", end="")
        t0 = time.time()
        log = path.parent / "runs" / f"{a}.log"
        try:
            result = run_arm(spec, sc, seed, path.parent, log)
        except Exception as exc:  # recorded, the other arms go on
            failed.append(f"{sc.name} seed {seed} {a}: {exc}")
            say(f" FAILED after {time.time() - t0:.0f} s: {exc} (log: {log})")
            continue
        result["fingerprint"] = fingerprint(args, sc, a, seed)
        write_json(path, result)
        say(f" {time.time() - t0:.0f} s, pooled accuracy {result['pooled']['accuracy']:.3f}")
    summary = summarise(args, plan_scenarios, command)
    write_summary(args.out, summary)
    say(f"summary: {args.out / 'summary.md'} (total {_clock(time.time() - started)})")
    if failed:
        print(f"{len(failed)} arm(s) failed (rerun to retry them):", file=sys.stderr)
        for line in failed:
            print(f"  {line}", file=sys.stderr)
        return 1
    return 0


def result_path(out: Path, sc: Scenario, seed: int, arm_name: str) -> Path:
    return out / sc.name / f"seed-{seed}" / f"{arm_name}.json"


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s"


# -- summary ----------------------------------------------------------------------------------
def mean_std(values: list[float]) -> dict:
    """Mean and sample standard deviation (n − 1; None for one value) of per-seed values."""
    return {"mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else None,
            "values": list(values)}


def aggregate(results: list[dict]) -> dict:
    """One arm of one scenario over seeds: pooled and site-mean metrics, per site, per round.

    ``site_mean`` is, for each seed, the unweighted mean over sites of each site's metric.
    """
    ok = sorted((r for r in results if r.get("status") == "ok"), key=lambda r: r["seed"])
    if not ok:
        reason = next((r.get("reason") for r in results if r.get("reason")), "no result")
        return {"status": "n/a", "reason": reason, "seeds": []}
    out: dict = {"status": "ok", "seeds": [r["seed"] for r in ok],
                 "kl_on": ok[0].get("kl_on"), "init": ok[0].get("init"),
                 "init_digests": [r.get("init_digest") for r in ok],
                 "steps_per_site": ok[0].get("steps_per_site")}
    out["pooled"] = {m: mean_std([r["pooled"][m] for r in ok]) for m in METRICS}
    out["site_mean"] = {m: mean_std([statistics.fmean(s[m] for s in r["sites"].values())
                                     for r in ok]) for m in METRICS}
    out["sites"] = {name: {m: mean_std([r["sites"][name][m] for r in ok]) for m in METRICS}
                    for name in ok[0]["sites"]}
    n_rounds = min(len(r.get("rounds", [])) for r in ok)
    out["rounds"] = {}
    for term in TERMS:
        series = []
        for i in range(n_rounds):
            vals = [r["rounds"][i].get(term) for r in ok]
            series.append(statistics.fmean(vals) if all(v is not None for v in vals) else None)
        out["rounds"][term] = series
    return out


def fmt(stat: dict | None) -> str:
    """``0.812 ± 0.013`` (``0.812`` for a single seed)."""
    if not stat:
        return "–"
    if stat["std"] is None:
        return f"{stat['mean']:.3f}"
    return f"{stat['mean']:.3f} ± {stat['std']:.3f}"


COLUMNS = ["arm", "seeds", "pooled accuracy", "pooled macro-F1", "pooled kappa",
           "site-mean accuracy", "site-mean macro-F1", "site-mean kappa", "KL", "local steps"]


def table_rows(arms: dict[str, dict]) -> list[dict]:
    rows = []
    for name, agg in arms.items():
        if agg["status"] != "ok":
            rows.append({"arm": name, "seeds": "–", "KL": f"n/a: {agg['reason']}"})
            continue
        row = {"arm": name, "seeds": len(agg["seeds"]), "KL": "on" if agg["kl_on"] else "off",
               "local steps": _steps(agg.get("steps_per_site") or {})}
        for m, label in zip(METRICS, ("accuracy", "macro-F1", "kappa"), strict=True):
            row[f"pooled {label}"] = fmt(agg["pooled"][m])
            row[f"site-mean {label}"] = fmt(agg["site_mean"][m])
        rows.append(row)
    return rows


def _steps(per_site: dict[str, float]) -> str:
    """``12 per site`` (their mean), or ``36 pooled`` for the centralised arm."""
    if list(per_site) == ["centralised"]:
        return f"{per_site['centralised']:.0f} pooled"
    return f"{statistics.fmean(per_site.values()):.0f} per site" if per_site else "–"


#: two-sided 95 % quantiles of Student's t by degrees of freedom (paired intervals over seeds)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262, 10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


def paired(a: dict, b: dict, metric: str) -> dict | None:
    """``a − b`` in ``metric`` (pooled) over the seeds both arms ran: mean, per-seed values and
    the 95 % t-interval of the mean paired difference (None for one seed)."""
    if a.get("status") != "ok" or b.get("status") != "ok":
        return None
    va = dict(zip(a["seeds"], a["pooled"][metric]["values"], strict=True))
    vb = dict(zip(b["seeds"], b["pooled"][metric]["values"], strict=True))
    seeds = sorted(set(va) & set(vb))
    if not seeds:
        return None
    diffs = [va[s] - vb[s] for s in seeds]
    mean = statistics.fmean(diffs)
    half = None
    if len(diffs) > 1:
        df = len(diffs) - 1
        t = T975[max(k for k in T975 if k <= df)]
        half = t * statistics.stdev(diffs) / len(diffs) ** 0.5
    return {"mean": mean, "values": diffs, "seeds": seeds,
            "ci95": [mean - half, mean + half] if half is not None else None}


def _best(arms: dict[str, dict], names: list[str]) -> str | None:
    done = [n for n in names if arms.get(n, {}).get("status") == "ok"]
    return max(done, key=lambda n: arms[n]["pooled"]["accuracy"]["mean"]) if done else None


def comparisons(arms: dict[str, dict]) -> list[dict]:
    """The goals' comparisons, paired over seeds: the best federated MoMA arm against the best
    local-only arm and FedAvg CE-only (P7), and the best federated arm against centralised
    training with its objective (P6)."""
    federated = [n for n in arms if arm(n).kind == "federated"]
    moma = _best(arms, [n for n in federated if arm(n).objective == "moma"])
    best = _best(arms, federated)
    pairs = []
    if moma:
        for other in (_best(arms, [n for n in arms if arm(n).kind == "local"]),
                      "fedavg-ce" if "fedavg-ce" in arms else None):
            if other:
                pairs.append(("P7", moma, other))
    if best:
        a = arm(best)
        same = [n for n in arms if arm(n).kind == "central" and arm(n).objective == a.objective
                and arm(n).settings == a.settings]
        central = _best(arms, same) or _best(arms, [n for n in arms
                                                    if arm(n).kind == "central"])
        if central:
            pairs.append(("P6", best, central))
    out = []
    for goal, a, b in pairs:
        out.append({"goal": goal, "arm": a, "against": b,
                    **{m: paired(arms[a], arms[b], m) for m in ("accuracy", "macro_f1")}})
    return [c for c in out if c["accuracy"] is not None]


def _diff(d: dict | None) -> str:
    if d is None:
        return "–"
    ci = f" [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]" if d["ci95"] else ""
    return f"{d['mean']:+.3f}{ci}"


def gains(arms: dict[str, dict]) -> list[str]:
    """The paired comparisons as Markdown lines (difference of pooled metrics, 95 % interval
    over seeds)."""
    lines = []
    for c in comparisons(arms):
        lines.append(f"- {c['goal']}: {c['arm']} − {c['against']}: pooled accuracy "
                     f"{_diff(c['accuracy'])}, macro-F1 {_diff(c['macro_f1'])} (paired over "
                     f"seeds {', '.join(map(str, c['accuracy']['seeds']))}; 95 % t-interval)")
    return lines


def summarise(args: argparse.Namespace, plan_scenarios: list[Scenario], command: str) -> dict:
    """summary.json's object, from the arm results on disk."""
    out: dict = {"schema_version": 1, "date": date.today().isoformat(), "command": command,
                 "settings": {k: (str(v) if isinstance(v, Path) else v)
                              for k, v in vars(args).items() if k != "command"},
                 "scenarios": {}}
    for sc in plan_scenarios:
        arms = {}
        for a in args.arms:
            results = [json.loads(p.read_text()) for p in
                       (result_path(args.out, sc, s, a) for s in args.seeds) if p.is_file()]
            arms[a] = aggregate(results)
        starts = {}
        for agg in arms.values():
            for seed, digest in zip(agg["seeds"], agg.get("init_digests", []), strict=True):
                starts.setdefault(seed, set()).add(digest)
        out["scenarios"][sc.name] = {
            "task": sc.task, "teacher": str(sc.teacher), "teacher_model": sc.teacher_model,
            "student_model": args.model, "simulate_options": list(sc.sim_args),
            "same_start": all(len(d) == 1 for d in starts.values()) if starts else None,
            "arms": arms, "comparisons": comparisons(arms)}
    return out


def write_summary(out: Path, summary: dict) -> None:
    """summary.json, summary.md and the plots."""
    write_json(out / "summary.json", summary)
    lines = ["# moma-bench accuracy", "", f"{summary['date']} · `{summary['command']}`", ""]
    for name, sc in summary["scenarios"].items():
        lines += [f"## {name}", "", f"Teacher: {sc['task']} task (`{sc['teacher']}`); "
                  f"{_models(sc['teacher_model'], sc['student_model'])}"
                  "Mean ± sample std over seeds; pooled: all sites' held-out images, each "
                  "scored by its own site's model; site-mean: mean over sites.", "",
                  markdown_table(table_rows(sc["arms"]), COLUMNS), ""]
        if sc["same_start"] is not None:
            lines.append("Every arm started from the same round-1 student (SHA-256 per seed): "
                         f"{'yes' if sc['same_start'] else 'NO'}.")
        lines += ["", *gains(sc["arms"]), ""]
        for kind, path in plots(out, name, sc["arms"]).items():
            lines.append(f"![{kind}]({path.relative_to(out)})")
        lines.append("")
    (out / "summary.md").write_text("\n".join(lines))


def _models(teacher: str, student: str) -> str:
    """Which models the scenario distils (the teacher's is "" when it is the student's)."""
    if teacher in ("", student):
        return f"teacher and student {student}. "
    return f"teacher {teacher}, student {student} (MoMA's teacher frozen: another architecture). "


def plots(out: Path, name: str, arms: dict[str, dict]) -> dict[str, Path]:
    """Bars of the pooled metrics (error bars: std over seeds) and MoMA's terms per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = {n: a for n, a in arms.items() if a["status"] == "ok"}
    paths: dict[str, Path] = {}
    if not done:
        return paths
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(done)), 3.8))
    width = 0.8 / len(METRICS)
    for j, m in enumerate(METRICS):
        xs = [i + (j - 1) * width for i in range(len(done))]
        stds = [a["pooled"][m]["std"] for a in done.values()]
        ax.bar(xs, [a["pooled"][m]["mean"] for a in done.values()], width, label=m,
               yerr=None if all(v is None for v in stds) else [v or 0.0 for v in stds],
               capsize=3)
    ax.set_xticks(range(len(done)), list(done), rotation=30, ha="right")
    ax.set_ylabel("pooled held-out")
    ax.set_title(name)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    paths["bars"] = out / "plots" / f"{name}-metrics.png"
    paths["bars"].parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(paths["bars"], dpi=110)
    plt.close(fig)
    moma = {n: a for n, a in done.items() if n in MOMA_ARMS}
    if moma:
        n_rounds = max(len(a["rounds"]["train-nce"]) for a in moma.values())
        panels = {t.removeprefix("train-").upper() + " (train, per round)":
                  {n: a["rounds"][t] for n, a in moma.items()} for t in TERMS}
        paths["terms"] = plot_curves(out / "plots" / f"{name}-terms.png",
                                     list(range(1, n_rounds + 1)), panels, "round",
                                     f"{name}: MoMA's loss terms")
    return paths


@run_cli
def main() -> int:
    from server.simulate import _quiet_engine_logs

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("moma").setLevel(logging.INFO)
    _quiet_engine_logs()
    args = parser().parse_args()
    return accuracy(args, shlex.join(["moma-bench", *sys.argv[1:]]))


if __name__ == "__main__":
    raise SystemExit(main())
