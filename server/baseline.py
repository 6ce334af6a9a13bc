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

from moma_core.evaluate import evaluate
from moma_core.report import markdown_table, write_json
from moma_core.sources import make_loader
from moma_protocol.settings import RunConfig
from server.server_app import server_eval_set


def local_only(run: RunConfig, sites: list[dict], teacher: Path | None) -> list[dict]:
    """Held-out metrics of each site's student trained alone: the rounds a site trains
    (:func:`server.benchmark_arms.train_alone`, the same seeds and start), never averaged."""
    from server.benchmark_arms import open_site, train_alone

    eval_set = server_eval_set(run.coordinator.eval_source, run, len(sites))
    rows = []
    for i, site in enumerate(sites):
        name = str(site.get("site-name", f"site-{i}"))
        student = train_alone(run, open_site(site, run).train, name, teacher)[0]
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
