"""The one local-training loop of MoMA-FL.

Used alike by the standalone commands, the simulated federation and a deployed site: given a
student, an objective (CE-only, KD or MoMA, with its site-private state), a data loader and a
:class:`TrainConfig`, it trains and returns the new student state, metrics and example count.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.data import DataLoader

from moma_core.errors import TrainingDiverged  # noqa: F401 (re-exported)
from moma_core.method_config import (  # noqa: F401 (re-export)
    OPTIMIZERS,
    TrainConfig,
    cosine_factor,
)
from moma_core.objectives import Objective
from moma_core.seeding import seed_everything

if TYPE_CHECKING:
    from moma_core.privacy.dp_sgd import DPConfig, PrivacyReport


@dataclass
class TrainResult:
    """What a local training call returns."""

    state: dict[str, torch.Tensor]
    num_examples: int
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)  # one entry per epoch
    privacy: PrivacyReport | None = None  # DP-SGD only: noise, sample rate, steps, ε of the call


ProgressFn = Callable[[int, int, dict[str, float]], None]  # (step, total_steps, running metrics)
EpochEndFn = Callable[[int, dict[str, float]], None]  # (epoch index, epoch's mean losses)


def train_local(student: nn.Module, objective: Objective, loader: DataLoader,
                cfg: TrainConfig, device: str | torch.device = "cpu",
                progress: ProgressFn | None = None,
                on_epoch_end: EpochEndFn | None = None, *,
                privacy: DPConfig | None = None) -> TrainResult:
    """Train ``student`` (in place) with ``objective`` on ``loader``; see module docstring.

    ``on_epoch_end`` is called after each epoch (evaluation, checkpoints) with the student in
    train mode; it may switch modes, the loop restores train mode.
    ``num_examples`` counts the examples actually seen (epochs × dataset, or fewer with
    ``max_steps``). Raises :class:`TrainingDiverged` on a non-finite loss.

    ``privacy`` trains with sample-level DP-SGD (:mod:`moma_core.privacy.dp_sgd`): the student
    and the objective's trainable heads are wrapped by Opacus (per-sample clipping, noise,
    Poisson-sampled batches from ``loader``'s data set) and this same loop runs on them; the
    result's ``privacy`` reports what the call spent. The student must already be free of
    BatchNorm (``make_private_compatible``) and the objective per-sample (CE, KD, dp-moma).
    """
    if cfg.seed is not None:
        seed_everything(cfg.seed)
    device = torch.device(device)
    student.to(device).train()
    objective.to(device).train()
    params = list(student.parameters()) + list(objective.trainable_parameters())
    private = None
    if privacy is not None:
        from moma_core.privacy.dp_sgd import freeze_for_dp, make_private_training

        frozen = freeze_for_dp(student, privacy.trainable, objective)
        params = [p for p in params if p.requires_grad]
        optimizer = _make_optimizer(params, cfg)
        private = make_private_training(student, objective, optimizer, loader, privacy, cfg,
                                        device, frozen)
        optimizer, loader = private.optimizer, private.loader
    else:
        optimizer = _make_optimizer(params, cfg)
    logical_batches = len(loader)
    if private is not None:
        loader = private.physical_loader()  # logical batches split to privacy.physical_batch
    steps_per_epoch = logical_batches if cfg.max_steps is None else min(logical_batches,
                                                                        cfg.max_steps)
    total_steps = cfg.epochs * logical_batches
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    scheduler = _make_scheduler(optimizer, cfg, total_steps, max(steps_per_epoch, 1))
    anchor = ([p.detach().clone() for p in student.parameters()]
              if cfg.proximal_mu > 0 else None)
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    step, seen, history = 0, 0, []
    while step < total_steps:
        sums: dict[str, float] = {}
        count, noise_only = 0, 0
        student.train()
        for batch in loader:
            if step >= total_steps:
                break
            x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
            extra = {"index": batch[2].to(device)} if len(batch) > 2 else {}
            if private is not None and len(y) == 0:  # Poisson sampling drew no example
                private.noise_step()
                scheduler.step()
                step += 1
                noise_only += 1
                continue
            with torch.autocast(device.type, enabled=use_amp):
                loss, parts = objective.loss(student, x, y, **extra)
                if anchor is not None:
                    loss = loss + _proximal_term(student, anchor, cfg.proximal_mu)
            if not torch.isfinite(loss):
                raise TrainingDiverged(f"non-finite loss at step {step}: {float(loss.detach())}")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            seen += len(y)
            count += 1
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            if private is not None and private.step_skipped():
                continue  # a physical batch of a logical one: clipped and summed, no step yet
            scheduler.step()
            objective.after_step(student)
            step += 1
            if progress is not None:
                progress(step, total_steps, {k: v / count for k, v in sums.items()})
        if count == 0 and noise_only == 0:
            raise ValueError("the training loader is empty")
        # an epoch whose Poisson batches all came out empty took its (noise) steps: no losses
        history.append({k: v / count for k, v in sums.items()} if count else {})
        if on_epoch_end is not None:
            on_epoch_end(len(history) - 1, history[-1])
    metrics = dict(history[-1])
    metrics["steps"] = float(step)
    state = {k: v.detach().cpu().clone() for k, v in student.state_dict().items()}
    report = private.close() if private is not None else None
    return TrainResult(state=state, num_examples=seen, metrics=metrics, history=history,
                       privacy=report)


def _make_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; choose sgd or adamw")


def _make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Cosine to lr·1e-3, stepped per epoch as in the reference (constant within an epoch)."""
    if not cfg.cosine or total_steps <= steps_per_epoch:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    epochs = math.ceil(total_steps / steps_per_epoch)

    def factor(step: int) -> float:
        return cosine_factor((step // steps_per_epoch) / epochs)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _proximal_term(model: nn.Module, anchor: list[torch.Tensor], mu: float) -> torch.Tensor:
    sq = [((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor, strict=True)]
    return 0.5 * mu * torch.stack(sq).sum()
