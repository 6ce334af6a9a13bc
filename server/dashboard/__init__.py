"""A read-only web dashboard of ``moma-server``'s runs: the run in progress (sites online, the
round under way, per-round metrics, loss terms, bytes, ε, failures, the teacher) and the other
runs of its runs folder, read from what the ServerApp writes there. See docs/dashboard.md."""

import sys

from server.dashboard.auth import DashboardError, is_loopback
from server.dashboard.data import list_runs, run_state
from server.dashboard.http import Dashboard

DEFAULT_PORT = 8470

__all__ = ["DEFAULT_PORT", "Dashboard", "DashboardError", "is_loopback", "list_runs", "run_state"]


def add_options(p) -> None:
    """``moma-server``'s dashboard options (on an ``argparse.ArgumentParser``)."""
    g = p.add_argument_group("dashboard (read-only web page of the runs; docs/dashboard.md)")
    g.add_argument("--dashboard-host", default="127.0.0.1",
                   help="address of the dashboard; another than loopback needs --federation "
                        "(HTTPS, operator certificates from moma-deploy only)")
    g.add_argument("--dashboard-port", type=int,
                   help=f"the dashboard's port (default {DEFAULT_PORT}; when that one is busy, "
                        "e.g. by another moma-server's dashboard, a warning and no dashboard; a "
                        "busy port given here is an error)")
    g.add_argument("--no-dashboard", action="store_true", help="serve no dashboard")
    g.add_argument("--dashboard-only", action="store_true",
                   help="serve the dashboard of --runs-dir and run no federation (until "
                        "interrupted)")


def check_options(args) -> None:
    """Refuse dashboard options that cannot work (one line), before anything starts."""
    from server.dashboard.auth import check_bind

    if not args.no_dashboard:
        check_bind(args.dashboard_host, args.federation)


def from_options(args, current: str | None) -> Dashboard | None:
    """The dashboard ``args`` ask for, bound (not yet serving), or None (``--no-dashboard``)."""
    from deploy.lifecycle import BusyError

    if args.no_dashboard:
        return None
    try:
        return Dashboard(args.runs_dir, args.dashboard_host,
                         args.dashboard_port or DEFAULT_PORT, args.federation, current)
    except BusyError as exc:
        if args.dashboard_port is not None:
            raise
        print(f"warning: {exc}; this run has none", file=sys.stderr, flush=True)
        return None


def serve_only(args) -> int:
    """``moma-server --dashboard-only``: the dashboard of ``--runs-dir`` until interrupted."""
    import threading

    check_options(args)
    dash = Dashboard(args.runs_dir, args.dashboard_host, args.dashboard_port or DEFAULT_PORT,
                     args.federation, None)
    with dash:
        print(f"dashboard: {dash.url} (runs in {dash.runs_dir}; Ctrl-C to stop)", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
    return 0
