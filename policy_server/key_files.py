"""Keys read from files: what a mounted Secret (Kubernetes, podman, docker) gives the server.

A key in a file stays out of the process environment, ``ps e`` and the orchestrator's
object dumps. :func:`read_key_file` reads one: trailing line breaks stripped (what
``echo`` and most editors leave), a clear ConfigError for a file that is missing,
unreadable, empty or not one line of text, and a logged warning when the file's mode
gives more than 0640 (a key others on the host could read or rewrite).
"""

from __future__ import annotations

import logging
import os
import stat

from policy_server.errors import ConfigError

log = logging.getLogger(__name__)

# No key is longer; a larger file is the wrong file (a certificate, a device, a log).
MAX_KEY_FILE_BYTES = 4096
# Owner read/write, group read: what a Secret mounted with defaultMode 0440/0640 or a
# file made with `install -m 0640` has. Any other bit draws the warning.
WIDEST_QUIET_MODE = 0o640

_warned: set[str] = set()  # one warning per file and process (the master's is inherited by its workers)


def read_key_file(path: str, setting: str) -> str:
    """The key held in ``path``, for the setting named ``setting`` (used in messages).

    Raises ConfigError when the file cannot be read, is empty (after stripping trailing
    line breaks), is larger than MAX_KEY_FILE_BYTES, is not UTF-8, or holds a line break
    inside the key. Logs a warning (once per file) when its mode is wider than 0640.
    """
    try:
        with open(path, "rb") as f:
            mode = stat.S_IMODE(os.fstat(f.fileno()).st_mode)
            raw = f.read(MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{setting} {path!r} cannot be read: {exc.strerror or exc}") from None
    if len(raw) > MAX_KEY_FILE_BYTES:
        raise ConfigError(f"{setting} {path!r} is larger than {MAX_KEY_FILE_BYTES} bytes: not a key file")
    try:
        key = raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        raise ConfigError(f"{setting} {path!r} is not UTF-8 text") from None
    if not key:
        raise ConfigError(f"{setting} {path!r} is empty")
    if "\n" in key or "\r" in key:
        raise ConfigError(f"{setting} {path!r} holds more than one line; a key is one line")
    if mode & ~WIDEST_QUIET_MODE and path not in _warned:
        _warned.add(path)
        log.warning(
            "%s %r has mode %04o, wider than %04o: others may read or change the key (chmod 0640, 0600 or 0440)",
            setting, path, mode, WIDEST_QUIET_MODE,
        )
    return key
