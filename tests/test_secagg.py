"""Secure aggregation (``secagg = "secaggplus"``): Flower's SecAgg+ on both ends, with the
project's own train messages, masks and checks.

The federation here is driven in-process: a grid that hands each message to the real ClientApp
handlers of the site it is addressed to (each site with its own Flower context, as a SuperNode
keeps it), so the real protocol code of both ends runs, message by message, and a test can see
what the coordinator receives next to what each site computed."""

from __future__ import annotations

import copy
from collections import defaultdict

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import Key, Stage

from client import client_app, secagg_site
from client.site_errors import PrivacyRefused
from moma_core.models import build_model
from moma_protocol import secagg, wire
from moma_protocol.settings import ConfigError
from server.round import Coordinator
from tests.helpers import InProcessGrid, synthetic_sites, tiny_run

HANDLERS = {wire.TRAIN: client_app.train, wire.TEACHER_STATUS: client_app.teacher_status,
            wire.EVALUATE: client_app.evaluate}


class SiteGrid(InProcessGrid):
    """A grid whose sites are this process's ClientApp handlers (see module docstring).

    ``silent`` maps a node to the SecAgg+ stage from which on it no longer answers (a site
    that dropped out); ``masked`` keeps every masked vector the coordinator received."""

    def __init__(self, nodes: dict[int, dict], run_config: dict) -> None:
        super().__init__()
        self.contexts = {n: Context(run_id=1, node_id=n, node_config=cfg, state=RecordDict(),
                                    run_config=run_config) for n, cfg in nodes.items()}
        self.silent: dict[int, str] = {}
        self.masked: dict[int, list[np.ndarray]] = {}
        self.stages: dict[int, list[str]] = defaultdict(list)
        self.tamper: dict[int, object] = {}  # node → a function that alters its masked reply

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def answer(self, node: int, msg: Message) -> Message | None:
        stage = secagg.stage_of(msg.content) if secagg.is_secagg(msg.content) else None
        if stage:
            self.stages[node].append(stage)
        stages = list(Stage.all())
        if node in self.silent and stage is not None and \
                stages.index(stage) >= stages.index(self.silent[node]):
            return None  # dropped out: no reply
        # a site gets its own copy, as over the network (Flower's stages share contents)
        reply = HANDLERS[msg.metadata.message_type](copy.deepcopy(msg), self.contexts[node])
        if stage == Stage.COLLECT_MASKED_VECTORS and node in self.tamper:
            self.tamper[node](reply.content)  # a site that lies, after its own checks
        if stage == Stage.COLLECT_MASKED_VECTORS and not reply.has_error() and \
                Key.MASKED_PARAMETERS in reply.content.config_records[secagg.CONFIGS]:
            from flwr.common import bytes_to_ndarray

            self.masked[node] = [bytes_to_ndarray(b) for b in
                                 reply.content.config_records[secagg.CONFIGS][
                                     Key.MASKED_PARAMETERS]]
        return reply


@pytest.fixture
def true_updates(monkeypatch):
    """Each site's weighted update as it computed it, before the protocol masked it."""
    from flwr.compat.common import recorddict_compat as compat

    seen: dict[int, tuple[list[np.ndarray], int]] = {}
    original = secagg_site.weighted_update

    def recording(msg, context):
        reply = original(msg, context)
        fit = compat.recorddict_to_fitres(reply.content, True)
        from flwr.common import parameters_to_ndarrays

        seen[context.node_id] = (parameters_to_ndarrays(fit.parameters), fit.num_examples)
        return reply

    monkeypatch.setattr(secagg_site, "weighted_update", recording)
    return seen


def _federation(tmp_path, sites: int, **overrides):
    # the grid answers as it is sent to: a silent site is known at once, the timeout is
    # only how long the coordinator polls for what will never come
    run = tiny_run(objective="ce", secagg="secaggplus", secagg_max_weight=100.0,
                   min_train_nodes=2, min_available_nodes=sites, round_timeout=1.0,
                   **overrides)
    nodes = {10 + i: cfg for i, cfg in enumerate(synthetic_sites(tmp_path, sites, n=24))}
    grid = SiteGrid(nodes, run.to_flat())
    torch.manual_seed(0)
    start = wire.wire_state(build_model(run.student_architecture()).state_dict())
    return run, grid, Coordinator(grid, run, None), start  # type: ignore[arg-type]


def _weighted_mean(updates: dict[int, tuple[list[np.ndarray], int]], nodes) -> list[np.ndarray]:
    total = sum(updates[n][1] for n in nodes)
    return [sum(updates[n][0][i] * updates[n][1] for n in nodes) / total
            for i in range(len(updates[nodes[0]][0]))]


def test_the_coordinator_sees_masked_updates_and_gets_their_weighted_mean(
        tmp_path, task_identity, true_updates):
    run, grid, coordinator, start = _federation(tmp_path, 3)
    new, report = coordinator.run_round(1, start)
    assert [s.status for s in report.sites] == ["ok"] * 3 and not report.failed
    nodes = sorted(true_updates)
    assert nodes == [10, 11, 12]
    for node in nodes:  # every site went through the four stages, in order
        assert grid.stages[node] == list(Stage.all())
    keys = secagg.tensor_order(start)
    # what the coordinator received from each site is not that site's update: masked with
    # uniformly random values, it shares (almost) no coordinate with the quantised update
    for node in nodes:
        update, weight = true_updates[node]
        received = np.concatenate([a.ravel() for a in grid.masked[node][1:]])
        ratio = weight / run.privacy.secagg_max_weight
        quantised = np.concatenate([
            np.round((np.clip(u * ratio, -1, 1) + 1) * (1 << 22) / 2).ravel() for u in update])
        assert np.mean(np.abs(received - quantised) <= 1) < 0.01, node
        assert received.std() > 1e8  # spread over [0, 2**32), not over the update's range
    # ... while the global step is the example-weighted mean of the true updates
    mean = _weighted_mean(true_updates, nodes)
    for k, expected in zip(keys, mean, strict=True):
        step = (new[k] - start[k]).numpy()
        assert np.allclose(step, expected, atol=2e-5), k
        assert np.abs(expected).max() > 1e-4  # the sites did move the student
    assert {s.num_examples for s in report.sites} == {24}
    # both ends masked with the project's generator (a mix would give no usable sum)
    import sys

    assert all(sys.modules[m].pseudo_rand_gen is secagg.secure_mask_generator
               for m in secagg.MASK_MODULES)
    assert all(s.bytes_up > 0 and s.bytes_down > 0 for s in report.sites)


def test_a_site_that_drops_out_is_left_out_and_the_round_survives(
        tmp_path, task_identity, true_updates):
    """Five sites, threshold 3 of 5 shares: one site silent from the masked-vector stage on
    (its update is not in the sum) and one silent at unmasking only (its update is, unmasked
    from the others' shares)."""
    run, grid, coordinator, start = _federation(tmp_path, 5)
    grid.silent = {11: Stage.COLLECT_MASKED_VECTORS, 13: Stage.UNMASK}
    new, report = coordinator.run_round(1, start)
    status = {s.node_id: (s.status, s.reason) for s in report.sites}
    assert status[11] == ("no reply", "no reply")
    assert [status[n][0] for n in (10, 12, 13, 14)] == ["ok"] * 4
    mean = _weighted_mean(true_updates, [10, 12, 13, 14])
    for k, expected in zip(secagg.tensor_order(start), mean, strict=True):
        assert np.allclose((new[k] - start[k]).numpy(), expected, atol=2e-5), k


def test_a_site_whose_masked_reply_breaks_the_protocol_is_left_out(
        tmp_path, task_identity, true_updates):
    """Sites that lie at the masked-vector stage (a vector of other shapes, an extra record,
    no vector at all) never reach Flower's sum: each is left out as a protocol failure, and
    the other sites' weighted mean is still recovered."""
    from flwr.app import ConfigRecord as Config

    def other_shapes(content):
        masked = content.config_records[secagg.CONFIGS][Key.MASKED_PARAMETERS]
        content.config_records[secagg.CONFIGS][Key.MASKED_PARAMETERS] = masked[:-1]

    def extra_record(content):
        content.config_records["images"] = Config({"x": b"pixels"})

    def no_vector(content):
        del content.config_records[secagg.CONFIGS][Key.MASKED_PARAMETERS]

    # seven sites, 4 of 7 shares to unmask: three sites may fall out
    run, grid, coordinator, start = _federation(tmp_path, 7, secagg_threshold=0.55)
    grid.tamper = {11: other_shapes, 12: extra_record, 13: no_vector}
    new, report = coordinator.run_round(1, start)
    status = {s.node_id: (s.status, s.reason) for s in report.sites}
    assert status[11] == ("failed", "protocol: masked vector of the wrong shapes")
    assert status[12][0] == "failed" and "records not allowed" in status[12][1]
    assert status[13][0] == "failed" and "values missing" in status[13][1]
    assert [status[n][0] for n in (10, 14, 15, 16)] == ["ok"] * 4
    mean = _weighted_mean(true_updates, [10, 14, 15, 16])
    for k, expected in zip(secagg.tensor_order(start), mean, strict=True):
        assert np.allclose((new[k] - start[k]).numpy(), expected, atol=2e-5), k


def test_a_masked_vector_of_other_shapes_is_refused_even_with_as_many_arrays(task_identity):
    """The coordinator's check of the masked vector compares each array's shape with the sent
    tensor's: as many arrays of other shapes (even of the same sizes) would spoil the sum of
    every site. The check itself, on one reply at the masked-vector stage."""
    from flwr.app import MetricRecord
    from flwr.common import ndarray_to_bytes

    from server.secagg import SecureResult, _CountingGrid

    sent = [(1,), (3, 4), (5,)]  # the weight factor, then the tensors
    grid = _CountingGrid(None, 1.0, sent, SecureResult(None))  # type: ignore[arg-type]

    def problem(shapes) -> str | None:
        content = RecordDict({
            secagg.CONFIGS: ConfigRecord({Key.MASKED_PARAMETERS: [
                ndarray_to_bytes(np.zeros(s, dtype=np.int64)) for s in shapes]}),
            "fitres.metrics": ConfigRecord({"train-loss": 1.0}),
            "fitres.num_examples": MetricRecord({"num_examples": 3}),
            "fitres.status": ConfigRecord({"code": 0, "message": ""})})
        reply = Message(content, dst_node_id=10, message_type=wire.TRAIN)
        return grid._problem(reply, Stage.COLLECT_MASKED_VECTORS)

    assert problem(sent) is None
    for other in ([(1,), (4, 3), (5,)],  # as many arrays, as many values, transposed
                  [(1,), (12,), (5,)],  # flattened
                  [(1,), (3, 4), (6,)],  # one value more
                  [(1,), (3, 4)]):  # one array fewer
        assert problem(other) == "masked vector of the wrong shapes", other


def test_too_many_dropouts_fail_the_round_and_keep_the_student(tmp_path, task_identity):
    run, grid, coordinator, start = _federation(tmp_path, 3)
    grid.silent = {11: Stage.SHARE_KEYS, 12: Stage.SHARE_KEYS}
    new, report = coordinator.run_round(1, start)
    assert report.failed and all(torch.equal(new[k], start[k]) for k in start)
    assert {s.status for s in report.sites} <= {"failed", "no reply"}


def test_client_level_dp_noises_the_secure_mean(tmp_path, task_identity, true_updates):
    """site-clipping under SecAgg+: each site clips its change, the coordinator noises the
    unmasked mean with z·C/m (it cannot check the bound) and counts the release."""
    run, grid, coordinator, start = _federation(
        tmp_path, 3, client_dp="site-clipping", client_dp_noise_multiplier=0.5,
        client_dp_clipping_norm=0.05)
    new, report = coordinator.run_round(1, start)
    assert not report.failed
    assert {w for _, w in true_updates.values()} == {1}  # uniform: every site weighs 1
    for update, _ in true_updates.values():
        assert np.sqrt(sum(float((u.astype(np.float64) ** 2).sum()) for u in update)) \
            <= 0.05 * (1 + 1e-3)
    mean = _weighted_mean(true_updates, sorted(true_updates))
    noise = np.concatenate([((new[k] - start[k]).numpy() - m).ravel()
                            for k, m in zip(secagg.tensor_order(start), mean, strict=True)])
    assert noise.std() == pytest.approx(0.5 * 0.05 / 3, rel=0.05)
    assert coordinator.aggregator.client_dp.releases[-1].sites == 3


# -- the masks -----------------------------------------------------------------------------
def test_masks_come_from_the_whole_key():
    """Flower's generator folds a key into 32 bits: two keys that fold alike give the same
    masks. The project's does not."""
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

    a, b = bytes(32), b"\x01\x00\x00\x00" * 2 + bytes(24)  # XOR-fold to the same 32 bits
    dims = [(3, 4), (5,), ()]
    assert all(np.array_equal(x, y) for x, y in zip(pseudo_rand_gen(a, 1 << 32, dims),
                                                    pseudo_rand_gen(b, 1 << 32, dims),
                                                    strict=True))
    ma = secagg.secure_mask_generator(a, 1 << 32, dims)
    mb = secagg.secure_mask_generator(b, 1 << 32, dims)
    assert not np.array_equal(ma[0], mb[0])
    assert [m.shape for m in ma] == [(3, 4), (5,), ()]
    assert all(m.dtype == np.int64 and (m >= 0).all() and (m < 1 << 32).all() for m in ma)
    again = secagg.secure_mask_generator(a, 1 << 32, dims)
    assert all(np.array_equal(x, y) for x, y in zip(ma, again, strict=True))
    big = secagg.secure_mask_generator(a, 1 << 32, [(200_000,)])[0]
    assert abs(big.mean() / (1 << 31) - 1) < 0.01  # uniform over the range
    with pytest.raises(ValueError):
        secagg.secure_mask_generator(a, 1000, dims)


# -- what a site refuses -------------------------------------------------------------------
def _stage_message(stage: str, **values) -> Message:
    from tests.test_protocol import instruction

    return instruction(wire.TRAIN, RecordDict({secagg.CONFIGS: ConfigRecord({Key.STAGE: stage,
                                                                             **values})}))


def test_a_site_refuses_a_setup_or_unmask_that_would_expose_it(tmp_path):
    context = Context(run_id=1, node_id=7, node_config=synthetic_sites(tmp_path, 1)[0],
                      state=RecordDict(), run_config=tiny_run(secagg="secaggplus").to_flat())
    setup = dict(sample_num=4, share_num=4, clipping_range=1.0, target_range=1 << 22,
                 mod_range=1 << 32, max_weight=10000.0)
    with pytest.raises(PrivacyRefused, match="threshold"):
        secagg_site.secure_stage(_stage_message(Stage.SETUP, threshold=2, **setup), context)
    reply = client_app.train(_stage_message(Stage.SETUP, threshold=2, **setup), context)
    assert reply.has_error() and reply.error.reason == "privacy-refused"
    other = {**setup, "clipping_range": 100.0}  # not the run's: the sum would be clipped
    bad = client_app.train(_stage_message(Stage.SETUP, threshold=3, **other), context)
    assert bad.has_error() and bad.error.reason == "config-error"
    ok = client_app.train(_stage_message(Stage.SETUP, threshold=3, **setup), context)
    assert not ok.has_error()
    assert set(ok.content.config_records[secagg.CONFIGS]) == {Key.PUBLIC_KEY_1, Key.PUBLIC_KEY_2}
    with pytest.raises(PrivacyRefused, match="both alive and dropped"):
        secagg_site.secure_stage(_stage_message(Stage.UNMASK, active_nids=[1, 2, 3],
                                                dead_nids=[3]), context)
    assert secagg.check_unmask(ConfigRecord({Key.ACTIVE_NODE_ID_LIST: [1, 2],
                                             Key.DEAD_NODE_ID_LIST: [3]})) is None


def test_a_reply_that_carries_the_update_in_the_clear_is_caught():
    from flwr.app import ArrayRecord, MetricRecord

    masked = RecordDict({secagg.CONFIGS: ConfigRecord({Key.MASKED_PARAMETERS: [b"x"]}),
                         "fitres.metrics": ConfigRecord({"train-loss": 1.0}),
                         "fitres.num_examples": MetricRecord({"num_examples": 3}),
                         "fitres.status": ConfigRecord({"code": 0, "message": ""})})
    assert secagg.check_secagg_reply(masked, Stage.COLLECT_MASKED_VECTORS) == []
    weightless = RecordDict({k: v for k, v in masked.items() if k != "fitres.num_examples"})
    assert any("records missing" in p for p in secagg.check_secagg_reply(
        weightless, Stage.COLLECT_MASKED_VECTORS))
    clear = RecordDict({**masked, "fitres.parameters": ArrayRecord(
        {"0": __import__("flwr.app", fromlist=["Array"]).Array(np.ones(3))})})
    assert "the update left the site unmasked" in secagg.check_secagg_reply(
        clear, Stage.COLLECT_MASKED_VECTORS)
    chatty = RecordDict({**masked, "fitres.metrics": ConfigRecord({"path": 1.0})})
    assert any("metrics not allowed" in p for p in secagg.check_secagg_reply(
        chatty, Stage.COLLECT_MASKED_VECTORS))
    extra = RecordDict({secagg.CONFIGS: ConfigRecord({Key.PUBLIC_KEY_1: b"k", "images": b"x"})})
    assert any("values not allowed" in p for p in secagg.check_secagg_reply(extra, Stage.SETUP))
    assert any("records not allowed" in p for p in secagg.check_secagg_reply(masked, Stage.SETUP))


def test_secagg_settings_are_checked_up_front():
    for bad, match in ((dict(aggregation="median"), "secagg needs aggregation"),
                       (dict(client_dp="server-clipping"), "server-clipping"),
                       (dict(client_dp="site-clipping", client_dp_clipping="adaptive"),
                        "adaptive"),
                       (dict(transfer_dtype="float16"), "float32"),
                       (dict(secagg_threshold=0.5), "secagg-threshold")):
        with pytest.raises(ConfigError, match=match):
            tiny_run(secagg="secaggplus", **bad)
    assert tiny_run(secagg="secaggplus", aggregation="fedprox").privacy.secagg == "secaggplus"


def test_moma_simulate_takes_secure_aggregation(tmp_path):
    from server.simulate import parser, run_config, settings

    args = settings(parser().parse_args(["--secagg", "secaggplus", "--sites", "3",
                                         "--runs-dir", str(tmp_path / "runs")]))
    run = run_config(args, tmp_path / "runs" / "x", ("a", "b"), None, None)
    assert run.privacy.secagg == "secaggplus" and run.federation.min_train_nodes == 3
