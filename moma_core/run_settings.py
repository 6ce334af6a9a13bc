"""The method layer's parts of the run settings tree, and how a setting is declared and checked.

:class:`ObjectiveSettings` (what the sites optimise) and :class:`LocalTraining` (how a site
trains) are parts of :class:`moma_protocol.settings.RunConfig`, declared here, next to the
method configs whose defaults they take (``ObjectiveConfig``, ``TrainConfig``), so that the
standalone commands (``moma-distill``) take their options from the same fields as the
federation (:mod:`moma_core.cli.settings_flags`). A setting is a dataclass field made with
:func:`opt`: default, one line of help, allowed values or range; :func:`_typed` and
:func:`_check` type and check one value (:class:`ConfigError`, one line). No torch.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from moma_core import objective_registry
from moma_core.method_config import (
    BATCH_SIZE,
    MOMA_ATTENTIONS,
    OPTIMIZERS,
    ObjectiveConfig,
    TrainConfig,
)

AUGMENTS = ("randaugment", "flip", "none")


class ConfigError(ValueError):
    """A run setting is unknown, of the wrong type or out of range."""

    category = "config-error"


def opt(default: Any, help: str, choices: tuple | Callable[[], tuple] | None = None,
        lo: float | None = None, hi: float | None = None, lo_open: bool = False,
        hi_open: bool = False) -> Any:
    """A setting: its default, one line of help and its allowed values (a tuple, or a function
    that lists them when asked: the registered objectives). ``default`` ``MISSING``: a
    setting that must be given (a site's data path)."""
    return field(default=default, metadata={"help": help, "choices": choices, "lo": lo,
                                            "hi": hi, "lo_open": lo_open, "hi_open": hi_open})


_OBJ, _TRAIN = ObjectiveConfig, TrainConfig


@dataclass(frozen=True)
class ObjectiveSettings:
    objective: str = opt(_OBJ.kind, "moma, kd, crckd, ce (the CE-only baseline) or dp-moma "
                         "(MoMA for DP-SGD: public-key queue, per-sample attention)",
                         objective_registry.names)
    queue_size: int = opt(_OBJ.queue_size, "MoMA's key queue K (see moma_core.objectives)",
                          lo=1)
    teacher_update: str = opt(_OBJ.teacher_update, "momentum (MoMA) or frozen teacher",
                              ("momentum", "frozen"))
    attention_keys: str = opt(_OBJ.attention_keys, "keys of the queue attention "
                              "(moma-attention = reference only)", ("reference", "trained"))
    queue_keys: str = opt(_OBJ.queue_keys, "what MoMA enqueues with moma-attention = "
                          "reference: reference A_enq(raw keys) or keys (the positives' own "
                          "map; keeps the NCE term from falling to 0, though at chance: "
                          "docs/benchmarks.md); the residual attention always enqueues k",
                          ("reference", "keys"))
    kl_teacher: str = opt(_OBJ.kl_teacher, "MoMA's KL logits from the teacher before its "
                          "momentum update (reference) or after it (one teacher forward)",
                          ("before-update", "after-update"))
    key_head_init: str = opt(_OBJ.key_head_init, "MoMA's key head g_t: copy of g_s or "
                             "independent (the reference)", ("copy", "independent"))
    moma_attention: str = opt(_OBJ.moma_attention, "MoMA's batch attention: residual (q = "
                              "normalize(x + A_q(x)), A_k the momentum copy of A_q, the queue "
                              "receives k: the NCE term carries each image's teacher key) or "
                              "reference (the authors' three maps, bit for bit; its NCE term "
                              "falls to 0; docs/benchmarks.md)", MOMA_ATTENTIONS)

    def config(self) -> ObjectiveConfig:
        return ObjectiveConfig(kind=self.objective, queue_size=self.queue_size,
                               teacher_update=self.teacher_update,
                               attention_keys=self.attention_keys,
                               key_head_init=self.key_head_init,
                               queue_keys=self.queue_keys, kl_teacher=self.kl_teacher,
                               moma_attention=self.moma_attention)


@dataclass(frozen=True)
class LocalTraining:
    local_epochs: int = opt(_TRAIN.epochs, "epochs of local training per round", lo=1)
    max_steps: int = opt(0, "stop local training after this many steps (0: whole epochs)",
                         lo=0)
    batch_size: int = opt(BATCH_SIZE, "local batch size", lo=1, hi=4096)
    lr: float = opt(_TRAIN.lr, "local learning rate (round 1)", lo=0, lo_open=True, hi=10)
    lr_schedule: str = opt("cosine", "learning rate over rounds", ("cosine", "constant"))
    optimizer: str = opt(_TRAIN.optimizer, "local optimiser", OPTIMIZERS)
    augment: str = opt("randaugment", "training augmentation", AUGMENTS)


def key_of(name: str) -> str:
    """A field's run-config key: its name in kebab case."""
    return name.replace("_", "-")


def fields_by_key(*parts: type) -> dict[str, Any]:
    """Flat key → dataclass field of the settings parts ``parts``, in their order."""
    return {key_of(f.name): f for part in parts for f in fields(part)}


#: the settings a standalone command (moma-distill) can take: the method layer's parts
METHOD_FIELDS = fields_by_key(ObjectiveSettings, LocalTraining)


# -- validation ------------------------------------------------------------------------------
def lookup(known: Mapping[str, Any], key: str) -> Any:
    """The field of run-config ``key`` in ``known``; an unknown key is refused (ConfigError)
    with the closest known key."""
    if key not in known:
        close = difflib.get_close_matches(key, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown run-config key {key!r}{hint}")
    return known[key]


def checked(key: str, value: Any, f: Any, where: str = "run-config") -> Any:
    """``value`` of setting ``key`` (field ``f``) typed and checked on its own: type, allowed
    values, range (what RunConfig.from_flat does for each key before its checks across
    settings). ``where``: the settings' name in the one line of a refusal (``node-config``:
    a site's settings, :class:`client.site_config.SiteSettings`)."""
    value = _typed(key, value, f, where)
    if value is not None:  # an optional setting left unset (``int | None``)
        _check(key, value, f, where)
    return value


def kind_of(f: Any) -> tuple[str, bool]:
    """The type of setting field ``f`` as written (``int``, ``Path``, ``tuple[float, ...]``)
    and whether it may be None (``int | None``)."""
    kind = f.type if isinstance(f.type, str) else f.type.__name__
    return kind.removesuffix(" | None"), kind.endswith(" | None")


def _typed(key: str, value: Any, f: Any, where: str = "run-config") -> Any:
    kind, optional = kind_of(f)
    if optional and value is None:
        return None
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{where} {key}: expected true or false, got {value!r}")
    if kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where} {key}: expected an integer, got {value!r}")
    if kind == "float":
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where} {key}: expected a number, got {value!r}")
    if kind == "Path":
        return Path(str(value))
    if kind == "tuple[float, ...]":  # comma-separated numbers: "0.4,0.3,0.2,0.1"
        try:
            return tuple(float(p) for p in str(value).split(","))
        except ValueError:
            raise ConfigError(f"{where} {key}: expected comma-separated numbers, "
                              f"got {value!r}") from None
    if not isinstance(value, str):
        raise ConfigError(f"{where} {key}: expected text, got {value!r}")
    return value


def choices_of(f: Any) -> tuple:
    """The allowed values of setting field ``f`` (empty: any value in its range)."""
    choices = f.metadata.get("choices")
    return tuple(choices() if callable(choices) else choices or ())


def _check(key: str, value: Any, f: Any, where: str = "run-config") -> None:
    meta = f.metadata
    choices = choices_of(f)
    if choices and value not in choices:
        raise ConfigError(f"{where} {key}: {value!r} is not one of "
                          f"{', '.join(map(str, choices))}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where} {key}: {value} is not a finite number")
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None and (value < lo or (meta["lo_open"] and value == lo)):
        raise ConfigError(f"{where} {key}: {value} must be "
                          f"{'above' if meta['lo_open'] else 'at least'} {lo}")
    if hi is not None and (value > hi or (meta["hi_open"] and value == hi)):
        raise ConfigError(f"{where} {key}: {value} must be "
                          f"{'below' if meta['hi_open'] else 'at most'} {hi}")
