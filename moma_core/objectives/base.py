"""What every objective shares: the interface, the teacher holder, building one from its
config through the registry (:mod:`moma_core.objective_registry`), and the helpers around it.

An objective owns everything the loss needs besides the student (teacher, projection heads,
attention, queue) — all of it site-private state. The training loop only calls
``loss(student, x, y)`` and ``after_step(student)`` and optimises ``trainable_parameters()``
together with the student.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import Dataset

from moma_core import objective_registry
from moma_core.losses import kd_kl_loss
from moma_core.method_config import ObjectiveConfig


@dataclass(frozen=True)
class BuildInputs:
    """What an objective may be built from besides its config (see :func:`build_objective`).

    ``same_task`` is resolved for objectives that need a teacher (None for the others)."""

    student: nn.Module
    teacher: nn.Module | None = None
    same_task: bool | None = None
    n_data: int | None = None
    batch_size: int | None = None
    public_keys: torch.Tensor | None = None


class Objective(nn.Module):
    """Interface: a loss on a batch plus whatever state it keeps between steps.

    A registered objective (:func:`moma_core.objective_registry.register`) declares in its own
    class body every attribute of :data:`moma_core.objective_registry.DECLARED` and builds
    itself with :meth:`from_config`.
    """

    name = "objective"
    # True when the loss is a mean of per-sample terms, each depending on its own sample only
    # and on no state kept from earlier private batches: usable with DP-SGD (moma_core.privacy)
    dp_compatible = False
    # True when ``loss`` takes ``index=`` (each sample's position in the training set)
    needs_index = False

    @classmethod
    def from_config(cls, cfg: ObjectiveConfig, inputs: BuildInputs) -> Objective:
        """The objective for ``cfg`` (``cfg.kind`` is this class's name) and ``inputs``."""
        raise NotImplementedError

    @classmethod
    def check_teacher(cls, cfg: ObjectiveConfig, teacher: nn.Module, student: nn.Module
                      ) -> None:
        """Refuse (ValueError) a teacher this objective cannot pair with ``student``."""

    def loss(self, student: nn.Module, x: torch.Tensor, y: torch.Tensor
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def after_step(self, student: nn.Module) -> None:
        """Called after each optimiser step (momentum updates, queue)."""

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the objective optimised together with the student."""
        return iter(())


class TeacherObjective(Objective):
    """Holds a teacher copy that never receives gradients and stays in eval mode."""

    def __init__(self, teacher: nn.Module, cfg: ObjectiveConfig, same_task: bool) -> None:
        super().__init__()
        self.cfg = cfg
        self.same_task = same_task
        self.teacher = copy.deepcopy(teacher)
        self.teacher.requires_grad_(False)
        self.teacher.eval()

    def train(self, mode: bool = True) -> TeacherObjective:
        super().train(mode)
        self.teacher.eval()  # BN statistics of the teacher are never re-estimated
        return self

    def _kl(self, z_s: torch.Tensor, z_t: torch.Tensor) -> torch.Tensor:
        if not self.same_task:
            return z_s.new_zeros(())
        return kd_kl_loss(z_s, z_t, self.cfg.kd_temperature)


_TeacherObjective = TeacherObjective  # the name the objectives' modules used before


def build_objective(cfg: ObjectiveConfig, student: nn.Module,
                    teacher: nn.Module | None = None, same_task: bool | None = None,
                    n_data: int | None = None, public_keys: torch.Tensor | None = None,
                    batch_size: int | None = None) -> Objective:
    """The objective ``cfg.kind`` (from the registry) for ``student``; ``same_task`` decides
    whether KL is used.

    Pass ``same_task`` from the class *names* of teacher and student (:func:`same_task`); when
    omitted it falls back to comparing class counts, which cannot tell two 4-class tasks apart.
    CRCKD keeps one memory-bank row per training sample: give ``n_data`` (the training set's
    size) and feed it :func:`training_set` batches, which carry each sample's index; MoMA's
    residual attention sizes its queue from ``n_data`` and ``batch_size``
    (:func:`moma_core.objectives.moma.queue_size_for`) and also takes :func:`training_set`
    batches. ``dp-moma`` (:class:`moma_core.objectives.dp_moma.DPMoMA`) needs ``public_keys``:
    the frozen teacher's keys of non-private images, ``public_queue(teacher, images)`` (no key
    head).
    """
    cls = objective_registry.get(cfg.kind)
    if cls.needs_teacher:
        if teacher is None:
            raise ValueError(f"objective {cfg.kind!r} needs a teacher")
        if same_task is None:
            same_task = _num_classes(teacher) == _num_classes(student)
    return cls.from_config(cfg, BuildInputs(student, teacher, same_task, n_data, batch_size,
                                            public_keys))


def training_set(objective: Objective, dataset: Dataset) -> Dataset:
    """``dataset`` as the objective consumes it: items ``(x, y, index)`` for objectives with
    per-sample state (``needs_index``), else unchanged."""
    if getattr(objective, "needs_index", False):
        from moma_core.data.indexed import WithIndex

        return WithIndex(dataset)
    return dataset


def check_teacher_fits(cfg: ObjectiveConfig, teacher: nn.Module, student: nn.Module) -> None:
    """Refuse (ValueError) a teacher the objective cannot pair with ``student``.

    MoMA with ``teacher_update = "momentum"`` moves the teacher towards the student (MoCo's key
    encoder), and CRCKD's mean teacher is an EMA of the student: both need the student to be
    the teacher's architecture (same backbone parameters; the classifier may differ). MoMA with a
    frozen teacher, KD and CE take any teacher. Each objective's ``check_teacher`` decides; the
    objectives call this when they are built; the coordinator calls it on untrained models
    before a run starts.
    """
    objective_registry.get(cfg.kind).check_teacher(cfg, teacher, student)


def same_task(teacher_classes: tuple[str, ...] | list[str],
              student_classes: tuple[str, ...] | list[str]) -> bool:
    """Teacher and student share the label space (same names, same order): KL applies."""
    return tuple(teacher_classes) == tuple(student_classes)


def _num_classes(model: nn.Module) -> int:
    return int(model.get_classifier().out_features)


def init_student_from_teacher(student: nn.Module, teacher: nn.Module,
                              classifier: bool = True) -> int:
    """Copy every teacher tensor whose name and shape match into the student; returns count.

    ``classifier=False`` (a teacher of another task: pass ``same_task(...)``) leaves the
    student's classifier at its fresh initialisation even when the class counts agree — the
    teacher's class k is not the student's class k.
    """
    s_state = student.state_dict()
    head = {f"{name}." for name, module in student.named_modules()
            if module is student.get_classifier()}
    matched = {k: v for k, v in teacher.state_dict().items()
               if k in s_state and s_state[k].shape == v.shape
               and (classifier or not any(k.startswith(p) for p in head))}
    student.load_state_dict(matched, strict=False)
    return len(matched)
