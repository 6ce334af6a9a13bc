"""Local-only baseline: each simulated site trains alone with the same objective and budget.

The same settings, rounds and loop (:func:`moma_core.train.train_local`, a round's
:meth:`RunConfig.train_config`) as the federation, on the site's own student, never averaged;
the objective (momentum teacher, heads, queue) carries over between rounds as a site's state
does. Then every site's model is scored on the coordinator's held-out set, for the report.
Only the simulation's synthetic sites are used (their node configs are the simulation's own).
"""

from __future__ import annotations

import json
from pathlib import Path

from moma_core.checkpoint import load_model
from moma_core.evaluate import evaluate
from moma_core.models import Architecture, build_model
from moma_core.objectives import build_objective, same_task, training_set
from moma_core.report import markdown_table, write_json
from moma_core.sources import make_loader, open_site_data
from moma_core.train import train_local
from moma_protocol.settings import RunConfig
from server.server_app import initial_student, server_eval_set
from server.teacher_package import package_teacher


def local_only(run: RunConfig, sites: list[dict], teacher: Path | None) -> list[dict]:
    """Held-out metrics of each site's locally trained student."""
    fed, tr = run.federation, run.training
    package = package_teacher(teacher) if teacher else None
    t_model = load_model(teacher)[0] if teacher else None
    arch = Architecture(fed.student_model, run.class_names, fed.image_size)
    eval_set = server_eval_set(run.coordinator.eval_source, run, len(sites))
    rows = []
    for site in sites:
        data = open_site_data(str(site["data-path"]), image_size=fed.image_size,
                              augment=tr.augment, seed=int(site.get("data-seed", 0)),
                              n=int(site.get("n", 800)), site_index=site.get("site-index"),
                              num_sites=int(site.get("num-sites", 1)),
                              class_probs=[float(p) for p in str(site["class-probs"]).split(",")]
                              if site.get("class-probs") else None)
        student = build_model(arch)
        student.load_state_dict(initial_student(run, arch, package)[0], strict=False)
        objective = build_objective(run.objective_config(), student, t_model,
                                    same_task(package.architecture.classes, data.classes)
                                    if package else None, n_data=len(data.train))
        for rnd in range(1, fed.num_rounds + 1):
            cfg = run.train_config(rnd)
            loader = make_loader(training_set(objective, data.train), tr.batch_size, train=True,
                                 seed=cfg.seed or 0)
            train_local(student, objective, loader, cfg)
        m = evaluate(student, make_loader(eval_set, 128, train=False), len(arch.classes))
        rows.append({"model": f"local-only {site.get('site-name', '?')}",
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
