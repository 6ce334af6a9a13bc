"""Patient-level DP-SGD: the patient, not the patch, as the unit of privacy.

A patient contributes many patches; patch-level DP protects one patch, and a patient's many
patches only as a group (ε grows about linearly with the group). With ``unit = "patient"``
the mechanism protects a patient's whole data instead (user-level DP-SGD, as in McMahan et al.,
"Learning differentially private recurrent language models", 2018, with a patient as the
user):

- **Sampling:** each step, every patient joins independently with probability ``q`` (Poisson
  sampling of patients, :class:`PatientPoissonSampler`), and a joining patient brings at most
  ``k`` of its patches (a uniformly random subset when it has more).
- **Clipping:** each patch's gradient is clipped to ``C / k`` (Opacus' per-sample clipping), so
  a patient's summed contribution to a step has L2 norm at most ``C``.
- **Noise:** Gaussian of standard deviation ``σ·C`` on the sum (Opacus' noise multiplier
  ``σ·k`` over the per-patch norm ``C / k``).

Adding or removing one patient therefore changes a step's noisy sum by at most ``C`` under
Poisson sampling at rate ``q``: the subsampled Gaussian mechanism of multiplier ``σ`` at rate
``q``, accounted exactly as patch-level DP-SGD is, with patients in place of patches. ``q`` is
``1 / steps`` per epoch, with the steps of an epoch chosen so that a step draws the run's batch
size of patches on average (:func:`patient_steps_per_epoch`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


def patient_groups(patient_ids: Sequence[str]) -> list[list[int]]:
    """Data set indices by patient, in order of first appearance; empty ids are refused."""
    groups: dict[str, list[int]] = {}
    for i, pid in enumerate(patient_ids):
        key = str(pid).strip()
        if not key:
            raise ValueError(f"example {i} has no patient id: patient-level DP needs one for "
                             "every example")
        groups.setdefault(key, []).append(i)
    if not groups:
        raise ValueError("no examples: patient-level DP needs patients")
    return list(groups.values())


def patient_steps_per_epoch(groups: Sequence[Sequence[int]], patches_per_patient: int,
                            batch_size: int) -> int:
    """Steps of one epoch: enough that a step draws ``batch_size`` patches on average when
    each patient brings at most ``patches_per_patient``."""
    if patches_per_patient < 1 or batch_size < 1:
        raise ValueError("patches_per_patient and batch_size must be at least 1")
    usable = sum(min(len(g), patches_per_patient) for g in groups)
    return max(1, math.ceil(usable / batch_size))


class PatientPoissonSampler(Sampler[list[int]]):
    """``steps`` batches of data set indices; in each, every patient joins independently with
    probability ``sample_rate`` and brings at most ``patches_per_patient`` of its patches
    (chosen uniformly at random). Batches may be empty. The randomness comes from
    ``generator`` (give one seeded from the operating system: whoever can predict the sampling
    weakens the guarantee)."""

    def __init__(self, groups: Sequence[Sequence[int]], patches_per_patient: int,
                 sample_rate: float, steps: int, generator: torch.Generator) -> None:
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample rate {sample_rate}: give a number in (0, 1]")
        if patches_per_patient < 1 or steps < 1:
            raise ValueError("patches_per_patient and steps must be at least 1")
        self.groups = [torch.as_tensor(list(g), dtype=torch.long) for g in groups]
        self.k = int(patches_per_patient)
        self.sample_rate = float(sample_rate)
        self.steps = int(steps)
        self.generator = generator

    def __len__(self) -> int:
        return self.steps

    def expected_batch_size(self) -> float:
        """Patches a step draws on average: q · Σ min(patches, k)."""
        return self.sample_rate * sum(min(len(g), self.k) for g in self.groups)

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            joins = torch.rand(len(self.groups), generator=self.generator) < self.sample_rate
            batch: list[int] = []
            for p in torch.nonzero(joins).flatten().tolist():
                group = self.groups[p]
                if len(group) > self.k:
                    group = group[torch.randperm(len(group), generator=self.generator)[:self.k]]
                batch.extend(group.tolist())
            yield batch
