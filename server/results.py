"""``runs/<name>/``: results.json (documented in docs/results.md), curves, report, checkpoints."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from moma_core import objective_registry
from moma_core.atomic import atomic_write
from moma_core.checkpoint import load_checkpoint, save_checkpoint, sha256_file
from moma_core.models import Architecture
from moma_core.report import markdown_table, plot_curves, write_json
from moma_protocol.wire import DP_EPSILON
from server.live import EXIT_NO_ROUND_TRAINED, RunEnded

SCHEMA_VERSION = 2


class RunFailed(RunEnded):
    """Every round of a run failed: there is no trained student."""

    exit_code = EXIT_NO_ROUND_TRAINED


def _failure_line(rounds: list[dict]) -> str:
    """The reasons of a failed run in one line: each site's categories, rounds that failed
    the same way grouped (``round 1: a failed (x); b failed (y) (the same in rounds 2-5)``)."""
    groups: list[tuple[list[int], str]] = []
    for r in rounds:
        text = _site_failures(r)
        if groups and groups[-1][1] == text:
            groups[-1][0].append(r["round"])
        else:
            groups.append(([r["round"]], text))
    parts = []
    for nums, text in groups[:3]:
        more = nums[1:]
        same = "" if not more else (f" (the same in round {more[0]})" if len(more) == 1 else
                                    f" (the same in rounds {more[0]}-{more[-1]})")
        parts.append(f"round {nums[0]}: {text}{same}")
    return " | ".join(parts) + (" | …" if len(groups) > 3 else "")


def _site_failures(entry: dict) -> str:
    bad = [f"{v['site_name']} {v['status']}" + (f" ({v['reason']})" if v.get("reason") else "")
           for v in sorted(entry["sites"].values(), key=lambda v: v["site_name"])
           if v["status"] != "ok"]
    return "; ".join(bad) or "too few sites trained"


def _loss_terms(train: dict | None, objective: object = None) -> dict:
    """The sites' mean loss terms of a round (CE, KL, NCE: which terms still carry signal) and
    the NCE term's health: the gap to its value with shuffled positives and the in-batch
    retrieval of each image's teacher key (both 0 / chance when it carries no per-image
    knowledge; see moma_core.objectives.nce_health); then the terms that ``objective``
    declares as report columns of its own (``report_terms``, none for the built-in ones)."""
    train = train or {}
    out = {name: train.get(f"train-{name}", "") for name in ("ce", "kl", "nce")}
    nce, shuffled = train.get("train-nce"), train.get("train-nce-shuffled")
    out["nce gap"] = shuffled - nce if nce is not None and shuffled is not None else ""
    out["retrieval"] = train.get("train-retrieval", "")
    for name in _report_terms(objective):
        out.setdefault(name, train.get(f"train-{name}", ""))
    return out


def _report_terms(objective: object) -> tuple[str, ...]:
    decl = objective_registry.declarations().get(str(objective))  # a run of an objective no
    return decl.report_terms if decl is not None else ()  # longer registered: none


def _eval_keys(m: dict | None) -> dict | None:
    if not m:
        return None
    return {"accuracy": m.get("accuracy"), "macro_f1": m.get("macro-f1"),
            "kappa": m.get("kappa"), "loss": m.get("loss"),
            "num_examples": m.get("num-examples")}


def privacy_summary(rounds: list[dict], unit: str = "patch") -> dict | None:
    """results.json's ``privacy`` section: the client-level account after the last round
    that released an aggregate (``client-dp``) and each site's cumulative sample-level ε as the
    site reported it (DP-SGD, of the run's ``dp-unit``; from its own ledger): only what sites
    chose to report."""
    out: dict = {}
    client = next((r["client_dp"] for r in reversed(rounds) if r.get("client_dp")), None)
    if client:
        out["client-level"] = client
    sites: dict[str, dict] = {}
    for r in rounds:
        for node, site in r.get("sites", {}).items():
            eps = (site.get("metrics") or {}).get(DP_EPSILON)
            if eps is not None:
                sites[str(site.get("site_name", node))] = {"epsilon": eps, "round": r["round"]}
    if sites:
        out["sample-level"] = {"unit": unit, "mechanism": "dp-sgd (opacus)",
                               "sites": dict(sorted(sites.items()))}
    return out or None


def privacy_lines(privacy: dict | None) -> list[str]:
    """The report's privacy section (empty without DP)."""
    if not privacy:
        return []
    text = ["## Privacy", ""]
    c = privacy.get("client-level")
    if c:
        clip = f"clipping norm {c['clipping-norm']:g}"
        if c.get("clipping") == "adaptive":
            clip = (f"adaptive clipping (last norm {c['clipping-norm']:g}, next "
                    f"{c['next-clipping-norm']:g}; update noise multiplier "
                    f"{c['update-noise-multiplier']:g}, count noise std {c['count-stddev']:g})")
        text += [f"Client-level DP ({c['mechanism']}): noise multiplier {c['noise-multiplier']:g}, "
                 f"{clip}; after {c['releases']} noised "
                 f"aggregate(s) each site's participation is ({c['epsilon']:.3f}, "
                 f"{c['delta']:g})-DP ({c['accountant']}).", ""]
    s = privacy.get("sample-level")
    if s:
        text += ["Sample-level DP-SGD, each site's cumulative ε as it reported it "
                 f"(unit: {s['unit']}):", "",
                 markdown_table([{"site": k, "epsilon": v["epsilon"], "round": v["round"]}
                                 for k, v in s["sites"].items()],
                                ["site", "epsilon", "round"]), ""]
    return text


class RunResults:
    """The results of a federation run, written after every round (a crash loses one round)."""

    def __init__(self, out_dir: Path) -> None:
        self.dir = Path(out_dir)
        self.path = self.dir / "results.json"
        self.data: dict = {}

    def start(self, config: dict, teacher_sha: str | None, resume: bool) -> int:
        """Begin or resume; returns the first round to run."""
        if resume and self.path.is_file():
            self.data = json.loads(self.path.read_text())
            if self.data.get("teacher_sha256") != teacher_sha:
                raise ValueError(f"{self.path}: the run was started with teacher "
                                 f"{str(self.data.get('teacher_sha256'))[:12]}…, not "
                                 f"{str(teacher_sha)[:12]}…; resume with the same teacher")
            return len(self.data.get("rounds", [])) + 1
        if self.path.is_file() and not resume:
            raise ValueError(f"{self.path} exists: use --resume to continue that run or "
                                  "choose another --name")
        self.data = {"schema_version": SCHEMA_VERSION, "config": config,
                     "teacher_sha256": teacher_sha, "started": time.time(), "rounds": [],
                     "final": None}
        return 1

    def checkpoint_path(self, server_round: int) -> Path:
        return self.dir / "checkpoints" / f"global-round-{server_round:03d}.safetensors"

    def last_checkpoint(self) -> dict[str, torch.Tensor] | None:
        """The global student after the last completed round (hash-checked)."""
        rounds = self.data.get("rounds", [])
        return load_checkpoint(Path(rounds[-1]["checkpoint"]))[0] if rounds else None

    def save_aggregator(self, server_round: int, state: dict[str, torch.Tensor]) -> dict:
        """Write the aggregation method's state after ``server_round`` (FedAdam's moments);
        returns its reference for ``server_state``."""
        from safetensors.torch import save_file

        path = self.dir / "checkpoints" / f"aggregator-round-{server_round:03d}.safetensors"
        atomic_write(path, lambda tmp: save_file(
            {k: v.contiguous() for k, v in state.items()}, tmp))
        return {"file": str(path), "sha256": sha256_file(path)}

    def load_aggregator(self, ref: dict) -> dict[str, torch.Tensor]:
        """The aggregation state ``ref`` names, hash-checked (ValueError otherwise)."""
        from safetensors.torch import load_file

        path = Path(str(ref.get("file", "")))
        if not path.is_file() or sha256_file(path) != ref.get("sha256"):
            raise ValueError(f"aggregation state {path} is missing or altered: the run cannot "
                             "resume its server optimiser (start a new run, or restore it)")
        return load_file(str(path))

    def save_server_state(self, server_round: int, state: dict) -> dict:
        """``server_state`` for results.json from :meth:`server.round.Coordinator.state_dict`
        after ``server_round``: the aggregator's tensors go to their own file
        (:meth:`save_aggregator`), the rest stays as it is."""
        saved = dict(state)
        if "aggregator" in saved:
            saved["aggregator"] = self.save_aggregator(server_round, saved["aggregator"])
        return saved

    def load_server_state(self) -> dict:
        """The saved ``server_state`` as :meth:`server.round.Coordinator.load_state_dict`
        reads it: the aggregator's tensors loaded from their file, hash-checked (ValueError)."""
        saved = dict(self.data.get("server_state", {}))
        if saved.get("aggregator"):
            saved["aggregator"] = self.load_aggregator(saved["aggregator"])
        else:
            saved.pop("aggregator", None)
        return saved

    def add_round(self, entry: dict, state: dict[str, torch.Tensor], arch: Architecture,
                  server_state: dict) -> None:
        """Append a round (a :meth:`server.round.RoundReport.to_json` entry) and its checkpoint.

        The sites scored the student this round started from: that is the previous round's
        federated evaluation, filled in here.
        """
        path = self.checkpoint_path(entry["round"])
        entry["checkpoint"] = str(path)
        entry["checkpoint_sha256"] = save_checkpoint(path, state, arch,
                                                     {"round": entry["round"]})
        rounds = self.data["rounds"]
        if rounds and rounds[-1].get("end_digest") == entry.get("start_digest"):
            rounds[-1]["federated_eval"] = _eval_keys(entry.get("incoming_eval"))
            rounds[-1]["federated_eval_sites"] = {
                k: {**v["incoming_eval"], "site-name": v["site_name"]}
                for k, v in entry["sites"].items() if v.get("incoming_eval")}
        entry.setdefault("federated_eval", None)
        entry.setdefault("federated_eval_sites", {})
        rounds.append(entry)
        privacy = privacy_summary(rounds, str(self.data.get("config", {})
                                              .get("dp-unit", "patch")))
        if privacy:
            self.data["privacy"] = privacy
        self.data["server_state"] = server_state
        write_json(self.path, self.data)

    def set_final_evaluation(self, metrics: dict | None, per_site: dict, bytes_down: int,
                             bytes_up: int) -> None:
        """The sites' scores of the last round's student (and the bytes that cost)."""
        last = self.data["rounds"][-1]
        last["federated_eval"] = _eval_keys(metrics)
        last["federated_eval_sites"] = per_site
        last["final_evaluation_bytes"] = {"down": bytes_down, "up": bytes_up}
        last["bytes_down"] += bytes_down
        last["bytes_up"] += bytes_up
        write_json(self.path, self.data)

    def finish(self) -> dict:
        """The best trained round, or — when every round failed — raise with the reasons."""
        rounds = self.data["rounds"]
        trained = [r for r in rounds if r.get("status", "ok") == "ok"]
        if not trained:
            reasons = [f"round {r['round']}: {_site_failures(r)}" for r in rounds]
            self.data["final"] = {"status": "failed", "reasons": reasons}
            write_json(self.path, self.data)
            raise RunFailed("no round trained a student: " + _failure_line(rounds))
        key = "server_eval" if any(r.get("server_eval") for r in trained) else "federated_eval"
        scored = [r for r in trained if r.get(key)]
        best = max(scored, key=lambda r: r[key]["accuracy"]) if scored else trained[-1]
        self.data["final"] = {"status": "ok", "best_round": best["round"],
                              "best_by": key if scored else "last trained round",
                              "best_checkpoint": best["checkpoint"],
                              "last_checkpoint": rounds[-1]["checkpoint"],
                              "failed_rounds": [r["round"] for r in rounds if r not in trained],
                              "metrics": best.get(key)}
        write_json(self.path, self.data)
        self.plot()
        return self.data["final"]

    def chance(self) -> tuple[float | None, float | None]:
        """Chance levels: accuracy 1/classes, NCE retrieval 1/batch size (None if unknown)."""
        cfg = self.data.get("config") or {}
        classes = [c for c in str(cfg.get("classes", "")).split(",") if c.strip()]
        batch = cfg.get("batch-size")
        return (1 / len(classes) if classes else None,
                1 / float(batch) if isinstance(batch, int | float) and batch > 0 else None)

    def has_server_eval(self) -> bool:
        return any(r.get("server_eval") for r in self.data["rounds"])

    def plot(self) -> Path:
        rounds = self.data["rounds"]
        xs = [r["round"] for r in rounds]

        def series(key: str, metric: str) -> list:
            return [(r.get(key) or {}).get(metric) for r in rounds]

        per_site: dict[str, list] = {}
        for i, r in enumerate(rounds):
            for node, m in (r.get("federated_eval_sites") or {}).items():
                per_site.setdefault(str(m.get("site-name", f"node {node}")),
                                    [None] * len(rounds))[i] = m.get("accuracy")
        chance, retrieval_chance = self.chance()
        objective = self.data["config"].get("objective", "")
        accuracy = {"federated val": series("federated_eval", "accuracy")}
        if self.has_server_eval():
            accuracy = {"server test": series("server_eval", "accuracy"), **accuracy}
            scores_title = "global macro-F1 / kappa (server test)"
            scores = {"F1": series("server_eval", "macro_f1"),
                      "kappa": series("server_eval", "kappa")}
        else:  # no --eval-source: the sites' scores of the global student
            scores_title = "global macro-F1 / kappa (sites' val; no --eval-source)"
            scores = {"F1": series("federated_eval", "macro_f1"),
                      "kappa": series("federated_eval", "kappa")}
        panels = {
            "global accuracy": accuracy,
            scores_title: scores,
            "per-site val accuracy": per_site,
            "site loss terms (train)": {
                name: [(r.get("train") or {}).get(f"train-{name}") for r in rounds]
                for name in ("ce", "kl", "nce", "nce-shuffled")},
            "NCE in-batch retrieval (train)": {
                "retrieval": [(r.get("train") or {}).get("train-retrieval") for r in rounds]},
            "bytes on the wire (MB)": {
                "down": [r["bytes_down"] / 1e6 for r in rounds],
                "up": [r["bytes_up"] / 1e6 for r in rounds]},
        }
        hlines = {}
        if chance is not None:
            hlines["global accuracy"] = hlines["per-site val accuracy"] = (
                chance, f"chance 1/{round(1 / chance)}")
        if retrieval_chance is not None:
            hlines["NCE in-batch retrieval (train)"] = (
                retrieval_chance, f"chance 1/{round(1 / retrieval_chance)} (batch)")
        notes = {
            "global accuracy": "no evaluation: no --eval-source and no site scored the student",
            scores_title: "no held-out set (no --eval-source) and no site evaluation",
            "per-site val accuracy": "no site evaluation (fraction-evaluate 0?)",
            "site loss terms (train)": "no round trained",
            "NCE in-batch retrieval (train)": f"not reported by objective {objective}\n"
                                              "(MoMA only)",
        }
        return plot_curves(self.dir / "curves.png", xs, panels, "round",
                           self.data["config"].get("run-name", ""), hlines, notes)

    def notes(self) -> list[str]:
        """The report's explanations of its own figures (init, columns, bytes, chance)."""
        cfg = self.data["config"]
        rounds = self.data["rounds"]
        chance, retrieval_chance = self.chance()
        text = ["## How to read this report", ""]
        init = str(self.data.get("init", ""))
        if init.startswith("teacher"):
            text.append(f"- **Round-1 student: {init}.** The global student of round 1 is a "
                        "copy of the teacher's tensors wherever name and shape match the "
                        "student's; a tensor not copied (the classifier when the teacher's "
                        "classes are not the run's: the teacher's class k is not the run's "
                        "class k; any tensor whose shape differs) starts from its random "
                        "initialisation.")
        elif init:
            text.append(f"- **Round-1 student: {init}.**")
        if chance is not None:
            text.append(f"- **Chance level**: accuracy {chance:.3f} (1/{round(1 / chance)} "
                        "classes), kappa 0; a student near these has learnt nothing.")
        if not self.has_server_eval():
            text.append("- **No held-out set at the coordinator** (run without "
                        "`--eval-source`): there are no test columns; the sites' validation "
                        "accuracy of the global student (`site val acc`) is the run's measure "
                        "and chooses the best round.")
        objective = cfg.get("objective", "")
        terms = [_loss_terms(r.get("train"), objective) for r in rounds
                 if r.get("status", "ok") == "ok"]
        text.append("- **Loss columns** (the sites' example-weighted means of the round): `ce` "
                    "the cross-entropy on the sites' labels; `kl` the distillation KL from the "
                    "teacher's softened predictions; `nce` MoMA's contrastive term (query vs "
                    "the teacher's key of the same image, against the queue); `nce gap` = "
                    "`train-nce-shuffled − train-nce`, what shuffling each query's positive "
                    "within its batch costs in nats (0: the term tells batches apart, not "
                    "images); `retrieval` the share of queries whose most similar key in the "
                    "batch is their own image's" + (f" (chance {retrieval_chance:.3f} = 1/batch "
                                                    "size)" if retrieval_chance else "") + ".")
        for col, why in (("kl", "has no distillation term"),
                         ("nce", "has no contrastive term (MoMA and dp-moma have one)"),
                         ("nce gap", "does not measure it (MoMA only)"),
                         ("retrieval", "does not measure it (MoMA only)")):
            if terms and all(t[col] == "" for t in terms):
                text.append(f"  - `{col}` is empty by design: objective `{objective}` {why}.")
        if terms and any(t["kl"] != "" for t in terms) and \
                all(t["kl"] in ("", 0, 0.0) for t in terms):
            text.append("  - `kl` is 0 in every round by design: the teacher's classes are not "
                        "the run's, so its predictions are not compared with the student's.")
        last = rounds[-1] if rounds else {}
        final_bytes = last.get("final_evaluation_bytes")
        if final_bytes:
            text.append(f"- **Round {last['round']}'s download** includes the final evaluation: "
                        "after the last round the coordinator sends the final student to the "
                        f"sites once more to score it ({final_bytes['down'] / 1e6:.2f} MB down, "
                        f"{final_bytes['up'] / 1e6:.2f} MB up of the round's "
                        f"{last['bytes_down'] / 1e6:.2f} / {last['bytes_up'] / 1e6:.2f} MB), "
                        "so its `MB down` is about twice another round's.")
        first = rounds[0] if rounds else {}
        teacher = sum(v.get("teacher_bytes", 0) for v in first.get("sites", {}).values())
        if teacher:
            text.append(f"- **Round {first['round']}'s download** includes the teacher "
                        f"({teacher / 1e6:.2f} MB in all), sent once to each site that lacked "
                        "it.")
        return text + [""]

    def write_report(self, extra_sections: list[str] | None = None) -> Path:
        server = self.has_server_eval()
        objective = self.data["config"].get("objective")
        rows = []
        for r in self.data["rounds"]:
            s = r.get("server_eval") or {}
            f = r.get("federated_eval") or {}
            test = {"test acc": s.get("accuracy", ""), "test F1": s.get("macro_f1", ""),
                    "test kappa": s.get("kappa", "")} if server else {}
            rows.append({"round": r["round"], **test,
                         "site val acc": f.get("accuracy", ""),
                         "sites ok": sum(v.get("status") == "ok" for v in r["sites"].values()),
                         **_loss_terms(r.get("train"), objective),
                         "status": r.get("status", "ok"),
                         "MB down": r["bytes_down"] / 1e6, "MB up": r["bytes_up"] / 1e6,
                         "wall s": r["wall_s"]})
        cfg = self.data["config"]
        text = [f"# MoMA-FL run `{cfg.get('run-name')}`", "",
                f"Objective `{cfg.get('objective')}`, student `{cfg.get('student-model')}`, "
                f"aggregation `{cfg.get('aggregation')}`, {cfg.get('num-rounds')} rounds; "
                f"teacher SHA-256 `{(self.data.get('teacher_sha256') or '-')[:16]}…`; "
                f"round-1 student: {self.data.get('init', 'not recorded')}.", "",
                "## Per round", "",
                markdown_table(rows, list(rows[0]) if rows else ["round"]), "",
                "![curves](curves.png)", "", *self.notes()]
        final = self.data.get("final") or {}
        if final.get("status") == "failed":
            text += ["**The run failed: no round trained a student.**", "",
                     *[f"- {r}" for r in final["reasons"]], ""]
        elif final:
            text += [f"Best round: {final['best_round']} (by {final['best_by']}); checkpoint "
                     f"`{final['best_checkpoint']}`.", ""]
        text += privacy_lines(self.data.get("privacy"))
        text += extra_sections or []
        path = self.dir / "report.md"
        path.write_text("\n".join(text) + "\n")
        return path


def end_summary(data: dict, run_dir: Path) -> list[str]:
    """A finished run in a few aligned lines (``moma-server``'s last words): best round, its
    accuracy (with chance level), macro-F1, kappa, rounds ok/failed, bytes, the report."""
    rounds = data.get("rounds", [])
    final = data.get("final") or {}
    classes = [c for c in str((data.get("config") or {}).get("classes", "")).split(",")
               if c.strip()]
    failed = [r["round"] for r in rounds if r.get("status", "ok") != "ok"]
    rows: list[tuple[str, str]] = []
    if final.get("status") == "ok":
        by = {"server_eval": "coordinator's held-out set",
              "federated_eval": "sites' validation"}.get(final.get("best_by"),
                                                         final.get("best_by", ""))
        rows.append(("best round", f"{final['best_round']} of {len(rounds)} (by {by})"))
        m = final.get("metrics") or {}

        def num(key: str) -> str:
            return f"{m[key]:.3f}" if isinstance(m.get(key), int | float) else "not measured"

        chance = f"   (chance {1 / len(classes):.3f}, {len(classes)} classes)" if classes else ""
        rows += [("accuracy", num("accuracy") + chance), ("macro-F1", num("macro_f1")),
                 ("kappa", num("kappa") + "   (chance 0)")]
    rows.append(("rounds", f"{len(rounds) - len(failed)} ok, {len(failed)} failed"
                 + (f" ({', '.join(map(str, failed))})" if failed else "")))
    down = sum(r.get("bytes_down", 0) for r in rounds) / 1e6
    up = sum(r.get("bytes_up", 0) for r in rounds) / 1e6
    rows.append(("bytes", f"{down:.1f} MB down, {up:.1f} MB up"))
    rows.append(("report", str(Path(run_dir) / "report.md")))
    width = max(len(k) for k, _ in rows) + 2
    return [f"{k:<{width}}{v}" for k, v in rows]
