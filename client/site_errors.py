"""What a site tells the coordinator when a message fails: a category, never the text.

The exception is logged in full at the site; the reply carries only its category and code
(:data:`moma_protocol.wire.ERROR_CODES`). Each exception class declares its category as the
class attribute ``category`` (a subclass may declare another: the most derived declaration
counts); a failure the site's warm worker reported keeps the category the worker chose
(:class:`client.site_worker.WorkerFailure`). An exception without a category, or with one
:data:`~moma_protocol.wire.ERROR_CODES` does not name, is an ``internal-error``.
"""

from __future__ import annotations

import sys

from flwr.app import Message

from moma_protocol.wire import ERROR_CODES, category_reply


class ConfigError(ValueError):
    """A run or node config this site cannot use (answered as ``config-error``)."""

    category = "config-error"


class MissingTeacher(RuntimeError):
    """The site's cache lacks the teacher the coordinator named."""

    category = "missing-teacher"


class PrivacyRefused(RuntimeError):
    """The site's privacy policy refuses the run's settings (e.g. it requires DP-SGD)."""

    category = "privacy-refused"


class PrivacyBudgetExceeded(RuntimeError):
    """Training would take the site past its ε budget (``status``: the ledger's code)."""

    category = "privacy-budget"


def error_category(exc: BaseException) -> str:
    """The category an exception is reported as: by its type, never by its text.

    Out of memory (``MemoryError``, torch's ``OutOfMemoryError``) first; then the ``category``
    the exception's class declares, looked up along its method resolution order (an instance
    may carry its own: :class:`client.site_worker.WorkerFailure`). torch is not imported
    here: an exception of torch's exists only once torch is loaded.
    """
    torch = sys.modules.get("torch")
    if isinstance(exc, MemoryError) or (
            torch is not None and isinstance(exc, torch.OutOfMemoryError)):
        return "out-of-memory"
    category = getattr(exc, "category", None)
    return category if isinstance(category, str) and category in ERROR_CODES \
        else "internal-error"


def error_reply(msg: Message, exc: BaseException) -> Message:
    """The error reply for ``exc``: its category only (log the exception at the site)."""
    return category_reply(msg, error_category(exc))
