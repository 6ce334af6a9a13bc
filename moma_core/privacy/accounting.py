"""Privacy accounting for sample-level DP-SGD, on top of Opacus' own accountants.

A site's DP training is a sequence of :class:`DPStep` stretches (a noise multiplier, a Poisson
sample rate and a number of optimizer steps). :func:`epsilon` composes all of them with Opacus'
RDP or PRV accountant, exactly as Opacus' optimizer hook would have had it feed them one step at
a time; :func:`noise_for_target_epsilon` finds the noise for a new stretch so that the whole
history stays within a target ε.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.accountant import IAccountant

ACCOUNTANTS: tuple[str, ...] = ("rdp", "prv")
"""Accountant names accepted by :func:`epsilon` (Opacus' ``mechanism()`` names)."""

MAX_NOISE_MULTIPLIER = 1e6
"""Largest noise multiplier :func:`noise_for_target_epsilon` tries (as Opacus' ``MAX_SIGMA``)."""

MIN_NOISE_MULTIPLIER = 0.3
"""Smallest noise multiplier :func:`noise_for_target_epsilon` proposes: below it ε is in the tens
or worse for any useful training, and the PRV accountant takes minutes (or runs out of memory)
on it. Where a smaller noise would do, the search returns one at least this large (still within
the target, only more private than needed)."""


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True)
class DPStep:
    """One stretch of DP-SGD training at a site: ``steps`` optimizer steps with the same noise
    multiplier and Poisson sample rate (batch size / number of examples)."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        sigma, rate, steps = self.noise_multiplier, self.sample_rate, self.steps
        if not _is_number(sigma) or not math.isfinite(sigma) or sigma <= 0:
            raise ValueError(f"noise_multiplier must be a finite number > 0, got {sigma!r}")
        if not _is_number(rate) or not math.isfinite(rate) or not 0 < rate <= 1:
            raise ValueError(f"sample_rate must be a number in (0, 1], got {rate!r}")
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
            raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
        object.__setattr__(self, "noise_multiplier", float(sigma))
        object.__setattr__(self, "sample_rate", float(rate))


def check_accountant(accountant: str) -> str:
    """Return ``accountant`` if it is a known accountant name, else raise ValueError."""
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {', '.join(ACCOUNTANTS)}, "
                         f"got {accountant!r}")
    return accountant


def check_delta(delta: float) -> float:
    """Return ``delta`` as a float if it lies in (0, 1), else raise ValueError."""
    if not _is_number(delta) or not math.isfinite(delta) or not 0 < delta < 1:
        raise ValueError(f"delta must be a number in (0, 1), got {delta!r}")
    return float(delta)


def _accountant(name: str) -> IAccountant:
    return RDPAccountant() if name == "rdp" else PRVAccountant()


def _opacus_history(history: Sequence[DPStep]) -> list[tuple[float, float, int]]:
    """The ``(noise_multiplier, sample_rate, steps)`` list Opacus' accountant would hold after
    being stepped through ``history``: consecutive stretches with the same noise and sample rate
    are merged (as ``accountant.step`` does), stretches of zero steps are dropped."""
    merged: list[tuple[float, float, int]] = []
    for entry in history:
        if not isinstance(entry, DPStep):
            raise ValueError(f"history entries must be DPStep, got {type(entry).__name__}")
        if entry.steps == 0:
            continue
        if merged and merged[-1][:2] == (entry.noise_multiplier, entry.sample_rate):
            merged[-1] = (entry.noise_multiplier, entry.sample_rate, merged[-1][2] + entry.steps)
        else:
            merged.append((entry.noise_multiplier, entry.sample_rate, entry.steps))
    return merged


def epsilon(history: Sequence[DPStep], delta: float, accountant: str = "rdp") -> float:
    """ε spent after composing every stretch of ``history`` at the given δ, computed by Opacus'
    ``RDPAccountant`` (``"rdp"``) or ``PRVAccountant`` (``"prv"``, its upper bound)."""
    check_accountant(accountant)
    delta = check_delta(delta)
    entries = _opacus_history(history)
    if not entries:
        return 0.0
    acc = _accountant(accountant)
    acc.history = entries
    eps = float(acc.get_epsilon(delta=delta))
    # No bound (or a numerical failure) counts as unbounded, never as small; a bound below 0
    # (the accountants' formula at a very large δ) is no privacy loss below nothing: 0.
    return max(eps, 0.0) if math.isfinite(eps) else math.inf


def round_steps(epochs: int, batches: int, max_steps: int | None = None) -> int:
    """DP-SGD steps of one local training call: ``epochs`` × ``batches``, at most
    ``max_steps`` (what a site records per round; the benchmark plans with the same count)."""
    steps = epochs * batches
    return steps if not max_steps else min(steps, max_steps)


def default_delta(num_examples: int) -> float:
    """The usual δ for a data set of ``num_examples`` units: 1 / (10 · num_examples)."""
    if not isinstance(num_examples, int) or isinstance(num_examples, bool) or num_examples < 1:
        raise ValueError(f"num_examples must be an integer >= 1, got {num_examples!r}")
    return 1.0 / (10 * num_examples)


def noise_for_target_epsilon(target_epsilon: float, delta: float, sample_rate: float,
                             steps: int, accountant: str = "rdp",
                             already: Sequence[DPStep] = (),
                             epsilon_tolerance: float = 0.01) -> float:
    """The noise multiplier for a new stretch of ``steps`` steps at ``sample_rate`` so that
    ``already`` followed by that stretch ends at ε ≤ ``target_epsilon`` (and within
    ``epsilon_tolerance`` below it, or as close as the bisection gets). Never below
    :data:`MIN_NOISE_MULTIPLIER`.

    Raises ValueError if ``already`` alone reaches the target, or if even a noise multiplier of
    :data:`MAX_NOISE_MULTIPLIER` does not bring ε under it.
    """
    if not _is_number(target_epsilon) or not math.isfinite(target_epsilon) \
            or target_epsilon <= 0:
        raise ValueError(f"target_epsilon must be a finite number > 0, got {target_epsilon!r}")
    if not _is_number(epsilon_tolerance) or not epsilon_tolerance > 0:
        raise ValueError(f"epsilon_tolerance must be > 0, got {epsilon_tolerance!r}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    check_accountant(accountant)
    delta = check_delta(delta)
    DPStep(1.0, sample_rate, steps)  # validates sample_rate
    prior = list(already)
    spent = epsilon(prior, delta, accountant)
    if spent >= target_epsilon:
        raise ValueError(f"target ε {target_epsilon} is already reached by the prior history "
                         f"(ε = {spent:.4g})")

    def eps(sigma: float) -> float:
        return epsilon([*prior, DPStep(sigma, sample_rate, steps)], delta, accountant)

    # Invariant: eps(high) <= target (high is always a noise that was checked); low is a noise
    # that was checked to overshoot, or the floor (never checked, never returned).
    low, high = MIN_NOISE_MULTIPLIER, 1.0
    eps_high = eps(high)
    while eps_high > target_epsilon:
        low, high = high, 2 * high
        if high > MAX_NOISE_MULTIPLIER:
            raise ValueError(f"no noise multiplier up to {MAX_NOISE_MULTIPLIER:g} reaches "
                             f"ε ≤ {target_epsilon} (prior ε = {spent:.4g})")
        eps_high = eps(high)
    while target_epsilon - eps_high > epsilon_tolerance and high - low > 1e-4 * high:
        mid = (low + high) / 2
        eps_mid = eps(mid)
        if eps_mid <= target_epsilon:
            high, eps_high = mid, eps_mid
        else:
            low = mid
    return high
