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
    assert {"server.py", "policy_server/runtime.py", "policy_client/client.py"} <= names


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
