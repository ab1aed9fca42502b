"""Print the local paths this machine's pip configuration needs, one per line.

``deploy/lib.sh`` mounts each of them read-only into the image build's RUN steps, so pip
inside the build installs exactly as pip on this machine does (same indexes, local wheel
folders, certificate bundle, constraint files) while nothing of that configuration lands
in an image layer. The paths come from ``pip config debug``: every configuration file that
exists, and every existing local path that a value (or a ``PIP_*`` variable) names; for a
``file://.../simple`` index its parent folder, whose ``files/`` its pages link to.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

_CONFIG_FILE = re.compile(r"^\s+(/\S+), exists: True$")


def paths(debug_output: str) -> list[str]:
    """The local paths named in ``pip config debug`` output, sorted, without duplicates."""
    found = set()
    for line in debug_output.splitlines():
        match = _CONFIG_FILE.match(line)
        if match:
            found.add(match.group(1))
            continue
        _, sep, value = line.partition(":" if re.match(r"^\s+\w+\.", line) else "=")
        if not sep:
            continue
        for token in value.strip().strip("'\"").split():
            token = token.removeprefix("file://").rstrip("/")
            if not token.startswith("/") or not os.path.exists(token):
                continue
            found.add(os.path.dirname(token) if token.endswith("/simple") else token)
    return sorted(found)


def main() -> int:
    debug = subprocess.run(
        [sys.executable, "-m", "pip", "config", "debug"], capture_output=True, text=True, check=False
    ).stdout
    for path in paths(debug):
        sys.stdout.write(path + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
