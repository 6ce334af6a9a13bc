"""The site's launchers that the SuperNode starts by bare name (moma-client puts them first on
its PATH): the guarded ClientApp runner and a quiet ``flower-superexec``."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest

from client.app_guard import write_launcher
from deploy.runtime import free_port


@pytest.mark.parametrize("after_s", [0.5, 2.0, 5.0])
def test_superexec_stopped_while_starting_leaves_no_traceback(tmp_path, after_s):
    """The SuperNode's superexec is told to stop (SIGINT from its parent monitor, which runs
    once Flower is imported) when a site cannot join; whenever that lands, during the import or
    after, the site's output holds no traceback."""
    launcher = write_launcher(tmp_path / "bin").parent / "flower-superexec"
    proc = subprocess.Popen([str(launcher), "--insecure", "--runtime-api-address",
                             f"127.0.0.1:{free_port()}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(after_s)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=600)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-2000:]


def test_launchers_are_written_for_this_interpreter(tmp_path):
    import sys

    first = write_launcher(tmp_path / "bin")
    for name in ("flwr-clientapp", "flower-superexec"):
        text = (tmp_path / "bin" / name).read_text()
        assert text.startswith(f"#!{sys.executable}\n"), name
        assert (tmp_path / "bin" / name).stat().st_mode & 0o111, name
    assert first.name == "flwr-clientapp"
