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
import sys
import time
from pathlib import Path

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from safetensors.torch import load as load_safetensors
from torch.utils.data import ConcatDataset, Dataset

from moma_core import objective_registry
from moma_core.evaluate import evaluate
from moma_core.models import Architecture, build_model
from moma_core.objectives import init_student_from_teacher, same_task
from moma_core.sources import SYNTHETIC, make_loader, open_eval_data
from moma_protocol.coordinator_file import server_run_config
from moma_protocol.settings import RunConfig
from moma_protocol.wire import wire_state
from server.live import (
    EXIT_BAD_INPUT,
    EXIT_COMPLETED,
    EXIT_FAILED,
    LiveStatus,
    RunEnded,
)
from server.results import RunResults
from server.round import Coordinator
from server.teacher_package import (
    TeacherPackage,
    check_student_fits,
    check_student_model,
    package_teacher,
)
from server.tensorboard import RoundBoard

log = logging.getLogger("moma.server")
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    # the coordinator's own settings come from its file, not from the run config the sites see
    run_federation(grid, RunConfig.from_flat(server_run_config(context.run_config)))


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
        missing = _not_copied(model, t_model, same)
        how = f"teacher ({copied} of {len(model.state_dict())} tensors{missing})"
    return wire_state(model.state_dict()), how


def _not_copied(student: torch.nn.Module, teacher: torch.nn.Module, same: bool) -> str:
    """Which student tensors did not come from the teacher, and why (for ``init``)."""
    t_state, reasons = teacher.state_dict(), {}
    head = {f"{n}." for n, m in student.named_modules() if m is student.get_classifier()}
    for k, v in student.state_dict().items():
        if not same and any(k.startswith(p) for p in head):
            reasons[k] = "the classifier: the teacher's classes are not the run's"
        elif k not in t_state:
            reasons[k] = "not in the teacher"
        elif t_state[k].shape != v.shape:
            reasons[k] = "another shape in the teacher"
    if not reasons:
        return ""
    by_why: dict[str, list[str]] = {}
    for k, why in reasons.items():
        by_why.setdefault(why, []).append(k)
    return "; not copied: " + "; ".join(
        f"{', '.join(keys[:4])}{' …' if len(keys) > 4 else ''} ({why})"
        for why, keys in by_why.items())


def run_federation(grid: Grid, run: RunConfig) -> dict:
    """The round loop (see module docstring); returns the final summary.

    ``runs/<name>/live.json`` (:mod:`server.live`) follows the run. A run that ends early for
    a reason a user can act on (too few sites: exit code 3; no round trained: 4; bad input:
    2) records that end there, logs it as one error line and raises it without a traceback on
    the console (:func:`_quiet_flower_traceback`); any other error is recorded with exit code
    1 and raised as it is.
    """
    fed, co = run.federation, run.coordinator
    _console_logging()
    live = LiveStatus(Path(co.output_dir) / fed.run_name / "live.json", fed.run_name,
                      fed.num_rounds, fed.round_timeout, fed.min_available_nodes)
    live.write()
    try:
        final = _federate(grid, run, live)
    except Exception as exc:
        _record_end(live, exc)
        raise
    live.end("completed", "", EXIT_COMPLETED)
    return final


def _federate(grid: Grid, run: RunConfig, live: LiveStatus) -> dict:
    """validate → build → resume → the rounds → final evaluation → finish."""
    fed, co = run.federation, run.coordinator
    package, teacher = _validate(run)
    arch = run.student_architecture()
    results = RunResults(Path(co.output_dir) / fed.run_name)
    first = results.start(run.to_flat(), teacher.sha256 if teacher else None, co.resume)
    coordinator = Coordinator(grid, run, teacher, _site_names(run, live), live)
    coordinator.summary()
    state = _start_state(run, arch, package, results, coordinator, first)
    eval_set = server_eval_set(co.eval_source, run, co.eval_sites)
    board = RoundBoard(results.dir, first)
    try:
        for rnd in range(first, fed.num_rounds + 1):
            state = _one_round(rnd, state, coordinator, results, board, arch, eval_set)
        _final_evaluation(state, coordinator, results, board)
        try:
            final = results.finish()
        finally:
            results.write_report()
    finally:
        board.close()
    return final


def _validate(run: RunConfig) -> tuple[TeacherPackage | None, TeacherPackage | None]:
    """Refuse a run that cannot start (ValueError); returns the teacher's package (also for
    the CE baseline, which starts from it) and the teacher the sites receive (distillation
    only)."""
    fed, co = run.federation, run.coordinator
    if not run.class_names:
        raise ValueError("run config 'classes' is empty: name the target task's classes")
    distils = objective_registry.needs_teacher(run.objective.objective)
    if distils and not co.teacher_path:
        raise ValueError(f"objective {run.objective.objective} needs a teacher: set teacher-path")
    # the CE baseline ships no teacher, but starts from it like the other arms
    package = package_teacher(co.teacher_path) if co.teacher_path and (
        distils or fed.init_from_teacher) else None
    teacher = package if distils else None
    check_student_model(run)
    if teacher is not None:
        check_student_fits(run, teacher.architecture)
    return package, teacher


def _site_names(run: RunConfig, live: LiveStatus) -> dict[int, str] | None:
    """The site registry's names by node id (``site-registry``), or None without one."""
    if not run.coordinator.site_registry:
        return None
    names = {int(k): str(v) for k, v in json.loads(
        Path(run.coordinator.site_registry).read_text()).items()}
    live.registered = dict(names)
    return names


def _start_state(run: RunConfig, arch: Architecture, package: TeacherPackage | None,
                 results: RunResults, coordinator: Coordinator, first: int
                 ) -> dict[str, torch.Tensor]:
    """The global student the first round to run starts from: a resumed run's last checkpoint
    (the coordinator continuing from its saved state), or the round-1 student."""
    last = results.last_checkpoint() if first > 1 else None
    if last is None:
        state, how = initial_student(run, arch, package)
        results.data["init"] = how
        log.info("round-1 student: %s", how)
        return state
    log.info("resuming after round %d", first - 1)
    coordinator.load_state_dict(results.load_server_state())
    return last


def _one_round(rnd: int, state: dict[str, torch.Tensor], coordinator: Coordinator,
               results: RunResults, board: RoundBoard, arch: Architecture,
               eval_set: Dataset | None) -> dict[str, torch.Tensor]:
    """Round ``rnd``: train, score on the held-out set, save; returns the new global."""
    live, num_rounds = coordinator.live, coordinator.run.federation.num_rounds
    start = time.time()
    start_digest = state_digest(state)
    state, report = coordinator.run_round(rnd, state)
    report.start_digest, report.end_digest = start_digest, state_digest(state)
    entry = report.to_json()
    if eval_set is not None and not report.failed:
        live.update(state="evaluating")
        entry["server_eval"] = score(state, arch, eval_set)
    entry["wall_s"] = time.time() - start
    server_state = results.save_server_state(rnd, coordinator.state_dict())
    spent = coordinator.client_dp_spent(rnd)
    if spent is not None:
        entry["client_dp"] = spent
    results.add_round(entry, state, arch, server_state)
    board.add_round(entry)
    line = progress_line(entry, num_rounds)
    log.info("%s", line)
    live.progress(line)
    return state


def _final_evaluation(state: dict[str, torch.Tensor], coordinator: Coordinator,
                      results: RunResults, board: RoundBoard) -> None:
    """After the last round, the sites that trained in it score the final student."""
    fed = coordinator.run.federation
    if fed.fraction_evaluate <= 0 or not results.data["rounds"]:
        return
    last_entry = results.data["rounds"][-1]
    nodes = sorted(int(k) for k, v in last_entry["sites"].items() if v["status"] == "ok")
    if not nodes:
        return
    coordinator.live.progress(f"final evaluation on {len(nodes)} site(s)", state="evaluating",
                              waiting_for=sorted(coordinator.name(n) for n in nodes))
    metrics, per_site, down, up = coordinator.evaluate(fed.num_rounds, state, nodes)
    results.set_final_evaluation(metrics, per_site, down, up)
    board.add_final_evaluation(last_entry["round"], down, up)


def progress_line(entry: dict, num_rounds: int) -> str:
    """The console's one line per round: ``round 3/10: 2/2 sites done, 41.2 s, test accuracy
    0.812`` (test accuracy only with the coordinator's held-out set)."""
    sites = entry["sites"].values()
    ok = sum(s["status"] == "ok" for s in sites)
    line = f"round {entry['round']}/{num_rounds}: {ok}/{len(sites)} sites done, " \
           f"{entry['wall_s']:.1f} s"
    if entry.get("status") == "failed":
        line += ", round failed (the global student is unchanged)"
    if entry.get("server_eval"):
        e = entry["server_eval"]
        line += (f", test accuracy {e['accuracy']:.3f} (macro-F1 {e['macro_f1']:.3f}, kappa "
                 f"{e['kappa']:.3f})")
    return line


def _record_end(live: LiveStatus, exc: Exception) -> None:
    """live.json's ``end`` for a run that raised ``exc``; a known end is logged as one line
    and its traceback kept off the console."""
    if isinstance(exc, RunEnded):
        code = exc.exit_code
    elif isinstance(exc, ValueError):  # bad input: a refused setting, resume or file
        code = EXIT_BAD_INPUT
    else:
        live.end("failed", f"{type(exc).__name__}: {exc}", EXIT_FAILED)
        return
    reason = " ".join(str(exc).split())
    live.end("failed", reason, code)
    log.error("%s", reason)
    _quiet_flower_traceback(exc)


class _QuietEnd(logging.Filter):
    """Drops Flower's traceback of an exception the ServerApp already reported in one line,
    and the exit-code help that Flower logs right after it."""

    def __init__(self) -> None:
        super().__init__()
        self.reported = False

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and getattr(exc, "moma_reported", False):
            self.reported = True
            return False
        if self.reported and record.levelno >= logging.ERROR and \
                record.getMessage().startswith("Exit Code:"):
            self.reported = False
            return False
        return True


_QUIET = _QuietEnd()


def _quiet_flower_traceback(exc: Exception) -> None:
    """Flower's ServerApp runner logs any exception of the ServerApp with its traceback, then
    marks the run ``finished:failed``; raising is the only way to get that status. The
    exception is marked as reported, and a filter on Flower's logger drops that traceback:
    the run still fails (``flwr ls``), and the console keeps the one line."""
    exc.moma_reported = True  # type: ignore[attr-defined]
    flwr_log = logging.getLogger("flwr")
    if _QUIET not in flwr_log.filters:
        flwr_log.addFilter(_QUIET)


def _console_logging() -> None:
    """The ServerApp's progress lines (INFO) on the console. A deployed ServerApp runs in a
    process of Flower's that configures no logging for it (only warnings would reach the
    console, bare); a command that configured logging (moma-simulate, tests) is left alone."""
    moma = logging.getLogger("moma")
    if logging.getLogger().handlers or moma.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    moma.addHandler(handler)
    moma.setLevel(logging.INFO)


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

