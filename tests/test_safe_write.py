"""edgefit.safe_write: files written whole or not at all, never through a link, and places
checked before any work."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from edgefit import safe_write
from edgefit.safe_write import WriteError, check_directory, check_file, write_atomic


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_write_atomic_writes_with_the_mode_whatever_the_umask(tmp_path):
    old = os.umask(0o077)
    try:
        write_atomic(tmp_path / "a.conf", "hello\n", 0o644)
    finally:
        os.umask(old)
    assert (tmp_path / "a.conf").read_text() == "hello\n"
    assert stat.S_IMODE((tmp_path / "a.conf").stat().st_mode) == 0o644
    write_atomic(tmp_path / "a.conf", b"again", 0o600)
    assert (tmp_path / "a.conf").read_bytes() == b"again"
    assert stat.S_IMODE((tmp_path / "a.conf").stat().st_mode) == 0o600
    assert names(tmp_path) == ["a.conf"]


def test_write_atomic_replaces_a_symbolic_link_instead_of_writing_through_it(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    (tmp_path / "out.conf").symlink_to(victim)
    write_atomic(tmp_path / "out.conf", "new")
    assert victim.read_text() == "untouched"
    assert not (tmp_path / "out.conf").is_symlink() and (tmp_path / "out.conf").read_text() == "new"


def test_write_atomic_never_opens_an_existing_temporary_name(tmp_path, monkeypatch):
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    monkeypatch.setattr(safe_write.secrets, "token_hex", lambda n: "fixed")
    (tmp_path / ".out.conf.fixed.tmp").symlink_to(victim)  # planted where the temporary file goes
    with pytest.raises(FileExistsError):
        write_atomic(tmp_path / "out.conf", "new")
    assert victim.read_text() == "untouched" and not (tmp_path / "out.conf").exists()


def test_a_failed_write_leaves_the_target_and_no_temporary_file(tmp_path, monkeypatch):
    (tmp_path / "out.conf").write_text("old")

    def full_disk(fd, data):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(safe_write.os, "write", full_disk)
    with pytest.raises(OSError):
        write_atomic(tmp_path / "out.conf", "new")
    assert (tmp_path / "out.conf").read_text() == "old"
    assert names(tmp_path) == ["out.conf"]


def test_a_directory_in_the_way_fails_cleanly(tmp_path):
    (tmp_path / "out.conf").mkdir()
    with pytest.raises(OSError):
        write_atomic(tmp_path / "out.conf", "new")
    assert names(tmp_path) == ["out.conf"]


def test_without_replace_an_existing_file_is_never_overwritten(tmp_path):
    (tmp_path / "secrets.env").write_text("mine")
    with pytest.raises(FileExistsError):
        write_atomic(tmp_path / "secrets.env", "other", 0o600, replace=False)
    assert (tmp_path / "secrets.env").read_text() == "mine"
    assert names(tmp_path) == ["secrets.env"]
    write_atomic(tmp_path / "new.env", "fresh", 0o600, replace=False)
    assert (tmp_path / "new.env").read_text() == "fresh"
    assert stat.S_IMODE((tmp_path / "new.env").stat().st_mode) == 0o600


def test_check_directory(tmp_path):
    assert check_directory(tmp_path / "new" / "deeper", "--out") == tmp_path / "new" / "deeper"
    assert check_directory(tmp_path, "--out") == tmp_path
    assert names(tmp_path) == [], "checking writes nothing"
    (tmp_path / "file").write_text("")
    for bad, needle in [(tmp_path / "file", "exists and is not a directory"), (tmp_path / "file" / "x", "is a file"),
                        (Path("/proc/x"), "kernel filesystem"), (Path("/sys/kernel/x"), "kernel filesystem"),
                        (Path("/proc"), "kernel filesystem")]:
        with pytest.raises(WriteError, match=needle) as caught:
            check_directory(bad, "--out")
        assert str(caught.value).startswith("--out ") and "\n" not in str(caught.value)


def test_check_directory_follows_links_into_kernel_filesystems(tmp_path):
    (tmp_path / "link").symlink_to("/proc/self")
    with pytest.raises(WriteError, match="kernel filesystem"):
        check_directory(tmp_path / "link" / "out", "--out")


def test_check_file(tmp_path):
    assert check_file(tmp_path / "report.json", "--json") == tmp_path / "report.json"
    (tmp_path / "file").write_text("")
    for bad, needle in [(tmp_path, "is a directory"), (tmp_path / "missing" / "r.json", "does not exist"),
                        (tmp_path / "file" / "r.json", "is a file"), (Path("/proc/r.json"), "kernel filesystem")]:
        with pytest.raises(WriteError, match=needle):
            check_file(bad, "--json")
    assert names(tmp_path) == ["file"]
