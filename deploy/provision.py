"""``moma-deploy``: make a federation folder and one kit per site (see :mod:`deploy.federation`).

  moma-deploy init FED --server-host HOST [--server-host IP …] [--port 9092] --site NAME …
                                         [--operator NAME]  (default: operator)
  moma-deploy add-site FED NAME          a new kit (FED/sites/NAME) and registry entry
  moma-deploy add-operator FED NAME      an operator's TLS client certificate (FED/operators/)
  moma-deploy revoke-operator FED NAME   the operator's certificate is refused from now on
  moma-deploy revoke-site FED NAME       the site's key is refused from moma-server's next start
  moma-deploy renew-server FED           a new SuperLink certificate from the same CA
  moma-deploy list FED                   sites, key fingerprints, certificate expiry
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import sys
from pathlib import Path

from deploy import pki
from deploy.federation import Federation
from moma_core.cli.common import DefaultsHelpFormatter


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moma-deploy", description=__doc__.splitlines()[0],
                                formatter_class=DefaultsHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    fmt = {"formatter_class": DefaultsHelpFormatter}
    init = sub.add_parser("init", **fmt, help="create a federation folder, its CA, keys and kits")
    init.add_argument("folder", type=Path)
    init.add_argument("--server-host", action="append", default=[],
                      help="name or IP address the sites use to reach the coordinator "
                           "(repeat for several; the first is written into the kits)")
    init.add_argument("--port", type=int, default=9092)
    init.add_argument("--site", action="append", default=[], help="a site's name (repeat)")
    init.add_argument("--days", type=int, default=825, help="server certificate lifetime")
    init.add_argument("--operator", default="operator",
                      help="name of the first operator credential (TLS client certificate)")
    init.add_argument("--force", action="store_true", help="replace existing keys")
    add = sub.add_parser("add-site", **fmt, help="a new site kit")
    add.add_argument("folder", type=Path)
    add.add_argument("name")
    add.add_argument("--force", action="store_true", help="give an existing site a new key")
    rev = sub.add_parser("revoke-site", **fmt, help="refuse a site's key from now on")
    rev.add_argument("folder", type=Path)
    rev.add_argument("name")
    op = sub.add_parser("add-operator", **fmt,
                        help="an operator's TLS client certificate (browser: the .p12)")
    op.add_argument("folder", type=Path)
    op.add_argument("name")
    op.add_argument("--days", type=int, default=825, help="certificate lifetime")
    op.add_argument("--force", action="store_true", help="re-issue an existing operator's")
    rop = sub.add_parser("revoke-operator", **fmt, help="refuse an operator's certificate")
    rop.add_argument("folder", type=Path)
    rop.add_argument("name")
    ren = sub.add_parser("renew-server", **fmt, help="re-issue the SuperLink certificate")
    ren.add_argument("folder", type=Path)
    ren.add_argument("--days", type=int, default=825)
    ls = sub.add_parser("list", **fmt, help="sites and certificate expiry")
    ls.add_argument("folder", type=Path)
    return p


def fingerprint(openssh_line: str) -> str:
    blob = base64.b64decode(openssh_line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def print_operator(fed: Federation, name: str, p12: Path, password: str) -> None:
    crt, key, _ = fed.operator_files(name)
    print(f"operator {name}: {crt}, {key} (0600); for a browser: {p12} (0600)")
    print(f"PKCS#12 password (shown once, stored nowhere): {password}")


def run(args: argparse.Namespace) -> int:
    if args.command == "init":
        fed = Federation.init(args.folder, args.server_host, args.port, args.site, args.days,
                              args.force)
        p12, password = fed.add_operator(args.operator, force=args.force)
        print(f"federation {fed.root}: server {fed.server_address}, "
              f"{len(args.site)} site kit(s) in {fed.root / 'sites'}")
        print_operator(fed, args.operator, p12, password)
        print("give each site its kit folder (sites/<name>); keep ca/, coordinator/ and "
              "operators/ here")
        return 0
    fed = Federation.load(args.folder)
    if args.command == "add-operator":
        p12, password = fed.add_operator(args.name, args.days, force=args.force)
        print_operator(fed, args.name, p12, password)
    elif args.command == "revoke-operator":
        fed.revoke_operator(args.name)
        print(f"operator {args.name} revoked: its certificate is refused from now on")
    elif args.command == "add-site":
        print(f"kit for {args.name}: {fed.add_site(args.name, force=args.force)}")
    elif args.command == "revoke-site":
        fed.revoke_site(args.name)
        print(f"site {args.name} revoked: moma-server refuses its key from its next start")
    elif args.command == "renew-server":
        fed.renew_server(args.days)
        print(f"new server certificate {fed.server_cert}")
    else:
        for cert in (fed.ca_cert, fed.server_cert):
            end = pki.load_cert(cert).not_valid_after_utc
            print(f"{cert.name}: valid until {end:%Y-%m-%d}")
        for name, site in sorted(fed.data["sites"].items()):
            state = f"revoked {site['revoked']}" if site["revoked"] else "active"
            print(f"{name}\t{state}\t{fingerprint(site['public_key'])}")
        for name, op in sorted(fed.data.get("operators", {}).items()):
            state = f"revoked {op['revoked']}" if op["revoked"] else "active"
            print(f"operator {name}\t{state}\tserial {op['serial']}")
    return 0


def main() -> int:
    try:
        return run(parser().parse_args())
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
