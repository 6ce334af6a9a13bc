"""``moma-teacher``: train the teacher classifier on the source task and write it.

Output: ``<out>.safetensors`` and the sidecar ``<out>.json`` (architecture, classes, input size,
normalisation, SHA-256, training metrics).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from moma_core.checkpoint import save_checkpoint
from moma_core.cli.common import add_data_args, add_training_args, run_cli
from moma_core.models import Architecture, build_model
from moma_core.objectives import ObjectiveConfig, build_objective
from moma_core.progress import console
from moma_core.sources import open_site_data
from moma_core.standalone import fit, resolve_device
from moma_core.train import TrainConfig


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moma-teacher", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="efficientnet_b0", help="timm model name")
    p.add_argument("--out", type=Path, default=Path("teachers/teacher.safetensors"))
    add_data_args(p, source="synthetic:source", n=2000)
    add_training_args(p, epochs=10, lr=0.05)
    return p


def train_teacher(args: argparse.Namespace) -> tuple[str, list[dict]]:
    """Train and save; returns the weights' SHA-256 and the per-epoch history."""
    device = resolve_device(args.device)
    data = open_site_data(args.source, args.image_size, args.augment, args.stain_jitter,
                          args.seed, args.n, args.site_index, args.num_sites,
                          on_error="skip" if args.skip_bad_images else "raise")
    console.print(f"teacher {args.model} on {args.source}: classes {data.counts()['train']}")
    arch = Architecture(args.model, tuple(data.classes), args.image_size)
    model = build_model(arch)
    cfg = TrainConfig(epochs=args.epochs, lr=args.lr, optimizer=args.optimizer,
                      weight_decay=args.weight_decay, seed=args.seed, amp=args.amp)
    objective = build_objective(ObjectiveConfig(kind="ce"), model)
    _, history = fit(model, objective, data, cfg, args.batch_size, device, "teacher")
    meta = {"source": args.source, "epochs": args.epochs, "seed": args.seed,
            "val_accuracy": history[-1]["val_accuracy"],
            "val_macro_f1": history[-1]["val_macro_f1"]}
    digest = save_checkpoint(args.out, model.state_dict(), arch, meta)
    console.print(f"wrote {args.out} (sha256 {digest[:16]}…)")
    return digest, history


@run_cli
def main() -> int:
    train_teacher(parser().parse_args())
    return 0
