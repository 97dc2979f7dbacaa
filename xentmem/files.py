"""Durable file writes: the one place that knows how to replace a file so a crash never
leaves half of it.

A reader (node_exporter, a later ``xentmemd``, an administrator) sees the old file or the new
one, never a mix: the data goes to a temporary file beside the target, is fsynced, renamed
over the target, and then the directory is fsynced so the rename itself survives a power
cut.  :func:`fsync_path` flushes a file written through another descriptor (a swap area
whose data must be on disk before the map that names its slots).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def fsync_path(path: Path, *, directory: bool = False) -> None:
    """Flush what was written to ``path`` (through any descriptor) to stable storage.

    Linux flushes the inode's dirty pages whichever descriptor ``fsync`` is called on, so
    a file written by another object (a backing store holding its own descriptor) is
    flushed without reaching into that object.
    """
    flags = os.O_RDONLY | (os.O_DIRECTORY if directory else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_directory(directory: Path) -> None:
    """Make the names in ``directory`` (a new file, a rename) durable.

    A file system that cannot fsync a directory (some FUSE or network ones) still has the
    file in place, so that is no error.
    """
    with contextlib.suppress(OSError):
        fsync_path(directory, directory=True)


def write_atomically(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` atomically: a temporary file beside it, fsync, rename, fsync the dir.

    The temporary file is new and random-named (``O_CREAT|O_EXCL|O_NOFOLLOW``, as
    :func:`tempfile.mkstemp` opens it): the directory may belong to another account
    (node_exporter's textfile directory), which could otherwise plant a symlink at a
    predictable name and have root write through it.  Its mode is set with ``fchmod``
    (exactly ``mode``, whatever the umask).
    """
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)  # the rename is only durable once the directory is
