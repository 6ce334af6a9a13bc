"""``moma-client``: check this site's data, then start a Flower SuperNode for it.

The data path, cache directory and device are this site's own settings; they go into the
SuperNode's node config and are never taken from the coordinator. The data is validated (and
its class counts shown) before anything connects.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from deploy.runtime import executable, exit_on_sigterm, flower_env, stop
from moma_core.cli.common import run_cli
from moma_core.progress import console
from moma_core.sources import open_site_data


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moma-client", description=__doc__.splitlines()[0])
    p.add_argument("--server", required=True, help="coordinator address host:port")
    p.add_argument("--data", required=True,
                   help="ImageFolder dir, .csv manifest, .npz, or synthetic:target")
    p.add_argument("--cache-dir", type=Path, required=True,
                   help="teacher cache and private site state (never sent)")
    p.add_argument("--site-name", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--insecure", action="store_true", help="plaintext gRPC (testing only)")
    p.add_argument("--root-certificates", type=Path, help="CA certificate of the coordinator")
    p.add_argument("--clientappio-port", type=int, default=9094,
                   help="local port of this SuperNode's app runtime (one per SuperNode)")
    p.add_argument("--max-retries", type=int, default=None,
                   help="give up after this many reconnection attempts (default: forever)")
    p.add_argument("--max-wait-time", type=float, default=None)
    g = p.add_argument_group("synthetic data")
    g.add_argument("--site-index", type=int, default=None)
    g.add_argument("--num-sites", type=int, default=3)
    g.add_argument("--n", type=int, default=800)
    p.add_argument("--skip-bad-images", action="store_true")
    p.add_argument("--check-only", action="store_true", help="validate the data and exit")
    return p


def node_config(args: argparse.Namespace) -> str:
    data = args.data if args.data.startswith("synthetic:") else str(Path(args.data).resolve())
    values = {"data-path": data, "cache-dir": str(args.cache_dir.resolve()),
              "device": args.device, "site-name": args.site_name or args.cache_dir.name,
              "num-sites": args.num_sites, "n": args.n,
              "skip-bad-images": "true" if args.skip_bad_images else "false"}
    if args.site_index is not None:
        values["site-index"] = args.site_index
    return " ".join(f'{k}="{v}"' if isinstance(v, str) else f"{k}={v}"
                    for k, v in values.items())


def check_data(args: argparse.Namespace) -> dict:
    data = open_site_data(args.data, seed=0, n=args.n, site_index=args.site_index,
                          num_sites=args.num_sites,
                          on_error="skip" if args.skip_bad_images else "raise")
    counts = data.counts()
    console.print(f"site data {args.data}: {len(data.train)} train / {len(data.val)} val")
    for split, per_class in counts.items():
        console.print(f"  {split}: " + ", ".join(f"{c}={n}" for c, n in per_class.items()))
    skipped = getattr(getattr(data.train, "base", None), "skipped", [])
    if skipped:
        console.print(f"[yellow]skipped {len(skipped)} unreadable images")
    return counts


def start(args: argparse.Namespace) -> int:
    check_data(args)
    if args.check_only:
        return 0
    if args.insecure:
        console.print("[yellow]warning: --insecure: traffic to the coordinator is not encrypted")
        tls = ["--insecure"]
    elif args.root_certificates is not None:
        if not args.root_certificates.is_file():
            raise ValueError(f"{args.root_certificates}: no such file")
        tls = ["--root-certificates", str(args.root_certificates)]
    else:
        raise ValueError("TLS needs --root-certificates (or --insecure for a plaintext test)")
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    cmd = [executable("flower-supernode"), *tls, "--superlink", args.server,
           "--port", str(args.clientappio_port),
           "--node-config", node_config(args)]
    if args.max_retries is not None:
        cmd += ["--max-retries", str(args.max_retries)]
    if args.max_wait_time is not None:
        cmd += ["--max-wait-time", str(args.max_wait_time)]
    env = flower_env(args.cache_dir / "flwr-home")
    console.print(f"connecting to {args.server} as {args.site_name or args.cache_dir.name}")
    proc = subprocess.Popen(cmd, env=env)  # same process group: dies with moma-client
    try:
        return proc.wait()
    except KeyboardInterrupt:
        return 130
    finally:
        stop(proc)


@run_cli
def main() -> int:
    exit_on_sigterm()
    try:
        return start(parser().parse_args())
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
