"""The project's user-facing errors, importable without torch (the command-line tools check
their input and fail with one line before they load torch)."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint is missing, unsafe, corrupt or does not fit the expected model."""


class DataError(ValueError):
    """A user-facing problem with input data; the message names the file, folder or label."""


class ClassMismatch(DataError):
    """A site's classes are not the run's: it has a class the run does not name, or (synthetic
    data, whose order is fixed) another order. The message names both lists."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class DeviceUnavailable(ValueError):
    """The device asked for (``cuda``) does not exist on this machine."""
