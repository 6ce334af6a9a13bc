"""A site's own settings, read from its SuperNode's node config — never from the coordinator.

Keys (``flower-supernode --node-config 'data-path="/data/kather" cache-dir="/var/moma"'``):
``data-path`` (ImageFolder dir, .csv, .npz, or ``synthetic:target``), ``cache-dir`` (teacher
cache and site state), ``device`` (auto/cpu/cuda), ``site-name``; for synthetic data
``site-index``, ``num-sites``, ``n``, ``class-probs`` (one weight per class,
comma-separated), ``data-seed``; ``skip-bad-images`` (true/false);
``allow-outside-paths`` (true/false: a CSV manifest may name images outside its folder);
``teacher-signer``
(the coordinator's teacher-signing public key from the site's kit: teachers must be signed);
the site's privacy policy, which wins over the run's settings: ``require-dp`` (true: train
only in runs with DP-SGD), ``require-client-dp`` (true: train only in runs with client-level
DP of the aggregate), ``max-epsilon`` (the site's ε budget over all runs, patch level;
0: none), ``max-delta`` (the largest DP-SGD δ the site accepts; 0: 1/(10 × its training
examples)) and ``max-client-epsilon`` (the site's site-level ε budget under client-level DP,
over all runs; 0: none); ``ledger`` (the site's privacy ledger file, where every DP round is
recorded: ``moma-client`` always sets it, by default :func:`default_ledger_path`, outside the
cache folder so that wiping the cache does not reset the budget; without it, as in a simulated
federation, the ledger is ``<cache-dir>/privacy/ledger.json``).
In a simulated federation Flower sets ``partition-id``/``num-partitions`` instead: the site is
then entry ``partition-id`` of the run-scoped spec file named by the run config's
``simulation-sites`` (written by ``moma-simulate``), else synthetic site ``partition-id``. A
real SuperNode's node config has no ``partition-id`` (``moma-client`` never sets one): the run
config, which the coordinator chooses, can never point a real site at other data.

Each key is a field of :class:`SiteSettings`, declared once with its default, help and range;
``moma-client``'s flags are generated from the same fields, so a bad value is refused with the
same one line (``node-config KEY: …``) whichever way it was given.
"""

from __future__ import annotations

import json
import os
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any

from moma_core.method_config import SYNTHETIC_N
from moma_core.run_settings import ConfigError, checked, fields_by_key, kind_of, opt


class SiteConfigError(ValueError):
    """The node config of a site is incomplete or wrong."""

    category = "config-error"


@dataclass(frozen=True)
class SiteSettings:
    """A site's settings, each declared once (:func:`moma_core.run_settings.opt`: default,
    help, range): :func:`site_settings` reads them from the node config and ``moma-client``'s
    flags are generated from them (:mod:`client.cli`), both checked by the same
    :func:`moma_core.run_settings.checked` (one line, ``node-config KEY: …``)."""

    data_path: str = opt(MISSING, "ImageFolder dir, .csv manifest, .npz, or synthetic:target")
    cache_dir: Path = opt(MISSING, "teacher cache and private site state, never sent")
    device: str = opt("auto", "auto, cpu, cuda, cuda:1 …")
    site_name: str = opt("site", "the site's name (default: site-<site-index>)")
    site_index: int | None = opt(None, "synthetic data: simulated hospital style (default: "
                                 "none)")
    num_sites: int = opt(1, "synthetic data: number of simulated styles")
    n: int = opt(SYNTHETIC_N, "synthetic data: training images")
    skip_bad_images: bool = opt(False, "skip images that cannot be decoded (counted) instead "
                                "of failing")
    class_probs: tuple[float, ...] | None = opt(None, "synthetic data: the class mix, one "
                                                "weight per class, comma-separated (default: "
                                                "balanced)")
    data_seed: int = opt(0, "synthetic data: seed of the images (and of a derived val split)")
    teacher_signer: Path | None = opt(None, "the coordinator's teacher-signing public key (the "
                                      "site's kit): teachers must be signed")
    allow_outside_paths: bool = opt(False, "a CSV manifest may name images outside its folder")
    require_dp: bool = opt(False, "train only in runs with DP-SGD (dp = dp-sgd); others are "
                           "refused with 'privacy-refused'")
    require_client_dp: bool = opt(False, "train only in runs with client-level DP of the "
                                  "aggregate (client-dp); others are refused with "
                                  "'privacy-refused'")
    max_epsilon: float = opt(0.0, "this site's DP-SGD ε budget over all runs (its privacy "
                             "ledger), for every unit it protects: the patch-level ε (all "
                             "DP-SGD rounds, patient-level ones included) and the "
                             "patient-level ε both stay within it; a round that would exceed "
                             "it is refused with 'privacy-budget' (0: no cap)", lo=0)
    max_delta: float = opt(0.0, "the largest DP-SGD δ this site accepts: the ledger reports ε "
                           "at the run's δ, and a larger δ makes ε look smaller; a run above "
                           "it is refused with 'privacy-refused' (0: 1/(10 × training "
                           "examples))", lo=0, hi=1, hi_open=True)
    max_client_epsilon: float = opt(0.0, "this site's site-level ε budget under client-level "
                                    "DP (client-dp), over all runs (its privacy ledger); a "
                                    "round that would exceed it is refused with "
                                    "'privacy-budget' (0: no cap)", lo=0)
    #: the privacy ledger file; None: <cache-dir>/privacy/ledger.json
    ledger: Path | None = opt(None, "this site's privacy ledger file (default: "
                              "<cache-dir>/privacy/ledger.json)")


#: node-config key → field of every site setting (the keys of the module docstring)
SITE_FIELDS = fields_by_key(SiteSettings)
#: what a refusal of a site setting names, by node config or by moma-client's flag
WHERE = "node-config"


def default_ledger_path() -> Path:
    """Where ``moma-client`` keeps a site's privacy ledger unless told otherwise: outside any
    cache folder, ``$XDG_STATE_HOME/moma-fl/privacy-ledger.json`` (``~/.local/state/…`` when
    ``XDG_STATE_HOME`` is unset or not absolute). One per user account: sites run by the same
    account share it unless each is given its own ``--ledger``."""
    state = os.environ.get("XDG_STATE_HOME", "")
    base = Path(state) if os.path.isabs(state) else Path.home() / ".local" / "state"
    return base / "moma-fl" / "privacy-ledger.json"


def site_value(key: str, value: Any) -> Any:
    """A node config's ``value`` of site setting ``key``, typed and checked by the tree
    (:class:`SiteConfigError`, one line: the same as moma-client's flag gives). Numbers may be
    written as text (``max-delta="1e-4"``); empty text is no value (a switch's: off)."""
    f = SITE_FIELDS[key]
    kind, optional = kind_of(f)
    if isinstance(value, str):
        if value == "" and (optional or f.default is MISSING or kind == "bool"):
            return None
        try:
            value = {"int": int, "float": float}[kind](value)
        except (KeyError, ValueError):
            pass  # text where text is meant, or not a number: the tree says which
    try:
        return checked(key, value, f, WHERE)
    except ConfigError as exc:
        raise SiteConfigError(str(exc)) from None


def site_settings(node_config: dict, simulation_sites: str = "") -> SiteSettings:
    """Validate and type a node config (see module docstring).

    ``simulation_sites``: the run config's spec file of simulated sites; read only for a
    simulated node (one whose node config Flower's simulation engine made).
    """
    cfg = dict(node_config)
    if "data-path" not in cfg and "partition-id" in cfg:
        cfg = {**_simulated_site(int(cfg["partition-id"]), int(cfg["num-partitions"]),
                                 simulation_sites), **cfg}
    missing = [k for k in ("data-path", "cache-dir") if not cfg.get(k)]
    if missing:
        raise SiteConfigError(f"node config lacks {', '.join(missing)}: start the SuperNode "
                              "with --node-config 'data-path=\"…\" cache-dir=\"…\"'")
    values = {f.name: site_value(key, cfg[key]) for key, f in SITE_FIELDS.items()
              if key in cfg and cfg[key] is not None}
    values = {k: v for k, v in values.items() if v is not None}
    if "site_name" not in values:
        values["site_name"] = f"site-{cfg.get('site-index', 0)}"
    for name in ("cache_dir", "ledger"):
        if name in values:
            values[name] = values[name].expanduser()
    return SiteSettings(**values)


def _simulated_site(partition: int, num_partitions: int, spec: str) -> dict:
    """Site config of a simulated node: entry ``partition`` of ``spec``, else synthetic."""
    if spec:
        try:
            sites = json.loads(Path(spec).read_text())
        except (OSError, ValueError) as exc:
            raise SiteConfigError(f"simulation-sites {spec}: {exc}") from None
        if not isinstance(sites, list) or partition >= len(sites) or \
                not isinstance(sites[partition], dict):
            raise SiteConfigError(f"{spec} does not describe simulated site {partition}")
        return sites[partition]
    # no spec (the app run by ``flwr run`` on a local simulation, not by moma-simulate): an
    # absolute, per-user cache folder, never one relative to wherever Ray's worker happens to run
    cache = Path.home() / ".cache" / "moma-fl" / "simulation" / f"site-{partition}"
    return {"data-path": "synthetic:target", "cache-dir": str(cache),
            "site-index": partition, "num-sites": num_partitions,
            "site-name": f"site-{partition}", "device": "cpu"}
