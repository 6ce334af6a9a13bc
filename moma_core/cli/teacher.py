"""``moma-teacher``: train the teacher classifier on the source task and write it.

Output: ``<out>.safetensors`` and the sidecar ``<out>.json`` (architecture, classes, input size,
normalisation, SHA-256, training metrics).

``moma-teacher sign TEACHER.safetensors --key teacher-signing.key`` signs a teacher with the
coordinator's Ed25519 key (``moma-deploy``) and writes ``<stem>.sig.json`` beside it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moma_core.checkpoint import save_checkpoint
from moma_core.cli.common import add_data_args, add_training_args, run_cli
from moma_core.models import Architecture, build_model
from moma_core.objectives import ObjectiveConfig, build_objective
from moma_core.progress import console
from moma_core.sources import open_site_data
from moma_core.standalone import fit, resolve_device
from moma_core.train import TrainConfig

#: A teacher is trained from scratch: a larger rate than a student distilled from its init.
TEACHER_LR = 0.05


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moma-teacher", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="efficientnet_b0", help="timm model name")
    p.add_argument("--out", type=Path, default=Path("teachers/teacher.safetensors"))
    add_data_args(p, source="synthetic:source", n=2000)
    add_training_args(p, epochs=10, lr=TEACHER_LR)
    return p


def train_teacher(args: argparse.Namespace) -> tuple[str, list[dict]]:
    """Train and save; returns the weights' SHA-256 and the per-epoch history."""
    device = resolve_device(args.device)
    data = open_site_data(args.source, args.image_size, args.augment, args.stain_jitter,
                          args.seed, args.n, args.site_index, args.num_sites,
                          on_error="skip" if args.skip_bad_images else "raise",
                          allow_outside_paths=args.allow_outside_paths)
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


def sign_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moma-teacher sign",
                                description="sign a teacher with the coordinator's key")
    p.add_argument("teacher", type=Path, help="teacher .safetensors (sidecar beside it)")
    p.add_argument("--key", type=Path, required=True,
                   help="Ed25519 private key (federation/coordinator/teacher-signing.key)")
    return p


def sign(argv: list[str]) -> int:
    from moma_core.checkpoint import load_model
    from moma_core.signature import sign_teacher

    args = sign_parser().parse_args(argv)
    load_model(args.teacher)  # safetensors only, hash and shapes checked before signing
    out = sign_teacher(args.teacher, args.key)
    console.print(f"wrote {out}")
    return 0


@run_cli
def main() -> int:
    argv = sys.argv[1:]
    if argv[:1] == ["sign"]:
        return sign(argv[1:])
    train_teacher(parser().parse_args(argv))
    return 0
