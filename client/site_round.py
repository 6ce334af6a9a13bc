"""What a site does with one message, independent of how the message reached it.

The ClientApp (:mod:`client.client_app`) runs this in its own process, or hands it to the
site's warm worker (:mod:`client.site_worker`), which runs exactly the same functions; either
way the inputs are plain values (the node config, the run's flat config, the message's round
fields, the teacher if it came along, the global student) and so are the outputs. Importing
this module loads no torch: the training stack is imported when a round needs it.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from client.site_config import SiteSettings, site_settings
from client.site_errors import ConfigError
from moma_protocol import wire
from moma_protocol.settings import RunConfig

if TYPE_CHECKING:  # the status query and the worker's callers need no torch
    import torch

log = logging.getLogger("moma.client")


@dataclass(frozen=True)
class TeacherDelivery:
    """The teacher package a train message carried (first contact only)."""

    blob: bytes
    sidecar: dict
    signature: dict | None


@dataclass(frozen=True)
class RoundFields:
    teacher_sha: str
    server_round: int
    score_incoming: bool
    clipping_norm: float = 0.0  # client-dp = site-clipping: this round's norm (0: the run's)


@functools.lru_cache(maxsize=4)
def _run_config(items: tuple) -> RunConfig:
    return RunConfig.from_flat(dict(items))


def site_and_run(node_config: dict, run_config: dict) -> tuple[SiteSettings, RunConfig]:
    """The site's node config and the run's settings (parsed once per run), or ConfigError."""
    try:
        run = _run_config(tuple(sorted(run_config.items())))
        settings = site_settings(node_config, run.coordinator.simulation_sites)
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError("the node or run config is not usable at this site") from exc
    return settings, run


def _decode(student: bytes) -> dict[str, torch.Tensor]:
    try:
        return wire.decode_state(student)
    except ValueError as exc:
        raise ConfigError("the student in the message is unreadable") from exc


def store_teacher(settings: SiteSettings, sha: str, teacher: TeacherDelivery) -> None:
    from client.site_state import TeacherCache

    TeacherCache(settings.cache_dir, settings.teacher_signer).store(
        teacher.blob, teacher.sidecar, sha, teacher.signature)
    log.info("teacher %s… stored in the site cache", sha[:12])


def train(node_config: dict, run_config: dict, fields: RoundFields,
          teacher: TeacherDelivery | None, student: bytes
          ) -> tuple[bytes, dict[str, float], dict[str, float] | None]:
    """One round at this site: (student file to send, train metrics, incoming evaluation).

    ``student`` is the global student's file as it came (possibly float16 tensors); the file
    returned holds the tensors in the run's transfer form
    (:func:`moma_protocol.wire.pack_update`).
    """
    from client.site_training import evaluate_round, train_round

    settings, run = site_and_run(node_config, run_config)
    if teacher is not None:
        store_teacher(settings, fields.teacher_sha, teacher)
    global_state = wire.unpack_global(_decode(student))
    incoming = None
    started = time.time()
    if fields.score_incoming:
        n_val, m = evaluate_round(settings, run, global_state)
        incoming = {**m, wire.NUM_EXAMPLES: n_val}
    eval_s = time.time() - started
    state, n, metrics = train_round(settings, run, fields.server_round, global_state,
                                    fields.teacher_sha)
    metrics[wire.NUM_EXAMPLES] = n
    if fields.score_incoming:  # the site's own work this round, with train-time-s
        metrics[wire.EVAL_TIME] = eval_s
    if run.privacy.client_dp == "site-clipping":  # bounded before it leaves the site
        from moma_protocol.clipping import clip_update

        state = clip_update(state, global_state,
                            fields.clipping_norm or run.privacy.client_dp_clipping_norm)
    sent = wire.pack_update(state, global_state, run.federation.transfer_dtype)
    return wire.encode_blob(sent), metrics, incoming


def evaluate(node_config: dict, run_config: dict, student: bytes) -> dict[str, float]:
    """The global student's metrics on this site's validation split."""
    from client.site_training import evaluate_round

    settings, run = site_and_run(node_config, run_config)
    n, metrics = evaluate_round(settings, run, wire.unpack_global(_decode(student)))
    metrics[wire.NUM_EXAMPLES] = n
    return metrics
