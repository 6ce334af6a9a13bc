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
