"""A federation run's settings: one flat, kebab-case mapping (Flower's run config).

Defaults live in pyproject ``[tool.flwr.app.config]``; ``moma-server``/``moma-simulate`` and
``flwr run --run-config`` override them. :class:`RunConfig` types and validates the mapping and
derives the objective and local-training settings from it. Site-specific settings (data path,
cache, device) are not here: they come from each site's node config.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from moma_core.objectives import ObjectiveConfig
from moma_core.train import TrainConfig

AGGREGATIONS = ("fedavg", "fedprox", "median", "trimmed-mean")


@dataclass
class RunConfig:
    run_name: str = "federation"
    num_rounds: int = 3
    student_model: str = "test_efficientnet"
    classes: str = ""  # comma-separated class names of the target task, in label order
    image_size: int = 64
    objective: str = "moma"
    local_epochs: int = 1
    max_steps: int = 0  # 0: whole epochs
    batch_size: int = 32
    lr: float = 0.01
    lr_schedule: str = "cosine"  # over rounds: "cosine" | "constant"
    optimizer: str = "sgd"
    queue_size: int = 4096
    teacher_update: str = "momentum"
    attention_keys: str = "reference"
    augment: str = "randaugment"
    aggregation: str = "fedavg"
    proximal_mu: float = 0.01  # with aggregation = fedprox
    trim_fraction: float = 0.2  # with aggregation = trimmed-mean
    fedbn: bool = False  # keep normalisation layers local
    init_from_teacher: bool = True
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_train_nodes: int = 2
    min_available_nodes: int = 2
    round_timeout: float = 600.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation {self.aggregation!r}: choose one of {AGGREGATIONS}")
        if self.lr_schedule not in ("cosine", "constant"):
            raise ValueError("lr-schedule must be 'cosine' or 'constant'")
        if self.num_rounds < 1:
            raise ValueError("num-rounds must be at least 1")
        if not 0 <= self.trim_fraction < 0.5:
            raise ValueError("trim-fraction must be in [0, 0.5)")
        self.objective_config()  # validates objective, keys and teacher update

    @classmethod
    def from_flat(cls, flat: dict) -> RunConfig:
        """From a kebab-case mapping; unknown keys are ignored (other components' settings)."""
        kinds = {f.name: f.type for f in fields(cls)}
        values = {}
        for key, value in flat.items():
            name = key.replace("-", "_")
            if name in kinds:
                values[name] = _coerce(value, kinds[name])
        return cls(**values)

    def to_flat(self) -> dict:
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(c.strip() for c in self.classes.split(",") if c.strip())

    def objective_config(self) -> ObjectiveConfig:
        return ObjectiveConfig(kind=self.objective, queue_size=self.queue_size,
                               teacher_update=self.teacher_update,
                               attention_keys=self.attention_keys)

    def train_config(self, server_round: int) -> TrainConfig:
        """Local settings of a round: lr follows a cosine over rounds (to lr·1e-3)."""
        lr = self.lr
        if self.lr_schedule == "cosine" and self.num_rounds > 1:
            t = (server_round - 1) / (self.num_rounds - 1)
            lr = self.lr * (1e-3 + (1 - 1e-3) * 0.5 * (1 + math.cos(math.pi * t)))
        return TrainConfig(epochs=self.local_epochs, max_steps=self.max_steps or None, lr=lr,
                           optimizer=self.optimizer, cosine=False,
                           proximal_mu=self.proximal_mu if self.aggregation == "fedprox" else 0.0,
                           seed=self.seed * 100003 + server_round)


def _coerce(value: object, kind: object) -> object:
    kind = str(kind)
    if "bool" in kind:
        return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
    if "int" in kind:
        return int(value)
    if "float" in kind:
        return float(value)
    return str(value)
