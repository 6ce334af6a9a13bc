"""The site's Flower ClientApp: thin glue from messages to :mod:`client.site_training`.

Handlers: ``query.teacher_status`` (does the cache hold the named teacher?), ``train`` (store the
teacher if it came along, train, reply with the student and aggregate metrics), ``evaluate``
(global student on the site's validation split). Site settings come from the node config only.

Every handler is guarded (:func:`guarded`): an exception is logged here in full and answered
with its category only (:func:`client.protocol.error_reply`), and a reply is checked against the
protocol before it leaves (:func:`client.protocol.check_site_reply`); one that fails is withheld
and answered ``internal-error``.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import protocol as P
from client.site_config import SiteSettings, site_settings
from client.site_state import TeacherCache
from client.site_training import evaluate_round, train_round
from moma_core.checkpoint import CheckpointError
from moma_core.config import RunConfig

log = logging.getLogger("moma.client")
app = ClientApp()

Handler = Callable[[Message, Context], Message]


def guarded(handler: Handler) -> Handler:
    """``handler`` whose exceptions and non-conforming replies become category-only errors."""

    @functools.wraps(handler)
    def run(msg: Message, context: Context) -> Message:
        kind = msg.metadata.message_type
        try:
            reply = handler(msg, context)
            problems = (P.check_error_reply(reply) if reply.has_error() else
                        P.check_site_reply(reply.content, kind, _sent_arrays(msg)))
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # nothing but a category may leave the site
            category = P.error_category(exc)
            log.exception("%s failed; the coordinator is told only %r", kind, category)
            return P.error_reply(msg, exc)
        if problems:
            log.error("%s: reply withheld, it breaks the protocol (%s); the coordinator is "
                      "told 'internal-error'", kind, "; ".join(problems))
            return P.category_reply(msg, "internal-error")
        return reply

    return run


def _sent_arrays(msg: Message) -> set[str]:
    """Names of the model state the coordinator sent (a reply's arrays must be among them)."""
    content = msg.content if msg.has_content() else RecordDict()
    return set(content[P.ARRAYS].keys()) if P.ARRAYS in content else set()


def _settings_and_run(msg: Message, context: Context) -> tuple[SiteSettings, RunConfig]:
    """The site's node config and the run config, or :class:`ConfigError`."""
    try:
        settings = site_settings(context.node_config)
        run = RunConfig.from_flat({**context.run_config, **dict(msg.content[P.CONFIG])})
    except (ValueError, KeyError, TypeError) as exc:
        raise P.ConfigError("the node or run config is not usable at this site") from exc
    return settings, run


@app.query("teacher_status")
@guarded
def teacher_status(msg: Message, context: Context) -> Message:
    try:
        settings = site_settings(context.node_config)
        sha = str(msg.content[P.CONFIG][P.TEACHER_SHA])
    except (ValueError, KeyError, TypeError) as exc:
        raise P.ConfigError("the node config or the query is not usable") from exc
    has = bool(sha) and TeacherCache(settings.cache_dir, settings.teacher_signer).has(sha)
    records = {P.METRICS: MetricRecord({P.HAS_TEACHER: int(has)})}
    if P.valid_site_name(settings.site_name):
        records[P.CONFIG] = ConfigRecord({P.SITE_NAME: settings.site_name})
    else:
        log.warning("site-name is not a short identifier (%s): it is not sent",
                    P.SITE_NAME_PATTERN.pattern)
    return Message(RecordDict(records), reply_to=msg)


@app.train()
@guarded
def train(msg: Message, context: Context) -> Message:
    settings, run = _settings_and_run(msg, context)
    config: ConfigRecord = msg.content[P.CONFIG]
    try:
        sha, server_round = str(config[P.TEACHER_SHA]), int(config["server-round"])
    except (KeyError, TypeError, ValueError) as exc:
        raise P.ConfigError("the train message lacks the teacher hash or round") from exc
    if P.TEACHER in msg.content:
        try:
            blob = P.array_to_bytes(msg.content[P.TEACHER][P.TEACHER_FILE].numpy())
            meta = msg.content[P.TEACHER_META]
            sidecar = json.loads(str(meta["sidecar"]))
            signature = json.loads(str(meta[P.TEACHER_SIGNATURE])) \
                if P.TEACHER_SIGNATURE in meta else None
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError("the teacher package in the message is unreadable") from exc
        TeacherCache(settings.cache_dir, settings.teacher_signer).store(blob, sidecar, sha,
                                                                        signature)
        log.info("teacher %s… stored in the site cache", sha[:12])
    global_state = msg.content[P.ARRAYS].to_torch_state_dict()
    state, n, metrics = train_round(settings, run, server_round, global_state, sha)
    metrics[P.NUM_EXAMPLES] = n
    return Message(RecordDict({P.ARRAYS: ArrayRecord(state), P.METRICS: MetricRecord(metrics)}),
                   reply_to=msg)


@app.evaluate()
@guarded
def evaluate(msg: Message, context: Context) -> Message:
    settings, run = _settings_and_run(msg, context)
    n, metrics = evaluate_round(settings, run, msg.content[P.ARRAYS].to_torch_state_dict())
    metrics[P.NUM_EXAMPLES] = n
    return Message(RecordDict({P.METRICS: MetricRecord(metrics)}), reply_to=msg)
