"""Keep the swap server out of the way of its own swap (``docs/nbd.md``, "No deadlock").

A process that serves a swap device must not need that device to make progress: if one of
its pages were swapped out onto its own export, the fault that brings it back would wait
for the process itself.  Two kernel interfaces prevent it:

* ``mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT)``, once, when the first export is made:
  every page the daemon has touched or will touch stays resident.  ``MCL_ONFAULT`` (Linux
  >= 4.4) locks a page when it is faulted in instead of populating every mapping whole:
  zcache's page arena reserves a mapping as large as the guest's RAM and fills it as pages
  come, and populating it at once would take the guest's whole memory.  The serving
  buffers are written when they are made, so they are resident before any pressure.
  Failure refuses the export (:class:`SwapUnsafe`): a swap device that can deadlock the
  guest under the very pressure swap is for is worse than none.  It needs ``CAP_IPC_LOCK``
  or an ``RLIMIT_MEMLOCK`` above the daemon's size.  A first export that fails after the
  lock undoes it (``munlockall``): a daemon serving no swap need not pin its memory.
* ``prctl(PR_SET_IO_FLUSHER, 1)`` on each thread that serves NBD (Linux >= 5.6, needs
  ``CAP_SYS_RESOURCE``): the thread's allocations never start I/O in direct reclaim
  (``PF_MEMALLOC_NOIO``), so reclaim cannot wait on a write to the device the thread
  serves.  Without it (an older kernel, no capability) the thread serves on, a warning is
  logged once and counted: the locked memory is the guarantee, this flag the margin.

A thread's stack is locked as deep as it has ever been used, so the threads made from then
on get :data:`THREAD_STACK_BYTES` instead of the default (``RLIMIT_STACK``, 8 MiB on
Debian): their worst case stays small.  The system calls go through :class:`Libc`
(ctypes), which tests replace.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import resource
import threading
from typing import Any, Callable, Protocol

from xentmem.errors import XentmemError

log = logging.getLogger(__name__)

# <sys/mman.h> and <linux/prctl.h>
MCL_CURRENT = 1
MCL_FUTURE = 2
MCL_ONFAULT = 4
#: What :meth:`Residency.lock_memory` asks for (see the module docstring).
LOCK_FLAGS = MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT
PR_SET_IO_FLUSHER = 57
PR_GET_IO_FLUSHER = 58
#: The stack of each thread made after the memory is locked: ample for the serving code's
#: depth, and what each one costs in locked memory.
THREAD_STACK_BYTES = 1024 * 1024


class SwapUnsafe(XentmemError):
    """The daemon cannot keep itself resident: it refuses to serve swap."""


class Libc(Protocol):
    """The system calls; each raises OSError (with its errno) when it fails."""

    def mlockall(self, flags: int) -> None: ...

    def munlockall(self) -> None: ...

    def prctl(self, option: int, arg2: int) -> int: ...


class RealLibc:
    """The C library through ctypes."""

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

    def mlockall(self, flags: int) -> None:
        if self._libc.mlockall(ctypes.c_int(flags)) != 0:
            self._raise("mlockall")

    def munlockall(self) -> None:
        if self._libc.munlockall() != 0:
            self._raise("munlockall")

    def prctl(self, option: int, arg2: int) -> int:
        zero = ctypes.c_ulong(0)
        rc = self._libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg2), zero, zero, zero)
        if rc < 0:
            self._raise("prctl")
        return int(rc)

    @staticmethod
    def _raise(call: str) -> None:
        code = ctypes.get_errno()
        raise OSError(code, f"{call}: {os.strerror(code)}")


def _memlock_limit() -> str:
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return "unlimited" if soft == resource.RLIM_INFINITY else f"{soft} bytes"


class Residency:
    """The daemon's memory lock (process-wide, once) and the serving threads' flag."""

    def __init__(self, libc: Libc | None = None,
                 set_stack_size: Callable[[int], Any] = threading.stack_size) -> None:
        """``libc`` (the real one by default) and ``set_stack_size`` (the threads made from
        then on): what a test replaces, so the test process is neither locked nor changed."""
        self._libc = libc
        self._set_stack_size = set_stack_size
        self._lock = threading.Lock()
        self.locked = False
        #: The thread stack size before :meth:`lock_memory` changed it (0: the default).
        self._stack_before = 0
        #: Serving threads marked as I/O flushers, and those the kernel refused.
        self.io_flushers = 0
        self.io_flusher_refused = 0
        self._warned = False

    @property
    def libc(self) -> Libc:
        if self._libc is None:
            self._libc = RealLibc()
        return self._libc

    def lock_memory(self) -> bool:
        """Lock every page of the process, now and to come; SwapUnsafe if the kernel refuses
        (then nothing changed).  Once done, later calls return at once.  True if this call
        locked (its caller undoes it, :meth:`unlock_memory`, should what it was for fail)."""
        with self._lock:
            if self.locked:
                return False
            try:
                self.libc.mlockall(LOCK_FLAGS)
            except OSError as exc:
                message = (f"cannot lock xentmemd in memory ({exc}; RLIMIT_MEMLOCK "
                           f"{_memlock_limit()}): a swap server that can be swapped out "
                           f"deadlocks under memory pressure, so no swap is served.  Grant "
                           f"CAP_IPC_LOCK (the unit does) or LimitMEMLOCK=infinity")
                log.error("%s", message)
                raise SwapUnsafe(message) from exc
            self._stack_before = self._set_stack_size(THREAD_STACK_BYTES) or 0
            self.locked = True
        log.info("memory locked (mlockall MCL_CURRENT|MCL_FUTURE|MCL_ONFAULT): swap can be served")
        return True

    def unlock_memory(self) -> None:
        """Undo :meth:`lock_memory` (the first export was refused after it locked): no swap is
        served, so the daemon need not pin its memory.  A refusal is logged; it stays locked."""
        with self._lock:
            if not self.locked:
                return
            try:
                self.libc.munlockall()
            except OSError as exc:
                log.warning("munlockall refused (%s): xentmemd stays locked in memory", exc)
                return
            self._set_stack_size(self._stack_before)
            self.locked = False
        log.info("memory unlocked (munlockall): no swap is served")

    def serving_thread(self) -> None:
        """Mark the calling thread an I/O flusher; a refusal is logged once, then counted."""
        try:
            self.libc.prctl(PR_SET_IO_FLUSHER, 1)
        except OSError as exc:
            with self._lock:
                self.io_flusher_refused += 1
                warn, self._warned = not self._warned, True
            if warn:
                why = {errno.EPERM: "needs CAP_SYS_RESOURCE",
                       errno.EINVAL: "the kernel is older than 5.6"}.get(exc.errno, "")
                log.warning("PR_SET_IO_FLUSHER refused (%s%s): NBD threads serve on, but "
                            "their allocations may wait on reclaim's I/O", exc,
                            f": {why}" if why else "")
            return
        with self._lock:
            self.io_flushers += 1

    def describe(self) -> dict[str, Any]:
        with self._lock:
            return {"memory_locked": self.locked, "io_flushers": self.io_flushers,
                    "io_flusher_refused": self.io_flusher_refused}


def io_flusher_for_every_thread(libc: Libc | None = None) -> bool:
    """Mark the calling thread an I/O flusher before it makes any other: every thread made
    after inherits the flag (``PR_SET_IO_FLUSHER`` is kept across ``clone``), so none of the
    daemon's threads can wait in reclaim on a write to the device it serves.

    The serving threads alone are not enough: a thread the serving path waits for (the
    ``xen`` backend's flusher, which sends the posted ops under the lock the page threads'
    puts need; the control server answering ``nbd.list``) that enters direct reclaim holding
    such a lock can pick a page to swap out to this very device and wait on the device's
    full socket, which only the waiting serving threads drain.  ``xentmemd`` calls this first
    thing; True when the kernel took it (a refusal is logged: the serving threads still try).
    """
    try:
        (libc or RealLibc()).prctl(PR_SET_IO_FLUSHER, 1)
    except OSError as exc:
        log.warning("PR_SET_IO_FLUSHER for the whole daemon refused (%s): only the NBD "
                    "threads will be marked", exc)
        return False
    return True


class NotResident(Residency):
    """For tests and benchmarks that serve no real swap: locks nothing, marks nothing."""

    def lock_memory(self) -> bool:
        locked_now, self.locked = not self.locked, True
        return locked_now

    def unlock_memory(self) -> None:
        self.locked = False

    def serving_thread(self) -> None:
        pass
