"""The coordinator's Flower ServerApp: rounds of MoMA-FL with checkpoints and results.

Each round: train (teacher shipped where missing) → checks + aggregation → federated evaluation
on the sites' validation splits → server-side evaluation on a held-out set when the coordinator
has one → global checkpoint + results.json. ``resume = true`` continues after the last completed
round from its saved checkpoint.

Run-config keys besides :class:`RunConfig`'s: ``teacher-path``, ``output-dir`` (absolute),
``eval-source`` (held-out set: a path or ``synthetic:target``; empty for none), ``resume``,
``site-registry`` (JSON file node id → site name written by ``moma-server`` from the keys it
registered; with it, sites are named by their registered key, never by what they report).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from safetensors.torch import load as load_safetensors
from torch.utils.data import ConcatDataset, Dataset

from client import protocol as P
from moma_core.config import RunConfig
from moma_core.evaluate import evaluate
from moma_core.models import Architecture, build_model
from moma_core.objectives import init_student_from_teacher
from moma_core.sources import SYNTHETIC, make_loader, open_eval_data
from server.results import RunResults
from server.strategy import MomaStrategy, exchange
from server.teacher_package import TeacherPackage, package_teacher

log = logging.getLogger("moma.server")
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = dict(context.run_config)
    run = RunConfig.from_flat(cfg)
    run_federation(grid, run, Path(str(cfg["output-dir"])) / run.run_name,
                   teacher_path=str(cfg.get("teacher-path", "")),
                   eval_source=str(cfg.get("eval-source", "")),
                   resume=str(cfg.get("resume", "false")).lower() == "true",
                   eval_sites=int(cfg.get("eval-sites", 1)),
                   site_registry=str(cfg.get("site-registry", "")))


def server_eval_set(source: str, run: RunConfig, sites: int) -> Dataset | None:
    """The coordinator's held-out set; synthetic: an equal share from every site's style."""
    if not source:
        return None
    if source.startswith(SYNTHETIC):
        per = max(400 // sites, 50)
        return ConcatDataset([open_eval_data(source, run.image_size, seed=run.seed + 7, n=per,
                                             site_index=i, num_sites=sites)
                              for i in range(sites)])
    return open_eval_data(source, run.image_size, classes=run.class_names or None)


def initial_student(run: RunConfig, arch: Architecture,
                    teacher: TeacherPackage | None) -> dict[str, torch.Tensor]:
    torch.manual_seed(run.seed)
    model = build_model(arch)
    if teacher is not None and run.init_from_teacher and \
            teacher.architecture.model_name == arch.model_name:
        t_model = build_model(teacher.architecture)
        t_model.load_state_dict(load_safetensors(teacher.data))
        init_student_from_teacher(model, t_model)
    return P.wire_state(model.state_dict())


def run_federation(grid: Grid, run: RunConfig, out_dir: Path, teacher_path: str = "",
                   eval_source: str = "", resume: bool = False, eval_sites: int = 1,
                   site_registry: str = "") -> dict:
    """The round loop (see module docstring); returns the final summary."""
    if not run.class_names:
        raise ValueError("run config 'classes' is empty: name the target task's classes")
    teacher = package_teacher(teacher_path) if run.objective != "ce" else None
    arch = Architecture(run.student_model, run.class_names, run.image_size)
    results = RunResults(out_dir)
    first = results.start(run.to_flat(), teacher.sha256 if teacher else None, resume)
    strategy = MomaStrategy(run, teacher)
    if site_registry:
        strategy.set_registered_names(json.loads(Path(site_registry).read_text()))
    last = results.last_checkpoint() if first > 1 else None
    state = last if last is not None else initial_student(run, arch, teacher)
    if last is not None:
        log.info("resuming after round %d from %s", first - 1, results.data["rounds"][-1]
                 ["checkpoint"])
        saved_rng = results.data.get("server_state", {}).get("rng")
        if saved_rng:
            strategy.rng.setstate((saved_rng[0], tuple(saved_rng[1]), saved_rng[2]))
    eval_set = server_eval_set(eval_source, run, eval_sites)
    for rnd in range(first, run.num_rounds + 1):
        start = time.time()
        start_digest = state_digest(state)
        arrays = ArrayRecord(state)
        msgs = strategy.configure_train(rnd, arrays, ConfigRecord(), grid)
        replies = exchange(grid, list(msgs), run.round_timeout)
        new_arrays, train_metrics = strategy.aggregate_train(rnd, replies)
        if new_arrays is not None:
            state = new_arrays.to_torch_state_dict()
        else:
            log.warning("round %d: no acceptable update; the global student is unchanged", rnd)
        ev_msgs = strategy.configure_evaluate(rnd, ArrayRecord(state), ConfigRecord(), grid)
        fed_eval = strategy.aggregate_evaluate(
            rnd, exchange(grid, list(ev_msgs), run.round_timeout))
        entry = _round_entry(rnd, strategy, train_metrics, fed_eval)
        entry["start_digest"] = start_digest
        entry["end_digest"] = state_digest(state)
        if eval_set is not None:
            model = build_model(arch)
            model.load_state_dict(state, strict=False)
            m = evaluate(model, make_loader(eval_set, 128, train=False), len(arch.classes))
            entry["server_eval"] = m
            log.info("round %d: server test accuracy %.3f, macro-F1 %.3f, kappa %.3f", rnd,
                     m["accuracy"], m["macro_f1"], m["kappa"])
        entry["wall_s"] = time.time() - start
        results.add_round(entry, state, arch, {"rng": _rng_json(strategy.rng.getstate())})
    final = results.finish()
    results.write_report()
    return final


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the tensors of a model state (names, dtypes, shapes and values)."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _round_entry(rnd: int, strategy: MomaStrategy, train_metrics, fed_eval) -> dict:
    info = strategy.round_log.get(rnd, {})
    sites = {str(k): v for k, v in info.get("sites", {}).items()}
    evals = {str(k): v for k, v in info.get("evaluate", {}).items()}
    return {
        "round": rnd,
        "train": dict(train_metrics) if train_metrics else None,
        "federated_eval": _eval_keys(dict(fed_eval)) if fed_eval else None,
        "federated_eval_sites": evals,
        "sites": sites,
        "failed_sites": [k for k, v in sites.items() if v.get("status") != "ok"],
        "examples": {k: v.get("num_examples", 0) for k, v in sites.items()},
        "bytes_down": sum(v.get("bytes_down", 0) for v in sites.values()),
        "bytes_up": sum(v.get("bytes_up", 0) for v in sites.values()),
    }


def _eval_keys(m: dict) -> dict:
    return {"accuracy": m.get("accuracy"), "macro_f1": m.get("macro-f1"),
            "kappa": m.get("kappa"), "loss": m.get("loss"),
            "num_examples": m.get(P.NUM_EXAMPLES)}


def _rng_json(state: tuple) -> list:
    return [state[0], list(state[1]), state[2]]
