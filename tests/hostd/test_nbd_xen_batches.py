"""An NBD request's pages reach the ``xen`` backend side by side, so they share messages to
the tmem host, against every xenstored the host tests run (``tmem_host``)."""

from __future__ import annotations

import os
from pathlib import Path

from xenhost import TIMEOUT_MS, TmemHost

from xentmem.guest.cmdline import BootParams
from xentmem.guest.shim import Shim
from xentmem.guestd.nbd.exports import Exports
from xentmem.guestd.nbd.fanout import PageFanout
from xentmem.guestd.swap import SwapAreas
from xentmem.tmem.abi import PAGE_SIZE

PAGES = 32  # what the kernel's swap writes in one request (128 KiB)


def test_a_request_of_many_pages_shares_messages(tmem_host: TmemHost, tmp_path: Path) -> None:
    shim = Shim(roots=tmem_host.guest(5), boot=BootParams())
    shim.load("xen", {"timeout_ms": TIMEOUT_MS, "batch": True})
    fanout = PageFanout()
    fanout.start()
    try:
        exports = Exports(shim.frontswap, SwapAreas(shim.frontswap, tmp_path / "swap"))
        exports.residency.lock_memory = lambda: None  # type: ignore[method-assign]
        exports.add(4 * PAGES, backing="memory", name="swap")
        export = exports.get("swap")
        assert export is not None
        backend = shim.backend
        assert backend is not None and backend.concurrency() > 1
        data = [os.urandom(PAGE_SIZE // 2) * 2 for _ in range(2 * PAGES)]

        before = backend.stats()["messages"]
        export.write(0, b"".join(data[:PAGES]))  # one page after another
        alone = backend.stats()["messages"] - before
        before = backend.stats()["messages"]
        export.write(PAGES * PAGE_SIZE, b"".join(data[PAGES:]), fanout=fanout)
        side_by_side = backend.stats()["messages"] - before

        assert alone == PAGES
        assert side_by_side < PAGES
        assert export.counts()["pages_to_tmem"] == 2 * PAGES
        assert export.read(0, 2 * PAGES * PAGE_SIZE, fanout) == b"".join(data)
        assert export.read(0, 2 * PAGES * PAGE_SIZE) == b"".join(data)
    finally:
        fanout.stop()
        shim.unload()
