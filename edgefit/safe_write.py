"""Local files written whole or not at all, into places checked before any work starts.

A file is written to a temporary name of its own beside the target, created with
O_EXCL|O_NOFOLLOW (never an existing file, never through a symbolic link), then renamed over the
target; on any failure the temporary file is removed. Problems are WriteError: one sentence.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

# Kernel filesystems: writing a stack or a report there is never what was meant.
KERNEL_TREES = ("/proc", "/sys", "/dev")


class WriteError(ValueError):
    """A place that cannot be written, or a write that failed; the message is one sentence."""


def _reason(error: OSError) -> str:
    return (error.strerror or str(error)).lower()


def _existing_ancestor(path: Path, what: str) -> Path:
    """The deepest part of path that exists; every existing part must be a directory."""
    candidate = path
    while not os.path.lexists(candidate):
        if candidate.parent == candidate:
            break
        candidate = candidate.parent
    if not candidate.is_dir():
        raise WriteError(f"{what} {path} is under {candidate}, which is a file, not a directory")
    return candidate


def _refuse_kernel_trees(path: Path, what: str) -> None:
    real = os.path.realpath(path)
    for tree in KERNEL_TREES:
        if real == tree or real.startswith(tree + "/"):
            raise WriteError(f"{what} {path} is in {tree}, a kernel filesystem; choose a directory of your own")


def _probe(directory: Path, what: str, shown: Path) -> None:
    """Create and remove a file in directory: the only test of writability that root also fails."""
    probe = directory / f".edgefit-probe-{secrets.token_hex(6)}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as error:
        raise WriteError(f"{what} {shown} cannot be written ({_reason(error)} in {directory})") from None
    os.close(fd)
    os.unlink(probe)


def check_directory(path: str | os.PathLike, what: str) -> Path:
    """path is a directory, or can be made as one, and files can be created in it."""
    path = Path(path)
    _refuse_kernel_trees(path, what)
    if os.path.lexists(path) and not path.is_dir():
        raise WriteError(f"{what} {path} exists and is not a directory")
    _probe(_existing_ancestor(path, what), what, path)
    return path


def check_file(path: str | os.PathLike, what: str) -> Path:
    """path can be written as a file: its directory exists and is writable, and it is not a directory."""
    path = Path(path)
    _refuse_kernel_trees(path, what)
    if path.is_dir():
        raise WriteError(f"{what} {path} is a directory; give a file name")
    directory = path.parent
    if not directory.is_dir():
        _existing_ancestor(directory, what)  # a file in the way says so
        raise WriteError(f"{what} {path} cannot be written: the directory {directory} does not exist")
    _probe(directory, what, path)
    return path


def write_atomic(target: str | os.PathLike, content: str | bytes, mode: int = 0o644, replace: bool = True) -> Path:
    """Write content to target with mode, whole or not at all. With replace=False an existing
    target is never overwritten (FileExistsError), not even by a concurrent writer."""
    target = Path(target)
    data = content.encode() if isinstance(content, str) else content
    temporary = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        try:
            os.fchmod(fd, mode)  # the umask must not change it
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if replace:
            os.replace(temporary, target)  # a reader never sees half a file
        else:
            os.link(temporary, target)  # fails if the target exists, unlike rename
            os.unlink(temporary)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise
    return target
