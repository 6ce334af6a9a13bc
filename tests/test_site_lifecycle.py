"""Sites that stay up: two studies in a row on one federation (TLS, site authentication, real
SuperLink and SuperNodes on loopback), the same two ``moma-client`` processes throughout.

When a coordinator's study ends and the next starts (a new SuperLink state: the sites' old
node IDs are unknown to it, Flower answers their heartbeat with 401 and the SuperNode exits 0),
each site says what happened in its log and connects again; the second study trains with both
sites without anyone touching them. (Unit tests of the loop itself: tests/test_site_rejoin.py.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.federation import Federation
from deploy.lifecycle import stop_groups
from deploy.runtime import free_port
from moma_protocol.coordinator_file import coordinator_keys
from tests.helpers import IMAGE_SIZE, TARGET_CLASSES, tiny_teacher

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
CEILING = 900.0
SMALL = (f"image-size={IMAGE_SIZE} batch-size=16 queue-size=64 optimizer=\"adamw\" "
         "lr=0.003 augment=\"flip\" min-available-nodes=2 min-train-nodes=2 "
         "round-timeout=600.0")
ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}


def _study(fed: Federation, teacher: Path, runs: Path, port: int, name: str,
           log: Path) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "moma-server"), "--federation", str(fed.root), "--teacher", str(teacher),
           "--name", name, "--runs-dir", str(runs), "--port", str(port), "--rounds", "1",
           "--classes", ",".join(TARGET_CLASSES), "--run-config", SMALL]
    with open(log, "wb") as out:
        return subprocess.run(cmd, env=ENV, stdout=out, stderr=subprocess.STDOUT,
                              timeout=CEILING)


def _run_config(database: Path) -> dict:
    """The run config the SuperLink holds for its (one) run: what every site receives, over
    the app's defaults."""
    from flwr.superlink.config_loader import (
        get_federation_manager,
        get_objectstore_linkstate_factories,
    )

    _, factory = get_objectstore_linkstate_factories(str(database), get_federation_manager())
    (run,) = factory.state().get_run_info()
    return dict(run.override_config)


@pytest.mark.timeout(2400)
def test_sites_stay_up_across_two_studies(tmp_path):
    port = free_port()
    fed = Federation.init(tmp_path / "fed", ["127.0.0.1"], port, ["site-a", "site-b"])
    teacher = tiny_teacher(tmp_path / "teacher.safetensors")
    signed = subprocess.run([str(BIN / "moma-teacher"), "sign", str(teacher), "--key",
                             str(fed.signing_key)], env=ENV, capture_output=True, text=True,
                            timeout=CEILING)
    assert signed.returncode == 0, signed.stderr[-2000:]
    runs, logs = tmp_path / "runs", tmp_path / "logs"
    logs.mkdir()
    sites: dict[str, subprocess.Popen] = {}
    try:
        for i, name in enumerate(("site-a", "site-b")):
            sites[name] = subprocess.Popen(
                [str(BIN / "moma-client"), "--kit", str(fed.kit(name)), "--data",
                 "synthetic:target", "--site-index", str(i), "--num-sites", "2", "--n", "48",
                 "--cache-dir", str(tmp_path / f"cache-{name}"), "--clientappio-port",
                 str(free_port())],
                env=ENV, stdout=open(logs / f"{name}.log", "wb"), stderr=subprocess.STDOUT,
                start_new_session=True)

        def site_log(name: str) -> str:
            return (logs / f"{name}.log").read_text(errors="replace")

        def said(name: str) -> str:  # the console wraps long lines
            return " ".join(site_log(name).split())

        for study in ("study-1", "study-2"):
            done = _study(fed, teacher, runs, port, study, logs / f"{study}.log")
            text = (logs / f"{study}.log").read_text(errors="replace")
            assert done.returncode == 0, (study, text[-4000:],
                                          {n: site_log(n)[-3000:] for n in sites})
            rounds = json.loads((runs / study / "results.json").read_text())["rounds"]
            trained = sorted(s["site_name"] for s in rounds[0]["sites"].values()
                             if s["status"] == "ok")
            assert trained == ["site-a", "site-b"], (study, rounds[0]["sites"])
            for name, proc in sites.items():  # the coordinator's end did not end the sites
                assert proc.poll() is None, (study, name, site_log(name)[-3000:])
            # the run config the sites were sent (the SuperLink's record of the run) holds
            # none of the coordinator's settings: they stayed in its coordinator.json
            sent = _run_config(runs / study / "superlink.db")
            assert sent["classes"] == ",".join(TARGET_CLASSES) and sent["run-name"] == study
            assert not set(sent) & coordinator_keys(), sent
            assert str(tmp_path) not in json.dumps(sent), sent

        # each site said, in its own log, that the coordinator let it go and that it stays up
        for name in sites:
            assert "this site stays up and connects again" in said(name), \
                site_log(name)[-3000:]
    finally:
        stop_groups(sites.values())
