"""Every internal Flower name the coordinator uses, and the code that reaches into Flower.

The coordinator's seam with Flower 1.42 (see :mod:`moma_protocol.flwr_compat` for the scheme:
pinned minor version, one compat module per side, names resolved when imported from here,
``tests/test_flwr_compat.py`` checking :data:`INTERNALS` against the installed Flower). The
rest of ``server/`` imports Flower's public API (``flwr.app``, ``flwr.serverapp``,
``flwr.serverapp.strategy``, ``flwr.server``, ``flwr.common``) and, for anything else, this
module. Besides the names:

- :func:`secaggplus_context` and :func:`train_on_contents`: how Flower's legacy SecAgg+
  workflow is run with MoMA-FL's own train messages (:mod:`server.secagg`);
- :func:`simulation_run` and :func:`run_simulation_engine`: the simulation engine entry that
  takes a run config (:mod:`server.simulate`);
- :class:`AcceptedReply` and :data:`STRATEGY_STATE`: how the aggregator feeds Flower's
  strategies and keeps their state (:mod:`server.aggregation`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from moma_protocol.flwr_compat import SHARED, Internal, lazy_names

if TYPE_CHECKING:  # for readers and type checkers; at run time the names resolve lazily
    from flwr.app import Context, RecordDict
    from flwr.cli.flower_config import read_superlink_connection  # noqa: F401
    from flwr.cli.utils import init_http_client_from_connection  # noqa: F401
    from flwr.proto.control_pb2 import (  # noqa: F401
        ListNodesRequest,
        RegisterNodeRequest,
        UnregisterNodeRequest,
    )
    from flwr.server import LegacyContext
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.supercore.differential_privacy import (  # noqa: F401
        add_gaussian_noise_inplace,
        compute_adaptive_noise_params,
        compute_stdv,
    )
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes  # noqa: F401
    from flwr.supercore.run import Run

_DP = "flwr.supercore.differential_privacy"
_SECAGG_WORKFLOW = "flwr.server.workflow.secure_aggregation.secaggplus_workflow"
_WORKFLOW_CONSTANTS = "flwr.server.workflow.constant"
_CONTROL = "flwr.proto.control_pb2"
_NO_CONTROL_CLIENT = ("none: Flower has no public Python client of its Control API (the flwr "
                      "CLI's own commands are the public way)")

INTERNALS: dict[str, Internal] = {
    # -- SecAgg+ (server.secagg) ---------------------------------------------------------------
    "Key": SHARED["Key"],
    "Stage": SHARED["Stage"],
    "SecAggPlusWorkflow": Internal(
        "flwr.server.workflow", "SecAggPlusWorkflow",
        why="public itself, but the coordinator replaces its setup_stage per instance "
            "(train_on_contents), which its __call__ looks up on the instance",
        public="a SecAgg+ for the message API (flwr.serverapp) that takes each site's train "
               "message: Flower 1.42 has SecAgg+ only for the legacy fit path",
        params=("num_shares", "reconstruction_threshold", "max_weight", "clipping_range",
                "quantization_range", "modulus_range", "timeout"),
        attrs=("setup_stage",)),
    "WorkflowState": Internal(
        _SECAGG_WORKFLOW, "WorkflowState",
        why="the workflow's state between stages: after setup, nid_to_fitins (the message "
            "each sampled site trains on) is replaced by MoMA-FL's train messages",
        public="none (see SecAggPlusWorkflow)", attrs=("nid_to_fitins",)),
    "MAIN_CONFIGS_RECORD": Internal(
        _WORKFLOW_CONSTANTS, "MAIN_CONFIGS_RECORD",
        why="the legacy workflow reads the current round from this record of its context",
        public="none: the legacy workflows' context layout is internal"),
    "MAIN_PARAMS_RECORD": Internal(
        _WORKFLOW_CONSTANTS, "MAIN_PARAMS_RECORD",
        why="the legacy workflow reads (and writes) the global parameters in this record",
        public="none (see MAIN_CONFIGS_RECORD)"),
    "WorkflowKey": Internal(
        _WORKFLOW_CONSTANTS, "Key",
        why="the key of the current round in MAIN_CONFIGS_RECORD",
        public="none (see MAIN_CONFIGS_RECORD)", attrs=("CURRENT_ROUND",)),
    "LegacyContext": Internal(
        "flwr.server", "LegacyContext",
        why="the context Flower's legacy workflows run in (public, deprecated with the legacy "
            "API); it carries the collecting strategy of server.secagg",
        public="flwr.server.LegacyContext itself; gone with SecAgg+ for the message API",
        params=("context", "strategy")),
    # -- client-level DP (server.client_dp) -------------------------------------------------
    "compute_adaptive_noise_params": Internal(
        _DP, "compute_adaptive_noise_params",
        why="adaptive clipping: the update noise and the count's noise from one multiplier, "
            "as Flower's adaptive-clipping wrappers compute them",
        public="none: used inside DifferentialPrivacyClientSideAdaptiveClipping only",
        params=("noise_multiplier", "num_sampled_clients", "clipped_count_stddev")),
    "add_gaussian_noise_inplace": Internal(
        _DP, "add_gaussian_noise_inplace",
        why="secure aggregation with client-level DP: the noise on the unmasked mean, as "
            "Flower's DP wrappers add it",
        public="none: Flower's DP wrappers noise an aggregate_train result, not a mean",
        params=("input_arrays", "std_dev")),
    "compute_stdv": Internal(
        _DP, "compute_stdv", why="the noise's standard deviation z·C/m (see above)",
        public="none", params=("noise_multiplier", "clipping_norm", "num_sampled_clients")),
    # -- site registration (server.registration) --------------------------------------------
    "public_key_to_bytes": Internal(
        "flwr.supercore.primitives.asymmetric", "public_key_to_bytes",
        why="a site's key as the SuperLink stores it, to match registered nodes with the "
            "federation's sites", public=_NO_CONTROL_CLIENT, params=("public_key",)),
    "read_superlink_connection": Internal(
        "flwr.cli.flower_config", "read_superlink_connection",
        why="the SuperLink connection the flwr CLI would use (FLWR_HOME)",
        public=_NO_CONTROL_CLIENT, params=("connection_name",)),
    "init_http_client_from_connection": Internal(
        "flwr.cli.utils", "init_http_client_from_connection",
        why="the Control API client of the flwr CLI, with its credential store",
        public=_NO_CONTROL_CLIENT, params=("connection",)),
    "ListNodesRequest": Internal(_CONTROL, "ListNodesRequest",
                                 why="the Control API's node list (registered sites)",
                                 public=_NO_CONTROL_CLIENT),
    "RegisterNodeRequest": Internal(_CONTROL, "RegisterNodeRequest",
                                    why="registers a site's key under its name",
                                    public=_NO_CONTROL_CLIENT, attrs=("public_key", "name")),
    "UnregisterNodeRequest": Internal(_CONTROL, "UnregisterNodeRequest",
                                      why="unregisters a revoked or replaced key",
                                      public=_NO_CONTROL_CLIENT, attrs=("node_id",)),
    # -- the simulation engine (server.simulate) --------------------------------------------
    "_run_simulation": Internal(
        "flwr.simulation.run_simulation", "_run_simulation",
        why="the in-process simulation engine with an app folder and a run whose config is "
            "the run's (a failing ServerApp then fails moma-simulate)",
        public="flwr.simulation.run_simulation takes no run config; `flwr run` on a local "
               "simulation federation runs it out of process",
        params=("num_supernodes", "exit_event", "client_app", "client_app_attr",
                "server_app_attr", "backend_config", "app_dir", "is_app", "run",
                "server_app_context")),
    "Run": Internal(
        "flwr.supercore.run", "Run",
        why="the run _run_simulation executes (its id, config overrides, primary task)",
        public="none (see _run_simulation)",
        attrs=("create_empty", "override_config", "primary_task_id", "federation_id")),
    "TaskIdentity": Internal(
        "flwr.supercore.task_identity", "TaskIdentity",
        why="the process's run/task/node identity, which Message() reads: the simulated "
            "ServerApp runs in this process and Flower's engine does not set it",
        public="none: set by Flower's own process entry points",
        attrs=("task_id", "run_id", "node_id")),
    "NOOP_FEDERATION_ID": Internal(
        "flwr.supercore.constant", "NOOP_FEDERATION_ID",
        why="the federation of a simulated run", public="none (see _run_simulation)"),
    "SUPERLINK_NODE_ID": Internal(
        "flwr.common.constant", "SUPERLINK_NODE_ID",
        why="the ServerApp's node id in TaskIdentity", public="none (see _run_simulation)"),
    "get_fused_config_from_dir": Internal(
        "flwr.common.config", "get_fused_config_from_dir",
        why="the app folder's defaults fused with the run's settings, as `flwr run` does",
        public="none (see _run_simulation)", params=("project_dir", "override_config")),
}

__getattr__ = lazy_names(INTERNALS, __name__)


# -- SecAgg+ -----------------------------------------------------------------------------------
def secaggplus_context(strategy: Any, server_round: int) -> LegacyContext:
    """The context Flower's legacy SecAgg+ workflow runs one round in: ``strategy`` (the
    legacy strategy that chooses the sites and keeps the result), round ``server_round``, no
    global parameters (the sites train on their own train messages)."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
    from flwr.server import LegacyContext
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
    from flwr.server.workflow.constant import Key as WorkflowKey

    context = LegacyContext(Context(run_id=0, node_id=0, node_config={},
                                    state=RecordDict(), run_config={}),
                            strategy=strategy)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
        {WorkflowKey.CURRENT_ROUND: server_round})
    context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
    return context


def train_on_contents(workflow: SecAggPlusWorkflow, contents: Mapping[int, RecordDict]
                      ) -> None:
    """Make ``workflow`` send each site its train message ``contents[node]`` (MoMA-FL's own:
    the global student, the round's fields, the teacher where missing) where Flower's
    setup stage would put a legacy fit instruction."""
    setup = workflow.setup_stage

    def setup_with_contents(g, ctx, state) -> bool:
        ok = setup(g, ctx, state)
        # the sites train on MoMA-FL's own train message, not a legacy fit instruction
        state.nid_to_fitins = {n: contents[n] for n in state.nid_to_fitins}
        return ok

    workflow.setup_stage = setup_with_contents  # type: ignore[method-assign]


# -- the simulation engine ---------------------------------------------------------------------
def simulation_run(run_id: int, primary_task_id: int, overrides: dict[str, Any],
                   app_dir: Any) -> tuple[Run, Context]:
    """The Flower run of a simulation (``overrides``: the run config) and the ServerApp's
    context; sets this process's :data:`TaskIdentity` to the ServerApp's task of that run."""
    from flwr.app import Context, RecordDict
    from flwr.common.config import get_fused_config_from_dir
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity

    flwr_run = Run.create_empty(run_id=run_id)
    flwr_run.override_config = overrides
    flwr_run.primary_task_id = primary_task_id
    flwr_run.federation_id = NOOP_FEDERATION_ID
    TaskIdentity.task_id, TaskIdentity.run_id = 1, flwr_run.run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    context = Context(run_id=flwr_run.run_id, node_id=0, node_config={}, state=RecordDict(),
                      run_config=get_fused_config_from_dir(app_dir, overrides))
    return flwr_run, context


def run_simulation_engine(flwr_run: Run, context: Context, *, num_supernodes: int,
                          client_app: Any, client_app_attr: str | None, server_app_attr: str,
                          backend_config: dict, app_dir: str) -> None:
    """Flower's in-process simulation engine on ``flwr_run`` (:func:`simulation_run`), as
    ``flwr run`` runs a local simulation, with the app folder's components."""
    from flwr.common import EventType
    from flwr.simulation.run_simulation import _run_simulation

    _run_simulation(num_supernodes=num_supernodes,
                    exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
                    client_app=client_app, client_app_attr=client_app_attr,
                    server_app_attr=server_app_attr, backend_config=backend_config,
                    app_dir=app_dir, is_app=True, run=flwr_run, server_app_context=context)


# -- aggregation -------------------------------------------------------------------------------
class AcceptedReply:
    """A checked update as Flower's strategies read a reply in ``aggregate_train``: its
    ``content`` and ``has_error()`` (False), nothing else.

    Why a stand-in and not a :class:`flwr.app.Message`: Flower 1.42's strategies offer no
    public aggregation of arrays and weights: ``aggregate_arrayrecords`` (FedAvg's weighted
    mean) is in ``flwr.serverapp.strategy.strategy_utils``, not exported, and FedMedian's,
    FedTrimmedAvg's, FedAdam's and FedAvgM's arithmetic exists only inside their
    ``aggregate_train(server_round, replies)``, which takes messages. The replies the sites
    sent carry the student as one safetensors file, not the per-tensor ArrayRecord the
    strategies average, so what is aggregated is a checked, decoded update in any case. A
    real reply could be rebuilt from the round's instruction (``Message(content,
    reply_to=instruction)``, public), but the aggregator is handed updates and weights (by
    :meth:`server.round.Coordinator.aggregate_train` and the aggregation tests), and an
    instruction cannot be made outside a run without :data:`TaskIdentity` or Flower's
    internal ``metadata=``. The public replacement would be Flower exporting its aggregation
    functions (arrays and weights in, arrays out) or a strategy API on records.
    """

    def __init__(self, content: RecordDict) -> None:
        self.content = content

    def has_error(self) -> bool:
        return False


#: what the aggregator reads and writes of Flower's (public) strategies beyond their public
#: methods, by class name in ``flwr.serverapp.strategy``: the server optimisers' state (saved
#: with every checkpoint, restored on resume), the global arrays they step from, and the DP
#: wrapper's per-round settings. Public replacement: a state_dict/load_state_dict on strategies.
STRATEGY_STATE: dict[str, tuple[str, ...]] = {
    "FedAdam": ("current_arrays", "m_t", "v_t"),
    "FedAvgM": ("current_arrays", "momentum_vector"),
    "DifferentialPrivacyClientSideFixedClipping": ("num_sampled_clients", "clipping_norm",
                                                   "noise_multiplier"),
}
