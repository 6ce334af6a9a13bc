"""The coordinator's Flower ServerApp: rounds of MoMA-FL with checkpoints and results.

The same entry point (:data:`app`) runs in deployment (``moma-server``, ``flwr run``) and in
simulation (``moma-simulate``). It reads the run's settings once from Flower's run config
(:class:`moma_protocol.settings.RunConfig`), then for each round: :class:`server.round.Coordinator`
runs it and returns a :class:`server.round.RoundReport`; the coordinator's held-out set scores
the new student when it has one; the global checkpoint and results.json are written. After the
last round the sites score the final student. ``resume = true`` continues after the last
completed round from its saved checkpoint. A run in which every round failed raises (the
command exits non-zero with the reasons); a failed round is never the "best round".

Coordinator keys (``teacher-path``, ``output-dir``, ``eval-source``, ``resume``,
``site-registry`` …) are the run config's :class:`moma_protocol.settings.CoordinatorSettings`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from safetensors.torch import load as load_safetensors
from torch.utils.data import ConcatDataset, Dataset

from moma_core.evaluate import evaluate
from moma_core.models import Architecture, build_model
from moma_core.objectives import init_student_from_teacher, same_task
from moma_core.sources import SYNTHETIC, make_loader, open_eval_data
from moma_protocol.settings import RunConfig
from moma_protocol.wire import wire_state
from server.aggregation import Aggregator
from server.results import RunResults
from server.round import Coordinator
from server.teacher_package import (
    TeacherPackage,
    check_student_fits,
    check_student_model,
    package_teacher,
)

log = logging.getLogger("moma.server")
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_federation(grid, RunConfig.from_flat(dict(context.run_config)))


def server_eval_set(source: str, run: RunConfig, sites: int) -> Dataset | None:
    """The coordinator's held-out set; synthetic: an equal share from every site's style."""
    if not source:
        return None
    size, seed = run.federation.image_size, run.federation.seed
    if source.startswith(SYNTHETIC):
        per = max(400 // sites, 50)
        return ConcatDataset([open_eval_data(source, size, seed=seed + 7, n=per,
                                             site_index=i, num_sites=sites)
                              for i in range(sites)])
    return open_eval_data(source, size, classes=run.class_names or None)


def initial_student(run: RunConfig, arch: Architecture, teacher: TeacherPackage | None
                    ) -> tuple[dict[str, torch.Tensor], str]:
    """The round-1 student and how it was made (recorded in results.json as ``init``).

    Every objective, the CE-only baseline included, starts from the teacher's weights when
    ``init-from-teacher`` is set and the teacher has the student's architecture, so that the
    arms of a comparison start from the same point.
    """
    torch.manual_seed(run.federation.seed)
    model = build_model(arch)
    if not run.federation.init_from_teacher:
        how = "random (init-from-teacher is off)"
    elif teacher is None:
        how = "random (no teacher given)"
    elif teacher.architecture.model_name != arch.model_name:
        how = (f"random (teacher {teacher.architecture.model_name} is not the student "
               f"{arch.model_name})")
    else:
        t_model = build_model(teacher.architecture)
        t_model.load_state_dict(load_safetensors(teacher.data))
        same = same_task(teacher.architecture.classes, arch.classes)
        copied = init_student_from_teacher(model, t_model, classifier=same)
        how = f"teacher ({copied} of {len(model.state_dict())} tensors)"
    return wire_state(model.state_dict()), how


def run_federation(grid: Grid, run: RunConfig) -> dict:
    """The round loop (see module docstring); returns the final summary."""
    fed, co = run.federation, run.coordinator
    if not run.class_names:
        raise ValueError("run config 'classes' is empty: name the target task's classes")
    if run.objective.objective != "ce" and not co.teacher_path:
        raise ValueError(f"objective {run.objective.objective} needs a teacher: set teacher-path")
    distils = run.objective.objective != "ce"
    # the CE baseline ships no teacher, but starts from it like the other arms
    package = package_teacher(co.teacher_path) if co.teacher_path and (
        distils or fed.init_from_teacher) else None
    teacher = package if distils else None
    check_student_model(run)
    if teacher is not None:
        check_student_fits(run, teacher.architecture)
    arch = run.student_architecture()
    results = RunResults(Path(co.output_dir) / fed.run_name)
    first = results.start(run.to_flat(), teacher.sha256 if teacher else None, co.resume)
    names = None
    if co.site_registry:
        names = {int(k): str(v) for k, v in json.loads(Path(co.site_registry).read_text()
                                                       ).items()}
    coordinator = Coordinator(grid, run, teacher, names)
    last = results.last_checkpoint() if first > 1 else None
    if last is not None:
        state = last
    else:
        state, how = initial_student(run, arch, package)
        results.data["init"] = how
        log.info("round-1 student: %s", how)
    if last is not None:
        log.info("resuming after round %d", first - 1)
        saved = results.data.get("server_state", {})
        if saved.get("rng"):
            rng = saved["rng"]
            coordinator.rng.setstate((rng[0], tuple(rng[1]), rng[2]))
        if saved.get("aggregator"):  # FedAdam's moments continue where they were
            coordinator.aggregate.load_state_dict(results.load_aggregator(saved["aggregator"]))
        restore_client_dp(coordinator.aggregate, saved)
    eval_set = server_eval_set(co.eval_source, run, co.eval_sites)
    for rnd in range(first, fed.num_rounds + 1):
        start = time.time()
        start_digest = state_digest(state)
        state, report = coordinator.run_round(rnd, state)
        report.start_digest, report.end_digest = start_digest, state_digest(state)
        entry = report.to_json()
        if eval_set is not None and not report.failed:
            entry["server_eval"] = score(state, arch, eval_set)
            log.info("round %d: server test accuracy %.3f, macro-F1 %.3f, kappa %.3f", rnd,
                     entry["server_eval"]["accuracy"], entry["server_eval"]["macro_f1"],
                     entry["server_eval"]["kappa"])
        entry["wall_s"] = time.time() - start
        server_state: dict = {"rng": _rng_json(coordinator.rng.getstate())}
        aggregator_state = coordinator.aggregate.state_dict()
        if aggregator_state:
            server_state["aggregator"] = results.save_aggregator(rnd, aggregator_state)
        client_dp = coordinator.aggregate.client_dp
        if client_dp is not None:
            server_state["client_dp"] = client_dp.state_dict()
            entry["client_dp"] = client_dp.spent()
            log.info("round %d: client-level DP epsilon %.3f (delta %g) after %d releases", rnd,
                     entry["client_dp"]["epsilon"], client_dp.delta, len(client_dp.releases))
        results.add_round(entry, state, arch, server_state)
    if fed.fraction_evaluate > 0 and results.data["rounds"]:
        last_entry = results.data["rounds"][-1]
        nodes = sorted(int(k) for k, v in last_entry["sites"].items() if v["status"] == "ok")
        if nodes:
            metrics, per_site, down, up = coordinator.evaluate(fed.num_rounds, state, nodes)
            results.set_final_evaluation(metrics, per_site, down, up)
    try:
        final = results.finish()
    finally:
        results.write_report()
    return final


def restore_client_dp(aggregate: Aggregator, saved: dict) -> None:
    """A resumed run's client-level DP account continues where it was, never restarts: a
    saved state without it (or with an unreadable one) stops the resume (ValueError)."""
    if aggregate.client_dp is None:
        return
    if "client_dp" not in saved:
        raise ValueError("the run uses client-dp but its saved state has no privacy account: "
                         "it cannot be resumed without under-counting")
    aggregate.client_dp.load_state_dict(saved["client_dp"])


def score(state: dict[str, torch.Tensor], arch: Architecture, data: Dataset) -> dict:
    """Metrics of ``state`` on the coordinator's held-out ``data``."""
    model = build_model(arch)
    model.load_state_dict(state, strict=False)
    return evaluate(model, make_loader(data, 128, train=False), len(arch.classes))


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the tensors of a model state (names, dtypes, shapes and values)."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _rng_json(state: tuple) -> list:
    return [state[0], list(state[1]), state[2]]
