"""Local-only baseline: each site trains alone with the same objective and budget.

The same site code and training loop as the federation (:func:`client.site_training.train_round`),
round after round on the site's own student, never averaged; then every site's model is scored
on the coordinator's held-out set, for the report's comparison.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from client.site_config import site_settings
from client.site_state import TeacherCache
from client.site_training import train_round
from moma_core.config import RunConfig
from moma_core.evaluate import evaluate
from moma_core.models import Architecture, build_model
from moma_core.report import markdown_table, write_json
from moma_core.sources import make_loader
from server.server_app import initial_student, server_eval_set
from server.teacher_package import package_teacher


def local_only(run: RunConfig, sites: list[dict], teacher: Path | None, eval_source: str
               ) -> list[dict]:
    """Held-out metrics of each site's locally trained student."""
    package = package_teacher(teacher) if teacher else None
    arch = Architecture(run.student_model, run.class_names, run.image_size)
    # fedbn off: a local-only site keeps its whole model, normalisation layers included
    local_run = dataclasses.replace(run, run_name=f"{run.run_name}-local-only", fedbn=False)
    eval_set = server_eval_set(eval_source, run, len(sites))
    rows = []
    for node_config in sites:
        settings = site_settings(node_config)
        if package is not None:
            TeacherCache(settings.cache_dir).store(package.data, package.sidecar,
                                                   package.sha256)
        state = initial_student(run, arch, package)
        for rnd in range(1, run.num_rounds + 1):
            state, _, _ = train_round(settings, local_run, rnd, state,
                                      package.sha256 if package else "")
        model = build_model(arch)
        model.load_state_dict(state, strict=False)
        m = evaluate(model, make_loader(eval_set, 128, train=False), len(arch.classes))
        rows.append({"model": f"local-only {settings.site_name}", "accuracy": m["accuracy"],
                     "macro_f1": m["macro_f1"], "kappa": m["kappa"]})
    return rows


def local_only_section(run: RunConfig, sites: list[dict], teacher: Path | None,
                       eval_source: str, out_dir: Path) -> str:
    """Markdown comparing the federated student with each site's local-only student."""
    rows = local_only(run, sites, teacher, eval_source)
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
