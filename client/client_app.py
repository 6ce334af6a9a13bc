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
cannot be reached, this process runs the same :mod:`client.site_round` functions itself
(:mod:`client.site_messages`, which the secure round uses too).

Every handler is guarded (:func:`guarded`): an exception is logged here in full and answered
with its category only (:func:`client.site_errors.error_reply`), and a reply is checked against
the protocol before it leaves (:func:`moma_protocol.wire.check_site_reply`); one that fails is
withheld and answered ``internal-error``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.site_errors import ConfigError, error_category, error_reply
from client.site_messages import run_evaluate, run_train
from client.site_round import site_and_run
from moma_protocol import secagg as secagg_protocol
from moma_protocol import wire

log = logging.getLogger("moma.client")
app = ClientApp()

Handler = Callable[[Message, Context], Message]


def guarded(handler: Handler) -> Handler:
    """``handler`` whose exceptions and non-conforming replies become category-only errors."""

    @functools.wraps(handler)
    def run(msg: Message, context: Context) -> Message:
        kind = msg.metadata.message_type
        secure = kind == wire.TRAIN and msg.has_content() and \
            secagg_protocol.is_secagg(msg.content)
        # the stage is read before the protocol consumes it
        stage = secagg_protocol.stage_of(msg.content) if secure else None
        try:
            reply = handler(msg, context)
            if reply.has_error():
                problems = wire.check_error_reply(reply)
            elif stage is not None:
                problems = secagg_protocol.check_secagg_reply(reply.content, stage)
            else:
                problems = wire.check_site_reply(reply.content, kind, _sent_arrays(msg))
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # nothing but a category may leave the site
            category = error_category(exc)
            log.exception("%s failed; the coordinator is told only %r", kind, category)
            return error_reply(msg, exc)
        if problems:
            log.error("%s: reply withheld, it breaks the protocol (%s); the coordinator is "
                      "told 'internal-error'", kind, "; ".join(problems))
            return wire.category_reply(msg, "internal-error")
        return reply

    return run


def _sent_arrays(msg: Message) -> set[str]:
    """Names of the model state the coordinator sent (a reply's arrays must be among them)."""
    content = msg.content if msg.has_content() else RecordDict()
    try:
        return set(wire.state_header(wire.state_blob(content[wire.ARRAYS])))
    except (KeyError, ValueError):
        return set()


@app.query("teacher_status")
@guarded
def teacher_status(msg: Message, context: Context) -> Message:
    from client.site_state import TeacherCache

    settings, _ = site_and_run(context.node_config, context.run_config)
    try:
        sha = str(msg.content[wire.CONFIG][wire.TEACHER_SHA])
    except (KeyError, TypeError) as exc:
        raise ConfigError("the query lacks the teacher hash") from exc
    has = bool(sha) and TeacherCache(settings.cache_dir, settings.teacher_signer).has(sha)
    records = {wire.METRICS: MetricRecord({wire.HAS_TEACHER: int(has)})}
    if wire.valid_site_name(settings.site_name):
        records[wire.CONFIG] = ConfigRecord({wire.SITE_NAME: settings.site_name})
    else:
        log.warning("site-name is not a short identifier (%s): it is not sent",
                    wire.SITE_NAME_PATTERN.pattern)
    return Message(RecordDict(records), reply_to=msg)


@app.train()
@guarded
def train(msg: Message, context: Context) -> Message:
    if secagg_protocol.is_secagg(msg.content):  # a stage of secure aggregation (client.secagg_site)
        from client.secagg_site import secure_stage

        return secure_stage(msg, context)
    sent, metrics, incoming = run_train(msg, context)
    records = {wire.ARRAYS: wire.blob_record(sent), wire.METRICS: MetricRecord(metrics)}
    if incoming is not None:
        records[wire.EVAL_METRICS] = MetricRecord(incoming)
    return Message(RecordDict(records), reply_to=msg)


@app.evaluate()
@guarded
def evaluate(msg: Message, context: Context) -> Message:
    metrics = run_evaluate(msg, context)
    return Message(RecordDict({wire.METRICS: MetricRecord(metrics)}), reply_to=msg)
