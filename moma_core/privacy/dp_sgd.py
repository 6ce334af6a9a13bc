"""Sample-level DP-SGD (Opacus) for the one local training loop (``train_local``).

``train_local(..., privacy=DPConfig(...))`` calls :func:`make_private_training`: it checks that
the objective's loss is per-sample (``Objective.dp_compatible``: CE, KD, dp-moma) and that the
student is free of what Opacus refuses (:func:`check_private_compatible`; convert a timm student
once with :func:`make_private_compatible`), gathers every trainable part — the student and the
objective's trainable heads — into ONE module, and hands it with the optimiser and the data
loader to ``PrivacyEngine.make_private``: per-sample gradients by hooks, per-sample clipping to
``max_grad_norm``, Gaussian noise, a Poisson-sampled ``DPDataLoader``, the RDP accountant. The
loop then runs unchanged on the returned optimiser and loader; :meth:`PrivateTraining.close`
removes the hooks and returns the :class:`PrivacyReport` of the call (noise multiplier, sample
rate, steps, ε at δ), which :class:`moma_core.train.TrainResult` carries as ``privacy``.

The teacher stays outside: frozen, in eval mode, BatchNorm kept, never wrapped.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.data import DataLoader

from moma_core import objective_registry
from moma_core.method_config import DP_TRAINABLE, TrainConfig

if TYPE_CHECKING:
    from opacus import PrivacyEngine
    from opacus.optimizers import DPOptimizer

ACCOUNTANTS = ("rdp", "prv")  # those the privacy ledger composes (moma_core.privacy.accounting)
#: the privacy unit: one patch, or all of one patient's patches (moma_core.privacy.patient_sampling)
UNITS = ("patch", "patient")


class PrivacyIncompatibleError(ValueError):
    """The student, the objective or the settings cannot be trained with DP-SGD."""


@dataclass
class DPConfig:
    """Settings of sample-level DP-SGD for one :func:`moma_core.train.train_local` call.

    Give exactly one of ``noise_multiplier`` (σ, the noise std over ``max_grad_norm``) or
    ``target_epsilon``: the σ that makes ε reach it at ``delta`` after ``epochs`` epochs at this
    call's sample rate (a horizon covering several calls, e.g. rounds × local epochs), or, with
    ``epochs`` unset, after this call's own steps. ``poisson_sampling`` should stay on: the
    accountant's ε assumes it. ``secure_rng`` needs ``torchcsprng`` (Opacus' secure mode).

    ``unit = "patient"`` protects patients instead of patches
    (:mod:`moma_core.privacy.patient_sampling`): the loader's data set must carry
    ``patient_ids``; patients are Poisson-sampled, each brings at most ``patches_per_patient``
    patches, and ``max_grad_norm``, ``noise_multiplier`` and the sample rate are then a
    patient's.
    """

    max_grad_norm: float = 1.0
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float = 1e-5
    epochs: int | None = None
    poisson_sampling: bool = True
    secure_rng: bool = False
    accountant: str = "rdp"
    unit: str = "patch"
    patches_per_patient: int = 8
    #: the part of the student trained (``DP_TRAINABLE``); the rest is frozen, its BatchNorm
    #: layers in eval mode (:func:`freeze_for_dp`)
    trainable: str = "all"
    #: the largest batch run at once (0: the logical batch); a logical batch is split into
    #: physical ones whose clipped gradients are summed before the one noisy step
    physical_batch: int = 0

    def __post_init__(self) -> None:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("give exactly one of noise_multiplier and target_epsilon")
        if self.noise_multiplier is not None and not (
                math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise ValueError(f"noise multiplier {self.noise_multiplier}: give a number > 0")
        if self.target_epsilon is not None and not (
                math.isfinite(self.target_epsilon) and self.target_epsilon > 0):
            raise ValueError(f"target epsilon {self.target_epsilon}: give a number > 0")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ValueError(f"max grad norm {self.max_grad_norm}: give a number > 0")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta {self.delta}: give a number in (0, 1)")
        if self.epochs is not None and (self.target_epsilon is None or self.epochs < 1):
            raise ValueError("epochs is the horizon of target_epsilon: give it (>= 1) only "
                             "with target_epsilon")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant {self.accountant!r}: choose one of {ACCOUNTANTS}")
        if self.unit not in UNITS:
            raise ValueError(f"unit {self.unit!r}: choose one of {UNITS}")
        if not (isinstance(self.patches_per_patient, int) and self.patches_per_patient >= 1):
            raise ValueError(f"patches per patient {self.patches_per_patient!r}: give an "
                             "integer >= 1")
        if self.trainable not in DP_TRAINABLE:
            raise ValueError(f"trainable {self.trainable!r}: choose one of {DP_TRAINABLE}")
        if not (isinstance(self.physical_batch, int) and self.physical_batch >= 0):
            raise ValueError(f"physical batch {self.physical_batch!r}: give an integer >= 0")
        if self.unit == "patient" and not self.poisson_sampling:
            raise ValueError("unit patient samples patients by Poisson sampling: keep "
                             "poisson_sampling on")


@dataclass(frozen=True)
class PrivacyReport:
    """What one private training call spent, for the privacy ledger.

    ``epsilon`` is the engine's accountant's ε at ``delta`` after this call's ``steps`` steps of
    noise ``noise_multiplier`` at Poisson rate ``sample_rate`` (this call alone: compose the
    calls of a site, e.g. from ``(noise_multiplier, sample_rate, steps)``, for its total).
    ``expected_batch_size`` is the divisor Opacus uses for the mean of the clipped gradients.
    With ``unit = "patient"`` the noise multiplier, clipping norm and sample rate are a
    patient's (each patch is clipped to ``max_grad_norm / patches_per_patient``).
    """

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int
    expected_batch_size: int
    delta: float
    epsilon: float
    accountant: str
    poisson_sampling: bool
    unit: str = "patch"
    patches_per_patient: int = 0

    def to_dict(self) -> dict[str, float | int | str | bool]:
        return asdict(self)


# ----------------------------------------------------------------------------- the student


def group_count(channels: int, group_size: int) -> int:
    """GroupNorm groups for ``channels`` with at least ``group_size`` channels per group (at
    most 32 groups, a divisor of ``channels``): Wu & He's GroupNorm works as well with ~16
    channels per group as with 32 groups, and a small student's narrow layers (16 or 24
    channels) would otherwise normalise each channel alone, which loses the stain intensity
    the classes differ by."""
    return math.gcd(channels, max(1, min(32, channels // group_size)))


def make_private_compatible(student: nn.Module, num_groups: int | None = None,
                            group_size: int | None = None) -> nn.Module:
    """A copy of ``student`` that Opacus can train; ``student`` itself is not changed.

    Every BatchNorm becomes a GroupNorm with ``num_groups`` groups, or with
    :func:`group_count` groups for ``group_size`` channels per group (default gcd(32,
    channels), Opacus' rule): timm's BatchNormAct layers become timm ``GroupNormAct`` keeping their
    activation and dropout (``ModuleValidator.fix`` would not touch them: it matches exact
    types), the plain ones go through ``opacus.validators.ModuleValidator.fix``, which also fixes
    the other layers it knows. The affine weight and bias are carried over; running statistics
    are dropped. In-place activations are switched off (Opacus' backward hooks refuse in-place
    ops on a hooked layer's output). Raises :class:`PrivacyIncompatibleError` listing whatever
    is still refused (:func:`check_private_compatible`).

    State-dict keys of the norm layers stay the same (weight, bias), without the BatchNorm
    buffers. The student's mode is kept.
    """
    from opacus.validators import ModuleValidator

    model = copy.deepcopy(student)
    affine = {name: (m.weight, m.bias) for name, m in model.named_modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine}
    _norm_act_to_group_norm(model, num_groups)
    kwargs = {} if num_groups is None else {"num_groups": num_groups}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = ModuleValidator.fix(model, **kwargs)
    if group_size is not None:
        for m in model.modules():
            if isinstance(m, nn.GroupNorm):
                m.num_groups = group_count(m.num_channels, group_size)
    with torch.no_grad():
        for name, m in model.named_modules():
            if name in affine and isinstance(m, nn.GroupNorm) and m.affine:
                weight, bias = affine[name]
                m.weight.copy_(weight)
                m.bias.copy_(bias)
    for m in model.modules():
        if getattr(m, "inplace", False) is True:
            m.inplace = False
    model.train(student.training)
    check_private_compatible(model)
    return model


def private_compatibility_problems(module: nn.Module) -> list[str]:
    """What Opacus (or per-sample clipping) refuses in ``module``, one line each; empty if none.

    BatchNorm layers (batch statistics mix the samples; listed even when frozen, as in train mode
    they still normalise with the batch's statistics), trainable layers holding buffers (refused
    by Opacus' GradSampleModule), in-place activations (refused by its backward hooks), and the
    errors of ``opacus.validators.ModuleValidator.validate``.
    """
    from opacus.validators import ModuleValidator

    problems = []
    for name, m in module.named_modules():
        where = name or "<root>"
        own = list(m.parameters(recurse=False))
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if not getattr(m, FROZEN_BN, False):  # a frozen one runs on its own statistics
                problems.append(f"{where}: {type(m).__name__} (batch statistics mix the "
                                "samples)")
        elif any(p.requires_grad for p in own) and any(True for _ in m.buffers()):
            problems.append(f"{where}: {type(m).__name__} is trainable and holds buffers")
        if getattr(m, "inplace", False) is True:
            problems.append(f"{where}: {type(m).__name__} is in-place")
    mode = module.training
    module.train()
    try:
        errors = ModuleValidator.validate(module, strict=False)
    finally:
        module.train(mode)
    for e in errors:
        text = str(e)
        if not text.startswith("BatchNorm cannot support"):  # listed above, by name
            problems.append(f"opacus: {type(e).__name__}: {text}")
    return problems


def check_private_compatible(module: nn.Module) -> None:
    """Raise :class:`PrivacyIncompatibleError` listing what Opacus still refuses in ``module``."""
    problems = private_compatibility_problems(module)
    if problems:
        raise PrivacyIncompatibleError(
            "the model cannot be trained with DP-SGD (convert it with "
            "moma_core.privacy.dp_sgd.make_private_compatible):\n  " + "\n  ".join(problems))


# ----------------------------------------------------------------------------- the trained part
#: set on a BatchNorm layer :func:`freeze_for_dp` froze: it always normalises with its own
#: running statistics, a fixed per-channel affine map that mixes no samples
FROZEN_BN = "_moma_dp_frozen"


def trainable_names(student: nn.Module, trainable: str) -> set[str]:
    """The names of the student's parameters DP-SGD trains (see :data:`DP_TRAINABLE`).

    ``head``: the classifier (timm's ``get_classifier``). ``last-stage``: also the last group
    of timm's coarse parameter groups (``group_matcher(coarse=True)``: stem, stages, head) that
    holds more than the classifier; BatchNorm parameters stay frozen there too. ``all``: every
    parameter (the student must then be free of BatchNorm: GroupNorm).
    """
    names = {n for n, _ in student.named_parameters()}
    if trainable == "all":
        return names
    head = {id(p) for p in student.get_classifier().parameters()}
    chosen = {n for n, p in student.named_parameters() if id(p) in head}
    if trainable == "last-stage":
        from timm.models._manipulate import group_parameters

        groups = group_parameters(student, student.group_matcher(coarse=True))
        last = next((set(groups[g]) for g in sorted(groups, reverse=True)
                     if set(groups[g]) - chosen), set())
        norms = {f"{m_name}.{p_name}" if m_name else p_name
                 for m_name, m in student.named_modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm)
                 for p_name, _ in m.named_parameters(recurse=False)}
        chosen |= last - norms
    return chosen & names


class FrozenPart:
    """What :func:`freeze_for_dp` changed, to undo it (:meth:`restore`)."""

    def __init__(self, student: nn.Module, trainable: str,
                 objective: nn.Module | None = None) -> None:
        self.student = student
        keep = trainable_names(student, trainable)
        self.frozen = [p for n, p in student.named_parameters()
                       if n not in keep and p.requires_grad]
        if trainable != "all" and objective is not None:  # the objective's heads too
            self.frozen += [p for p in objective.trainable_parameters() if p.requires_grad]
        for p in self.frozen:
            p.requires_grad_(False)
        self.hooks = []
        if trainable != "all":
            for m in student.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    setattr(m, FROZEN_BN, True)
                    self.hooks.append(m.register_forward_pre_hook(_running_statistics))
                if getattr(m, "inplace", False) is True:  # Opacus' backward hooks refuse them
                    m.inplace = False

    def restore(self) -> None:
        for p in self.frozen:
            p.requires_grad_(True)
        for h in self.hooks:
            h.remove()
        for m in self.student.modules():
            if getattr(m, FROZEN_BN, False):
                delattr(m, FROZEN_BN)
        self.frozen, self.hooks = [], []


def _running_statistics(module: nn.Module, args: tuple) -> None:
    module.training = False  # whatever train() said: a fixed affine map of each sample


def freeze_for_dp(student: nn.Module, trainable: str, objective: nn.Module | None = None
                  ) -> FrozenPart:
    """Freeze every parameter of ``student`` outside :func:`trainable_names`; unless
    ``trainable = "all"``, also the ``objective``'s own heads (the privacy budget goes to the
    student's trained part only), and every BatchNorm layer then normalises with its running
    statistics in train mode too (a fixed per-channel affine map: each sample's output
    depends on that sample alone, so per-sample gradients and clipping stay exact while the
    student keeps the teacher's statistics). Returns the :class:`FrozenPart` that undoes it."""
    if trainable not in DP_TRAINABLE:
        raise ValueError(f"trainable {trainable!r}: choose one of {DP_TRAINABLE}")
    return FrozenPart(student, trainable, objective)


# ----------------------------------------------------------------------------- the wrapping


class PrivateParts(nn.Module):
    """The one module Opacus wraps: the student and the objective's trainable heads."""

    def __init__(self, student: nn.Module, heads: list[nn.Module]) -> None:
        super().__init__()
        self.student = student
        self.heads = nn.ModuleList(heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student(x)


def private_parts(student: nn.Module, objective: nn.Module) -> PrivateParts:
    """:class:`PrivateParts` of ``student`` and each child of ``objective`` holding one of
    ``objective.trainable_parameters()``; refuses trainable parameters outside those children."""
    trainable = {id(p) for p in objective.trainable_parameters()}
    heads = [m for _, m in objective.named_children()
             if any(id(p) in trainable for p in m.parameters())]
    covered = {id(p) for m in heads for p in m.parameters()}
    if trainable - covered:
        raise PrivacyIncompatibleError(
            f"objective {getattr(objective, 'name', type(objective).__name__)!r} has trainable "
            "parameters outside its child modules; DP-SGD needs them inside modules")
    return PrivateParts(student, heads)


class PrivateTraining:
    """One private training call: Opacus' optimiser and loader for the loop, then the report."""

    def __init__(self, engine: PrivacyEngine, grad_sample_module: nn.Module,
                 optimizer: DPOptimizer, loader: DataLoader, config: DPConfig,
                 noise_multiplier: float, sample_rate: float,
                 frozen: FrozenPart | None = None) -> None:
        self.engine = engine
        self.frozen = frozen
        self.module = grad_sample_module
        self.optimizer = optimizer
        self.loader = loader
        self.config = config
        self.noise_multiplier = noise_multiplier
        self.sample_rate = sample_rate
        self._report: PrivacyReport | None = None

    def noise_step(self) -> None:
        """The step for an empty Poisson batch: noise only, counted by the accountant (as
        Opacus does for an empty batch; skipping it would reveal that the batch was empty)."""
        self.optimizer.zero_grad(set_to_none=True)
        for p in self.optimizer.params:
            p.grad_sample = p.new_zeros((0, *p.shape))
        self.optimizer.step()

    def physical_loader(self) -> DataLoader:
        """The loader the loop iterates: the Poisson-sampled logical batches, each split into
        physical ones of at most ``physical_batch`` examples (Opacus' BatchSplittingSampler:
        the optimiser clips and sums them and takes one noisy step per logical batch)."""
        size = self.config.physical_batch
        if not size:
            return self.loader
        from opacus.utils.batch_memory_manager import wrap_data_loader

        return wrap_data_loader(data_loader=self.loader, max_batch_size=size,
                                optimizer=self.optimizer)

    def step_skipped(self) -> bool:
        """Whether the optimiser's last ``step`` only accumulated a physical batch."""
        return bool(getattr(self.optimizer, "_is_last_step_skipped", False))

    @property
    def steps(self) -> int:
        return int(sum(entry[-1] for entry in getattr(self.engine.accountant, "history", [])))

    def report(self) -> PrivacyReport:
        """Noise, sample rate, steps so far and the ε the engine's accountant gives for them."""
        if self._report is not None:
            return self._report
        steps = self.steps
        patient = self.config.unit == "patient"
        if not steps:
            eps = 0.0
        elif patient:  # Opacus' accountant saw the per-patch multiplier: account the patient's
            from moma_core.privacy.accounting import DPStep, epsilon

            eps = epsilon([DPStep(self.noise_multiplier, self.sample_rate, steps)],
                          self.config.delta, self.config.accountant)
        else:
            eps = float(self.engine.accountant.get_epsilon(delta=self.config.delta))
        return PrivacyReport(
            noise_multiplier=float(self.noise_multiplier),
            max_grad_norm=float(self.config.max_grad_norm),
            sample_rate=float(self.sample_rate), steps=steps,
            expected_batch_size=int(round(self.optimizer.expected_batch_size)),
            delta=float(self.config.delta), epsilon=eps, accountant=self.config.accountant,
            poisson_sampling=bool(self.config.poisson_sampling), unit=self.config.unit,
            patches_per_patient=self.config.patches_per_patient if patient else 0)

    def close(self) -> PrivacyReport:
        """Remove Opacus' hooks and per-sample attributes from the models; the final report."""
        if self._report is None:
            self._report = self.report()
            self.module.cleanup()
            _clear_opacus_state(self.module._module)
            if self.frozen is not None:
                self.frozen.restore()
        return self._report


def make_private_training(student: nn.Module, objective: nn.Module,
                          optimizer: torch.optim.Optimizer, loader: DataLoader,
                          privacy: DPConfig, cfg: TrainConfig,
                          device: torch.device | str = "cpu",
                          frozen: FrozenPart | None = None) -> PrivateTraining:
    """Wrap the trainable parts of ``student`` and ``objective`` for DP-SGD (see module doc).

    ``optimizer`` must hold exactly the student's and the objective's trainable parameters;
    ``loader`` is replaced by a Poisson-sampled ``DPDataLoader`` with the same expected batch
    size (``privacy.poisson_sampling``). Refuses objectives whose loss is not per-sample,
    students with BatchNorm or other layers Opacus refuses, a FedProx term (its gradient does
    not pass through the per-sample hooks, Opacus would drop it) and mixed precision.
    """
    from opacus import PrivacyEngine
    from opacus.accountants.utils import get_noise_multiplier

    name = getattr(objective, "name", type(objective).__name__)
    if not getattr(objective, "dp_compatible", False):
        raise PrivacyIncompatibleError(
            f"objective {name!r} is not compatible with DP-SGD (its loss mixes samples or keeps "
            "state from earlier private batches); use one of "
            f"{', '.join(map(repr, objective_registry.dp_names()))}")
    if cfg.proximal_mu > 0:
        raise PrivacyIncompatibleError("proximal_mu > 0 (FedProx) is not supported with DP-SGD: "
                                       "Opacus would drop the proximal term's gradient")
    if cfg.amp and torch.device(device).type == "cuda":
        raise PrivacyIncompatibleError("mixed precision (amp) is not supported with DP-SGD")
    check_private_compatible(student)
    if len(loader) == 0:
        raise ValueError("the training loader is empty")
    parts = private_parts(student, objective)
    _strip_stale_hooks(parts)
    parts.train()
    patients = None
    if privacy.unit == "patient":
        patients = patient_loader(loader, privacy.patches_per_patient)
    sample_rate = 1 / len(loader) if patients is None else 1 / len(patients)
    noise = privacy.noise_multiplier
    if noise is None:
        steps = cfg.epochs * len(loader)
        if cfg.max_steps is not None:
            steps = min(steps, cfg.max_steps)
        if patients is not None:
            steps = cfg.epochs * len(patients)
            if cfg.max_steps is not None:
                steps = min(steps, cfg.max_steps)
        horizon = ({"epochs": privacy.epochs} if privacy.epochs is not None
                   else {"steps": steps})
        noise = get_noise_multiplier(target_epsilon=privacy.target_epsilon,
                                     target_delta=privacy.delta, sample_rate=sample_rate,
                                     accountant=privacy.accountant, **horizon)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant=privacy.accountant, secure_mode=privacy.secure_rng)
    noise_generator = None
    if not privacy.secure_rng:
        # Without secure mode Opacus draws the noise and the Poisson batches from torch's
        # global generator, which a site seeds from the run's (public) seed for reproducible
        # rounds: whoever knows the seed could then replay the noise and subtract it. Both
        # come from generators seeded with 64 bits of the operating system's entropy instead
        # (DP rounds are therefore not bit-reproducible).
        noise_generator = entropy_generator(device)
        engine.secure_rng = entropy_generator("cpu")  # Opacus' Poisson sampler reads this
    if patients is None:
        module, dp_optimizer, dp_loader = engine.make_private(
            module=parts, optimizer=optimizer, data_loader=loader, noise_multiplier=noise,
            max_grad_norm=privacy.max_grad_norm, poisson_sampling=privacy.poisson_sampling,
            noise_generator=noise_generator)
        sampler = getattr(dp_loader, "batch_sampler", None)
        if privacy.poisson_sampling and hasattr(sampler, "steps"):
            # Opacus runs int(1 / sample_rate) batches an epoch, which floating point makes
            # one less than the batches for some sizes (1488 patches at batch 16: 92, not 93);
            # the site's ledger counts len(loader) steps a round: run exactly those
            sampler.steps = len(loader)
    else:
        # a patch's gradient clipped to C/k and noise σ·k·(C/k) = σ·C: a patient's k patches
        # move the sum by at most C, the noise is that of multiplier σ for the patient
        k = privacy.patches_per_patient
        module, dp_optimizer, dp_loader = engine.make_private(
            module=parts, optimizer=optimizer, data_loader=patients, noise_multiplier=noise * k,
            max_grad_norm=privacy.max_grad_norm / k, poisson_sampling=False,
            noise_generator=noise_generator)
        dp_optimizer.expected_batch_size = max(patients.batch_sampler.expected_batch_size(),
                                               1.0)
    use_contiguous_grad_samplers(module)
    return PrivateTraining(engine, module, dp_optimizer, dp_loader, privacy, noise, sample_rate,
                           frozen)


def patient_loader(loader: DataLoader, patches_per_patient: int) -> DataLoader:
    """A loader over ``loader``'s data set drawing patients by Poisson sampling
    (:class:`~moma_core.privacy.patient_sampling.PatientPoissonSampler`, OS-entropy seeded),
    a step drawing ``loader``'s batch size of patches on average; empty batches keep the
    items' shapes (Opacus' collate)."""
    from opacus.data_loader import dtype_safe, shape_safe, wrap_collate_with_empty
    from torch.utils.data import default_collate

    from moma_core.privacy.patient_sampling import (
        PatientPoissonSampler,
        patient_groups,
        patient_steps_per_epoch,
    )

    dataset = loader.dataset
    ids = getattr(dataset, "patient_ids", None)
    if ids is None:
        raise PrivacyIncompatibleError(
            "unit patient needs the patient of every example: a CSV manifest with a "
            "patient_id column")
    groups = patient_groups(ids)
    steps = patient_steps_per_epoch(groups, patches_per_patient, loader.batch_size or 1)
    sampler = PatientPoissonSampler(groups, patches_per_patient, 1 / steps, steps,
                                    entropy_generator("cpu"))
    first = dataset[0]
    collate = wrap_collate_with_empty(
        collate_fn=loader.collate_fn or default_collate,
        sample_empty_shapes=[(0, *shape_safe(x)) for x in first],
        dtypes=[dtype_safe(x) for x in first])
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                      num_workers=loader.num_workers, pin_memory=loader.pin_memory)


def entropy_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator seeded with 64 bits from the operating system (``os.urandom``), not
    from any seed a run or a test set."""
    import os

    generator = torch.Generator(device=torch.device(device))
    generator.manual_seed(int.from_bytes(os.urandom(8), "little"))
    return generator


def use_contiguous_grad_samplers(grad_sample_module: nn.Module) -> None:
    """Make this GradSampleModule's per-layer samplers see contiguous tensors.

    Opacus 1.6's convolution sampler (``unfold2d``, ``as_strided`` with NCHW strides) returns
    wrong per-sample gradients — zeros for a padded 3×3 convolution — when the activations are
    channels-last, which they are when the images are (e.g. a uint8 HWC array permuted to CHW
    without a copy). The samplers are wrapped for this instance only (Opacus' registry is
    untouched); ``.contiguous()`` is a no-op for contiguous tensors.
    """
    from opacus.grad_sample import GradSampleModule

    def contiguous(fn: Callable) -> Callable:
        def sampler(layer: nn.Module, activations: list, backprops: torch.Tensor) -> dict:
            return fn(layer, [a.contiguous() if isinstance(a, torch.Tensor) else a
                              for a in activations], backprops.contiguous())
        return sampler

    samplers = dict(GradSampleModule.GRAD_SAMPLERS)
    samplers.update(_norm_act_samplers(grad_sample_module))
    if nn.Conv2d in samplers:
        samplers[nn.Conv2d] = _with_depthwise(samplers[nn.Conv2d])
    grad_sample_module.GRAD_SAMPLERS = {kind: contiguous(fn) for kind, fn in samplers.items()}


def _with_depthwise(conv_sampler: Callable) -> Callable:
    """Opacus' Conv2d sampler, with depthwise convolutions (one filter per channel, as in
    EfficientNet/MobileNet blocks) done as one grouped convolution of the padded input by the
    output gradients (weight[n, c] = Σ_hw grad[n, c, h, w] · x_pad[n, c, h·s + i·d, w·s + j·d])
    instead of unfolding every patch: the same values, a fraction of the time."""
    import torch.nn.functional as F

    def sampler(layer: nn.Module, activations: list, backprops: torch.Tensor) -> dict:
        depthwise = (layer.groups == layer.in_channels == layer.out_channels > 1
                     and not isinstance(layer.padding, str) and layer.padding_mode == "zeros")
        if not depthwise:
            return conv_sampler(layer, activations, backprops)
        x = activations[0]
        n, c = x.shape[:2]
        (ph, pw), (kh, kw) = layer.padding, layer.kernel_size
        padded = F.pad(x, (pw, pw, ph, ph))
        out = {}
        if layer.weight.requires_grad:
            grad = F.conv2d(padded.reshape(1, n * c, *padded.shape[2:]),
                            backprops.reshape(n * c, 1, *backprops.shape[2:]),
                            stride=layer.dilation, dilation=layer.stride, groups=n * c)
            out[layer.weight] = grad[:, :, :kh, :kw].reshape(n, c, 1, kh, kw)
        if layer.bias is not None and layer.bias.requires_grad:
            out[layer.bias] = backprops.sum(dim=(2, 3))
        return out

    return sampler


def _norm_act_samplers(root: nn.Module) -> dict[type, Callable]:
    """A per-sample gradient for timm's ``GroupNormAct`` (GroupNorm, then dropout and an
    activation in one module), which Opacus has none for and would otherwise send through
    functorch, layer by layer. Opacus' hooks give the module's input and the gradient of its
    output; the gradient of the GroupNorm's output is recovered by differentiating the
    activation at the recomputed normalised values. Only where every such layer's dropout is
    the identity (a dropout mask cannot be recomputed)."""
    from timm.layers import GroupNormAct

    layers = [m for m in root.modules() if type(m) is GroupNormAct]
    if not layers or not all(isinstance(m.drop, nn.Identity) for m in layers):
        return {}

    def sampler(layer: nn.Module, activations: list, backprops: torch.Tensor) -> dict:
        import torch.nn.functional as F

        x = activations[0].detach()
        normed = F.group_norm(x, layer.num_groups, eps=layer.eps)  # before the affine map
        shape = (1, -1) + (1,) * (x.dim() - 2)
        z = normed * layer.weight.detach().view(shape)
        if layer.bias is not None:
            z = z + layer.bias.detach().view(shape)
        with torch.enable_grad():
            z.requires_grad_(True)
            (grad_z,) = torch.autograd.grad(layer.act(z), z, backprops)
        out = {}
        if layer.weight.requires_grad:
            out[layer.weight] = torch.einsum("ni...->ni", normed * grad_z)
        if layer.bias is not None and layer.bias.requires_grad:
            out[layer.bias] = torch.einsum("ni...->ni", grad_z)
        return out

    return {GroupNormAct: sampler}


def _norm_act_to_group_norm(root: nn.Module, num_groups: int | None) -> None:
    """Replace, in place, timm's BatchNorm+activation layers by ``GroupNormAct``."""
    from timm.layers import GroupNormAct

    for name, child in list(root.named_children()):
        is_norm_act = (isinstance(child, nn.modules.batchnorm._BatchNorm)
                       and isinstance(getattr(child, "act", None), nn.Module)
                       and isinstance(getattr(child, "drop", None), nn.Module))
        if not is_norm_act:
            _norm_act_to_group_norm(child, num_groups)
            continue
        c = child.num_features
        groups = num_groups if num_groups is not None else math.gcd(32, c)
        norm = GroupNormAct(c, num_groups=groups, eps=child.eps, affine=child.affine,
                            apply_act=False)
        norm.drop, norm.act = child.drop, child.act
        if child.affine:
            with torch.no_grad():
                norm.weight.copy_(child.weight)
                norm.bias.copy_(child.bias)
        ref = next(child.parameters(), None)
        if ref is not None:
            norm.to(ref.device)
        setattr(root, name, norm)


_MODULE_ATTRS = ("activations", "max_batch_len", "ft_compute_sample_grad",
                 "autograd_grad_sample_hooks")
_PARAM_ATTRS = ("grad_sample", "_current_grad_sample", "_forward_counter", "_norm_sample",
                "summed_grad")


def _clear_opacus_state(root: nn.Module) -> None:
    for m in root.modules():
        for attr in _MODULE_ATTRS:
            if attr in m.__dict__:
                delattr(m, attr)
    for p in root.parameters():
        for attr in _PARAM_ATTRS:
            if hasattr(p, attr):
                delattr(p, attr)


def _strip_stale_hooks(root: nn.Module) -> None:
    """Remove hooks left by an earlier wrapping that ended without ``close`` (an exception in
    the loop): they would add a second per-sample gradient per step."""
    from opacus.grad_sample import GradSampleModule

    for m in root.modules():
        for hooks in (m._forward_hooks, m._backward_hooks):
            for key, fn in list(hooks.items()):
                owner = getattr(getattr(fn, "func", fn), "__self__", None)
                if isinstance(owner, GradSampleModule):
                    del hooks[key]
    _clear_opacus_state(root)
