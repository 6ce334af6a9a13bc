"""What a site tells the coordinator when a message fails: a category, never the text.

The exception is logged in full at the site; the reply carries only its category and code
(:data:`moma_protocol.wire.ERROR_CODES`), chosen by the exception's type.
"""

from __future__ import annotations

import sys

from flwr.app import Message

from client.site_config import SiteConfigError
from moma_protocol.wire import ERROR_CODES, category_reply


class ConfigError(ValueError):
    """A run or node config this site cannot use (answered as ``config-error``)."""


class MissingTeacher(RuntimeError):
    """The site's cache lacks the teacher the coordinator named."""


class PrivacyRefused(RuntimeError):
    """The site's privacy policy refuses the run's settings (e.g. it requires DP-SGD)."""


class PrivacyBudgetExceeded(RuntimeError):
    """Training would take the site past its ε budget (``status``: the ledger's code)."""


def error_category(exc: BaseException) -> str:
    """The category an exception is reported as: by its type, never by its text.

    (The training stack's exception types are imported here, on failure only, so that a
    handler that never trains does not load torch.) A failure the site's worker reported
    keeps the category the worker chose (:class:`client.site_worker.WorkerFailure`).
    """
    from client.site_worker import WorkerFailure

    if isinstance(exc, WorkerFailure):
        return exc.category if exc.category in ERROR_CODES else "internal-error"
    import torch

    from client.site_training import StudentMismatch
    from moma_core.checkpoint import CheckpointError
    from moma_core.data.datasets import DataError
    from moma_core.errors import ClassMismatch, DeviceUnavailable
    from moma_core.train import TrainingDiverged
    from moma_protocol.settings import ConfigError as RunConfigError

    kinds: tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], str], ...] = (
        ((MemoryError, torch.OutOfMemoryError), "out-of-memory"),
        (MissingTeacher, "missing-teacher"),
        (PrivacyRefused, "privacy-refused"),
        (PrivacyBudgetExceeded, "privacy-budget"),
        (StudentMismatch, "config-error"),
        (CheckpointError, "teacher-rejected"),
        (ClassMismatch, "class-mismatch"),
        (DataError, "data-error"),
        (TrainingDiverged, "training-diverged"),
        ((ConfigError, SiteConfigError, RunConfigError, DeviceUnavailable), "config-error"),
    )
    ledger = sys.modules.get("moma_core.privacy.ledger")  # loaded only if DP was in play
    if ledger is not None and isinstance(exc, ledger.LedgerError):
        return "privacy-refused"  # a damaged ledger: the budget cannot be checked
    return next((cat for types, cat in kinds if isinstance(exc, types)), "internal-error")


def error_reply(msg: Message, exc: BaseException) -> Message:
    """The error reply for ``exc``: its category only (log the exception at the site)."""
    return category_reply(msg, error_category(exc))
