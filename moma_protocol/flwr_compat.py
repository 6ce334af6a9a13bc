"""Flower's internal names as the protocol uses them, and the way every side reaches them.

MoMA-FL is pinned to the Flower minor version it is tested with (:data:`FLWR_TESTED`, the same
range as pyproject's ``flwr`` requirement). Where Flower 1.42 has no public API for what the
project needs, the product reaches Flower's internals through one compat module per side and
nowhere else (``tests/test_layout.py`` enforces it):

- this module: what both ends of the protocol use (SecAgg+'s record keys and stages, the
  clipping arithmetic of Flower's DP, the swap of SecAgg+'s mask generator);
- :mod:`server.flwr_compat`: the coordinator's (SecAgg+ workflow, simulation engine, Control
  API client, DP noise, what the aggregator reads of Flower's strategies);
- :mod:`client.flwr_compat`: the site's (the ClientApp runner, SecAgg+'s legacy fit result);
- :mod:`deploy.flwr_compat`: the launchers' (the SuperLink process and its state database).

Each internal name is an :class:`Internal` entry (where it lives, why the project needs it,
what public API would replace it, and the parameters and attributes the project relies on).
Names are resolved when they are imported from a compat module (``from server.flwr_compat
import X`` inside a function stays as lazy as the import it replaced, and sees what is in
Flower's module at that moment); :func:`problems` checks every entry against the installed
Flower, which ``tests/test_flwr_compat.py`` does for each compat module, so an upgrade fails
there, by name, rather than deep in a federation.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import version
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for readers and type checkers; at run time the names resolve lazily
    from flwr.common.secure_aggregation.secaggplus_constants import (  # noqa: F401
        RECORD_KEY_CONFIGS,
        Key,
        Stage,
    )
    from flwr.supercore.differential_privacy import (  # noqa: F401
        compute_clip_model_update,
        get_norm,
    )

#: the Flower versions this project is tested with: pyproject's ``flwr`` requirement
FLWR_TESTED = (">=1.42", "<1.43")
FLWR_MINOR = (1, 42)


@dataclass(frozen=True)
class Internal:
    """One internal Flower name the project uses."""

    module: str  # Flower's module that defines it
    attr: str | None  # the name in that module; None: the module itself
    why: str  # what the project needs it for
    public: str  # the public API that would replace it (or why there is none)
    params: tuple[str, ...] = ()  # parameters the project passes (callables, classes)
    attrs: tuple[str, ...] = ()  # attributes the project reads or replaces

    def resolve(self) -> Any:
        """The object, looked up now (a module attribute replaced since is seen)."""
        module = importlib.import_module(self.module)
        return module if self.attr is None else getattr(module, self.attr)

    @property
    def where(self) -> str:
        return self.module if self.attr is None else f"{self.module}.{self.attr}"


def problems(internals: Mapping[str, Internal]) -> list[str]:
    """What of ``internals`` the installed Flower no longer has (empty when all is there):
    a module or name that is gone, a parameter or an attribute the project relies on."""
    out = []
    for name, entry in internals.items():
        try:
            obj = entry.resolve()
        except ImportError as exc:
            out.append(f"{name}: module {entry.module} cannot be imported ({exc})")
            continue
        except AttributeError:
            out.append(f"{name}: {entry.where} is gone")
            continue
        if entry.params:
            try:
                target = obj.__init__ if inspect.isclass(obj) else obj
                have = set(inspect.signature(target).parameters)
            except (TypeError, ValueError):
                have = set()
            missing = [p for p in entry.params if p not in have]
            if missing:
                out.append(f"{name}: {entry.where} lacks the parameters {missing}")
        missing = [a for a in entry.attrs if not _has(obj, a)]
        if missing:
            out.append(f"{name}: {entry.where} lacks the attributes {missing}")
    return out


def _has(obj: Any, attr: str) -> bool:
    """Whether ``obj`` defines ``attr`` (without running a property: TaskIdentity's raise
    while unset), counting a dataclass's fields, a class's annotated attributes and a
    protobuf message's fields."""
    try:
        inspect.getattr_static(obj, attr)
        return True
    except AttributeError:
        pass
    fields = getattr(obj, "__dataclass_fields__", None) or {}
    descriptor = getattr(obj, "DESCRIPTOR", None)
    if descriptor is not None and attr in getattr(descriptor, "fields_by_name", {}):
        return True
    return attr in fields or (inspect.isclass(obj) and any(
        attr in getattr(c, "__annotations__", {}) for c in obj.__mro__))


def version_problem() -> str | None:
    """Why the installed Flower is not the tested minor version, or None."""
    installed = version("flwr")
    if tuple(int(x) for x in installed.split(".")[:2]) != FLWR_MINOR:
        return (f"flwr {installed} is installed; MoMA-FL is tested with flwr"
                f"{','.join(FLWR_TESTED)}")
    return None


def lazy_names(internals: Mapping[str, Internal], module: str) -> Callable[[str], Any]:
    """A module ``__getattr__`` that resolves ``internals`` when they are imported."""

    def __getattr__(name: str) -> Any:
        entry = internals.get(name)
        if entry is None:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        return entry.resolve()

    return __getattr__


_SECAGG_CONSTANTS = "flwr.common.secure_aggregation.secaggplus_constants"
_DP = "flwr.supercore.differential_privacy"

#: the protocol's internal names, shared by both sides' compat modules
SHARED: dict[str, Internal] = {
    "Key": Internal(
        _SECAGG_CONSTANTS, "Key",
        why="the config keys of SecAgg+'s stage messages, which both ends check "
            "(moma_protocol.secagg, server.secagg, client.secagg_site)",
        public="none: flwr.client.mod.secaggplus_mod and flwr.server.workflow."
               "SecAggPlusWorkflow are public, the messages they exchange are not",
        attrs=("ACTIVE_NODE_ID_LIST", "CIPHERTEXT_LIST", "CLIPPING_RANGE", "DEAD_NODE_ID_LIST",
               "DESTINATION_LIST", "MASKED_PARAMETERS", "MAX_WEIGHT", "NODE_ID_LIST",
               "PUBLIC_KEY_1", "PUBLIC_KEY_2", "SAMPLE_NUMBER", "SHARE_LIST", "SHARE_NUMBER",
               "STAGE", "THRESHOLD")),
    "Stage": Internal(
        _SECAGG_CONSTANTS, "Stage",
        why="the names of SecAgg+'s four stages (which stage a message is)",
        public="none (see Key)",
        attrs=("SETUP", "SHARE_KEYS", "COLLECT_MASKED_VECTORS", "UNMASK")),
    "RECORD_KEY_CONFIGS": Internal(
        _SECAGG_CONSTANTS, "RECORD_KEY_CONFIGS",
        why="the config record that marks a train message as a SecAgg+ stage",
        public="none (see Key)"),
    "compute_clip_model_update": Internal(
        _DP, "compute_clip_model_update",
        why="client-level DP: a site clips its update exactly as Flower's fixedclipping_mod "
            "does (moma_protocol.clipping)",
        public="flwr.client.mod.fixedclipping_mod clips a legacy fit result inside a mod, not "
               "a state dict; no public function",
        params=("param1", "param2", "clipping_norm")),
    "get_norm": Internal(
        _DP, "get_norm",
        why="client-level DP: the coordinator measures an update's L2 norm as Flower does",
        public="none", params=("input_arrays",)),
}

#: Flower's modules whose SecAgg+ mask generator is replaced, the site's and the coordinator's
MASK_MODULES = ("flwr.client.mod.secure_aggregation.secaggplus_mod",
                "flwr.server.workflow.secure_aggregation.secaggplus_workflow")

#: the mask generator itself, in each module that calls it
MASK_GENERATORS: dict[str, Internal] = {
    f"pseudo_rand_gen ({module.rsplit('.', 1)[1]})": Internal(
        module, "pseudo_rand_gen",
        why="replaced by moma_protocol.secagg.secure_mask_generator: Flower's folds a 32-byte "
            "key into a 32-bit Mersenne Twister seed, which a coordinator could search",
        public="none: SecAggPlusWorkflow and secaggplus_mod take no mask generator",
        params=("seed", "num_range", "dimensions_list"))
    for module in MASK_MODULES}

INTERNALS: dict[str, Internal] = {**SHARED, **MASK_GENERATORS}


def install_mask_generator(generator: Callable[..., Any]) -> None:
    """Put ``generator`` in place of ``pseudo_rand_gen`` in Flower's SecAgg+ modules
    (idempotent; both ends call it, see :data:`MASK_GENERATORS`).

    The modules are taken from ``importlib`` (``flwr.client.mod.secure_aggregation``
    re-exports a function named like its module, which ``import … as`` would return)."""
    for name in MASK_MODULES:
        module = importlib.import_module(name)
        if not hasattr(module, "pseudo_rand_gen"):
            raise RuntimeError(f"{name} has no pseudo_rand_gen: Flower's SecAgg+ changed")
        module.pseudo_rand_gen = generator


__getattr__ = lazy_names(SHARED, __name__)
