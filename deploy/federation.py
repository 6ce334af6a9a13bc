"""A federation folder (the coordinator's) and a site kit (each hospital's), made by moma-deploy.

::

    FED/federation.json            server address, hosts, sites {name: public key, added, revoked}
    FED/ca/ca.crt, ca.key          the federation's CA (key 0600, folder 0700)
    FED/coordinator/               ca.crt, server.crt, server.key, teacher-signing.key/.pub
    FED/sites/<name>/              the kit: ca.crt, node.key, node.pub, coordinator.pub, site.toml
    FED/operators/<name>.crt/.key/.p12   an operator's TLS client certificate (folder 0700,
                                   key and PKCS#12 0600; federation.json "operators" lists them)

A site's kit is one folder to copy to the hospital; its ``site.toml`` names the site, the server
address and the kit's files (relative paths), and takes the site's ``data`` / ``cache-dir``.
"""

from __future__ import annotations

import json
import re
import shutil
import stat
import tomllib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from deploy import pki

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
FEDERATION_FILE = "federation.json"


class FederationError(ValueError):
    """A federation folder or site kit is missing, incomplete or inconsistent."""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def check_name(name: str) -> str:
    if not NAME.match(name):
        raise FederationError(f"site name {name!r}: use 1-64 letters, digits, '.', '_', '-' "
                              "(starting with a letter or digit)")
    return name


@dataclass
class Federation:
    root: Path
    data: dict

    # -- files -----------------------------------------------------------------------------
    @property
    def server_address(self) -> str:
        return str(self.data["server_address"])

    @property
    def ca_cert(self) -> Path:
        return self.root / "coordinator" / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca" / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "coordinator" / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.root / "coordinator" / "server.key"

    @property
    def signing_key(self) -> Path:
        return self.root / "coordinator" / "teacher-signing.key"

    @property
    def signing_public_key(self) -> Path:
        return self.root / "coordinator" / "teacher-signing.pub"

    def kit(self, name: str) -> Path:
        return self.root / "sites" / name

    def operator_files(self, name: str) -> tuple[Path, Path, Path]:
        """An operator credential's certificate, private key and PKCS#12 file."""
        d = self.root / "operators"
        return d / f"{name}.crt", d / f"{name}.key", d / f"{name}.p12"

    # -- registry --------------------------------------------------------------------------
    def active_sites(self) -> dict[str, str]:
        return {n: s["public_key"] for n, s in self.data["sites"].items() if not s["revoked"]}

    def revoked_sites(self) -> dict[str, str]:
        return {n: s["public_key"] for n, s in self.data["sites"].items() if s["revoked"]}

    def save(self) -> None:
        pki.write_file(self.root / FEDERATION_FILE,
                       (json.dumps(self.data, indent=2) + "\n").encode(), 0o644, force=True)

    @classmethod
    def load(cls, root: Path) -> Federation:
        root = Path(root).resolve()
        path = root / FEDERATION_FILE
        if not path.is_file():
            raise FederationError(f"{root}: not a federation folder (no {FEDERATION_FILE}; "
                                  "make one with moma-deploy init)")
        try:
            data = json.loads(path.read_text())
            assert isinstance(data, dict) and isinstance(data["sites"], dict)
            str(data["server_address"])
            for site in data["sites"].values():
                site["public_key"], site["revoked"]  # noqa: B018
        except (json.JSONDecodeError, AssertionError, KeyError, TypeError):
            raise FederationError(f"{path}: corrupt (not the file moma-deploy writes)") from None
        fed = cls(root, data)
        for f in (fed.ca_cert, fed.server_cert, fed.server_key):
            if not f.is_file():
                raise FederationError(f"{f} is missing")
        return fed

    # -- provisioning ----------------------------------------------------------------------
    @classmethod
    def init(cls, root: Path, hosts: list[str], port: int, sites: list[str], days: int = 825,
             force: bool = False) -> Federation:
        if not hosts:
            raise FederationError("give at least one --server-host (the name or address the "
                                  "sites connect to)")
        if not 0 < port < 65536:
            raise FederationError(f"--port {port}: not a TCP port")
        for name in sites:
            check_name(name)
        if len(set(sites)) != len(sites):
            raise FederationError("a site name is given twice")
        root = Path(root).resolve()
        fed = cls(root, {"version": 1, "server_address": f"{hosts[0]}:{port}",
                         "hosts": list(hosts), "port": port, "sites": {}})
        planned = [root / FEDERATION_FILE, fed.ca_key, root / "ca" / "ca.crt", fed.ca_cert,
                   fed.server_cert, fed.server_key, fed.signing_key, fed.signing_public_key,
                   *(fed.kit(n) / "node.key" for n in sites)]
        existing = [p for p in planned if p.exists()]
        if existing and not force:
            raise pki.ExistsError(f"{existing[0]} exists: nothing was changed (use --force to "
                                  "replace the federation's keys)")
        for d in (root / "ca", root / "coordinator"):
            d.mkdir(parents=True, exist_ok=True)
            d.chmod(0o700)
        ca, ca_key = pki.make_ca(hosts[0], days=max(days, 3650))
        pki.write_private_key(fed.ca_key, ca_key, force)
        pki.write_cert(root / "ca" / "ca.crt", ca, force)
        pki.write_cert(fed.ca_cert, ca, force)
        fed._issue_server(days, force)
        private, public = pki.signing_keypair()
        pki.write_file(fed.signing_key, private, 0o600, force)
        pki.write_file(fed.signing_public_key, public, 0o644, force)
        for name in sites:
            fed.add_site(name, force=force, save=False)
        fed.save()
        return fed

    def _issue_server(self, days: int, force: bool, not_before: datetime | None = None) -> None:
        ca = pki.load_cert(self.ca_cert)
        cert, key = pki.issue_server_cert(ca, pki.load_private_key(self.ca_key),
                                          list(self.data["hosts"]), days, not_before)
        pki.write_private_key(self.server_key, key, force)
        pki.write_cert(self.server_cert, cert, force)

    def renew_server(self, days: int = 825, not_before: datetime | None = None) -> None:
        self._issue_server(days, force=True, not_before=not_before)

    def add_site(self, name: str, force: bool = False, save: bool = True) -> Path:
        check_name(name)
        known = self.data["sites"].get(name)
        if known and not force:
            state = "revoked" if known["revoked"] else "registered"
            raise FederationError(f"site {name} is already {state} (use --force to give it a "
                                  "new key)")
        kit = self.kit(name)
        kit.mkdir(parents=True, exist_ok=True)
        kit.chmod(0o700)
        private, public = pki.node_keypair(f"moma-fl:{name}")
        pki.write_file(kit / "node.key", private, 0o600, force)
        pki.write_file(kit / "node.pub", public, 0o644, force=True)
        shutil.copyfile(self.ca_cert, kit / "ca.crt")
        shutil.copyfile(self.signing_public_key, kit / "coordinator.pub")
        (kit / "site.toml").write_text(
            f'# MoMA-FL site kit for {name}: moma-client --kit <this folder>\n'
            f'site-name = "{name}"\nserver = "{self.server_address}"\n'
            'root-certificates = "ca.crt"\nauth-key = "node.key"\n'
            'teacher-signer = "coordinator.pub"\n\n# This site\'s own settings:\n'
            '# data = "/path/to/your/images"\n# cache-dir = "/var/lib/moma"\n')
        self.data["sites"][name] = {"public_key": public.decode().strip(), "added": _now(),
                                    "revoked": None}
        if save:
            self.save()
        return kit

    # -- operators -------------------------------------------------------------------------
    def add_operator(self, name: str, days: int = 825, force: bool = False,
                     save: bool = True) -> tuple[Path, str]:
        """A TLS client certificate for an operator (the dashboard's remote browsers): returns
        the PKCS#12 file and its password (random; printed once by moma-deploy, stored
        nowhere)."""
        check_name(name)
        known = self.data.setdefault("operators", {}).get(name)
        if known and not force:
            raise FederationError(f"operator {name} already exists (use --force to give it a "
                                  "new certificate)")
        crt, key_path, p12 = self.operator_files(name)
        crt.parent.mkdir(parents=True, exist_ok=True)
        crt.parent.chmod(0o700)
        ca = pki.load_cert(self.ca_cert)
        cert, key = pki.issue_operator_cert(ca, pki.load_private_key(self.ca_key), name, days)
        data, password = pki.operator_pkcs12(name, cert, key, ca)
        pki.write_private_key(key_path, key, force)
        pki.write_file(p12, data, 0o600, force)
        pki.write_cert(crt, cert, force=True)
        self.data["operators"][name] = {"serial": format(cert.serial_number, "x"),
                                        "added": _now(), "revoked": None}
        if save:
            self.save()
        return p12, password

    def revoke_operator(self, name: str) -> None:
        op = self.data.get("operators", {}).get(name)
        if op is None:
            raise FederationError(f"no operator {name!r} in {self.root}")
        if not op["revoked"]:
            op["revoked"] = _now()
            self.save()

    def operator_name(self, cert) -> str | None:
        """:func:`deploy.pki.operator_name` against this federation's CA, and the certificate
        must be the one last issued to a not revoked operator of this federation."""
        from cryptography import x509

        name = pki.operator_name(cert, self.ca_cert)
        op = self.data.get("operators", {}).get(name or "")
        if name is None or op is None or op["revoked"]:
            return None
        if isinstance(cert, bytes | bytearray | memoryview):
            cert = x509.load_der_x509_certificate(bytes(cert))
        return name if format(cert.serial_number, "x") == op["serial"] else None

    def revoke_site(self, name: str) -> None:
        site = self.data["sites"].get(name)
        if site is None:
            raise FederationError(f"no site {name!r} in {self.root}")
        if not site["revoked"]:
            site["revoked"] = _now()
            self.save()


@dataclass(frozen=True)
class SiteKit:
    root: Path
    site_name: str
    server: str
    ca_cert: Path
    node_key: Path
    node_public_key: Path
    teacher_signer: Path
    settings: dict

    @classmethod
    def load(cls, root: Path) -> SiteKit:
        root = Path(root).resolve()
        toml = root / "site.toml"
        if not toml.is_file():
            raise FederationError(f"{root}: not a site kit (no site.toml; the coordinator "
                                  "makes kits with moma-deploy)")
        try:
            cfg = tomllib.loads(toml.read_text())
            name, server = check_name(str(cfg["site-name"])), str(cfg["server"])
            files = {k: root / str(cfg[k]) for k in
                     ("root-certificates", "auth-key", "teacher-signer")}
        except (tomllib.TOMLDecodeError, KeyError) as exc:
            raise FederationError(f"{toml}: incomplete or not TOML ({exc})") from None
        for f in files.values():
            if not f.is_file():
                raise FederationError(f"{f} is missing from the kit")
        key = files["auth-key"]
        if key.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise FederationError(f"{key} is readable by other users: chmod 600 {key}")
        return cls(root, name, server, files["root-certificates"], key,
                   key.with_suffix(".pub"), files["teacher-signer"], cfg)
