"""One ``xentmemd`` per run directory: an exclusive ``flock`` on ``<run>/xentmemd.lock``.

The lock is taken before anything else that touches the run directory or the guest: before
the backend is loaded (a second daemon must not register a second tmem client, nor write a
balloon target), before the control socket is bound, and before ``shutdown.json`` could be
written.  A daemon that cannot take it stops there and leaves the live daemon's socket,
swap maps and shutdown record alone.

``flock`` is released by the kernel when the process dies, however it dies, so a crashed
daemon never leaves a stale lock behind; the file itself stays (removing it would let a
third daemon lock a fresh inode while a second one still holds the old one).  The file holds
the owner's pid, for the error message only.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from xentmem.errors import XentmemError

LOCK_NAME = "xentmemd.lock"
#: The most of the lock file read back for the owner's pid.
_PID_BYTES = 32


class RunDirBusy(XentmemError):
    """Another live ``xentmemd`` owns the run directory."""


class RunDirLock:
    """The run directory's lock, held from :meth:`acquire` until :meth:`release`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / LOCK_NAME
        self._fd = -1

    @property
    def held(self) -> bool:
        return self._fd >= 0

    def acquire(self) -> None:
        """Take the lock (creating the directory); :class:`RunDirBusy` if another has it."""
        if self.held:
            return
        self.directory.mkdir(mode=0o755, parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _owner_of(fd)
            os.close(fd)
            raise RunDirBusy(f"another xentmemd{owner} owns the run directory "
                             f"{self.directory}; stop it first, or give this one its own "
                             "--run-dir") from None
        except BaseException:
            os.close(fd)
            raise
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        except OSError:  # the pid is only for messages; the lock is what counts
            pass
        self._fd = fd

    def release(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            with contextlib.suppress(OSError):
                os.close(fd)


def _owner_of(fd: int) -> str:
    """`` (pid N)`` from the lock file, or nothing if it does not hold a plain number."""
    try:
        untrusted = os.pread(fd, _PID_BYTES, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""
    return f" (pid {untrusted})" if untrusted.isdigit() else ""
