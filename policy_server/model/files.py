"""Reading model directories safely: confined to a root, links checked, no special files, bounded.

A model directory named by an update (or given at start) is read through directory file
descriptors: every entry is opened with ``O_NOFOLLOW`` relative to its parent's descriptor,
and what an opened descriptor *is* comes from ``fstat`` on that descriptor, so nothing can
be swapped between the check and the read. A symbolic link is resolved to its target's path;
a target outside the confinement root is refused (403, naming the file), one inside is
opened component by component from the root's descriptor, again never following a link.
FIFOs, devices and sockets are refused. The walk is bounded whatever the links do: each
real directory is entered once (a second path to it is refused, so a chain of directories
linking twice to the next cannot multiply the work), at most ``Limits.entries`` names
are looked at in all, and at most :data:`MAX_DEPTH` levels deep. File names must be UTF-8.
:func:`copy_tree` writes the contents into a fresh
directory (no links are copied), so the copy, not the source, is what is validated and
served. Writing the model store goes through :func:`writing` (an OSError becomes its 507 or
500 answer) and :func:`fsync_tree` / :func:`fsync_dir` (durable before visible). No torch here.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

from policy_server.errors import Forbidden, InvalidModel, PayloadTooLarge, store_write_error

log = logging.getLogger(__name__)

IGNORED = frozenset({"__pycache__"})
_CHUNK = 1 << 20
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = (
    os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
)  # NONBLOCK: a FIFO never hangs the open
MAX_DEPTH = 64  # directory levels below the model directory (422 deeper)
_KINDS = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


@dataclass(frozen=True)
class Limits:
    """Bounds on one model directory: regular files, their total bytes, and every name looked
    at (files, directories, links: what bounds the walk's work)."""

    max_files: int = 10_000
    max_bytes: int = 16 << 30  # as --stage-max-bytes
    max_entries: int | None = None  # None: 10 x max_files

    @property
    def entries(self) -> int:
        return self.max_entries if self.max_entries is not None else 10 * self.max_files


def _kind(mode: int) -> str:
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file or directory")


def _refuse_special(mode: int, shown: str) -> None:
    """Never even open a FIFO, device or socket (opening some devices has effects)."""
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode)):
        raise InvalidModel(f"{shown!r} is {_kind(mode)}; a model directory holds only files")


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _open_beneath(root_fd: int, rel: str, flags: int) -> int:
    """Open ``rel`` (a normalised relative path) beneath ``root_fd``, following no link on the way."""
    fd = os.dup(root_fd)
    try:
        parts = [p for p in rel.split(os.sep) if p not in ("", ".")]
        if not parts:
            return os.dup(fd)
        for part in parts[:-1]:
            child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = child
        _refuse_special(os.stat(parts[-1], dir_fd=fd, follow_symlinks=False).st_mode, parts[-1])
        return os.open(parts[-1], flags, dir_fd=fd)
    finally:
        os.close(fd)


class _Walk:
    """One confined, bounded walk of ``source`` (which must lie inside ``root``)."""

    def __init__(self, source: str, root: str, limits: Limits | None, skip: tuple[str, ...]) -> None:
        try:
            self.root = os.path.realpath(root)
            self.source = os.path.realpath(source)
        except OSError as exc:  # a link swapped while being resolved
            raise InvalidModel(f"cannot resolve {os.path.basename(source)!r}: {exc.strerror}") from None
        self.limits = limits
        self.skip = frozenset(skip)
        self.files = 0
        self.bytes = 0
        self.entries_seen = 0
        self.dirs_seen: dict[tuple[int, int], str] = {}  # each real directory once: (st_dev, st_ino) -> shown
        if not _inside(self.source, self.root):
            raise Forbidden(f"{source!r} is outside its root")

    def _refuse_os(self, exc: OSError, shown: str):
        if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EXDEV):
            return Forbidden(f"{shown!r} changed into a link while being read; refused")
        return InvalidModel(f"cannot read {shown!r}: {exc.strerror}")

    def entries(self) -> Iterator[tuple[str, int, os.stat_result]]:
        """``(relative path, fd, fstat)`` of every regular file, in :func:`digest`'s order (a
        directory's files sorted by name, then its subdirectories). Each fd is closed after the
        next step; read it at once."""
        root_fd = os.open(self.root, _DIR_FLAGS & ~os.O_NOFOLLOW)
        try:
            try:
                top = _open_beneath(root_fd, os.path.relpath(self.source, self.root), _DIR_FLAGS)
            except OSError as exc:
                raise self._refuse_os(exc, os.path.basename(self.source)) from None
            yield from self._directory(root_fd, top, "", self.source, ())
        finally:
            os.close(root_fd)

    def _directory(self, root_fd: int, dir_fd: int, rel: str, real: str, ancestors: tuple) -> Iterator:
        try:
            here = os.fstat(dir_fd)
            ancestors = (*ancestors, (here.st_dev, here.st_ino))
            self.dirs_seen.setdefault((here.st_dev, here.st_ino), rel or ".")
            files, dirs = [], []
            names = sorted(os.listdir(dir_fd))
            self._count_entries(len(names))
            for name in names:
                if name in IGNORED or (not rel and name in self.skip):
                    continue
                shown = os.path.join(rel, name)
                try:
                    name.encode("utf-8")
                except UnicodeEncodeError:
                    raise InvalidModel(f"{shown!r} is not a UTF-8 file name; rename it") from None
                fd, target = self._open_entry(root_fd, dir_fd, name, shown, real)
                st = os.fstat(fd)
                if stat.S_ISDIR(st.st_mode):
                    os.close(fd)
                    key = (st.st_dev, st.st_ino)
                    if key in ancestors:
                        raise Forbidden(f"{shown!r} links back to a directory above it")
                    if key in self.dirs_seen:
                        raise InvalidModel(
                            f"{shown!r} leads to a directory already staged as {self.dirs_seen[key]!r}; "
                            "each directory may be reached once"
                        )
                    if shown.count(os.sep) + 1 > MAX_DEPTH:
                        raise InvalidModel(
                            f"the model directory is more than {MAX_DEPTH} levels deep (at {shown[:160]!r})"
                        )
                    self.dirs_seen[key] = shown
                    dirs.append((name, target))
                elif stat.S_ISREG(st.st_mode):
                    os.close(fd)
                    files.append((name, target))
                else:
                    os.close(fd)
                    raise InvalidModel(f"{shown!r} is {_kind(st.st_mode)}; a model directory holds only files")
            for name, _target in files:
                shown = os.path.join(rel, name)
                fd, _ = self._open_entry(root_fd, dir_fd, name, shown, real)
                try:
                    st = os.fstat(fd)
                    if not stat.S_ISREG(st.st_mode):
                        raise InvalidModel(f"{shown!r} is {_kind(st.st_mode)}; a model directory holds only files")
                    self._count(st.st_size)
                    os.set_blocking(fd, True)
                    yield shown, fd, st
                finally:
                    os.close(fd)
            for name, target in dirs:
                shown = os.path.join(rel, name)
                fd, _ = self._open_entry(root_fd, dir_fd, name, shown, real, directory=True)
                yield from self._directory(root_fd, fd, shown, target, ancestors)
        finally:
            os.close(dir_fd)

    def _open_entry(
        self, root_fd: int, dir_fd: int, name: str, shown: str, real: str, directory: bool = False
    ) -> tuple[int, str]:
        """An fd for one entry (a link's target, when it stays inside the root) and its real path."""
        flags = _DIR_FLAGS if directory else _FILE_FLAGS
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            _refuse_special(st.st_mode, shown)
            if not stat.S_ISLNK(st.st_mode):
                return os.open(name, flags, dir_fd=dir_fd), os.path.join(real, name)
            try:  # the kernel bounds a chain of links (40 hops); realpath alone does not
                os.stat(name, dir_fd=dir_fd)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise InvalidModel(f"{shown!r} is a chain of links that is too long or loops") from None
            target = os.path.realpath(os.path.join(real, name))
            if not _inside(target, self.root):
                raise Forbidden(f"{shown!r} is a link that leads outside the model root")
            return _open_beneath(root_fd, os.path.relpath(target, self.root), flags), target
        except OSError as exc:
            raise self._refuse_os(exc, shown) from None

    def _count_entries(self, count: int) -> None:
        self.entries_seen += count
        limit = (self.limits or Limits()).entries
        if self.entries_seen > limit:
            raise PayloadTooLarge(f"the model directory has more than {limit} entries (files, directories, links)")

    def _count(self, size: int) -> None:
        self.files += 1
        self.bytes += size
        if self.limits is None:
            return
        if self.files > self.limits.max_files:
            raise PayloadTooLarge(
                f"the model directory has more than {self.limits.max_files} files (--stage-max-files)"
            )
        if self.bytes > self.limits.max_bytes:
            raise PayloadTooLarge(
                f"the model directory holds more than {self.limits.max_bytes} bytes (--stage-max-bytes)"
            )


def _chunks(fd: int, shown: str) -> Iterator[bytes]:
    while True:
        try:
            chunk = os.read(fd, _CHUNK)
        except OSError as exc:
            raise InvalidModel(f"cannot read {shown!r}: {exc.strerror}") from None
        if not chunk:
            return
        yield chunk


def digest(
    source: str, root: str | None = None, *, suffix: str = "", limits: Limits | None = None, skip: tuple[str, ...] = ()
) -> str:
    """A short sha256 over every regular file's relative path and content, in sorted order
    (only files ending in ``suffix`` when given), read confined to ``root`` (default: ``source``).

    Raises Forbidden (a link out of ``root``), InvalidModel (a special file, an unreadable
    file), PayloadTooLarge (over ``limits``).
    """
    hasher = hashlib.sha256()
    for shown, fd, _st in _Walk(source, root or source, limits, skip).entries():
        if not shown.endswith(suffix):
            continue
        hasher.update(shown.encode() + b"\0")
        for chunk in _chunks(fd, shown):
            hasher.update(chunk)
    return hasher.hexdigest()[:12]


def write_new_file(path: str, data: bytes, doing: str, mode: int = 0o644) -> None:
    """Create ``path`` (never through a link, never over a file) holding ``data``.

    Raises InsufficientStorage (507) or StoreWriteFailed (500) naming the reason (no path)
    when it cannot be written; a partial file is left for the caller to discard.
    """
    try:
        out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as exc:
        raise store_write_error(exc, doing) from None
    try:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(out, view) :]
            except OSError as exc:
                raise store_write_error(exc, doing) from None
    finally:
        os.close(out)


def copy_tree(
    source: str, dest: str, root: str | None = None, *, limits: Limits | None = None, skip: tuple[str, ...] = ()
) -> None:
    """Copy the regular files under ``source`` into the existing empty directory ``dest``,
    confined to ``root`` (default: ``source``); links become plain copies of their targets,
    ``__pycache__`` and the top-level names in ``skip`` are left out.

    Raises what :func:`digest` raises for the source, and InsufficientStorage (507) or
    StoreWriteFailed (500) when writing the copy fails.
    """
    walk = _Walk(source, root or source, limits, skip)
    for shown, fd, st in walk.entries():
        target = os.path.join(dest, shown)
        try:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            out = os.open(
                target,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o755 if st.st_mode & 0o100 else 0o644,
            )
        except OSError as exc:
            raise store_write_error(exc, "staging the model directory") from None
        try:
            written = 0
            for chunk in _chunks(fd, shown):
                written += len(chunk)
                if walk.limits is not None and walk.bytes - st.st_size + written > walk.limits.max_bytes:
                    raise PayloadTooLarge(
                        f"the model directory holds more than {walk.limits.max_bytes} bytes (--stage-max-bytes)"
                    )
                view = memoryview(chunk)
                while view:
                    try:
                        view = view[os.write(out, view) :]
                    except OSError as exc:
                        raise store_write_error(exc, "staging the model directory") from None
        finally:
            os.close(out)


@contextlib.contextmanager
def writing(doing: str) -> Iterator[None]:
    """Turn an OSError while writing the store into its answer: InsufficientStorage (507) or
    StoreWriteFailed (500), naming the reason (see :func:`policy_server.errors.store_write_error`)."""
    try:
        yield
    except OSError as exc:
        log.error("model store: %s failed: %s", doing, exc)
        raise store_write_error(exc, doing) from None


def fsync_tree(path: str) -> None:
    """fsync every file and directory below ``path``, and ``path`` itself (OSError on failure)."""
    for root, dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        for name in dirs:
            fsync_dir(os.path.join(root, name))
    fsync_dir(path)


def fsync_dir(path: str) -> None:
    """fsync one directory: its entries (a rename, a new file) are on disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(path: str, data: bytes, temp_prefix: str) -> None:
    """Replace ``path`` with ``data`` atomically: a reader sees the old file or the new one.

    Written to a temp file (``temp_prefix``, beside ``path``) and fsynced, then renamed over
    ``path``; OSError when that fails (the temp file is removed). Past the rename the new file
    is live: a failed fsync of the directory is only logged.
    """
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix, dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    try:  # the new file is live: failing now would disown it (the store's pointer: a served version)
        fsync_dir(directory)
    except OSError as exc:
        log.warning("%s is live but its directory entry may not be on disk: %s", path, exc)
