"""``moma-client``: check this site's data, then start a Flower SuperNode for it.

Secure by default: ``--kit`` is the folder the coordinator made for this site with
``moma-deploy`` (CA certificate, the site's node-authentication key, the coordinator's
teacher-signing key, ``site.toml`` with the site name and server address). Connections are TLS,
the SuperLink admits the site only by its registered key, teachers must carry the coordinator's
signature, and the SuperNode runs only this installed moma-fl (:mod:`client.app_guard`).
Plaintext without authentication only with ``--insecure`` (local trials).

The data path, cache directory and device are this site's own settings; they go into the
SuperNode's node config and are never taken from the coordinator. The data is validated (and
its class counts shown) before anything connects. A warm worker (:mod:`client.site_worker`)
does the site's work for every message, so that imports and data decoding are paid once, not
every round (``--no-worker``: one fresh process per message, as Flower runs it). No child
process outlives this command; a second ``moma-client`` on the same cache folder or port is
refused.

The site's privacy ledger (every DP round, its ε budget over all runs) is kept outside the cache
folder (``--ledger``; default :func:`client.site_config.default_ledger_path`), so that wiping
the cache does not reset the budget; an old ledger in ``<cache-dir>/privacy/`` is migrated into
it on first use. ``moma-client privacy --cache-dir DIR`` (and ``--ledger``) prints the ledger:
what DP training the site did and the ε it spent, recomputed from the recorded steps
(:mod:`moma_core.privacy.ledger`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

from client.app_guard import LOG_ENV, write_launcher
from client.site_config import SITE_FIELDS, WHERE, default_ledger_path
from client.supernode import run_supernode
from deploy.lifecycle import BusyError, InstanceLock, check_port_free, kill_tagged, spawn
from deploy.runtime import executable, exit_on_sigterm, flower_env, stop
from moma_core.cli.common import DefaultsHelpFormatter, run_cli
from moma_core.cli.settings_flags import SettingsParser
from moma_core.progress import console
from moma_core.sources import open_site_data

#: flag names kept from before moma-client's site flags were generated from the site settings
FLAG_NAMES = {"data-path": "--data"}
#: moma-client's defaults where they are not the node config's: without --num-sites a
#: synthetic site is one of 3 styles; the name, the data, the cache and the ledger come from
#: the kit (:func:`resolve`) unless given
CLIENT_DEFAULTS: dict[str, Any] = {"num-sites": 3, "site-name": None, "data-path": None,
                                   "cache-dir": None, "ledger": None}
#: help texts of the flags whose default comes from the kit
CLIENT_HELPS = {
    "data-path": "ImageFolder dir, .csv manifest, .npz, or synthetic:target (default: the "
                 "kit's site.toml 'data')",
    "cache-dir": "teacher cache and private site state, never sent (default: the kit's "
                 "site.toml 'cache-dir')",
    "site-name": "--insecure only: with a kit the name is the registered one",
    "ledger": "this site's privacy ledger file, kept outside the cache folder so that wiping "
              "the cache does not reset the budget (default: the kit's site.toml 'ledger', "
              "else $XDG_STATE_HOME/moma-fl/privacy-ledger.json, ~/.local/state/... without "
              "XDG_STATE_HOME); an old ledger in <cache-dir>/privacy/ is migrated into it",
}
#: the site settings with a flag, by group (teacher-signer: the kit's)
SITE_FLAGS = ("data-path", "cache-dir", "site-name", "device")
SYNTHETIC_FLAGS = ("site-index", "num-sites", "n", "class-probs", "data-seed")
DATA_FLAGS = ("skip-bad-images", "allow-outside-paths")
POLICY_FLAGS = ("require-dp", "require-client-dp", "max-epsilon", "max-client-epsilon",
                "max-delta", "ledger")


def _add_site_flags(p: SettingsParser, keys: tuple[str, ...], group: Any = None) -> None:
    """Flags for the site settings ``keys``, generated from :class:`SiteSettings`."""
    defaults = {k: CLIENT_DEFAULTS.get(k, SITE_FIELDS[k].default) for k in keys}
    p.add_settings(keys, group=group, names=FLAG_NAMES, helps=CLIENT_HELPS, defaults=defaults)


def parser() -> SettingsParser:
    p = SettingsParser(prog="moma-client", description=__doc__.splitlines()[0],
                       epilog="moma-client privacy: this site's privacy ledger "
                              "(moma-client privacy --help)",
                       known=SITE_FIELDS, where=WHERE, formatter_class=DefaultsHelpFormatter)
    p.add_argument("--kit", type=Path,
                   help="this site's kit from the coordinator (moma-deploy): TLS + site auth")
    p.add_argument("--server", help="coordinator address host:port (default: the kit's)")
    _add_site_flags(p, SITE_FLAGS)
    p.add_argument("--insecure", action="store_true",
                   help="plaintext, no site authentication, unsigned teachers (local trials)")
    p.add_argument("--clientappio-port", type=int, default=9094,
                   help="local port (127.0.0.1) of this SuperNode's app runtime; give each "
                        "moma-client on one host its own")
    p.add_argument("--max-retries", type=int, default=None,
                   help="give up (exit 2) after this many reconnection attempts (default: "
                        "keep trying, also when the coordinator refuses this site)")
    p.add_argument("--max-wait-time", type=float, default=None,
                   help="give up (exit 2) after this many seconds of reconnection attempts "
                        "(default: no limit)")
    _add_site_flags(p, SYNTHETIC_FLAGS, p.add_argument_group("synthetic data"))
    _add_site_flags(p, DATA_FLAGS)
    p.add_argument("--check-only", action="store_true",
                   help="decode every image as training will, report, and exit")
    _add_site_flags(p, POLICY_FLAGS, p.add_argument_group(
        "privacy policy (wins over the coordinator's run settings)"))
    p.add_argument("--exit-after-study", action="store_true",
                   help="end (exit 0) when the coordinator ends its study, instead of staying "
                        "up and connecting again for the next one")
    p.add_argument("--no-worker", action="store_true",
                   help="no warm site worker: every message is handled in a fresh process "
                        "(imports and data decoding repeated each round; less memory held "
                        "between rounds)")
    return p


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill server, data, cache dir and name from the kit; check the mode's requirements."""
    args.kit_info = None
    if args.kit is not None:
        from deploy.federation import SiteKit

        kit = SiteKit.load(args.kit)
        args.kit_info = kit
        site_toml = tomllib.loads((kit.root / "site.toml").read_text())
        args.server = args.server or kit.server
        if args.data is None and site_toml.get("data"):
            args.data = str(site_toml["data"])
        if args.cache_dir is None and site_toml.get("cache-dir"):
            args.cache_dir = Path(str(site_toml["cache-dir"]))
        if args.ledger is None and site_toml.get("ledger"):
            args.ledger = Path(str(site_toml["ledger"]))
        if args.site_name and args.site_name != kit.site_name:
            raise ValueError(f"--site-name {args.site_name!r}: this kit belongs to "
                             f"{kit.site_name!r} (a site's name is its registered key's)")
        args.site_name = kit.site_name
        if args.insecure:
            raise ValueError("--insecure and --kit exclude each other")
    elif not args.insecure and not args.check_only:
        raise ValueError("give --kit (the folder the coordinator made for this site with "
                         "moma-deploy), or --insecure for a plaintext local trial")
    if not args.data:
        raise ValueError("no data: give --data (or 'data' in the kit's site.toml)")
    if args.cache_dir is None:
        raise ValueError("no cache folder: give --cache-dir (or 'cache-dir' in site.toml)")
    if str(args.device).startswith("cuda"):  # refused here, not by every round of the run
        from moma_core.standalone import resolve_device

        resolve_device(args.device)
    args.ledger = (args.ledger or default_ledger_path()).expanduser()
    if not args.check_only and not args.server:
        raise ValueError("no coordinator address: give --server host:port")
    return args


def node_config(args: argparse.Namespace) -> str:
    """The SuperNode's node config: every site setting with a value, from the flags (checked
    by :class:`SiteSettings` as the site will read them, :func:`site_settings`), the kit and
    :func:`resolve`."""
    dests = {key: _dest(FLAG_NAMES.get(key, f"--{key}")) for key in SITE_FIELDS}
    values: dict[str, Any] = {key: getattr(args, dest, None) for key, dest in dests.items()}
    if not args.data.startswith("synthetic:"):
        values["data-path"] = Path(args.data)  # an absolute path, as every path given
    values["site-name"] = args.site_name or args.cache_dir.name
    if args.kit_info is not None:
        values["teacher-signer"] = args.kit_info.teacher_signer
    if getattr(args, "worker_socket", None):
        values["site-worker"] = str(args.worker_socket)
    return " ".join(f"{k}={_toml(v)}" for k, v in values.items() if v is not None)


def _dest(option: str) -> str:
    return option.lstrip("-").replace("-", "_")


def _toml(value: Any) -> str:
    """A node config value as flower-supernode reads it (switches as "true"/"false")."""
    if isinstance(value, bool):
        value = "true" if value else "false"
    elif isinstance(value, Path):
        value = str(value.resolve())
    elif isinstance(value, tuple):
        value = ",".join(map(str, value))
    return f'"{value}"' if isinstance(value, str) else str(value)


def check_data(args: argparse.Namespace) -> dict:
    data = open_site_data(args.data, seed=args.data_seed, n=args.n,
                          site_index=args.site_index, num_sites=args.num_sites,
                          class_probs=args.class_probs,
                          on_error="skip" if args.skip_bad_images else "raise",
                          allow_outside_paths=args.allow_outside_paths)
    counts = data.counts()
    console.print(f"site data {args.data}: {len(data.train)} train / {len(data.val)} val")
    console.print(f"  classes (label order): {','.join(data.classes)}", markup=False)
    for split, per_class in counts.items():
        console.print(f"  {split}: " + ", ".join(f"{c}={n}" for c, n in per_class.items()))
    skipped = {p for split in (data.train, data.val)
               for p in getattr(getattr(split, "base", None), "skipped", [])}
    if skipped:
        console.print(f"[yellow]skipped {len(skipped)} unreadable images")
    return counts


def transport_args(args: argparse.Namespace) -> list[str]:
    if args.insecure:
        console.print("[yellow]warning: --insecure: traffic to the coordinator is not "
                      "encrypted, this site is not authenticated and teachers are not "
                      "signature-checked (local trials only)")
        return ["--insecure"]
    from deploy.pki import check_certificate

    kit = args.kit_info
    warning = check_certificate(kit.ca_cert)
    if warning:
        console.print(f"[yellow]warning: {warning}")
    return ["--root-certificates", str(kit.ca_cert.resolve()),
            "--auth-supernode-private-key", str(kit.node_key.resolve())]


class WorkerKeeper:
    """The site's warm worker (:mod:`client.site_worker`), started again if it stops."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env, self.proc = env, None
        self.dir = Path(tempfile.mkdtemp(prefix="moma-site-"))  # mode 0700, short path
        self.socket = self.dir / "worker.sock"
        self.closing = threading.Event()
        self.thread = threading.Thread(target=self._keep, daemon=True)

    def _spawn(self) -> None:
        self.proc = spawn([sys.executable, "-m", "client.site_worker", "--socket",
                           str(self.socket), "--parent-pid", str(os.getpid())], self.env)

    def start(self) -> Path:
        self._spawn()
        self.thread.start()
        return self.socket

    def _keep(self) -> None:
        delay = 5.0
        while not self.closing.is_set():
            rc = self.proc.wait()
            if self.closing.is_set():
                return
            console.print(f"[yellow]the site worker stopped (exit code {rc}); messages are "
                          f"handled in their own processes until it is back (in {delay:.0f} s)")
            if self.closing.wait(delay):
                return
            delay = min(delay * 2, 300.0)
            self._spawn()

    def close(self) -> None:
        self.closing.set()
        stop(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


def start(args: argparse.Namespace) -> int:
    resolve(args)
    check_data(args)
    if args.check_only:
        return 0
    transport = transport_args(args)
    cache = args.cache_dir.resolve()
    lock = InstanceLock(cache / ".moma-client.lock", f"site cache folder {cache}")
    killed = lock.acquire()
    worker = None
    try:
        if killed:
            console.print(f"stopped {len(killed)} leftover process(es) of a previous "
                          "moma-client on this cache folder")
        check_port_free("127.0.0.1", args.clientappio_port)
        env = flower_env(cache / "flwr-home")
        launcher_dir = write_launcher(cache / "bin").parent
        env["PATH"] = str(launcher_dir) + os.pathsep + env["PATH"]
        env[LOG_ENV] = str(cache / "logs" / "guard.log")
        if not args.no_worker:
            worker = WorkerKeeper(lock.env(env))
            args.worker_socket = worker.start()
        cmd = [executable("flower-supernode"), *transport, "--superlink", args.server,
               "--host", "127.0.0.1", "--port", str(args.clientappio_port),
               "--node-config", node_config(args)]
        if args.max_retries is not None:
            cmd += ["--max-retries", str(args.max_retries)]
        if args.max_wait_time is not None:
            cmd += ["--max-wait-time", str(args.max_wait_time)]
        ledger = args.ledger.resolve()
        console.print(f"privacy ledger: {ledger}", markup=False)
        if ledger.is_relative_to(cache):
            console.print("[yellow]warning: the privacy ledger is inside the cache folder: "
                          "wiping the cache would reset this site's privacy budget")
        console.print(f"connecting to {args.server} as {args.site_name or cache.name}")
        return keep_connected(args, cmd, lock.env(env))
    except KeyboardInterrupt:
        return 130
    finally:
        if worker is not None:
            worker.close()
        kill_tagged(lock.tag)
        lock.release()


#: Seconds a site waits before it connects again after the coordinator let it go.
REJOIN_DELAY = 5.0


def keep_connected(args: argparse.Namespace, cmd: list[str], env: dict[str, str]) -> int:
    """Run the SuperNode for as long as this command runs.

    A SuperNode that leaves with exit code 0 was let go by the coordinator (its study ended,
    or it restarted): the site says so and connects again for the next study, without anyone
    touching it (``--exit-after-study``: end instead, exit 0). A SuperNode that could not join
    is retried with a growing delay, or, with ``--max-retries``/``--max-wait-time``, ends the
    command (exit 2) with the reason.
    """
    delay = 5.0
    while True:
        end = run_supernode(cmd, env, start=spawn)
        if end.left_on_its_own():
            if args.exit_after_study:
                console.print(f"{end.reason()}: --exit-after-study, so this site stops here")
                return 0
            console.print(f"[yellow]{end.reason()}; this site stays up and connects again "
                          f"in {REJOIN_DELAY:.0f} s, for the coordinator's next study")
            time.sleep(REJOIN_DELAY)
            delay = 5.0
            continue
        reason = end.hint or (
            f"could not join the federation at {args.server} (the SuperNode stopped "
            f"with exit code {end.rc}): the coordinator refused this site (its key is "
            "not registered yet, or was revoked), TLS failed (a CA certificate from "
            "another federation, or a server name outside the certificate), a "
            "plaintext site met a TLS coordinator, or nothing answers there "
            "(Flower's reason is printed above)")
        if args.max_retries is not None or args.max_wait_time is not None:
            print(f"error: {reason}", file=sys.stderr)
            return 2
        # no limit given: keep trying, as a site service should (the coordinator may
        # not have registered this site yet, or may be restarting)
        console.print(f"{reason}; trying again in {delay:.0f} s", style="yellow", markup=False)
        time.sleep(delay)
        delay = min(delay * 2, 60.0)


def privacy_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moma-client privacy", formatter_class=DefaultsHelpFormatter,
        description="Print this site's privacy ledger: every DP training it recorded, and the "
                    "ε spent, recomputed from the recorded steps (kept on this site's disk "
                    "only).")
    p.add_argument("--kit", type=Path,
                   help="this site's kit (its site.toml names the cache, maybe the ledger)")
    p.add_argument("--cache-dir", type=Path,
                   help="the site's cache folder (an old ledger there is migrated)")
    p.add_argument("--ledger", type=Path,
                   help="the site's privacy ledger file (default: as moma-client's)")
    return p


def privacy(argv: list[str]) -> int:
    """``moma-client privacy``: the site's ledger as a table and the ε of each budget (exit 2,
    one line, if it cannot be trusted)."""
    args = privacy_parser().parse_args(argv)
    cache, ledger = args.cache_dir, args.ledger
    if args.kit is not None:
        site_toml = tomllib.loads((args.kit / "site.toml").read_text())
        if cache is None and site_toml.get("cache-dir"):
            cache = Path(str(site_toml["cache-dir"]))
        if ledger is None and site_toml.get("ledger"):
            ledger = Path(str(site_toml["ledger"]))
    if cache is None and ledger is None:
        raise ValueError("give --cache-dir or --ledger (or --kit whose site.toml names "
                         "'cache-dir')")
    from moma_core.privacy.ledger import PrivacyLedger, print_ledger

    ledger = (ledger or default_ledger_path()).expanduser()
    return print_ledger(PrivacyLedger(cache and cache.expanduser(), path=ledger))


@run_cli
def main() -> int:
    exit_on_sigterm()
    try:
        if sys.argv[1:2] == ["privacy"]:
            return privacy(sys.argv[2:])
        return start(parser().parse_args())
    except (FileNotFoundError, BusyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
