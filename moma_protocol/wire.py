"""What crosses the wire between coordinator and site, by record key — and nothing else.

The protocol both sides import; it belongs to neither. The run's settings are not in messages:
both sides read them once from Flower's run config (:mod:`moma_protocol.settings`).

Coordinator → site (train): ``arrays`` (global student, float tensors), ``config`` with only
what changes per round (``server-round``, ``teacher-sha256``, ``evaluate``: also score the
incoming student; under ``client-dp = site-clipping`` the round's ``clipping-norm``),
and — only when the site lacks it — ``teacher`` (the teacher's safetensors
file as raw bytes) with ``teacher-meta`` (its sidecar JSON and, when the coordinator signed it,
the signature JSON).
Coordinator → site (query ``teacher-status``, first contact only): ``config`` with
``teacher-sha256``. Coordinator → site (evaluate, after the last round): ``arrays``, ``config``.
Site → coordinator: ``arrays`` (its new student, train only; under FedBN without the
normalisation layers), ``metrics`` (aggregate losses and metrics named in
:data:`METRIC_NAMES`, ``num-examples``; the train reply adds ``teacher-cached``) and, in a
train reply asked to evaluate, ``eval-metrics`` (the incoming student on the site's validation
split); the status reply adds ``config`` with a ``site-name``.
A failing site answers with an error whose code and reason are one of :data:`ERROR_CODES`,
never the exception text. Nothing else leaves a site: no images, features, logits, queue,
memory bank, file name or path. Both sides check replies with :func:`check_site_reply` and
:func:`check_error_reply`: the site before it sends, the coordinator on receipt.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Collection, Iterator, Mapping, Set
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from moma_core import objective_registry
from moma_protocol.settings import TRANSFER_DTYPES  # noqa: F401 (documented here)

if TYPE_CHECKING:  # the protocol itself needs no torch: a status query stays light
    import torch
    from torch import nn

ARRAYS = "arrays"
#: The one Array in ``arrays``: the student's tensors as one safetensors file (1-D uint8),
#: see :func:`encode_state`.
STUDENT_FILE = "student.safetensors"
CONFIG = "config"
METRICS = "metrics"
TEACHER = "teacher"
TEACHER_META = "teacher-meta"
TEACHER_FILE = "teacher.safetensors"
TEACHER_SHA = "teacher-sha256"
#: Key in ``teacher-meta``: the coordinator's signature (JSON) over the teacher's hash + sidecar.
TEACHER_SIGNATURE = "signature"
EVAL_METRICS = "eval-metrics"
EVALUATE_FLAG = "evaluate"
SERVER_ROUND = "server-round"
#: client-dp = site-clipping: the L2 norm the site clips its update to this round
CLIPPING_NORM = "clipping-norm"
TEACHER_CACHED = "teacher-cached"
TEACHER_STATUS = "query.teacher_status"
TRAIN = "train"
EVALUATE = "evaluate"
NUM_EXAMPLES = "num-examples"
HAS_TEACHER = "has-teacher"
SITE_NAME = "site-name"
SITE_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

# -- error replies ---------------------------------------------------------------------------
# Codes from 100 on: Flower's own error codes (node unavailable, app crashed, …) are below 100.
ERROR_CODES: dict[str, int] = {
    "data-error": 101,         # the site's images or labels cannot be read
    "missing-teacher": 102,    # the site's cache lacks the teacher the coordinator named
    "teacher-rejected": 103,   # a teacher failed its hash or signature check, or is unreadable
    "config-error": 104,       # the run or node config does not fit this site
    "training-diverged": 105,  # the loss became NaN or infinite
    "out-of-memory": 106,
    "internal-error": 107,     # anything else, and a reply the site refused to send
    "privacy-refused": 108,    # the site's privacy policy refuses the run's settings
    "privacy-budget": 109,     # training would take the site past its privacy budget
    "class-mismatch": 110,     # the site's classes are not the run's (both lists in its log)
}
UNKNOWN_ERROR = "unknown-error"  # what the coordinator records for an error outside the list


def category_reply(msg: Message, category: str) -> Message:
    """An error reply to ``msg`` carrying only ``category`` and its code."""
    if category not in ERROR_CODES:
        category = "internal-error"
    return Message(Error(code=ERROR_CODES[category], reason=category), reply_to=msg)


def check_error_reply(msg: Message) -> list[str]:
    """Problems of an error reply: its reason must be exactly a category, with that code."""
    if not msg.has_error():
        return ["not an error reply"]
    reason, code = msg.error.reason, msg.error.code
    if reason not in ERROR_CODES:
        return ["error reason is not an allowed category"]
    if code != ERROR_CODES[reason]:
        return ["error code does not match its category"]
    return []


def error_reason(msg: Message) -> str:
    """What the coordinator records for an error reply: its category, else ``unknown-error``."""
    return UNKNOWN_ERROR if check_error_reply(msg) else str(msg.error.reason)


# -- normal replies --------------------------------------------------------------------------
#: the site's cumulative ε (its privacy ledger, all runs) after a DP-SGD round
DP_EPSILON = "dp-epsilon"
#: seconds the site spent scoring the incoming global student before it trained
EVAL_TIME = "eval-time-s"


class NameSet(Set):
    """A set of allowed names computed when read: the train metrics follow the objectives
    registered at that moment (:mod:`moma_core.objective_registry`)."""

    def __init__(self, names: Callable[[], frozenset[str]]) -> None:
        self._names = names

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._names()))

    def __len__(self) -> int:
        return len(self._names())

    def __repr__(self) -> str:
        return f"NameSet({sorted(self._names())})"

    @classmethod
    def _from_iterable(cls, it: object) -> frozenset:  # set operations give plain sets
        return frozenset(it)  # type: ignore[arg-type]


#: train metrics of every objective: the loss, steps, times, ε and flags
GENERIC_TRAIN_METRICS = frozenset({"train-loss", "train-steps", "train-time-s", EVAL_TIME,
                                   TEACHER_CACHED, NUM_EXAMPLES, DP_EPSILON})
#: what a train reply may carry: the generic ones and ``train-<term>`` for the loss terms of
#: every registered objective
TRAIN_METRICS = NameSet(lambda: GENERIC_TRAIN_METRICS | objective_registry.train_metric_names())
EVALUATE_METRICS = frozenset({"loss", "accuracy", "macro-f1", "kappa", NUM_EXAMPLES})
STATUS_METRICS = frozenset({HAS_TEACHER})
METRIC_NAMES: Set[str] = NameSet(
    lambda: frozenset(TRAIN_METRICS) | EVALUATE_METRICS | STATUS_METRICS)
MAX_METRIC_VALUES = 64

# per message type: (records allowed, records required, metric names allowed, metrics required)
REPLIES: dict[str, tuple[frozenset[str], frozenset[str], Set[str], frozenset[str]]] = {
    TRAIN: (frozenset({ARRAYS, METRICS, EVAL_METRICS}), frozenset({ARRAYS, METRICS}),
            TRAIN_METRICS, frozenset({NUM_EXAMPLES})),
    EVALUATE: (frozenset({METRICS}), frozenset({METRICS}), EVALUATE_METRICS,
               frozenset({NUM_EXAMPLES})),
    TEACHER_STATUS: (frozenset({METRICS, CONFIG}), frozenset({METRICS}), STATUS_METRICS,
                     frozenset({HAS_TEACHER})),
}
_ANY_REPLY = (frozenset({ARRAYS, METRICS, EVAL_METRICS, CONFIG}), frozenset(), METRIC_NAMES,
              frozenset())
_KINDS = {ARRAYS: ArrayRecord, METRICS: MetricRecord, EVAL_METRICS: MetricRecord,
          CONFIG: ConfigRecord}


def valid_site_name(name: object) -> bool:
    """Whether ``name`` may travel as a site name (a short identifier: no path, no spaces)."""
    return isinstance(name, str) and SITE_NAME_PATTERN.match(name) is not None


def check_site_reply(content: RecordDict, message_type: str | None = None,
                     expected_arrays: Collection[str] | None = None) -> list[str]:
    """Problems of a site's reply (empty: it may cross the wire); fixed texts, no reply values.

    ``message_type`` narrows the records and metric names to those of that reply;
    ``expected_arrays``: the names of the model state sent to the site (arrays must be among
    them).
    """
    if message_type is not None and message_type not in REPLIES:
        return ["reply to an unknown message type"]
    allowed, required, names, needed = REPLIES[message_type] if message_type else _ANY_REPLY
    problems: list[str] = []

    def add(problem: str) -> None:
        if problem not in problems:
            problems.append(problem)

    keys = set(content.keys())
    if keys - allowed:
        add("unknown record key")
    if required - keys:
        add("missing record")
    for key in keys & allowed:
        if not isinstance(content[key], _KINDS[key]):
            add("record of the wrong kind")
    for problem in _check_metrics(content.get(METRICS), names, needed):
        add(problem)
    for problem in _check_metrics(content.get(EVAL_METRICS), EVALUATE_METRICS,
                                  frozenset({NUM_EXAMPLES})):
        add(problem)
    for problem in _check_config(content.get(CONFIG)):
        add(problem)
    for problem in _check_arrays(content.get(ARRAYS), expected_arrays):
        add(problem)
    return problems


def _check_metrics(rec: object, names: Set[str], needed: frozenset[str]) -> list[str]:
    if not isinstance(rec, MetricRecord):
        return []
    problems, count = [], 0
    if needed - set(rec.keys()):
        problems.append("missing required metric")
    for name, value in rec.items():
        if name not in names:
            problems.append("metric name outside the allow-list")
        if isinstance(value, int | float) and not isinstance(value, bool):
            count += 1
        else:
            problems.append("non-scalar metric value")
            count += len(value) if isinstance(value, list) else 1
    if count > MAX_METRIC_VALUES:
        problems.append("too many metric values")
    return problems


def _check_config(rec: object) -> list[str]:
    if not isinstance(rec, ConfigRecord):
        return []
    problems = []
    if set(rec.keys()) - {SITE_NAME}:
        problems.append("config value outside the allow-list")
    if SITE_NAME in rec and not valid_site_name(rec[SITE_NAME]):
        problems.append("site name is not a short identifier")
    return problems


def _check_arrays(rec: object, expected: Collection[str] | None) -> list[str]:
    if not isinstance(rec, ArrayRecord):
        return []
    try:
        header = state_header(state_blob(rec))
    except ValueError as exc:
        return [str(exc)]
    problems = []
    if expected is not None and set(header) - set(expected):
        problems.append("array name outside the model state")
    if any(dtype not in _FLOAT_DTYPES for dtype, _ in header.values()):
        problems.append("array that is not a floating-point tensor")
    return problems


# -- tensors and files -----------------------------------------------------------------------
def local_keys(fedbn: bool, student: nn.Module) -> set[str]:
    """State keys a site keeps and never sends: FedBN's normalisation layers, else none.

    The one definition both sides use: the site to leave them out of its reply, the
    coordinator to accept updates without them.
    """
    from moma_core.models import norm_state_keys

    return norm_state_keys(student) if fedbn else set()


def wire_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of a student that travel: floating point only (BN counters stay home)."""
    return {k: v.detach().cpu() for k, v in state.items() if v.is_floating_point()}


#: ``transfer-dtype``: how student tensors travel. float16 halves the bytes both ways: the
#: global student goes down rounded to float16, a site's update goes up as its float16 *change*
#: from the student it received (small values keep their relative precision), and the
#: coordinator adds it to its own float32 copy — aggregation stays in float32 and the rounding
#: of one round never accumulates. A tensor float16 cannot hold (a value beyond ±65504) travels
#: as float32, and a float32 array in an update is a full value, not a change.
_FP16_MAX = 65504.0


def _fits_half(t: torch.Tensor) -> bool:
    return bool(t.numel() == 0 or t.detach().abs().max() <= _FP16_MAX)


def pack_global(state: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    """The global student as it goes down (``transfer-dtype``)."""
    if dtype == "float32":
        return state
    return {k: v.half() if v.is_floating_point() and _fits_half(v) else v
            for k, v in state.items()}


def unpack_global(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The received global student in float32 (what the site trains from)."""
    return {k: v.float() if v.dtype == _torch().float16 else v for k, v in state.items()}


def pack_update(new: dict[str, torch.Tensor], start: dict[str, torch.Tensor], dtype: str
                ) -> dict[str, torch.Tensor]:
    """A site's new student as it goes up: itself (float32), or its float16 change from
    ``start`` (the float32 view of the student it received)."""
    if dtype == "float32":
        return new
    out = {}
    for k, v in new.items():
        delta = v - start[k] if k in start and start[k].shape == v.shape else None
        out[k] = delta.half() if delta is not None and _fits_half(delta) else v.float()
    return out


def unpack_update(update: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]
                  ) -> dict[str, torch.Tensor]:
    """A site's student in float32: float16 arrays are changes from ``reference`` (the
    coordinator's float32 global student); others are full values. An array that has no
    counterpart of its shape is returned as it came, for the update check to reject."""
    half = _torch().float16
    out = {}
    for k, v in update.items():
        ref = reference.get(k)
        if v.dtype == half and ref is not None and ref.shape == v.shape:
            out[k] = ref.float() + v.float()
        else:
            out[k] = v.float() if v.dtype == half else v
    return out


def _torch():
    import torch

    return torch


# -- the student on the wire ----------------------------------------------------------------
# Flower moves every Array of a message as its own request (and stores it in the SuperLink's
# database): a student of 75 tensors was 75 round trips each way per site and round. The
# student therefore travels as one safetensors file in one Array; its tensor names, dtypes and
# shapes are read from the file's header (no pickle, nothing executed) and checked like any
# other reply content.
_FLOAT_DTYPES = frozenset({"F16", "F32", "F64", "BF16"})
_MAX_HEADER = 16 << 20


def encode_blob(state: Mapping[str, torch.Tensor]) -> bytes:
    """The tensors as one safetensors file, their order kept."""
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous().clone() for k, v in state.items()},
                metadata={"order": json.dumps(list(state))})


def blob_record(blob: bytes) -> ArrayRecord:
    """``arrays`` for a message, from a student file."""
    return ArrayRecord({STUDENT_FILE: Array(bytes_to_array(blob))})


def encode_state(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """``arrays`` for a message: the tensors as one safetensors file, their order kept."""
    return blob_record(encode_blob(state))


def state_blob(rec: ArrayRecord) -> bytes:
    """The safetensors file an ``arrays`` record carries, or ValueError."""
    if list(rec.keys()) != [STUDENT_FILE]:
        raise ValueError("arrays other than the student file")
    try:
        return array_to_bytes(rec[STUDENT_FILE].numpy())
    except (ValueError, TypeError) as exc:
        raise ValueError("student file is not a 1-D uint8 array") from exc


def state_header(blob: bytes) -> dict[str, tuple[str, list[int]]]:
    """Tensor name → (safetensors dtype, shape) from a student file's header, in the order the
    file records, or ValueError. Reads only the header; the data is not touched."""
    if len(blob) < 8:
        raise ValueError("student file is not a safetensors file")
    n = int.from_bytes(blob[:8], "little")
    if n > min(len(blob) - 8, _MAX_HEADER):
        raise ValueError("student file is not a safetensors file")
    try:
        header = json.loads(blob[8:8 + n])
        meta = header.pop("__metadata__", None) or {}
        order = json.loads(meta["order"]) if "order" in meta else list(header)
        out = {}
        for name in order:
            entry = header[name]
            shape = [int(d) for d in entry["shape"]]
            out[str(name)] = (str(entry["dtype"]), shape)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError("student file is not a safetensors file") from exc
    if set(out) != set(header):
        raise ValueError("student file is not a safetensors file")
    return out


def decode_state(blob: bytes) -> dict[str, torch.Tensor]:
    """The tensors of a student file (in their recorded order), or ValueError."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    order = list(state_header(blob))
    try:
        tensors = load(blob)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise ValueError("student file is not a safetensors file") from exc
    return {k: tensors[k] for k in order}


def bytes_to_array(data: bytes) -> np.ndarray:
    """Raw file bytes as a uint8 array (so a file travels inside an ArrayRecord, chunked)."""
    return np.frombuffer(data, dtype=np.uint8).copy()


def array_to_bytes(array: np.ndarray) -> bytes:
    if array.dtype != np.uint8 or array.ndim != 1:
        raise ValueError("a file on the wire is a 1-D uint8 array")
    return array.tobytes()
