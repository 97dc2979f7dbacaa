"""An NBD server over the real shim (zcache by default) and swap areas, for the NBD tests
and ``bench/bench_nbd.py``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fakes.libc import RecordingLibc

from xentmem.guest.shim import Shim
from xentmem.guestd.nbd.exports import Exports
from xentmem.guestd.nbd.resident import Residency
from xentmem.guestd.nbd.server import NbdServer
from xentmem.guestd.swap import SwapAreas
from xentmem.roots import Roots

#: Every wait on the server: an event, bounded generously (a busy CI machine).
WAIT_S = 60.0


@dataclass
class Served:
    shim: Shim
    swap: SwapAreas
    exports: Exports
    server: NbdServer
    socket: Path
    libc: RecordingLibc

    def uri(self, name: str) -> str:
        return f"nbd+unix:///{name}?socket={self.socket}"

    def wait_connections(self, count: int) -> None:
        """Until the server holds exactly ``count`` connections (bounded)."""
        with self.server.changed:
            reached = self.server.changed.wait_for(
                lambda: len(self.server._connections) == count, WAIT_S)
        assert reached, f"{self.server.connections()} connections, expected {count}"


def serve(directory: Path, backend: str | None = "zcache",
          libc: RecordingLibc | None = None, **server_options: Any) -> Served:
    """Served with ``libc`` (a recording one by default: the test process stays unlocked);
    ``server_options``: :class:`NbdServer`'s (``handshake_timeout_s``, ``clock``, ...)."""
    libc = libc or RecordingLibc()
    shim = Shim(roots=Roots(run_dir=directory / "run"))  # zcache's arena goes there
    if backend is not None:
        shim.load(backend)
    swap = SwapAreas(shim.frontswap, directory / "swap")
    residency = Residency(libc, set_stack_size=libc.stack_size)
    exports = Exports(shim.frontswap, swap, residency)
    server = NbdServer(exports, residency=residency, **server_options)
    exports.server = server
    path = server.listen_unix(directory / "nbd.sock")
    server.start()
    return Served(shim, swap, exports, server, path, libc)
