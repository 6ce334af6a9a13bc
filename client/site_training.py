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
from dataclasses import replace

import torch
from torch import nn

from client.site_config import SiteSettings
from client.site_errors import MissingTeacher
from client.site_state import SiteState, TeacherCache
from moma_core.checkpoint import CheckpointError
from moma_core.data.datasets import DataError
from moma_core.evaluate import evaluate
from moma_core.models import Architecture, build_model
from moma_core.objectives import build_objective, same_task, training_set
from moma_core.seeding import derive_seed, seed_everything
from moma_core.sources import SiteData, make_loader, open_site_data
from moma_core.standalone import resolve_device
from moma_core.train import train_local
from moma_protocol.settings import RunConfig
from moma_protocol.wire import TEACHER_CACHED, TRAIN_METRICS, local_keys, wire_state

log = logging.getLogger("moma.client")


class StudentMismatch(CheckpointError):
    """The global student does not fit this site (another model or label space)."""


@functools.lru_cache(maxsize=4)
def site_data(settings: SiteSettings, image_size: int, augment: str,
              classes: tuple[str, ...] | None = None) -> SiteData:
    """The site's datasets (cached in-process between rounds of one run).

    With the run's ``classes``, labels are mapped by class *name* to the run's label order
    (folder, manifest and NPZ class names); a site whose classes are not the run's, or come in
    another fixed order (synthetic data), is refused — never trained with swapped labels.
    """
    data = open_site_data(settings.data_path, image_size=image_size, augment=augment,
                          seed=settings.data_seed, n=settings.n,
                          site_index=settings.site_index, num_sites=settings.num_sites,
                          class_probs=settings.class_probs,
                          on_error="skip" if settings.skip_bad_images else "raise",
                          allow_outside_paths=settings.allow_outside_paths,
                          classes=list(classes) if classes else None)
    if classes and tuple(data.classes) != tuple(classes):
        raise DataError(f"this site's classes {list(data.classes)} are not the run's "
                        f"{list(classes)} (same names, same order)")
    return data


def student_for(run: RunConfig, data: SiteData, global_state: dict[str, torch.Tensor],
                local: dict[str, torch.Tensor]) -> nn.Module:
    """The global student on this site's label space, with FedBN's local layers if kept."""
    fed = run.federation
    student = build_model(Architecture(fed.student_model, tuple(data.classes), fed.image_size))
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
    device = resolve_device(settings.device)
    cache = TeacherCache(settings.cache_dir, settings.teacher_signer)
    distils = run.objective.objective != "ce"
    if distils and not cache.has(teacher_sha):
        raise MissingTeacher(f"teacher {teacher_sha[:12]}… is not in {cache.dir} (or fails "
                             "its hash or signature check)")
    state = SiteState(settings.cache_dir, fed.run_name)
    saved, local = state.load(teacher_sha)
    data = site_data(settings, fed.image_size, tr.augment, run.class_names)
    seed = derive_seed(fed.seed, settings.site_name, server_round)
    seed_everything(seed)  # the objective's heads, attention and queue start the same way
    student = student_for(run, data, global_state, local)
    teacher, t_arch = cache.load(teacher_sha) if distils else (None, None)
    objective = build_objective(run.objective_config(), student, teacher,
                                same_task(t_arch.classes, data.classes) if t_arch else None,
                                n_data=len(data.train))
    if saved is not None:
        objective.load_state_dict(saved)
    cfg = replace(run.train_config(server_round), seed=seed)
    loader = make_loader(training_set(objective, data.train), tr.batch_size, train=True,
                         seed=seed, device=device)
    result = train_local(student, objective, loader, cfg, device)
    keep = local_keys(fed.fedbn, student)
    state.save(objective.state_dict(), {k: v for k, v in result.state.items() if k in keep},
               {"teacher_sha256": teacher_sha, "round": server_round, "run": fed.run_name,
                "site": settings.site_name})
    metrics = {f"train-{k}": float(v) for k, v in result.metrics.items()}
    metrics["train-time-s"] = time.time() - start
    metrics[TEACHER_CACHED] = float(distils)
    unlisted = sorted(set(metrics) - TRAIN_METRICS)
    if unlisted:
        log.debug("metrics kept at the site (not in the protocol's allow-list): %s", unlisted)
    send = {k: v for k, v in wire_state(result.state).items() if k not in keep}
    return send, result.num_examples, {k: v for k, v in metrics.items() if k in TRAIN_METRICS}


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
