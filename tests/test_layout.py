"""The layout's rules, checked on the source: who may import whom, no environment channels."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imports(package: str) -> dict[str, set[str]]:
    """Top-level packages each module of ``package`` imports (at any depth in the file)."""
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        out[str(path.relative_to(ROOT))] = names
    return out


@pytest.mark.parametrize("package,forbidden", [
    ("server", {"client", "moma_bench"}),  # the coordinator never imports the site's code
    ("client", {"server", "moma_bench"}),
    ("deploy", {"moma_bench"}),
    ("moma_protocol", {"server", "client", "deploy", "moma_bench"}),  # owned by neither side
    ("moma_core", {"server", "client", "deploy", "moma_protocol", "flwr",
                   "moma_bench"}),  # plain PyTorch
])
def test_import_rules(package, forbidden):
    bad = {m: sorted(names & forbidden) for m, names in _imports(package).items()
           if names & forbidden}
    assert bad == {}


def test_only_the_benchmark_imports_both_sides():
    """moma_bench (not part of the product) may import the coordinator's and the site's code;
    no package of the product does, and none of them imports moma_bench (the rules above)."""
    both = {pkg for pkg in (*PRODUCT, "moma_bench")
            if {"server", "client"} <= set().union(*_imports(pkg).values())}
    assert both <= {"moma_bench"}
    assert "moma_bench" in both  # the rule is about a package that exists and does import both


def test_no_environment_channel_between_simulation_and_sites():
    """Site settings reach simulated sites through the run config's spec file only."""
    paths = [ROOT / "server" / "simulate.py", ROOT / "server" / "server_app.py",
             *(ROOT / "client").rglob("*.py"), *(ROOT / "moma_protocol").rglob("*.py")]
    for path in paths:
        text = path.read_text()
        assert "MOMA_SIM" not in text, path
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Store):
                assert ast.unparse(node.value) != "os.environ", f"{path}: writes os.environ"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _internal_imports(path: Path, modules: set[str]) -> set[str]:
    """The ``modules`` a file imports, at any depth but outside ``if TYPE_CHECKING:``."""
    package = _module_name(path) if path.name == "__init__.py" else \
        _module_name(path).rpartition(".")[0]
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING",
                                                                    "typing.TYPE_CHECKING"):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            for a in node.names:  # ``from pkg import submodule`` imports the submodule
                if f"{base}.{a.name}" in modules:
                    out.add(f"{base}.{a.name}")
                elif base in modules:
                    out.add(base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return out


def _import_graph(*packages: str) -> dict[str, set[str]]:
    """Each module of ``packages`` → the modules of ``packages`` it imports (deferred imports
    count too)."""
    paths = sorted(p for package in packages for p in (ROOT / package).rglob("*.py"))
    modules = {_module_name(p) for p in paths}
    return {_module_name(p): _internal_imports(p, modules) - {_module_name(p)} for p in paths}


def _circles(graph: dict[str, set[str]]) -> list[str]:
    circles, state = [], dict.fromkeys(graph, 0)  # 0 new, 1 on the current path, 2 done

    def walk(module: str, trail: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state[target] == 1:
                circles.append(" -> ".join(trail[trail.index(target):] + [target]))
            elif state[target] == 0:
                walk(target, trail + [target])
        state[module] = 2

    for module in sorted(graph):
        if state[module] == 0:
            walk(module, [module])
    return circles


@pytest.mark.parametrize("package", ["moma_core", "server", "client", "moma_bench"])
def test_no_import_circles(package):
    """No module of ``package`` imports, directly or through others, a module that imports it:
    no import is deferred into a function to dodge a circle (deferred imports count too). A
    round reads top to bottom: server.round calls down into server.transport and
    server.secagg; client.client_app and client.secagg_site both call down into
    client.site_messages; client.site_errors imports neither the worker nor the training."""
    assert _circles(_import_graph(package)) == []


def test_no_import_circle_between_the_benchmark_and_the_coordinator():
    """moma_bench imports server (moma-simulate, the baseline); nothing in server imports back,
    so no circle passes through both (server.simulate no longer imports the benchmark's code
    through the baseline)."""
    assert _circles(_import_graph("server", "moma_bench")) == []


@pytest.mark.parametrize("module,never", [
    ("server.secagg", {"server.round", "server.server_app"}),
    ("server.transport", {"server.round", "server.secagg", "server.server_app"}),
    ("client.secagg_site", {"client.client_app"}),
    ("client.site_messages", {"client.client_app", "client.secagg_site"}),
    ("client.site_errors", {"client.site_worker", "client.site_training", "client.site_round",
                            "client.client_app"}),
])
def test_lower_modules_never_call_back_up(module, never):
    assert _import_graph(module.split(".")[0])[module] & never == set()


def test_the_circle_check_finds_a_circle():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a -> b -> c -> a"]


# -- Flower's internals only through the compat modules ----------------------------------------
#: the modules that may import Flower's internals (tests/test_flwr_compat.py checks them)
FLWR_COMPAT = {"moma_protocol/flwr_compat.py", "server/flwr_compat.py", "client/flwr_compat.py",
               "deploy/flwr_compat.py"}
#: Flower's public API: the packages of its API reference; a name imported from one must be in
#: its ``__all__``
FLWR_PUBLIC = ("flwr", "flwr.app", "flwr.clientapp", "flwr.serverapp", "flwr.serverapp.strategy",
               "flwr.simulation", "flwr.client", "flwr.client.mod", "flwr.server",
               "flwr.server.workflow", "flwr.common")
PRODUCT = ("server", "client", "deploy", "moma_protocol", "moma_core")
#: Flower globals replaced outside a compat module (none: the SuperLink launcher's gate and
#: credential store are replaced by functions of deploy/flwr_compat.py). No other may be added.
KNOWN_PATCHES: dict[str, list[str]] = {}


def _flwr_all(module: str) -> set[str]:
    import importlib

    return set(getattr(importlib.import_module(module), "__all__", ()))


def flwr_internal_uses(tree: ast.AST) -> list[str]:
    """Flower internals a module's source uses: imports of a module outside Flower's public
    packages, of a name outside their ``__all__`` or starting with ``_``, ``_``-prefixed
    attributes of a name bound to a Flower import, and assignments to an attribute of a name
    imported from Flower or from a compat module (Flower's globals are replaced there only)."""
    found, bound, patchable = [], set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and \
                node.module.split(".")[-1] == "flwr_compat":
            patchable |= {a.asname or a.name for a in node.names}
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "flwr" or a.name.startswith("flwr."):
                    bound.add(a.asname or "flwr")
                    if a.name not in FLWR_PUBLIC:
                        found.append(f"import {a.name}")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and (
                node.module == "flwr" or node.module.startswith("flwr.")):
            public = _flwr_all(node.module) if node.module in FLWR_PUBLIC else set()
            for a in node.names:
                bound.add(a.asname or a.name)
                if a.name.startswith("_") or a.name not in public:
                    found.append(f"from {node.module} import {a.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") \
                and not node.attr.startswith("__"):
            base = node.value
            while isinstance(base, ast.Attribute | ast.Call | ast.Subscript):
                base = base.func if isinstance(base, ast.Call) else base.value
            if isinstance(base, ast.Name) and base.id in bound:
                found.append(ast.unparse(node))
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, ast.AugAssign | ast.AnnAssign) else []
        for target in targets:
            for t in target.elts if isinstance(target, ast.Tuple) else [target]:
                base = t
                while isinstance(base, ast.Attribute):
                    base = base.value
                if isinstance(t, ast.Attribute) and isinstance(base, ast.Name) and \
                        base.id in bound | patchable:
                    found.append(f"{ast.unparse(t)} = …")
    return found


def test_flowers_internals_are_used_only_through_the_compat_modules():
    bad = {}
    for package in PRODUCT:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = str(path.relative_to(ROOT))
            if rel in FLWR_COMPAT:
                continue
            uses = [u for u in flwr_internal_uses(ast.parse(path.read_text()))
                    if u not in KNOWN_PATCHES.get(rel, [])]
            if uses:
                bad[rel] = uses
    assert bad == {}


def test_the_internal_use_check_finds_each_kind():
    source = ("import flwr.superlink.main as m\n"
              "from flwr.simulation.run_simulation import _run_simulation\n"
              "from flwr.common.constant import Status\n"
              "from flwr.common import Metadata, parameters_to_ndarrays, _log\n"
              "from flwr.serverapp.strategy import FedAvg\n"
              "from flwr.supercore.task_identity import TaskIdentity\n"
              "import flwr.app\n"
              "x = FedAvg()._check_and_log_replies\n"
              "y = flwr.app._private\n"
              "from server.flwr_compat import TaskIdentity\n"
              "TaskIdentity.run_id, z = 1, 2\n"
              "flwr.app.Message = None\n")
    assert flwr_internal_uses(ast.parse(source)) == [
        "import flwr.superlink.main",
        "from flwr.simulation.run_simulation import _run_simulation",
        "from flwr.common.constant import Status",
        "from flwr.common import _log",
        "from flwr.supercore.task_identity import TaskIdentity",
        "TaskIdentity.run_id = …", "flwr.app.Message = …",
        "FedAvg()._check_and_log_replies", "flwr.app._private"]


def test_the_compat_modules_are_the_ones_the_compat_test_checks():
    from tests.test_flwr_compat import COMPAT_MODULES

    assert {m.replace(".", "/") + ".py" for m in COMPAT_MODULES} == FLWR_COMPAT
