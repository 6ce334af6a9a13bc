"""Bad settings, tried as a new user would: one line, exit 2, and nothing started or written."""

import subprocess
import sys
from pathlib import Path

import pytest

from moma_protocol.settings import ConfigError
from tests.helpers import tiny_teacher

BIN = Path(sys.executable).parent


def _run(*args, timeout=300):
    return subprocess.run([str(a) for a in args], capture_output=True, text=True,
                          timeout=timeout)


def _one_line_error(r, text: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: ") and text in lines[-1], r.stderr[-2000:]
    assert "Traceback" not in r.stderr


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return tiny_teacher(tmp_path_factory.mktemp("t") / "teacher.safetensors")


@pytest.mark.parametrize("extra,text", [
    (["--run-config", 'lr="abc"'], "run-config lr: expected a number, got 'abc'"),
    (["--run-config", "num-rounds=0"], "run-config num-rounds: 0 must be at least 1"),
    (["--rounds", "0"], "run-config num-rounds: 0 must be at least 1"),
    (["--run-config", 'aggregation="mean"'], "run-config aggregation: 'mean' is not one of"),
    (["--run-config", "nmu-rounds=3"], "unknown run-config key 'nmu-rounds'"),
    (["--run-config", 'output-dir="/tmp/elsewhere"'], "set by moma-server itself"),
    (["--run-config", "lr=abc"], "write key=value, text in double quotes"),
    (["--run-config", 'student-model="vit_tiny_patch16_224" image-size=32'],
     "vit_tiny_patch16_224 cannot take 32 px images"),
    (["--run-config", 'student-model="resnet_9000"'],
     "run-config student-model: 'resnet_9000' is not a timm model name"),
])
def test_moma_server_refuses_bad_run_settings_before_starting(call, teacher, tmp_path, extra,
                                                              text):
    r = call("moma-server", "--teacher", teacher, "--insecure", "--runs-dir",
             tmp_path / "runs", "--name", "bad", "--port", "1", *extra)
    _one_line_error(r, text)
    assert not (tmp_path / "runs").exists()  # nothing started, nothing written


def test_moma_server_needs_the_target_classes(call, teacher, tmp_path):
    r = call("moma-server", "--teacher", teacher, "--insecure", "--runs-dir",
             tmp_path / "runs", "--name", "bad", "--port", "1")
    _one_line_error(r, "give --classes")
    assert not (tmp_path / "runs").exists()


def test_moma_server_needs_a_teacher_to_distil(call, tmp_path):
    r = _run(BIN / "moma-server", "--insecure", "--runs-dir", tmp_path / "runs", "--port", "1")
    _one_line_error(r, "objective 'moma' needs --teacher")  # the installed script, end to end
    r = call("moma-server", "--insecure", "--runs-dir", tmp_path / "runs", "--port", "1",
             "--run-config", 'objective="crd"')
    _one_line_error(r, "run-config objective: 'crd' is not one of")


@pytest.mark.parametrize("extra,text", [
    (["--lr", "-1"], "run-config lr: -1.0 must be above 0"),
    (["--batch-size", "0"], "run-config batch-size: 0 must be at least 1"),
    (["--sites", "0"], "--sites 0: simulate at least 1 site"),
    (["--rounds", "0"], "run-config num-rounds: 0 must be at least 1"),
    (["--n", "0"], "--n 0: give at least 1 image per site"),
    (["--student-model", "resnet_9000", "--objective", "ce"],
     "run-config student-model: 'resnet_9000' is not a timm model name"),
    (["--student-model", "vit_tiny_patch16_224", "--image-size", "32", "--objective", "ce"],
     "vit_tiny_patch16_224 cannot take 32 px images"),
    (["--student-model", "resnet10t"], 'into the student resnet10t: teacher_update=\'momentum\' '
     'needs the teacher and student of the same architecture (got EfficientNet/'),
    (["--student-model", "resnet10t", "--objective", "crckd"],
     "objective crckd cannot distil the teacher test_efficientnet into the student resnet10t"),
])
def test_moma_simulate_refuses_bad_settings_before_training(call, teacher, tmp_path, extra,
                                                            text):
    r = call("moma-simulate", "--teacher", teacher, "--runs-dir", tmp_path / "runs",
             *extra)
    _one_line_error(r, text)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("command", ["moma-teacher", "moma-distill"])
def test_standalone_commands_refuse_zero_epochs(call, teacher, tmp_path, command):
    args = ["--teacher", teacher] if command == "moma-distill" else [
        "--model", "test_efficientnet", "--out", tmp_path / "t.safetensors"]
    r = call(command, *args, "--epochs", "0", "--n", "16", "--image-size", "32",
             "--runs-dir" if command == "moma-distill" else "--seed",
             tmp_path if command == "moma-distill" else "0")
    _one_line_error(r, "epochs 0: give at least 1")


def test_simulate_device_options_are_checked_on_a_machine_without_cuda(tmp_path):
    """The GPU path: --device and --gpus-per-site parse and reach Ray's resources; on this
    CPU-only machine --device cuda is one clear line (docs/federation.md: simulating on GPUs)."""
    import torch

    from server.simulate import backend_config, parser, settings

    def args(*extra):
        return settings(parser().parse_args(["--runs-dir", str(tmp_path), *extra]))

    cpu = args()
    assert cpu.device == "cpu" and cpu.gpus_per_site == 0.0
    assert backend_config(cpu.gpus_per_site)["client_resources"] == {"num_cpus": 1,
                                                                      "num_gpus": 0.0}
    assert backend_config(0.25)["client_resources"]["num_gpus"] == 0.25
    for extra, text in ((["--device", "gpu"], "give cpu, cuda or cuda:N"),
                        (["--gpus-per-site", "0.5"], "needs --device cuda"),
                        (["--device", "cuda", "--gpus-per-site", "2"], "share from 0 to 1")):
        with pytest.raises(ConfigError, match=text):
            args(*extra)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            args("--device", "cuda:0")
    else:  # on a GPU machine the default share is 1/sites
        assert args("--device", "cuda", "--sites", "4").gpus_per_site == 0.25


def test_the_student_teacher_check_refuses_only_what_the_sites_would_refuse():
    """The coordinator's up-front check (moma-server, moma-simulate, the ServerApp) against
    the objectives the sites build: a student of another architecture is refused for MoMA's
    momentum teacher and CRCKD, and accepted with a frozen teacher, for KD, CE and dp-moma, and
    for a student of the teacher's own model."""
    from moma_core.models import Architecture, build_model
    from moma_core.objectives import build_objective
    from server.teacher_package import check_student_fits
    from tests.helpers import IMAGE_SIZE, TARGET_CLASSES, tiny_run

    teacher = Architecture("test_efficientnet", tuple(TARGET_CLASSES), IMAGE_SIZE)
    cases = [("moma", "momentum", "resnet10t", False), ("crckd", "momentum", "resnet10t", False),
             ("moma", "frozen", "resnet10t", True), ("kd", "momentum", "resnet10t", True),
             ("ce", "momentum", "resnet10t", True), ("dp-moma", "momentum", "resnet10t", True),
             ("moma", "momentum", "test_efficientnet", True),
             ("crckd", "momentum", "test_efficientnet", True)]
    for objective, update, student, fits in cases:
        run = tiny_run(objective=objective, teacher_update=update, student_model=student)
        if fits:
            check_student_fits(run, teacher)
        else:
            with pytest.raises(ConfigError, match="cannot distil the teacher test_efficientnet"):
                check_student_fits(run, teacher)
        if objective in ("moma", "crckd"):  # what a site would do with the same pair
            args = (run.objective_config(), build_model(run.student_architecture()),
                    build_model(teacher))
            if fits:
                build_objective(*args, same_task=True, n_data=8)
            else:
                with pytest.raises(ValueError):
                    build_objective(*args, same_task=True, n_data=8)


@pytest.mark.parametrize("extra", [["--dp", "dp-sgd", "--objective", "kd"],
                                   ["--objective", "dp-moma"],
                                   ["--client-dp", "server-clipping"]])
def test_the_demos_local_only_baseline_is_never_that_of_a_private_run(call, teacher, tmp_path,
                                                                       extra):
    """The baseline trains without DP: refused up front for a private run (the user is told to
    leave it out), never trained without the run's privacy or crashed after the federation."""
    r = call("moma-simulate", "--demo", "--teacher", teacher, "--runs-dir", tmp_path / "runs",
             *extra)
    _one_line_error(r, "the local-only baseline trains without DP")
    assert "--no-local-baseline" in r.stderr
    assert not (tmp_path / "runs").exists()


def test_a_local_only_arm_refuses_a_private_run():
    from server.baseline import train_alone
    from tests.helpers import tiny_run

    with pytest.raises(ConfigError, match="trains without DP"):
        train_alone(tiny_run(dp="dp-sgd", objective="kd"), [], "site-0", None)


# -- the run's image size is the teacher's (moma-server) -----------------------------------------
@pytest.fixture(scope="module")
def teacher_48px(tmp_path_factory):
    """A teacher trained (here: saved) on 48 px images; the run-config default is 64."""
    from moma_core.checkpoint import save_checkpoint
    from moma_core.data.synthetic import SOURCE_CLASSES
    from moma_core.models import Architecture, build_model

    path = tmp_path_factory.mktemp("t48") / "teacher.safetensors"
    arch = Architecture("test_efficientnet", tuple(SOURCE_CLASSES), 48)
    save_checkpoint(path, build_model(arch).state_dict(), arch, {"purpose": "tests"})
    return path


def _server_run_config(teacher: Path, out: Path, run_config: str) -> dict:
    """The run config moma-server would submit (``flwr run --run-config``), nothing started."""
    from server.cli import overrides, parser
    from tests.helpers import TARGET_CLASSES

    args = parser().parse_args(["--teacher", str(teacher), "--insecure", "--classes",
                                ",".join(TARGET_CLASSES), "--run-config", run_config])
    return overrides(args, out, teacher, None)


def test_moma_server_takes_the_image_size_from_the_teacher(teacher_48px, tmp_path):
    from moma_protocol.settings import RunConfig
    from server.flwr_app import run_config_arg

    assert RunConfig().federation.image_size == 64  # what was taken silently before
    values = _server_run_config(teacher_48px, tmp_path, 'student-model="test_efficientnet"')
    assert values["image-size"] == 48
    assert "image-size=48" in run_config_arg(values).split()
    assert RunConfig.from_flat(values).federation.image_size == 48
    # the same size, given: accepted as is
    same = _server_run_config(teacher_48px, tmp_path,
                              'student-model="test_efficientnet" image-size=48')
    assert same["image-size"] == 48


def test_moma_server_refuses_an_image_size_that_is_not_the_teachers(call, teacher_48px,
                                                                    tmp_path, monkeypatch):
    from server import cli as server_cli

    def spawn(*args, **kwargs):
        raise AssertionError("moma-server started a process for a refused image size")

    monkeypatch.setattr(server_cli, "spawn", spawn)
    r = call("moma-server", "--teacher", teacher_48px, "--insecure", "--runs-dir",
             tmp_path / "runs", "--name", "bad", "--port", "1", "--classes", "a,b",
             "--run-config", 'image-size=64 student-model="test_efficientnet"')
    _one_line_error(r, "image-size=64, but the teacher was trained on 48 px images")
    assert not (tmp_path / "runs").exists()


def test_a_ce_run_may_train_at_another_size_than_its_teachers(teacher_48px, tmp_path):
    """CE ships no teacher (it at most starts from its weights): any image size is its own."""
    values = _server_run_config(teacher_48px, tmp_path,
                                'objective="ce" student-model="test_efficientnet" image-size=64')
    assert values["image-size"] == 64


def test_moma_distill_refuses_a_site_no_larger_than_one_batch(call, teacher, tmp_path):
    """The residual attention's queue holds at most the training images less one batch: a
    training set no larger than a batch leaves no room for one negative (one line)."""
    r = call("moma-distill", "--teacher", teacher, "--n", "16", "--image-size", "32",
             "--epochs", "1", "--batch-size", "64", "--runs-dir", tmp_path)
    _one_line_error(r, "MoMA's queue needs more training images than one batch")
