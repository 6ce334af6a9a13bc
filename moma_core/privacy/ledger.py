"""A site's privacy ledger: every stretch of DP training it did, on its own disk.

The ledger is the site's memory of the privacy budget it has spent. The budget composes over all
runs and rounds: it is never reset. ``moma-client`` keeps it outside the site's cache folder
(``--ledger``; by default ``$XDG_STATE_HOME/moma-fl/privacy-ledger.json``), so that wiping the
cache does not hand the budget back; a site whose node config names no ledger (a simulated site)
keeps it at ``<cache-dir>/privacy/ledger.json``, where versions before the hash chain kept every
ledger. Such an old ledger is migrated once: copied into the site's ledger and replaced by a
short note naming where it went (:meth:`PrivacyLedger.entries`).

Because a lost, edited or misread ledger would silently hand the budget back, reading is strict:

- a file that is unreadable, not valid JSON, of the wrong shape or with a value out of range
  raises :class:`LedgerError` (only a ledger that never existed is empty);
- the ledger is append-only with a hash chain: each entry carries ``prev``, the SHA-256 of the
  entry before it (a fixed genesis value for the first), and ``hash``, the SHA-256 of its own
  canonical JSON including ``prev``. Any edit, deletion, insertion or reordering of recorded
  entries breaks the chain and raises :class:`LedgerError`;
- the chain's head (how many entries, the last one's hash) is kept in a second file next to the
  ledger, ``<ledger>.head``: removing trailing entries, or the ledger file alone, is detected too.

What this cannot detect: a deliberate rewrite of both files with a recomputed chain (the site
operator is trusted: this guards against accidents), restoring an older copy of both files, or
deleting both files (with a ledger migrated from a cache folder, the note left there still
names the missing ledger). Writes are atomic (ledger first, head second: a crash between the
two leaves a ledger one entry ahead of its head, which is accepted) and check-and-record is one
operation under the ledger's file lock (:meth:`PrivacyLedger.spend`).

Budgets (accounts): patient-level DP also bounds each patch (a patch belongs to one patient), so
a patient-level DP-SGD round spends the patch-level budget as well: the patch-level ε composes
every DP-SGD entry, the patient-level ε the patient-level entries only (patch-level rounds add
to a patient's privacy loss without a bound, and are not counted in that figure). A cap holds
for every account a round spends. Client-level DP (unit ``site``) is its own account. Each
account's ε is computed by the accountant from the recorded steps, at the smallest δ any of its
rounds used (a larger δ makes ε look smaller); the ε stored with an entry is what was computed
when it was recorded, covered by the chain, and never what is printed.

The ledger holds accounting numbers and run names only: no data, no image paths. What goes to a
coordinator: a refused round's :class:`BudgetCheck` status as an error category, and after a
DP round the site's cumulative ε of the run's unit (``dp-epsilon``, over all its runs, so it
also tells that the site trained privately before).
"""

from __future__ import annotations

import hashlib
import json
import logging
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

log = logging.getLogger("moma.privacy")

LEDGER_VERSION = 2
"""Version of the ledger file this software writes: 2 (hash-chained). Version 1 (no chain) is
read once, to migrate it."""
GENESIS = "0" * 64
"""``prev`` of a ledger's first entry."""
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

    category = "privacy-refused"  # what a site reports: its budget cannot be checked


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
    the budget of ``unit`` under ``mechanism`` after this entry (:func:`account`), at the
    smallest δ of that budget's rounds and with this entry's ``accountant``, as computed when
    it was recorded (``inf``: no finite bound). It is kept for the record and covered by the
    hash chain; what is printed and checked is always recomputed from the steps."""

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
    ``eps_max`` before training) or ``"would-exceed"`` (this stretch would cross it), over
    every budget the stretch spends (:func:`accounts_spent`); ``epsilon_now`` and
    ``epsilon_after`` are the largest ε among those budgets. Only the status code is meant for
    the coordinator."""

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


class BudgetRefused(Exception):
    """A stretch of DP training the site's cap does not allow; nothing was recorded. ``check``
    holds why (its status is the only thing meant for the coordinator)."""

    def __init__(self, check: BudgetCheck) -> None:
        super().__init__(f"{check.status}: ε {_eps_text(check.epsilon_now)} now, "
                         f"{_eps_text(check.epsilon_after)} after, cap {check.eps_max}")
        self.check = check


_PATIENT_BOUNDS_PATCH: dict[tuple[str, str], tuple[tuple[str, str], ...]] = {
    ("dp-sgd", "patient"): (("dp-sgd", "patch"), ("dp-sgd", "patient")),
}


def accounts_spent(mechanism: str, unit: str) -> tuple[tuple[str, str], ...]:
    """The budgets, as ``(mechanism, unit)`` accounts, that a stretch of ``mechanism`` at
    ``unit`` spends: its own, and for patient-level DP-SGD the patch level's too (a patch
    belongs to one patient, so a patient-level guarantee holds for each of its patches)."""
    return _PATIENT_BOUNDS_PATCH.get((mechanism, unit), ((mechanism, unit),))


def account(entries: list[LedgerEntry], mechanism: str, unit: str) -> list[LedgerEntry]:
    """The entries that spend the ``(mechanism, unit)`` budget, oldest first."""
    return [e for e in entries if (mechanism, unit) in accounts_spent(e.mechanism, e.unit)]


def _account_epsilon(past: list[LedgerEntry], step: DPStep | None, delta: float | None,
                     accountant: str) -> tuple[float, float]:
    """(ε of ``past``, ε of ``past`` then ``step``), both at the smallest δ of ``past`` and
    ``delta``."""
    smallest = min([e.delta for e in past] + ([delta] if delta is not None else []))
    history = [e.step for e in past]
    now = epsilon(history, smallest, accountant)
    return now, (epsilon([*history, step], smallest, accountant) if step else now)


def _assess(entries: list[LedgerEntry], eps_max: float | None, step: DPStep, unit: str,
            delta: float, accountant: str, mechanism: str) -> tuple[BudgetCheck, float]:
    """The budget check of ``step`` over every account it spends, and the ε of its own
    ``(mechanism, unit)`` account after it."""
    results = {acc: _account_epsilon(account(entries, *acc), step, delta, accountant)
               for acc in accounts_spent(mechanism, unit)}
    now = max(n for n, _ in results.values())
    after = max(a for _, a in results.values())
    if eps_max is None:
        status = STATUS_OK
    elif now >= eps_max:
        status = STATUS_BUDGET_EXHAUSTED
    elif after > eps_max:
        status = STATUS_WOULD_EXCEED
    else:
        status = STATUS_OK
    check = BudgetCheck(allowed=status == STATUS_OK, status=status, epsilon_now=now,
                        epsilon_after=after,
                        eps_max=None if eps_max is None else float(eps_max))
    return check, results[(mechanism, unit)][1]


def _check_eps_max(eps_max: object) -> float | None:
    if eps_max is not None and (not _is_number(eps_max) or not math.isfinite(eps_max)
                                or eps_max < 0):
        raise ValueError(f"eps_max must be None or a finite number >= 0, got {eps_max!r}")
    return eps_max  # type: ignore[return-value]


def _reject_constant(name: str) -> float:
    raise ValueError(f"non-standard JSON number {name}")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        raise ValueError(f"duplicate keys in a JSON object: {sorted(keys)}")
    return dict(pairs)


_MISSING = object()


def _read_json(path: Path, what: str) -> Any:
    """The JSON in ``path`` (``_MISSING`` if there is no such file); LedgerError if it is
    unreadable or not JSON."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return _MISSING
    except (OSError, UnicodeDecodeError) as exc:
        raise LedgerError(f"cannot read {what} {path}: {exc}") from exc
    try:
        return json.loads(text, parse_constant=_reject_constant,
                          object_pairs_hook=_no_duplicate_keys)
    except ValueError as exc:
        raise LedgerError(f"{what} {path} is not valid JSON: {exc}") from exc


def _is_version(value: object, *versions: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value in versions


def _digest(item: dict[str, Any]) -> str:
    """SHA-256 of an entry's canonical JSON (sorted keys, no spaces), ``hash`` left out."""
    content = {k: v for k, v in item.items() if k != "hash"}
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _is_hash(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 \
        and all(c in "0123456789abcdef" for c in value)


def _chained(entries: list[LedgerEntry], prev: str = GENESIS) -> list[dict[str, Any]]:
    """``entries`` as stored: each with ``prev`` and its own ``hash``, chained from ``prev``."""
    items = []
    for entry in entries:
        item = {**entry.to_json(), "prev": prev}
        item["hash"] = prev = _digest(item)
        items.append(item)
    return items


@dataclass(frozen=True)
class _Stored:
    """A ledger file as read: its version, its raw entries, or the path a migrated (old)
    ledger was moved to (then ``items`` is empty)."""

    version: int
    items: list[Any]
    moved_to: str | None = None


def _parse(data: object, path: Path) -> _Stored:
    where = f"the privacy ledger {path}"
    if isinstance(data, dict) and set(data) == {"version", "moved-to"} \
            and _is_version(data["version"], LEDGER_VERSION) \
            and isinstance(data["moved-to"], str) and data["moved-to"]:
        return _Stored(LEDGER_VERSION, [], data["moved-to"])
    if not isinstance(data, dict) or set(data) != {"version", "entries"}:
        raise LedgerError(f"{where} is not an object with exactly 'version' and 'entries'")
    if not _is_version(data["version"], 1, LEDGER_VERSION):
        raise LedgerError(f"{where} has version {data['version']!r}; this software reads "
                          f"version {LEDGER_VERSION} (and migrates version 1)")
    if not isinstance(data["entries"], list):
        raise LedgerError(f"{where}: 'entries' is not a list")
    return _Stored(data["version"], data["entries"])


def _read_ledger(path: Path, what: str = "the privacy ledger") -> _Stored | None:
    """The ledger file at ``path`` as stored (None if there is none); LedgerError if it is not
    a ledger."""
    data = _read_json(path, what)
    return None if data is _MISSING else _parse(data, path)


def _entry(item: object, i: int, path: Path, chained: bool) -> LedgerEntry:
    if chained and isinstance(item, dict):
        if not (_is_hash(item.get("prev")) and _is_hash(item.get("hash"))):
            raise LedgerError(f"the privacy ledger {path}: entry {i} lacks its hash chain "
                              f"('prev' and 'hash', 64 hex digits each)")
        item = {k: v for k, v in item.items() if k not in ("prev", "hash")}
    try:
        return LedgerEntry.from_json(item)
    except (TypeError, ValueError) as exc:
        raise LedgerError(f"the privacy ledger {path}: entry {i} is invalid: {exc}") from exc


def _verify_chain(items: list[Any], path: Path) -> list[LedgerEntry]:
    """The entries of a version-2 ledger, its hash chain checked link by link."""
    out, prev = [], GENESIS
    for i, item in enumerate(items):
        out.append(_entry(item, i, path, chained=True))
        if item["prev"] != prev:
            raise LedgerError(f"the privacy ledger {path}: entry {i} does not follow "
                              f"{'entry ' + str(i - 1) if i else 'the start'} (entries were "
                              f"removed, inserted or reordered)")
        if item["hash"] != _digest(item):
            raise LedgerError(f"the privacy ledger {path}: entry {i} was changed after it "
                              f"was recorded (its hash does not match its content)")
        prev = item["hash"]
    return out


@dataclass(frozen=True)
class _Head:
    """The chain head kept next to a ledger: how many entries it held and the last one's
    hash (``GENESIS`` for none), as of its last write."""

    count: int
    last: str

    def to_json(self) -> dict[str, Any]:
        return {"version": LEDGER_VERSION, "entries": self.count, "last": self.last}


def _parse_head(data: object, path: Path) -> _Head:
    if not isinstance(data, dict) or set(data) != {"version", "entries", "last"} \
            or not _is_version(data["version"], LEDGER_VERSION) \
            or not isinstance(data["entries"], int) or isinstance(data["entries"], bool) \
            or data["entries"] < 0 or not _is_hash(data["last"]):
        raise LedgerError(f"the privacy ledger's head file {path} is not a version "
                          f"{LEDGER_VERSION} head ('version', 'entries', 'last')")
    return _Head(data["entries"], data["last"])


def _fsync_dir(folder: Path) -> None:
    try:  # make a rename durable
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` atomically and durably."""
    text = json.dumps(data, indent=1, allow_nan=False) + "\n"

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)
    _fsync_dir(path.parent)


def _same_file(a: Path, b: Path) -> bool:
    return os.path.abspath(a) == os.path.abspath(b)


def legacy_path(cache_dir: Path) -> Path:
    """Where a site's ledger lives in its cache folder: the only place before version 2, and
    still the place of a site whose node config names no ledger (a simulated site)."""
    return Path(cache_dir) / "privacy" / "ledger.json"


class PrivacyLedger:
    """The privacy ledger at ``path``, of the site whose cache folder is ``cache_dir``.

    ``PrivacyLedger(cache_dir)``: the ledger kept in the cache folder
    (:func:`legacy_path`). ``PrivacyLedger(cache_dir, path=file)``: the ledger ``file``; an
    old ledger left in the cache folder is migrated into it on first use (only while ``file``
    holds none: two ledgers are refused). ``PrivacyLedger(path=file)``: ``file`` alone.

    Every query reads the files afresh (nothing is cached in memory), so two ledgers on the same
    file always agree."""

    def __init__(self, cache_dir: Path | None = None, *, path: Path | None = None) -> None:
        if cache_dir is None and path is None:
            raise ValueError("a privacy ledger needs a cache folder or a path")
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.path = Path(path) if path is not None else legacy_path(self.cache_dir)
        self.head_path = self.path.with_name(self.path.name + ".head")
        old = None if self.cache_dir is None else legacy_path(self.cache_dir)
        self.old = None if old is None or _same_file(old, self.path) else old

    def __repr__(self) -> str:
        return f"PrivacyLedger({str(self.path)!r})"

    # -- reading --------------------------------------------------------------------------

    def entries(self) -> list[LedgerEntry]:
        """All recorded entries, oldest first, their chain and head checked (an old ledger is
        migrated first). No ledger: []; anything wrong: LedgerError."""
        if self._migration_pending():
            with self._locked():
                self._migrate()
        return self._verified()

    def _stored(self) -> _Stored | None:
        return _read_ledger(self.path)

    def _head(self) -> _Head | None:
        data = _read_json(self.head_path, "the privacy ledger's head file")
        return None if data is _MISSING else _parse_head(data, self.head_path)

    def _verified(self) -> list[LedgerEntry]:
        stored, head = self._stored(), self._head()
        if stored is not None and stored.moved_to is not None:
            raise LedgerError(f"the privacy ledger {self.path} was moved to "
                              f"{stored.moved_to}: use that one (moma-client --ledger, node "
                              f"config 'ledger')")
        if stored is not None and stored.version != LEDGER_VERSION:
            raise LedgerError(f"the privacy ledger {self.path} is version {stored.version} "
                              f"(no hash chain) but has a head file {self.head_path}")
        entries = [] if stored is None else _verify_chain(stored.items, self.path)
        self._check_head(head, stored)
        self._check_old(stored is not None)
        return entries

    def _check_head(self, head: _Head | None, stored: _Stored | None) -> None:
        items = [] if stored is None else stored.items
        if head is None:
            if items:
                raise LedgerError(f"the privacy ledger {self.path} has {len(items)} entries "
                                  f"but its head file {self.head_path} is missing")
            return
        if stored is None and head.count:
            raise LedgerError(f"the privacy ledger {self.path} is missing but its head file "
                              f"{self.head_path} records {head.count} entries: it was "
                              f"deleted (restore both from a backup)")
        if head.count > len(items):
            raise LedgerError(f"the privacy ledger {self.path} holds {len(items)} entries but "
                              f"its head file records {head.count}: entries were removed")
        last = items[head.count - 1]["hash"] if head.count else GENESIS
        if last != head.last:
            raise LedgerError(f"the privacy ledger {self.path} does not match its head file "
                              f"{self.head_path}: it was replaced or rewritten")

    def _check_old(self, have_ledger: bool) -> None:
        """Refuse what the cache folder's old ledger says is wrong with this one."""
        if self.old is None:
            return
        old = _read_ledger(self.old, "the old privacy ledger")
        if old is None:
            return
        if old.moved_to is None:
            raise LedgerError(f"an old privacy ledger {self.old} exists besides {self.path}: "
                              f"give this site its own ledger (--ledger), or move the old one "
                              f"away once its rounds are counted")
        if _same_file(Path(old.moved_to), self.path):
            if not have_ledger:
                raise LedgerError(f"the privacy ledger {self.path} is missing, but {self.old} "
                                  f"says this site's ledger was moved there: it was deleted "
                                  f"(restore it and its head file from a backup)")
        elif not have_ledger:
            raise LedgerError(f"this site's privacy ledger was moved to {old.moved_to} (says "
                              f"{self.old}), but it now uses {self.path}, which holds none: "
                              f"give --ledger {old.moved_to}")

    # -- migration ------------------------------------------------------------------------

    def _migration_pending(self) -> bool:
        stored = self._stored()
        if stored is not None:
            return stored.version == 1
        if self.old is None or not self.old.exists():
            return False
        old = _read_ledger(self.old, "the old privacy ledger")
        return old is not None and old.moved_to is None

    def _migrate(self) -> None:
        """(Under the lock.) Upgrade a version-1 ledger at ``path`` in place, or bring the
        cache folder's old ledger into ``path`` and leave a note there naming it."""
        stored, head = self._stored(), self._head()
        if stored is not None:
            if stored.version == 1 and (head is None or head == _Head(0, GENESIS)):
                entries = [_entry(item, i, self.path, chained=False)
                           for i, item in enumerate(stored.items)]
                self._store(_chained(entries), _Head(0, GENESIS))
                log.warning("privacy ledger %s upgraded to version %d (hash-chained)",
                            self.path, LEDGER_VERSION)
            return
        if self.old is None or (head is not None and head.count):
            return
        old = _read_ledger(self.old, "the old privacy ledger")
        if old is None or old.moved_to is not None:
            return
        if old.version == 1:
            entries = [_entry(item, i, self.old, chained=False)
                       for i, item in enumerate(old.items)]
        else:  # a version-2 ledger kept in the cache folder: its chain and head checked
            entries = PrivacyLedger(path=self.old)._verified()
        self._store(_chained(entries), _Head(0, GENESIS))
        _write_json(self.old, {"version": LEDGER_VERSION, "moved-to": str(self.path.absolute())})
        PrivacyLedger(path=self.old).head_path.unlink(missing_ok=True)
        log.warning("privacy ledger %s (%d entries) migrated to %s", self.old, len(entries),
                    self.path)

    # -- the budget -----------------------------------------------------------------------

    def history(self, unit: str, mechanism: str = "dp-sgd") -> list[DPStep]:
        """Every recorded stretch that spends the budget of ``unit`` under ``mechanism``,
        over all runs and rounds (for ``patch``: patient-level DP-SGD rounds too)."""
        _check_choice("unit", unit, UNITS)
        _check_choice("mechanism", mechanism, MECHANISMS)
        return [e.step for e in account(self.entries(), mechanism, unit)]

    def spent(self, unit: str, delta: float, accountant: str = "rdp",
              mechanism: str = "dp-sgd") -> float:
        """ε spent so far by ``unit`` under ``mechanism`` at ``delta``, all runs and rounds
        composed (see :meth:`history`)."""
        return epsilon(self.history(unit, mechanism), delta, accountant)

    def plan(self, eps_max: float | None, step: DPStep, unit: str, delta: float,
             accountant: str = "rdp", mechanism: str = "dp-sgd") -> BudgetCheck:
        """The ε this site would have after also training ``step``, and whether every budget
        it spends stays within ``eps_max`` (None: no cap). A preview only: to train, use
        :meth:`spend`, which checks and records in one step."""
        _check_eps_max(eps_max)
        self._check_args(step, unit, mechanism, accountant)
        return _assess(self.entries(), eps_max, step, unit, check_delta(delta), accountant,
                       mechanism)[0]

    def spend(self, run: str, round: int, step: DPStep, unit: str, delta: float,
              accountant: str = "rdp", mechanism: str = "dp-sgd",
              eps_max: float | None = None) -> LedgerEntry:
        """Check ``step`` (trained in ``round`` of ``run``) against ``eps_max`` and record it,
        as one operation under the ledger's lock: two concurrent rounds can never both pass
        a check that only one of them fits. Raises BudgetRefused (and records nothing) if a
        budget it spends would be exhausted or exceeded, LedgerError (and writes nothing) if
        the ledger cannot be trusted; returns the recorded entry."""
        _check_eps_max(eps_max)
        self._check_args(step, unit, mechanism, accountant)
        delta = check_delta(delta)
        _check_run(run)
        _check_round(round)
        with self._locked():
            self._migrate()
            entries = self._verified()
            check, eps = _assess(entries, eps_max, step, unit, delta, accountant, mechanism)
            if not check.allowed:
                raise BudgetRefused(check)
            entry = LedgerEntry(
                run=run, round=round, mechanism=mechanism,
                noise_multiplier=step.noise_multiplier, sample_rate=step.sample_rate,
                steps=step.steps, delta=delta, unit=unit, epsilon=eps, accountant=accountant,
                time=datetime.now(UTC).isoformat(timespec="seconds"))
            self._append(entries, entry)
        return entry

    def record(self, run: str, round: int, step: DPStep, unit: str, delta: float,
               accountant: str = "rdp", mechanism: str = "dp-sgd") -> LedgerEntry:
        """Append ``step`` (trained in ``round`` of ``run``) with no cap: :meth:`spend` with
        ``eps_max=None``."""
        return self.spend(run, round, step, unit, delta, accountant, mechanism)

    @staticmethod
    def _check_args(step: DPStep, unit: str, mechanism: str, accountant: str) -> None:
        if not isinstance(step, DPStep):
            raise ValueError(f"step must be a DPStep, got {type(step).__name__}")
        _check_choice("unit", unit, UNITS)
        _check_choice("mechanism", mechanism, MECHANISMS)
        check_accountant(accountant)

    # -- writing --------------------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if fcntl is None:  # pragma: no cover
            yield
            return
        with open(self.path.with_name(f".{self.path.name}.lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _append(self, entries: list[LedgerEntry], entry: LedgerEntry) -> None:
        items = self._stored().items if entries else []
        prev = items[-1]["hash"] if items else GENESIS
        self._store([*items, *_chained([entry], prev)], _Head(len(items), prev))

    def _store(self, items: list[dict[str, Any]], before: _Head) -> None:
        """Write the ledger ``items``, then its head; a ledger without a head file gets
        ``before`` first (so a crash never leaves a ledger with entries and no head)."""
        if not self.head_path.exists():
            _write_json(self.head_path, before.to_json())
        _write_json(self.path, {"version": LEDGER_VERSION, "entries": items})
        last = items[-1]["hash"] if items else GENESIS
        _write_json(self.head_path, _Head(len(items), last).to_json())


_TEXT_COLUMNS = ("run", "mechanism", "unit", "accountant")


def _eps_text(eps: float) -> str:
    return f"{eps:.3f}" if math.isfinite(eps) else "∞"


def _table(entries: list[LedgerEntry], path: Path) -> Table:
    rows = [(e.run, str(e.round), e.mechanism, e.unit, f"{e.noise_multiplier:.4g}",
             f"{e.sample_rate:.4g}", str(e.steps), f"{e.delta:.3g}", e.accountant)
            for e in entries]
    table = Table(title=f"privacy ledger {path}", title_justify="left", box=box.SIMPLE_HEAD)
    headers = ("run", "round", "mechanism", "unit", "noise\nmultiplier", "sample\nrate",
               "steps", "δ", "accountant")
    for name in headers:
        table.add_column(name, justify="left" if name in _TEXT_COLUMNS else "right")
    for row in rows:
        table.add_row(escape(row[0]), *row[1:])
    return table


def ledger_table(ledger: PrivacyLedger) -> Table:
    """The ledger's entries as a rich table (raises LedgerError if it cannot be trusted)."""
    return _table(ledger.entries(), ledger.path)


def budget_lines(entries: list[LedgerEntry]) -> list[str]:
    """The ε of every budget the entries spend, recomputed by the accountant from the recorded
    steps (never an ε stored in the ledger), one line each: at the smallest δ of the budget's
    rounds, with the accountant of its last round."""
    accounts = list(dict.fromkeys(acc for e in entries
                                  for acc in accounts_spent(e.mechanism, e.unit)))
    lines = []
    for mechanism, unit in accounts:
        past = account(entries, mechanism, unit)
        eps, _ = _account_epsilon(past, None, None, past[-1].accountant)
        smallest = min(e.delta for e in past)
        line = (f"{unit} level ({mechanism}): ε = {_eps_text(eps)} at δ = {smallest:.3g} "
                f"({past[-1].accountant}), over {len(past)} round(s)")
        if (mechanism, unit) == ("dp-sgd", "patch") and any(e.unit == "patient" for e in past):
            line += " (patient-level rounds bound each patch too)"
        others = sum(e.mechanism == mechanism and e.unit == "patch" for e in entries)
        if (mechanism, unit) == ("dp-sgd", "patient") and others:
            line += (f" of patient-level DP only; the {others} patch-level round(s) add to a "
                     f"patient's privacy loss without a bound")
        lines.append(line)
    return lines


def print_ledger(ledger: PrivacyLedger | Path, console: Console | None = None) -> int:
    """Print a site's privacy ledger (a :class:`PrivacyLedger`, or a cache folder: the ledger
    kept there) and the ε of each budget, recomputed (to stdout, or ``console``); 0, or 2 if
    it cannot be trusted (the reason goes to stderr, one line)."""
    if not isinstance(ledger, PrivacyLedger):
        ledger = PrivacyLedger(ledger)
    out = console or Console()
    try:
        entries = ledger.entries()
        lines = budget_lines(entries)
    except LedgerError as exc:
        Console(stderr=True, soft_wrap=True).print(f"[red]error:[/] {escape(str(exc))}")
        return 2
    if not entries:
        out.print("no DP training recorded at this site")
        return 0
    table = _table(entries, ledger.path)
    if console is None:  # never cut a value short: a narrow terminal may wrap lines instead
        width = Measurement.get(out, out.options.update_width(1000), table).maximum
        if width > out.width:
            out = Console(width=width)
    out.print(table)
    out.print("ε spent, recomputed from the recorded steps:")
    for line in lines:
        out.print(f"  {line}", markup=False)
    return 0
