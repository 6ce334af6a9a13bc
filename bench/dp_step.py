"""The cost of one DP-SGD step of ``dp-moma`` relative to the same step without DP.

Both steps train the same student made Opacus-compatible (BatchNorm → GroupNorm,
``make_private_compatible``) with the same objective (``DPMoMA``) on the same batch. The DP
step is the one ``train_local(..., privacy=DPConfig(...))`` takes (``make_private_training``:
Opacus' hooks, per-sample clipping, Gaussian noise), with **Poisson sampling off** so that every
step sees exactly the same B examples (with Poisson sampling only the expected size is B).
For context: the non-DP dp-moma step / vanilla KD on the same batch, and Opacus' other
per-sample-gradient modes where they work with this model (``functorch``, ``ghost``, ``ew``:
each is wrapped here, moma_core is not changed; one that fails is reported with its reason,
one that works is checked against the hooks' clipped gradient). CPU, one torch thread, one
process, the variants interleaved and repeated; the figures are medians. Figures, not a test.

    .venv/bin/python bench/dp_step.py [--b0] [--reps N] [--keys K] [--out runs/bench-perf]

Writes ``dp_step.md`` into ``--out`` and prints it.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import opacus  # noqa: E402
import timm  # noqa: E402
from opacus import PrivacyEngine  # noqa: E402
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping  # noqa: E402

from moma_core.models import create_classifier, feature_dim, features_and_logits  # noqa: E402
from moma_core.objectives import ObjectiveConfig, build_objective  # noqa: E402
from moma_core.privacy.dp_moma import DPMoMA, _keys_of_features  # noqa: E402
from moma_core.privacy.dp_sgd import (  # noqa: E402
    DPConfig,
    make_private_compatible,
    make_private_training,
    private_parts,
    use_contiguous_grad_samplers,
)
from moma_core.train import TrainConfig  # noqa: E402
from moma_protocol.settings import DP_GROUP_SIZE  # noqa: E402

for _message in ("Secure RNG turned off", "Full backward hook is firing",
                 "Using a non-full backward hook", "Using a non-zero noise"):
    warnings.filterwarnings("ignore", message=_message)

SIZES = {  # name: (timm model, image size, batch, default repetitions, warm-up steps)
    "tiny": ("test_efficientnet", 64, 32, 10, 2),
    "b0": ("efficientnet_b0", 224, 16, 2, 1),
}
NUM_CLASSES = 4
NOISE = 1.0
MAX_GRAD_NORM = 1.0
GOAL = 2.0
KD_BN = "kd, BatchNorm student (no DP)"
KD_GN = "kd, GroupNorm student (no DP)"
BASE = "dp-moma, no DP"
HOOKS = "dp-moma, DP-SGD hooks (train_local's path)"
OTHER_MODES = ("functorch", "ghost", "ew")
CHANGE_NEEDED = {
    "functorch": "make_private_training always wraps with grad_sample_mode='hooks': using it in "
                 "train_local needs a grad_sample_mode option in moma_core/privacy/dp_sgd.py",
    "ghost": "needs a grad_sample_mode option in dp_sgd.make_private_training, per-sample "
             "losses from DPMoMA.loss (it returns their mean) and the two-pass "
             "DPTensorFastGradientClipping backward in train_local's loop",
    "ew": "needs the whole loss inside the wrapped module's forward (PrivateParts.forward "
          "returns student(x) only; the objective calls the student and its heads itself)",
}

Step = Callable[[torch.Tensor, torch.Tensor], None]


def per_sample_loss(obj: DPMoMA, student: nn.Module, x: torch.Tensor, y: torch.Tensor
                    ) -> torch.Tensor:
    """ℓ_i of ``DPMoMA.loss`` for each sample (shape B); their mean is that loss (checked in
    :func:`build`). Ghost clipping needs them; ``DPMoMA.loss`` returns only the mean."""
    cfg = obj.cfg
    f_s, z_s = features_and_logits(student, x)
    with torch.no_grad():
        f_t, z_t = features_and_logits(obj.teacher, x)
    total = cfg.ce_weight * F.cross_entropy(z_s, y, reduction="none")
    if obj.same_task:
        t = cfg.kd_temperature
        kl = F.kl_div(F.log_softmax(z_s / t, dim=1), F.softmax(z_t / t, dim=1),
                      reduction="none").sum(dim=1) * t * t
        total = total + cfg.kl_weight * kl
    if obj.use_nce:
        q = obj.query(f_s) / cfg.nce_temperature
        k = _keys_of_features(f_t, obj.key_head).to(q.dtype)
        keys = obj.public_keys.to(q.dtype)
        logits = torch.cat([(q * k).sum(dim=1, keepdim=True), q @ keys.t()], dim=1)
        nce = F.cross_entropy(logits, torch.zeros_like(y), reduction="none")
        total = total + cfg.nce_weight * nce
    return total


@dataclass
class Setup:
    """The variants of one model size, ready to be timed."""

    model: str
    image: int
    batch: int
    keys: int
    warmup: int
    x: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    y: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    steps: dict[str, Step] = field(default_factory=dict)
    agreement: dict[str, float] = field(default_factory=dict)  # mode: rel. diff. to hooks
    failures: dict[str, str] = field(default_factory=dict)  # mode: why it does not work
    coverage: str = ""


def _sgd(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=1e-3, momentum=0.9)


def _params(student: nn.Module, obj: nn.Module) -> list[nn.Parameter]:
    return list(student.parameters()) + list(obj.trainable_parameters())


def _loop_step(student: nn.Module, obj: nn.Module, optimizer: torch.optim.Optimizer) -> Step:
    """The body of train_local's loop (without AMP, which is off on the CPU)."""
    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        loss, _ = obj.loss(student, x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        obj.after_step(student)
    return step


def _ghost_step(student: nn.Module, obj: DPMoMA, module: nn.Module,
                optimizer: torch.optim.Optimizer) -> Step:
    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = DPTensorFastGradientClipping(module, optimizer, per_sample_loss(obj, student, x, y),
                                            "mean")
        loss.backward()
        optimizer.step()
        obj.after_step(student)
    return step


def _engine_step(student: nn.Module, obj: DPMoMA, loader: DataLoader, mode: str,
                 noise: float) -> tuple[Step, nn.Module, torch.optim.Optimizer]:
    """A DP step with Opacus' ``mode``, wrapped as make_private_training does (one module of
    the student and the heads), but with PrivacyEngine called here."""
    parts = private_parts(student, obj)
    parts.train()
    engine = PrivacyEngine(accountant="rdp")
    out = engine.make_private(module=parts, optimizer=_sgd(_params(student, obj)),
                              data_loader=loader, noise_multiplier=noise,
                              max_grad_norm=MAX_GRAD_NORM, poisson_sampling=False,
                              grad_sample_mode=mode)
    module, optimizer = out[0], out[1]
    if mode == "hooks":
        use_contiguous_grad_samplers(module)
    if mode == "ghost":
        return _ghost_step(student, obj, module, optimizer), module, optimizer
    return _loop_step(student, obj, optimizer), module, optimizer


def _noise_free_gradient(student: nn.Module, obj: DPMoMA, loader: DataLoader, mode: str,
                         x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The clipped, averaged gradient ``mode`` gives on (x, y) with zero noise (copies)."""
    student, obj = copy.deepcopy(student), copy.deepcopy(obj)
    _, module, optimizer = _engine_step(student, obj, loader, mode, noise=0.0)
    optimizer.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the same dropout masks for every mode
    if mode == "ghost":
        loss = per_sample_loss(obj, student, x, y)
        DPTensorFastGradientClipping(module, optimizer, loss, "mean").backward()
    else:
        obj.loss(student, x, y)[0].backward()
    optimizer.pre_step()
    return torch.cat([p.grad.reshape(-1) for p in optimizer.params]).detach()


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:160]}{'…' if len(text) > 160 else ''}"


def sampler_coverage(module: nn.Module) -> str:
    """Counts of ``module``'s trainable layer types and how Opacus handles each."""
    from opacus.grad_sample import GradSampleModule
    from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import (
        GradSampleModuleFastGradientClipping,
    )

    from moma_core.privacy.dp_sgd import _norm_act_samplers

    counts = Counter(type(m) for m in module.modules()
                     if any(p.requires_grad for p in m.parameters(recurse=False)))
    ours = _norm_act_samplers(module)  # what train_local's path adds to Opacus' registry
    parts = []
    for kind, n in counts.most_common():
        how = ("sampler" if kind in GradSampleModule.GRAD_SAMPLERS else
               "moma-fl's sampler" if kind in ours else "functorch")
        if kind in GradSampleModuleFastGradientClipping.NORM_SAMPLERS:
            how += ", ghost"
        parts.append(f"{n} {kind.__name__} ({how})")
    return ", ".join(parts)


def build(size: str, num_keys: int) -> Setup:
    """Teacher, students, objectives and the step of every variant of ``size``."""
    model_name, image, batch, _, warmup = SIZES[size]
    setup = Setup(model_name, image, batch, num_keys, warmup)
    torch.manual_seed(0)
    teacher = create_classifier(model_name, NUM_CLASSES).eval()  # keeps BatchNorm, frozen
    torch.manual_seed(1)
    student_bn = create_classifier(model_name, NUM_CLASSES).train()
    student_gn = make_private_compatible(student_bn, group_size=DP_GROUP_SIZE)  # as a run builds it
    # K public keys: random unit vectors (their values do not change the step's cost)
    keys = F.normalize(torch.randn(num_keys, feature_dim(teacher)), dim=1)
    obj0 = build_objective(ObjectiveConfig(kind="dp-moma"), student_gn, teacher,
                           same_task=True, public_keys=keys)
    x = torch.randn(batch, 3, image, image)
    y = torch.randint(0, NUM_CLASSES, (batch,))
    loader = DataLoader(TensorDataset(x, y), batch_size=batch)

    def fresh() -> tuple[nn.Module, DPMoMA]:
        return copy.deepcopy(student_gn), copy.deepcopy(obj0)

    s = copy.deepcopy(student_bn)
    kd = build_objective(ObjectiveConfig(kind="kd"), s, teacher, same_task=True).train()
    setup.steps[KD_BN] = _loop_step(s, kd, _sgd(_params(s, kd)))
    s = copy.deepcopy(student_gn)
    kd = build_objective(ObjectiveConfig(kind="kd"), s, teacher, same_task=True).train()
    setup.steps[KD_GN] = _loop_step(s, kd, _sgd(_params(s, kd)))
    s, o = fresh()
    o.train()
    setup.steps[BASE] = _loop_step(s, o, _sgd(_params(s, o)))

    s, o = fresh()  # the project's own path, exactly as train_local wraps it
    private = make_private_training(
        s, o, _sgd(_params(s, o)), loader,
        DPConfig(noise_multiplier=NOISE, max_grad_norm=MAX_GRAD_NORM, poisson_sampling=False),
        TrainConfig())
    setup.steps[HOOKS] = _loop_step(s, o, private.optimizer)

    s, o = fresh()
    with torch.no_grad():
        torch.manual_seed(2)
        mean = o.loss(s, x, y)[0]
        torch.manual_seed(2)
        mirror = per_sample_loss(o, s, x, y).mean()
    if not torch.allclose(mean, mirror, rtol=1e-5, atol=1e-6):
        raise RuntimeError(f"per_sample_loss no longer matches DPMoMA.loss ({mirror} vs {mean})")
    s, o = fresh()
    reference = _noise_free_gradient(s, o, loader, "hooks", x, y)
    for mode in OTHER_MODES:
        s, o = fresh()
        try:
            grad = _noise_free_gradient(s, o, loader, mode, x, y)
            setup.agreement[mode] = float((grad - reference).norm() / reference.norm())
            s, o = fresh()
            step, _, _ = _engine_step(s, o, loader, mode, NOISE)
            step(x, y)  # a first step must work too
        except Exception as exc:  # noqa: BLE001 - any failure of a mode is a finding
            setup.failures[mode] = _reason(exc)
            setup.agreement.pop(mode, None)
            continue
        setup.steps[f"dp-moma, DP-SGD {mode}"] = step
    setup.x, setup.y = x, y
    setup.coverage = sampler_coverage(private_parts(*fresh()))
    return setup


def measure(setup: Setup, reps: int) -> dict[str, float]:
    """Median seconds per step of each variant, the variants interleaved."""
    times: dict[str, list[float]] = {name: [] for name in setup.steps}
    for rep in range(setup.warmup + reps):
        for name, step in setup.steps.items():
            start = time.perf_counter()
            step(setup.x, setup.y)
            if rep >= setup.warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def report(results: list[tuple[Setup, dict[str, float], int]], load: float) -> str:
    """The Markdown section of the results (``load``: the 1-minute load average at start)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    machine = platform.processor() or platform.machine()
    reps = ", ".join(f"{s.model}: {n} after {s.warmup} warm-up" for s, _, n in results)
    lines = [
        "## DP-SGD step of dp-moma / the same step without DP", "",
        f"{time.strftime('%Y-%m-%d')}, {machine}, {os.cpu_count()} cores ({usable} usable), "
        f"load average {load:.1f} at start, torch {torch.__version__}, opacus "
        f"{opacus.__version__}, timm {timm.__version__}; CPU, "
        f"1 torch thread; medians of interleaved repetitions ({reps}). One batch of random "
        "images; the student made Opacus-compatible (GroupNorm) for every dp-moma row; "
        "dp-moma with its defaults (attention over the public keys, K random unit keys: their "
        f"values do not change the cost). DP: noise multiplier {NOISE}, "
        f"max_grad_norm {MAX_GRAD_NORM}, **Poisson sampling off** (every step the same B "
        f"examples). Goal: DP-SGD step (hooks, train_local's path) / no-DP step ≤ {GOAL}.", "",
        "| model | input | batch | K | step | median (ms) | / dp-moma no DP | gradient vs hooks |",
        "|---|---|---|---|---|---|---|---|",
    ]
    verdicts, context, failures, coverage = [], [], [], []
    for setup, med, _ in results:
        base = med[BASE]
        for name, t in med.items():
            mode = name.removeprefix("dp-moma, DP-SGD ")
            agree = (f"{setup.agreement[mode]:.1e}" if mode in setup.agreement
                     else "(reference)" if name == HOOKS else "")
            lines.append(f"| {setup.model} | {setup.image} px | {setup.batch} | {setup.keys} | "
                         f"{name} | {t * 1000:.0f} | {t / base:.2f}× | {agree} |")
        ratio = med[HOOKS] / base
        verdicts.append(f"{setup.model} {setup.image} px: {ratio:.2f}× "
                        f"({'met' if ratio <= GOAL else 'not met'})")
        context.append(f"{setup.model}: dp-moma / kd = {base / med[KD_GN]:.2f}× (GroupNorm "
                       f"student), GroupNorm / BatchNorm kd = {med[KD_GN] / med[KD_BN]:.2f}×")
        for mode, why in setup.failures.items():
            failures.append(f"- `{mode}` fails on {setup.model}: {why}")
        coverage.append(f"{setup.model}: {setup.coverage}")
    lines += ["", f"**Goal DP / no DP ≤ {GOAL}:** " + "; ".join(verdicts) + ".", "",
              "Context: " + "; ".join(context) + ".", "",
              "Trainable layers by how Opacus computes their per-sample gradients (Opacus' own "
              "sampler / moma-fl's sampler (hooks path) / functorch fallback; ghost: norm "
              "without per-sample gradient): "
              + "; ".join(coverage) + ".", ""]
    if failures:
        lines += ["Opacus modes that do not work with this model:", *failures, ""]
    lines += ["Modes other than hooks are wrapped by this benchmark only; to use one in "
              "train_local:"]
    lines += [f"- `{mode}`: {why}." for mode, why in CHANGE_NEEDED.items()]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--b0", action="store_true",
                   help="also efficientnet_b0 at 224 px, batch 16 (slow: a DP step takes "
                        "minutes on one thread; 20 min or more in all)")
    p.add_argument("--reps", type=int, default=None,
                   help="repetitions per variant (default: 10 tiny, 2 b0)")
    p.add_argument("--keys", type=int, default=ObjectiveConfig().queue_size,
                   help="number of public keys K (default: MoMA's default queue size)")
    p.add_argument("--out", type=Path, default=Path("runs/bench-perf"))
    args = p.parse_args()
    if args.reps is not None and args.reps < 1:
        p.error("--reps must be at least 1")
    torch.set_num_threads(1)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    plan = ["tiny", "b0"] if args.b0 else ["tiny"]
    results = []
    for size in plan:
        reps = args.reps or SIZES[size][3]
        setup = build(size, args.keys)
        med = measure(setup, reps)
        results.append((setup, med, reps))
        print(f"{setup.model} {setup.image}px B={setup.batch}: "
              + ", ".join(f"{n} {t * 1000:.0f} ms" for n, t in med.items()), flush=True)
    text = report(results, load)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dp_step.md").write_text(text)
    print(text)
    print(f"→ {args.out / 'dp_step.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
