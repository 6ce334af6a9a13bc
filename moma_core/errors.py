"""The project's user-facing errors, importable without torch (the command-line tools check
their input and fail with one line before they load torch).

Each class declares ``category``: what a federated site reports when it fails with it (a name of
``moma_protocol.wire.ERROR_CODES``, which remains the authority; moma_core does not import the
protocol, and tests/test_protocol.py checks every declared name against it)."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint is missing, unsafe, corrupt or does not fit the expected model."""

    category = "teacher-rejected"


class DataError(ValueError):
    """A user-facing problem with input data; the message names the file, folder or label."""

    category = "data-error"


class ClassMismatch(DataError):
    """A site's classes are not the run's: it has a class the run does not name, or (synthetic
    data, whose order is fixed) another order. The message names both lists."""

    category = "class-mismatch"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""

    category = "training-diverged"


class DeviceUnavailable(ValueError):
    """The device asked for (``cuda``) does not exist on this machine."""

    category = "config-error"
