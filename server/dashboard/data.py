"""What the dashboard shows, read from a run folder on disk (never written to).

Sources, all optional except that a run has a ``results.json`` or a ``live.json``:

- ``results.json`` (:mod:`server.results`): the completed rounds, as the ServerApp wrote them;
- ``live.json``: the round in progress, rewritten atomically by the ServerApp;
- ``security.jsonl``: security events, one JSON object a line;
- ``superlink.db``: the SuperLink's node table (online, last seen), opened read-only;
- ``sites.json``: node id → registered site name (``moma-server --federation``);
- the federation folder: the sites registered and revoked;
- the teacher's ``.sig.json``: who signed it.

Only what the sites sent (their status, failure category, metrics, ε, bytes) and what the
coordinator itself set is returned; every string is data for the page to show as text.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from moma_protocol.wire import DP_EPSILON

RUN_FILES = ("results.json", "live.json")
TRAIN_TERMS = ("train-ce", "train-kl", "train-nce", "train-nce-shuffled", "train-retrieval")
EVAL_KEYS = ("accuracy", "macro_f1", "kappa")
CONFIG_KEYS = ("objective", "student-model", "aggregation", "num-rounds", "local-epochs",
               "classes", "image-size", "dp", "client-dp", "secagg", "min-train-nodes",
               "round-timeout", "fedbn")


def read_json(path: Path) -> Any:
    """A JSON file, or None when it is absent, half-written or not JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _num(value: Any) -> float | None:
    """A finite number, or None (JSON has no NaN)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list:
    return value if isinstance(value, list) else []


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def list_runs(runs_dir: Path) -> list[dict]:
    """The run folders under ``runs_dir`` (those with a results.json or live.json), newest
    first: name, rounds completed, state."""
    runs = []
    try:
        folders = [p for p in Path(runs_dir).iterdir() if p.is_dir()]
    except OSError:
        return []
    for folder in folders:
        files = [folder / f for f in RUN_FILES if (folder / f).is_file()]
        if not files:
            continue
        results = _dict(read_json(folder / "results.json"))
        live = _dict(read_json(folder / "live.json")) or None
        runs.append({"name": folder.name,
                     "rounds": len(results.get("rounds") or []),
                     "state": _state(folder, results, live),
                     "updated": max(f.stat().st_mtime for f in files)})
    return sorted(runs, key=lambda r: -r["updated"])


def run_folder(runs_dir: Path, name: str) -> Path | None:
    """``runs_dir/name`` if ``name`` is one folder name of a run there (no path tricks)."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        return None
    folder = Path(runs_dir) / name
    if folder.is_dir() and any((folder / f).is_file() for f in RUN_FILES):
        return folder
    return None


def _lock_holder_alive(folder: Path) -> bool:
    """Whether the moma-server that holds this run folder's lock is alive."""
    from deploy.lifecycle import pid_alive

    try:
        text = (folder / ".moma-server.lock").read_text().strip()
    except OSError:
        return False
    return text.isdigit() and pid_alive(int(text))


def _state(folder: Path, results: dict, live: dict | None) -> str:
    if isinstance(live, dict) and live.get("state"):
        return _text(live["state"])
    final = results.get("final")
    if isinstance(final, dict):
        return "finished" if final.get("status") == "ok" else "failed"
    return "running" if _lock_holder_alive(folder) else "stopped"


def _eval(m: Any) -> dict | None:
    if not isinstance(m, dict):
        return None
    out = {k: _num(m.get(k, m.get(k.replace("_", "-")))) for k in EVAL_KEYS}
    return out if any(v is not None for v in out.values()) else None


def _rounds(results: dict) -> tuple[list[dict], dict[str, dict]]:
    """Per round: global metrics, loss terms, bytes, site counts; per site name: series over
    rounds (validation metrics, status, failure category, bytes, ε)."""
    raw = [r for r in _list(results.get("rounds")) if isinstance(r, dict)]
    n = len(raw)
    rounds, sites = [], {}

    def site(name: str) -> dict:
        if name not in sites:
            sites[name] = {"name": name, "accuracy": [None] * n, "macro_f1": [None] * n,
                           "kappa": [None] * n, "status": [None] * n, "reason": [None] * n,
                           "bytes_down": 0, "bytes_up": 0, "epsilon": None,
                           "epsilon_round": None, "failures": {}}
        return sites[name]

    for i, r in enumerate(raw):
        train = _dict(r.get("train"))
        entry_sites = _dict(r.get("sites"))
        ok = 0
        for node, s in entry_sites.items():
            if not isinstance(s, dict):
                continue
            rec = site(_text(s.get("site_name") or f"node {node}"))
            status = _text(s.get("status"))
            rec["status"][i] = status
            rec["reason"][i] = _text(s.get("reason")) or None
            rec["bytes_down"] += int(_num(s.get("bytes_down")) or 0)
            rec["bytes_up"] += int(_num(s.get("bytes_up")) or 0)
            if status == "ok":
                ok += 1
            else:
                category = _text(s.get("reason")) or status or "unknown"
                rec["failures"][category] = rec["failures"].get(category, 0) + 1
            eps = _num(_dict(s.get("metrics")).get(DP_EPSILON))
            if eps is not None:
                rec["epsilon"], rec["epsilon_round"] = eps, r.get("round", i + 1)
        for node, m in _dict(r.get("federated_eval_sites")).items():
            if not isinstance(m, dict):
                continue
            rec = site(_text(m.get("site-name") or f"node {node}"))
            for key in EVAL_KEYS:
                rec[key][i] = _num(m.get(key, m.get(key.replace("_", "-"))))
        rounds.append({
            "round": int(_num(r.get("round")) or i + 1),
            "status": _text(r.get("status") or "ok"),
            "server_eval": _eval(r.get("server_eval")),
            "federated_eval": _eval(r.get("federated_eval")),
            "terms": {k: _num(train.get(k)) for k in TRAIN_TERMS},
            "bytes_down": int(_num(r.get("bytes_down")) or 0),
            "bytes_up": int(_num(r.get("bytes_up")) or 0),
            "wall_s": _num(r.get("wall_s")),
            "sites_ok": ok, "sites_total": len(entry_sites)})
    return rounds, sites


def _teacher(folder: Path, results: dict, federation: Path | None) -> dict:
    """The teacher's SHA-256 (as the run recorded it) and its signer (from the signature file
    beside the teacher named in the run's config or the coordinator's settings file)."""
    sha = results.get("teacher_sha256")
    out: dict = {"sha256": _text(sha) or None, "signer": None, "signature": "none"}
    own = read_json(folder / "coordinator.json")
    path = _text(_dict(results.get("config")).get("teacher-path")
                 or (own.get("teacher-path") if isinstance(own, dict) else ""))
    if not path:
        return out
    from moma_core.signature import fingerprint, signature_path

    sig = read_json(signature_path(Path(path)))
    if not isinstance(sig, dict):
        out["signature"] = "no signature file"
        return out
    out["signer"] = _text(sig.get("signer")) or None
    out["signature"] = ("for this teacher" if sig.get("sha256") == sha
                        else "for another teacher file")
    if federation is not None and out["signer"]:
        try:
            from cryptography.hazmat.primitives import serialization

            from deploy.federation import Federation

            fed = Federation.load(federation)
            key = serialization.load_pem_public_key(fed.signing_public_key.read_bytes())
            out["federation_key"] = fingerprint(key) == out["signer"]
        except Exception:  # noqa: BLE001 - an unreadable federation only hides this check
            out["federation_key"] = None
    return out


def _uint64(node_id: int) -> str:
    return str(node_id + 2**64 if node_id < 0 else node_id)


def superlink_nodes(db: Path, now: float | None = None) -> dict[str, dict]:
    """Node id (uint64 as text) → online / status / last seen, from the SuperLink's node table
    (read-only, a short timeout; a locked or absent database gives {})."""
    if not Path(db).is_file():
        return {}
    now = time.time() if now is None else now
    try:
        con = sqlite3.connect(f"file:{Path(db).resolve()}?mode=ro", uri=True, timeout=0.5)
        try:
            rows = con.execute("SELECT node_id, status, last_activated_at, "
                               "last_deactivated_at, online_until, heartbeat_interval "
                               "FROM node").fetchall()
        finally:
            con.close()
    except sqlite3.Error:
        return {}
    out = {}
    for node_id, status, activated, deactivated, until, interval in rows:
        online = status == "online" and (until is None or until >= now)
        if online and until is not None and interval:
            last_seen: Any = min(now, until - 2 * interval)  # flwr: until = beat + 2 × interval
        else:
            last_seen = deactivated or activated
        out[_uint64(int(node_id))] = {"status": _text(status), "online": online,
                                      "last_seen": last_seen}
    return out


def _iso_or_time(value: Any) -> float | None:
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str) and value:
        from datetime import datetime

        try:
            return datetime.fromisoformat(value).timestamp()
        except ValueError:
            return None
    return None


def _site_registry(folder: Path, results: dict, live: dict | None,
                   federation: Path | None) -> list[dict]:
    """Each site: registered / revoked (federation), online / last seen (SuperLink)."""
    names: dict[str, str] = {}  # node id → site name
    for r in _list(results.get("rounds")):
        for node, s in _dict(_dict(r).get("sites")).items():
            if isinstance(s, dict) and s.get("site_name"):
                names[str(node)] = _text(s["site_name"])
    registry = read_json(folder / "sites.json")
    if isinstance(registry, dict):
        names.update({str(k): _text(v) for k, v in registry.items()})
    for s in _list(_dict(live).get("sites")):
        if isinstance(s, dict) and s.get("node_id") is not None and s.get("site_name"):
            names[str(s["node_id"])] = _text(s["site_name"])
    sites: dict[str, dict] = {}

    def site(name: str) -> dict:
        return sites.setdefault(name, {"name": name, "registered": None, "revoked": None,
                                       "online": None, "last_seen": None, "node_id": None})

    if federation is not None:
        from deploy.federation import Federation, FederationError

        try:
            for name, rec in Federation.load(federation).data["sites"].items():
                s = site(_text(name))
                s["registered"] = _text(rec.get("added")) or "yes"
                s["revoked"] = _text(rec.get("revoked")) or None
        except (FederationError, OSError):
            pass
    for node, info in superlink_nodes(folder / "superlink.db").items():
        s = site(names.get(node, f"node {node}"))
        seen = _iso_or_time(info["last_seen"])
        if s["node_id"] is not None and (s["last_seen"] or 0) > (seen or 0):
            continue  # the same name under an older node id (an --insecure restart)
        s.update(node_id=node, online=info["online"], last_seen=seen)
    for name in names.values():
        site(name)
    return sorted(sites.values(), key=lambda s: s["name"])


def _live(live: Any) -> dict | None:
    if not isinstance(live, dict):
        return None
    out = {k: live.get(k) for k in ("state", "round", "num_rounds", "round_started",
                                    "round_timeout", "connected", "min_nodes", "message",
                                    "updated")}
    out["sites"] = [{"node_id": _text(s.get("node_id")), "site_name": _text(s.get("site_name")),
                     "status": _text(s.get("status"))}
                    for s in _list(live.get("sites")) if isinstance(s, dict)]
    out["waiting_for"] = [_text(n) for n in _list(live.get("waiting_for"))]
    end = live.get("end")
    out["end"] = ({k: end.get(k) for k in ("status", "reason", "exit_code")}
                  if isinstance(end, dict) else None)
    return out


def _security(folder: Path, limit: int = 200) -> list[dict]:
    try:
        lines = (folder / "security.jsonl").read_text(errors="replace").splitlines()
    except OSError:
        return []
    events = []
    for line in lines[-limit:]:
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if isinstance(e, dict):
            events.append({k: _text(e.get(k)) for k in
                           ("time", "event", "site", "key_sha256", "holder", "peer")})
    return events


_SUMMARIES: dict[Path, tuple[tuple[int, int], tuple[dict, list[dict], dict[str, dict]]]] = {}
_SUMMARIES_LOCK = threading.Lock()


def _summarised_results(path: Path) -> tuple[dict, list[dict], dict[str, dict]]:
    """results.json and its per-round and per-site summaries, read again only when the file
    changed (its modification time or size): every open page polls every 2 s, and a long run's
    results file takes most of a poll to read and summarise."""
    try:
        st = path.stat()
        key = (st.st_mtime_ns, st.st_size)
    except OSError:
        key = None
    with _SUMMARIES_LOCK:
        hit = _SUMMARIES.get(path)
    if key is not None and hit is not None and hit[0] == key:
        return hit[1]
    results = read_json(path)
    results = results if isinstance(results, dict) else {}
    rounds, sites = _rounds(results)
    if key is not None and results:
        with _SUMMARIES_LOCK:
            if len(_SUMMARIES) >= 16:
                _SUMMARIES.pop(next(iter(_SUMMARIES)))
            _SUMMARIES[path] = (key, (results, rounds, sites))
    return results, rounds, sites


def run_state(folder: Path, federation: Path | None = None) -> dict:
    """Everything the page shows about the run in ``folder``."""
    folder = Path(folder)
    results, rounds, sites = _summarised_results(folder / "results.json")
    live_raw = read_json(folder / "live.json")
    live = _live(live_raw)
    config = results.get("config") if isinstance(results.get("config"), dict) else {}
    classes = [c for c in _text(config.get("classes")).split(",") if c]
    state = _state(folder, results, live_raw if isinstance(live_raw, dict) else None)
    if live is None:  # no live.json: the round in progress is the one after the last written
        running = state == "running"
        live = {"state": "training" if running else state,
                "round": len(rounds) + 1 if running else None,
                "num_rounds": config.get("num-rounds"), "round_started": None,
                "round_timeout": config.get("round-timeout"), "connected": None,
                "min_nodes": config.get("min-train-nodes"), "sites": [], "waiting_for": [],
                "message": "", "end": None, "updated": None, "derived": True}
    failures: dict[str, int] = {}
    for s in sites.values():
        for category, count in s["failures"].items():
            failures[category] = failures.get(category, 0) + count
    privacy = results.get("privacy") if isinstance(results.get("privacy"), dict) else {}
    client = privacy.get("client-level") if isinstance(privacy.get("client-level"), dict) else {}
    final = results.get("final") if isinstance(results.get("final"), dict) else None
    return {
        "name": folder.name, "state": state, "now": time.time(),
        "config": {k: config[k] for k in CONFIG_KEYS if k in config},
        "classes": classes, "chance": 1 / len(classes) if classes else None,
        "started": _num(results.get("started")),
        "teacher": _teacher(folder, results, federation),
        "rounds": rounds,
        "site_series": sorted(sites.values(), key=lambda s: s["name"]),
        "sites": _site_registry(folder, results, live_raw if isinstance(live_raw, dict)
                                else None, federation),
        "live": live, "failures": dict(sorted(failures.items())),
        "client_dp": {k: client.get(k) for k in ("epsilon", "delta", "releases", "mechanism")
                      } if client else None,
        "final": ({k: final.get(k) for k in ("status", "best_round", "best_by")}
                  if final else None),
        "security": _security(folder),
    }
