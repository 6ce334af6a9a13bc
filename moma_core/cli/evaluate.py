"""``moma-eval``: score a saved classifier on one split of a data source.

``moma-eval CHECKPOINT --data D [--split test]`` loads a ``.safetensors`` checkpoint with its JSON
sidecar (any the product writes: teacher, distilled student, federation global round), opens the
data as ``moma-distill`` does (``--data`` is its ``--source``; the same ``--seed``, ``--n``,
``--test-n``, ``--site-index`` give the same splits) and writes ``eval.json`` and ``eval.md``
into ``--out`` (default ``<checkpoint stem>.eval-<split>/`` beside the checkpoint). Classes are
matched by name: the same names in another order are remapped, different names are an error.
The fields are documented in docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from torch.utils.data import Dataset

from moma_core.checkpoint import load_model
from moma_core.cli.common import add_data_args, run_cli
from moma_core.data.datasets import DataError
from moma_core.data.transforms import build_transform
from moma_core.evaluate import class_index_map, evaluate, metrics_line
from moma_core.method_config import SYNTHETIC_N
from moma_core.report import markdown_table, write_json
from moma_core.sources import SYNTHETIC, Transformed, make_loader, open_site_data
from moma_core.standalone import has_test_split, open_test_split, resolve_device

SPLITS = ("train", "val", "test")
SCHEMA_VERSION = 1


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moma-eval", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", type=Path, help="a .safetensors checkpoint (sidecar beside it)")
    p.add_argument("--data", default=None,
                   help="the data source (same as --source): synthetic:target, an ImageFolder "
                        "dir, a .csv manifest or a .npz")
    p.add_argument("--split", default="test", help="test (default), val or train")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: <checkpoint stem>.eval-<split>/ beside it)")
    p.add_argument("--classes", nargs="+", default=None,
                   help="the data's class names in its label order (for unnamed labels: NPZ "
                        "without a classes array, CSV integer labels); a,b,c or a b c")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 …")
    p.add_argument("--seed", type=int, default=0,
                   help="the training run's seed: synthetic data and a derived val split")
    p.add_argument("--test-n", type=int, default=400, help="synthetic: test images")
    add_data_args(p, source=None, n=SYNTHETIC_N)
    p.set_defaults(image_size=None)  # the checkpoint's input size unless given
    return p


def data_source(args: argparse.Namespace) -> str:
    """``--data`` (or its alias ``--source``)."""
    if args.data and args.source and args.data != args.source:
        raise ValueError(f"--data {args.data!r} and --source {args.source!r}: give one")
    source = args.data or args.source
    if not source:
        raise ValueError("--data is required: the data to score the checkpoint on "
                         "(synthetic:target, an ImageFolder dir, a .csv or a .npz)")
    return source


def check_args(args: argparse.Namespace) -> None:
    """Refuse settings that cannot work, before anything is loaded."""
    if args.split not in SPLITS:
        raise ValueError(f"unknown split {args.split!r}: choose one of {', '.join(SPLITS)}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size}: give at least 1")
    if args.test_n < 1:
        raise ValueError(f"--test-n {args.test_n}: give at least 1 image")
    if args.classes:
        args.classes = [c for item in args.classes for c in item.split(",") if c]


def open_split(args: argparse.Namespace, source: str, split: str, image_size: int
               ) -> tuple[Dataset, list[str]]:
    """The split's dataset (evaluation preprocessing) and the data's class names."""
    on_error = "skip" if args.skip_bad_images else "raise"
    if split == "test":
        if not source.startswith(SYNTHETIC) and not Path(source).exists():
            raise DataError(f"data source {source!r}: no such file or directory "
                            "(or use synthetic:source / synthetic:target)")
        if not has_test_split(source):
            raise DataError(f"{source} has no 'test' split; it has: train, val (pass --split "
                            "val, or add a test folder / CSV split rows / NPZ test arrays)")
        ds = open_test_split(source, image_size, args.seed, args.test_n, args.site_index,
                             args.num_sites, args.classes, on_error, args.allow_outside_paths)
        return ds, list(ds.classes)
    data = open_site_data(source, image_size, "none", 0.0, args.seed, args.n, args.site_index,
                          args.num_sites, on_error=on_error, classes=args.classes,
                          allow_outside_paths=args.allow_outside_paths)
    if split == "val":
        return data.val, list(data.classes)
    train = data.train  # re-wrapped: evaluation preprocessing, not training augmentation
    return Transformed(train.base, train.indices, build_transform(image_size, train=False)), \
        list(data.classes)


def default_out(checkpoint: Path, split: str) -> Path:
    return checkpoint.parent / f"{checkpoint.stem}.eval-{split}"


def evaluate_checkpoint(args: argparse.Namespace) -> dict:
    """Score the checkpoint on the split; write eval.json and eval.md; returns the report."""
    check_args(args)
    source = data_source(args)
    model, arch, sidecar = load_model(args.checkpoint)
    image_size = args.image_size or arch.image_size
    dataset, data_classes = open_split(args, source, args.split, image_size)
    try:
        target_map = class_index_map(arch.classes, data_classes)
    except ValueError as exc:
        raise DataError(f"{exc}; name the data's classes with --classes where its labels are "
                        "unnamed") from None
    if len(dataset) == 0:
        raise DataError(f"the {args.split} split of {source} is empty: nothing to score")
    device = resolve_device(args.device)
    metrics = evaluate(model, make_loader(dataset, args.batch_size, train=False, device=device),
                       arch.num_classes, device, target_map)
    report = build_report(args, source, arch.classes, data_classes, sidecar, metrics, image_size)
    report["skipped_images"] = len(getattr(getattr(dataset, "base", None), "skipped", []))
    out = args.out or default_out(args.checkpoint, args.split)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "eval.json", report)
    (out / "eval.md").write_text(markdown_report(report))
    print(summary(report, out))
    return report


def build_report(args: argparse.Namespace, source: str, classes: tuple[str, ...],
                 data_classes: list[str], sidecar: dict, metrics: dict, image_size: int
                 ) -> dict:
    """The eval.json object (fields: docs/evaluation.md)."""
    support = [sum(row) for row in metrics["confusion"]]
    return {
        "schema_version": SCHEMA_VERSION,
        "checkpoint": str(args.checkpoint),
        "checkpoint_sha256": sidecar["sha256"],
        "model_name": sidecar["architecture"]["model_name"],
        "data": source,
        "split": args.split,
        "classes": list(classes),
        "data_classes": data_classes,
        "class_order_remapped": list(classes) != data_classes,
        "num_examples": metrics["num_examples"],
        "metrics": {
            "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"],
            "kappa": metrics["kappa"], "loss": metrics["loss"],
            "per_class_recall": dict(zip(classes, metrics["per_class_recall"], strict=True)),
            "per_class_support": dict(zip(classes, support, strict=True)),
            "confusion": metrics["confusion"],
        },
        "settings": {"image_size": image_size, "seed": args.seed, "n": args.n,
                     "test_n": args.test_n, "site_index": args.site_index,
                     "num_sites": args.num_sites, "classes": args.classes},
        "created": time.time(),
    }


def _cell(name: str) -> str:
    return str(name).replace("|", "\\|")


def markdown_report(report: dict) -> str:
    """eval.md: the metrics, per-class recall and the confusion matrix, by class name."""
    split, m = report["split"], report["metrics"]
    names = [_cell(c) for c in report["classes"]]
    overall = markdown_table([
        {"metric": "accuracy", split: m["accuracy"]},
        {"metric": "macro-F1", split: m["macro_f1"]},
        {"metric": "kappa (quadratic)", split: m["kappa"]},
        {"metric": "loss (cross-entropy)", split: m["loss"]},
        {"metric": "examples", split: report["num_examples"]}], ["metric", split])
    recall = markdown_table([{"class": n, f"{split} recall": m["per_class_recall"][c],
                              "examples": m["per_class_support"][c]}
                             for n, c in zip(names, report["classes"], strict=True)],
                            ["class", f"{split} recall", "examples"])
    corner = "true \\ predicted"
    confusion = markdown_table([{corner: n, **dict(zip(names, row, strict=True))}
                                for n, row in zip(names, m["confusion"], strict=True)],
                               [corner, *names])
    remapped = ("\n\nThe data lists the same classes in another order "
                f"({', '.join(report['data_classes'])}); its labels were matched by name."
                if report["class_order_remapped"] else "")
    return (f"# `{Path(report['checkpoint']).name}` on `{report['data']}`, {split} split\n\n"
            f"Model `{report['model_name']}`, weights SHA-256 "
            f"`{report['checkpoint_sha256'][:16]}…`.{remapped}\n\n{overall}\n\n"
            f"## Per-class recall ({split})\n\n{recall}\n\n"
            f"## Confusion matrix ({split}; rows: true class, columns: predicted)\n\n"
            f"{confusion}\n")


def summary(report: dict, out: Path) -> str:
    """The printed summary: every metric line names the split."""
    split, m = report["split"], report["metrics"]
    recall = ", ".join(f"{c} {r:.3f}" for c, r in m["per_class_recall"].items())
    lines = [f"{report['checkpoint']} on {report['data']}:",
             metrics_line(split, {**m, "num_examples": report["num_examples"]}),
             f"{split} recall per class: {recall}"]
    if report["class_order_remapped"]:
        lines.append("(the data's classes are in another order: matched by name)")
    lines.append(f"wrote {out / 'eval.json'}, {out / 'eval.md'}")
    return "\n".join(lines)


@run_cli
def main() -> int:
    evaluate_checkpoint(parser().parse_args())
    return 0
