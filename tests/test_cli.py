"""The standalone commands: moma-teacher and moma-distill, end to end on tiny settings."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from moma_core.checkpoint import load_model

BIN = Path(sys.executable).parent
TINY = ["--image-size", "32", "--batch-size", "16", "--device", "cpu", "--optimizer", "adamw",
        "--lr", "0.003", "--augment", "flip"]


def _run(*args):
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    r = _run(BIN / "moma-teacher", "--model", "test_efficientnet", "--n", "64", "--epochs", "1",
             "--out", out, *TINY)
    assert r.returncode == 0, r.stderr
    return out


def test_teacher_file_and_sidecar(teacher):
    model, arch, sidecar = load_model(teacher)
    assert arch.model_name == "test_efficientnet" and len(arch.classes) == 4
    assert arch.image_size == 32 and len(sidecar["sha256"]) == 64
    assert 0.0 <= sidecar["meta"]["val_accuracy"] <= 1.0


def test_distill_writes_results_plot_and_student(teacher, tmp_path):
    r = _run(BIN / "moma-distill", "--teacher", teacher, "--n", "48", "--epochs", "2",
             "--queue-size", "64", "--runs-dir", tmp_path, "--name", "d", "--test-n", "40",
             *TINY)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "d"
    results = json.loads((out / "results.json").read_text())
    assert [h["epoch"] for h in results["history"]] == [1, 2]
    assert results["final"]["test"]["num_examples"] == 40
    assert results["objective"]["kind"] == "moma"
    assert (out / "curves.png").stat().st_size > 1000
    _, arch, _ = load_model(out / "student.safetensors")
    assert arch.classes == ("benign", "grade_1", "grade_2", "grade_3")


def test_bad_input_fails_with_one_clear_line(call, teacher, tmp_path):
    r = call("moma-distill", "--teacher", teacher, "--source", tmp_path / "nowhere",
             "--runs-dir", tmp_path, *TINY)
    assert r.returncode == 2 and "no such file or directory" in r.stderr
    assert "Traceback" not in r.stderr
    pickle = tmp_path / "t.pt"
    pickle.write_bytes(b"\x80\x04junk")
    r = call("moma-distill", "--teacher", pickle, "--runs-dir", tmp_path, *TINY)
    assert r.returncode == 2 and "refusing to load a pickle" in r.stderr


def _help(monkeypatch, capsys, main, argv: list[str]) -> str:
    """``--help`` of a command's ``main`` in-process, whitespace collapsed (argparse wraps)."""
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as done:
        main()
    assert done.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def _main(command: str):
    import importlib

    module = {"moma-server": "server.cli", "moma-client": "client.cli",
              "moma-teacher": "moma_core.cli.teacher", "moma-distill": "moma_core.cli.distill",
              "moma-eval": "moma_core.cli.evaluate", "moma-deploy": "deploy.provision"}[command]
    return importlib.import_module(module).main


@pytest.mark.parametrize("argv,default", [
    (["moma-server", "--help"], "--port PORT the SuperLink's one port (default: 9092)"),
    (["moma-client", "--help"], "(default: 9094)"),  # --clientappio-port
    (["moma-client", "privacy", "--help"], None),
    (["moma-teacher", "--help"], "--model MODEL timm model name (default: efficientnet_b0)"),
    (["moma-teacher", "sign", "--help"], None),
    (["moma-distill", "--help"], "alone) (default: moma)"),  # --objective {ce,kd,moma,crckd}
    (["moma-distill", "--help"], "--batch-size BATCH_SIZE local batch size (default: 32)"),
    (["moma-eval", "--help"], "--batch-size BATCH_SIZE (default: 128)"),
    (["moma-deploy", "init", "--help"], "--port PORT (default: 9092)"),
])
def test_help_names_the_defaults(monkeypatch, capsys, argv, default):
    """``--help`` shows each option's default, options without a help text included; the
    unset, off and empty ones say nothing rather than '(default: None)'."""
    shown = _help(monkeypatch, capsys, _main(argv[0]), argv)
    if default is not None:
        assert default in shown, shown
    assert "(default: None)" not in shown and "(default: False)" not in shown
