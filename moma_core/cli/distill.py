"""``moma-distill``: distil a student from a teacher on one site's data (no federation).

The reference paper's setting, and the upper/lower baselines of the federation: MoMA, vanilla KD
or CE-only. Writes ``runs/<name>/``: results.json, student.safetensors (+ sidecar), curves.png.
Validation metrics each epoch; when the data has a ``test`` split (synthetic data always), the
final student is scored on it too (``final.test`` in results.json).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from moma_core import objective_registry
from moma_core.checkpoint import load_model, save_checkpoint
from moma_core.cli.common import (
    DATA_SETTINGS,
    TRAINING_SETTINGS,
    DefaultsHelpFormatter,
    add_data_args,
    add_training_args,
    run_cli,
)
from moma_core.cli.settings_flags import SettingsParser
from moma_core.method_config import SYNTHETIC_N
from moma_core.models import Architecture, build_model
from moma_core.objectives import (
    ObjectiveConfig,
    build_objective,
    init_student_from_teacher,
    same_task,
)
from moma_core.progress import console
from moma_core.report import plot_curves, write_json
from moma_core.run_settings import METHOD_FIELDS
from moma_core.seeding import seed_everything
from moma_core.sources import open_site_data
from moma_core.standalone import PLAIN, final_scores, fit, resolve_device, test_split_for
from moma_core.train import TrainConfig

#: the run settings moma-distill takes: the objective's, and the local training's it uses
#: (a flag each, generated from the settings tree; also with --run-config)
SETTINGS = ("objective", "teacher-update", "attention-keys", "queue-size", "queue-keys",
            "kl-teacher", "key-head-init", "moma-attention")


def objectives() -> tuple[str, ...]:
    """The registered objectives one site can run alone: all but those that need the frozen
    teacher's keys of public images (dp-moma: a federation's DP-SGD objective)."""
    return tuple(n for n, d in objective_registry.declarations().items()
                 if not d.needs_public_keys)


def parser() -> SettingsParser:
    p = SettingsParser(prog="moma-distill", description=__doc__.splitlines()[0],
                       known=METHOD_FIELDS, fill_defaults=True,
                       formatter_class=DefaultsHelpFormatter)
    p.add_argument("--teacher", type=Path, help="teacher .safetensors (sidecar beside it)")
    p.add_argument("--model", default=None, help="student timm model (default: the teacher's)")
    p.add_argument("--init", choices=["teacher", "scratch"], default="teacher",
                   help="start the student from the teacher's weights where they match")
    g = p.add_argument_group("objective (run settings: docs/configuration.md)")
    p.add_settings(SETTINGS, group=g, choices={"objective": objectives()},
                   helps={"objective": f"{', '.join(objectives())} (registered objectives "
                          "that one site can run alone)"})
    p.add_argument("--name", default=None, help="run name (default: distill-<objective>)")
    p.add_argument("--runs-dir", type=Path, default=Path("runs"))
    p.add_argument("--test-n", type=int, default=400,
                   help="synthetic: held-out test images (0: no test split)")
    data = add_data_args(p, source="synthetic:target", n=SYNTHETIC_N, settings=True)
    p.add_settings(DATA_SETTINGS, group=data)
    p.add_settings(TRAINING_SETTINGS, group=add_training_args(p, epochs=10, lr=TrainConfig.lr,
                                                               settings=True))
    p.add_run_config(accepted=(*SETTINGS, *DATA_SETTINGS, *TRAINING_SETTINGS),
                     only={"objective": objectives()})
    return p


def distill(args: argparse.Namespace) -> dict:
    """Run one standalone distillation; returns the results written to results.json."""
    device = resolve_device(args.device)
    teacher = arch = None
    if args.teacher is not None:
        teacher, t_arch, _ = load_model(args.teacher)
        arch = t_arch
    elif objective_registry.needs_teacher(args.objective) or args.model is None:
        raise ValueError(f"--teacher is required for objective {args.objective!r} "
                         "(and --model when training CE-only without one)")
    data = open_site_data(args.source, args.image_size, args.augment, args.stain_jitter,
                          args.seed, args.n, args.site_index, args.num_sites,
                          on_error="skip" if args.skip_bad_images else "raise",
                          allow_outside_paths=args.allow_outside_paths)
    model_name = args.model or arch.model_name
    s_arch = Architecture(model_name, tuple(data.classes), args.image_size)
    seed_everything(args.seed)  # fresh heads, projection, attention and queue: same seed, same
    student = build_model(s_arch)
    if teacher is not None and args.init == "teacher":
        init_student_from_teacher(student, teacher, classifier=same_task(arch.classes,
                                                                         data.classes))
    obj_cfg = ObjectiveConfig(kind=args.objective, teacher_update=args.teacher_update,
                              attention_keys=args.attention_keys, queue_size=args.queue_size,
                              queue_keys=args.queue_keys, kl_teacher=args.kl_teacher,
                              key_head_init=args.key_head_init,
                              moma_attention=args.moma_attention)
    cfg = TrainConfig(epochs=args.epochs, lr=args.lr, optimizer=args.optimizer,
                      weight_decay=args.weight_decay, seed=args.seed, amp=args.amp)
    objective = build_objective(obj_cfg, student, teacher,
                                same_task(arch.classes, data.classes) if arch else None,
                                n_data=len(data.train), batch_size=args.batch_size)
    test = test_split_for(args, data.classes)
    name = args.name or f"distill-{args.objective}"
    out = args.runs_dir / name
    console.print(f"{args.objective} student {model_name} on {args.source}: "
                  f"{data.counts()['train']}")
    start = time.time()
    _, history = fit(student, objective, data, cfg, args.batch_size, device, name, test)
    ckpt = save_checkpoint(out / "student.safetensors", student.state_dict(), s_arch,
                           {"objective": args.objective})
    results = {"name": name, "objective": obj_cfg.to_dict(), "train": cfg.to_dict(),
               "source": args.source, "teacher": str(args.teacher) if args.teacher else None,
               "history": history, "final": history[-1], "student_sha256": ckpt,
               "wall_s": time.time() - start}
    write_json(out / "results.json", results)
    epochs = [r["epoch"] for r in history]
    plot_curves(out / "curves.png", epochs, {
        "loss": {"train": [r["train_loss"] for r in history],
                 "val": [r["val_loss"] for r in history]},
        "validation": {"accuracy": [r["val_accuracy"] for r in history],
                       "macro-F1": [r["val_macro_f1"] for r in history],
                       "kappa": [r["val_kappa"] for r in history]}}, "epoch", name)
    console.print(f"{name}: {final_scores(history[-1])} → {out}/results.json, curves.png",
                  **PLAIN)
    return results


@run_cli
def main() -> int:
    distill(parser().parse_args())
    return 0
