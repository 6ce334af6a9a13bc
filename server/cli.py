"""``moma-server``: start a Flower SuperLink and run the MoMA-FL ServerApp on it.

Secure by default: ``--federation`` is the folder made by ``moma-deploy init``. The SuperLink
then serves TLS with the federation's server certificate (expiry checked first), admits only
the sites registered there and not revoked (their public keys are registered with the
SuperLink before the run; a site's name in the results is the one its key was registered
under), and the teacher must carry the coordinator's signature. ``moma-server`` never signs:
signing is an explicit act, ``moma-teacher sign TEACHER --key KEY``, by whoever checked the
teacher; an unsigned teacher is refused. The run-submission and runtime APIs are reachable
from this host's loopback only (:mod:`deploy.superlink`). Plaintext without site
authentication only with ``--insecure`` (local trials).

The run's ``image-size`` is the teacher's (its sidecar's ``architecture.image_size``) unless
``--run-config`` sets it; a distilling run set to another size than the teacher's is refused
(the teacher would see images of another scale than it was trained on). Only ``ce``, which
ships no teacher and at most starts from its weights, may train at another size. Likewise the
run's ``student-model`` is the teacher's model unless ``--run-config`` names another (MoMA's
momentum teacher follows a student of its own architecture).

Writes ``runs/<name>/`` (results.json, checkpoints, curves, report) and stops everything it
started when the run ends or it is killed; a busy port or a run folder in use by another
``moma-server`` is refused. With ``--app-user USER`` (run as root) the ServerApp runs as USER,
who cannot read the federation's keys nor the Control API credential (:mod:`deploy.app_user`).
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path

from deploy.app_user import AppUser
from deploy.app_user import add_option as add_app_user_option
from deploy.lifecycle import BusyError, InstanceLock, check_port_free, kill_tagged, spawn
from deploy.runtime import executable, exit_on_sigterm, flower_env, stop, wait_for_port
from deploy.security_events import watch as watch_events
from moma_core.cli.common import DefaultsHelpFormatter, run_cli
from moma_core.cli.settings_flags import parse_run_config
from moma_core.models import Architecture
from moma_core.objective_registry import needs_teacher
from moma_core.progress import console
from moma_protocol import coordinator_file
from moma_protocol.settings import ConfigError, RunConfig, fields_by_key
from server import dashboard
from server.flwr_app import run_config_arg, write_app
from server.registration import register_sites
from server.teacher_package import check_student_fits, check_student_model, package_teacher


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moma-server", description=__doc__.splitlines()[0],
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--teacher", type=Path,
                   help="teacher .safetensors (not needed for ce); with --federation it must "
                        "be signed first: moma-teacher sign TEACHER --key KEY")
    p.add_argument("--name", default="federation", help="run name: results in runs/<name>/")
    p.add_argument("--runs-dir", type=Path, default=Path("runs"),
                   help="folder of the run folders")
    p.add_argument("--federation", type=Path,
                   help="federation folder from moma-deploy init: TLS + site authentication")
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to accept remote sites")
    p.add_argument("--port", type=int, default=9092, help="the SuperLink's one port")
    p.add_argument("--insecure", action="store_true",
                   help="plaintext, no site authentication (local trials only)")
    p.add_argument("--rounds", type=int, help="number of rounds")
    p.add_argument("--classes", help="comma-separated target classes in label order "
                                     "(required; each site's moma-client --check-only lists "
                                     "its own)")
    p.add_argument("--eval-source", default="",
                   help="coordinator's held-out set (path or synthetic:target)")
    p.add_argument("--eval-sites", type=int, default=1,
                   help="synthetic eval-source: number of site styles to mix")
    p.add_argument("--run-config", default="", metavar="'KEY=VALUE …'",
                   help="more run settings by their keys, 'key=value key2=\"text\"' (every key, "
                        "its default and allowed values: docs/configuration.md); an option "
                        "given too wins")
    p.add_argument("--resume", action="store_true", help="continue runs/<name>/")
    p.add_argument("--startup-timeout", type=float, default=120.0,
                   help="seconds to wait for the SuperLink to listen")
    add_app_user_option(p)
    dashboard.add_options(p)
    return p


#: run settings moma-server sets itself, from its options and the run folder (refused in
#: --run-config)
OWNED = ("run-name", "output-dir", "teacher-path", "site-registry", "resume", "simulation-sites")


def overrides(args: argparse.Namespace, out_root: Path, teacher: Path | None,
              registry: Path | None) -> dict:
    """The run config this command submits: its options, ``--run-config`` (an option given
    explicitly wins: ``--rounds``, ``--classes``, ``--eval-source``), and the teacher's
    ``image-size`` and model (``student-model``) unless that sets them; validated (unknown
    key, wrong type, out of range, an image size not the teacher's: one line) before anything
    starts."""
    values: dict = {"run-name": args.name, "output-dir": str(out_root),
                    "teacher-path": str(teacher or ""), "eval-source": args.eval_source,
                    "eval-sites": args.eval_sites, "resume": args.resume,
                    "site-registry": str(registry or ""),
                    "classes": args.classes or ""}
    extra = parse_run_config(args.run_config, fields_by_key(), "moma-server", owned=OWNED)
    values.update(extra)
    # an option given explicitly wins over --run-config
    if args.rounds is not None:
        values["num-rounds"] = args.rounds
    if args.classes:
        values["classes"] = args.classes
    if args.eval_source:
        values["eval-source"] = args.eval_source
    arch = teacher_architecture(teacher) if teacher is not None else None
    if arch is not None and "image-size" not in extra:
        values["image-size"] = arch.image_size
    if arch is not None and "student-model" not in extra:
        # the student is the teacher's architecture (MoMA's momentum teacher follows it)
        values["student-model"] = arch.model_name
    run = RunConfig.from_flat(values)
    check_student_model(run)
    if needs_teacher(run.objective.objective) and teacher is None:
        raise ConfigError(f"objective {run.objective.objective!r} needs --teacher")
    if arch is not None:
        check_image_size(run, arch)
    if not run.class_names:
        raise ConfigError("give --classes: the target task's class names in label order, "
                          "e.g. --classes benign,grade_1,grade_2 (moma-client --check-only "
                          "prints a site's)")
    return values


def teacher_architecture(teacher: Path) -> Architecture:
    """The teacher's architecture as its sidecar states it (one line if it is unusable)."""
    from moma_core.checkpoint import read_sidecar, refuse_pickle, sidecar_architecture

    refuse_pickle(teacher)  # absent, a pickle: the usual one line, before its sidecar is read
    return sidecar_architecture(read_sidecar(teacher), teacher)


def check_image_size(run: RunConfig, teacher: Architecture) -> None:
    """Refuse a distilling run whose ``image-size`` is not the teacher's: the sites would feed
    the teacher images of another scale than it was trained on. ``ce`` ships no teacher (it at
    most starts from its weights), so it may train at another size."""
    size = run.federation.image_size
    if size == teacher.image_size or not needs_teacher(run.objective.objective):
        return
    raise ConfigError(f"run-config image-size={size}, but the teacher was trained on "
                      f"{teacher.image_size} px images: leave image-size out (the teacher's "
                      f"{teacher.image_size} is used) or set image-size={teacher.image_size}")


def secure_setup(args: argparse.Namespace):
    """The federation (certificates checked) or None for --insecure; refuses half-set modes."""
    if args.insecure:
        if args.federation is not None:
            raise ValueError("--insecure and --federation exclude each other")
        console.print("[yellow]warning: --insecure: traffic is not encrypted and any "
                      "SuperNode may join (local trials only)")
        return None
    if args.federation is None:
        raise ValueError("give --federation (the folder made by moma-deploy init), or "
                         "--insecure for a plaintext local trial")
    from deploy.federation import Federation
    from deploy.pki import check_certificate

    fed = Federation.load(args.federation)
    for cert in (fed.ca_cert, fed.server_cert):
        warning = check_certificate(cert)
        if warning:
            console.print(f"[yellow]warning: {warning}")
    if not fed.active_sites():
        raise ValueError(f"{fed.root}: no active site; add one with moma-deploy add-site")
    return fed


def check_signed_teacher(teacher: Path, fed) -> None:
    """Refuse a teacher without a valid signature by the federation's key. Never signs:
    signing is an explicit act (``moma-teacher sign``) by whoever checked the teacher, so a
    teacher whose signature file was deleted is refused, not signed."""
    from moma_core.signature import SignatureError, signature_path, verify_teacher_files

    sig = signature_path(teacher)
    if not sig.is_file():
        raise SignatureError(f"{teacher} is not signed (no {sig.name}); check it, then sign it: "
                             f"moma-teacher sign {teacher} --key {fed.signing_key}")
    verify_teacher_files(teacher, fed.signing_public_key)


def superlink_args(args: argparse.Namespace, fed, out_dir: Path) -> list[str]:
    tls = ["--insecure"] if fed is None else [
        "--ssl-ca-certfile", str(fed.ca_cert), "--ssl-certfile", str(fed.server_cert),
        "--ssl-keyfile", str(fed.server_key), "--enable-supernode-auth"]
    return [sys.executable, "-m", "deploy.superlink", *tls, "--host", args.host, "--port",
            str(args.port), "--database", str(out_dir / "superlink.db"),
            "--disable-runtime-dependency-installation"]


def local_address(host: str) -> str:
    """Where this host reaches its own SuperLink: loopback unless bound to one address."""
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def write_cli_config(home: Path, host: str, port: int, fed) -> Path:
    """The flwr CLI's connection to our own SuperLink, from this host, with a fresh Control
    API credential (the gate refuses the Control API without it, even from this host); returns
    the credential's file for the SuperLink (:func:`deploy.superlink.write_control_credential`).
    """
    from deploy.superlink import write_control_credential

    home.mkdir(parents=True, exist_ok=True)
    conn = [f'address = "{local_address(host)}:{port}"']
    conn += ["insecure = true"] if fed is None else [
        f'root-certificates = "{fed.ca_cert.resolve()}"']
    (home / "config.toml").write_text("\n".join(
        ['[superlink]', 'default = "moma"', "", "[superlink.moma]", *conn]) + "\n")
    return write_control_credential(home, f"{local_address(host)}:{port}")


def superlink_env(env: dict, token_file: Path, fed, out_dir: Path) -> dict:
    """The SuperLink's environment: ``env`` plus the gate's credential file and, with a
    federation, its key → site name map (the gate removes both before Flower starts)."""
    from deploy.security_events import SITE_KEYS_ENV, write_site_keys
    from deploy.superlink import CONTROL_TOKEN_ENV

    env = {**env, CONTROL_TOKEN_ENV: str(token_file)}
    if fed is not None:
        env[SITE_KEYS_ENV] = str(write_site_keys(fed, out_dir / "site-keys.json"))
    return env


def serve(args: argparse.Namespace) -> int:
    out_root = args.runs_dir.resolve()
    out_dir = out_root / args.name
    teacher = args.teacher.resolve() if args.teacher else None
    registry = out_dir / "sites.json" if not args.insecure else None
    values = overrides(args, out_root, teacher, registry)
    fed = secure_setup(args)
    dashboard.check_options(args)  # a remote dashboard needs the federation
    isolation = AppUser(args.app_user)  # no --app-user: all its steps are no-ops
    if teacher is not None:
        pkg = package_teacher(teacher)  # safetensors only, hash and shapes checked
        check_student_fits(RunConfig.from_flat(values), pkg.architecture)
        if fed is not None:
            check_signed_teacher(teacher, fed)
        console.print(f"teacher {teacher.name}: {pkg.architecture.model_name}, "
                      f"sha256 {pkg.sha256[:16]}…")
    isolation.check_access(teacher, args.eval_source, out_root)
    if (out_dir / "results.json").exists() and not args.resume:
        raise ValueError(f"{out_dir}/results.json exists: pass --resume or another --name")
    lock = InstanceLock(out_dir / ".moma-server.lock", f"run folder {out_dir}")
    killed = lock.acquire()
    link = dash = None
    events = watch_events(out_dir, console.print)  # the gate's security events, as they come
    try:
        isolation.prepare(out_dir)  # before any file of root's is written
        if killed:
            console.print(f"stopped {len(killed)} leftover process(es) of a previous "
                          "moma-server of this run")
        check_port_free(args.host, args.port)
        dash = dashboard.from_options(args, args.name)  # bound now: a busy port stops here
        home = out_dir / "flwr-home"
        token_file = write_cli_config(home, args.host, args.port, fed)
        app = write_app(out_dir / "flwr-app")
        env = lock.env(flower_env(home))
        # the sites receive the run config; the coordinator's paths stay on this host
        submitted, own = coordinator_file.split(values)
        env[coordinator_file.COORDINATOR_ENV] = str(
            coordinator_file.write(out_dir / "coordinator.json", own))
        log_path = out_dir / "superlink.log"
        with open(log_path, "ab") as log:
            link = spawn(superlink_args(args, fed, out_dir) + isolation.superlink_args(),
                         superlink_env(env, token_file, fed, out_dir), stdout=log,
                         stderr=subprocess.STDOUT)
        wait_for_port(local_address(args.host).strip("[]"), args.port, args.startup_timeout,
                      link)
        console.print(f"SuperLink listening on {args.host}:{args.port} (log: {log_path})")
        if dash is not None:
            console.print(f"dashboard: {dash.start().url}")
        if fed is not None:
            names = register_sites(fed, home)
            registry.write_text(json.dumps(names, indent=2))
            console.print(f"registered sites: {', '.join(sorted(names.values()))}")
        isolation.start(env, f"{local_address(args.host)}:{args.port}",
                        fed.ca_cert if fed is not None else None)
        cmd = [executable("flwr"), "run", str(app), "moma", "--stream",
               "--run-config", run_config_arg(submitted)]
        rc, started = _wait(spawn(cmd, env))
        return run_outcome(out_dir, rc, run_status(env), started)
    finally:
        events.stop()
        if dash is not None:
            dash.close()
        isolation.stop()
        stop(link)
        kill_tagged(lock.tag)
        lock.release()


def _wait(proc: subprocess.Popen) -> tuple[int, float]:
    """The exit code of ``flwr run`` and when it was started (a live.json older than that is
    a previous run's)."""
    import time

    started = time.time()
    return proc.wait(), started


def run_outcome(out_dir: Path, rc: int, status: str, since: float = 0.0) -> int:
    """moma-server's last words and exit code, from the ServerApp's ``end`` in live.json
    (docs/deploy.md, "Exit codes"): a failed run's one ``error:`` line and its code (3: sites
    missing, 4: no round trained, 2: bad input, 1: other); a completed run's summary and 0."""
    from server.live import EXIT_FAILED, read_end
    from server.results import end_summary

    end = read_end(out_dir / "live.json", since)
    if end is not None and end.get("status") != "completed":
        print(f"error: {end.get('reason') or 'the run failed'}", file=sys.stderr)
        return int(end.get("exit_code") or EXIT_FAILED)
    if rc != 0 or status != "finished:completed":
        print(f"error: the run did not complete (run status {status}); see the lines above",
              file=sys.stderr)
        return EXIT_FAILED
    data = json.loads((out_dir / "results.json").read_text())
    for line in end_summary(data, out_dir):
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    return 0


def run_status(env: dict) -> str:
    """Status of the newest run on the SuperLink (``flwr run --stream`` exits 0 on failure)."""
    out = subprocess.run([executable("flwr"), "ls", "moma", "--format", "json"], env=env,
                         capture_output=True, text=True)
    try:
        runs = json.loads(out.stdout)["runs"]
        return max(runs, key=lambda r: r.get("pending-at", ""))["status"]
    except (json.JSONDecodeError, KeyError, ValueError):
        return f"unknown ({out.stderr.strip()[:200]})"


@run_cli
def main() -> int:
    logging.basicConfig(level=logging.INFO)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Control API call
    exit_on_sigterm()
    try:
        args = parser().parse_args()
        return dashboard.serve_only(args) if args.dashboard_only else serve(args)
    except (FileNotFoundError, TimeoutError, RuntimeError, BusyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
