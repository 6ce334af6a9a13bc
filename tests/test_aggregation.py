"""Update checks and aggregation methods of the coordinator (Flower's strategies)."""

import pytest
import torch

from moma_protocol.settings import AGGREGATIONS, FederationSettings
from server.aggregation import METHODS, Aggregator, check_update

REF = {"w": torch.zeros(2, 2), "b": torch.zeros(2)}


def _u(v):
    return {"w": torch.full((2, 2), float(v)), "b": torch.full((2,), float(v))}


def _agg(method, updates, weights, reference=REF, rnd=1, **kw):
    return Aggregator(FederationSettings(aggregation=method, **kw))(rnd, updates, weights,
                                                                    reference)


def test_every_configurable_method_is_implemented():
    assert set(METHODS) == set(AGGREGATIONS)


def test_weighted_mean_by_examples():
    out = _agg("fedavg", [_u(0), _u(3)], [1.0, 2.0])
    assert torch.allclose(out["w"], torch.full((2, 2), 2.0))
    assert torch.allclose(_agg("fedprox", [_u(0), _u(3)], [1.0, 2.0])["b"], torch.full((2,), 2.0))


def test_median_and_trimmed_mean_resist_an_outlier():
    updates = [_u(1), _u(2), _u(3), _u(1000)]
    assert torch.allclose(_agg("median", updates, [1] * 4)["b"], torch.full((2,), 2.5))
    trimmed = _agg("trimmed-mean", updates, [1] * 4, trim_fraction=0.25)
    assert torch.allclose(trimmed["b"], torch.full((2,), 2.5))
    assert float(_agg("fedavg", updates, [1] * 4)["b"][0]) > 200


def test_fedadam_steps_from_the_global_model_with_its_server_rate():
    """FedAdam (Flower's): the first step moves each coordinate by about eta towards the mean
    update, whatever the update's size; a plain mean would jump all the way."""
    reference = {"w": torch.zeros(2, 2), "b": torch.zeros(2)}
    agg = Aggregator(FederationSettings(aggregation="fedadam", server_lr=0.05))
    out = agg(1, [_u(3), _u(5)], [1.0, 1.0], reference)
    step = float(out["w"][0, 0])
    assert 0 < step < 0.2, step  # towards the mean (4.0), by a server-lr sized step
    again = agg(2, [_u(3), _u(5)], [1.0, 1.0], out)
    assert float(again["w"][0, 0]) > step  # moments carry over: it keeps moving
    assert torch.allclose(_agg("fedavg", [_u(3), _u(5)], [1.0, 1.0])["w"],
                          torch.full((2, 2), 4.0))


def test_fedadam_resumed_from_its_saved_state_continues_exactly(tmp_path):
    """A run stopped after round 1 and resumed (a new Aggregator from the saved moments) takes
    the same round-2 step as a run that never stopped; a fresh Aggregator does not."""
    from server.results import RunResults

    settings = FederationSettings(aggregation="fedadam", server_lr=0.05)
    reference = {"w": torch.zeros(2, 2), "b": torch.zeros(2)}
    straight = Aggregator(settings)
    r1 = straight(1, [_u(3), _u(5)], [1.0, 1.0], reference)
    r2 = straight(2, [_u(1), _u(2)], [1.0, 3.0], r1)
    results = RunResults(tmp_path / "run")
    ref = results.save_aggregator(1, _state_after_round_1(settings, reference))
    resumed = Aggregator(settings)
    resumed.load_state_dict(results.load_aggregator(ref))
    assert torch.equal(resumed(2, [_u(1), _u(2)], [1.0, 3.0], r1)["w"], r2["w"])
    fresh = Aggregator(settings)(2, [_u(1), _u(2)], [1.0, 3.0], r1)
    assert not torch.allclose(fresh["w"], r2["w"])
    # an altered state file is refused, not silently used
    path = tmp_path / "run" / "checkpoints" / "aggregator-round-001.safetensors"
    path.write_bytes(path.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(ValueError, match="altered"):
        results.load_aggregator(ref)
    with pytest.raises(ValueError, match="does not belong"):
        Aggregator(FederationSettings(aggregation="fedadam")).load_state_dict(
            {"x/w": torch.zeros(1)})
    assert Aggregator(FederationSettings(aggregation="fedavg")).state_dict() == {}


def _state_after_round_1(settings, reference):
    agg = Aggregator(settings)
    agg(1, [_u(3), _u(5)], [1.0, 1.0], reference)
    return agg.state_dict()


def test_a_key_no_update_carries_keeps_its_global_value():
    reference = {"w": torch.full((2, 2), 7.0), "b": torch.full((2,), 7.0)}
    for method in AGGREGATIONS:
        out = _agg(method, [{"w": torch.zeros(2, 2)}, {"w": torch.ones(2, 2)}], [1.0, 3.0],
                   reference=reference)
        assert torch.equal(out["b"], reference["b"]), method
    out = _agg("fedavg", [{"w": torch.zeros(2, 2)}, {"w": torch.ones(2, 2)}], [1.0, 3.0],
               reference=reference)
    assert torch.allclose(out["w"], torch.full((2, 2), 0.75))


def test_updates_with_different_tensors_or_no_weight_are_refused():
    with pytest.raises(ValueError, match="different"):
        _agg("fedavg", [{"w": torch.zeros(2, 2), "b": torch.zeros(2)}, {"w": torch.ones(2, 2)}],
             [1.0, 3.0])
    with pytest.raises(ValueError, match="positive"):
        _agg("fedavg", [_u(1)], [0.0])
    with pytest.raises(ValueError, match="nothing"):
        _agg("fedavg", [], [])


@pytest.mark.parametrize("bad,reason", [
    ({"w": torch.full((2, 2), float("nan")), "b": torch.zeros(2)}, "NaN"),
    ({"w": torch.full((2, 2), float("inf")), "b": torch.zeros(2)}, "NaN or Inf"),
    ({"w": torch.zeros(3, 2), "b": torch.zeros(2)}, "shape"),
    ({"w": torch.zeros(2, 2)}, "missing"),
])
def test_bad_updates_are_named(bad, reason):
    assert reason in check_update(bad, REF)


def test_good_update_passes():
    assert check_update(_u(1), REF) is None


def test_reason_never_echoes_a_name_the_site_chose():
    reason = check_update({**_u(1), "/data/patient-7/x.jpg": torch.zeros(1)}, REF)
    assert "1 unexpected" in reason and "patient" not in reason


def test_kept_local_keys_may_be_omitted_but_not_sent():
    assert check_update({"w": torch.zeros(2, 2)}, REF, local={"b"}) is None
    assert "kept-local" in check_update(_u(1), REF, local={"b"})
    assert "missing" in check_update({"b": torch.zeros(2)}, REF, local={"b"})


def test_a_lying_site_cannot_slip_a_bad_float16_change_past_the_update_check():
    """transfer-dtype float16: a change of the wrong shape, or one that overflows, is rejected
    after the coordinator adds it to its float32 copy."""
    import torch

    from moma_protocol.wire import unpack_update
    from server.aggregation import check_update

    reference = {"w": torch.ones(4, 4), "b": torch.zeros(4)}
    good = {"w": torch.full((4, 4), 0.01, dtype=torch.float16),
            "b": torch.zeros(4, dtype=torch.float16)}
    assert check_update(unpack_update(good, reference), reference) is None
    wrong_shape = {**good, "w": torch.zeros(3, dtype=torch.float16)}
    assert check_update(unpack_update(wrong_shape, reference), reference) is not None
    overflow = {**good, "b": torch.full((4,), float("inf"), dtype=torch.float16)}
    assert check_update(unpack_update(overflow, reference), reference) is not None


def test_fedavgm_steps_by_the_mean_update_plus_momentum_and_resumes_exactly(tmp_path):
    """Server momentum (Flower's FedAvgM, server learning rate 1): round 1 moves to the mean
    like FedAvg; round 2 by the new mean change plus beta times the first; a resumed run (its
    momentum from the saved state) takes the same step, a fresh one does not."""
    settings = FederationSettings(aggregation="fedavgm", server_momentum=0.5)
    straight = Aggregator(settings)
    r1 = straight(1, [_u(3), _u(5)], [1.0, 1.0], REF)
    assert torch.allclose(r1["w"], torch.full((2, 2), 4.0))
    r2 = straight(2, [_u(5), _u(5)], [1.0, 1.0], r1)  # mean change +1, plus 0.5 × 4
    assert torch.allclose(r2["w"], torch.full((2, 2), 4.0 + 1.0 + 2.0))
    saved = Aggregator(settings)
    saved(1, [_u(3), _u(5)], [1.0, 1.0], REF)
    resumed = Aggregator(settings)
    resumed.load_state_dict(saved.state_dict())
    assert torch.equal(resumed(2, [_u(5), _u(5)], [1.0, 1.0], r1)["w"], r2["w"])
    fresh = Aggregator(settings)(2, [_u(5), _u(5)], [1.0, 1.0], r1)
    assert torch.allclose(fresh["w"], torch.full((2, 2), 5.0))


def test_fedavgm_needs_fedbn():
    from moma_protocol.settings import ConfigError, RunConfig

    with pytest.raises(ConfigError, match="fedavgm needs fedbn"):
        RunConfig().with_values(aggregation="fedavgm")
    assert RunConfig().with_values(aggregation="fedavgm", fedbn=True).federation.fedbn
