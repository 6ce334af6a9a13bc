"""What MoMA's NCE term learns from a frozen teacher of another task (KL off): figures, not a test.

One site of the synthetic target task, a teacher trained on the source task (``--teacher``,
any architecture: it is followed frozen), a student from random weights. Each variant trains
with the one local loop (``train_local``) for ``--epochs`` epochs from the same seed; after each
epoch a fixed probe (the site's validation images, in batches of the training batch size) is
scored without gradient:

- ``nce``: the epoch's mean NCE term (chance: log(K+1) with a full queue);
- ``top1``: the fraction of probe queries whose positive key outscores every key in the queue;
- ``own(k̂)``, ``own(k)``, ``own(q)``: the share of a vector's energy that is its own image's,
  ``mean‖v_i − v̄‖² / mean‖v_i‖²`` over a batch (1: nothing shared with the batch; 0: every
  sample of the batch has the same vector), for the raw keys k̂ = g_t(f_T(x)), the keys
  k = A_k(k̂) and the queries q = A_q(g_s(f_s));
- ``acc``: the student's validation accuracy.

Before the variants, a linear probe: how well a linear classifier on the frozen teacher's
pooled features (and, for comparison, an untrained student's) separates the target classes,
i.e. whether the teacher holds knowledge of the target task to distil at all.

Variants: CE alone (MoMA with the NCE weight 0: the same loop, seed and heads); the reference
queue; ``queue_keys = "keys"``; ``keys`` with a trained key attention;
and, as a counterfactual that no product setting offers, ``keys`` with the three batch
attentions replaced by the identity (q = g_s(f_s), k = k̂), which isolates the batch attention.

    .venv/bin/python bench/nce_signal.py --teacher T.safetensors [--epochs 10] [--out DIR]

Writes ``nce_signal.json`` and ``nce_signal.md`` into ``--out`` (default runs/bench-nce).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moma_core.checkpoint import load_model  # noqa: E402
from moma_core.errors import CheckpointError  # noqa: E402
from moma_core.models import (  # noqa: E402
    Architecture,
    build_model,
    check_input_size,
    features_and_logits,
)
from moma_core.objectives import ObjectiveConfig, build_objective, same_task  # noqa: E402
from moma_core.seeding import seed_everything  # noqa: E402
from moma_core.sources import SiteData, make_loader, open_site_data  # noqa: E402
from moma_core.train import TrainConfig, TrainingDiverged, train_local  # noqa: E402

VARIANTS = {  # name: (ObjectiveConfig overrides, batch attention kept)
    "no NCE (CE only)": ({"nce_weight": 0.0}, True),
    "reference queue": ({"queue_keys": "reference"}, True),
    "keys": ({"queue_keys": "keys"}, True),
    "keys, trained A_k": ({"queue_keys": "keys", "attention_keys": "trained"}, True),
    "keys, no batch attention": ({"queue_keys": "keys"}, False),
}


def own_share(v: torch.Tensor) -> float:
    """``mean‖v_i − v̄‖² / mean‖v_i‖²`` over the rows of ``v``."""
    centred = v - v.mean(dim=0, keepdim=True)
    return float(centred.pow(2).sum(1).mean() / v.pow(2).sum(1).mean().clamp_min(1e-12))


@torch.no_grad()
def probe(student: nn.Module, objective, loader) -> dict[str, float]:
    """Retrieval rate and own shares on ``loader`` (no gradient, the queue left as it is)."""
    student.eval()
    objective.eval()
    hits = n = correct = 0
    shares = {"own_khat": [], "own_k": [], "own_q": []}
    for x, y in loader:
        if len(y) < 2:
            continue
        f_s, z_s = features_and_logits(student, x)
        f_t, _ = features_and_logits(objective.teacher, x)
        k_hat = objective.proj_k(f_t)
        k = objective.attn_k(k_hat)
        q = objective.attn_q(objective.proj_q(f_s))
        logits, _ = objective.queue.logits(q, k)
        hits += int((logits[:, 0] > logits[:, 1:].max(dim=1).values).sum())
        correct += int((z_s.argmax(1) == y).sum())
        n += len(y)
        for key, v in (("own_khat", k_hat), ("own_k", k), ("own_q", q)):
            shares[key].append(own_share(v))
    student.train()
    objective.train()
    return {"top1": hits / n, "acc": correct / n, "probe_n": n,
            **{k: sum(v) / len(v) for k, v in shares.items()}}


@torch.no_grad()
def _features(model: nn.Module, loader) -> tuple[torch.Tensor, torch.Tensor]:
    feats, labels = [], []
    for x, y in loader:
        feats.append(features_and_logits(model, x)[0])
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def linear_probe(model: nn.Module, data: SiteData, seed: int) -> float:
    """Validation accuracy of a linear classifier (full-batch L-BFGS, standardised inputs) on
    ``model``'s frozen pooled features of the site's images (``data``, without augmentation):
    how much of the target task the features already hold."""
    model.eval()
    x_tr, y_tr = _features(model, make_loader(data.train, 64, train=False))
    x_va, y_va = _features(model, make_loader(data.val, 64, train=False))
    mean, std = x_tr.mean(0), x_tr.std(0).clamp_min(1e-6)
    x_tr, x_va = (x_tr - mean) / std, (x_va - mean) / std
    torch.manual_seed(seed)
    clf = nn.Linear(x_tr.shape[1], len(data.classes))
    opt = torch.optim.LBFGS(clf.parameters(), max_iter=200)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(clf(x_tr), y_tr) + 1e-3 * clf.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return float((clf(x_va).argmax(1) == y_va).float().mean())


def run_variant(name: str, args: argparse.Namespace, teacher: nn.Module, data: SiteData
                ) -> dict:
    """Train one variant from the run seed (KL off: the teacher is of another task)."""
    overrides, attention = VARIANTS[name]
    seed_everything(args.seed)
    student = build_model(Architecture(args.model, tuple(data.classes), args.image_size))
    cfg = ObjectiveConfig(kind="moma", teacher_update="frozen", queue_size=args.queue_size,
                          **{"moma_attention": "reference", **overrides})  # the authors' maps
    objective = build_objective(cfg, student, teacher, same_task=False)
    if not attention:
        objective.attn_q = objective.attn_k = objective.attn_enqueue = nn.Identity()
    train_loader = make_loader(data.train, args.batch_size, train=True, seed=args.seed)
    probe_loader = make_loader(data.val, args.batch_size, train=False)
    rows: list[dict] = []

    def on_epoch_end(epoch: int, losses: dict[str, float]) -> None:
        rows.append({"epoch": epoch + 1, "nce": losses["nce"], "ce": losses["ce"],
                     **probe(student, objective, probe_loader)})
        r = rows[-1]
        print(f"  [{name}] epoch {r['epoch']:>2}: nce {r['nce']:.3f} top1 {r['top1']:.3f} "
              f"own(k̂) {r['own_khat']:.3f} own(k) {r['own_k']:.3f} own(q) {r['own_q']:.3f} "
              f"acc {r['acc']:.3f}", flush=True)

    tcfg = TrainConfig(epochs=args.epochs, lr=args.lr, optimizer="sgd", seed=args.seed)
    start = time.time()
    diverged = None
    try:
        train_local(student, objective, train_loader, tcfg, "cpu", on_epoch_end=on_epoch_end)
    except TrainingDiverged as e:  # a figure too: the variant's loss left the finite numbers
        diverged = str(e)
        print(f"  [{name}] diverged: {e}", flush=True)
    return {"variant": name, "epochs": rows, "diverged": diverged,
            "wall_s": time.time() - start}


def markdown(result: dict) -> str:
    chance = math.log(result["queue_size"] + 1)
    lines = [f"# NCE signal with a frozen {result['teacher_model']} teacher of another task",
             "", f"{result['command']}", "",
             f"{result['date']}, {result['machine']}; student {result['model']} from random "
             f"weights, {result['n']} training images, {result['epochs']} epochs × "
             f"{result['steps_per_epoch']} steps, K = {result['queue_size']} "
             f"(chance NCE log(K+1) = {chance:.2f}); probe: {result['probe_n']} validation "
             "images.", "",
             "Linear probe of the target task (validation accuracy of a linear classifier on "
             f"frozen pooled features): teacher {result['linear_probe']['teacher']:.3f}, "
             f"untrained student {result['linear_probe']['random student']:.3f}.", "",
             "| variant | epoch | NCE | top-1 retrieval | own(k̂) | own(k) | own(q) | val acc. |",
             "|---|---|---|---|---|---|---|---|"]
    for v in result["variants"]:
        shown = {1, 2, result["epochs"] // 2, result["epochs"]}
        if v["diverged"] and v["epochs"]:
            shown.add(v["epochs"][-1]["epoch"])
        for r in v["epochs"]:
            if r["epoch"] in shown:
                lines.append(f"| {v['variant']} | {r['epoch']} | {r['nce']:.3f} | "
                             f"{r['top1']:.3f} | {r['own_khat']:.3f} | {r['own_k']:.3f} | "
                             f"{r['own_q']:.3f} | {r['acc']:.3f} |")
        if v["diverged"]:
            lines.append(f"| {v['variant']} | diverged | {v['diverged']} | | | | | |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", type=Path, required=True)
    p.add_argument("--model", default="test_efficientnet")
    p.add_argument("--n", type=int, default=400)
    p.add_argument("--image-size", type=int, default=48)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--queue-size", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-nce")
    args = p.parse_args()
    if args.epochs < 1 or args.n < args.batch_size or args.queue_size < 1:
        p.error("--epochs and --queue-size must be at least 1, --n at least --batch-size")
    torch.set_num_threads(1)
    try:
        teacher, t_arch, _ = load_model(args.teacher)
        check_input_size(args.model, args.image_size)
    except (CheckpointError, ValueError) as e:
        p.error(str(e))
    teacher.eval()
    data = open_site_data("synthetic:target", args.image_size, "randaugment", 0.0, args.seed,
                          args.n)
    if same_task(t_arch.classes, data.classes):
        p.error(f"--teacher {args.teacher} was trained on the target classes {data.classes}: "
                "give a teacher of another task (e.g. moma-teacher --source synthetic:source)")
    plain = open_site_data("synthetic:target", args.image_size, "none", 0.0, args.seed, args.n)
    result = {"command": "`" + " ".join(["bench/nce_signal.py", *sys.argv[1:]]) + "`",
              "date": time.strftime("%Y-%m-%d"),
              "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread, CPU",
              "teacher_model": t_arch.model_name, "model": args.model, "n": args.n,
              "epochs": args.epochs, "steps_per_epoch": math.ceil(args.n / args.batch_size),
              "queue_size": args.queue_size, "probe_n": len(data.val), "variants": []}
    seed_everything(args.seed)
    random_student = build_model(Architecture(args.model, tuple(data.classes), args.image_size))
    result["linear_probe"] = {"teacher": linear_probe(teacher, plain, args.seed),
                              "random student": linear_probe(random_student, plain, args.seed)}
    print(f"linear probe on the target task: {result['linear_probe']}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.variants:
        print(f"{name}:", flush=True)
        result["variants"].append(run_variant(name, args, teacher, data))
        # written after each variant: a run stopped part-way keeps what it measured
        (args.out / "nce_signal.json").write_text(json.dumps(result, indent=2))
        (args.out / "nce_signal.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
