"""The ``xen`` backend's test helpers: the host service on a thread, over any xenstore peer.

:class:`TmemHost` runs :class:`~xentmem.hostd.service.HostService` against a ``xenstore_host``
(our server, or Debian's C or OCaml xenstored) and :meth:`TmemHost.guest` introduces a guest
the way a toolstack does, waits (on a watch, with a timeout) until the service has given it a
tmem device, and returns the :class:`~xentmem.roots.Roots` a backend in that guest uses.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import pyxs
from fakes.xenstore_hosts import XenstoreHost

from xentmem.hostd.service import HostService
from xentmem.hostd.store import HostStore
from xentmem.roots import Roots

#: Generous: the suite shares two CPUs with other work; a timeout test sets its own.
TIMEOUT_MS = 5000
WAIT_S = 10.0


def wait_for_node(client: pyxs.Client, path: bytes, *, gone: bool = False,
                  timeout: float = WAIT_S) -> None:
    """Block (on a watch, bounded) until ``path`` exists (or, with ``gone``, does not)."""
    monitor = client.monitor()
    token = b"xenbackend-wait"
    monitor.watch(path, token)
    try:
        for _ in range(200):
            if client.exists(path) != gone:
                return
            monitor.events.get(timeout=timeout)
        raise AssertionError(f"{path!r} never {'went' if gone else 'appeared'}")
    finally:
        monitor.unwatch(path, token)


class TmemHost:
    """The host service on a thread, plus helpers to add guests."""

    def __init__(self, xs: XenstoreHost, tmp: Path, capacity: int) -> None:
        self.xs = xs
        self.tmp = tmp
        self.capacity = capacity
        self.service: HostService | None = None
        self.thread: threading.Thread | None = None
        self.guests: list[int] = []
        # AF_UNIX paths are short (107 bytes); pytest's tmp_path can be longer.
        self._short = Path(tempfile.mkdtemp(prefix="hostd-", dir="/tmp"))
        self.control_path = self._short / "hostd.sock"

    def start(self, run_dir: Path | None = None, **kw: object) -> HostService:
        """``run_dir``: where the store's arena and sessions outlive :meth:`crash`."""
        service = HostService(xenstore=self.xs.dom0_socket,
                              store=HostStore(self.capacity, run_dir=run_dir),
                              control_path=self.control_path, timeout=WAIT_S, **kw)  # type: ignore[arg-type]
        service.open()
        thread = threading.Thread(target=service.run, name="hostd", daemon=True)
        thread.start()
        self.service, self.thread = service, thread
        return service

    def resume(self, on_idle: Callable[[], None] | None = None) -> None:
        """Serve again after :meth:`halt` (events that arrived meanwhile are handled), with
        ``on_idle`` called at every turn of the loop, as the watchdog's ping is."""
        assert self.service is not None and self.thread is None
        self.thread = threading.Thread(target=self.service.run, kwargs={"on_idle": on_idle},
                                       name="hostd", daemon=True)
        self.thread.start()

    def halt(self) -> None:
        """Stop serving without telling the guests: a host that stopped answering."""
        if self.service is not None and self.thread is not None:
            self.service.stop()
            self.thread.join(WAIT_S)
            assert not self.thread.is_alive(), "host service did not stop"
            self.thread = None

    def crash(self) -> None:
        """Stop as a killed process does: nothing told, nothing dropped, files kept."""
        self.halt()
        if self.service is not None:
            self.service.close(clean=False)
            self.service = None

    def stop(self) -> None:
        """Stop and close the devices (every guest sees Closed)."""
        self.halt()
        if self.service is not None:
            self.service.close()
            self.service = None

    def guest(self, domid: int) -> Roots:
        socket_path = self.xs.introduce(domid)
        self.guests.append(domid)
        wait_for_node(self.xs.dom0, f"/local/domain/0/backend/tmem/{domid}/0/state".encode())
        root = self.tmp / f"guest{domid}"
        root.mkdir(exist_ok=True)
        return Roots(root=root, xenstore_socket=socket_path)

    def client(self, roots: Roots) -> pyxs.Client:
        """A raw pyxs client that *is* that guest (for permission checks)."""
        return self.xs.client(roots.xenstore_socket)

    def clean(self) -> None:
        self.stop()
        shutil.rmtree(self._short, ignore_errors=True)
        dom0 = self.xs.dom0
        for path in (b"/local/domain/0/backend/tmem",):
            if dom0.exists(path):
                dom0.delete(path)
