"""What one ``moma-simulate`` run is asked to do, typed: the command line's options as a value.

``moma-simulate``'s ``main()`` builds a :class:`SimulationSpec` from its parsed options
(:meth:`SimulationSpec.from_args`) and runs it (:func:`server.simulate.simulate`); other callers
(``moma-bench``'s federated arms) build one directly, never a command line. A field left
``None`` takes the run-setting tree's default (or the demo preset's), as an option left out.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields
from pathlib import Path


@dataclass(frozen=True)
class SimulationSpec:
    """The options of one simulated federation (``moma-simulate --help`` names each)."""

    name: str = "simulation"
    runs_dir: Path = Path("runs")
    demo: bool = False
    teacher: Path | None = None
    sites: int | None = None
    rounds: int | None = None
    objective: str | None = None
    student_model: str | None = None
    aggregation: str | None = None
    fedbn: bool | None = None
    local_epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    optimizer: str | None = None
    augment: str | None = None
    queue_size: int | None = None
    teacher_update: str | None = None
    moma_attention: str | None = None
    image_size: int | None = None
    transfer_dtype: str | None = None
    dp: str | None = None
    dp_noise_multiplier: float | None = None
    dp_max_grad_norm: float | None = None
    client_dp: str | None = None
    client_dp_noise_multiplier: float | None = None
    client_dp_clipping_norm: float | None = None
    secagg: str | None = None
    client_dp_clipping: str | None = None
    n: int | None = None  # synthetic: training images per site
    label_skew: float = 0.0
    data: str | None = None
    site_data: tuple[str, ...] | None = None
    classes: str | None = None
    partitioner: str = "iid"
    alpha: float = 0.5
    resume: bool = False
    no_local_baseline: bool = False
    seed: int | None = None
    device: str = "cpu"
    gpus_per_site: float | None = None
    #: options of the command line that have no field here yet: (dest, value) pairs
    other: tuple[tuple[str, object], ...] = field(default=())

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> SimulationSpec:
        """The spec of ``moma-simulate``'s parsed options (every option kept)."""
        values = dict(vars(args))
        known = {f.name for f in fields(cls)} - {"other"}
        spec = {k: values.pop(k) for k in list(values) if k in known}
        if spec.get("site_data") is not None:
            spec["site_data"] = tuple(spec["site_data"])
        return cls(**spec, other=tuple(sorted(values.items())))

    def options(self) -> dict[str, object]:
        """Every option by its ``argparse`` dest (``site_data`` as a list, as parsed)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "other"}
        if out["site_data"] is not None:
            out["site_data"] = list(out["site_data"])
        return {**out, **dict(self.other)}
