"""GPU figures of MoMA-FL: the driver of ``bench/gpu_check.sh`` (``make gpu-check``).

On one CUDA GPU, each part printed as a Markdown section (docs/benchmarks.md, "GPU check"):

- ``p1``: P1, MoMA step / distillation floor, for efficientnet_b0 at 224 px, without AMP (the
  step functions of ``bench/moma_step.py``) and with AMP (bf16 where the GPU supports it, else
  fp16 with a GradScaler), the variants interleaved and timed by ``bench/dp_step.py``'s timer.
- ``objectives``: images/s and peak GPU memory of one training step (``train_local``'s loop
  body) per objective (ce, kd, moma, crckd, dp-moma, and dp-moma with DP-SGD) at batch 64, in
  fp32, bf16 and fp16 with a GradScaler (``train_local``'s own AMP: fp16). DP-SGD under AMP is
  refused by ``make_private_training``: its row shows the refusal.
- ``dp``: the dp-moma step with Opacus (``make_private_training``, train_local's path) / the
  same step without DP, on the GPU (``bench/dp_step.py``'s steps and timer).
- ``loader``: images/s the site's training loader delivers (RandAugment, 224 px, pinned memory)
  with 0 (the product's setting), 2, 4 and 8 worker processes, against a step's images/s.
- ``federation``: 4 sites sharing the GPU, each a real ``moma-client --device cuda`` (Flower
  SuperNode) and ``moma-server`` (SuperLink) on loopback, as deployed; each round's wall time
  against the same local work (each site scoring the incoming student and training, through
  ``client.site_training``) run one site after another in one process on the same GPU.
- ``variants``: channels-last and ``torch.compile`` beside the plain step (measured only: they
  are not in the product; keep one only where it wins). ``torch.compile`` runs last and only
  while the time budget (``--deadline``) allows.

A part that fails is reported with its traceback and the others still run; the exit code is 1
when any part failed, 2 when the command cannot start (no CUDA GPU: one line).

    python bench/gpu_check.py [--out DIR] [--parts p1,objectives,...] [--quick] [--device cpu]
    python bench/gpu_check.py --prepare-wheels DIR   (what bench/gpu_check.sh prepare runs)

``--device cpu --quick``: every part on a tiny model on the CPU (a smoke test of this driver,
no figures).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "bench"))

PARTS = ("p1", "objectives", "dp", "loader", "federation", "variants")
OBJECTIVE_KINDS = ("ce", "kd", "moma", "crckd", "dp-moma")
DP_ROW = "dp-moma + DP-SGD"
NUM_CLASSES = 4
#: seconds torch.compile of efficientnet_b0 (a training and an inference graph) may take
COMPILE_ESTIMATE_S = 150.0


@dataclass(frozen=True)
class Sizes:
    """What each part measures (``FULL`` on a GPU; ``QUICK`` a smoke test)."""

    model: str = "efficientnet_b0"
    image: int = 224
    p1_batches: tuple[int, ...] = (16, 64)
    batch: int = 64
    dp_batches: tuple[int, ...] = (16, 64)
    reps: int = 10
    warmup: int = 3
    queue_sizes: tuple[int, ...] = (4096, 16384)
    crckd_rows: int = 1024
    loader_n: int = 640
    loader_workers: tuple[int, ...] = (0, 2, 4, 8)
    sites: int = 4
    site_n: int = 256
    site_batch: int = 32
    rounds: int = 3
    federation_timeout_s: float = 420.0


FULL = Sizes()
QUICK = Sizes(model="test_efficientnet", image=32, p1_batches=(8,), batch=8, dp_batches=(8,),
              reps=2, warmup=1, queue_sizes=(64,), crckd_rows=32, loader_n=48,
              loader_workers=(0, 2), sites=2, site_n=32, site_batch=16, rounds=2,
              federation_timeout_s=600.0)


# -- wheels for a GPU machine without a package index (bench/gpu_check.sh prepare) ------------
#: the GPU machine's Python already has these (and torch needs no wheel from here); uv is left
#: out: flwr needs it only to install app dependencies at run time, which deploy.runtime turns
#: off (flwr itself is installed with --no-deps)
NOT_CARRIED = frozenset({"uv", "torch", "numpy", "scipy"})
GPU_PYTHON = {"python_version": "3.12", "python_full_version": "3.12.3", "os_name": "posix",
              "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
              "implementation_name": "cpython", "platform_python_implementation": "CPython"}


#: moma-fl's own dependencies that the GPU machine's Python lacks, besides flwr
CARRIED = ("opacus", "tensorboard")


def wheel_closure(roots: list[str]) -> dict[str, str]:
    """Name → version (``""``: not installed here) of ``roots`` and everything they need on
    the GPU machine's Python, read from this environment's installed metadata, less
    :data:`NOT_CARRIED`."""
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    found: dict[str, tuple[str, str, set[str]]] = {}
    todo: list[tuple[str, frozenset[str]]] = [(r, frozenset()) for r in roots]
    while todo:
        name, extras = todo.pop()
        key = canonicalize_name(name)
        if key in NOT_CARRIED:
            continue
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            found.setdefault(key, (name, "", set()))
            continue
        known = found.get(key)
        if known is not None and extras <= known[2]:
            continue
        wanted = (known[2] if known else set()) | set(extras)
        found[key] = (dist.metadata["Name"], dist.version, wanted)
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or any(req.marker.evaluate({**GPU_PYTHON, "extra": e})
                                         for e in ("", *wanted)):
                todo.append((req.name, frozenset(req.extras)))
    return {name: version for name, version, _ in found.values()}


def flwr_requirements() -> list[str]:
    """flwr's own requirements (this environment's flwr) less uv, as pip reads them."""
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    lines = []
    for line in requires("flwr") or []:
        req = Requirement(line)
        if req.name == "uv" or (req.marker is not None and "extra" in str(req.marker)):
            continue
        lines.append(line)
    return lines


def prepare_wheels(folder: Path) -> list[str]:
    """Write ``folder/requirements-gpu.txt`` (what the GPU machine installs with the resolver)
    and return the pinned wheels to download (``name==version``; unpinned if not installed)."""
    from importlib.metadata import version

    folder.mkdir(parents=True, exist_ok=True)
    carried = [f"{name}=={version(name)}" for name in CARRIED]
    lines = ["# bench/gpu_check.sh prepare: what the GPU path needs beyond the GPU machine's",
             "# Python, installed there with pip install --no-index --find-links <this folder>.",
             "# flwr's requirements less uv (flwr itself goes in with --no-deps), opacus and",
             "# tensorboard (the coordinator writes its event files).",
             *flwr_requirements(), *carried]
    (folder / "requirements-gpu.txt").write_text("\n".join(lines) + "\n")
    pins = wheel_closure(["flwr", *CARRIED, "setuptools", "wheel"])
    return sorted(f"{n}=={v}" if v else n for n, v in pins.items())


# -- measuring -------------------------------------------------------------------------------
def amp_precision(device: Any) -> str:
    """The AMP of P1: bf16 where the device supports it, else fp16 (with a GradScaler)."""
    import torch

    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16"


def precisions(device: Any) -> list[str]:
    """fp32, bf16 (where supported) and fp16 with a GradScaler (train_local's AMP; CUDA)."""
    import torch

    if device.type != "cuda":
        return ["fp32", "bf16"]
    return ["fp32", *(["bf16"] if torch.cuda.is_bf16_supported() else []), "fp16"]


def _dtype(precision: str) -> Any:
    import torch

    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def train_step(student: Any, objective: Any, optimizer: Any, precision: str,
               extra: dict | None = None) -> Callable[[Any, Any], None]:
    """One step of train_local's loop: the loss under autocast (``precision``; fp16 with a
    GradScaler), backward, optimiser step, the objective's after-step (outside autocast)."""
    import torch

    dtype = _dtype(precision)
    device_type = next(student.parameters()).device.type
    scaler = torch.amp.GradScaler(device_type, enabled=precision == "fp16")
    extra = extra or {}

    def step(x: Any, y: Any) -> None:
        with torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss, _ = objective.loss(student, x, y, **extra)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        objective.after_step(student)
    return step


class Floor:
    """``bench/moma_step.py``'s distillation floor as an objective, for its AMP step: the
    student's CE and one teacher forward on the same batch."""

    def __init__(self, teacher: Any) -> None:
        self.teacher = teacher

    def loss(self, student: Any, x: Any, y: Any) -> tuple[Any, dict]:
        import torch
        import torch.nn.functional as F

        from moma_core.models import features_and_logits

        _, z_s = features_and_logits(student, x)
        with torch.no_grad():
            self.teacher(x)
        return F.cross_entropy(z_s, y), {}

    def after_step(self, student: Any) -> None:
        pass


def synced(step: Callable[[Any, Any], None], device: Any) -> Callable[[Any, Any], None]:
    """``step`` followed by a CUDA synchronisation, so that a wall clock times it."""
    import torch

    if device.type != "cuda":
        return step

    def run(x: Any, y: Any) -> None:
        step(x, y)
        torch.cuda.synchronize(device)
    return run


def interleaved(steps: dict[str, Callable[[Any, Any], None]], x: Any, y: Any, reps: int,
                warmup: int, device: Any, label: tuple[str, int, int] = ("", 0, 0)
                ) -> dict[str, float]:
    """Median seconds per step of each variant, interleaved (``bench/dp_step.py``'s timer)."""
    import dp_step

    setup = dp_step.Setup(label[0], label[1], label[2], 0, warmup, x, y,
                          {n: synced(s, device) for n, s in steps.items()})
    return dp_step.measure(setup, reps)


def _batch(sizes: Sizes, batch: int, device: Any) -> tuple[Any, Any]:
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, sizes.image, sizes.image, generator=g)
    return x.to(device), torch.randint(0, NUM_CLASSES, (batch,), generator=g).to(device)


def _free(device: Any) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def p1_step(kind: str, sizes: Sizes, device: Any, teacher: Any, precision: str,
            queue_size: int = 4096, **options: Any) -> Callable[[Any, Any], None]:
    """One P1 variant as bench/moma_step.py builds it (a student with the teacher's weights),
    its own step in fp32 (``_floor_step``, ``_objective_step``), train_step's under AMP."""
    import moma_step
    import torch

    from moma_core.models import create_classifier
    from moma_core.objectives import ObjectiveConfig, build_objective

    student = create_classifier(sizes.model, NUM_CLASSES).to(device)
    student.load_state_dict(teacher.state_dict())
    student.train()
    if kind == "floor":
        other = create_classifier(sizes.model, NUM_CLASSES).to(device).eval()
        opt = torch.optim.SGD(student.parameters(), lr=1e-3, momentum=0.9)
        if precision != "fp32":
            return train_step(student, Floor(other), opt, precision)
        return lambda x, y: moma_step._floor_step(student, other, opt, x, y)
    cfg = ObjectiveConfig(kind=kind, queue_size=queue_size, **options)
    obj = build_objective(cfg, student, teacher, same_task=True).to(device).train()
    opt = _optimizer(student, obj)
    if precision != "fp32":
        return train_step(student, obj, opt, precision)
    return lambda x, y: moma_step._objective_step(student, obj, opt, x, y)


def part_p1(sizes: Sizes, device: Any) -> dict:
    """P1 at each batch of ``sizes.p1_batches``, fp32 and AMP (see module docstring)."""
    import torch

    from moma_core.models import create_classifier

    amp = amp_precision(device)
    rows = []
    k0 = sizes.queue_sizes[0]
    for batch in sizes.p1_batches:
        for precision in ("fp32", amp):
            torch.manual_seed(0)
            teacher = create_classifier(sizes.model, NUM_CLASSES).to(device)
            steps = {"floor": p1_step("floor", sizes, device, teacher, precision),
                     "kd": p1_step("kd", sizes, device, teacher, precision)}
            for k in sizes.queue_sizes:
                steps[f"moma K={k}"] = p1_step("moma", sizes, device, teacher, precision, k)
            steps[f"moma K={k0} kl after-update"] = p1_step(
                "moma", sizes, device, teacher, precision, k0, kl_teacher="after-update")
            x, y = _batch(sizes, batch, device)
            med = interleaved(steps, x, y, sizes.reps, sizes.warmup, device,
                              (sizes.model, sizes.image, batch))
            rows.append({"batch": batch, "precision": precision, "floor_ms": med["floor"] * 1e3,
                         "ratios": {n: t / med["floor"] for n, t in med.items() if n != "floor"}})
            del steps, teacher
            _free(device)
    return {"model": sizes.model, "image": sizes.image, "amp": amp, "rows": rows}


def build_objective_on(kind: str, sizes: Sizes, device: Any) -> tuple[Any, Any, dict]:
    """Student (the teacher's weights; GroupNorm for dp-moma), objective and the step's extra
    arguments for ``kind`` on ``device``, as bench/moma_step.py and bench/dp_step.py build
    them."""
    import torch
    import torch.nn.functional as F

    from moma_core.models import create_classifier, feature_dim
    from moma_core.objectives import ObjectiveConfig, build_objective
    from moma_core.privacy.dp_sgd import make_private_compatible
    from moma_protocol.settings import DP_GROUP_SIZE

    torch.manual_seed(0)
    teacher = create_classifier(sizes.model, NUM_CLASSES).eval()
    student = create_classifier(sizes.model, NUM_CLASSES)
    student.load_state_dict(teacher.state_dict())
    if kind == "dp-moma":
        student = make_private_compatible(student, group_size=DP_GROUP_SIZE)
    teacher, student = teacher.to(device), student.to(device).train()
    keys = None
    if kind == "dp-moma":  # K random unit keys: their values do not change the step's cost
        keys = F.normalize(torch.randn(sizes.queue_sizes[0], feature_dim(teacher)), dim=1)
    cfg = ObjectiveConfig(kind=kind, queue_size=sizes.queue_sizes[0])
    obj = build_objective(cfg, student, teacher, same_task=True, n_data=sizes.crckd_rows,
                          public_keys=None if keys is None else keys.to(device),
                          batch_size=sizes.batch).to(device).train()
    extra = {}
    if kind == "crckd":
        extra["index"] = torch.arange(sizes.batch, device=device) % sizes.crckd_rows
    return student, obj, extra


def _optimizer(student: Any, obj: Any) -> Any:
    import torch

    return torch.optim.SGD([*student.parameters(), *obj.trainable_parameters()], lr=1e-3,
                           momentum=0.9)


def _private_step(student: Any, obj: Any, sizes: Sizes, device: Any, precision: str
                  ) -> Callable[[Any, Any], None]:
    """The DP-SGD step of train_local's path (``make_private_training``; Poisson sampling off
    so that every step sees the batch), or its refusal (PrivacyIncompatibleError)."""
    import dp_step
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from moma_core.privacy.dp_sgd import DPConfig, make_private_training
    from moma_core.train import TrainConfig

    x, y = _batch(sizes, sizes.batch, torch.device("cpu"))
    loader = DataLoader(TensorDataset(x, y), batch_size=sizes.batch)
    private = make_private_training(
        student, obj, _optimizer(student, obj), loader,
        DPConfig(noise_multiplier=dp_step.NOISE, max_grad_norm=dp_step.MAX_GRAD_NORM,
                 poisson_sampling=False),
        TrainConfig(amp=precision != "fp32"), device)
    return dp_step._loop_step(student, obj, private.optimizer)


def measure_alone(step: Callable[[Any, Any], None], x: Any, y: Any, sizes: Sizes,
                  device: Any) -> dict:
    """Milliseconds per step (median), images/s and the peak GPU memory of ``step`` run alone
    (what is allocated when it starts counts: its models and optimiser)."""
    import torch

    step = synced(step, device)
    for _ in range(sizes.warmup):
        step(x, y)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(sizes.reps):
        start = time.perf_counter()
        step(x, y)
        times.append(time.perf_counter() - start)
    med = statistics.median(times)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"ms": med * 1e3, "images_per_s": len(y) / med, "peak_gib": peak}


def part_objectives(sizes: Sizes, device: Any) -> dict:
    """Images/s and peak memory per objective and precision at ``sizes.batch``."""
    from moma_core.privacy.dp_sgd import PrivacyIncompatibleError

    rows = []
    x, y = _batch(sizes, sizes.batch, device)
    for kind in (*OBJECTIVE_KINDS, DP_ROW):
        for precision in precisions(device):
            row = {"objective": kind, "precision": precision}
            student, obj, extra = build_objective_on(kind.split(" ")[0], sizes, device)
            try:
                if kind == DP_ROW:
                    if precision != "fp32" and device.type != "cuda":
                        continue  # the refusal is about CUDA's AMP
                    step = _private_step(student, obj, sizes, device, precision)
                else:
                    step = train_step(student, obj, _optimizer(student, obj), precision, extra)
                row.update(measure_alone(step, x, y, sizes, device))
            except PrivacyIncompatibleError as exc:
                row["refused"] = str(exc)
            except Exception as exc:  # noqa: BLE001 - reported, the other rows still run
                traceback.print_exc()
                row["error"] = _reason(exc)
            finally:
                del student, obj
                _free(device)
            rows.append(row)
            print(f"  {kind} {precision}: " + ", ".join(
                f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
                for k, v in row.items() if k not in ("objective", "precision")), flush=True)
    return {"model": sizes.model, "image": sizes.image, "batch": sizes.batch, "rows": rows}


def part_dp(sizes: Sizes, device: Any) -> dict:
    """dp-moma with DP-SGD (train_local's path) / without, interleaved, per batch size."""
    import dp_step

    rows = []
    for batch in sizes.dp_batches:
        b = Sizes(**{**asdict(sizes), "batch": batch})
        s0, o0, _ = build_objective_on("dp-moma", b, device)
        s1, o1 = copy.deepcopy(s0), copy.deepcopy(o0)
        steps = {dp_step.BASE: dp_step._loop_step(s0, o0, dp_step._sgd(dp_step._params(s0, o0))),
                 dp_step.HOOKS: _private_step(s1, o1, b, device, "fp32")}
        x, y = _batch(b, batch, device)
        med = interleaved(steps, x, y, sizes.reps, sizes.warmup, device,
                          (sizes.model, sizes.image, batch))
        rows.append({"batch": batch, "no_dp_ms": med[dp_step.BASE] * 1e3,
                     "dp_ms": med[dp_step.HOOKS] * 1e3,
                     "ratio": med[dp_step.HOOKS] / med[dp_step.BASE]})
        del steps, s0, o0, s1, o1
        _free(device)
    return {"model": sizes.model, "image": sizes.image, "goal": dp_step.GOAL, "rows": rows}


def part_loader(sizes: Sizes, device: Any, step_images_per_s: float | None) -> dict:
    """Images/s of the site's training loader (make_loader; RandAugment) by worker count,
    each over one whole epoch after a first epoch that starts the workers."""
    import torch

    from moma_core.sources import make_loader, open_site_data

    data = open_site_data("synthetic:target", image_size=sizes.image, augment="randaugment",
                          n=sizes.loader_n)
    rows = []
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    for workers in sizes.loader_workers:
        if workers > (cpus or 1):
            continue
        loader = make_loader(data.train, sizes.batch, train=True, workers=workers,
                             device=str(device))
        for _ in range(2):  # the first epoch starts the workers
            start, seen = time.perf_counter(), 0
            for x, y in loader:
                x = x.to(device, non_blocking=True)
                y = y.to(device, non_blocking=True)
                seen += len(y)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        rate = seen / (time.perf_counter() - start)
        rows.append({"workers": workers, "images_per_s": rate,
                     "loader_over_step": rate / step_images_per_s if step_images_per_s else None})
        del loader
    return {"image": sizes.image, "batch": sizes.batch, "images": len(data.train), "cpus": cpus,
            "step_images_per_s": step_images_per_s, "rows": rows}


# -- the federation: moma-server and moma-client sites on loopback -------------------------------
class Processes:
    """The federation's processes (each its own session), stopped by process group."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "wb")
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)
        log.close()
        return self.procs[name]

    def log_tail(self, name: str, chars: int = 3000) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.is_file() else ""

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


def _site_threads(sizes: Sizes) -> int:
    """torch threads per site: the machine's cores shared by the sites."""
    return max(1, (os.cpu_count() or 1) // sizes.sites)


def _node_config(root: Path, i: int, sizes: Sizes, device: Any) -> dict:
    """Site ``i``'s node config as moma-client writes it (the settings that matter here)."""
    return {"data-path": "synthetic:target", "cache-dir": str(root / f"site-{i}"),
            "site-index": i, "num-sites": sizes.sites, "n": sizes.site_n,
            "site-name": f"site-{i}", "device": str(device)}


def deployed_run(root: Path, sizes: Sizes, device: Any) -> tuple[dict, float]:
    """``moma-server --insecure`` and ``sizes.sites`` ``moma-client --insecure`` sites on
    loopback; returns results.json and the seconds from the launch to the ServerApp's start."""
    import torch

    from deploy.runtime import free_port
    from moma_core.checkpoint import save_checkpoint
    from moma_core.data.synthetic import TARGET_CLASSES
    from moma_core.models import Architecture, build_model

    bin_dir = Path(sys.executable).parent
    torch.manual_seed(0)
    arch = Architecture(sizes.model, tuple(TARGET_CLASSES), sizes.image)
    teacher = root / "teacher.safetensors"
    save_checkpoint(teacher, build_model(arch).state_dict(), arch, {"purpose": "gpu check"})
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    site_env = {**env, "OMP_NUM_THREADS": str(_site_threads(sizes))}
    port, procs = free_port(), Processes(root)
    run_config = (f'student-model="{sizes.model}" image-size={sizes.image} '
                  f"batch-size={sizes.site_batch} queue-size={sizes.queue_sizes[0]} "
                  f"min-train-nodes={sizes.sites} min-available-nodes={sizes.sites} "
                  f"round-timeout={sizes.federation_timeout_s}")
    launched = time.time()
    try:
        server = procs.start("server", [
            str(bin_dir / "moma-server"), "--teacher", str(teacher), "--name", "fed",
            "--runs-dir", str(root / "runs"), "--port", str(port), "--insecure",
            "--rounds", str(sizes.rounds), "--classes", ",".join(TARGET_CLASSES),
            "--run-config", run_config], env)
        for i in range(sizes.sites):
            procs.start(f"site-{i}", [
                str(bin_dir / "moma-client"), "--server", f"127.0.0.1:{port}",
                "--data", "synthetic:target", "--site-index", str(i),
                "--num-sites", str(sizes.sites), "--n", str(sizes.site_n),
                "--cache-dir", str(root / f"site-{i}"), "--site-name", f"site-{i}",
                "--insecure", "--device", str(device),
                "--clientappio-port", str(free_port())], site_env)
        try:
            rc = server.wait(sizes.federation_timeout_s)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"moma-server did not finish in {sizes.federation_timeout_s:.0f}"
                               " s; its log ends:\n" + procs.log_tail("server")) from None
        if rc != 0:
            raise RuntimeError(f"moma-server exited with {rc}; its log ends:\n"
                               + procs.log_tail("server") + "\nsite-0's log ends:\n"
                               + procs.log_tail("site-0"))
    finally:
        procs.stop_all()
    results = json.loads((root / "runs" / "fed" / "results.json").read_text())
    return results, results["started"] - launched


def local_work(root: Path, results: dict, sizes: Sizes, device: Any) -> list[float]:
    """Seconds of each site's work in a round (scoring the incoming student, then training
    from round 1's global student) run alone, one site after another in this process; the
    second of two passes (the first decodes each site's data and warms CUDA up)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(_site_threads(sizes))  # as each site had (deployed_run)
    try:
        return _local_work(root, results, sizes, device)
    finally:
        torch.set_num_threads(threads)


def _local_work(root: Path, results: dict, sizes: Sizes, device: Any) -> list[float]:
    import torch
    from safetensors.torch import load_file

    from client.site_config import site_settings
    from client.site_training import evaluate_round, train_round
    from moma_protocol.settings import RunConfig

    run = RunConfig.from_flat(results["config"])
    state = load_file(str(root / "runs" / "fed" / "checkpoints" / "global-round-001.safetensors"))
    sha = results["teacher_sha256"]
    times: list[float] = []
    for _ in range(2):
        times = []
        for i in range(sizes.sites):
            settings = site_settings(_node_config(root, i, sizes, device))
            start = time.perf_counter()
            evaluate_round(settings, run, state)
            train_round(settings, run, 2, state, sha)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
    return times


def part_federation(sizes: Sizes, device: Any, out: Path) -> dict:
    """Deployed rounds on loopback against the same local work run alone (module docstring)."""
    import shutil
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="moma-gpu-fed-"))
    try:
        results, startup = deployed_run(root, sizes, device)
        alone = local_work(root, results, sizes, device)
    except BaseException:
        logs = out / "federation_logs.txt"
        with open(logs, "w", encoding="utf-8") as f:
            for path in sorted(root.glob("*.log")):
                f.write(f"==> {path.name} (last 20000 characters)\n")
                f.write(path.read_text(errors="replace")[-20000:] + "\n")
        print(f"  (the federation's logs: {logs})", file=sys.stderr)
        raise
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rounds = []
    for r in results["rounds"]:
        ok = [s["metrics"] for s in r["sites"].values() if s["status"] == "ok"]
        work = [m.get("train-time-s", 0.0) + m.get("eval-time-s", 0.0) for m in ok]
        rounds.append({"round": r["round"], "wall_s": r["wall_s"], "sites_ok": len(ok),
                       "site_work_s": [round(w, 2) for w in work]})
    return {"model": sizes.model, "image": sizes.image, "sites": sizes.sites, "n": sizes.site_n,
            "batch": sizes.site_batch, "startup_s": startup, "rounds": rounds,
            "alone_s": alone, "alone_sum_s": sum(alone), "alone_max_s": max(alone)}


# -- variants: channels-last and torch.compile (measured, not in the product) -----------------
def _variant(kind: str, sizes: Sizes, device: Any, precision: str, channels_last: bool,
             compile_: bool) -> Callable[[Any, Any], None]:
    """``kind``'s train_step in ``precision``, optionally on channels-last tensors and with
    the backbones compiled (inductor on CUDA; on the CPU the eager backend: the smoke test
    checks the plumbing, not the compiler)."""
    import torch

    student, obj, extra = build_objective_on(kind, sizes, device)
    if channels_last:
        student.to(memory_format=torch.channels_last)
        obj.to(memory_format=torch.channels_last)
    if compile_:
        models = [student] + ([obj.teacher] if hasattr(obj, "teacher") else [])
        for m in models:  # timm's backbone; the objectives call forward_features themselves
            m.forward_features = torch.compile(
                m.forward_features, backend="inductor" if device.type == "cuda" else "eager")
    step = train_step(student, obj, _optimizer(student, obj), precision, extra)
    if not channels_last:
        return step
    return lambda x, y: step(x.contiguous(memory_format=torch.channels_last), y)


def part_variants(sizes: Sizes, device: Any, deadline: float) -> dict:
    """ce and moma at ``sizes.batch``: plain, channels-last, and (time allowing, AMP only)
    torch.compile with the faster of the two layouts; medians of interleaved steps."""
    rows, amp = [], amp_precision(device)
    x, y = _batch(sizes, sizes.batch, device)
    fastest: dict[str, bool] = {}
    for kind in ("ce", "moma"):
        for precision in ("fp32", amp):
            steps = {"plain": _variant(kind, sizes, device, precision, False, False),
                     "channels-last": _variant(kind, sizes, device, precision, True, False)}
            med = interleaved(steps, x, y, sizes.reps, sizes.warmup, device)
            rows.append({"objective": kind, "precision": precision,
                         **{f"{n}_ms": t * 1e3 for n, t in med.items()}})
            if precision == amp:
                fastest[kind] = med["channels-last"] < med["plain"]
            del steps
            _free(device)
    compiled: dict[str, Any] = {}
    left = deadline - time.time()
    if device.type == "cuda" and left < COMPILE_ESTIMATE_S:
        compiled["skipped"] = (f"{left:.0f} s left of the time budget, torch.compile needs "
                               f"about {COMPILE_ESTIMATE_S:.0f} s")
    else:
        for kind in ("ce", "moma"):
            cl = fastest[kind]
            plain = _variant(kind, sizes, device, amp, cl, False)
            start = time.perf_counter()
            comp = synced(_variant(kind, sizes, device, amp, cl, True), device)
            comp(x, y)  # compiles
            first = time.perf_counter() - start
            med = interleaved({"eager": plain, "compiled": comp}, x, y, sizes.reps,
                              sizes.warmup, device)
            compiled[kind] = {"precision": amp, "layout": "channels-last" if cl else "plain",
                              "first_step_s": first, "eager_ms": med["eager"] * 1e3,
                              "compiled_ms": med["compiled"] * 1e3}
            del plain, comp
            _free(device)
    return {"model": sizes.model, "image": sizes.image, "batch": sizes.batch, "rows": rows,
            "compile": compiled}


# -- report ----------------------------------------------------------------------------------
def _fmt(v: Any, spec: str = ".1f") -> str:
    return "–" if v is None else format(v, spec)


def _md_p1(p: dict, m: dict) -> list[str]:
    names = list(p["rows"][0]["ratios"])
    lines = [f"## P1: MoMA step / distillation floor ({p['model']}, {p['image']} px)", "",
             "| batch | precision | floor (ms) | " + " | ".join(names) + " |",
             "|---|---|---|" + "---|" * len(names)]
    return lines + [f"| {r['batch']} | {r['precision']} | {r['floor_ms']:.1f} | "
                    + " | ".join(f"{r['ratios'][n]:.2f}×" for n in names) + " |"
                    for r in p["rows"]]


def _md_objectives(o: dict, m: dict) -> list[str]:
    lines = [f"## Images/s and peak GPU memory per objective ({o['model']}, {o['image']} px, "
             f"batch {o['batch']})", "", "| objective | precision | ms/step | images/s | "
             "peak GiB |", "|---|---|---|---|---|"]
    for r in o["rows"]:
        head = f"| {r['objective']} | {r['precision']} | "
        if "refused" in r or "error" in r:
            what = f"refused: {r['refused']}" if "refused" in r else f"failed: {r['error']}"
            lines.append(f"{head}{what} | | |")
        else:
            lines.append(f"{head}{r['ms']:.1f} | {r['images_per_s']:.0f} | "
                         f"{_fmt(r['peak_gib'], '.2f')} |")
    return lines


def _md_dp(d: dict, m: dict) -> list[str]:
    lines = [f"## DP-SGD step of dp-moma / the same step without DP ({d['model']}, "
             f"{d['image']} px, fp32; goal on the CPU ≤ {d['goal']})", "",
             "| batch | no DP (ms) | DP-SGD (ms) | ratio |", "|---|---|---|---|"]
    return lines + [f"| {r['batch']} | {r['no_dp_ms']:.1f} | {r['dp_ms']:.1f} | "
                    f"{r['ratio']:.2f}× |" for r in d["rows"]]


def _md_loader(lo: dict, m: dict) -> list[str]:
    lines = [f"## Loader (RandAugment, {lo['image']} px, batch {lo['batch']}, {lo['cpus']} "
             f"CPUs) vs a MoMA step ({_fmt(lo['step_images_per_s'], '.0f')} images/s)", "",
             "| workers | images/s | loader / step |", "|---|---|---|"]
    return lines + [f"| {r['workers']} | {r['images_per_s']:.0f} | "
                    f"{_fmt(r['loader_over_step'], '.2f')} |" for r in lo["rows"]]


def _md_federation(fe: dict, m: dict) -> list[str]:
    alone = ", ".join(f"{t:.1f}" for t in fe["alone_s"])
    lines = [f"## Federation: {fe['sites']} sites sharing one {m['device_name']} "
             f"({fe['model']}, {fe['image']} px, {fe['n']} images and batch {fe['batch']} per "
             "site)", "",
             f"Start-up (launch → ServerApp) {fe['startup_s']:.0f} s. The same local work (each "
             "site scoring the incoming student and training) run alone, one site after "
             f"another: {alone} s, Σ {fe['alone_sum_s']:.1f} s.", "",
             "| round | wall s | sites' own work in the round (s) | wall / Σ alone | "
             "wall / slowest alone |", "|---|---|---|---|---|"]
    return lines + [f"| {r['round']} | {r['wall_s']:.1f} | "
                    f"{', '.join(map(str, r['site_work_s']))} | "
                    f"{r['wall_s'] / fe['alone_sum_s']:.2f} | "
                    f"{r['wall_s'] / fe['alone_max_s']:.2f} |" for r in fe["rounds"]]


def _md_variants(v: dict, m: dict) -> list[str]:
    lines = [f"## Variants (measured only; {v['model']}, {v['image']} px, batch "
             f"{v['batch']})", "", "| objective | precision | plain (ms) | channels-last (ms) |",
             "|---|---|---|---|"]
    lines += [f"| {r['objective']} | {r['precision']} | {r['plain_ms']:.1f} | "
              f"{r['channels-last_ms']:.1f} |" for r in v["rows"]]
    c = v["compile"]
    if "skipped" in c:
        lines += ["", f"torch.compile: skipped ({c['skipped']})."]
    return lines + [f"- torch.compile, {kind} ({r['precision']}, {r['layout']}): "
                    f"{r['compiled_ms']:.1f} ms vs {r['eager_ms']:.1f} ms eager; first step "
                    f"(compiling) {r['first_step_s']:.0f} s"
                    for kind, r in c.items() if kind != "skipped"]


#: each part's Markdown section, from its figures (when it measured any) and the run's meta
SECTIONS: dict[str, tuple[str, Callable[[dict, dict], list[str]]]] = {
    "p1": ("rows", _md_p1), "objectives": ("rows", _md_objectives), "dp": ("rows", _md_dp),
    "loader": ("rows", _md_loader), "federation": ("rounds", _md_federation),
    "variants": ("rows", _md_variants)}


def markdown(f: dict) -> str:
    """The figures as Markdown sections (what docs/benchmarks.md would quote)."""
    m = f["meta"]
    lines = ["# GPU check (`make gpu-check`)", "",
             f"{m['date']}, {m['device_name']}, torch {m['torch']}, CUDA {m['cuda']}, "
             f"{m['cpus']} CPU cores; AMP of P1: {m['amp']}. Parts: {', '.join(m['parts'])}."]
    for part, (key, section) in SECTIONS.items():
        if key in f.get(part, {}):
            lines += ["", *section(f[part], m)]
    failed = [p for p in m["parts"] if "error" in f.get(p, {})]
    if failed:
        lines += ["", "## Failed parts", ""]
        lines += [f"- {p}: {f[p]['error']}" for p in failed]
    return "\n".join(lines) + "\n"


# -- command ---------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/gpu_check.py", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu (a smoke "
                   "test of this driver, with --quick)")
    p.add_argument("--quick", action="store_true", help="a tiny model and few steps")
    p.add_argument("--parts", default=",".join(PARTS),
                   help=f"comma-separated, in this order: {','.join(PARTS)}")
    p.add_argument("--out", type=Path, default=Path("runs/gpu-check"))
    p.add_argument("--deadline", type=float, default=None,
                   help="epoch seconds by which to be done: torch.compile is skipped when too "
                        "little time is left (default: 7 minutes from now)")
    p.add_argument("--prepare-wheels", type=Path, default=None, metavar="DIR",
                   help="write DIR/requirements-gpu.txt, print the wheels to download, exit")
    return p


def check_device(name: str) -> Any:
    """The torch device, or ValueError (one line) when CUDA is asked for and absent."""
    import torch

    if name != "cpu" and not (name == "cuda" or name.startswith("cuda:")
                              and name[5:].isdigit()):
        raise ValueError(f"--device {name!r}: give cuda, cuda:N or cpu")
    if name != "cpu" and not torch.cuda.is_available():
        raise ValueError("no CUDA GPU here (torch.cuda.is_available() is false): run the GPU "
                         "check on a machine with an NVIDIA GPU (--device cpu --quick: a smoke "
                         "test of the driver)")
    return torch.device(name)


def meta(device: Any, parts: list[str]) -> dict:
    import torch

    cuda = device.type == "cuda"
    return {"date": time.strftime("%Y-%m-%d %H:%M"), "parts": parts,
            "device_name": torch.cuda.get_device_name(device) if cuda else platform.machine(),
            "torch": torch.__version__, "cuda": torch.version.cuda if cuda else None,
            "cpus": os.cpu_count(), "amp": amp_precision(device)}


def run_parts(parts: list[str], sizes: Sizes, device: Any, out: Path, deadline: float) -> dict:
    """Each part in turn; a failing part records its error and the others still run."""
    figures: dict = {"meta": meta(device, parts)}
    for part in parts:
        print(f"== {part} ({time.strftime('%H:%M:%S')}, {deadline - time.time():.0f} s of the "
              "budget left)", flush=True)
        started = time.time()
        try:
            if part == "p1":
                figures[part] = part_p1(sizes, device)
            elif part == "objectives":
                figures[part] = part_objectives(sizes, device)
            elif part == "dp":
                figures[part] = part_dp(sizes, device)
            elif part == "loader":
                figures[part] = part_loader(sizes, device, _step_rate(figures, device))
            elif part == "federation":
                figures[part] = part_federation(sizes, device, out)
            elif part == "variants":
                figures[part] = part_variants(sizes, device, deadline)
        except Exception as exc:  # noqa: BLE001 - every failure is reported, the rest runs
            traceback.print_exc()
            figures[part] = {"error": _reason(exc)}
        bad = [f"{r['objective']} {r['precision']}: {r['error']}"
               for r in figures[part].get("rows", []) if "error" in r]
        if bad:
            figures[part]["error"] = "; ".join(bad)
        figures[part]["seconds"] = time.time() - started
        _free(device)
        save(figures, out)  # after each part: a run cut short keeps what it measured
    return figures


def save(figures: dict, out: Path) -> str:
    """Write ``gpu_check.json`` and ``gpu_check.md`` into ``out``; returns the Markdown."""
    (out / "gpu_check.json").write_text(json.dumps(figures, indent=2, default=str))
    text = markdown(figures)
    (out / "gpu_check.md").write_text(text)
    return text


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"


def _step_rate(figures: dict, device: Any) -> float | None:
    """Images/s of the MoMA step at the AMP precision, from the objectives part if it ran."""
    rows = figures.get("objectives", {}).get("rows", [])
    amp = amp_precision(device)
    return next((r["images_per_s"] for r in rows if r["objective"] == "moma"
                 and r["precision"] == amp and "images_per_s" in r), None)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.prepare_wheels is not None:
        print("\n".join(prepare_wheels(args.prepare_wheels)))
        return 0
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    try:
        if unknown:
            raise ValueError(f"--parts: unknown {', '.join(unknown)}; choose from "
                             f"{', '.join(PARTS)}")
        device = check_device(args.device)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    parts = [p for p in PARTS if p in parts]
    if device.type == "cpu":
        import torch

        torch.set_num_threads(1)  # a smoke test on a shared machine: no busy-waiting pool
    deadline = args.deadline or time.time() + 420
    args.out.mkdir(parents=True, exist_ok=True)
    figures = run_parts(parts, QUICK if args.quick else FULL, device, args.out, deadline)
    print(save(figures, args.out))
    print(f"→ {args.out / 'gpu_check.md'}")
    failed = [p for p in parts if "error" in figures[p]]
    if failed:
        print(f"error: {len(failed)} part(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
