"""The GPU path: mixed precision (AMP), float32 state, checkpoints between CPU and GPU, DP-SGD
on CUDA; and, on machines without CUDA, the refusals of ``--device cuda`` and of the GPU check.

The tests marked ``gpu`` need a CUDA GPU and are skipped (with the reason) without one; on a GPU
machine ``bash bench/gpu_check.sh`` (``make gpu-check``) runs them with ``pytest -m gpu``. The
others run everywhere; those about a machine without CUDA are skipped on a GPU machine.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from moma_core.data.synthetic import TARGET_CLASSES, generate
from moma_core.models import Architecture, build_model
from moma_core.objectives import ObjectiveConfig, build_objective, training_set
from moma_core.train import TrainConfig, train_local

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
NO_CUDA = "needs a CUDA GPU (torch.cuda.is_available() is false); make gpu-check runs it"
HAS_CUDA = "about a machine without CUDA; this one has a GPU"
BF16 = CUDA and torch.cuda.is_bf16_supported()
SIZE = 32
BATCH = 16
MEAN = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
STD = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
SMALL = dict(feat_dim=32, queue_size=64, num_heads=4)
KINDS = ("ce", "kd", "moma", "crckd", "dp-moma")
#: |loss(AMP) − loss(fp32)| ≤ tol · max(1, |loss(fp32)|) for the first step from the same state:
#: fp16 keeps 11 significant bits, bf16 8 (each term's inputs rounded, sums in float32)
FP16_TOLERANCE = 1e-2
BF16_TOLERANCE = 3e-2
#: metrics compared for finiteness only: a count, and a share of argmaxes (one flip: 1/B)
DISCRETE = frozenset({"steps", "retrieval"})

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason=NO_CUDA)
without_cuda = pytest.mark.skipif(CUDA, reason=HAS_CUDA)
pytestmark = pytest.mark.filterwarnings(
    "ignore:Full backward hook is firing:UserWarning",
    "ignore:Secure RNG turned off:UserWarning",
)


# -- GPU: mixed precision ----------------------------------------------------------------------
def _images(task: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = generate(task, n, seed=seed, image_size=SIZE)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)
    return ((x - MEAN) / STD).contiguous(), torch.from_numpy(labels).long()


def _model(seed: int) -> nn.Module:
    """test_efficientnet without dropout: the same step in either precision draws no mask."""
    torch.manual_seed(seed)
    return build_model(Architecture("test_efficientnet", TARGET_CLASSES, SIZE, drop_rate=0.0))


@pytest.fixture(scope="module")
def data() -> TensorDataset:
    return TensorDataset(*_images("target", 3 * BATCH, seed=1))


@pytest.fixture(scope="module")
def teacher() -> nn.Module:
    return _model(0)


def _objective(kind: str, teacher: nn.Module, n_data: int, **cfg) -> tuple[nn.Module, nn.Module]:
    """A student (the teacher's weights; Opacus-compatible for dp-moma) and ``kind``'s
    objective, on the CPU."""
    from moma_core.privacy.dp_moma import public_queue
    from moma_core.privacy.dp_sgd import make_private_compatible

    student = _model(1)
    student.load_state_dict(teacher.state_dict())
    keys = None
    if kind == "dp-moma":
        student = make_private_compatible(student)
        keys = public_queue(teacher, _images("source", 24, seed=7)[0])
    obj = build_objective(ObjectiveConfig(kind=kind, **{**SMALL, **cfg}), student, teacher,
                          same_task=True, n_data=n_data, public_keys=keys, batch_size=BATCH)
    return student, obj


def _train(student: nn.Module, obj: nn.Module, data: TensorDataset, steps: int,
           amp: bool) -> dict[str, float]:
    loader = DataLoader(training_set(obj, data), batch_size=BATCH, shuffle=False)
    cfg = TrainConfig(max_steps=steps, seed=0, amp=amp, lr=0.01)
    return train_local(student, obj, loader, cfg, device="cuda").metrics


def _close(a: float, b: float, tol: float) -> bool:
    return abs(a - b) <= tol * max(1.0, abs(b))


def _float_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in module.state_dict().items() if v.is_floating_point()}


@gpu
@needs_cuda
@pytest.mark.parametrize("kind", KINDS)
def test_an_amp_step_is_finite_and_matches_fp32(kind, teacher, data):
    """train_local's AMP (fp16 with a GradScaler): the first step's loss and each of its terms
    equal fp32's within FP16_TOLERANCE from the same state; three more steps stay finite;
    every parameter and buffer stays float32."""
    student, obj = _objective(kind, teacher, len(data))
    fp32 = _train(copy.deepcopy(student), copy.deepcopy(obj), data, 1, amp=False)
    amp = _train(student, obj, data, 1, amp=True)
    assert set(amp) == set(fp32)
    for term, value in fp32.items():
        assert math.isfinite(amp[term]), term
        if term not in DISCRETE:
            assert _close(amp[term], value, FP16_TOLERANCE), (term, amp[term], value)
    more = _train(student, obj, data, 3, amp=True)  # TrainingDiverged on a non-finite loss
    assert all(math.isfinite(v) for v in more.values())
    for name, t in {**_float_tensors(student), **_float_tensors(obj)}.items():
        assert t.dtype == torch.float32, name
        assert torch.isfinite(t).all(), name


@gpu
@needs_cuda
@pytest.mark.skipif(CUDA and not BF16, reason="this GPU has no bfloat16")
@pytest.mark.parametrize("kind", KINDS)
def test_a_bf16_loss_matches_fp32(kind, teacher, data):
    """The loss under bf16 autocast (what bench/gpu_check.py measures as AMP where the GPU has
    it) equals fp32's within BF16_TOLERANCE, each term finite."""
    student, obj = _objective(kind, teacher, len(data))
    student, obj = student.cuda().train(), obj.cuda().train()
    x, y = (t.cuda() for t in data.tensors)
    x, y = x[:BATCH], y[:BATCH]
    extra = {"index": torch.arange(BATCH, device="cuda")} if kind == "crckd" else {}
    s32, o32 = copy.deepcopy(student), copy.deepcopy(obj)
    loss32, parts32 = o32.loss(s32, x, y, **extra)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss16, parts16 = obj.loss(student, x, y, **extra)
    loss16, loss32 = float(loss16.detach()), float(loss32.detach())
    assert math.isfinite(loss16) and _close(loss16, loss32, BF16_TOLERANCE), (loss16, loss32)
    for term, value in parts32.items():
        assert torch.isfinite(parts16[term]).all(), term
        if value.dim() == 0 and term not in DISCRETE:
            assert _close(float(parts16[term]), float(value), BF16_TOLERANCE), term


@gpu
@needs_cuda
@pytest.mark.parametrize("cfg", [{}, {"moma_attention": "residual"}], ids=["reference",
                                                                            "residual"])
def test_momentum_teacher_and_queue_stay_float32_under_amp(cfg, teacher, data):
    student, obj = _objective("moma", teacher, len(data), **cfg)
    queue0 = obj.queue.queue.clone()
    teacher0 = [p.detach().clone() for p in obj.teacher.parameters()]
    _train(student, obj, data, 3, amp=True)
    assert obj.queue.queue.dtype == torch.float32 and obj.queue.queue.is_cuda
    assert not torch.equal(obj.queue.queue.cpu(), queue0)  # keys were enqueued
    assert torch.isfinite(obj.queue.queue).all()
    moved = [not torch.equal(p.cpu(), p0) for p, p0 in zip(obj.teacher.parameters(), teacher0,
                                                              strict=True)]
    assert any(moved)  # the momentum update ran
    assert all(p.dtype == torch.float32 for p in obj.teacher.parameters())
    assert all(p.dtype == torch.float32 for p in obj.trainable_parameters())


@gpu
@needs_cuda
def test_crckd_memory_banks_stay_float32_under_amp(teacher, data):
    student, obj = _objective("crckd", teacher, len(data))
    bank0 = obj.bank_s.clone()
    _train(student, obj, data, 3, amp=True)
    for name in ("bank_s", "bank_t"):
        bank = getattr(obj, name)
        assert bank.dtype == torch.float32 and bank.is_cuda and torch.isfinite(bank).all(), name
    assert not torch.equal(obj.bank_s.cpu(), bank0)  # rows were written
    assert (obj.bank_labels >= 0).all()  # every sample's row (3 batches of the 48)
    assert all(p.dtype == torch.float32 for p in obj.teacher.parameters())


# -- GPU: checkpoints, site state ---------------------------------------------------------------
@gpu
@needs_cuda
def test_checkpoints_move_between_cpu_and_gpu_exactly(tmp_path):
    from moma_core.checkpoint import load_checkpoint, load_model, save_checkpoint

    arch = Architecture("test_efficientnet", TARGET_CLASSES, SIZE)
    model = _model(3).cuda().train()
    model(torch.randn(8, 3, SIZE, SIZE, device="cuda"))  # BatchNorm statistics of its own
    gpu_state = model.state_dict()
    from_gpu = save_checkpoint(tmp_path / "gpu.safetensors", gpu_state, arch)
    from_cpu = save_checkpoint(tmp_path / "cpu.safetensors",
                               {k: v.cpu() for k, v in gpu_state.items()}, arch)
    assert from_gpu == from_cpu  # the same bytes from either device
    loaded, _, _ = load_model(tmp_path / "gpu.safetensors", expect=arch)
    for k, v in loaded.state_dict().items():
        assert v.device.type == "cpu" and v.dtype == gpu_state[k].dtype, k
        assert torch.equal(v, gpu_state[k].cpu()), k
    back = loaded.cuda().state_dict()
    assert all(torch.equal(back[k], v) for k, v in gpu_state.items())
    half = {k: v.half() for k, v in gpu_state.items() if v.is_floating_point()}
    save_checkpoint(tmp_path / "half.safetensors", half, arch)  # a float16 transfer
    state, _, _ = load_checkpoint(tmp_path / "half.safetensors")
    assert all(state[k].dtype == torch.float16 and torch.equal(state[k].cuda(), v)
               for k, v in half.items())


@gpu
@needs_cuda
def test_a_sites_private_state_from_the_gpu_loads_back_exactly(tmp_path, teacher, data):
    from client.site_state import SiteState

    student, obj = _objective("moma", teacher, len(data))
    _train(student, obj, data, 2, amp=True)
    sha = "0" * 64
    SiteState(tmp_path, "run").save(obj.state_dict(), {}, {"teacher_sha256": sha})
    saved, _ = SiteState(tmp_path, "run").load(sha)
    _, fresh = _objective("moma", teacher, len(data))
    fresh.load_state_dict(saved)
    fresh.cuda()
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in obj.state_dict().items())


# -- GPU: DP-SGD ------------------------------------------------------------------------------
@gpu
@needs_cuda
def test_dp_sgd_refuses_amp_on_cuda(teacher, data):
    from moma_core.privacy.dp_sgd import (
        DPConfig,
        PrivacyIncompatibleError,
        make_private_training,
    )

    student, obj = _objective("dp-moma", teacher, len(data))
    student, obj = student.cuda(), obj.cuda()
    loader = DataLoader(data, batch_size=BATCH)
    dp = DPConfig(noise_multiplier=1.0)
    params = [*student.parameters(), *obj.trainable_parameters()]
    with pytest.raises(PrivacyIncompatibleError, match="mixed precision"):
        make_private_training(student, obj, torch.optim.SGD(params, lr=0.1), loader, dp,
                              TrainConfig(amp=True), "cuda")
    before = [p.detach().clone() for p in student.parameters()]
    with pytest.raises(PrivacyIncompatibleError, match="mixed precision"):
        train_local(student, obj, loader, TrainConfig(amp=True, max_steps=1), "cuda",
                    privacy=dp)
    assert all(torch.equal(a, b) for a, b in zip(before, student.parameters(), strict=True))


@gpu
@needs_cuda
def test_dp_sgd_per_sample_gradients_on_cuda_are_each_samples_own(teacher, data):
    """Opacus' per-sample gradients on the GPU (fp32; TF32 off for the comparison) equal each
    sample's gradient alone, and a private fp32 step through train_local is finite."""
    from opacus.grad_sample import GradSampleModule

    from moma_core.privacy.dp_sgd import DPConfig, private_parts, use_contiguous_grad_samplers

    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        student, obj = _objective("dp-moma", teacher, len(data))
        student, obj = student.cuda().train(), obj.cuda().train()
        gsm = GradSampleModule(private_parts(student, obj))
        use_contiguous_grad_samplers(gsm)
        params = [p for p in gsm.parameters() if p.requires_grad]
        x, y = (t[:4].cuda() for t in data.tensors)
        obj.loss(student, x, y)[0].backward()
        per_sample = torch.cat([p.grad_sample.reshape(4, -1) for p in params], dim=1)
        gsm.disable_hooks()
        for i in (0, 3):
            for p in params:
                p.grad = None
            obj.loss(student, x[i:i + 1], y[i:i + 1])[0].backward()
            alone = torch.cat([p.grad.reshape(-1) for p in params])
            assert float((per_sample[i] - alone).norm() / alone.norm()) < 1e-3
        gsm.cleanup()
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    student, obj = _objective("dp-moma", teacher, len(data))
    result = train_local(student, obj, DataLoader(data, batch_size=BATCH, shuffle=True),
                         TrainConfig(max_steps=2, seed=0), "cuda",
                         privacy=DPConfig(noise_multiplier=1.0))
    assert all(math.isfinite(v) for v in result.metrics.values())
    assert result.privacy is not None and result.privacy.steps == 2
    assert all(v.device.type == "cpu" for v in result.state.values())  # what a site sends


# -- everywhere: refusals on a machine without CUDA -------------------------------------------
def _one_line_error(r, text: str) -> None:
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0], r.stderr


@without_cuda
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_standalone_commands_refuse_cuda_without_a_gpu(call, tmp_path, device):
    r = call("moma-distill", "--device", device, "--objective", "ce", "--model",
             "test_efficientnet", "--runs-dir", tmp_path, "--n", "16", "--image-size", "32")
    _one_line_error(r, f"device '{device}' requested but CUDA is not available")
    assert not (tmp_path / "distill-ce").exists()
    r = call("moma-teacher", "--device", device, "--model", "test_efficientnet", "--out",
             tmp_path / "t.safetensors", "--n", "16", "--image-size", "32")
    _one_line_error(r, f"device '{device}' requested but CUDA is not available")
    assert not (tmp_path / "t.safetensors").exists()


@without_cuda
def test_a_site_set_to_cuda_refuses_to_train_without_a_gpu(tmp_path):
    """The site settings path: device = "cuda" in the node config is kept, and the site's
    first round stops with one line before it reads its data or teacher."""
    from client.site_config import site_settings
    from client.site_training import evaluate_round, train_round
    from tests.helpers import synthetic_sites, tiny_run

    node = {**synthetic_sites(tmp_path, 1)[0], "device": "cuda"}
    settings = site_settings(node)
    assert settings.device == "cuda"
    for attempt in (lambda: train_round(settings, tiny_run(), 1, {}, "0" * 64),
                    lambda: evaluate_round(settings, tiny_run(), {})):
        with pytest.raises(ValueError) as refused:
            attempt()
        assert str(refused.value) == "device 'cuda' requested but CUDA is not available"
    assert not (tmp_path / "site-0" / "teachers").exists()


@without_cuda
def test_a_site_set_to_cuda_without_a_gpu_answers_config_error():
    from client.site_errors import error_category
    from moma_core.standalone import resolve_device

    with pytest.raises(ValueError) as refused:
        resolve_device("cuda")
    assert error_category(refused.value) == "config-error"


@without_cuda
def test_moma_client_refuses_cuda_without_a_gpu_before_it_starts(call, tmp_path):
    r = call("moma-client", "--insecure", "--check-only", "--device", "cuda", "--data",
             "synthetic:target", "--n", "16", "--cache-dir", tmp_path / "site")
    _one_line_error(r, "CUDA is not available")


def _run(cmd: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_WHEELS": "/nonexistent"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@without_cuda
def test_the_gpu_check_refuses_a_machine_without_cuda(tmp_path):
    """bench/gpu_check.sh (make gpu-check) stops at once, in one line, before installing
    anything; so does its driver."""
    r = _run(["bash", "bench/gpu_check.sh", "--out", str(tmp_path / "out")])
    _one_line_error(r, "no CUDA GPU here")
    assert r.stdout == "" and not (tmp_path / "out").exists()
    r = _run([sys.executable, "bench/gpu_check.py", "--out", str(tmp_path / "out")])
    _one_line_error(r, "no CUDA GPU here")
    r = _run([sys.executable, "bench/gpu_check.py", "--parts", "p1,speed", "--device", "cpu"])
    _one_line_error(r, "--parts: unknown speed")


def test_the_gpu_check_refuses_a_python_without_torch(tmp_path):
    env = {**os.environ, "PYTHON": "/bin/false"}
    r = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: /bin/false cannot import torch: set PYTHON to the GPU machine's Python with torch"]


def test_the_wheel_list_carries_flwr_opacus_and_tensorboard_but_not_torch_or_uv(tmp_path):
    """What bench/gpu_check.sh prepare downloads (read from this environment, no network)."""
    saved = list(sys.path)
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import gpu_check
    finally:
        sys.path[:] = saved  # gpu_check puts bench/ on the path for its own imports
    pins = gpu_check.prepare_wheels(tmp_path)
    names = {p.split("==")[0].lower().replace("_", "-") for p in pins}
    assert {"flwr", "opacus", "tensorboard", "cryptography", "setuptools", "wheel"} <= names
    assert not names & {"uv", "torch", "numpy", "scipy", "ray"}
    from packaging.requirements import Requirement

    lines = (tmp_path / "requirements-gpu.txt").read_text().splitlines()
    wanted = {Requirement(line).name for line in lines if not line.startswith("#")}
    assert {"opacus", "tensorboard", "cryptography", "uvicorn"} <= wanted
    assert not wanted & {"uv", "flwr"}


@pytest.mark.slow
def test_the_gpu_check_driver_runs_on_the_cpu(tmp_path):
    """bench/gpu_check.py's parts on a tiny model on the CPU (a smoke test, no figures): the
    federation part starts moma-server and two moma-client sites on loopback."""
    r = _run([sys.executable, "bench/gpu_check.py", "--device", "cpu", "--quick", "--out",
              str(tmp_path)], timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    text = (tmp_path / "gpu_check.md").read_text()
    for title in ("## P1", "## Images/s", "## DP-SGD", "## Loader", "## Federation",
                  "## Variants"):
        assert title in text
    fed = json.loads((tmp_path / "gpu_check.json").read_text())["federation"]
    assert [r["sites_ok"] for r in fed["rounds"]] == [2, 2] and len(fed["alone_s"]) == 2
    assert "| dp-moma + DP-SGD | fp32 |" in text
    assert "torch.compile, moma" in text


def test_gpu_tests_are_marked_and_skip_without_cuda():
    """Every test of this file that needs CUDA carries the gpu marker (what make gpu-check
    selects) and the skip; the gpu marker is registered."""
    import tomllib

    markers = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"][
        "ini_options"]["markers"]
    assert any(m.startswith("gpu:") for m in markers)
    module = sys.modules[__name__]
    for name in dir(module):
        fn = getattr(module, name)
        marks = {m.name for m in getattr(fn, "pytestmark", [])}
        if name.startswith("test_") and "gpu" in marks:
            assert any(m.name == "skipif" and m.args and m.args[0] == (not CUDA)
                       for m in fn.pytestmark), name
