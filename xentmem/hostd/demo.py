"""``xentmem-hostd demo``: a mocked Xen host on one machine, by hand.

The stand-in xenstored (:mod:`xentmem.mock_xenstored`) with guest homes, plus the service in
front of it, so a guest on the same machine can use the ``xen`` backend through
``XENSTORED_PATH=DIR/domain-N.sock``.  With ``load``, the demo also starts a guest daemon
that swaps (:mod:`xentmem.hostd.demo_load`), so pages move and the figures change.  This is
the only module of ``hostd`` that imports the stand-in: the service itself talks to any
xenstored.
"""

from __future__ import annotations

import shlex
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import click

from xentmem.hostd.demo_load import GuestLoad
from xentmem.hostd.service import HostService, serve
from xentmem.hostd.store import HostStore
from xentmem.mock_xenstored.server import XsServer
from xentmem.mock_xenstored.store import Limits as XsLimits


def run(directory: Path, guests: Iterable[int], *, flavour: str, capacity_bytes: int,
        program: str = "xentmem-hostd", load: bool = False, log_level: str = "warning",
        interval_s: float = 1.0) -> None:
    """Serve until SIGTERM/SIGINT; print how to reach dom0, the service and each guest.

    ``program`` is how to type ``xentmem-hostd`` in a new shell (its full path when PATH
    does not find it); ``load`` starts a swapping guest daemon for the first guest.
    """
    limits = XsLimits.oxenstored() if flavour == "oxenstored" else XsLimits.c_xenstored()
    with XsServer(directory, limits=limits) as server:
        sockets = {guest: server.prepare_domain(guest) for guest in guests}
        control = directory / "hostd.sock"
        stop = threading.Event()
        loads = [GuestLoad(directory, domid, path, log_level=log_level, interval_s=interval_s)
                 for domid, path in list(sockets.items())[:1]] if load else []
        threads: list[threading.Thread] = []

        def stop_guests() -> None:
            stop.set()
            for thread in threads:
                thread.join()
            for guest_load in loads:
                guest_load.close()

        service = DemoHost(stop_guests, xenstore=server.dom0_socket,
                           store=HostStore(capacity_bytes), control_path=control)
        hostd = f"{shlex.quote(program)} --control {shlex.quote(str(control))}"
        click.echo(f"XENSTORED_PATH={server.dom0_socket}   # dom0")
        click.echo(f"XENTMEM_HOSTD_SOCKET={control}   # xentmem-hostd list/freeze/...")
        for domid, path in sockets.items():
            click.echo(f"guest {domid}: XENSTORED_PATH={path} xentmemd --backend xen ...")
        for guest_load in loads:
            click.echo(f"guest {guest_load.domid}: xentmemd started by the demo, swapping; "
                       f"its socket {guest_load.socket_path}")
        click.echo(f"In another terminal: {hostd} list   # as xl tmem-list; "
                   f"freeze/thaw DOMID, set, freeable")
        click.get_text_stream("stdout").flush()
        for guest_load in loads:
            thread = threading.Thread(target=_drive, args=(guest_load, service, stop),
                                      name=f"demo-load-{guest_load.domid}", daemon=True)
            thread.start()
            threads.append(thread)
        try:
            serve(service)
        finally:
            stop_guests()  # already done unless serve() failed


class DemoHost(HostService):
    """The service, stopped after the demo's guests: a guest daemon unloads its backend
    through the host, so the host must still serve while the guests stop."""

    def __init__(self, stop_guests: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._stop_guests = stop_guests
        self._stopping = threading.Lock()

    def stop(self) -> None:
        """From a signal handler too: the guests stop on a thread, then the host."""
        if not self._stopping.acquire(blocking=False):
            return

        def guests_then_host() -> None:
            try:
                self._stop_guests()
            finally:
                HostService.stop(self)

        threading.Thread(target=guests_then_host, name="demo-stop", daemon=True).start()


def _drive(guest_load: GuestLoad, service: HostService, stop: threading.Event) -> None:
    """Once the service serves (a guest's probe looks for it), start the guest and swap."""
    while not service.ready.wait(0.1):
        if stop.is_set():
            return
    guest_load.start()
    guest_load.run(stop)
