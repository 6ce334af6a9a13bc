"""The registry of training objectives: each objective is one module of
:mod:`moma_core.objectives` whose class is decorated with :func:`register` and declares what it
needs and what it reports.

Every registered class declares, in its own class body, the attributes of
:data:`DECLARED` (:class:`Declaration`): its ``name`` (the run config's ``objective``), its
``order`` in listings, whether it ``needs_teacher``, ``needs_index`` (each sample's position in
the training set: :func:`moma_core.objectives.training_set`; an instance may decide from its
config), ``same_task_only`` (the teacher must share the student's classes),
``dp_compatible`` (its loss is a mean of per-sample terms: DP-SGD can run it),
``needs_public_keys`` (the frozen teacher's keys of non-private images), ``loss_terms`` (the
names of the terms its ``loss`` reports: the sites send them as ``train-<term>``) and
``report_terms`` (terms the run report shows as extra columns). It builds itself from an
:class:`~moma_core.method_config.ObjectiveConfig` with ``from_config``.

This module imports no torch: the settings and the protocol (a ClientApp process that only
forwards to its worker) read the declarations of the built-in objectives from the modules'
source (literal class attributes), and import a module only when its class is asked for
(:func:`get`). An objective registered at run time (a test's, a plug-in's) is known once its
module has run :func:`register`.
"""

from __future__ import annotations

import ast
import difflib
import functools
import importlib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

#: the package whose modules are the built-in objectives
PACKAGE = "moma_core.objectives"
_PACKAGE_DIR = Path(__file__).resolve().parent / "objectives"


@dataclass(frozen=True)
class Declaration:
    """What an objective class declares about itself (see the module docstring)."""

    name: str
    order: int
    needs_teacher: bool
    needs_index: bool
    same_task_only: bool
    dp_compatible: bool
    needs_public_keys: bool
    loss_terms: tuple[str, ...]
    report_terms: tuple[str, ...]

    def metric_names(self) -> frozenset[str]:
        """The train metrics a site sends for this objective's terms."""
        return frozenset(f"train-{t}" for t in self.loss_terms)


#: the class attributes every registered objective declares in its own body
DECLARED = tuple(f.name for f in fields(Declaration))
_TYPES = {"name": str, "order": int, "needs_teacher": bool, "needs_index": bool,
          "same_task_only": bool, "dp_compatible": bool, "needs_public_keys": bool,
          "loss_terms": tuple, "report_terms": tuple}

_classes: dict[str, type] = {}  # name -> registered class


class RegistryError(ValueError):
    """An objective class that cannot be registered, or a name that is not registered."""


def _declaration(values: dict[str, Any], where: str) -> Declaration:
    missing = [k for k in DECLARED if k not in values]
    if missing:
        raise RegistryError(f"{where} does not declare {', '.join(missing)} in its class body")
    for key, kind in _TYPES.items():
        value = values[key]
        if kind is int and isinstance(value, bool) or not isinstance(value, kind):
            raise RegistryError(f"{where}: {key} must be a {kind.__name__}, got {value!r}")
        if kind is tuple and not all(isinstance(t, str) and t for t in value):
            raise RegistryError(f"{where}: {key} must be a tuple of names, got {value!r}")
    if not values["name"] or values["name"] != values["name"].strip():
        raise RegistryError(f"{where}: name must be a non-empty word, got {values['name']!r}")
    unknown = set(values["report_terms"]) - set(values["loss_terms"])
    if unknown:
        raise RegistryError(f"{where}: report_terms {sorted(unknown)} are not loss_terms")
    return Declaration(**{k: values[k] for k in DECLARED})


def declaration_of(cls: type) -> Declaration:
    """The declaration of an objective class (its own class body's attributes)."""
    return _declaration({k: cls.__dict__[k] for k in DECLARED if k in cls.__dict__},
                        f"objective class {cls.__module__}.{cls.__qualname__}")


@functools.cache
def _builtin() -> dict[str, tuple[Declaration, str]]:
    """name -> (declaration, module) of every built-in objective, read from the source of
    :mod:`moma_core.objectives` without importing it (no torch)."""
    out: dict[str, tuple[Declaration, str]] = {}
    for path in sorted(_PACKAGE_DIR.glob("*.py")):
        module = f"{PACKAGE}.{path.stem}"
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.ClassDef) and any(_is_register(d) for d in node.decorator_list):
                values = {}
                for item in node.body:
                    if isinstance(item, ast.Assign) and len(item.targets) == 1 and \
                            isinstance(item.targets[0], ast.Name) and \
                            item.targets[0].id in DECLARED:
                        values[item.targets[0].id] = ast.literal_eval(item.value)
                    elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name) \
                            and item.target.id in DECLARED and item.value is not None:
                        values[item.target.id] = ast.literal_eval(item.value)
                decl = _declaration(values, f"objective class {module}.{node.name}")
                if decl.name in out:
                    raise RegistryError(f"objective {decl.name!r} is declared twice "
                                        f"({out[decl.name][1]} and {module})")
                out[decl.name] = (decl, module)
    return out


def _is_register(node: ast.expr) -> bool:
    return (isinstance(node, ast.Name) and node.id == "register") or \
        (isinstance(node, ast.Attribute) and node.attr == "register")


def register(cls: type) -> type:
    """Class decorator: add an objective class to the registry under its declared ``name``.

    Refuses (:class:`RegistryError`) a class that does not declare every attribute of
    :data:`DECLARED` in its own body, a name already taken by another class, and a built-in
    module whose class differs from what its source declares. Registering the same class again
    (its module re-imported) replaces it.
    """
    decl = declaration_of(cls)
    builtin = _builtin().get(decl.name)
    taken = _classes.get(decl.name)
    same = taken is not None and (taken.__module__, taken.__qualname__) == \
        (cls.__module__, cls.__qualname__)
    if taken is not None and not same:
        raise RegistryError(f"objective {decl.name!r} is already registered by "
                            f"{taken.__module__}.{taken.__qualname__}")
    if builtin is not None:
        if cls.__module__ != builtin[1]:
            raise RegistryError(f"objective {decl.name!r} is already the built-in objective of "
                                f"{builtin[1]}")
        if builtin[0] != decl:
            raise RegistryError(f"objective {decl.name!r}: the class declares {decl}, its "
                                f"source was read as {builtin[0]}")
    _classes[decl.name] = cls
    _changed()
    return cls


def unregister(name: str) -> None:
    """Remove an objective registered at run time (a test's); built-in ones stay."""
    if name in _builtin():
        raise RegistryError(f"objective {name!r} is built in: it cannot be unregistered")
    _classes.pop(name, None)
    _changed()


def _changed() -> None:
    declarations.cache_clear()
    train_metric_names.cache_clear()


@functools.cache
def declarations() -> dict[str, Declaration]:
    """Every objective's declaration by name, in listing order (``order``, then name)."""
    out = {name: decl for name, (decl, _) in _builtin().items()}
    for name, cls in _classes.items():
        out[name] = declaration_of(cls)
    return dict(sorted(out.items(), key=lambda kv: (kv[1].order, kv[0])))


def declaration(name: str) -> Declaration:
    """The declaration of objective ``name``; :class:`RegistryError` (with the closest
    registered names) when there is none."""
    decls = declarations()
    if name not in decls:
        raise RegistryError(unknown_message(name))
    return decls[name]


def unknown_message(name: object) -> str:
    """"unknown objective …; did you mean …? choose one of …"."""
    known = tuple(declarations())
    close = difflib.get_close_matches(str(name), known, n=2)
    hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
    return f"unknown objective {name!r}{hint} (registered: {', '.join(known)})"


def get(name: str) -> type:
    """The class of objective ``name`` (a built-in module is imported on first use)."""
    declaration(name)
    if name not in _classes:
        importlib.import_module(_builtin()[name][1])
        if name not in _classes:
            raise RegistryError(f"{_builtin()[name][1]} did not register objective {name!r}")
    return _classes[name]


def names() -> tuple[str, ...]:
    """Every registered objective, in listing order."""
    return tuple(declarations())


def dp_names() -> tuple[str, ...]:
    """The objectives DP-SGD can run (``dp_compatible``: a loss of per-sample terms)."""
    return tuple(n for n, d in declarations().items() if d.dp_compatible)


def needs_teacher(name: str) -> bool:
    """Whether objective ``name`` needs the teacher (unknown names: RegistryError)."""
    return declaration(name).needs_teacher


@functools.cache
def train_metric_names() -> frozenset[str]:
    """``train-<term>`` for every loss term of every registered objective."""
    return frozenset().union(*(d.metric_names() for d in declarations().values()))
