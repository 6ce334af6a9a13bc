"""``moma-teacher``: train the teacher classifier on the source task and write it.

Output: ``<out>.safetensors`` and the sidecar ``<out>.json`` (architecture, classes, input size,
normalisation, SHA-256, training metrics: ``val_*`` on the validation split and, when the data has
a ``test`` split (synthetic data always), ``test_*`` on it).

``moma-teacher sign TEACHER.safetensors --key teacher-signing.key`` signs a teacher with the
coordinator's Ed25519 key (``moma-deploy``) and writes ``<stem>.sig.json`` beside it. It first
shows what is signed (the weights' SHA-256, the sidecar's architecture, input size and classes):
signing is the one explicit act that lets a federation's sites train with a teacher
(``moma-server`` never signs).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moma_core.checkpoint import load_model, save_checkpoint
from moma_core.cli.common import DefaultsHelpFormatter, add_data_args, add_training_args, run_cli
from moma_core.models import Architecture, build_model
from moma_core.objectives import ObjectiveConfig, build_objective
from moma_core.progress import console
from moma_core.seeding import seed_everything
from moma_core.sources import open_site_data
from moma_core.standalone import PLAIN, final_scores, fit, resolve_device, test_split_for
from moma_core.train import TrainConfig

#: A teacher is trained from scratch: a larger rate than a student distilled from its init.
TEACHER_LR = 0.05


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moma-teacher", description=__doc__.splitlines()[0],
                                epilog="moma-teacher sign TEACHER --key KEY: sign a teacher "
                                       "(moma-teacher sign --help)",
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--model", default="efficientnet_b0", help="timm model name")
    p.add_argument("--out", type=Path, default=Path("teachers/teacher.safetensors"),
                   help="weights to write (the sidecar .json beside it)")
    p.add_argument("--test-n", type=int, default=400,
                   help="synthetic: held-out test images (0: no test split)")
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
    seed_everything(args.seed)  # same seed, same initial weights
    model = build_model(arch)
    cfg = TrainConfig(epochs=args.epochs, lr=args.lr, optimizer=args.optimizer,
                      weight_decay=args.weight_decay, seed=args.seed, amp=args.amp)
    objective = build_objective(ObjectiveConfig(kind="ce"), model)
    test = test_split_for(args, data.classes)
    _, history = fit(model, objective, data, cfg, args.batch_size, device, "teacher", test)
    digest = save_checkpoint(args.out, model.state_dict(), arch, teacher_meta(args, history[-1]))
    console.print(f"wrote {args.out} (sha256 {digest[:16]}…): {final_scores(history[-1])}",
                  **PLAIN)
    return digest, history


def teacher_meta(args: argparse.Namespace, last: dict) -> dict:
    """The sidecar's ``meta``: settings and final scores, each key named by its split."""
    meta = {"source": args.source, "epochs": args.epochs, "seed": args.seed,
            "val_accuracy": last["val_accuracy"], "val_macro_f1": last["val_macro_f1"],
            "val_kappa": last["val_kappa"]}
    if last.get("test"):
        meta |= {"test_accuracy": last["test"]["accuracy"],
                 "test_macro_f1": last["test"]["macro_f1"], "test_kappa": last["test"]["kappa"],
                 "test_num_examples": last["test"]["num_examples"]}
    return meta


def sign_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moma-teacher sign",
                                description="sign a teacher with the coordinator's key, after "
                                            "showing its SHA-256, architecture and classes",
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("teacher", type=Path, help="teacher .safetensors (sidecar beside it)")
    p.add_argument("--key", type=Path, required=True,
                   help="Ed25519 private key (federation/coordinator/teacher-signing.key)")
    return p


def describe_teacher(path: Path, arch: Architecture, sidecar: dict) -> str:
    """What a signature vouches for: the weights' hash and the sidecar's architecture."""
    meta = sidecar.get("meta") if isinstance(sidecar.get("meta"), dict) else {}
    trained = ", ".join(f"{k} {meta[k]}" for k in ("source", "epochs", "val_accuracy",
                                                    "test_accuracy") if k in meta)
    return "\n".join([f"teacher {path}",
                      f"  sha256        {sidecar['sha256']}",
                      f"  architecture  {arch.model_name}, {arch.image_size} px input",
                      f"  classes       {','.join(arch.classes)} (label order)",
                      f"  trained       {trained or 'not stated in its sidecar'}"])


def sign(argv: list[str]) -> int:
    from moma_core.signature import fingerprint, load_signing_key, sign_teacher

    args = sign_parser().parse_args(argv)
    # safetensors only, its hash and its tensors' shapes checked, and the key usable, before
    # anything is shown
    _, arch, sidecar = load_model(args.teacher)
    key = load_signing_key(args.key)
    console.print(describe_teacher(args.teacher, arch, sidecar), **PLAIN)
    console.print(f"  signing key   {args.key} (fingerprint "
                  f"{fingerprint(key.public_key())[:16]}…)", **PLAIN)
    out = sign_teacher(args.teacher, args.key)
    console.print(f"signed: wrote {out} (sites that trust this key accept this teacher)",
                  **PLAIN)
    return 0


@run_cli
def main() -> int:
    argv = sys.argv[1:]
    if argv[:1] == ["sign"]:
        return sign(argv[1:])
    train_teacher(parser().parse_args(argv))
    return 0
