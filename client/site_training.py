"""One site's part of a round, in plain PyTorch: the ClientApp is thin glue around this.

Train: load the cached teacher and this run's private MoMA state, put the global student in,
run moma_core's one loop (:func:`train_local`), save the private state back to the site's disk,
return what the site sends: the student's floating-point tensors less the layers it keeps
(:func:`local_keys`: FedBN's normalisation layers) and the allow-listed aggregate metrics.
Evaluate: the global student on the site's validation split.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.data import Dataset

from client.site_config import SiteSettings
from client.site_errors import MissingTeacher, PrivacyBudgetExceeded, PrivacyRefused
from client.site_state import SiteState, TeacherCache
from moma_core import objective_registry
from moma_core.checkpoint import CheckpointError
from moma_core.errors import ClassMismatch, DataError
from moma_core.evaluate import evaluate
from moma_core.local_round import RoundSetup, local_round
from moma_core.models import build_model
from moma_core.objectives import same_task
from moma_core.seeding import derive_seed
from moma_core.sources import SiteData, make_loader, open_site_data
from moma_core.standalone import resolve_device
from moma_core.train import TrainConfig
from moma_protocol.settings import RunConfig
from moma_protocol.wire import (
    DP_EPSILON,
    TEACHER_CACHED,
    TRAIN_METRICS,
    local_keys,
    wire_state,
)

if TYPE_CHECKING:
    from moma_core.privacy.dp_sgd import DPConfig

log = logging.getLogger("moma.client")
#: seed of dp-moma's public synthetic images (the same at every site; not a site's data)
PUBLIC_SEED = 20240901


class StudentMismatch(CheckpointError):
    """The global student does not fit this site (another model or label space)."""

    category = "config-error"


@functools.lru_cache(maxsize=4)
def site_data(settings: SiteSettings, image_size: int, augment: str,
              classes: tuple[str, ...] | None = None) -> SiteData:
    """The site's datasets (cached in-process between rounds of one run).

    With the run's ``classes``, labels are mapped by class *name* to the run's label order
    (folder, manifest and NPZ class names); a site whose classes are not the run's, or come in
    another fixed order (synthetic data), is refused — never trained with swapped labels.
    """
    def open_data(names: tuple[str, ...] | None) -> SiteData:
        return open_site_data(settings.data_path, image_size=image_size, augment=augment,
                              seed=settings.data_seed, n=settings.n,
                              site_index=settings.site_index, num_sites=settings.num_sites,
                              class_probs=settings.class_probs,
                              on_error="skip" if settings.skip_bad_images else "raise",
                              allow_outside_paths=settings.allow_outside_paths,
                              classes=list(names) if names else None)

    try:
        data = open_data(classes)
    except ClassMismatch:
        raise
    except DataError:
        if not classes:
            raise
        try:  # does the data name a class the run does not? then say so, with both lists
            own = tuple(open_data(None).classes)
        except DataError:
            own = ()
        if set(own) - set(classes):
            raise ClassMismatch(class_mismatch_text(own, classes)) from None
        raise
    if classes and tuple(data.classes) != tuple(classes):
        raise ClassMismatch(class_mismatch_text(tuple(data.classes), classes))
    return data


def class_mismatch_text(own: tuple[str, ...], run: tuple[str, ...]) -> str:
    """Both class lists, and what differs: the site refuses the run with this in its own log
    (the coordinator only receives the category ``class-mismatch``)."""
    extra = [c for c in own if c not in run]
    missing = [c for c in run if c not in own]
    diff = []
    if extra:
        diff.append(f"only at this site: {extra}")
    if missing:
        diff.append(f"not at this site: {missing}")
    if not diff:
        diff.append("same names in another order")
    return (f"this site's classes {list(own)} are not the run's {list(run)} "
            f"({'; '.join(diff)}): the coordinator's --classes and this site's data must name "
            "the same classes, in the run's order for synthetic data; this site refuses the run")


def student_for(run: RunConfig, data: SiteData, global_state: dict[str, torch.Tensor],
                local: dict[str, torch.Tensor]) -> nn.Module:
    """The global student on this site's label space, with FedBN's local layers if kept."""
    fed = run.federation
    student = build_model(run.student_architecture(tuple(data.classes)))
    expected = wire_state(student.state_dict())
    kept = local_keys(fed.fedbn, student) & set(local)  # may come from the site's own disk
    bad = [k for k in expected if (k not in global_state and k not in kept)
           or (k in global_state and tuple(global_state[k].shape) != tuple(expected[k].shape))]
    if bad:
        raise StudentMismatch(f"global student does not fit {fed.student_model} with "
                              f"{len(data.classes)} classes at this site: {bad[:3]}")
    student.load_state_dict(global_state, strict=False)
    if fed.fedbn and local:
        student.load_state_dict(local, strict=False)
    return student


def train_round(settings: SiteSettings, run: RunConfig, server_round: int,
                global_state: dict[str, torch.Tensor], teacher_sha: str
                ) -> tuple[dict[str, torch.Tensor], int, dict[str, float]]:
    """Train the global student locally; returns (tensors to send, examples, metrics).

    The tensors to send leave out :func:`local_keys` (saved to ``local.safetensors`` instead).
    """
    start = time.time()
    fed, tr = run.federation, run.training
    if settings.require_dp and run.privacy.dp != "dp-sgd":
        raise PrivacyRefused("this site trains only with DP-SGD (require-dp); the run has "
                             f"dp = {run.privacy.dp}")
    if settings.require_client_dp and run.privacy.client_dp == "off":
        raise PrivacyRefused("this site trains only under client-level DP "
                             "(require-client-dp); the run has client-dp = off")
    device = resolve_device(settings.device)
    cache = TeacherCache(settings.cache_dir, settings.teacher_signer)
    declared = objective_registry.declaration(run.objective.objective)
    distils = declared.needs_teacher
    if distils and not cache.has(teacher_sha):
        raise MissingTeacher(f"teacher {teacher_sha[:12]}… is not in {cache.dir} (or fails "
                             "its hash or signature check)")
    state = SiteState(settings.cache_dir, fed.run_name)
    saved, local = state.load(teacher_sha)
    data = site_data(settings, fed.image_size, tr.augment, run.class_names)
    seed = derive_seed(fed.seed, settings.site_name, server_round)
    student = student_for(run, data, global_state, local)
    teacher, t_arch = cache.load(teacher_sha) if distils else (None, None)
    public = public_keys(teacher, teacher_sha, run) if declared.needs_public_keys else None
    setup = RoundSetup(run.objective_config(), data.train, tr.batch_size, teacher,
                       same_task(t_arch.classes, data.classes) if t_arch else None,
                       public, device)
    cfg = replace(run.train_config(server_round), seed=seed)
    private: PrivateRound | None = None

    def privacy(batches: int) -> DPConfig | None:
        """Both privacy ledgers checked and written before the round's first step."""
        nonlocal private
        private = dp_round(settings, run, server_round, cfg, data.train, batches)
        client_dp_round(settings, run, server_round)
        return private.config if private is not None else None

    trained = local_round(student, setup, cfg, saved, privacy)
    result = trained.result
    keep = local_keys(fed.fedbn, student)
    state.save(trained.objective_state, {k: v for k, v in result.state.items() if k in keep},
               {"teacher_sha256": teacher_sha, "round": server_round, "run": fed.run_name,
                "site": settings.site_name})
    metrics = {f"train-{k}": float(v) for k, v in result.metrics.items()}
    metrics["train-time-s"] = time.time() - start
    if private is not None:
        metrics[DP_EPSILON] = private.epsilon
    metrics[TEACHER_CACHED] = float(distils)
    unlisted = sorted(set(metrics) - TRAIN_METRICS)
    if unlisted:
        log.debug("metrics kept at the site (not in the protocol's allow-list): %s", unlisted)
    send = {k: v for k, v in wire_state(result.state).items() if k not in keep}
    return send, result.num_examples, {k: v for k, v in metrics.items() if k in TRAIN_METRICS}


_PUBLIC_KEYS: dict[tuple[str, int, int], torch.Tensor] = {}


def public_keys(teacher: nn.Module, teacher_sha: str, run: RunConfig) -> torch.Tensor:
    """dp-moma's negatives: the frozen teacher's keys of ``dp-public-images`` synthetic images
    drawn from a fixed public seed — the same at every site, none of them private (kept per
    teacher in a warm worker)."""
    from moma_core.objectives.dp_moma import public_queue

    key = (teacher_sha, run.federation.image_size, run.privacy.dp_public_images)
    if key not in _PUBLIC_KEYS:
        images = open_site_data("synthetic:target", image_size=key[1], augment="none",
                                seed=PUBLIC_SEED, n=key[2]).train
        _PUBLIC_KEYS.clear()
        _PUBLIC_KEYS[key] = public_queue(teacher, images)
    return _PUBLIC_KEYS[key]


@dataclass
class PrivateRound:
    config: DPConfig
    epsilon: float  # the site's cumulative ε once this round is counted


def dp_round(settings: SiteSettings, run: RunConfig, server_round: int, cfg: TrainConfig,
             train_set: Dataset, batches: int) -> PrivateRound | None:
    """DP-SGD settings of this round at this site, its budget checked and *recorded* in the
    site's privacy ledger before any private step is taken (a round that then fails has still
    been counted: the ledger never under-states what was spent). None without DP.

    ``dp-unit = patient``: the units are the patients of ``train_set`` (its ``patient_ids``;
    a site without them refuses the run), the sample rate and steps those of
    :mod:`moma_core.privacy.patient_sampling`, the ledger's unit ``patient``."""
    if run.privacy.dp != "dp-sgd":
        return None
    from moma_core.privacy.accounting import DPStep, default_delta, round_steps
    from moma_core.privacy.dp_sgd import DPConfig
    from moma_core.privacy.ledger import BudgetRefused, PrivacyLedger

    p = run.privacy
    units, what = len(train_set), "examples"
    if p.dp_unit == "patient":
        from moma_core.privacy.patient_sampling import patient_groups, patient_steps_per_epoch

        ids = getattr(train_set, "patient_ids", None)
        if ids is None:
            raise PrivacyRefused("the run's dp-unit is patient but this site's data names no "
                                 "patients (a CSV manifest with a patient_id column)")
        try:
            groups = patient_groups(ids)
        except ValueError as exc:
            raise PrivacyRefused(f"dp-unit patient: {exc}") from None
        units, what = len(groups), "patients"
        batches = patient_steps_per_epoch(groups, p.dp_patches_per_patient,
                                          run.training.batch_size)
    delta = p.dp_delta or default_delta(units)
    ceiling = settings.max_delta or default_delta(units)
    if delta > ceiling:  # ε is reported at δ: a larger δ would make the budget look unspent
        raise PrivacyRefused(f"the run's dp-delta {delta:g} is above this site's ceiling "
                             f"{ceiling:g} (max-delta; default 1/(10 x {units} {what}))")
    steps = round_steps(cfg.epochs, batches, cfg.max_steps)
    noise = p.dp_noise_multiplier
    if p.dp_target_epsilon > 0:  # the σ with which the planned rounds spend exactly that ε
        noise = noise_for_run(p.dp_target_epsilon, delta, 1.0 / max(batches, 1),
                              run.federation.num_rounds * steps, p.dp_accountant)
    step = DPStep(noise, 1.0 / max(batches, 1), steps)
    ledger = PrivacyLedger(settings.cache_dir, path=settings.ledger)
    try:  # checked and recorded in one step under the ledger's lock; the cap holds for every
        # budget the round spends (a patient-level round spends the patch level's too)
        entry = ledger.spend(run.federation.run_name, server_round, step, p.dp_unit, delta,
                             p.dp_accountant, eps_max=settings.max_epsilon or None)
    except BudgetRefused as exc:
        raise PrivacyBudgetExceeded(exc.check.status) from None
    log.info("DP-SGD round %d (unit %s): noise %.3g, sample rate %.4g, %d steps; site ε now "
             "%.3f (δ %.2g, %s)", server_round, p.dp_unit, step.noise_multiplier,
             step.sample_rate, steps, entry.epsilon, delta, p.dp_accountant)
    config = DPConfig(max_grad_norm=p.dp_max_grad_norm, noise_multiplier=noise,
                      delta=delta, accountant=p.dp_accountant, unit=p.dp_unit,
                      patches_per_patient=p.dp_patches_per_patient, trainable=p.dp_trainable,
                      physical_batch=p.dp_physical_batch)
    return PrivateRound(config, entry.epsilon)


@functools.lru_cache(maxsize=16)
def noise_for_run(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                  accountant: str) -> float:
    """``dp-target-epsilon``: the noise multiplier with which ``steps`` steps (the run's
    planned rounds at this site) spend ``target_epsilon`` at ``delta`` (the same every round;
    a site's earlier runs are its ledger's business: its ``max-epsilon`` still caps them)."""
    from moma_core.privacy.accounting import noise_for_target_epsilon

    try:
        return noise_for_target_epsilon(target_epsilon, delta, sample_rate, steps, accountant)
    except ValueError as exc:
        raise PrivacyRefused(f"dp-target-epsilon {target_epsilon:g}: {exc}") from None


def client_dp_round(settings: SiteSettings, run: RunConfig, server_round: int) -> None:
    """With client-level DP (``client-dp``), check the site's ``max-client-epsilon`` and record
    this round in the site's privacy ledger before training: one Gaussian release of the run's
    noise multiplier, unit ``site``, no amplification (sample rate 1). The site's own account
    of what the coordinator reports in results.json; a round that is not aggregated in the end
    is still counted (the ledger never under-states)."""
    if run.privacy.client_dp == "off":
        return
    from moma_core.privacy.accounting import DPStep
    from moma_core.privacy.ledger import BudgetRefused, PrivacyLedger

    p = run.privacy
    step = DPStep(p.client_dp_noise_multiplier, 1.0, 1)
    ledger = PrivacyLedger(settings.cache_dir, path=settings.ledger)
    try:  # checked and recorded in one step under the ledger's lock
        entry = ledger.spend(run.federation.run_name, server_round, step, "site",
                             p.client_dp_delta, "rdp", mechanism="client-dp",
                             eps_max=settings.max_client_epsilon or None)
    except BudgetRefused as exc:
        raise PrivacyBudgetExceeded(exc.check.status) from None
    log.info("client-level DP round %d (%s, noise %.3g): site-level ε now %.3f (δ %.2g)",
             server_round, p.client_dp, p.client_dp_noise_multiplier, entry.epsilon,
             p.client_dp_delta)


def evaluate_round(settings: SiteSettings, run: RunConfig,
                   global_state: dict[str, torch.Tensor]) -> tuple[int, dict[str, float]]:
    """Metrics of the global student on this site's validation split."""
    device = resolve_device(settings.device)
    fed = run.federation
    data = site_data(settings, fed.image_size, run.training.augment, run.class_names)
    local = SiteState(settings.cache_dir, fed.run_name).local_layers()
    student = student_for(run, data, global_state, local)
    loader = make_loader(data.val, run.training.batch_size * 2, train=False, device=device)
    m = evaluate(student, loader, len(data.classes), device)
    return m["num_examples"], {"loss": m["loss"], "accuracy": m["accuracy"],
                               "macro-f1": m["macro_f1"], "kappa": m["kappa"]}
