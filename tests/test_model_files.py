"""Confined, link-safe, bounded reading of model directories (policy_server/model/files.py)."""

from __future__ import annotations

import errno
import os
import socket
import tempfile
from pathlib import Path

import pytest

from policy_server.errors import Forbidden, InvalidModel, PayloadTooLarge, StoreWriteFailed
from policy_server.model.files import Limits, copy_tree, digest
from policy_server.model.files import digest as directory_digest
from tests.support.tiny_model import write_tiny_model


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "root"
    write_tiny_model(root / "m", tag=1.0)
    return root


def copied(source, root, tmp_path, **kwargs):
    tmp_path.mkdir(parents=True, exist_ok=True)
    dest = tempfile.mkdtemp(dir=tmp_path, prefix="dest-")
    copy_tree(str(source), str(dest), str(root), **kwargs)
    return Path(dest)


def test_a_plain_directory_is_copied_byte_for_byte(root, tmp_path):
    (root / "m" / "sub").mkdir()
    (root / "m" / "sub" / "extra.txt").write_text("hello")
    (root / "m" / "__pycache__").mkdir()
    (root / "m" / "__pycache__" / "x.pyc").write_bytes(b"junk")
    dest = copied(root / "m", root, tmp_path)
    assert sorted(os.listdir(dest)) == ["model.safetensors", "policy.py", "sub"]
    assert (dest / "sub" / "extra.txt").read_text() == "hello"
    assert (dest / "policy.py").read_bytes() == (root / "m" / "policy.py").read_bytes()
    assert digest(str(dest)) == digest(str(root / "m"), str(root)) == directory_digest(str(root / "m"))


def test_the_digest_matches_the_former_os_walk_digest(root):
    """Stores seeded before this change keep their seed digest (no spurious new version)."""
    import hashlib

    (root / "m" / "a").mkdir()
    (root / "m" / "a" / "z.txt").write_text("z")
    (root / "m" / "b.txt").write_text("b")
    old = hashlib.sha256()
    for here, dirs, files in os.walk(root / "m"):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            path = os.path.join(here, name)
            old.update(os.path.relpath(path, root / "m").encode() + b"\0")
            old.update(open(path, "rb").read())
    assert directory_digest(str(root / "m")) == old.hexdigest()[:12]


def test_a_link_inside_the_root_becomes_a_plain_copy(root, tmp_path):
    write_tiny_model(root / "other", tag=2.0)
    (root / "m" / "weights.safetensors").symlink_to(root / "other" / "model.safetensors")
    (root / "m" / "shared").symlink_to("../other")
    dest = copied(root / "m", root, tmp_path)
    assert not (dest / "weights.safetensors").is_symlink() and not (dest / "shared").is_symlink()
    assert (dest / "weights.safetensors").read_bytes() == (root / "other" / "model.safetensors").read_bytes()
    assert (dest / "shared" / "policy.py").is_file()


@pytest.mark.parametrize("where", ["policy.py", "sub/deep.py"])
def test_a_link_out_of_the_root_is_refused_naming_the_file(root, tmp_path, where):
    outside = tmp_path / "outside.py"
    outside.write_text("raise SystemExit")
    target = root / "m" / where
    target.parent.mkdir(exist_ok=True)
    if target.exists():
        target.unlink()
    target.symlink_to(outside)
    with pytest.raises(Forbidden, match=f"'{where}' is a link that leads outside the model root"):
        copied(root / "m", root, tmp_path)
    with pytest.raises(Forbidden, match="outside"):
        digest(str(root / "m"), str(root))


def test_a_relative_link_climbing_out_and_a_dangling_link(root, tmp_path):
    (tmp_path / "secret").write_text("s")
    (root / "m" / "up").symlink_to("../../secret")
    with pytest.raises(Forbidden, match="'up'"):
        copied(root / "m", root, tmp_path)
    (root / "m" / "up").unlink()
    (root / "m" / "dangling").symlink_to("nowhere")
    with pytest.raises(InvalidModel, match="cannot read 'dangling'"):
        copied(root / "m", root, tmp_path)


def test_a_link_loop_is_refused(root, tmp_path):
    (root / "m" / "loop").symlink_to(".")
    with pytest.raises(Forbidden, match="'loop' links back"):
        copied(root / "m", root, tmp_path)


def test_special_files_are_refused(root, tmp_path):
    os.mkfifo(root / "m" / "pipe")
    with pytest.raises(InvalidModel, match="'pipe' is a FIFO"):
        copied(root / "m", root, tmp_path)  # and never hangs opening it
    os.unlink(root / "m" / "pipe")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(root / "m" / "sock"))
        with pytest.raises(InvalidModel, match="'sock' is a socket"):
            copied(root / "m", root, tmp_path)


def test_a_link_to_a_special_file_is_refused(root, tmp_path):
    (root / "m" / "null").symlink_to("/dev/null")
    with pytest.raises(Forbidden, match="'null'"):  # outside the root, so refused first
        copied(root / "m", root, tmp_path)


def test_limits_on_files_and_bytes(root, tmp_path):
    (root / "m" / "x.txt").write_text("x" * 100)
    with pytest.raises(PayloadTooLarge, match="more than 2 files"):
        copied(root / "m", root, tmp_path, limits=Limits(max_files=2, max_bytes=1 << 30))
    total = sum(p.stat().st_size for p in (root / "m").iterdir())
    with pytest.raises(PayloadTooLarge, match=f"more than {total - 1} bytes"):
        copied(root / "m", root, tmp_path / "b", limits=Limits(max_files=10, max_bytes=total - 1))


def test_the_source_must_lie_inside_the_root(root, tmp_path):
    write_tiny_model(tmp_path / "elsewhere", tag=3.0)
    with pytest.raises(Forbidden):
        copied(tmp_path / "elsewhere", root, tmp_path)


def test_a_write_failure_names_the_reason(root, tmp_path):
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "policy.py").write_text("already here")  # O_EXCL: the copy never writes through
    with pytest.raises(StoreWriteFailed, match="EEXIST"):
        copy_tree(str(root / "m"), str(dest), str(root))


def test_opening_beneath_the_root_follows_no_link_on_the_way(root, tmp_path):
    """What stops a swap between check and read: a component that is (or became) a link fails."""
    from policy_server.model.files import _open_beneath

    (root / "hop").symlink_to(root / "m")
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd = _open_beneath(root_fd, "m/policy.py", os.O_RDONLY | os.O_NOFOLLOW)
        assert os.read(fd, 6) == (root / "m" / "policy.py").read_bytes()[:6]
        os.close(fd)
        for path in ("hop/policy.py", "hop"):
            with pytest.raises(OSError) as refused:
                _open_beneath(root_fd, path, os.O_RDONLY | os.O_NOFOLLOW)
            assert refused.value.errno in (errno.ELOOP, errno.ENOTDIR)
    finally:
        os.close(root_fd)


def test_a_file_swapped_for_an_outside_link_between_check_and_open_is_refused(root, tmp_path, monkeypatch):
    """lstat says "regular file", then the file becomes a link out: the O_NOFOLLOW open fails
    and the copy is refused, never reading the outside file."""
    from policy_server.model import files as model_files

    (tmp_path / "secret").write_text("outside")
    real_stat = os.stat
    swapped = []

    def stat_then_swap(path, *args, **kwargs):
        result = real_stat(path, *args, **kwargs)
        if path == "policy.py" and not swapped:
            swapped.append(True)
            (root / "m" / "policy.py").unlink()
            (root / "m" / "policy.py").symlink_to(tmp_path / "secret")
        return result

    monkeypatch.setattr(model_files.os, "stat", stat_then_swap)
    with pytest.raises(Forbidden, match="'policy.py' changed into a link while being read"):
        copied(root / "m", root, tmp_path / "out")
    assert swapped


def _link_chain(base: Path, levels: int) -> None:
    """Each directory links twice to the next: 2**levels paths if every link were followed."""
    (base / "n0").mkdir(parents=True)
    for i in range(levels):
        (base / f"n{i + 1}").mkdir()
        (base / f"n{i}" / "a").symlink_to(f"../n{i + 1}")
        (base / f"n{i}" / "b").symlink_to(f"../n{i + 1}")


def test_a_chain_of_double_directory_links_is_refused_at_once(root, tmp_path):
    """40 levels would take days if each link were walked; each real directory is entered once."""
    _link_chain(root / "m" / "d", 40)
    with pytest.raises(InvalidModel, match="'d/n0/a' leads to a directory already staged as 'd/n1'"):
        copied(root / "m", root, tmp_path)
    with pytest.raises(InvalidModel, match="already staged"):
        digest(str(root / "m"), str(root))


def test_a_double_link_chain_reached_only_through_links_is_refused(root, tmp_path):
    _link_chain(root / "chain", 40)  # beside the model directory, inside the root
    (root / "m" / "entry").symlink_to("../chain/n0")
    with pytest.raises(InvalidModel, match="'entry/b' leads to a directory already staged as 'entry/a'"):
        copied(root / "m", root, tmp_path)


def test_every_entry_counts_against_the_walk_limit(root, tmp_path):
    for i in range(30):
        (root / "m" / f"empty{i:02d}").mkdir()
        (root / "m" / f"empty{i:02d}" / "link").symlink_to("../policy.py")  # a link per directory
    with pytest.raises(PayloadTooLarge, match="more than 20 entries"):
        copied(root / "m", root, tmp_path, limits=Limits(max_files=1000, max_bytes=1 << 30, max_entries=20))
    assert Limits(max_files=7, max_bytes=1).entries == 70


def test_a_very_deep_directory_is_refused_with_a_reason(root, tmp_path):
    from policy_server.model.files import MAX_DEPTH

    deep = root / "m"
    for _ in range(MAX_DEPTH):
        deep = deep / "d"
    deep.mkdir(parents=True)
    copied(root / "m", root, tmp_path / "ok")  # exactly MAX_DEPTH levels are fine
    (deep / "d").mkdir()  # one more (1,100 more was a RecursionError, a generic 500)
    with pytest.raises(InvalidModel, match=f"more than {MAX_DEPTH} levels deep"):
        copied(root / "m", root, tmp_path / "deep")


def test_a_file_name_that_is_not_utf8_is_refused_before_copying(root, tmp_path):
    with open(os.path.join(os.fsencode(root / "m"), b"bad\xff.txt"), "wb") as fh:
        fh.write(b"x")
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(InvalidModel, match=r"'bad\\udcff.txt' is not a UTF-8 file name"):
        copy_tree(str(root / "m"), str(dest), str(root))
    assert os.listdir(dest) == []  # refused while listing, before any file was written


def test_a_source_whose_link_vanishes_while_resolving_is_refused(root, tmp_path, monkeypatch):
    from policy_server.model import files as model_files

    def vanished(path, *args, **kwargs):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory")

    monkeypatch.setattr(model_files.os.path, "realpath", vanished)
    with pytest.raises(InvalidModel, match="cannot resolve 'm': No such file or directory"):
        copied(root / "m", root, tmp_path)


def test_a_long_chain_of_file_links_is_refused(root, tmp_path):
    """1,200 links each to the next: realpath recursed once per hop (RecursionError, a 500)."""
    (root / "m" / "l1200").write_text("end")
    for i in range(1200):
        (root / "m" / f"l{i:04d}").symlink_to(f"l{i + 1:04d}" if i < 1199 else "l1200")
    with pytest.raises(InvalidModel, match="'l0000' is a chain of links that is too long or loops"):
        copied(root / "m", root, tmp_path)
