"""The model store: numbered, immutable versions per model name and an atomic pointer to the current one.

Layout (one directory, shared by every worker and every server instance that mounts it)::

    <root>/<name>/versions/000001/     a model directory (policy.py, model.safetensors, ...)
    <root>/<name>/versions/000002/
    <root>/<name>/CURRENT              JSON pointer: version, previous, canary, retained, generation, ...
    <root>/<name>/PINNED               when workers last served a request pinned to the retained version
    <root>/<name>/.staging/            candidates being written and validated
    <root>/<name>/.lock                serialises publishers (flock)

A version directory is never changed once published: its number names exactly one set of
weights. The pointer is replaced atomically (temp file, fsync, ``os.replace``), so a reader
sees the old pointer or the new one, never a torn one. Every pointer change bumps
``generation``; workers poll the pointer and react to a changed one. No torch here.

A version is visible (listed, served, a rollback target) only once its files and the pointer
that lists it in ``kept`` are durably written: a ``versions/`` directory the pointer does not
list is a leftover of a publish that failed or crashed, removed under the lock before the
next publish and by :meth:`ModelStore.recover` at start. Every I/O failure while writing is
answered as InsufficientStorage (507) or StoreWriteFailed (500), with what was written
removed and the pointer unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping

from policy_server.contract import MODEL_NAME_PATTERN, check_model_name, require_model_dir
from policy_server.errors import (
    BadRequest,
    Conflict,
    InvalidModel,
    ModelError,
    ServingError,
    UnknownModel,
    UnknownVersion,
)
from policy_server.model import files as model_files
from policy_server.model import weights_check
from policy_server.store import marks as store_marks
from policy_server.store import pointer as store_pointer
from policy_server.store.leftovers import HOST as _HOST
from policy_server.store.leftovers import clean_stale, remove_temps
from policy_server.store.pointer import Pointer

log = logging.getLogger(__name__)

POINTER = "CURRENT"
VERSIONS = "versions"
STAGING = ".staging"
LOCK = ".lock"


class ModelStore:
    """Numbered versions and a current pointer per model, under ``root``; keeps the last ``keep``
    and always the current and previous version (see :meth:`_to_keep`).

    ``model_root`` confines the seed directory when it lies inside it (see :meth:`seed`);
    ``limits`` bound every directory staged.
    """

    def __init__(self, root: str, keep: int = 5, *, model_root: str | None = None,
                 limits: model_files.Limits | None = None) -> None:
        if keep < 1:
            raise ValueError("keep must be at least 1")
        self.root = os.path.abspath(root)
        self.keep = keep
        self.model_root = os.path.realpath(model_root) if model_root else None
        self.limits = limits or model_files.Limits()  # ``root`` is created by the first write

    # -- reading (cheap: workers poll these) ---------------------------------------------

    def names(self) -> list[str]:
        """Models that have a pointer, sorted."""
        try:
            entries = os.listdir(self.root)
        except FileNotFoundError:
            return []
        return sorted(n for n in entries if MODEL_NAME_PATTERN.fullmatch(n) and os.path.isfile(self._path(n, POINTER)))

    def read_pointer_bytes(self, name: str) -> bytes | None:
        """The raw pointer, or None. Opening the file (not a cached stat) is what NFS makes consistent."""
        try:
            with open(self._path(name, POINTER), "rb") as fh:
                return fh.read()
        except FileNotFoundError:
            return None

    def pointer(self, name: str) -> Pointer | None:
        raw = self.read_pointer_bytes(check_model_name(name))
        return None if raw is None else Pointer.from_json(json.loads(raw))

    def require(self, name: str) -> Pointer:
        pointer = self.pointer(name)
        if pointer is None:
            raise UnknownModel(f"no model named {name!r} in the store")
        return pointer

    def versions(self, name: str) -> list[int]:
        """The visible versions: listed by the pointer and present (nothing before the first publish)."""
        return self._visible(self.pointer(name), self._on_disk(name))

    def version_dir(self, name: str, version: int) -> str:
        return self._path(name, VERSIONS, f"{version:06d}")

    # -- writing --------------------------------------------------------------------------

    def stage(self, name: str, source_dir: str | None = None, *, root: str | None = None,
              skip: tuple[str, ...] = (), files: Mapping[str, bytes] | None = None) -> str:
        """A fresh private directory for a candidate version: a copy of ``source_dir`` (if given)
        confined to ``root`` (default: ``source_dir``; :func:`model_files.copy_tree`), less
        ``skip``, plus ``files`` (relative name -> bytes). Every version enters the store here,
        so here its weights are checked (:func:`weights_check.check_directory`), before
        anything runs its code. Publish the result or :meth:`discard` it. Raises Forbidden,
        InvalidModel, PayloadTooLarge for the source, InvalidModel ("validation failed, nothing
        published: ...") for its weights, InsufficientStorage or StoreWriteFailed for a write."""
        staging = self._path(check_model_name(name), STAGING)
        with model_files.writing("creating the staging directory"):
            os.makedirs(staging, exist_ok=True)
            clean_stale(staging)
            path = tempfile.mkdtemp(prefix=f"candidate-{os.getpid()}@{_HOST}-", dir=staging)
        try:
            if source_dir is not None:
                model_files.copy_tree(source_dir, path, root or source_dir, limits=self.limits, skip=skip)
            for relative, data in (files or {}).items():
                model_files.write_new_file(os.path.join(path, relative), data, f"writing {relative}")
            try:
                weights_check.check_directory(path)
            except InvalidModel as exc:
                raise InvalidModel(f"validation failed, nothing published: {exc.detail}") from None
        except BaseException:
            self.discard(path)
            raise
        return path

    @staticmethod
    def discard(staged_dir: str) -> None:
        shutil.rmtree(staged_dir, ignore_errors=True)

    def publish(self, name: str, staged_dir: str, *, seed_digest: str | None = None,
                canary: float | None = None) -> Pointer:
        """Make ``staged_dir`` the next numbered version and point CURRENT at it (loaded), or
        with ``canary`` F (0 < F < 1) make it the canary candidate for that fraction of new
        episodes (the stable version stays).

        On any failure ``staged_dir`` is removed, nothing becomes visible and the pointer is
        unchanged (InsufficientStorage or StoreWriteFailed for an I/O failure; Conflict for a
        plain publish while a canary runs, or a canary of a model with no stable version).
        """
        try:
            with model_files.writing("syncing the staged version to disk"):
                model_files.fsync_tree(staged_dir)
            with self._locked(check_model_name(name)):
                return self._commit(name, staged_dir, seed_digest, canary)
        finally:
            self.discard(staged_dir)  # already renamed away when published

    def _commit(self, name: str, staged_dir: str, seed_digest: str | None, canary: float | None = None) -> Pointer:
        digest = model_files.digest(staged_dir)
        old = self.pointer(name)
        if canary is None and old is not None and old.canary is not None:
            raise store_pointer.running_canary_conflict(old)
        if canary is not None and old is None:
            raise BadRequest(f"model {name!r} has no stable version yet: publish one before a canary")
        visible = self._visible(old, self._on_disk(name))
        self._remove_leftovers(name, old, visible)
        version = max(self._on_disk(name) + visible + [old.version if old else 0]) + 1
        target = self.version_dir(name, version)
        with model_files.writing("writing the new version"):
            os.makedirs(self._path(name, VERSIONS), exist_ok=True)
            os.rename(staged_dir, target)
        try:
            with model_files.writing("writing the new version"):
                model_files.fsync_dir(os.path.dirname(target))
            now = time.time()
            if old is None:
                pointer = Pointer(model=name, version=version, previous=None, generation=1, loaded=True,
                                  digest=digest, changed_at=now, seed_digest=seed_digest)
            elif canary is not None:
                pointer = store_pointer.with_candidate(old, version, canary, digest, now, ())
            else:
                pointer = store_pointer.with_new_stable(old, version, digest, now, ())
                if seed_digest is not None:
                    pointer = dataclasses.replace(pointer, seed_digest=seed_digest)
            kept = self._to_keep(visible, pointer)
            pointer = dataclasses.replace(pointer, kept=tuple(kept))
            with model_files.writing("writing the pointer"):
                self._write_pointer(pointer)
        except BaseException:
            shutil.rmtree(target, ignore_errors=True)  # never visible: the pointer does not list it
            raise
        for dropped in sorted(set(visible) - set(kept)):
            shutil.rmtree(self.version_dir(name, dropped), ignore_errors=True)
        log.info("published %s version %d (%s)", name, version,
                 f"canary at {canary:g}" if canary is not None else f"previous {pointer.previous}")
        return pointer

    def _to_keep(self, visible: list[int], pointer: Pointer) -> list[int]:
        """The newest ``keep`` versions, but always every version ``pointer`` serves (stable,
        candidate, retained) and its previous (the rollback target the answer names, and what
        lagging workers may still load): ``keep=1`` keeps those."""
        previous = {pointer.previous} if pointer.previous in visible else set()
        must = set(pointer.served_versions()) | previous
        room = max(0, self.keep - len(must))
        others = sorted(set(visible) - must)[-room:] if room else []
        return sorted(must | set(others))

    def set_current(self, name: str, version: int) -> Pointer:
        """Rollback (or forward), or the promotion of a running canary's candidate: point
        CURRENT at a kept version. UnknownVersion for one not kept; Conflict for another
        version than the candidate while a canary runs."""
        self.require(name)  # before locking: the lock would create the model's directory
        with self._locked(name):
            old = self.require(name)
            kept = self.versions(name)
            if version not in kept:
                raise UnknownVersion(f"{name} has no version {version}; kept versions are {kept}")
            digest = model_files.digest(self.version_dir(name, version))
            pointer = store_pointer.with_new_stable(old, version, digest, time.time(), tuple(kept))
            with model_files.writing("writing the pointer"):
                self._write_pointer(pointer)
        log.info("%s now points at version %d (was %d)", name, version, old.version)
        return pointer

    def set_canary(self, name: str, fraction: float, version: int | None = None) -> Pointer:
        """Start a canary of kept ``version`` for ``fraction`` of new episodes, change a running
        canary's fraction (``version`` None or its candidate), or end it (``fraction`` 0: the
        candidate becomes the retained version). UnknownVersion for a version not kept;
        Conflict for the stable version, an unloaded model, or no canary to change."""
        self.require(name)
        with self._locked(name):
            old = self.require(name)
            now = time.time()
            if version is None or fraction == 0:
                if version is not None and (old.canary is None or old.canary.version != version):
                    raise Conflict(f"version {version} is not {name!r}'s canary candidate; end a canary with "
                                   "{\"canary\": 0}")
                pointer = store_pointer.with_canary_fraction(old, fraction, now)
                if pointer is None:
                    return old
            else:
                kept = self.versions(name)
                if version not in kept:
                    raise UnknownVersion(f"{name} has no version {version}; kept versions are {kept}")
                digest = model_files.digest(self.version_dir(name, version))
                pointer = store_pointer.with_candidate(old, version, fraction, digest, now, tuple(kept))
            with model_files.writing("writing the pointer"):
                self._write_pointer(pointer)
        log.info("%s canary: %s", name, pointer.canary or f"ended (version {old.canary and old.canary.version})")
        return pointer

    def set_loaded(self, name: str, loaded: bool) -> Pointer:
        """Mark a model served (load) or not (unload) by every worker sharing the store."""
        self.require(name)
        with self._locked(name):
            old = self.require(name)
            if old.loaded == loaded:
                return old
            pointer = dataclasses.replace(old, loaded=loaded, generation=old.generation + 1, changed_at=time.time())
            with model_files.writing("writing the pointer"):
                self._write_pointer(pointer)
        return pointer

    def mark_pinned_use(self, name: str, version: int, at: float) -> None:
        """Record that a worker served a request pinned to ``version`` at ``at`` (wall-clock),
        see :mod:`policy_server.store.marks`; OSError when the store cannot be written."""
        store_marks.mark_pinned_use(self._path(check_model_name(name)), version, at)

    def pinned_use(self, name: str, version: int) -> float | None:
        """When a worker last marked a request pinned to ``version`` (see :meth:`mark_pinned_use`), or None."""
        return store_marks.pinned_use(self._path(check_model_name(name)), version)

    def seed_root(self, model_dir: str) -> str:
        """What the seed directory is confined to: the model root when the seed lies inside it,
        else the seed directory itself (the operator named it at start; no link may leave it)."""
        real = os.path.realpath(model_dir)
        if self.model_root and (real + os.sep).startswith(self.model_root.rstrip(os.sep) + os.sep):
            return self.model_root
        return real

    def seed(self, name: str, model_dir: str) -> Pointer:
        """Publish ``model_dir`` unless it is what was seeded last time.

        A server started with an unchanged ``--model-path`` keeps serving the store's current
        version (perhaps pushed since); a changed one is copied (confined to :meth:`seed_root`),
        its weights checked (every tensor finite) and published as a new version (not while a
        canary runs: then at a later start). Leftovers of
        a publish that crashed are removed first (:meth:`recover`). ModelError when the seed is
        not a model directory, leaves its root, or holds non-finite weights.
        """
        require_model_dir(model_dir)
        self.recover()
        root = self.seed_root(model_dir)
        try:
            digest = model_files.digest(model_dir, root, limits=self.limits)
        except ServingError as exc:
            raise ModelError(f"seed {model_dir}: {exc.detail}") from None
        pointer = self.pointer(check_model_name(name))
        if pointer is not None and pointer.seed_digest == digest:
            return pointer
        with self._locked(name):  # another worker or instance may seed it too
            pointer = self.pointer(name)
            if pointer is not None and (pointer.seed_digest == digest or pointer.canary is not None):
                if pointer.seed_digest != digest:  # published once the canary is promoted or ended
                    log.warning("%s runs a canary: the changed seed %s is not published", name, model_dir)
                return pointer
            try:
                staged = self.stage(name, model_dir, root=root)  # its weights checked
                try:
                    with model_files.writing("syncing the staged version to disk"):
                        model_files.fsync_tree(staged)
                    return self._commit(name, staged, model_files.digest(staged))
                finally:
                    self.discard(staged)
            except ServingError as exc:
                raise ModelError(f"seed {model_dir}: {exc.detail}") from None

    def recover(self) -> list[str]:
        """Remove what a crashed publish left: version directories the pointer does not list,
        and staged candidates of dead processes on this host (or older than an hour). Returns
        the removed paths. Safe while other processes publish: it takes each model's lock."""
        removed: list[str] = []
        try:
            entries = sorted(os.listdir(self.root))
        except OSError:
            return removed
        for name in entries:
            if not MODEL_NAME_PATTERN.fullmatch(name) or not os.path.isdir(self._path(name)):
                continue
            try:
                with self._locked(name):
                    pointer = self.pointer(name)
                    removed += self._remove_leftovers(name, pointer, self._visible(pointer, self._on_disk(name)))
                    # no pointer writer is live under the lock; a mark writer that died left its temp
                    removed += remove_temps(self._path(name), (f".{POINTER}-", f".{store_marks.PINNED}-"))
                staging = self._path(name, STAGING)
                if os.path.isdir(staging):
                    removed += clean_stale(staging)
            except (OSError, ServingError, ValueError, TypeError) as exc:  # a read-only or damaged store still serves
                log.warning("could not clean leftovers of %s: %s", name, exc)
        if removed:
            log.warning("removed %d leftover(s) of interrupted updates: %s", len(removed), removed)
        return removed

    # -- internals ------------------------------------------------------------------------

    def _path(self, name: str, *parts: str) -> str:
        return os.path.join(self.root, name, *parts)

    def _on_disk(self, name: str) -> list[int]:
        try:
            entries = os.listdir(self._path(name, VERSIONS))
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(int(e) for e in entries if e.isdigit())

    @staticmethod
    def _visible(pointer: Pointer | None, on_disk: list[int]) -> list[int]:
        if pointer is None:
            return []
        if pointer.kept is None:  # a store from before ``kept``: every directory counts
            return on_disk
        present = set(on_disk)
        return sorted(v for v in pointer.kept if v in present)

    def _remove_leftovers(self, name: str, pointer: Pointer | None, visible: list[int]) -> list[str]:
        """Version directories nobody can see (call under the lock)."""
        keep = set(visible) | ({pointer.version} if pointer else set())
        removed = []
        for version in self._on_disk(name):
            if version not in keep:
                path = self.version_dir(name, version)
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        return removed

    @contextlib.contextmanager
    def _locked(self, name: str) -> Iterator[None]:
        with model_files.writing("taking the store lock"):
            os.makedirs(self._path(name), exist_ok=True)
            fd = os.open(self._path(name, LOCK), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _write_pointer(self, pointer: Pointer) -> None:
        data = json.dumps(pointer.to_json()).encode()
        model_files.replace_durably(self._path(pointer.model, POINTER), data, temp_prefix=f".{POINTER}-")
