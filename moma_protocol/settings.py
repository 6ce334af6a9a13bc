"""A federation run's settings: one typed tree, each default in exactly one place.

:class:`RunConfig` is composed of parts — :class:`ObjectiveSettings` (what the sites optimise),
:class:`LocalTraining` (how a site trains in a round), :class:`FederationSettings` (rounds,
sampling, aggregation) and :class:`CoordinatorSettings` (what only the ServerApp reads) —
whose fields are also the run config's flat kebab-case keys (Flower's run config). Defaults
that the method layer also uses are taken from :mod:`moma_core` (``ObjectiveConfig``,
``TrainConfig``), never restated. pyproject's ``[tool.flwr.app.config]``, the app folder
``moma-server`` submits and docs/configuration.md are generated from this tree, and a test
checks them.

:meth:`RunConfig.from_flat` is strict: an unknown key is named, a value of the wrong type or out
of range is refused with one line (:class:`ConfigError`). The method layer's parts (objective,
local training) and how a setting is declared (:func:`opt`) and checked live in
:mod:`moma_core.run_settings`, so that moma-distill reads the same fields. Site settings (data
path, cache, device) are not here: they come from each site's node config.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

from moma_core import objective_registry
from moma_core.method_config import (
    DP_TRAINABLE,
    OPTIMIZERS,
    ObjectiveConfig,
    TrainConfig,
    cosine_factor,
)
from moma_core.run_settings import (  # the method layer's parts of the tree (no torch)
    AUGMENTS,  # noqa: F401 (part of this module's interface)
    ConfigError,
    LocalTraining,
    ObjectiveSettings,
    _check,
    _typed,
    choices_of,
    lookup,
    opt,
)
from moma_core.run_settings import checked as checked_value

if TYPE_CHECKING:  # the settings load no torch (a ClientApp process forwarding to its worker)
    from moma_core.models import Architecture

AGGREGATIONS = ("fedavg", "fedprox", "median", "trimmed-mean", "fedadam", "fedavgm")
TRANSFER_DTYPES = ("float32", "float16")  # see moma_protocol.wire.pack_global
#: client-level DP (:mod:`server.client_dp`): who clips each site's update before the
#: coordinator adds Gaussian noise to their mean
CLIENT_DP_MODES = ("off", "server-clipping", "site-clipping")
#: aggregations whose arithmetic is Flower's FedAvg (what client-level DP accounting assumes)
CLIENT_DP_AGGREGATIONS = ("fedavg", "fedprox")
#: channels per GroupNorm group of a DP-SGD student (moma_core.privacy.dp_sgd.group_count)
DP_GROUP_SIZE = 16
#: secure aggregation of the sites' updates (moma_protocol.secagg)
SECAGG_MODES = ("off", "secaggplus")
#: client-level DP: a fixed clipping norm, or one adapted to a quantile of the update norms
CLIENT_DP_CLIPPINGS = ("fixed", "adaptive")


@dataclass(frozen=True)
class FederationSettings:
    run_name: str = opt("federation", "the run's name (folder, site state)")
    num_rounds: int = opt(3, "rounds", lo=1, hi=100000)
    student_model: str = opt("test_efficientnet", "student architecture (timm name)")
    classes: str = opt("", "comma-separated class names of the target task, in label order")
    image_size: int = opt(64, "input size in pixels", lo=8, hi=4096)
    aggregation: str = opt("fedavg", "how updates are combined", AGGREGATIONS)
    proximal_mu: float = opt(0.01, "FedProx's mu (aggregation = fedprox)", lo=0)
    trim_fraction: float = opt(0.2, "share cut at each end (aggregation = trimmed-mean)",
                               lo=0, hi=0.5, hi_open=True)
    server_lr: float = opt(0.01, "server learning rate eta (aggregation = fedadam)", lo=0,
                           lo_open=True)
    server_momentum: float = opt(0.9, "server momentum beta of FedAvgM (aggregation = "
                                 "fedavgm; server learning rate 1: steps of the mean update "
                                 "plus beta times the previous step)", lo=0, hi=1,
                                 hi_open=True)
    fedbn: bool = opt(False, "keep normalisation layers at the sites (FedBN)")
    transfer_dtype: str = opt("float32", "student tensors on the wire: float32, or float16 "
                              "(half the bytes; updates as changes, aggregated in float32)",
                              TRANSFER_DTYPES)
    init_from_teacher: bool = opt(True, "start the student from the teacher's weights")
    fraction_train: float = opt(1.0, "share of connected sites sampled per round", lo=0,
                                lo_open=True, hi=1)
    fraction_evaluate: float = opt(1.0, "0: sites do not evaluate the global student", lo=0,
                                   hi=1)
    min_train_nodes: int = opt(2, "fewer successful sites: the round failed", lo=1)
    min_available_nodes: int = opt(2, "sites to wait for before a round", lo=1)
    round_timeout: float = opt(600.0, "seconds to wait for sites in a round", lo=1)
    seed: int = opt(0, "seed of sampling, initialisation and local shuffling", lo=0)



@dataclass(frozen=True)
class PrivacySettings:
    dp: str = opt("off", "sample-level DP-SGD at every site (Opacus): off or dp-sgd; the "
                  "student then uses GroupNorm", ("off", "dp-sgd"))
    dp_noise_multiplier: float = opt(1.0, "DP-SGD noise multiplier sigma", lo=0, lo_open=True,
                                     hi=1000)
    dp_max_grad_norm: float = opt(0.1, "DP-SGD per-sample clipping norm C (the default: "
                                  "docs/benchmarks.md, the DP sweep)", lo=0, lo_open=True)
    dp_delta: float = opt(0.0, "DP delta; 0: 1/(10 x the site's training examples)", lo=0,
                          hi=1e-3)
    dp_accountant: str = opt("rdp", "privacy accountant (Opacus)", ("rdp", "prv"))
    dp_public_images: int = opt(256, "dp-moma: synthetic public images whose frozen-teacher "
                                "keys are the negatives", lo=1, hi=65536)
    dp_unit: str = opt("patch", "DP-SGD privacy unit: patch (one image) or patient (all of a "
                       "patient's images: patients are sampled, each brings at most "
                       "dp-patches-per-patient; needs a patient_id column at every site)",
                       ("patch", "patient"))
    dp_patches_per_patient: int = opt(8, "dp-unit patient: most patches a sampled patient "
                                      "brings to a step (each clipped to dp-max-grad-norm / "
                                      "this)", lo=1, hi=4096)
    dp_trainable: str = opt("head", "the part of the student DP-SGD trains: head (a linear "
                            "probe on the frozen backbone), last-stage (last stage + head) — "
                            "both keep the teacher's BatchNorm statistics, frozen — or all "
                            "(a GroupNorm student; docs/privacy.md)", DP_TRAINABLE)
    dp_physical_batch: int = opt(0, "DP-SGD: the largest batch run at once; a larger logical "
                                 "batch (batch-size) is split and its clipped gradients summed "
                                 "into one noisy step (0: no split)", lo=0, hi=4096)
    dp_optimizer: str = opt("sgd", "local optimiser under DP-SGD (replaces optimizer)",
                            OPTIMIZERS)
    dp_lr: float = opt(8.0, "local learning rate under DP-SGD, round 1 (replaces lr; cosine "
                       "over rounds as lr; the default suits dp-trainable = head: "
                       "docs/benchmarks.md)", lo=0, lo_open=True, hi=100)
    dp_target_epsilon: float = opt(0.0, "DP-SGD: the epsilon each site spends over the run's "
                                   "planned rounds; its noise multiplier is derived (0: use "
                                   "dp-noise-multiplier)", lo=0, hi=1000)
    client_dp: str = opt("off", "client-level DP of the aggregate (DP-FedAvg with Flower's "
                         "arithmetic): off, server-clipping (the coordinator clips each update) "
                         "or site-clipping (each site clips its own; the coordinator checks)",
                         CLIENT_DP_MODES)
    client_dp_noise_multiplier: float = opt(1.0, "client-level DP: Gaussian noise multiplier z "
                                            "(std z x C / sites aggregated)", lo=0,
                                            lo_open=True, hi=1000)
    client_dp_clipping_norm: float = opt(1.0, "client-level DP: L2 bound C of a site's update "
                                         "(its change of the global student)", lo=0,
                                         lo_open=True)
    client_dp_delta: float = opt(1e-5, "client-level DP: delta of the reported (epsilon, "
                                 "delta)", lo=0, lo_open=True, hi=0.1)
    client_dp_clipping: str = opt("fixed", "client-level DP: the clipping norm stays fixed, or "
                                  "adapts each round to a quantile of the sites' update norms "
                                  "(Andrew et al. 2021; client-dp-clipping-norm is its start)",
                                  CLIENT_DP_CLIPPINGS)
    client_dp_target_quantile: float = opt(0.5, "adaptive clipping: fraction of site updates "
                                           "meant to fall within the clipping norm", lo=0,
                                           hi=1)
    client_dp_clip_lr: float = opt(0.2, "adaptive clipping: learning rate of the norm's "
                                   "geometric update", lo=0, lo_open=True, hi=10)
    client_dp_count_stddev: float = opt(0.0, "adaptive clipping: std of the Gaussian noise on "
                                        "the count of unclipped updates; 0: the larger of "
                                        "min-train-nodes/20 and the noise multiplier", lo=0)
    secagg: str = opt("off", "secure aggregation: off, or secaggplus (Flower's SecAgg+: the "
                      "coordinator learns only the weighted mean of the updates)",
                      SECAGG_MODES)
    secagg_share_fraction: float = opt(1.0, "SecAgg+: fraction of the round's sites each site "
                                       "shares its mask keys with", lo=0, lo_open=True, hi=1)
    secagg_threshold: float = opt(0.67, "SecAgg+: fraction of a site's shares needed to "
                                  "unmask (above 0.5; 1 minus it is the dropout tolerance)",
                                  lo=0.5, lo_open=True, hi=1)
    secagg_clipping_range: float = opt(1.0, "SecAgg+: bound on each coordinate of a site's "
                                       "weighted update; a site beyond it fails the round",
                                       lo=0, lo_open=True, hi=1e6)
    secagg_max_weight: float = opt(10000.0, "SecAgg+: example count that weighs 1 (larger "
                                   "counts risk overflow; 1 per site under client-dp)", lo=1)

    def count_stddev(self, expected_sites: int) -> float:
        """Adaptive clipping's count noise σ_b: the setting, else max(expected sites/20, z)
        (Andrew et al. recommend sites/20; with few sites that leaves no noise for the update,
        so at least z, which raises the update's noise multiplier by a factor 1.15)."""
        if self.client_dp_count_stddev > 0:
            return self.client_dp_count_stddev
        return max(expected_sites / 20, self.client_dp_noise_multiplier)


@dataclass(frozen=True)
class CoordinatorSettings:
    teacher_path: str = opt("", "teacher .safetensors at the coordinator")
    output_dir: str = opt("", "absolute folder holding runs/<run-name>/")
    eval_source: str = opt("", "coordinator's held-out set: a path or synthetic:target")
    eval_sites: int = opt(1, "synthetic eval-source: site styles to mix", lo=1)
    resume: bool = opt(False, "continue after the last completed round")
    site_registry: str = opt("", "JSON node id -> site name, from the registered keys")
    simulation_sites: str = opt("", "simulation only: JSON list of the simulated sites' "
                                    "node configs (ignored by real SuperNodes)")


PARTS = {"objective": ObjectiveSettings, "training": LocalTraining,
         "federation": FederationSettings, "privacy": PrivacySettings,
         "coordinator": CoordinatorSettings}


def _key(name: str) -> str:
    return name.replace("_", "-")


def settings_fields() -> dict[str, tuple[str, Any]]:
    """Flat key → (part name, dataclass field), in the tree's order."""
    out: dict[str, tuple[str, Any]] = {}
    for part, cls in PARTS.items():
        for f in fields(cls):
            out[_key(f.name)] = (part, f)
    return out


@dataclass(frozen=True)
class RunConfig:
    """See module docstring."""

    objective: ObjectiveSettings = field(default_factory=ObjectiveSettings)
    training: LocalTraining = field(default_factory=LocalTraining)
    federation: FederationSettings = field(default_factory=FederationSettings)
    privacy: PrivacySettings = field(default_factory=PrivacySettings)
    coordinator: CoordinatorSettings = field(default_factory=CoordinatorSettings)

    def __post_init__(self) -> None:
        for key, (part, f) in settings_fields().items():
            _check(key, getattr(getattr(self, part), f.name), f)
        fed = self.federation
        if fed.min_available_nodes < fed.min_train_nodes:
            raise ConfigError("min-available-nodes must be at least min-train-nodes")
        if self.training.max_steps:
            self.train_config(1)  # the local settings are valid together
        if fed.aggregation == "fedavgm" and not fed.fedbn and not (
                self.privacy.dp == "dp-sgd" and self.privacy.dp_trainable == "all"):
            raise ConfigError("aggregation fedavgm needs fedbn = true: server momentum on "
                              "BatchNorm statistics can step a variance below zero (a "
                              "GroupNorm DP-SGD student has none)")
        if self.privacy.dp != "dp-sgd" and self.privacy.dp_target_epsilon > 0:
            raise ConfigError("dp-target-epsilon is the epsilon DP-SGD spends: set dp = "
                              "\"dp-sgd\" too (without it the run would train without DP)")
        if self.privacy.dp == "dp-sgd":
            # objectives whose loss is a mean of per-sample terms (dp_compatible; MoMA's queue
            # and batch attention and CRCKD's memory banks carry other samples into a sample's
            # gradient)
            if self.objective.objective not in objective_registry.dp_names():
                raise ConfigError(
                    f"dp = dp-sgd needs objective {', '.join(objective_registry.dp_names())}: "
                    f"{self.objective.objective}'s loss carries other samples into each "
                    "sample's gradient (queue, batch attention or memory banks)")
            if fed.aggregation == "fedprox":
                raise ConfigError("dp = dp-sgd cannot use fedprox: its proximal term is not "
                                  "clipped per sample")
        if self.privacy.secagg != "off":
            if fed.aggregation not in CLIENT_DP_AGGREGATIONS:
                raise ConfigError(
                    f"secagg needs aggregation {' or '.join(CLIENT_DP_AGGREGATIONS)}: the "
                    f"coordinator sees only the weighted mean, not each update "
                    f"({fed.aggregation} needs each)")
            if self.privacy.client_dp == "server-clipping":
                raise ConfigError("secagg cannot use client-dp = server-clipping: the "
                                  "coordinator cannot clip updates it cannot see (use "
                                  "site-clipping)")
            if self.privacy.client_dp != "off" and \
                    self.privacy.client_dp_clipping == "adaptive":
                raise ConfigError("secagg cannot use adaptive clipping: the coordinator "
                                  "cannot count clipped updates it cannot see")
            if fed.min_train_nodes < 2:
                raise ConfigError("secagg needs min-train-nodes of at least 2")
            if fed.transfer_dtype != "float32":
                raise ConfigError("secagg needs transfer-dtype = float32 (the sites send "
                                  "their change of the float32 student)")
        if self.privacy.client_dp != "off":
            if fed.aggregation not in CLIENT_DP_AGGREGATIONS:
                raise ConfigError(
                    f"client-dp needs aggregation {' or '.join(CLIENT_DP_AGGREGATIONS)} (a "
                    f"uniform mean of clipped updates), not {fed.aggregation}")
            if fed.transfer_dtype != "float32":
                raise ConfigError("client-dp needs transfer-dtype = float32: a float16 update "
                                  "is no longer within the clipping norm")
            if self.privacy.client_dp_clipping == "adaptive":
                z = self.privacy.client_dp_noise_multiplier
                sigma_b = self.privacy.count_stddev(fed.min_train_nodes)
                if not z < 2 * sigma_b:
                    raise ConfigError(
                        f"client-dp-count-stddev {sigma_b:g} is too small for noise multiplier "
                        f"{z:g}: adaptive clipping spends part of the noise on the count, "
                        "which needs a count std above half the noise multiplier")

    # -- flat form (Flower's run config) -----------------------------------------------------
    @classmethod
    def from_flat(cls, flat: dict, ignore: frozenset[str] = frozenset()) -> RunConfig:
        """From a kebab-case mapping; unknown keys are refused (named) unless in ``ignore``."""
        known = settings_fields()
        parts: dict[str, dict] = {p: {} for p in PARTS}
        for key, value in flat.items():
            if key in ignore:
                continue
            setting(key)  # unknown: named, with the closest key
            part, f = known[key]
            parts[part][f.name] = _typed(key, value, f)
        return cls(**{p: PARTS[p](**v) for p, v in parts.items()})

    def to_flat(self) -> dict:
        return {key: getattr(getattr(self, part), f.name)
                for key, (part, f) in settings_fields().items()}

    def with_values(self, **flat: Any) -> RunConfig:
        """A copy with some settings changed (kebab or snake keys), validated."""
        return RunConfig.from_flat({**self.to_flat(), **{_key(k): v for k, v in flat.items()}})

    def replace_part(self, **parts: Any) -> RunConfig:
        return replace(self, **parts)

    # -- derived settings --------------------------------------------------------------------
    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(c.strip() for c in self.federation.classes.split(",") if c.strip())

    def objective_config(self) -> ObjectiveConfig:
        return self.objective.config()

    def student_architecture(self, classes: tuple[str, ...] | None = None) -> Architecture:
        """The student both sides build (GroupNorm under DP-SGD of the whole student; with
        ``dp-trainable`` head or last-stage it keeps BatchNorm, frozen); ``classes``: the
        site's."""
        from moma_core.models import Architecture

        fed = self.federation
        private = self.privacy.dp == "dp-sgd" and self.privacy.dp_trainable == "all"
        extra = {"norm": "group", "group-size": DP_GROUP_SIZE} if private else {}
        return Architecture(fed.student_model, tuple(classes or self.class_names),
                            fed.image_size, extra=extra)

    def round_lr(self, server_round: int) -> float:
        """The local learning rate of a round: a cosine over rounds to lr·1e-3, or constant
        (``dp-lr`` instead of ``lr`` under DP-SGD)."""
        lr, rounds = self.training.lr, self.federation.num_rounds
        if self.privacy.dp == "dp-sgd":
            lr = self.privacy.dp_lr
        if self.training.lr_schedule == "cosine" and rounds > 1:
            lr *= cosine_factor((server_round - 1) / (rounds - 1))
        return lr

    def train_config(self, server_round: int) -> TrainConfig:
        fed, tr = self.federation, self.training
        return TrainConfig(epochs=tr.local_epochs, max_steps=tr.max_steps or None,
                           lr=self.round_lr(server_round),
                           optimizer=self.privacy.dp_optimizer if self.privacy.dp == "dp-sgd"
                           else tr.optimizer,
                           cosine=False,
                           proximal_mu=fed.proximal_mu if fed.aggregation == "fedprox" else 0.0,
                           seed=fed.seed * 100003 + server_round)


# -- validation ------------------------------------------------------------------------------
def setting(key: str) -> Any:
    """The dataclass field of run-config ``key``; an unknown key is refused (ConfigError)
    with the closest known key."""
    return lookup(fields_by_key(), key)


def checked(key: str, value: Any) -> Any:
    """``value`` of run-config ``key`` typed and checked on its own (type, choices, range):
    what :meth:`RunConfig.from_flat` does for each key before the checks across settings."""
    return checked_value(key, value, setting(key))


def fields_by_key() -> dict[str, Any]:
    """Flat key → dataclass field of every run setting, in the tree's order."""
    return {key: f for key, (_, f) in settings_fields().items()}




def defaults() -> dict:
    """Every run-config key with its default (what pyproject and the app folder list)."""
    return RunConfig().to_flat()


def markdown_table() -> str:
    """docs/configuration.md's table of every setting (generated; a test compares)."""
    rows = ["| key | part | default | allowed | meaning |", "|---|---|---|---|---|"]
    for key, (part, f) in settings_fields().items():
        meta = f.metadata
        choices = choices_of(f)
        allowed = ", ".join(map(str, choices)) if choices else _range(meta)
        default = f.default if f.default is not MISSING else ""
        rows.append(f"| `{key}` | {part} | `{_toml(default)}` | {allowed} | {meta['help']} |")
    return "\n".join(rows)


def _range(meta: dict) -> str:
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is None and hi is None:
        return ""
    left = "" if lo is None else f"{'>' if meta['lo_open'] else '≥'} {lo}"
    right = "" if hi is None else f"{'<' if meta['hi_open'] else '≤'} {hi}"
    return ", ".join(x for x in (left, right) if x)


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    return f'"{v}"'
