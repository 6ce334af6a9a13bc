"""FedBN: a site's normalisation layers never leave it; the coordinator keeps the global ones."""


import pytest
import torch
from flwr.app import MetricRecord, RecordDict

from client.site_state import SiteState
from client.site_training import site_data, student_for, train_round
from moma_core.models import Architecture, build_model, norm_state_keys
from moma_protocol import wire
from server.aggregation import Aggregator, check_update
from tests.helpers import IMAGE_SIZE, site_with_teacher, tiny_run


@pytest.fixture
def site(tmp_path):
    return site_with_teacher(tmp_path)


def _student(run):
    torch.manual_seed(0)
    return build_model(Architecture(run.federation.student_model, run.class_names, IMAGE_SIZE))


def local_keys(run, student):
    return wire.local_keys(run.federation.fedbn, student)


def aggregate(updates, weights, method, reference):
    return Aggregator(run_fed(method))(1, updates, weights, reference)


def run_fed(method):
    return tiny_run(fedbn=True, aggregation=method).federation


def _global(run):
    return wire.wire_state(_student(run).state_dict())


def test_local_keys_are_the_normalisation_layers_only_under_fedbn():
    on, off = tiny_run(fedbn=True), tiny_run()
    student = _student(on)
    norm = norm_state_keys(student)
    assert norm and local_keys(on, student) == norm and local_keys(off, student) == set()
    assert any(k.endswith("running_mean") for k in norm)
    assert not any("conv" in k and k.endswith("weight") for k in norm)


def test_fedbn_site_sends_no_normalisation_tensors_and_keeps_them(site):
    settings, sha = site
    run = tiny_run(fedbn=True, run_name="fedbn")
    start = _global(run)
    kept = local_keys(run, _student(run)) & set(start)
    sent, n, metrics = train_round(settings, run, 1, start, sha)
    assert kept and not set(sent) & kept and set(sent) == set(start) - kept
    local = SiteState(settings.cache_dir, run.federation.run_name).local_layers()
    assert kept <= set(local) <= norm_state_keys(_student(run))
    key = next(k for k in sorted(kept) if k.endswith("running_mean"))
    assert not torch.equal(local[key], start[key])  # trained here, stored here
    # the reply passes the site's and the coordinator's checks
    reply = RecordDict({wire.ARRAYS: wire.encode_state(sent),
                        wire.METRICS: MetricRecord({**metrics, wire.NUM_EXAMPLES: n})})
    assert wire.check_site_reply(reply, wire.TRAIN, set(start)) == []
    assert check_update(sent, start, local_keys(run, _student(run))) is None
    # next round: the site's own normalisation layers, the global rest
    data = site_data(settings, run.federation.image_size, run.training.augment)
    student = student_for(run, data, start, local)
    assert torch.equal(student.state_dict()[key], local[key])
    conv = next(k for k in start if "conv" in k and k not in kept)
    assert torch.equal(student.state_dict()[conv], start[conv])
    # a next round may even arrive without them (local-only use): the site's copy fills in
    student = student_for(run, data, sent, local)
    assert torch.equal(student.state_dict()[key], local[key])


def test_coordinator_keeps_the_global_normalisation_values():
    run = tiny_run(fedbn=True)
    reference = _global(run)
    kept = local_keys(run, _student(run))
    updates = [{k: v + (i + 1) for k, v in reference.items() if k not in kept}
               for i in range(3)]
    assert all(check_update(u, reference, kept) is None for u in updates)
    for method in ("fedavg", "median", "trimmed-mean", "fedadam"):
        new = aggregate(updates, [1.0, 1.0, 2.0], method, reference=reference)
        assert set(new) == set(reference)
        for k in reference:
            if k in kept:
                assert torch.equal(new[k], reference[k]), (method, k)
            else:
                assert not torch.equal(new[k], reference[k]), (method, k)
    new = aggregate(updates, [1.0, 1.0, 2.0], "fedavg", reference=reference)
    conv = next(k for k in reference if k not in kept)
    assert torch.allclose(new[conv], reference[conv] + 2.25)  # (1·1 + 1·2 + 2·3) / 4


def test_without_fedbn_an_update_that_omits_a_tensor_is_rejected():
    run = tiny_run()
    reference = _global(run)
    kept = local_keys(run, _student(run))
    assert kept == set()
    norm = norm_state_keys(_student(run)) & set(reference)
    without_norm = {k: v for k, v in reference.items() if k not in norm}
    assert "missing" in check_update(without_norm, reference, kept)
    one = next(iter(reference))
    assert "missing" in check_update({k: v for k, v in reference.items() if k != one},
                                     reference, kept)


def test_with_fedbn_other_problems_are_still_rejected():
    run = tiny_run(fedbn=True)
    reference = _global(run)
    kept = local_keys(run, _student(run))
    good = {k: v.clone() for k, v in reference.items() if k not in kept}
    conv = next(k for k in good if "conv" in k)
    assert "missing" in check_update({k: v for k, v in good.items() if k != conv},
                                     reference, kept)
    assert "shape" in check_update({**good, conv: torch.zeros(3)}, reference, kept)
    assert "NaN" in check_update({**good, conv: torch.full_like(good[conv], float("nan"))},
                                 reference, kept)
    assert "kept-local" in check_update(reference, reference, kept)  # sent what it keeps
    assert "1 unexpected" in check_update({**good, "queue.queue": torch.zeros(2)},
                                          reference, kept)


def test_coordinator_aggregates_fedbn_updates_keeping_global_normalisation():
    import time

    from flwr.app import Message
    from flwr.common import Metadata

    from server.round import Coordinator, SiteReport

    run = tiny_run(fedbn=True)
    reference = _global(run)
    coordinator = Coordinator(None, run, None)
    assert coordinator.local_keys == local_keys(run, _student(run))
    meta = Metadata(run_id=1, message_id="m", src_node_id=0, dst_node_id=1,
                    reply_to_message_id="", group_id="", created_at=time.time(), ttl=60.0,
                    message_type=wire.TRAIN)
    sent = Message(RecordDict(), metadata=meta)
    replies = []
    for node in (1, 2):
        update = {k: v + node for k, v in reference.items() if k not in coordinator.local_keys}
        content = RecordDict({wire.ARRAYS: wire.encode_state(update),
                              wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 10})})
        replies.append((node, Message(content, reply_to=sent)))
    sites = {n: SiteReport(n, f"site-{n}") for n in (1, 2)}
    updates, weights = coordinator._check_replies(replies, reference, sites)
    assert [s.status for s in sites.values()] == ["ok", "ok"]
    state = coordinator.aggregator(1, updates, weights, reference)
    assert set(state) == set(reference)
    for k in reference:
        expected = reference[k] if k in coordinator.local_keys else reference[k] + 1.5
        assert torch.allclose(state[k], expected), k
