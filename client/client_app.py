"""The site's Flower ClientApp: thin glue from messages to :mod:`client.site_round`.

Handlers: ``query.teacher_status`` (first contact only: does the cache hold the named teacher?),
``train`` (store the teacher if it came along; with ``evaluate`` in the message, first score
the incoming global student on the validation split; train; reply with the student, aggregate
metrics, ``teacher-cached`` and the evaluation — one exchange per round), ``evaluate`` (the
final global student after the last round). Site settings come from the node config only; the
run's settings from Flower's run config, read once per run in this process; a message carries
only what changes per round. The handlers import the training stack only when they need it:
the status query only hashes a file. When the node config names the site's warm worker
(``site-worker``, set by ``moma-client``), train and evaluate are forwarded to it
(:mod:`client.site_worker`) and this process loads no torch at all; without it, or when it
cannot be reached, this process runs the same :mod:`client.site_round` functions itself.

Every handler is guarded (:func:`guarded`): an exception is logged here in full and answered
with its category only (:func:`client.site_errors.error_reply`), and a reply is checked against
the protocol before it leaves (:func:`moma_protocol.wire.check_site_reply`); one that fails is
withheld and answered ``internal-error``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
from collections.abc import Callable

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import site_round, site_worker
from client.site_errors import ConfigError, error_category, error_reply
from client.site_round import RoundFields, TeacherDelivery, site_and_run
from client.site_worker import NODE_KEY
from moma_protocol import secagg as S
from moma_protocol import wire as P

log = logging.getLogger("moma.client")
app = ClientApp()

Handler = Callable[[Message, Context], Message]


def guarded(handler: Handler) -> Handler:
    """``handler`` whose exceptions and non-conforming replies become category-only errors."""

    @functools.wraps(handler)
    def run(msg: Message, context: Context) -> Message:
        kind = msg.metadata.message_type
        stage = S.stage_of(msg.content) if kind == P.TRAIN and msg.has_content() and \
            S.is_secagg(msg.content) else None  # read before the protocol consumes it
        try:
            reply = handler(msg, context)
            if reply.has_error():
                problems = P.check_error_reply(reply)
            elif stage is not None:
                problems = S.check_secagg_reply(reply.content, stage)
            else:
                problems = P.check_site_reply(reply.content, kind, _sent_arrays(msg))
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # nothing but a category may leave the site
            category = error_category(exc)
            log.exception("%s failed; the coordinator is told only %r", kind, category)
            return error_reply(msg, exc)
        if problems:
            log.error("%s: reply withheld, it breaks the protocol (%s); the coordinator is "
                      "told 'internal-error'", kind, "; ".join(problems))
            return P.category_reply(msg, "internal-error")
        return reply

    return run


def _sent_arrays(msg: Message) -> set[str]:
    """Names of the model state the coordinator sent (a reply's arrays must be among them)."""
    content = msg.content if msg.has_content() else RecordDict()
    try:
        return set(P.state_header(P.state_blob(content[P.ARRAYS])))
    except (KeyError, ValueError):
        return set()


def _round_fields(msg: Message) -> RoundFields:
    try:
        config = msg.content[P.CONFIG]
        fields = RoundFields(str(config[P.TEACHER_SHA]), int(config[P.SERVER_ROUND]),
                             bool(config.get(P.EVALUATE_FLAG, False)),
                             float(config.get(P.CLIPPING_NORM, 0.0)))
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError("the train message lacks the teacher hash or round") from exc
    if not (fields.clipping_norm >= 0 and math.isfinite(fields.clipping_norm)):
        raise ConfigError("the train message's clipping norm is not a norm")
    return fields


def _teacher(msg: Message) -> TeacherDelivery | None:
    """The teacher package the message carries, if any."""
    if P.TEACHER not in msg.content:
        return None
    try:
        blob = P.array_to_bytes(msg.content[P.TEACHER][P.TEACHER_FILE].numpy())
        meta = msg.content[P.TEACHER_META]
        sidecar = json.loads(str(meta["sidecar"]))
        signature = json.loads(str(meta[P.TEACHER_SIGNATURE])) \
            if P.TEACHER_SIGNATURE in meta else None
    except (KeyError, TypeError, ValueError) as exc:
        raise _unreadable_teacher() from exc
    if not isinstance(sidecar, dict) or not (signature is None or isinstance(signature, dict)):
        raise _unreadable_teacher()
    return TeacherDelivery(blob, sidecar, signature)


def _unreadable_teacher() -> Exception:
    from moma_core.checkpoint import CheckpointError  # loads the model stack: on failure only

    return CheckpointError("the teacher package in the message is unreadable")


def _student(msg: Message) -> bytes:
    try:
        return P.state_blob(msg.content[P.ARRAYS])
    except (KeyError, ValueError) as exc:
        raise ConfigError("the message lacks a readable student") from exc


def _on_worker(context: Context, header: dict, parts: list[bytes]) -> tuple[dict, list] | None:
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


@app.query("teacher_status")
@guarded
def teacher_status(msg: Message, context: Context) -> Message:
    from client.site_state import TeacherCache

    settings, _ = site_and_run(context.node_config, context.run_config)
    try:
        sha = str(msg.content[P.CONFIG][P.TEACHER_SHA])
    except (KeyError, TypeError) as exc:
        raise ConfigError("the query lacks the teacher hash") from exc
    has = bool(sha) and TeacherCache(settings.cache_dir, settings.teacher_signer).has(sha)
    records = {P.METRICS: MetricRecord({P.HAS_TEACHER: int(has)})}
    if P.valid_site_name(settings.site_name):
        records[P.CONFIG] = ConfigRecord({P.SITE_NAME: settings.site_name})
    else:
        log.warning("site-name is not a short identifier (%s): it is not sent",
                    P.SITE_NAME_PATTERN.pattern)
    return Message(RecordDict(records), reply_to=msg)


def run_train(msg: Message, context: Context) -> tuple[bytes, dict, dict | None]:
    """The site's round for a train message (on its warm worker when it has one): the
    student file it sends, its metrics and its evaluation of the incoming student."""
    fields, teacher, student = _round_fields(msg), _teacher(msg), _student(msg)
    header = {"op": "train", "fields": dataclasses.asdict(fields),
              "teacher": None if teacher is None else
              {"sidecar": teacher.sidecar, "signature": teacher.signature}}
    answer = _on_worker(context, header,
                        [student] + ([teacher.blob] if teacher is not None else []))
    if answer is not None:
        reply, parts = answer
        return parts[0], reply["metrics"], reply["incoming"]
    return site_round.train(context.node_config, context.run_config, fields, teacher, student)


@app.train()
@guarded
def train(msg: Message, context: Context) -> Message:
    if S.is_secagg(msg.content):  # a stage of secure aggregation (client.secagg_site)
        from client.secagg_site import secure_stage

        return secure_stage(msg, context, run_train)
    sent, metrics, incoming = run_train(msg, context)
    records = {P.ARRAYS: P.blob_record(sent), P.METRICS: MetricRecord(metrics)}
    if incoming is not None:
        records[P.EVAL_METRICS] = MetricRecord(incoming)
    return Message(RecordDict(records), reply_to=msg)


@app.evaluate()
@guarded
def evaluate(msg: Message, context: Context) -> Message:
    student = _student(msg)
    answer = _on_worker(context, {"op": "evaluate"}, [student])
    if answer is not None:
        metrics = answer[0]["metrics"]
    else:
        metrics = site_round.evaluate(context.node_config, context.run_config, student)
    return Message(RecordDict({P.METRICS: MetricRecord(metrics)}), reply_to=msg)
