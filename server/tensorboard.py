"""``runs/<name>/tensorboard/``: the run's per-round scalars for TensorBoard.

``tensorboard --logdir runs/`` shows every run. One step per round, written when the round's
entry is in results.json (same values): ``server/accuracy``, ``server/macro_f1``,
``server/kappa`` (with an eval set), ``train/<term>`` (the sites' mean ``ce``, ``kl``, ``nce``,
``nce_gap``, ``retrieval``, ``loss``), ``site_val_accuracy/<site>`` (each site's score of the
student the round started from), ``bytes/down``, ``bytes/up`` (the round's exchange;
``bytes/final_evaluation_down``/``_up`` at the last step: results.json's last round adds them to
its ``bytes_down``/``bytes_up``), ``privacy/client_epsilon``, ``privacy/epsilon/<site>``,
``sites/ok`` and ``time/wall_s``. A resumed run purges the steps from its first round on
(``purge_step``), so a round is never recorded twice.
"""

from __future__ import annotations

from pathlib import Path

from moma_protocol.wire import DP_EPSILON

TRAIN_TERMS = {"ce": "train-ce", "kl": "train-kl", "nce": "train-nce",
               "retrieval": "train-retrieval", "loss": "train-loss"}


def round_scalars(entry: dict) -> dict[str, float]:
    """The scalars of one results.json round entry, by tag."""
    out: dict[str, float] = {}
    for key in ("accuracy", "macro_f1", "kappa"):
        value = (entry.get("server_eval") or {}).get(key)
        if value is not None:
            out[f"server/{key}"] = float(value)
    train = entry.get("train") or {}
    for tag, key in TRAIN_TERMS.items():
        if key in train:
            out[f"train/{tag}"] = float(train[key])
    if "train-nce" in train and "train-nce-shuffled" in train:
        out["train/nce_gap"] = float(train["train-nce-shuffled"]) - float(train["train-nce"])
    for node, site in (entry.get("sites") or {}).items():
        name = str(site.get("site_name", node))
        acc = (site.get("incoming_eval") or {}).get("accuracy")
        if acc is not None:
            out[f"site_val_accuracy/{name}"] = float(acc)
        eps = (site.get("metrics") or {}).get(DP_EPSILON)
        if eps is not None:
            out[f"privacy/epsilon/{name}"] = float(eps)
    if (entry.get("client_dp") or {}).get("epsilon") is not None:
        out["privacy/client_epsilon"] = float(entry["client_dp"]["epsilon"])
    out["bytes/down"] = float(entry.get("bytes_down", 0))
    out["bytes/up"] = float(entry.get("bytes_up", 0))
    out["sites/ok"] = float(sum(s.get("status") == "ok"
                                for s in (entry.get("sites") or {}).values()))
    if entry.get("wall_s") is not None:
        out["time/wall_s"] = float(entry["wall_s"])
    return out


class RoundBoard:
    """A SummaryWriter on ``run_dir/tensorboard`` that starts at ``first_round``."""

    def __init__(self, run_dir: Path, first_round: int = 1) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.dir = Path(run_dir) / "tensorboard"
        # a resumed run: drop whatever an earlier process wrote from this round on
        self.writer = SummaryWriter(str(self.dir),
                                    purge_step=first_round if first_round > 1 else None)

    def add_round(self, entry: dict) -> None:
        """One round's scalars at step ``entry["round"]`` (call before the final evaluation
        adds its bytes to the entry)."""
        for tag, value in round_scalars(entry).items():
            self.writer.add_scalar(tag, value, entry["round"])
        self.writer.flush()

    def add_final_evaluation(self, server_round: int, down: int, up: int) -> None:
        self.writer.add_scalar("bytes/final_evaluation_down", float(down), server_round)
        self.writer.add_scalar("bytes/final_evaluation_up", float(up), server_round)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
