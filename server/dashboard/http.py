"""The dashboard's HTTP server: the page and its assets (shipped in this package: it works
offline) and two read-only JSON endpoints, ``/api/runs`` and ``/api/run/<name>``, which the page
polls. Standard library only; one thread per request, in the background of ``moma-server``."""

from __future__ import annotations

import errno
import json
import logging
import socket
import ssl
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from urllib.parse import unquote, urlsplit

from server.dashboard import auth, data

log = logging.getLogger(__name__)

ASSETS = {"/": ("dashboard.html", "text/html; charset=utf-8"),
          "/static/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
          "/static/dashboard.css": ("dashboard.css", "text/css; charset=utf-8")}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
           "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY",
           "Cache-Control": "no-store"}


def asset(name: str) -> bytes:
    return resources.files("server.dashboard").joinpath("static", name).read_bytes()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 32

    def __init__(self, address: tuple[str, int], dashboard: Dashboard) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.dashboard = dashboard
        super().__init__(address, _Handler)

    def get_request(self):  # the TLS handshake runs in the request's thread, not here
        sock, addr = super().get_request()
        if self.dashboard.tls is not None:
            sock = self.dashboard.tls.wrap_socket(sock, server_side=True,
                                                  do_handshake_on_connect=False)
        return sock, addr

    def handle_error(self, request, client_address) -> None:
        log.debug("dashboard: request from %s failed", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    server_version = "moma-dashboard"
    sys_version = ""
    timeout = 15
    operator: str | None = None

    def setup(self) -> None:
        super().setup()
        if isinstance(self.connection, ssl.SSLSocket):
            try:
                self.connection.do_handshake()
            except (OSError, ssl.SSLError) as exc:  # no or a foreign client certificate
                log.info("dashboard: TLS refused %s (%s)", self.client_address[0], exc)
                self.close_connection = True
                raise ConnectionAbortedError from None

    def handle(self) -> None:
        try:
            super().handle()
        except (ConnectionError, TimeoutError, ssl.SSLError):
            pass

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the stdlib's name
        log.debug("dashboard: " + format, *args)

    @property
    def dashboard(self) -> Dashboard:
        return self.server.dashboard  # type: ignore[attr-defined]

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in HEADERS.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: HTTPStatus, text: str) -> None:
        self._send(status, (text + "\n").encode(), "text/plain; charset=utf-8")

    def _allowed(self) -> bool:
        if self.dashboard.tls is not None:
            self.operator = auth.operator_name(self.connection.getpeercert(binary_form=True),
                                               self.dashboard.federation)
            if self.operator is None:
                log.info("dashboard: refused %s: not an operator certificate",
                         self.client_address[0])
                self._error(HTTPStatus.FORBIDDEN, "forbidden: an operator certificate "
                            "(moma-deploy add-operator) is required")
                return False
            return True
        if not auth.host_header_ok(self.headers.get("Host")):
            self._error(HTTPStatus.FORBIDDEN, "forbidden: use http://127.0.0.1:<port>/")
            return False
        return True

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        if not self._allowed():
            return
        path = urlsplit(self.path).path
        if path in ASSETS:
            name, ctype = ASSETS[path]
            self._send(HTTPStatus.OK, asset(name), ctype)
        elif path == "/favicon.ico":
            self._send(HTTPStatus.NO_CONTENT, b"", "image/x-icon")
        elif path == "/api/runs":
            self._json({"runs": data.list_runs(self.dashboard.runs_dir),
                        "current": self.dashboard.current})
        elif path.startswith("/api/run/"):
            folder = data.run_folder(self.dashboard.runs_dir, unquote(path[len("/api/run/"):]))
            if folder is None:
                self._error(HTTPStatus.NOT_FOUND, "no such run")
            else:
                self._json(data.run_state(folder, self.dashboard.federation))
        else:
            self._error(HTTPStatus.NOT_FOUND, "not found")

    do_HEAD = do_GET  # noqa: N815

    def _refuse_method(self) -> None:
        self._error(HTTPStatus.METHOD_NOT_ALLOWED, "read-only")

    do_POST = do_PUT = do_DELETE = do_PATCH = _refuse_method  # noqa: N815

    def _json(self, payload: dict) -> None:
        body = json.dumps(payload, allow_nan=False, separators=(",", ":")).encode()
        self._send(HTTPStatus.OK, body, "application/json")


class Dashboard:
    """The dashboard, bound at construction (a busy port fails here, before anything else
    starts) and served from :meth:`start` until :meth:`close`."""

    def __init__(self, runs_dir: Path, host: str = "127.0.0.1", port: int = 8470,
                 federation: Path | None = None, current: str | None = None) -> None:
        auth.check_bind(host, federation)
        self.runs_dir = Path(runs_dir).resolve()
        self.federation = Path(federation).resolve() if federation is not None else None
        self.current = current
        self.host = host
        self.tls = None if auth.is_loopback(host) else auth.tls_context(self.federation)
        try:
            self._server = _Server((host, port), self)
        except OSError as exc:
            from deploy.lifecycle import BusyError

            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                raise BusyError(f"dashboard port {port} on {host} is already in use: choose "
                                "another --dashboard-port, or --no-dashboard") from None
            raise auth.DashboardError(f"dashboard: cannot listen on {host}:{port} "
                                      f"({exc.strerror})") from None
        self.port = self._server.server_address[1]
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        if host in ("0.0.0.0", "[::]"):
            host = socket.getfqdn()
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}/"

    def start(self) -> Dashboard:
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.5},
                                        name="moma-dashboard", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(10)
        self._server.server_close()

    def __enter__(self) -> Dashboard:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
