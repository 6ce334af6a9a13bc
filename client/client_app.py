"""The site's Flower ClientApp: thin glue from messages to :mod:`client.site_training`.

Handlers: ``query.teacher_status`` (does the cache hold the named teacher?), ``train`` (store the
teacher if it came along, train, reply with the student and aggregate metrics), ``evaluate``
(global student on the site's validation split). Site settings come from the node config only.
"""

from __future__ import annotations

import json
import logging

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import protocol as P
from client.site_config import site_settings
from client.site_state import TeacherCache
from client.site_training import evaluate_round, train_round
from moma_core.config import RunConfig

log = logging.getLogger("moma.client")
app = ClientApp()


@app.query("teacher_status")
def teacher_status(msg: Message, context: Context) -> Message:
    settings = site_settings(context.node_config)
    sha = str(msg.content[P.CONFIG][P.TEACHER_SHA])
    has = bool(sha) and TeacherCache(settings.cache_dir).has(sha)
    return Message(RecordDict({P.METRICS: MetricRecord({"has-teacher": int(has)}),
                               P.CONFIG: ConfigRecord({"site-name": settings.site_name})}),
                   reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    settings = site_settings(context.node_config)
    config: ConfigRecord = msg.content[P.CONFIG]
    run = RunConfig.from_flat({**context.run_config, **dict(config)})
    sha = str(config[P.TEACHER_SHA])
    if P.TEACHER in msg.content:
        blob = P.array_to_bytes(msg.content[P.TEACHER][P.TEACHER_FILE].numpy())
        sidecar = json.loads(str(msg.content[P.TEACHER_META]["sidecar"]))
        TeacherCache(settings.cache_dir).store(blob, sidecar, sha)
        log.info("teacher %s… stored in the site cache", sha[:12])
    global_state = msg.content[P.ARRAYS].to_torch_state_dict()
    state, n, metrics = train_round(settings, run, int(config["server-round"]),
                                    global_state, sha)
    metrics[P.NUM_EXAMPLES] = n
    return Message(RecordDict({P.ARRAYS: ArrayRecord(state), P.METRICS: MetricRecord(metrics)}),
                   reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    settings = site_settings(context.node_config)
    run = RunConfig.from_flat({**context.run_config, **dict(msg.content[P.CONFIG])})
    n, metrics = evaluate_round(settings, run, msg.content[P.ARRAYS].to_torch_state_dict())
    metrics[P.NUM_EXAMPLES] = n
    return Message(RecordDict({P.METRICS: MetricRecord(metrics)}), reply_to=msg)
