"""One ``xentmemd`` per directory: an exclusive ``flock`` on ``<dir>/xentmemd.lock``.

The daemon locks its run directory and its state directory before it loads a backend, binds
the socket or creates a swap file; a daemon that cannot take both stops and leaves the live
one's files alone.  The file stays after the lock is released (``docs/architecture.md``,
"Inside xentmemd", says why) and holds the owner's pid, for the error message only.
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
    """Another live ``xentmemd`` owns the run (or state) directory."""


class RunDirLock:
    """A directory's lock, held from :meth:`acquire` until :meth:`release`."""

    def __init__(self, directory: Path, *, what: str = "run directory",
                 flag: str = "--run-dir", mode: int = 0o755) -> None:
        self.directory = directory
        self.path = directory / LOCK_NAME
        self.what = what
        self._flag = flag
        self._mode = mode
        self._fd = -1

    @property
    def held(self) -> bool:
        return self._fd >= 0

    def acquire(self) -> None:
        """Take the lock (creating the directory); :class:`RunDirBusy` if another has it."""
        if self.held:
            return
        self.directory.mkdir(mode=self._mode, parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _owner_of(fd)
            os.close(fd)
            raise RunDirBusy(f"another xentmemd{owner} owns the {self.what} "
                             f"{self.directory}; stop it first, or give this one its own "
                             f"{self._flag}") from None
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
    return f" (pid {untrusted})" if untrusted.isascii() and untrusted.isdigit() else ""
