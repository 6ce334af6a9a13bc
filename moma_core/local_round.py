"""One round of a site's local training, the same wherever it runs.

A site (:func:`client.site_training.train_round`), the local-only and centralised baselines
(:func:`server.baseline.train_alone`, the benchmark's arms) all train a round through
:func:`local_round`, and several rounds through :func:`local_rounds`:

1. seed every generator with the round's seed (the objective's heads, attention and queue start
   the same way whatever was built before: the student, a teacher loaded cold or from a warm
   process's cache);
2. build the objective, then load its private state from the last round (momentum teacher,
   queue, memory bank; none in round 1);
3. a seeded, shuffled loader over the training set as the objective reads it;
4. ``privacy(batches)``: the caller's DP-SGD settings for this round (a site checks and records
   its budget here, before any private step), or None;
5. :func:`moma_core.train.train_local`, the one training loop.

The objective's state goes back to the caller, which keeps it where its rounds live: the site's
disk between messages, memory in a baseline. Plain PyTorch; nothing here knows of Flower or of
the run's settings tree.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.data import Dataset

from moma_core.method_config import ObjectiveConfig, TrainConfig
from moma_core.objectives import build_objective, training_set
from moma_core.seeding import seed_everything
from moma_core.sources import make_loader
from moma_core.train import TrainResult, train_local

if TYPE_CHECKING:
    from moma_core.privacy.dp_sgd import DPConfig

#: ``privacy(batches)``: the round's DP-SGD settings given its batches per epoch, or None
PrivacyFn = Callable[[int], "DPConfig | None"]


@dataclass
class LocalRound:
    """What one round of local training gives back: the training result (the student's new
    state, examples, metrics) and the objective's private state for the next round."""

    result: TrainResult
    objective_state: dict[str, torch.Tensor]


@dataclass(frozen=True)
class RoundSetup:
    """What stays the same from round to round of one site: the objective's settings, the
    frozen teacher (or None), whether it shares the student's label space, the training set,
    the batch size, the device and dp-moma's public keys."""

    objective: ObjectiveConfig
    train_set: Dataset
    batch_size: int
    teacher: nn.Module | None = None
    same_task: bool | None = None
    public_keys: torch.Tensor | None = None
    device: str | torch.device = "cpu"


def local_round(student: nn.Module, setup: RoundSetup, cfg: TrainConfig,
                objective_state: dict[str, torch.Tensor] | None = None,
                privacy: PrivacyFn | None = None) -> LocalRound:
    """Train ``student`` (in place) for one round (see the module docstring).

    ``cfg.seed`` is the round's seed (required: a round is reproducible or it is not a round);
    ``objective_state`` the objective's state after the site's last round, None in its first.
    """
    if cfg.seed is None:
        raise ValueError("a round needs its seed (TrainConfig.seed)")
    seed_everything(cfg.seed)
    objective = build_objective(setup.objective, student, setup.teacher, setup.same_task,
                                n_data=len(setup.train_set), public_keys=setup.public_keys,
                                batch_size=setup.batch_size)
    if objective_state is not None:
        objective.load_state_dict(objective_state)
    loader = make_loader(training_set(objective, setup.train_set), setup.batch_size,
                         train=True, seed=cfg.seed, device=str(setup.device))
    private = privacy(len(loader)) if privacy is not None else None
    result = train_local(student, objective, loader, cfg, setup.device, privacy=private)
    return LocalRound(result, objective.state_dict())


def local_rounds(student: nn.Module, setup: RoundSetup,
                 rounds: Iterator[TrainConfig] | list[TrainConfig]) -> Iterator[LocalRound]:
    """Successive :func:`local_round` calls on one student, each round's objective state
    carried to the next as a site carries it on its disk. ``rounds``: each round's settings,
    its seed included. Yields after every round."""
    state = None
    for cfg in rounds:
        out = local_round(student, setup, cfg, state)
        state = out.objective_state
        yield out
