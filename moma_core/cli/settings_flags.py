"""Command-line options generated from the run settings tree (:mod:`moma_protocol.settings`;
its method-layer parts: :mod:`moma_core.run_settings`), and the one parser of
``--run-config 'key=value key2="text"'``.

A command declares which run settings it takes (:class:`SettingsParser`): some of them get a
flag of their own, generated from the setting's field (``--kebab-key``, its type, its allowed
values, its help and the tree's default, shown in ``--help``); all of them can be given with
``--run-config``. A flag given explicitly wins over ``--run-config``; both win over the tree's
defaults. Each value is typed and checked by the tree (:func:`moma_core.run_settings.checked`),
so a wrong value is refused with the tree's one line, whichever way it was given; checks across
settings stay :class:`~moma_protocol.settings.RunConfig`'s. The settings a parser knows are
given to it (``known``: key → field): the whole tree for the federation's commands, the method
layer's parts (:data:`moma_core.run_settings.METHOD_FIELDS`) for moma-distill, a site's settings
(``where="node-config"``: :class:`client.site_config.SiteSettings`) for moma-client.
"""

from __future__ import annotations

import argparse
import shlex
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import MISSING
from pathlib import Path
from typing import Any

from moma_core.run_settings import ConfigError, checked, choices_of, kind_of, lookup

#: the namespace attribute holding the run settings a command was given (flag or --run-config)
GIVEN = "run_settings"


def parse_run_config(text: str, known: Mapping[str, Any], command: str = "this command",
                     accepted: Iterable[str] | None = None,
                     owned: Iterable[str] = ()) -> dict[str, Any]:
    """``--run-config 'key=value key2="text"'`` as a mapping of typed, checked values.

    Refused with one line (:class:`ConfigError`): an item that is not ``key=value`` in TOML,
    a key not in ``known`` (with the closest known one), a key in ``owned`` (the command sets it
    itself, from one of its own options), a key the command does not take (not in
    ``accepted``), a value of the wrong type or out of range.
    """
    raw: dict[str, Any] = {}
    for item in shlex.split(text or "", posix=False):
        try:
            raw.update(tomllib.loads(item))
        except tomllib.TOMLDecodeError:
            raise ConfigError(f"--run-config item {item!r}: write key=value, text in double "
                              "quotes") from None
    owned = set(owned)
    accepted = None if accepted is None else set(accepted)
    values = {}
    for key, value in raw.items():
        f = lookup(known, key)  # unknown: named, with the closest key
        if key in owned:
            raise ConfigError(f"--run-config {key}: set by {command} itself (use its option)")
        if accepted is not None and key not in accepted:
            raise ConfigError(f"--run-config {key}: not a setting {command} uses")
        values[key] = checked(key, value, f)
    return values


def default_text(value: Any) -> str:
    """A setting's default as ``--help`` shows it (TOML spelling; empty: nothing shown)."""
    if value is False or value == "" or value is None or value is MISSING:
        return ""
    if value is True:
        return "true"
    return str(value)


def _dest(option: str) -> str:
    return option.lstrip("-").replace("-", "_")


class SettingsParser(argparse.ArgumentParser):
    """An argument parser whose run-setting flags and ``--run-config`` become one set of values.

    :meth:`add_settings` adds generated flags, :meth:`add_run_config` the ``--run-config``
    option. After parsing, every accepted setting is an attribute of the namespace (its flag's
    ``dest``, else the key in snake case): the flag's value if given, else ``--run-config``'s,
    else the tree's default (``fill_defaults``) or None (the tree's default applies later);
    ``namespace.run_settings`` holds the settings given either way, by key.
    """

    def __init__(self, *args: Any, known: Mapping[str, Any], fill_defaults: bool = False,
                 where: str = "run-config", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.known = dict(known)
        self.fill_defaults = fill_defaults
        self.where = where  # the settings' name in a refusal (run-config, node-config)
        self.setting_dests: dict[str, str] = {}  # key -> namespace attribute
        self.accepted: tuple[str, ...] = ()
        self.owned: tuple[str, ...] = ()
        self.only: dict[str, tuple] = {}

    def add_settings(self, keys: Iterable[str], group: Any = None,
                     names: Mapping[str, str] | None = None,
                     choices: Mapping[str, tuple] | None = None,
                     helps: Mapping[str, str] | None = None,
                     defaults: Mapping[str, Any] | None = None) -> None:
        """A flag for each setting in ``keys``: ``--key`` (``names``: another flag name kept
        from before, e.g. ``--rounds`` for num-rounds), the field's type and allowed values
        (``choices``: fewer, for a command that cannot run them all), its help (``helps``:
        another text) and the tree's default in ``--help``. Booleans get ``--key/--no-key``.
        ``defaults``: the flag's own default instead of the tree's (shown, and checked as a
        given value; None: the flag has none, the command resolves it, e.g. from a kit)."""
        names, choices, helps = names or {}, choices or {}, helps or {}
        defaults = defaults or {}
        target = group if group is not None else self
        for key in keys:
            f = lookup(self.known, key)
            option = names.get(key, f"--{key}")
            dest = _dest(option)
            text = (helps.get(key) or f.metadata["help"]).replace("%", "%%")
            default = defaults.get(key)
            shown = default_text(defaults[key] if key in defaults else f.default)
            if shown:
                text += f" (default: {shown})"
            kind, _ = kind_of(f)
            kwargs: dict[str, Any] = {"dest": dest, "default": default, "help": text}
            if kind == "bool":
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                kwargs["type"] = {"int": int, "float": float, "Path": Path}.get(kind, str)
                allowed = tuple(choices.get(key) or choices_of(f))
                if allowed:
                    kwargs["choices"] = allowed
            if key in choices:
                self.only[key] = tuple(choices[key])
            target.add_argument(option, **kwargs)
            self.setting_dests[key] = dest

    def add_run_config(self, accepted: Iterable[str] | None = None, owned: Iterable[str] = (),
                       group: Any = None, only: Mapping[str, tuple] | None = None) -> None:
        """``--run-config`` for the settings in ``accepted`` (default: every one not in
        ``owned``, the keys this command sets itself); ``only``: fewer allowed values."""
        self.owned = tuple(owned)
        self.accepted = tuple(k for k in (self.known if accepted is None else accepted)
                              if k not in self.owned)
        self.only.update(only or {})
        (group if group is not None else self).add_argument(
            "--run-config", default="", metavar="'KEY=VALUE …'",
            help="run settings by their keys, 'key=value key2=\"text\"' (every key, its "
                 "default and allowed values: docs/configuration.md); a flag given too wins")

    def dest_of(self, key: str) -> str:
        """The namespace attribute of setting ``key``."""
        return self.setting_dests.get(key, key.replace("-", "_"))

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        namespace, rest = super().parse_known_args(args, namespace)
        self.resolve(namespace)
        return namespace, rest

    def resolve(self, ns: argparse.Namespace) -> argparse.Namespace:
        """Fold ``--run-config`` and the flags into one value per setting (see the class)."""
        accepted = self.accepted or tuple(self.setting_dests)
        given = parse_run_config(getattr(ns, "run_config", "") or "", self.known, self.prog,
                                 accepted, self.owned)
        out: dict[str, Any] = {}
        for key in accepted:
            dest = self.dest_of(key)
            flag = getattr(ns, dest, None)
            f = self.known[key]
            value = checked(key, flag, f, self.where) if flag is not None else given.get(key)
            if value is not None:
                allowed = self.only.get(key)
                if allowed and value not in allowed:
                    raise ConfigError(f"{self.where} {key}: {value!r} is not one of "
                                      f"{', '.join(map(str, allowed))} ({self.prog})")
                out[key] = value
            elif self.fill_defaults and f.default is not MISSING:
                value = f.default
            setattr(ns, dest, value)
        setattr(ns, GIVEN, out)
        return ns
