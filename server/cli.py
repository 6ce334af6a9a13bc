"""``moma-server``: start a Flower SuperLink and run the MoMA-FL ServerApp on it.

Validates the teacher, writes ``runs/<name>/`` (results.json, checkpoints, curves, report), and
stops the SuperLink it started when the run ends. TLS needs ``--ssl-ca-certfile``,
``--ssl-certfile`` and ``--ssl-keyfile``; plaintext needs an explicit ``--insecure``.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path

from deploy.runtime import executable, exit_on_sigterm, flower_env, stop, wait_for_port
from moma_core.cli.common import run_cli
from moma_core.config import RunConfig
from moma_core.progress import console
from server.flwr_app import run_config_arg, write_app
from server.teacher_package import package_teacher


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moma-server", description=__doc__.splitlines()[0])
    p.add_argument("--teacher", type=Path, help="teacher .safetensors (not needed for ce)")
    p.add_argument("--name", default="federation", help="run name: results in runs/<name>/")
    p.add_argument("--runs-dir", type=Path, default=Path("runs"))
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to accept remote sites")
    p.add_argument("--port", type=int, default=9092)
    p.add_argument("--insecure", action="store_true", help="plaintext gRPC (testing only)")
    p.add_argument("--ssl-ca-certfile", type=Path)
    p.add_argument("--ssl-certfile", type=Path)
    p.add_argument("--ssl-keyfile", type=Path)
    p.add_argument("--rounds", type=int, help="number of rounds")
    p.add_argument("--classes", help="comma-separated target classes (default: the synthetic "
                                     "target task)")
    p.add_argument("--eval-source", default="",
                   help="coordinator's held-out set (path or synthetic:target)")
    p.add_argument("--eval-sites", type=int, default=1,
                   help="synthetic eval-source: number of site styles to mix")
    p.add_argument("--run-config", default="",
                   help="more run settings, 'key=value key2=\"text\"' (pyproject keys)")
    p.add_argument("--resume", action="store_true", help="continue runs/<name>/")
    p.add_argument("--startup-timeout", type=float, default=60.0)
    return p


def overrides(args: argparse.Namespace, out_root: Path, teacher: Path | None) -> dict:
    from moma_core.data.synthetic import TARGET_CLASSES

    values: dict = {"run-name": args.name, "output-dir": str(out_root),
                    "teacher-path": str(teacher or ""), "eval-source": args.eval_source,
                    "eval-sites": args.eval_sites, "resume": args.resume,
                    "classes": args.classes or ",".join(TARGET_CLASSES)}
    if args.rounds:
        values["num-rounds"] = args.rounds
    RunConfig.from_flat(values)  # validate before anything starts
    return values


def tls_args(args: argparse.Namespace) -> list[str]:
    if args.insecure:
        console.print("[yellow]warning: --insecure: traffic to the sites is not encrypted")
        return ["--insecure"]
    files = [args.ssl_ca_certfile, args.ssl_certfile, args.ssl_keyfile]
    if not all(files):
        raise ValueError("TLS needs --ssl-ca-certfile, --ssl-certfile and --ssl-keyfile "
                         "(or pass --insecure explicitly for a plaintext test setup)")
    for f in files:
        if not f.is_file():
            raise ValueError(f"{f}: no such file")
    return ["--ssl-ca-certfile", str(args.ssl_ca_certfile), "--ssl-certfile",
            str(args.ssl_certfile), "--ssl-keyfile", str(args.ssl_keyfile)]


def serve(args: argparse.Namespace) -> int:
    out_root = args.runs_dir.resolve()
    out_dir = out_root / args.name
    teacher = args.teacher.resolve() if args.teacher else None
    if teacher is not None:
        pkg = package_teacher(teacher)
        console.print(f"teacher {teacher.name}: {pkg.architecture.model_name}, "
                      f"sha256 {pkg.sha256[:16]}…")
    values = overrides(args, out_root, teacher)
    if (out_dir / "results.json").exists() and not args.resume:
        raise ValueError(f"{out_dir}/results.json exists: pass --resume or another --name")
    home = out_dir / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    app = write_app(out_dir / "flwr-app")
    tls = tls_args(args)
    address = f"{'127.0.0.1' if args.host == '0.0.0.0' else args.host}:{args.port}"
    conn = [f'address = "{address}"']
    conn += ["insecure = true"] if args.insecure else [
        f'root-certificates = "{args.ssl_ca_certfile.resolve()}"']
    (home / "config.toml").write_text("\n".join(
        ['[superlink]', 'default = "moma"', "", "[superlink.moma]", *conn]) + "\n")
    env = flower_env(home)
    log_path = out_dir / "superlink.log"
    link = None
    try:
        with open(log_path, "ab") as log:
            link = subprocess.Popen(
                [executable("flower-superlink"), *tls, "--host", args.host, "--port",
                 str(args.port), "--database", str(out_dir / "superlink.db"),
                 "--disable-runtime-dependency-installation"],
                env=env, stdout=log, stderr=subprocess.STDOUT)
        wait_for_port(address.split(":")[0], args.port, args.startup_timeout, link)
        console.print(f"SuperLink listening on {args.host}:{args.port} (log: {log_path})")
        cmd = [executable("flwr"), "run", str(app), "moma", "--stream",
               "--run-config", run_config_arg({**values, **_parse_kv(args.run_config)})]
        rc = subprocess.call(cmd, env=env)
        status = run_status(env)
        console.print(f"run status: {status}")
        if rc != 0 or status != "finished:completed":
            return 1
        final = json.loads((out_dir / "results.json").read_text())["final"]
        console.print(f"best round {final['best_round']}: {final['metrics']}")
        return 0
    finally:
        stop(link)


def run_status(env: dict) -> str:
    """Status of the newest run on the SuperLink (``flwr run --stream`` exits 0 on failure)."""
    out = subprocess.run([executable("flwr"), "ls", "moma", "--format", "json"], env=env,
                         capture_output=True, text=True)
    try:
        runs = json.loads(out.stdout)["runs"]
        return max(runs, key=lambda r: r.get("pending-at", ""))["status"]
    except (json.JSONDecodeError, KeyError, ValueError):
        return f"unknown ({out.stderr.strip()[:200]})"


def _parse_kv(text: str) -> dict:
    import shlex
    import tomllib

    values = {}
    for item in shlex.split(text, posix=False):
        values.update(tomllib.loads(item))
    return values


@run_cli
def main() -> int:
    logging.basicConfig(level=logging.INFO)
    exit_on_sigterm()
    try:
        return serve(parser().parse_args())
    except (FileNotFoundError, TimeoutError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
