"""The arms of ``moma-bench accuracy``: how each one trains, and how each is scored.

Every arm of one scenario and seed is built from the same ``moma-simulate`` settings (a
:class:`~server.simulation_spec.SimulationSpec`, checked and turned into sites and run settings
by the simulation's own :func:`server.simulate.settings`, :func:`~server.simulate.site_configs` and
:func:`~server.simulate.run_config`), so all arms see the same sites, the same data, the same
run settings and the same seeds; only the objective, the aggregation and FedBN differ.

* **federated** arms run the product: the ServerApp and ClientApp in Flower's simulation
  engine (:func:`server.simulate.run_simulated`). The teacher is named in the run config of
  every arm, the CE-only baseline's included, so that the coordinator starts each one from the
  teacher's weights (:func:`server.server_app.initial_student`; ``moma-simulate`` itself gives a
  CE run no teacher, hence a random start).
* **local-only** trains each site's student alone and **centralised** one student on the pooled
  training splits of all sites: plain moma_core, :func:`moma_core.train.train_local` round by
  round with the federation's :meth:`RunConfig.train_config` (learning rate over rounds, local
  epochs), the round seeds a site derives (:func:`moma_core.seeding.derive_seed`) and the
  objective's state carried between rounds, as a site keeps it (:func:`server.baseline.train_alone`,
  also ``moma-simulate --demo``'s local-only baseline). Both start from the same
  round-1 student as the federation (``initial_student``); the SHA-256 of that start is recorded
  and is the federated runs' ``rounds[0].start_digest``.

Scoring: every held-out image is scored by the model its own site would use (the global
student; with FedBN the global student with that site's own normalisation layers; local-only:
the site's own student). Per site: accuracy, macro-F1, quadratic kappa and the confusion
matrix; pooled: the same metrics over all sites' held-out images (summed confusion matrices).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import ConcatDataset, Dataset

from client.site_config import site_settings
from moma_core import objective_registry
from moma_core.checkpoint import load_model
from moma_core.evaluate import evaluate
from moma_core.local_round import RoundSetup, local_round
from moma_core.method_config import SYNTHETIC_N
from moma_core.metrics import classification_metrics
from moma_core.objectives import ObjectiveConfig, same_task
from moma_core.seeding import derive_seed
from moma_core.sources import SYNTHETIC, SiteData, make_loader, open_site_data
from moma_protocol.settings import RunConfig
from server import simulate as sim
from server.baseline import train_alone
from server.simulation_spec import SimulationSpec

METRICS = ("accuracy", "macro_f1", "kappa")
TERMS = ("train-nce", "train-kl", "train-ce", "train-nce-shuffled", "train-retrieval")


@dataclass(frozen=True)
class Arm:
    """One way of training: federated (the product), each site alone, or all data pooled."""

    name: str
    kind: str  # "federated" | "local" | "central"
    objective: str
    aggregation: str = "fedavg"
    fedbn: bool = False
    about: str = ""
    settings: tuple[tuple[str, object], ...] = ()  # other run settings (snake_case keys)
    #: DP-SGD at every site with the noise multiplier that spends this patch-level ε over the
    #: whole run (:func:`dp_noise_for`)
    target_epsilon: float | None = None
    #: personalised: each site fine-tunes the final global student on its own training split
    #: for this many epochs (CE, a tenth of the round-1 learning rate) and keeps the result
    finetune_epochs: int = 0

    def not_applicable(self, scenario: Scenario, student_model: str) -> str | None:
        """Why this arm cannot run in ``scenario`` (None: it can)."""
        if objective_registry.declaration(self.objective).same_task_only and \
                scenario.task != "same":
            return "vanilla KD needs a teacher of the same task"  # nothing to distil otherwise
        if self.objective == "crckd" and scenario.teacher_is_other_model(student_model):
            return ("CRCKD's mean teacher is an EMA of the student: it needs a teacher of the "
                    "student's architecture")
        return None


RESIDUAL = (("moma_attention", "residual"),)
#: the authors' attention (moma-attention = reference), named so that an arm keeps it
REFERENCE = (("moma_attention", "reference"),)
#: DP-SGD of the whole student as before the sweep: GroupNorm, the run's optimiser and lr, C 1
DP_WHOLE_STUDENT = (("dp_trainable", "all"), ("dp_optimizer", "adamw"), ("dp_lr", 0.003),
                    ("dp_max_grad_norm", 1.0))
#: the personalised arms' fine-tuning rate, relative to the round-1 learning rate
FINETUNE_LR_FACTOR = 0.1
ARMS: tuple[Arm, ...] = (
    Arm("local-only", "local", "moma", settings=REFERENCE,
        about="each site alone: MoMA (reference attention) on its own training split, never "
              "averaged"),
    Arm("local-only-residual", "local", "moma", settings=RESIDUAL,
        about="each site alone: MoMA with the residual attention"),
    Arm("local-only-ce", "local", "ce", about="each site alone: cross-entropy only"),
    Arm("fedavg-ce", "federated", "ce", about="FedAvg, cross-entropy only (no distillation)"),
    Arm("fedbn-ce", "federated", "ce", fedbn=True,
        about="FedBN, cross-entropy only: FedBN's gain without MoMA's"),
    Arm("fedavg-kd", "federated", "kd",
        about="FedAvg + Hinton KD (CE + KL; same task only)"),
    Arm("fedavg-crckd", "federated", "crckd", about="FedAvg + CRCKD (Xing et al. 2021)"),
    Arm("fedavg-moma", "federated", "moma", settings=REFERENCE,
        about="FedAvg + MoMA with the authors' attention (moma-attention = reference)"),
    Arm("fedprox-moma", "federated", "moma", aggregation="fedprox", settings=REFERENCE,
        about="MoMA (reference attention) with FedProx (proximal term mu = proximal-mu at the "
              "sites)"),
    Arm("fedavg-moma-keys", "federated", "moma",
        settings=(*REFERENCE, ("queue_keys", "keys")),
        about="FedAvg + MoMA enqueuing the positive keys themselves (queue-keys = keys: the "
              "NCE term keeps its signal)"),
    Arm("fedavg-moma-residual", "federated", "moma", settings=RESIDUAL,
        about="FedAvg + MoMA with the residual attention (moma-attention = residual, the "
              "product's default)"),
    Arm("fedavg-moma-residual-ft", "federated", "moma", settings=RESIDUAL, finetune_epochs=1,
        about="personalised: FedAvg + MoMA (residual), then each site fine-tunes the final "
              "global student on its own training split for 1 epoch (CE, a tenth of the "
              "round-1 learning rate) and keeps it"),
    Arm("fedbn-moma", "federated", "moma", fedbn=True, settings=REFERENCE,
        about="MoMA (reference attention) with FedBN (normalisation layers stay at the "
              "sites)"),
    Arm("fedbn-moma-residual", "federated", "moma", fedbn=True, settings=RESIDUAL,
        about="MoMA (residual attention) with FedBN"),
    Arm("fedbnm-moma-residual", "federated", "moma", aggregation="fedavgm", fedbn=True,
        settings=RESIDUAL,
        about="MoMA (residual attention) with FedBN and server momentum (FedAvgM, beta = "
              "server-momentum, 0.9)"),
    Arm("centralised-moma", "central", "moma", settings=REFERENCE,
        about="MoMA (reference attention) on the pooled training data of all sites (no "
              "federation)"),
    Arm("centralised-moma-residual", "central", "moma", settings=RESIDUAL,
        about="MoMA (residual attention) on the pooled training data of all sites"),
    Arm("centralised-ce", "central", "ce",
        about="cross-entropy only on the pooled training data of all sites"),
    Arm("fedavg-dp-moma", "federated", "dp-moma",
        about="FedAvg + dp-moma without DP (the private arms' objective, non-private)"),
    *(Arm(f"dp-moma-eps{eps:g}", "federated", "dp-moma", target_epsilon=eps,
          settings=DP_WHOLE_STUDENT,
          about=f"FedAvg + dp-moma with DP-SGD of the whole (GroupNorm) student at every site, "
                f"patch-level ε = {eps:g} over the run (δ = 1/(10·n))")
      for eps in (8.0, 3.0, 1.0)),
    *(Arm(f"dp-head-eps{eps:g}", "federated", "ce", target_epsilon=eps,
          about=f"FedAvg, DP-SGD of the classifier on the teacher's frozen backbone (the "
                f"product's DP defaults: dp-trainable head, SGD lr 8, C 0.1) at every site, "
                f"patch-level ε = {eps:g} over the run (δ = 1/(10·n))")
      for eps in (8.0, 3.0, 1.0, 1000.0)),
)
ARM_NAMES = tuple(a.name for a in ARMS)
#: the arms whose loss has MoMA's terms (NCE, KL, CE per round in the plots)
MOMA_ARMS = tuple(a.name for a in ARMS if a.objective == "moma")


def arm(name: str) -> Arm:
    return next(a for a in ARMS if a.name == name)


@dataclass(frozen=True)
class Scenario:
    """A benchmark setting: the teacher and the data/training options of ``moma-simulate``."""

    name: str
    teacher: Path
    #: the scenario's ``moma-simulate`` settings (data, sites, training), in the order they are
    #: recorded: (:class:`~server.simulation_spec.SimulationSpec` field, value) pairs
    simulation: tuple[tuple[str, object], ...]
    eval_n: int | None = None  # synthetic: held-out images per site (None: the val split)
    task: str = ""  # "same" | "different": whether the teacher knows the sites' classes
    teacher_source: str = ""  # what the teacher is trained on when missing ("": given)
    #: the teacher's timm model ("": the student's). MoMA follows a teacher of another
    #: architecture frozen (its momentum update needs the student's architecture)
    teacher_model: str = ""

    def teacher_is_other_model(self, student_model: str) -> bool:
        """The teacher is another architecture than the student (MoMA frozen, no CRCKD)."""
        return self.teacher_model not in ("", student_model)

    def spec(self, **arm_fields: object) -> SimulationSpec:
        """The simulation of one arm: the scenario's settings and the arm's own."""
        return SimulationSpec(**dict(self.simulation), **arm_fields)  # type: ignore[arg-type]

    @property
    def sim_args(self) -> tuple[str, ...]:
        """The scenario's settings as ``moma-simulate`` options: the record in each arm's
        fingerprint and in summary.json (``simulate_options``), never parsed."""
        out: list[str] = []
        for key, value in self.simulation:
            values = value if isinstance(value, tuple | list) else (value,)
            out += [f"--{key.replace('_', '-')}", *map(str, values)]
        return tuple(out)


@dataclass
class Setup:
    """What every arm of one scenario and seed shares."""

    args: argparse.Namespace  # moma-simulate's options, checked
    run: RunConfig
    sites: list[dict]  # the simulated sites' node configs
    out_dir: Path


def setup(scenario: Scenario, arm_: Arm, seed: int, runs_dir: Path) -> Setup:
    """The arm's ``moma-simulate`` options, sites and run settings (nothing is trained)."""
    spec = scenario.spec(name=arm_.name, runs_dir=runs_dir, seed=seed,
                         objective=arm_.objective, aggregation=arm_.aggregation,
                         teacher=scenario.teacher, no_local_baseline=True,
                         fedbn=True if arm_.fedbn else None)
    args = sim.settings(sim.options(spec))
    out_dir = (args.runs_dir / args.name).resolve()
    sites, classes = sim.site_configs(args, out_dir, seed)
    if args.classes and args.site_data is None:
        classes = tuple(c.strip() for c in args.classes.split(",") if c.strip())
    run = sim.run_config(args, out_dir, classes, scenario.teacher, None)
    if args.site_data is not None:
        # moma-simulate gives --site-data runs the synthetic target task as the coordinator's
        # held-out set, which is not the sites' task; every arm is scored here instead
        run = run.with_values(eval_source="")
    if arm_.objective == "moma" and scenario.teacher_is_other_model(
            run.federation.student_model):
        run = run.with_values(teacher_update="frozen")
    if arm_.settings:
        run = run.with_values(**dict(arm_.settings))
    if arm_.target_epsilon is not None:
        run = run.with_values(dp="dp-sgd", dp_noise_multiplier=dp_noise_for(
            run, sites, arm_.target_epsilon))
    return Setup(args, run, sites, out_dir)


def dp_noise_for(run: RunConfig, sites: list[dict], target_epsilon: float) -> float:
    """The DP-SGD noise multiplier with which every site spends at most ``target_epsilon``
    over the run, by the same accounting the sites' ledgers do (sample rate 1/batches, local
    epochs × batches steps a round, δ = 1/(10·n); the site with the most steps per example
    decides)."""
    from moma_core.privacy.accounting import (
        default_delta,
        noise_for_target_epsilon,
        round_steps,
    )

    sigmas = []
    for site in sites:
        train = open_site(site, run).train
        n = len(train)
        batches = len(make_loader(train, run.training.batch_size, train=True))
        steps = run.federation.num_rounds * round_steps(run.training.local_epochs, batches,
                                                        run.training.max_steps or None)
        sigmas.append(noise_for_target_epsilon(
            target_epsilon, run.privacy.dp_delta or default_delta(n), 1.0 / batches, steps,
            run.privacy.dp_accountant))
    return max(sigmas)


# -- the arms ---------------------------------------------------------------------------------
def run_arm(arm_: Arm, scenario: Scenario, seed: int, folder: Path, log: Path) -> dict:
    """Train one arm (``folder``: this scenario and seed) and score it; returns its result."""
    start = time.time()
    runs_dir = folder / "runs"
    if arm_.kind == "federated":
        shutil.rmtree(runs_dir / arm_.name, ignore_errors=True)  # an attempt that failed
        s = setup(scenario, arm_, seed, runs_dir)
        s.out_dir.mkdir(parents=True, exist_ok=True)
        with redirected_output(log):
            out = run_federated(s)
        if arm_.finetune_epochs:
            with one_thread():
                out["models"] = personalise(out["models"], s, arm_.finetune_epochs)
    else:
        s = setup(scenario, arm_, seed, folder / "scratch")
        s.out_dir.mkdir(parents=True, exist_ok=True)
        with one_thread():
            out = run_local(s, scenario.teacher, pooled=arm_.kind == "central")
    with one_thread():
        held_out = held_out_sets(s.run, s.sites, scenario.eval_n)
        scores = score(out.pop("models"), held_out, len(s.run.class_names))
    return {"arm": arm_.name, "kind": arm_.kind, "about": arm_.about,
            "scenario": scenario.name, "seed": seed, "status": "ok",
            "objective": arm_.objective, "aggregation": arm_.aggregation, "fedbn": arm_.fedbn,
            "kl_on": _kl_on(arm_, s.run, scenario.teacher), **out, **scores,
            "run_config": s.run.to_flat(), "wall_s": time.time() - start}


def run_federated(s: Setup) -> dict:
    """The product's federation (ServerApp + ClientApp, Flower's simulation engine)."""
    (s.out_dir / "sites.json").write_text(json.dumps(s.sites, indent=2))
    sim.run_simulated(s.run, s.args.sites)
    results = json.loads((s.out_dir / "results.json").read_text())
    rounds = results["rounds"]
    last = Path(rounds[-1]["checkpoint"])
    global_model = load_model(last)[0]
    models = []
    for site in s.sites:
        model = copy.deepcopy(global_model)
        if s.run.federation.fedbn:  # the site's own normalisation layers (its private state)
            local = Path(site["cache-dir"]) / "runs" / s.run.federation.run_name / \
                "local.safetensors"
            model.load_state_dict(load_file(str(local)), strict=False)
        models.append(model)
    steps: dict[str, float] = {}
    for r in rounds:
        for v in r["sites"].values():
            steps[v["site_name"]] = steps.get(v["site_name"], 0.0) + \
                float((v.get("metrics") or {}).get("train-steps", 0.0))
    return {"models": models, "init": results.get("init"),
            "init_digest": rounds[0].get("start_digest"),
            "rounds": [{k: (r.get("train") or {}).get(k) for k in TERMS} for r in rounds],
            "round_status": [r.get("status") for r in rounds],
            "steps_per_site": steps, "run_dir": str(s.out_dir), "checkpoint": str(last),
            "privacy": results.get("privacy"),
            "dp_noise_multiplier": s.run.privacy.dp_noise_multiplier
            if s.run.privacy.dp == "dp-sgd" else None}


def personalise(models: list[nn.Module], s: Setup, epochs: int) -> list[nn.Module]:
    """Each site's own copy of the final global student, fine-tuned on the site's training
    split for ``epochs`` epochs with cross-entropy at a tenth of the round-1 learning rate (the
    model the site then uses, scored on its own held-out images). At the full round-1 rate a
    fresh AdamW's first steps undid the federation (docs/benchmarks.md, the personalised
    arm)."""
    fed = s.run.federation
    out = []
    for i, (model, site) in enumerate(zip(models, s.sites, strict=True)):
        name = str(site.get("site-name", f"site-{i}"))
        seed = derive_seed(fed.seed, name, fed.num_rounds + 1)
        first = s.run.train_config(1)
        cfg = replace(first, epochs=epochs, max_steps=None, proximal_mu=0.0, seed=seed,
                      lr=first.lr * FINETUNE_LR_FACTOR)
        setup = RoundSetup(ObjectiveConfig(kind="ce"), open_site(site, s.run).train,
                           s.run.training.batch_size)
        local_round(model, setup, cfg)
        out.append(model.eval())
    return out


def run_local(s: Setup, teacher: Path, pooled: bool) -> dict:
    """Each site alone (``pooled`` false) or one student on all sites' training data."""
    datas = [open_site(site, s.run) for site in s.sites]
    if pooled:
        groups = [("centralised", ConcatDataset([d.train for d in datas]))]
    else:
        groups = [(str(site.get("site-name", f"site-{i}")), d.train)
                  for i, (site, d) in enumerate(zip(s.sites, datas, strict=True))]
    models, steps, per_round, how, digest = [], {}, [], "", ""
    for name, train in groups:
        model, how, digest, history, n_steps = train_alone(s.run, train, name, teacher)
        models.append(model)
        steps[name] = n_steps
        per_round.append(history)
    rounds = [_weighted_terms([h[r] for h in per_round]) for r in range(len(per_round[0]))]
    if pooled:
        models = models * len(s.sites)  # one model scores every site
    return {"models": models, "init": how, "init_digest": digest, "rounds": rounds,
            "round_status": ["ok"] * len(rounds), "steps_per_site": steps}


def _weighted_terms(entries: list[dict]) -> dict:
    total = sum(e["num-examples"] for e in entries)
    return {k: (sum(e[k] * e["num-examples"] for e in entries) / total
                if all(k in e for e in entries) else None) for k in TERMS}


def _kl_on(arm_: Arm, run: RunConfig, teacher: Path) -> bool:
    if not objective_registry.needs_teacher(arm_.objective):
        return False
    from moma_core.checkpoint import read_sidecar

    classes = read_sidecar(teacher)["architecture"]["classes"]
    return same_task(classes, run.class_names)


# -- data and scoring -------------------------------------------------------------------------
def open_site(site: dict, run: RunConfig, val_fraction: float = 0.25) -> SiteData:
    """A simulated site's data, opened as the site opens it (client.site_training.site_data):
    its node config read by the site's own parser (:func:`client.site_config.site_settings`);
    ``val_fraction`` of it held out."""
    s = site_settings(site)
    return open_site_data(
        s.data_path, image_size=run.federation.image_size, augment=run.training.augment,
        seed=s.data_seed, n=s.n, site_index=s.site_index, num_sites=s.num_sites,
        class_probs=list(s.class_probs) if s.class_probs else None,
        val_fraction=val_fraction, classes=list(run.class_names) or None,
        allow_outside_paths=s.allow_outside_paths)


def held_out_sets(run: RunConfig, sites: list[dict], eval_n: int | None
                  ) -> list[tuple[str, Dataset]]:
    """Each site's held-out split: never trained on by any arm.

    A synthetic site's is drawn from its own style and class mix (``eval_n`` images; the
    training split does not depend on it); a dataset's is its validation split as the site
    holds it out.
    """
    out = []
    for i, site in enumerate(sites):
        synthetic = str(site["data-path"]).startswith(SYNTHETIC)
        frac = eval_n / int(site.get("n", SYNTHETIC_N)) if synthetic and eval_n else 0.25
        out.append((str(site.get("site-name", f"site-{i}")), open_site(site, run, frac).val))
    return out


def score(models: list[nn.Module], held_out: list[tuple[str, Dataset]], num_classes: int
          ) -> dict:
    """Per-site and pooled metrics; ``models[i]`` scores site ``i``'s held-out images."""
    sites = {}
    for model, (name, data) in zip(models, held_out, strict=True):
        m = evaluate(model, make_loader(data, 128, train=False), num_classes)
        sites[name] = {k: m[k] for k in (*METRICS, "num_examples", "confusion")}
    total = [[sum(s["confusion"][i][j] for s in sites.values()) for j in range(num_classes)]
             for i in range(num_classes)]
    return {"sites": sites, "pooled": metrics_from_confusion(total)}


def metrics_from_confusion(confusion: list[list[int]]) -> dict:
    """Accuracy, macro-F1, quadratic kappa (and n) of a confusion matrix (rows: true class)."""
    targets, preds = [], []
    for t, row in enumerate(confusion):
        for p, count in enumerate(row):
            targets += [t] * int(count)
            preds += [p] * int(count)
    m = classification_metrics(torch.tensor(preds), torch.tensor(targets), len(confusion))
    return {**{k: m[k] for k in METRICS}, "num_examples": len(targets)}


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Train and score on one CPU thread, as each simulated site does (Ray gives it one CPU).

    Also much faster on a busy machine than torch's default of one thread per core.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def redirected_output(path: Path) -> Iterator[None]:
    """Send this process's stdout and stderr (the engines' logs, Ray's workers') to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "ab") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])
