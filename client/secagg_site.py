"""A site's side of a secure-aggregation round (``secagg = "secaggplus"``).

The four SecAgg+ stage messages of a round arrive as train messages; Flower's
``secaggplus_mod`` runs the protocol (its keys and shares kept in the ClientApp's context
between the stages) and, at the masked-vector stage, calls the site's training — the same
round as without secure aggregation (:func:`client.site_messages.run_train`). What leaves the site
is then the change of the global student, weighted and masked; the metrics go as usual. Before
the protocol runs, the site checks what the coordinator asks (:mod:`moma_protocol.secagg`):
a setup whose threshold would let a coordinator unmask one site, or an unmask request naming a
site both alive and dropped, is refused (``privacy-refused``).
"""

from __future__ import annotations

import numpy as np
from flwr.app import Context, Message

from client.flwr_compat import Key, Stage
from client.site_errors import ConfigError, PrivacyRefused
from client.site_messages import run_train
from client.site_round import site_and_run
from moma_protocol import secagg as secagg_protocol
from moma_protocol import wire


def secure_stage(msg: Message, context: Context) -> Message:
    """Answer one SecAgg+ stage message (see module docstring)."""
    from flwr.client.mod import secaggplus_mod

    secagg_protocol.install_secure_masks()
    configs = msg.content.config_records[secagg_protocol.CONFIGS]
    stage = str(configs.get(Key.STAGE, ""))
    problem = None
    if stage == Stage.SETUP:
        _same_ranges(configs, context)
        problem = secagg_protocol.check_setup(configs)
    elif stage == Stage.UNMASK:
        problem = secagg_protocol.check_unmask(configs)
    if problem:
        raise PrivacyRefused(problem)

    def masked_train(m: Message, c: Context) -> Message:
        return weighted_update(m, c)

    return secaggplus_mod(msg, context, masked_train)


def _same_ranges(configs, context: Context) -> None:
    """The setup's quantisation ranges must be the run's (what this site checks its update
    against): a coordinator that sent others would get a clipped, useless sum."""
    _, run = site_and_run(context.node_config, context.run_config)
    p = run.privacy
    try:
        sent = (float(configs[Key.CLIPPING_RANGE]), float(configs[Key.MAX_WEIGHT]))
    except (KeyError, TypeError, ValueError):
        raise ConfigError("the secure-aggregation setup lacks its ranges") from None
    if sent != (p.secagg_clipping_range, p.secagg_max_weight):
        raise ConfigError("the secure-aggregation setup's ranges are not the run's")


def weighted_update(msg: Message, context: Context) -> Message:
    """The site's round as the legacy fit result the protocol masks: the change of the global
    student (float32, :func:`moma_protocol.secagg.update_arrays`) and its weight (examples, or
    1 under client-level DP)."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from safetensors.numpy import load as load_arrays

    from client.flwr_compat import fitres_to_recorddict

    _, run = site_and_run(context.node_config, context.run_config)
    sent, metrics, _ = run_train(msg, context)
    try:
        start = load_arrays(wire.state_blob(msg.content[wire.ARRAYS]))
        update = secagg_protocol.update_arrays(load_arrays(sent), start)
    except (KeyError, ValueError) as exc:
        raise ConfigError("the round's student cannot be compared with the global one") \
            from exc
    examples = int(metrics.get(wire.NUM_EXAMPLES, 0))
    weight = 1 if run.privacy.client_dp != "off" else examples
    p = run.privacy
    if weight > p.secagg_max_weight:
        raise ConfigError(f"{weight} examples exceed the run's secagg-max-weight "
                          f"{p.secagg_max_weight:g} (the masked sum could overflow)")
    largest = max((float(np.abs(a).max()) for a in update if a.size), default=0.0)
    if largest * weight / p.secagg_max_weight > p.secagg_clipping_range:
        raise ConfigError(f"a coordinate of this site's weighted update exceeds the run's "
                          f"secagg-clipping-range {p.secagg_clipping_range:g}")
    fit = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(update), weight,
                 {k: float(v) for k, v in metrics.items()})
    return Message(fitres_to_recorddict(fit, False), reply_to=msg)
