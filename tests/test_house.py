"""House rules checked on the source tree: module size (the linter runs in ``make test``), and
the test suite's layout: helpers in ``tests/support/``, test modules that import no other."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 400
# The restricted decoder loop of the wire format is one unit on the hot path.
EXEMPT = {"binary_protocol.py"}
SKIP_DIRS = {"tests", ".venv", "build", "dist", "model-store", "logs", ".git"}


def _modules() -> list[Path]:
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).parts
        if parts[0] in SKIP_DIRS or any(p.startswith(".") or p.endswith(".egg-info") for p in parts):
            continue
        if len(parts) == 1 and path.name in EXEMPT:
            continue
        found.append(path)
    return found


def test_the_tree_has_modules_to_check():
    names = {str(p.relative_to(ROOT)) for p in _modules()}
    assert {"server.py", "policy_server/serving/runtime.py", "policy_client/client.py"} <= names


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_outside_tests_is_over_400_lines(path):
    assert len(path.read_text().splitlines()) <= MAX_LINES, f"{path.relative_to(ROOT)}: split it by job"


TESTS = ROOT / "tests"


def _test_tree() -> list[Path]:
    return sorted(p for p in TESTS.rglob("*.py") if "__pycache__" not in p.parts)


def test_the_top_of_tests_holds_only_test_modules():
    """Helpers live in tests/support/, so a test module's neighbours are all test modules."""
    strays = [p.name for p in TESTS.glob("*.py")
              if p.name not in ("__init__.py", "conftest.py") and not p.name.startswith("test_")]
    assert strays == [], f"move these to tests/support/: {strays}"


def _imported(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("path", _test_tree(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_test_module_or_conftest_is_imported(path):
    """Test modules take shared helpers from tests/support/, never from each other or conftest."""
    imported = _imported(ast.parse(path.read_text(), str(path)))
    wrong = sorted(name for name in imported if name == "tests.conftest" or name.startswith("tests.test_"))
    assert wrong == [], f"{path.relative_to(ROOT)} imports {wrong}: move what it needs to tests/support/"


def test_the_runtime_is_reached_through_runtime_of():
    lookup = 'extensions["policy_runtime"]'
    found = [str(p.relative_to(ROOT)) for p in _test_tree()
             if lookup in p.read_text() and p != TESTS / "support" / "apps.py" and p != Path(__file__).resolve()]
    assert found == [], f"use tests.support.apps.runtime_of(app) in {found}"


# -- the wings of policy_server/ -------------------------------------------------------------

# Each wing may import from its own rank and below, never above ("no upward arrow").
WING_RANK = {"": 0, "telemetry": 1, "inputs": 2, "model": 3, "store": 4, "serving": 5, "app": 6,
             "front_door": 7, "oip": 8, "openpi": 8}
# The modules of the package itself that every wing may use; entry points rank with them
# only as long as they import nothing above the foundation.
FOUNDATION = {"errors", "contract", "config", "key_files", "wsgi_keys", "torch_policy", "launcher", "healthcheck"}


def _server_modules() -> dict[str, Path]:
    package = ROOT / "policy_server"
    found = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imports(path: Path, top_level_only: bool) -> set[str]:
    import ast

    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            submodules = {f"{node.module}.{alias.name}" for alias in node.names} & MODULES
            names |= submodules or {node.module}  # "from package import module" imports the module
    return {n for n in names if n.startswith("policy_server.")}


MODULES = set(_server_modules())


def _wing(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in WING_RANK) else ""


def test_every_wing_and_foundation_module_is_known():
    modules = _server_modules()
    wings = {_wing(m) for m in modules}
    assert wings == set(WING_RANK), f"a new wing needs a rank in WING_RANK: {sorted(wings - set(WING_RANK))}"
    top = {m.split(".")[1] for m in modules if m.count(".") == 1 and _wing(m) == ""}
    assert top == FOUNDATION, f"modules at the top of policy_server/: {sorted(top ^ FOUNDATION)}"


def test_no_wing_imports_a_wing_above_it():
    modules = _server_modules()
    upward = []
    for module, path in modules.items():
        rank = WING_RANK[_wing(module)]
        for target in _imports(path, top_level_only=False):
            if target in modules and WING_RANK[_wing(target)] > rank:
                upward.append(f"{module} -> {target}")
    assert not upward, upward


def test_the_server_package_has_no_import_cycle():
    modules = _server_modules()
    # a module's own package is set up before it: that edge is no cycle
    graph = {m: {t for t in _imports(p, top_level_only=True) if t in modules and not m.startswith(t + ".")}
             for m, p in modules.items()}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
