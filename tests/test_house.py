"""House rules checked on the source tree: module size (the linter runs in ``make test``)."""

from __future__ import annotations

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
