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
    ("server", {"client"}),           # the coordinator never imports the site's code
    ("client", {"server"}),
    ("moma_protocol", {"server", "client", "deploy"}),  # owned by neither side
    ("moma_core", {"server", "client", "deploy", "moma_protocol", "flwr"}),  # plain PyTorch
])
def test_import_rules(package, forbidden):
    bad = {m: sorted(names & forbidden) for m, names in _imports(package).items()
           if names & forbidden}
    assert bad == {}


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
