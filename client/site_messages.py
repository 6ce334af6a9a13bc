"""A train or evaluate message to the site's round: what both the ClientApp
(:mod:`client.client_app`) and the secure round (:mod:`client.secagg_site`) do with one.

The message's fields are read and checked here (:func:`round_fields`, :func:`teacher_of`,
:func:`student_of`); the work is done on the site's warm worker when it has one
(:mod:`client.site_worker`), otherwise in this process by the same :mod:`client.site_round`
functions. Importing this module loads no torch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math

from flwr.app import Context, Message

from client import site_round, site_worker
from client.site_errors import ConfigError
from client.site_round import RoundFields, TeacherDelivery
from client.site_worker import NODE_KEY
from moma_protocol import wire

log = logging.getLogger("moma.client")


def round_fields(msg: Message) -> RoundFields:
    """The round's fields of a train message (ConfigError when they are missing or bad)."""
    try:
        config = msg.content[wire.CONFIG]
        fields = RoundFields(str(config[wire.TEACHER_SHA]), int(config[wire.SERVER_ROUND]),
                             bool(config.get(wire.EVALUATE_FLAG, False)),
                             float(config.get(wire.CLIPPING_NORM, 0.0)))
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError("the train message lacks the teacher hash or round") from exc
    if not (fields.clipping_norm >= 0 and math.isfinite(fields.clipping_norm)):
        raise ConfigError("the train message's clipping norm is not a norm")
    return fields


def teacher_of(msg: Message) -> TeacherDelivery | None:
    """The teacher package the message carries, if any."""
    if wire.TEACHER not in msg.content:
        return None
    try:
        blob = wire.array_to_bytes(msg.content[wire.TEACHER][wire.TEACHER_FILE].numpy())
        meta = msg.content[wire.TEACHER_META]
        sidecar = json.loads(str(meta["sidecar"]))
        signature = json.loads(str(meta[wire.TEACHER_SIGNATURE])) \
            if wire.TEACHER_SIGNATURE in meta else None
    except (KeyError, TypeError, ValueError) as exc:
        raise _unreadable_teacher() from exc
    if not isinstance(sidecar, dict) or not (signature is None or isinstance(signature, dict)):
        raise _unreadable_teacher()
    return TeacherDelivery(blob, sidecar, signature)


def _unreadable_teacher() -> Exception:
    from moma_core.checkpoint import CheckpointError  # loads the model stack: on failure only

    return CheckpointError("the teacher package in the message is unreadable")


def student_of(msg: Message) -> bytes:
    """The global student's file the message carries (ConfigError without one)."""
    try:
        return wire.state_blob(msg.content[wire.ARRAYS])
    except (KeyError, ValueError) as exc:
        raise ConfigError("the message lacks a readable student") from exc


def on_worker(context: Context, header: dict, parts: list[bytes]) -> tuple[dict, list] | None:
    """The site worker's answer to ``header`` (see :mod:`client.site_worker`), or None when
    this site has no worker or it cannot be reached (the caller then does the work itself)."""
    path = context.node_config.get(NODE_KEY)
    if not path:
        return None
    header = {**header, "node_config": dict(context.node_config),
              "run_config": dict(context.run_config)}
    try:
        return site_worker.call(str(path), header, parts)
    except site_worker.WorkerUnavailable as exc:
        log.warning("%s; doing the work in this process", exc)
        return None


def run_train(msg: Message, context: Context) -> tuple[bytes, dict, dict | None]:
    """The site's round for a train message (on its warm worker when it has one): the
    student file it sends, its metrics and its evaluation of the incoming student."""
    fields, teacher, student = round_fields(msg), teacher_of(msg), student_of(msg)
    header = {"op": "train", "fields": dataclasses.asdict(fields),
              "teacher": None if teacher is None else
              {"sidecar": teacher.sidecar, "signature": teacher.signature}}
    answer = on_worker(context, header,
                       [student] + ([teacher.blob] if teacher is not None else []))
    if answer is not None:
        reply, parts = answer
        return parts[0], reply["metrics"], reply["incoming"]
    return site_round.train(context.node_config, context.run_config, fields, teacher, student)


def run_evaluate(msg: Message, context: Context) -> dict[str, float]:
    """The final student's metrics on this site's validation split (on its warm worker when
    it has one)."""
    student = student_of(msg)
    answer = on_worker(context, {"op": "evaluate"}, [student])
    if answer is not None:
        return answer[0]["metrics"]
    return site_round.evaluate(context.node_config, context.run_config, student)
