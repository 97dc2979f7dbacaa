"""``xentmem-hostd demo``: a mocked Xen host on one machine, by hand.

The stand-in xenstored (:mod:`xentmem.mock_xenstored`) with guest homes, plus the service in
front of it, so a guest on the same machine can use the ``xen`` backend through
``XENSTORED_PATH=DIR/domain-N.sock``.  This is the only module of ``hostd`` that imports the
stand-in: the service itself talks to any xenstored.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import click

from xentmem.hostd.service import HostService, serve
from xentmem.hostd.store import HostStore
from xentmem.mock_xenstored.server import XsServer
from xentmem.mock_xenstored.store import Limits as XsLimits


def run(directory: Path, guests: Iterable[int], *, flavour: str, capacity_bytes: int) -> None:
    """Serve until SIGTERM/SIGINT; print how to reach dom0, the service and each guest."""
    limits = XsLimits.oxenstored() if flavour == "oxenstored" else XsLimits.c_xenstored()
    with XsServer(directory, limits=limits) as server:
        sockets = {guest: server.prepare_domain(guest) for guest in guests}
        control = directory / "hostd.sock"
        service = HostService(xenstore=server.dom0_socket, store=HostStore(capacity_bytes),
                              control_path=control)
        click.echo(f"XENSTORED_PATH={server.dom0_socket}   # dom0")
        click.echo(f"XENTMEM_HOSTD_SOCKET={control}   # xentmem-hostd list/freeze/...")
        for domid, path in sockets.items():
            click.echo(f"guest {domid}: XENSTORED_PATH={path} xentmemd --backend xen ...")
        click.get_text_stream("stdout").flush()
        serve(service)
