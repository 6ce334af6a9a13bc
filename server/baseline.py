"""Local-only baseline: each simulated site trains alone with the same objective and budget.

The same settings, rounds and round function as a site (:func:`moma_core.local_round.local_round`,
a round's :meth:`RunConfig.train_config` and seed), on the site's own student, never averaged;
the objective's state (momentum teacher, heads, queue) carries over between rounds as a site's
does. Then every site's model is scored on the coordinator's held-out set, for the report.
Only the simulation's synthetic sites are used (their node configs are the simulation's own).

:func:`train_alone` is the one local-only training: ``moma-simulate --demo``'s baseline here,
and ``moma-bench``'s local-only and centralised arms (:mod:`moma_bench.arms`). This module
imports neither :mod:`server.simulate` nor the benchmark.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from torch import nn
from torch.utils.data import Dataset

from moma_core import objective_registry
from moma_core.checkpoint import load_model
from moma_core.evaluate import evaluate
from moma_core.local_round import RoundSetup, local_rounds
from moma_core.method_config import SYNTHETIC_N
from moma_core.models import build_model
from moma_core.objectives import same_task
from moma_core.report import markdown_table, write_json
from moma_core.seeding import derive_seed
from moma_core.sources import make_loader, open_site_data
from moma_protocol.settings import ConfigError, RunConfig
from server.server_app import initial_student, server_eval_set, state_digest
from server.teacher_package import package_teacher


def check_baseline_privacy(run: RunConfig) -> None:
    """Refuse (ConfigError) a local-only baseline for a private run: it would train without
    the run's DP, and a private federation compared with a non-private baseline says nothing."""
    p = run.privacy
    if p.dp != "off" or p.client_dp != "off" or run.objective.objective == "dp-moma":
        raise ConfigError("the local-only baseline trains without DP, unlike this run (dp = "
                          f"{p.dp}, client-dp = {p.client_dp}, objective "
                          f"{run.objective.objective}): add --no-local-baseline")


def start_student(run: RunConfig, teacher: Path | None) -> tuple[nn.Module, str, str]:
    """The federation's round-1 student as a model, how it was made and its SHA-256."""
    arch = run.student_architecture()
    state, how = initial_student(run, arch, package_teacher(teacher) if teacher else None)
    model = build_model(arch)
    model.load_state_dict(state, strict=False)  # BN step counters are not in the wire state
    return model, how, state_digest(state)


def train_alone(run: RunConfig, train: Dataset, name: str, teacher: Path | None
                ) -> tuple[nn.Module, str, str, list[dict], int]:
    """The rounds a site trains (:func:`moma_core.local_round.local_rounds`, the site's own
    round function), on one training set and never averaged.

    Returns the model, how it started, the start's SHA-256, per-round loss terms and steps.
    """
    fed, tr = run.federation, run.training
    check_baseline_privacy(run)  # trained without DP: never the baseline of a private run
    student, how, digest = start_student(run, teacher)
    t_model, t_arch = (None, None)
    if objective_registry.needs_teacher(run.objective.objective):
        if teacher is None:
            raise ValueError(f"objective {run.objective.objective!r} needs a teacher")
        t_model, t_arch, _ = load_model(teacher)
    setup = RoundSetup(run.objective_config(), train, tr.batch_size, t_model,
                       same_task(t_arch.classes, run.class_names) if t_arch else None)
    rounds = [replace(run.train_config(rnd), seed=derive_seed(fed.seed, name, rnd))
              for rnd in range(1, fed.num_rounds + 1)]
    history, steps = [], 0
    for trained in local_rounds(student, setup, rounds):
        result = trained.result
        steps += int(result.metrics["steps"])
        history.append({**{f"train-{k}": v for k, v in result.metrics.items()},
                        "num-examples": result.num_examples})
    return student, how, digest, history, steps


def synthetic_train_set(site: dict, run: RunConfig) -> Dataset:
    """The training split of one of the simulation's own synthetic sites (a node config
    ``moma-simulate`` wrote), opened as the site opens it."""
    probs = site.get("class-probs")
    return open_site_data(
        str(site["data-path"]), image_size=run.federation.image_size,
        augment=run.training.augment, seed=int(site.get("data-seed", 0)),
        n=int(site.get("n", SYNTHETIC_N)), site_index=site.get("site-index"),
        num_sites=int(site.get("num-sites", 1)),
        class_probs=[float(p) for p in str(probs).split(",")] if probs else None,
        classes=list(run.class_names) or None).train


def local_only(run: RunConfig, sites: list[dict], teacher: Path | None) -> list[dict]:
    """Held-out metrics of each site's student trained alone: the rounds a site trains
    (:func:`train_alone`, the same seeds and start), never averaged."""
    eval_set = server_eval_set(run.coordinator.eval_source, run, len(sites))
    rows = []
    for i, site in enumerate(sites):
        name = str(site.get("site-name", f"site-{i}"))
        student = train_alone(run, synthetic_train_set(site, run), name, teacher)[0]
        m = evaluate(student, make_loader(eval_set, 128, train=False), len(run.class_names))
        rows.append({"model": f"local-only {name}",
                     "accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "kappa": m["kappa"]})
    return rows


def local_only_section(run: RunConfig, sites: list[dict], teacher: Path | None,
                       out_dir: Path) -> str:
    """Markdown comparing the federated student with each site's local-only student."""
    rows = local_only(run, sites, teacher)
    data = json.loads((out_dir / "results.json").read_text())
    fed = data["rounds"][-1].get("server_eval") or {}
    rows.insert(0, {"model": "federated (last round)", "accuracy": fed.get("accuracy"),
                    "macro_f1": fed.get("macro_f1"), "kappa": fed.get("kappa")})
    data["local_only"] = rows[1:]
    write_json(out_dir / "results.json", data)
    return "\n".join(["## Federation vs local-only training", "",
                      "Same objective, rounds and local epochs; scored on the coordinator's "
                      "held-out set (all site styles).", "",
                      markdown_table(rows, ["model", "accuracy", "macro_f1", "kappa"]), ""])
