"""moma_core.local_round: one round of local training, as a site and a baseline run it."""

from __future__ import annotations

import copy

import pytest
import torch

from moma_core.data.synthetic import TARGET_CLASSES
from moma_core.local_round import RoundSetup, local_round, local_rounds
from moma_core.method_config import ObjectiveConfig, TrainConfig
from moma_core.models import Architecture, build_model
from moma_core.sources import open_site_data
from tests.helpers import IMAGE_SIZE


@pytest.fixture(scope="module")
def train_set():
    return open_site_data("synthetic:target", image_size=IMAGE_SIZE, augment="none", seed=0,
                          n=40).train


def _student():
    torch.manual_seed(0)
    return build_model(Architecture("test_efficientnet", tuple(TARGET_CLASSES), IMAGE_SIZE))


def _cfg(seed: int | None = 7) -> TrainConfig:
    return TrainConfig(epochs=1, lr=0.003, optimizer="adamw", max_steps=2, seed=seed)


def test_a_round_needs_its_seed(train_set):
    with pytest.raises(ValueError, match="seed"):
        local_round(_student(), RoundSetup(ObjectiveConfig(kind="ce"), train_set, 8),
                    _cfg(None))


def test_privacy_is_settled_before_the_first_step(train_set):
    """The caller's privacy hook gets the round's batches per epoch before any step: a hook
    that refuses (a spent budget) leaves the student as it was."""
    student = _student()
    before = copy.deepcopy(student.state_dict())
    seen = []

    def refuse(batches: int):
        seen.append(batches)
        raise RuntimeError("budget spent")

    setup = RoundSetup(ObjectiveConfig(kind="ce"), train_set, 8)
    with pytest.raises(RuntimeError, match="budget spent"):
        local_round(student, setup, _cfg(), privacy=refuse)
    assert seen == [len(train_set) // 8 + (len(train_set) % 8 > 1)]
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())


def test_rounds_carry_the_objectives_state_as_a_sites_disk_does(train_set):
    """Two rounds through local_rounds end where two local_round calls, the second given the
    first's objective state, end; without that state the second round differs (the queue and
    momentum teacher restart)."""
    teacher = _student()
    setup = RoundSetup(ObjectiveConfig(kind="moma", queue_size=16, feat_dim=32), train_set,
                       8, teacher, same_task=True)
    rounds = [_cfg(1), _cfg(2)]

    carried = _student()
    out = list(local_rounds(carried, setup, rounds))
    assert len(out) == 2 and out[1].objective_state

    by_hand = _student()
    first = local_round(by_hand, setup, rounds[0])
    local_round(by_hand, setup, rounds[1], first.objective_state)
    assert all(torch.equal(v, by_hand.state_dict()[k])
               for k, v in carried.state_dict().items())

    fresh = _student()
    local_round(fresh, setup, rounds[0])
    local_round(fresh, setup, rounds[1])  # no state: the objective starts over
    assert any(not torch.equal(v, fresh.state_dict()[k])
               for k, v in carried.state_dict().items())
