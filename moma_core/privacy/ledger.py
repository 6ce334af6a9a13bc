"""A site's privacy ledger: every stretch of DP training it did, on its own disk.

The ledger lives at ``<cache-dir>/privacy/ledger.json`` and is the site's memory of the privacy
budget it has spent. The budget composes over all runs and rounds: it is never reset. Because a
lost or misread ledger would silently hand the budget back, reading is strict: a file that is
unreadable, not valid JSON, of the wrong shape or with a value out of range raises
:class:`LedgerError` (only a missing file is an empty ledger), and writes are atomic.

The ledger holds accounting numbers and run names only: no data, no image paths. What goes to a
coordinator: a refused round's :class:`BudgetCheck` status as an error category, and after a
DP round the site's cumulative ε (``dp-epsilon``, over all its runs, so it also tells that the
site trained privately before).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table

from moma_core.atomic import atomic_write
from moma_core.privacy.accounting import (
    DPStep,
    _is_number,
    check_accountant,
    check_delta,
    epsilon,
)

try:  # POSIX: serialise concurrent writers of one ledger
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

LEDGER_VERSION = 1
MECHANISMS: tuple[str, ...] = ("dp-sgd", "client-dp")
UNITS: tuple[str, ...] = ("patch", "patient", "site")  # site: client-level DP

STATUS_OK = "ok"
STATUS_BUDGET_EXHAUSTED = "budget-exhausted"
STATUS_WOULD_EXCEED = "would-exceed"
BUDGET_STATUSES: frozenset[str] = frozenset(
    {STATUS_OK, STATUS_BUDGET_EXHAUSTED, STATUS_WOULD_EXCEED})
"""The only things a budget check tells a coordinator."""

_MAX_RUN_LENGTH = 200


class LedgerError(Exception):
    """The privacy ledger cannot be trusted: unreadable, corrupt, of the wrong shape, or with a
    value out of range. Never treat this as an empty ledger."""


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return str(value)


def _check_run(run: object) -> str:
    if not isinstance(run, str) or not run or len(run) > _MAX_RUN_LENGTH \
            or not run.isprintable():
        raise ValueError(f"run must be a non-empty printable string of at most "
                         f"{_MAX_RUN_LENGTH} characters, got {run!r}")
    return run


def _check_round(rnd: object) -> int:
    if not isinstance(rnd, int) or isinstance(rnd, bool) or rnd < 0:
        raise ValueError(f"round must be an integer >= 0, got {rnd!r}")
    return rnd


@dataclass(frozen=True)
class LedgerEntry:
    """One stretch of DP training recorded at this site. ``epsilon`` is the cumulative ε of
    ``unit`` under ``mechanism`` after this entry, at this entry's ``delta`` and with its
    ``accountant``, as computed when it was recorded (``inf``: no finite bound)."""

    run: str
    round: int
    mechanism: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    unit: str
    epsilon: float
    accountant: str
    time: str

    def __post_init__(self) -> None:
        _check_run(self.run)
        _check_round(self.round)
        _check_choice("mechanism", self.mechanism, MECHANISMS)
        step = DPStep(self.noise_multiplier, self.sample_rate, self.steps)
        object.__setattr__(self, "noise_multiplier", step.noise_multiplier)
        object.__setattr__(self, "sample_rate", step.sample_rate)
        object.__setattr__(self, "delta", check_delta(self.delta))
        _check_choice("unit", self.unit, UNITS)
        eps = self.epsilon
        if not _is_number(eps) or math.isnan(eps) or eps < 0:
            raise ValueError(f"epsilon must be a number >= 0, got {eps!r}")
        object.__setattr__(self, "epsilon", float(eps))
        check_accountant(self.accountant)
        try:
            stamp = datetime.fromisoformat(self.time) if isinstance(self.time, str) else None
        except ValueError:
            stamp = None
        if stamp is None or stamp.tzinfo is None:
            raise ValueError(f"time must be an ISO 8601 time with a time zone, got {self.time!r}")

    @property
    def step(self) -> DPStep:
        """The DP-SGD stretch this entry records."""
        return DPStep(self.noise_multiplier, self.sample_rate, self.steps)

    def to_json(self) -> dict[str, Any]:
        """The entry as stored in the ledger file (an unbounded ε is stored as null)."""
        data = asdict(self)
        if not math.isfinite(self.epsilon):
            data["epsilon"] = None
        return data

    @classmethod
    def from_json(cls, data: object) -> LedgerEntry:
        """An entry from its stored form; ValueError if it is not exactly a valid entry."""
        if not isinstance(data, dict):
            raise ValueError(f"an entry must be a JSON object, got {type(data).__name__}")
        names = {f.name for f in fields(cls)}
        if set(data) != names:
            missing, extra = sorted(names - set(data)), sorted(set(data) - names)
            raise ValueError(f"entry fields differ from the expected ones "
                             f"(missing: {missing}, unexpected: {extra})")
        values = dict(data)
        if values["epsilon"] is None:
            values["epsilon"] = math.inf
        return cls(**values)


@dataclass(frozen=True)
class BudgetCheck:
    """Whether a planned stretch of DP training stays within the site's ε cap.

    ``status`` is one of :data:`BUDGET_STATUSES`: ``"ok"``, ``"budget-exhausted"`` (at or above
    ``eps_max`` before training) or ``"would-exceed"`` (this stretch would cross it). Only the
    status code is meant for the coordinator."""

    allowed: bool
    status: str
    epsilon_now: float
    epsilon_after: float
    eps_max: float | None

    def __post_init__(self) -> None:
        if self.status not in BUDGET_STATUSES:
            raise ValueError(f"unknown budget status {self.status!r}")
        if self.allowed != (self.status == STATUS_OK):
            raise ValueError(f"allowed={self.allowed} contradicts status {self.status!r}")


def _reject_constant(name: str) -> float:
    raise ValueError(f"non-standard JSON number {name}")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        raise ValueError(f"duplicate keys in a JSON object: {sorted(keys)}")
    return dict(pairs)


class PrivacyLedger:
    """The privacy ledger of the site whose cache folder is ``cache_dir``.

    Every query reads the file afresh (nothing is cached in memory), so two ledgers on the same
    folder always agree."""

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = Path(cache_dir)
        self.path = self.cache_dir / "privacy" / "ledger.json"

    def __repr__(self) -> str:
        return f"PrivacyLedger({str(self.cache_dir)!r})"

    def entries(self) -> list[LedgerEntry]:
        """All recorded entries, oldest first. Missing file: []; anything wrong: LedgerError."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        except (OSError, UnicodeDecodeError) as exc:
            raise LedgerError(f"cannot read the privacy ledger {self.path}: {exc}") from exc
        try:
            data = json.loads(text, parse_constant=_reject_constant,
                              object_pairs_hook=_no_duplicate_keys)
        except ValueError as exc:
            raise LedgerError(f"the privacy ledger {self.path} is not valid JSON: {exc}") from exc
        if not isinstance(data, dict) or set(data) != {"version", "entries"}:
            raise LedgerError(f"the privacy ledger {self.path} is not an object with exactly "
                              f"'version' and 'entries'")
        version = data["version"]
        if not isinstance(version, int) or isinstance(version, bool) \
                or version != LEDGER_VERSION:
            raise LedgerError(f"the privacy ledger {self.path} has version {version!r}; this "
                              f"software reads version {LEDGER_VERSION}")
        if not isinstance(data["entries"], list):
            raise LedgerError(f"the privacy ledger {self.path}: 'entries' is not a list")
        out = []
        for i, item in enumerate(data["entries"]):
            try:
                out.append(LedgerEntry.from_json(item))
            except (TypeError, ValueError) as exc:
                raise LedgerError(f"the privacy ledger {self.path}: entry {i} is invalid: "
                                  f"{exc}") from exc
        return out

    def history(self, unit: str, mechanism: str = "dp-sgd") -> list[DPStep]:
        """Every recorded stretch of ``mechanism`` for ``unit``, over all runs and rounds."""
        _check_choice("unit", unit, UNITS)
        _check_choice("mechanism", mechanism, MECHANISMS)
        return [e.step for e in self.entries() if e.unit == unit and e.mechanism == mechanism]

    def spent(self, unit: str, delta: float, accountant: str = "rdp",
              mechanism: str = "dp-sgd") -> float:
        """ε spent so far by ``unit`` under ``mechanism``, all runs and rounds composed."""
        return epsilon(self.history(unit, mechanism), delta, accountant)

    def plan(self, eps_max: float | None, step: DPStep, unit: str, delta: float,
             accountant: str = "rdp", mechanism: str = "dp-sgd") -> BudgetCheck:
        """The ε this site would have after also training ``step``, and whether that stays
        within ``eps_max`` (None: no cap)."""
        if eps_max is not None and (not _is_number(eps_max) or not math.isfinite(eps_max)
                                    or eps_max < 0):
            raise ValueError(f"eps_max must be None or a finite number >= 0, got {eps_max!r}")
        if not isinstance(step, DPStep):
            raise ValueError(f"step must be a DPStep, got {type(step).__name__}")
        history = self.history(unit, mechanism)
        now = epsilon(history, delta, accountant)
        after = epsilon([*history, step], delta, accountant)
        if eps_max is None:
            status = STATUS_OK
        elif now >= eps_max:
            status = STATUS_BUDGET_EXHAUSTED
        elif after > eps_max:
            status = STATUS_WOULD_EXCEED
        else:
            status = STATUS_OK
        return BudgetCheck(allowed=status == STATUS_OK, status=status, epsilon_now=now,
                           epsilon_after=after,
                           eps_max=None if eps_max is None else float(eps_max))

    def record(self, run: str, round: int, step: DPStep, unit: str, delta: float,
               accountant: str = "rdp", mechanism: str = "dp-sgd") -> LedgerEntry:
        """Append ``step`` (trained in ``round`` of ``run``) with the cumulative ε of ``unit``
        after it, and write the ledger atomically. Raises LedgerError (and writes nothing) if
        the existing ledger cannot be trusted."""
        if not isinstance(step, DPStep):
            raise ValueError(f"step must be a DPStep, got {type(step).__name__}")
        _check_choice("unit", unit, UNITS)
        _check_choice("mechanism", mechanism, MECHANISMS)
        check_accountant(accountant)
        delta = check_delta(delta)
        with self._locked():
            entries = self.entries()
            history = [e.step for e in entries if e.unit == unit and e.mechanism == mechanism]
            entry = LedgerEntry(
                run=_check_run(run), round=_check_round(round), mechanism=mechanism,
                noise_multiplier=step.noise_multiplier, sample_rate=step.sample_rate,
                steps=step.steps, delta=delta, unit=unit,
                epsilon=epsilon([*history, step], delta, accountant), accountant=accountant,
                time=datetime.now(UTC).isoformat(timespec="seconds"))
            self._write([*entries, entry])
        return entry

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if fcntl is None:  # pragma: no cover
            yield
            return
        with open(self.path.parent / ".ledger.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _write(self, entries: list[LedgerEntry]) -> None:
        text = json.dumps({"version": LEDGER_VERSION, "entries": [e.to_json() for e in entries]},
                          indent=1, allow_nan=False) + "\n"

        def write(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())

        atomic_write(self.path, write)
        try:  # make the rename itself durable
            fd = os.open(self.path.parent, os.O_RDONLY)
        except OSError:  # pragma: no cover
            return
        try:
            os.fsync(fd)
        except OSError:  # pragma: no cover
            pass
        finally:
            os.close(fd)


_TEXT_COLUMNS = ("run", "mechanism", "unit", "accountant")


def _eps_text(eps: float) -> str:
    return f"{eps:.3f}" if math.isfinite(eps) else "∞"


def ledger_table(ledger: PrivacyLedger) -> Table:
    """The ledger's entries as a rich table (raises LedgerError if it cannot be trusted)."""
    rows = [(e.run, str(e.round), e.mechanism, e.unit, f"{e.noise_multiplier:.4g}",
             f"{e.sample_rate:.4g}", str(e.steps), f"{e.delta:.3g}", _eps_text(e.epsilon),
             e.accountant) for e in ledger.entries()]
    table = Table(title=f"privacy ledger {ledger.path}", title_justify="left",
                  box=box.SIMPLE_HEAD)
    headers = ("run", "round", "mechanism", "unit", "noise\nmultiplier", "sample\nrate",
               "steps", "δ", "ε\nafter", "accountant")
    for name in headers:
        table.add_column(name, justify="left" if name in _TEXT_COLUMNS else "right")
    for row in rows:
        table.add_row(escape(row[0]), *row[1:])
    return table


def print_ledger(cache_dir: Path, console: Console | None = None) -> int:
    """Print this site's privacy ledger (to stdout, or ``console``); 0, or 2 if it cannot be
    trusted (the reason goes to stderr)."""
    ledger = PrivacyLedger(cache_dir)
    out = console or Console()
    try:
        table = ledger_table(ledger)
    except LedgerError as exc:
        Console(stderr=True, soft_wrap=True).print(f"[red]error:[/] {escape(str(exc))}")
        return 2
    if table.row_count == 0:
        out.print("no DP training recorded at this site")
    else:
        if console is None:  # never cut a value short: a narrow terminal may wrap lines instead
            width = Measurement.get(out, out.options.update_width(1000), table).maximum
            if width > out.width:
                out = Console(width=width)
        out.print(table)
    return 0
