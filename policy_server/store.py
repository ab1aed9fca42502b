"""The model store: numbered, immutable versions per model name and an atomic pointer to the current one.

Layout (one directory, shared by every worker and every server instance that mounts it)::

    <root>/<name>/versions/000001/     a model directory (policy.py, model.safetensors, ...)
    <root>/<name>/versions/000002/
    <root>/<name>/CURRENT              JSON pointer: version, previous, generation, loaded, ...
    <root>/<name>/.staging/            candidates being written and validated
    <root>/<name>/.lock                serialises publishers (flock)

A version directory is never changed once published: its number names exactly one set of
weights. The pointer is replaced atomically (temp file, fsync, ``os.replace``), so a reader
sees the old pointer or the new one, never a torn one. Every pointer change bumps
``generation``; workers poll the pointer and react to a changed one. No torch here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

from policy_server.errors import ModelError, ServingError
from policy_server.model_loader import directory_digest

log = logging.getLogger(__name__)

POINTER = "CURRENT"
VERSIONS = "versions"
STAGING = ".staging"
LOCK = ".lock"
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
STALE_STAGING_S = 3600.0


class UnknownModel(ServingError):
    status, error = 404, "unknown model"


class UnknownVersion(ServingError):
    status, error = 404, "unknown version"


class InvalidModelName(ServingError):
    status, error = 400, "bad request"


@dataclass(frozen=True)
class Pointer:
    """The content of a model's CURRENT file."""

    model: str
    version: int
    previous: int | None
    generation: int
    loaded: bool
    digest: str
    changed_at: float
    seed_digest: str | None = None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def check_name(name: str) -> str:
    """Model names are path components: letters, digits, ``_.-``, at most 64, no leading dot."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise InvalidModelName(f"model name must match {NAME_PATTERN.pattern}")
    return name


def _fsync_tree(path: str) -> None:
    for root, _dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(path)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ModelStore:
    """Numbered versions and a current pointer per model, under ``root``; keeps the last ``keep``."""

    def __init__(self, root: str, keep: int = 5) -> None:
        if keep < 1:
            raise ValueError("keep must be at least 1")
        self.root = os.path.abspath(root)
        self.keep = keep
        os.makedirs(self.root, exist_ok=True)

    # -- reading (cheap: workers poll these) ---------------------------------------------

    def names(self) -> list[str]:
        """Models that have a pointer, sorted."""
        try:
            entries = os.listdir(self.root)
        except FileNotFoundError:
            return []
        return sorted(n for n in entries if NAME_PATTERN.fullmatch(n) and os.path.isfile(self._path(n, POINTER)))

    def read_pointer_bytes(self, name: str) -> bytes | None:
        """The raw pointer, or None. Opening the file (not a cached stat) is what NFS makes consistent."""
        try:
            with open(self._path(name, POINTER), "rb") as fh:
                return fh.read()
        except FileNotFoundError:
            return None

    def pointer(self, name: str) -> Pointer | None:
        raw = self.read_pointer_bytes(check_name(name))
        return None if raw is None else Pointer(**json.loads(raw))

    def require(self, name: str) -> Pointer:
        pointer = self.pointer(name)
        if pointer is None:
            raise UnknownModel(f"no model named {name!r} in the store")
        return pointer

    def versions(self, name: str) -> list[int]:
        try:
            entries = os.listdir(self._path(name, VERSIONS))
        except FileNotFoundError:
            return []
        return sorted(int(e) for e in entries if e.isdigit())

    def version_dir(self, name: str, version: int) -> str:
        return self._path(name, VERSIONS, f"{version:06d}")

    # -- writing --------------------------------------------------------------------------

    def stage(self, name: str, source_dir: str | None = None, *, skip: tuple[str, ...] = ()) -> str:
        """A fresh private directory for a candidate version, optionally a copy of ``source_dir``
        (without ``__pycache__`` and the names in ``skip``). Publish or :meth:`discard` it."""
        staging = self._path(check_name(name), STAGING)
        os.makedirs(staging, exist_ok=True)
        self._clean_stale(staging)
        path = tempfile.mkdtemp(prefix="candidate-", dir=staging)
        if source_dir is not None:
            shutil.copytree(
                source_dir, path, dirs_exist_ok=True,
                ignore=shutil.ignore_patterns("__pycache__", *skip),
            )
        return path

    @staticmethod
    def discard(staged_dir: str) -> None:
        shutil.rmtree(staged_dir, ignore_errors=True)

    def publish(self, name: str, staged_dir: str, *, seed_digest: str | None = None) -> Pointer:
        """Make ``staged_dir`` the next numbered version and point CURRENT at it (loaded)."""
        _fsync_tree(staged_dir)
        with self._locked(check_name(name)):
            return self._commit(name, staged_dir, seed_digest)

    def _commit(self, name: str, staged_dir: str, seed_digest: str | None) -> Pointer:
        digest = directory_digest(staged_dir)
        old = self.pointer(name)
        version = max(self.versions(name) + [old.version if old else 0]) + 1
        os.makedirs(self._path(name, VERSIONS), exist_ok=True)
        target = self.version_dir(name, version)
        os.rename(staged_dir, target)
        _fsync_dir(os.path.dirname(target))
        pointer = Pointer(
            model=name,
            version=version,
            previous=old.version if old else None,
            generation=(old.generation if old else 0) + 1,
            loaded=True,
            digest=digest,
            changed_at=time.time(),
            seed_digest=seed_digest if seed_digest is not None else (old.seed_digest if old else None),
        )
        self._write_pointer(pointer)
        self._prune(name, pointer.version)
        log.info("published %s version %d (previous %s)", name, version, pointer.previous)
        return pointer

    def set_current(self, name: str, version: int) -> Pointer:
        """Rollback (or forward): point CURRENT at a kept version."""
        self.require(name)  # before locking: the lock would create the model's directory
        with self._locked(name):
            old = self.require(name)
            if version not in self.versions(name):
                kept = self.versions(name)
                raise UnknownVersion(f"{name} has no version {version}; kept versions are {kept}")
            pointer = dataclasses.replace(
                old,
                version=version,
                previous=old.version,
                generation=old.generation + 1,
                loaded=True,
                digest=directory_digest(self.version_dir(name, version)),
                changed_at=time.time(),
            )
            self._write_pointer(pointer)
        log.info("%s now points at version %d (was %d)", name, version, old.version)
        return pointer

    def set_loaded(self, name: str, loaded: bool) -> Pointer:
        """Mark a model served (load) or not (unload) by every worker sharing the store."""
        self.require(name)
        with self._locked(name):
            old = self.require(name)
            if old.loaded == loaded:
                return old
            pointer = dataclasses.replace(old, loaded=loaded, generation=old.generation + 1, changed_at=time.time())
            self._write_pointer(pointer)
        return pointer

    def seed(self, name: str, model_dir: str) -> Pointer:
        """Publish ``model_dir`` unless it is what was seeded last time.

        A server started with an unchanged ``--model-path`` keeps serving the store's current
        version (perhaps pushed since); a changed one is published as a new version.
        """
        if not os.path.isfile(os.path.join(model_dir, "policy.py")):
            raise ModelError(f"{model_dir} is not a model directory (no policy.py)")
        digest = directory_digest(model_dir)
        pointer = self.pointer(check_name(name))
        if pointer is not None and pointer.seed_digest == digest:
            return pointer
        with self._locked(name):  # another worker or instance may be seeding the same thing
            pointer = self.pointer(name)
            if pointer is not None and pointer.seed_digest == digest:
                return pointer
            staged = self.stage(name, model_dir)
            try:
                _fsync_tree(staged)
                return self._commit(name, staged, digest)
            except BaseException:
                self.discard(staged)
                raise

    # -- internals ------------------------------------------------------------------------

    def _path(self, name: str, *parts: str) -> str:
        return os.path.join(self.root, name, *parts)

    @contextlib.contextmanager
    def _locked(self, name: str) -> Iterator[None]:
        os.makedirs(self._path(name), exist_ok=True)
        fd = os.open(self._path(name, LOCK), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _write_pointer(self, pointer: Pointer) -> None:
        directory = self._path(pointer.model)
        fd, tmp = tempfile.mkstemp(prefix=".CURRENT-", dir=directory)
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(pointer.to_json(), fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self._path(pointer.model, POINTER))
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        _fsync_dir(directory)

    def _prune(self, name: str, current: int) -> None:
        versions = self.versions(name)
        for version in versions[: -self.keep]:
            if version != current:
                shutil.rmtree(self.version_dir(name, version), ignore_errors=True)

    @staticmethod
    def _clean_stale(staging: str) -> None:
        """Candidates left by a process that died mid-update."""
        cutoff = time.time() - STALE_STAGING_S
        for entry in os.scandir(staging):
            with contextlib.suppress(OSError):
                if entry.stat().st_mtime < cutoff:
                    shutil.rmtree(entry.path, ignore_errors=True)
