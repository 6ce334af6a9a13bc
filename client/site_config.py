"""A site's own settings, read from its SuperNode's node config — never from the coordinator.

Keys (``flower-supernode --node-config 'data-path="/data/kather" cache-dir="/var/moma"'``):
``data-path`` (ImageFolder dir, .csv, .npz, or ``synthetic:target``), ``cache-dir`` (teacher
cache and site state), ``device`` (auto/cpu/cuda), ``site-name``; for synthetic data
``site-index``, ``num-sites``, ``n``; ``skip-bad-images`` (true/false);
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
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path


class SiteConfigError(ValueError):
    """The node config of a site is incomplete or wrong."""


@dataclass(frozen=True)
class SiteSettings:
    data_path: str
    cache_dir: Path
    device: str = "auto"
    site_name: str = "site"
    site_index: int | None = None
    num_sites: int = 1
    n: int = 800
    skip_bad_images: bool = False
    class_probs: tuple[float, ...] | None = None
    data_seed: int = 0
    teacher_signer: Path | None = None
    allow_outside_paths: bool = False
    require_dp: bool = False
    require_client_dp: bool = False
    max_epsilon: float = 0.0
    max_delta: float = 0.0
    max_client_epsilon: float = 0.0
    ledger: Path | None = None  # the privacy ledger file; None: <cache-dir>/privacy/ledger.json


def default_ledger_path() -> Path:
    """Where ``moma-client`` keeps a site's privacy ledger unless told otherwise: outside any
    cache folder, ``$XDG_STATE_HOME/moma-fl/privacy-ledger.json`` (``~/.local/state/…`` when
    ``XDG_STATE_HOME`` is unset or not absolute). One per user account: sites run by the same
    account share it unless each is given its own ``--ledger``."""
    state = os.environ.get("XDG_STATE_HOME", "")
    base = Path(state) if os.path.isabs(state) else Path.home() / ".local" / "state"
    return base / "moma-fl" / "privacy-ledger.json"


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
    probs = cfg.get("class-probs")
    return SiteSettings(
        data_path=str(cfg["data-path"]),
        cache_dir=Path(str(cfg["cache-dir"])).expanduser(),
        device=str(cfg.get("device", "auto")),
        site_name=str(cfg.get("site-name", f"site-{cfg.get('site-index', 0)}")),
        site_index=None if cfg.get("site-index") in (None, "") else int(cfg["site-index"]),
        num_sites=int(cfg.get("num-sites", 1)),
        n=int(cfg.get("n", 800)),
        skip_bad_images=str(cfg.get("skip-bad-images", "false")).lower() == "true",
        class_probs=tuple(float(p) for p in str(probs).split(",")) if probs else None,
        data_seed=int(cfg.get("data-seed", 0)),
        teacher_signer=Path(str(cfg["teacher-signer"])) if cfg.get("teacher-signer") else None,
        allow_outside_paths=str(cfg.get("allow-outside-paths", "false")).lower() == "true",
        require_dp=str(cfg.get("require-dp", "false")).lower() == "true",
        require_client_dp=str(cfg.get("require-client-dp", "false")).lower() == "true",
        max_epsilon=_max_epsilon(cfg.get("max-epsilon", 0.0)),
        max_delta=_max_delta(cfg.get("max-delta", 0.0)),
        max_client_epsilon=_max_epsilon(cfg.get("max-client-epsilon", 0.0),
                                        "max-client-epsilon"),
        ledger=Path(str(cfg["ledger"])).expanduser() if cfg.get("ledger") else None,
    )


def _max_epsilon(value: object, key: str = "max-epsilon") -> float:
    try:
        eps = float(value)
    except (TypeError, ValueError):
        raise SiteConfigError(f"{key} {value!r} is not a number") from None
    if not eps >= 0 or eps == float("inf"):
        raise SiteConfigError(f"{key} {value!r}: give a finite number ≥ 0 (0: no cap)")
    return eps


def _max_delta(value: object) -> float:
    try:
        delta = float(value)
    except (TypeError, ValueError):
        raise SiteConfigError(f"max-delta {value!r} is not a number") from None
    if not 0 <= delta < 1:
        raise SiteConfigError(f"max-delta {value!r}: give a number in [0, 1) "
                              "(0: 1/(10 x the site's training examples))")
    return delta


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
