"""Update checks and aggregation methods of the coordinator."""

import pytest
import torch

from server.aggregation import aggregate, check_update

REF = {"w": torch.zeros(2, 2), "b": torch.zeros(2)}


def _u(v):
    return {"w": torch.full((2, 2), float(v)), "b": torch.full((2,), float(v))}


def test_weighted_mean_by_examples():
    out = aggregate([_u(0), _u(3)], [1.0, 2.0], "fedavg")
    assert torch.allclose(out["w"], torch.full((2, 2), 2.0))


def test_median_and_trimmed_mean_resist_an_outlier():
    updates = [_u(1), _u(2), _u(3), _u(1000)]
    assert torch.allclose(aggregate(updates, [1] * 4, "median")["b"], torch.full((2,), 2.5))
    trimmed = aggregate(updates, [1] * 4, "trimmed-mean", trim_fraction=0.25)
    assert torch.allclose(trimmed["b"], torch.full((2,), 2.5))
    assert float(aggregate(updates, [1] * 4, "fedavg")["b"][0]) > 200


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


def test_a_key_no_update_carries_keeps_its_global_value():
    reference = {"w": torch.full((2, 2), 7.0), "b": torch.full((2,), 7.0)}
    out = aggregate([{"w": torch.zeros(2, 2)}, {"w": torch.ones(2, 2)}], [1.0, 3.0], "fedavg",
                    reference=reference)
    assert torch.allclose(out["w"], torch.full((2, 2), 0.75))
    assert torch.equal(out["b"], reference["b"])


def test_keywise_weights_renormalise_among_the_updates_carrying_a_key():
    out = aggregate([{"w": torch.zeros(2, 2), "b": torch.zeros(2)}, {"w": torch.ones(2, 2)}],
                    [1.0, 3.0], "fedavg", reference=REF)
    assert torch.allclose(out["b"], torch.zeros(2)) and float(out["w"][0, 0]) == 0.75


def test_reason_never_echoes_a_name_the_site_chose():
    reason = check_update({**_u(1), "/data/patient-7/x.jpg": torch.zeros(1)}, REF)
    assert "1 unexpected" in reason and "patient" not in reason


def test_kept_local_keys_may_be_omitted_but_not_sent():
    assert check_update({"w": torch.zeros(2, 2)}, REF, local={"b"}) is None
    assert "kept-local" in check_update(_u(1), REF, local={"b"})
    assert "missing" in check_update({"b": torch.zeros(2)}, REF, local={"b"})
