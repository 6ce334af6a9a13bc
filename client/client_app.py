"""The site's Flower ClientApp: thin glue from messages to :mod:`client.site_training`.

Handlers: ``query.teacher_status`` (first contact only: does the cache hold the named teacher?),
``train`` (store the teacher if it came along; with ``evaluate`` in the message, first score
the incoming global student on the validation split; train; reply with the student, aggregate
metrics, ``teacher-cached`` and the evaluation — one exchange per round), ``evaluate`` (the
final global student after the last round). Site settings come from the node config only; the
run's settings from Flower's run config, read once per run in this process; a message carries
only what changes per round. The handlers import the training stack only when they need it:
the status query only hashes a file.

Every handler is guarded (:func:`guarded`): an exception is logged here in full and answered
with its category only (:func:`client.site_errors.error_reply`), and a reply is checked against
the protocol before it leaves (:func:`moma_protocol.wire.check_site_reply`); one that fails is
withheld and answered ``internal-error``.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.site_config import SiteSettings, site_settings
from client.site_errors import ConfigError, error_category, error_reply
from moma_protocol import wire as P
from moma_protocol.settings import RunConfig

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
    return set(content[P.ARRAYS].keys()) if P.ARRAYS in content else set()


@functools.lru_cache(maxsize=4)
def _run_config(run_id: int, items: tuple) -> RunConfig:
    return RunConfig.from_flat(dict(items))


def site_and_run(context: Context) -> tuple[SiteSettings, RunConfig]:
    """The site's node config and the run's settings (parsed once per run), or ConfigError."""
    try:
        run = _run_config(context.run_id, tuple(sorted(context.run_config.items())))
        settings = site_settings(context.node_config, run.coordinator.simulation_sites)
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError("the node or run config is not usable at this site") from exc
    return settings, run


def _round_fields(msg: Message) -> tuple[str, int, bool]:
    try:
        config = msg.content[P.CONFIG]
        return (str(config[P.TEACHER_SHA]), int(config[P.SERVER_ROUND]),
                bool(config.get(P.EVALUATE_FLAG, False)))
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError("the train message lacks the teacher hash or round") from exc


@app.query("teacher_status")
@guarded
def teacher_status(msg: Message, context: Context) -> Message:
    from client.site_state import TeacherCache

    settings, _ = site_and_run(context)
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


def _store_teacher(msg: Message, settings: SiteSettings, sha: str) -> None:
    from client.site_state import TeacherCache
    from moma_core.checkpoint import CheckpointError

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


@app.train()
@guarded
def train(msg: Message, context: Context) -> Message:
    from client.site_training import evaluate_round, train_round

    settings, run = site_and_run(context)
    sha, server_round, score_incoming = _round_fields(msg)
    if P.TEACHER in msg.content:
        _store_teacher(msg, settings, sha)
    global_state = P.unpack_global(msg.content[P.ARRAYS].to_torch_state_dict())
    records: dict = {}
    if score_incoming:
        n_val, m = evaluate_round(settings, run, global_state)
        records[P.EVAL_METRICS] = MetricRecord({**m, P.NUM_EXAMPLES: n_val})
    state, n, metrics = train_round(settings, run, server_round, global_state, sha)
    metrics[P.NUM_EXAMPLES] = n
    sent = P.pack_update(state, global_state, run.federation.transfer_dtype)
    records = {P.ARRAYS: ArrayRecord(sent), P.METRICS: MetricRecord(metrics), **records}
    return Message(RecordDict(records), reply_to=msg)


@app.evaluate()
@guarded
def evaluate(msg: Message, context: Context) -> Message:
    from client.site_training import evaluate_round

    settings, run = site_and_run(context)
    n, metrics = evaluate_round(settings, run,
                                P.unpack_global(msg.content[P.ARRAYS].to_torch_state_dict()))
    metrics[P.NUM_EXAMPLES] = n
    return Message(RecordDict({P.METRICS: MetricRecord(metrics)}), reply_to=msg)
