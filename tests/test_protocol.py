"""What may cross the wire: category-only error replies and the allow-list of site replies."""

from __future__ import annotations

import io
import logging
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.common import Metadata
from PIL import Image

import client.client_app as site_app
from client.site_config import SiteConfigError
from client.site_errors import (
    ConfigError,
    MissingTeacher,
    error_category,
    error_reply,
)
from client.site_training import StudentMismatch
from moma_core.checkpoint import CheckpointError
from moma_core.data.datasets import DataError
from moma_core.data.synthetic import TARGET_CLASSES
from moma_core.errors import ClassMismatch
from moma_core.models import Architecture, build_model
from moma_core.train import TrainingDiverged
from moma_protocol import wire
from tests.helpers import IMAGE_SIZE, tiny_run

SECRET = "/abs/path/to/patient-0042/slide-17.jpg"


def instruction(kind: str = wire.TRAIN, content: RecordDict | None = None) -> Message:
    """A message as a site receives it (outside a running federation)."""
    meta = Metadata(run_id=1, message_id="m-1", src_node_id=0, dst_node_id=7,
                    reply_to_message_id="", group_id="", created_at=time.time(), ttl=3600.0,
                    message_type=kind)
    return Message(content if content is not None else RecordDict(), metadata=meta)


def bad_image_site(root: Path) -> Path:
    """An ImageFolder site (train/val) whose validation split holds a truncated JPEG."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in TARGET_CLASSES:
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(2):
                pixels = rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    bad = root / "val" / TARGET_CLASSES[0] / "patient-0042" / "slide-17.jpg"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return bad


def _every_text(reply: Message) -> str:
    parts = [repr(reply.error), str(reply.error.code), str(reply.error.reason),
             repr(reply.metadata)]
    if reply.has_content():
        parts.append(repr(reply.content))
    return "\n".join(parts)


def _wire(model_classes=TARGET_CLASSES) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = build_model(Architecture("test_efficientnet", tuple(model_classes), IMAGE_SIZE))
    return wire.wire_state(model.state_dict())


def _train_reply(**metrics) -> RecordDict:
    values = {"train-loss": 1.2, "train-ce": 1.0, "train-kl": 0.1, "train-nce": 0.1,
              "train-steps": 3.0, "train-time-s": 2.5, wire.NUM_EXAMPLES: 48, **metrics}
    return RecordDict({wire.ARRAYS: wire.encode_state(_wire()), wire.METRICS: MetricRecord(values)})


# -- error replies ---------------------------------------------------------------------------
def test_error_reply_carries_the_category_only():
    try:
        try:
            raise OSError(f"Truncated File Read: {SECRET}")
        except OSError as inner:
            raise DataError(f"cannot read image {SECRET}: {inner}") from inner
    except DataError as exc:
        reply = error_reply(instruction(), exc)
    assert reply.has_error() and not reply.has_content()
    assert (reply.error.code, reply.error.reason) == (wire.ERROR_CODES["data-error"], "data-error")
    text = _every_text(reply)
    for private in (SECRET, "patient-0042", "cannot read image", "Truncated"):
        assert private not in text
    assert wire.check_error_reply(reply) == []


@pytest.mark.parametrize("exc,category", [
    (DataError(SECRET), "data-error"),
    (ClassMismatch(f"this site's classes [{SECRET!r}] are not the run's"), "class-mismatch"),
    (MissingTeacher(SECRET), "missing-teacher"),
    (CheckpointError(f"teacher {SECRET} refused"), "teacher-rejected"),
    (StudentMismatch("global student does not fit"), "config-error"),
    (TrainingDiverged("non-finite loss at step 3: nan"), "training-diverged"),
    (torch.OutOfMemoryError("CUDA out of memory"), "out-of-memory"),
    (MemoryError(), "out-of-memory"),
    (ConfigError("bad run config"), "config-error"),
    (SiteConfigError(f"node config lacks data-path {SECRET}"), "config-error"),
    (KeyError(SECRET), "internal-error"),
    (ZeroDivisionError("division by zero"), "internal-error"),
    (GeneratorExit(), "internal-error"),
])
def test_each_exception_type_has_its_category(exc, category):
    assert error_category(exc) == category
    reply = error_reply(instruction(), exc)
    assert reply.error.reason == category and reply.error.code == wire.ERROR_CODES[category]
    assert SECRET not in _every_text(reply)


def _declared_categories() -> dict[str, str]:
    """``category = "…"`` in the body of every class of the product's source (by AST)."""
    import ast

    root = Path(__file__).resolve().parents[1]
    found = {}
    for package in ("server", "client", "deploy", "moma_protocol", "moma_core"):
        for path in sorted((root / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.ClassDef):
                    continue
                for stmt in node.body:
                    targets = stmt.targets if isinstance(stmt, ast.Assign) else \
                        [stmt.target] if isinstance(stmt, ast.AnnAssign) else []
                    if any(isinstance(t, ast.Name) and t.id == "category" for t in targets):
                        value = stmt.value
                        assert isinstance(value, ast.Constant), f"{path}: {node.name}"
                        found[f"{path.relative_to(root)}:{node.name}"] = value.value
    return found


def test_every_declared_category_is_a_wire_category():
    """The exception classes declare their category (moma_core without importing the
    protocol); the wire's ERROR_CODES remains the authority over the names."""
    declared = _declared_categories()
    assert {"moma_core/errors.py:DataError", "moma_core/errors.py:CheckpointError",
            "client/site_errors.py:MissingTeacher",
            "client/site_training.py:StudentMismatch",
            "client/site_config.py:SiteConfigError",  # the settings' own errors too
            "moma_core/run_settings.py:ConfigError"} <= set(declared)
    assert {k: v for k, v in declared.items() if v not in wire.ERROR_CODES} == {}


def test_a_worker_failure_keeps_its_category_and_an_unknown_one_is_internal():
    from client.site_worker import WorkerFailure

    assert error_category(WorkerFailure("class-mismatch")) == "class-mismatch"
    assert error_category(WorkerFailure("not-a-category")) == "internal-error"


def test_codes_are_fixed_distinct_and_clear_of_flowers():
    assert set(wire.ERROR_CODES) == {"data-error", "missing-teacher", "teacher-rejected",
                                     "config-error", "training-diverged", "out-of-memory",
                                     "internal-error", "privacy-refused", "privacy-budget",
                                     "class-mismatch"}
    codes = list(wire.ERROR_CODES.values())
    assert len(set(codes)) == len(codes) and min(codes) >= 100


@pytest.mark.parametrize("error", [
    Error(code=2, reason=f"DataError: cannot read image {SECRET}"),  # Flower's own error text
    Error(code=101, reason=f"data-error: {SECRET}"),
    Error(code=101, reason="Data-Error"),
    Error(code=103, reason="data-error"),  # code of another category
    Error(code=101),
])
def test_free_text_error_replies_fail_the_check(error):
    reply = Message(error, reply_to=instruction())
    assert wire.check_error_reply(reply)
    assert wire.error_reason(reply) == wire.UNKNOWN_ERROR


# -- normal replies --------------------------------------------------------------------------
def test_honest_replies_pass():
    expected = set(_wire())
    assert wire.check_site_reply(_train_reply(), wire.TRAIN, expected) == []
    assert wire.check_site_reply(_train_reply()) == []
    evaluation = RecordDict({wire.METRICS: MetricRecord(
        {"loss": 0.9, "accuracy": 0.5, "macro-f1": 0.4, "kappa": 0.3, wire.NUM_EXAMPLES: 12})})
    assert wire.check_site_reply(evaluation, wire.EVALUATE) == []
    status = RecordDict({wire.METRICS: MetricRecord({wire.HAS_TEACHER: 1}),
                         wire.CONFIG: ConfigRecord({wire.SITE_NAME: "hospital-a.site_2"})})
    assert wire.check_site_reply(status, wire.TEACHER_STATUS) == []


def test_fedbn_reply_without_normalisation_tensors_passes():
    state = _wire()
    kept = {k for k in state if "bn" in k or "norm" in k}
    assert kept
    content = RecordDict({wire.ARRAYS: wire.encode_state({k: v for k, v in state.items()
                                                    if k not in kept}),
                          wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 48})})
    assert wire.check_site_reply(content, wire.TRAIN, set(state)) == []


def test_per_sample_values_fail():
    per_sample = {f"score-{i}": float(i) for i in range(3392)}
    problems = wire.check_site_reply(_train_reply(**per_sample), wire.TRAIN, set(_wire()))
    assert "too many metric values" in problems
    assert "metric name outside the allow-list" in problems
    # even under allowed names: a list of per-sample values is neither scalar nor small
    content = _train_reply(**{"train-loss": [0.5] * 3392})
    problems = wire.check_site_reply(content, wire.TRAIN, set(_wire()))
    assert "non-scalar metric value" in problems and "too many metric values" in problems


@pytest.mark.parametrize("name", ["logit-17", "feature-3", "pixel-0-0", "recall-2", "Accuracy",
                                  SECRET])
def test_metric_names_outside_the_allow_list_fail(name):
    assert wire.check_site_reply(_train_reply(**{name: 0.5})) == [
        "metric name outside the allow-list"]


def test_metric_names_are_checked_per_reply_type():
    evaluation = RecordDict({wire.METRICS: MetricRecord({"train-loss": 0.1, wire.NUM_EXAMPLES: 3})})
    assert wire.check_site_reply(evaluation, wire.EVALUATE)
    assert "missing required metric" in wire.check_site_reply(
        RecordDict({wire.METRICS: MetricRecord({"accuracy": 0.5})}), wire.EVALUATE)


@pytest.mark.parametrize("name", [SECRET, "../etc", "site a", "", "x" * 65, "-site",
                                  "C:\\data\\site"])
def test_a_path_or_free_text_as_site_name_fails(name):
    status = RecordDict({wire.METRICS: MetricRecord({wire.HAS_TEACHER: 0}),
                         wire.CONFIG: ConfigRecord({wire.SITE_NAME: name})})
    assert wire.check_site_reply(status, wire.TEACHER_STATUS) == [
        "site name is not a short identifier"]


def test_other_config_values_fail():
    status = RecordDict({wire.METRICS: MetricRecord({wire.HAS_TEACHER: 0}),
                         wire.CONFIG: ConfigRecord({wire.SITE_NAME: "a", "data-path": SECRET})})
    assert "config value outside the allow-list" in wire.check_site_reply(status,
                                                                          wire.TEACHER_STATUS)
    train = _train_reply()
    train[wire.CONFIG] = ConfigRecord({wire.SITE_NAME: "a"})
    assert "unknown record key" in wire.check_site_reply(train, wire.TRAIN, set(_wire()))


def test_extra_record_key_fails():
    content = _train_reply()
    content["features"] = wire.encode_state({"features": torch.zeros(48, 512)})
    assert wire.check_site_reply(content, wire.TRAIN, set(_wire())) == ["unknown record key"]
    assert wire.check_site_reply(content) == ["unknown record key"]


def test_non_scalar_metric_fails():
    problems = wire.check_site_reply(_train_reply(**{"train-loss": [0.4, 0.6]}))
    assert problems == ["non-scalar metric value"]


def test_arrays_outside_the_model_state_fail():
    content = _train_reply()
    arrays = dict(_wire())
    arrays["queue.queue"] = torch.zeros(64, 16)
    content[wire.ARRAYS] = wire.encode_state(arrays)
    assert wire.check_site_reply(content, wire.TRAIN, set(_wire())) == [
        "array name outside the model state"]
    content[wire.ARRAYS] = wire.encode_state({k: (v * 255).to(torch.uint8)
                                              for k, v in _wire().items()})
    assert wire.check_site_reply(content, wire.TRAIN, set(_wire())) == [
        "array that is not a floating-point tensor"]
    evaluation = RecordDict({wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 1}),
                             wire.ARRAYS: wire.encode_state(_wire())})
    assert wire.check_site_reply(evaluation, wire.EVALUATE) == ["unknown record key"]


def test_student_files_that_are_not_one_safetensors_file_fail():
    """The student travels as one safetensors file; anything else in ``arrays`` is refused
    before it is parsed further (and its data is never loaded by pickle or code)."""
    content = _train_reply()
    content[wire.ARRAYS] = ArrayRecord(_wire())  # tensors one by one: not the protocol
    assert wire.check_site_reply(content, wire.TRAIN, set(_wire())) == [
        "arrays other than the student file"]
    blob = wire.encode_blob(_wire())
    for bad in (blob[:5], b"\xff" * 8 + blob[8:], (10).to_bytes(8, "little") + b"{not json}",
                len(b'{"a": 1}').to_bytes(8, "little") + b'{"a": 1}'):
        content[wire.ARRAYS] = wire.blob_record(bad)
        assert wire.check_site_reply(content, wire.TRAIN, set(_wire())) == [
            "student file is not a safetensors file"], bad[:20]
    content[wire.ARRAYS] = ArrayRecord({wire.STUDENT_FILE: Array(np.zeros((2, 2), np.uint8))})
    assert wire.check_site_reply(content, wire.TRAIN, set(_wire())) == [
        "student file is not a 1-D uint8 array"]
    # a well-formed header over data that is cut short: passes the header check, and the
    # coordinator's decoding rejects it
    with pytest.raises(ValueError):
        wire.decode_state(blob[:-100])


def test_metric_names_cover_what_the_site_computes():
    assert {"train-loss", "train-steps", "train-time-s", "accuracy", "macro-f1", "kappa",
            "loss", wire.NUM_EXAMPLES, wire.HAS_TEACHER} <= wire.METRIC_NAMES
    assert not any(n.startswith(("recall", "logit", "feature")) for n in wire.METRIC_NAMES)


# -- the site's ClientApp handlers -----------------------------------------------------------
def _context(node_config: dict, run_config: dict | None = None) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(),
                   run_config=tiny_run().to_flat() if run_config is None else run_config)


def test_site_data_error_is_logged_at_the_site_and_answered_by_category(tmp_path, caplog):
    bad = bad_image_site(tmp_path / "slides")
    node = {"data-path": str(tmp_path / "slides"), "cache-dir": str(tmp_path / "cache"),
            "site-name": "site-a", "device": "cpu"}
    run = tiny_run(run_name="bad-data")
    msg = instruction(wire.EVALUATE,
                      RecordDict({wire.ARRAYS: wire.encode_state(_wire()),
                                  wire.CONFIG: ConfigRecord({wire.SERVER_ROUND: 1})}))
    with caplog.at_level(logging.ERROR, logger="moma.client"):
        reply = site_app.evaluate(msg, _context(node, run.to_flat()))
    assert reply.has_error() and reply.error.reason == "data-error"
    assert str(bad) not in _every_text(reply) and "slide-17" not in _every_text(reply)
    # the site's own log has it all, with the traceback
    logged = next(r for r in caplog.records if r.name == "moma.client")
    assert logged.exc_info and str(bad) in str(logged.exc_info[1])


def test_unusable_config_is_a_config_error():
    msg = instruction(wire.EVALUATE,
                      RecordDict({wire.ARRAYS: wire.encode_state(_wire()),
                                  wire.CONFIG: ConfigRecord({wire.SERVER_ROUND: 1})}))
    reply = site_app.evaluate(msg, _context({"data-path": SECRET, "cache-dir": "/tmp/x"},
                                            {"num-rounds": 0}))
    assert reply.error.reason == "config-error" and SECRET not in _every_text(reply)
    reply = site_app.evaluate(msg, _context({}))  # no data-path, no cache-dir
    assert reply.error.reason == "config-error"


def test_site_withholds_a_reply_outside_the_protocol(monkeypatch, tmp_path, caplog):
    def leaky_evaluate(settings, run, global_state):
        return 12, {"accuracy": 0.5, **{f"logit-{i}": 0.1 for i in range(80)}}

    import client.site_training

    monkeypatch.setattr(client.site_training, "evaluate_round", leaky_evaluate)
    msg = instruction(wire.EVALUATE,
                      RecordDict({wire.ARRAYS: wire.encode_state(_wire()),
                                  wire.CONFIG: ConfigRecord({wire.SERVER_ROUND: 1})}))
    node = {"data-path": "synthetic:target", "cache-dir": str(tmp_path), "device": "cpu"}
    with caplog.at_level(logging.ERROR, logger="moma.client"):
        reply = site_app.evaluate(msg, _context(node))
    assert reply.has_error() and reply.error.reason == "internal-error"
    assert "logit" not in _every_text(reply)
    assert any("withheld" in r.getMessage() for r in caplog.records)


def test_teacher_status_omits_a_site_name_that_is_not_an_identifier(tmp_path):
    msg = instruction(wire.TEACHER_STATUS,
                      RecordDict({wire.CONFIG: ConfigRecord({wire.TEACHER_SHA: "0" * 64})}))
    node = {"data-path": "synthetic:target", "cache-dir": str(tmp_path)}
    reply = site_app.teacher_status(msg, _context({**node, "site-name": SECRET}))
    assert not reply.has_error() and wire.CONFIG not in reply.content
    assert dict(reply.content[wire.METRICS]) == {wire.HAS_TEACHER: 0}
    reply = site_app.teacher_status(msg, _context({**node, "site-name": "site-a"}))
    assert dict(reply.content[wire.CONFIG]) == {wire.SITE_NAME: "site-a"}
    malformed = instruction(wire.TEACHER_STATUS,
                            RecordDict({wire.CONFIG: ConfigRecord({wire.TEACHER_SHA: SECRET})}))
    reply = site_app.teacher_status(malformed, _context(node))
    assert reply.error.reason == "teacher-rejected" and SECRET not in _every_text(reply)


# -- the coordinator on receipt --------------------------------------------------------------
def _check(replies, nodes):
    from server.round import Coordinator, SiteReport

    coordinator = Coordinator(None, tiny_run(), None)
    sites = {n: SiteReport(n, f"site-{n}") for n in nodes}
    updates, weights = coordinator._check_replies(replies, _wire(), sites)
    return coordinator, sites, updates, weights


def test_coordinator_rejects_a_student_file_cut_short():
    cut = _train_reply()
    # header intact, data short
    cut[wire.ARRAYS] = wire.blob_record(wire.encode_blob(_wire())[:-100])
    _, sites, updates, _ = _check([(1, Message(cut, reply_to=instruction()))], [1])
    assert updates == [] and (sites[1].status, sites[1].reason) == (
        "rejected", "protocol: student file is not a safetensors file")


def test_coordinator_rejects_replies_outside_the_protocol_without_echoing_them():
    import json

    leaky = _train_reply(**{f"logit-{i}": 0.1 for i in range(3392)})
    renamed = _train_reply()
    renamed[wire.ARRAYS] = wire.encode_state({**_wire(), f"{SECRET}.weight": torch.zeros(2)})
    replies = [
        (1, Message(_train_reply(), reply_to=instruction())),
        (2, Message(leaky, reply_to=instruction())),
        (3, Message(renamed, reply_to=instruction())),
        (4, Message(Error(code=2, reason=f"DataError: cannot read image {SECRET}"),
                    reply_to=instruction())),
        (5, wire.category_reply(instruction(), "data-error")),
    ]
    from dataclasses import asdict

    _, sites, updates, _ = _check(replies, range(1, 6))
    assert sites[1].status == "ok" and len(updates) == 1
    assert (sites[2].status, sites[2].reason) == (
        "rejected", "protocol: metric name outside the allow-list")
    assert sites[2].metrics == {}
    assert sites[3].status == "rejected" and sites[3].reason.startswith("protocol: ")
    assert (sites[4].status, sites[4].reason) == ("failed", wire.UNKNOWN_ERROR)
    assert (sites[5].status, sites[5].reason) == ("failed", "data-error")
    recorded = json.dumps([asdict(s) for s in sites.values()], default=str)
    for private in (SECRET, "logit", "DataError"):
        assert private not in recorded


def test_coordinator_checks_evaluation_replies():
    import json

    honest = RecordDict({wire.METRICS: MetricRecord(
        {"loss": 0.9, "accuracy": 0.5, "macro-f1": 0.4, "kappa": 0.3, wire.NUM_EXAMPLES: 12})})
    leaky = RecordDict({wire.METRICS: MetricRecord(
        {"accuracy": 0.5, "feature-3": 0.2, wire.NUM_EXAMPLES: 12})})
    replies = [(1, Message(honest, reply_to=instruction(wire.EVALUATE))),
               (2, Message(leaky, reply_to=instruction(wire.EVALUATE))),
               (3, Message(Error(code=0, reason=SECRET), reply_to=instruction(wire.EVALUATE)))]
    coordinator, _, _, _ = _check([], [])
    result, per_site, _ = coordinator.check_evaluations(replies)
    assert per_site["1"]["accuracy"] == 0.5 and result["accuracy"] == 0.5
    assert per_site["2"]["status"] == "rejected" and per_site["2"]["reason"].startswith("protocol:")
    assert per_site["3"] == {"status": "failed", "reason": wire.UNKNOWN_ERROR, "site-name": "3"}
    recorded = json.dumps(per_site, default=str)
    assert SECRET not in recorded and "feature" not in recorded


def test_half_precision_transfer_halves_the_bytes_and_keeps_small_updates():
    """float16 on the wire: the global student goes down rounded, the update goes up as its
    change; the coordinator's float32 copy plus the change recovers a step far below float16's
    resolution of the weights themselves."""
    import torch

    from moma_protocol.wire import pack_global, pack_update, unpack_global, unpack_update

    torch.manual_seed(0)
    exact = {"w": 1.0 + torch.rand(64, 64), "big": torch.full((3,), 1e6), "n": torch.ones(2)}
    down = pack_global(exact, "float16")
    assert down["w"].dtype == torch.float16 and down["big"].dtype == torch.float32
    start = unpack_global(down)  # what the site trains from
    assert start["w"].dtype == torch.float32
    step = torch.full((64, 64), 1e-4)  # below float16's spacing (~1e-3) at values in [1, 2)
    new = {"w": start["w"] + step, "big": start["big"] + 1.0, "n": start["n"] * 2}
    up = pack_update(new, start, "float16")
    assert up["w"].dtype == torch.float16 and up["big"].dtype == torch.float16
    assert torch.equal((down["w"] + up["w"]).float(), down["w"].float())  # lost in float16 …
    got = unpack_update(up, exact)
    assert torch.allclose(got["w"] - exact["w"], step, rtol=0, atol=1e-6)  # … kept as a change
    assert torch.allclose(got["big"], exact["big"] + 1.0)
    assert torch.equal(got["n"], exact["n"] * 2)
    sizes = {d: sum(v.numel() * v.element_size() for v in pack_global(exact, d).values())
             for d in ("float32", "float16")}
    assert sizes["float16"] < 0.51 * sizes["float32"] + 12
    wrong = unpack_update({"w": torch.zeros(3, dtype=torch.float16)}, exact)
    assert wrong["w"].shape == (3,)  # left for the update check to reject
    assert pack_global(exact, "float32") is exact and pack_update(new, start, "float32") is new
