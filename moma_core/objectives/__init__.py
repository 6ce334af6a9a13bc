"""Training objectives behind one interface, one module each, chosen by name from the registry
(:mod:`moma_core.objective_registry`): ``ce`` (:mod:`.ce`), ``kd`` (:mod:`.kd`), ``moma``
(:mod:`.moma`), ``crckd`` (:mod:`.crckd`), ``dp-moma`` (:mod:`.dp_moma`).

A new objective is one new module here: a class decorated with
:func:`~moma_core.objective_registry.register` that declares its name, what it needs (teacher,
sample indices, same task, public keys), whether DP-SGD can run it and its loss terms, and
builds itself with ``from_config`` (see :class:`~moma_core.objectives.base.Objective`). The
settings, the protocol's metric allow-list, the run report and the sites read the registry.
"""

from moma_core.method_config import OBJECTIVES, ObjectiveConfig
from moma_core.objective_registry import (
    Declaration,
    RegistryError,
    declaration,
    declarations,
    dp_names,
    get,
    names,
    register,
    unregister,
)
from moma_core.objectives.base import (
    BuildInputs,
    Objective,
    TeacherObjective,
    _TeacherObjective,
    build_objective,
    check_teacher_fits,
    init_student_from_teacher,
    same_task,
    training_set,
)
from moma_core.objectives.ce import CrossEntropyOnly
from moma_core.objectives.kd import VanillaKD
from moma_core.objectives.moma import MoMA, nce_health, queue_size_for

__all__ = ["OBJECTIVES", "BuildInputs", "CrossEntropyOnly", "Declaration", "MoMA", "Objective",
           "ObjectiveConfig", "RegistryError", "TeacherObjective", "VanillaKD",
           "_TeacherObjective", "build_objective", "check_teacher_fits", "declaration",
           "declarations", "dp_names", "get", "init_student_from_teacher", "names",
           "nce_health", "queue_size_for", "register", "same_task", "training_set",
           "unregister"]
