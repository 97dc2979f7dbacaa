"""``xentmem-hostd demo --load``: a guest that swaps, so the demo's pages and figures move.

For one guest of the demo it starts ``xentmemd`` on that guest's xenstore socket with the
``xen`` backend (the command the README has a user type), then swaps through its control
socket: each round stores a batch of pages into a memory-backed swap area, reads the batch
before back and checks every byte, and frees a quarter of it.  ``xentmem-hostd list`` then
shows the guest's pool and its pages changing.  Stopping invalidates the area (swapoff), so
the guest daemon stops cleanly, then stops the daemon.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from xentmem.clock import SystemClock
from xentmem.control.client import ControlClient
from xentmem.control.protocol import SOCKET_NAME, ControlError

log = logging.getLogger("xentmem.hostd.demo")

PAGE_SIZE = 4096
#: How long the guest daemon may take to load the xen backend and open its socket.
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
#: How often the start-up wait looks at the daemon's socket.
POLL_S = 0.1


def page(domid: int, offset: int, round_no: int) -> bytes:
    """A recognisable, compressible page: who wrote it, where, and in which round."""
    line = f"guest {domid} swap offset {offset} round {round_no}\n".encode()
    return (line * (PAGE_SIZE // len(line) + 1))[:PAGE_SIZE]


class GuestLoad:
    """One guest's ``xentmemd`` and the swapping it does, round after round."""

    def __init__(self, directory: Path, domid: int, xenstore_socket: Path, *,
                 area_pages: int = 256, batch: int = 32, interval_s: float = 1.0,
                 log_level: str = "warning") -> None:
        self.domid = domid
        self.run_dir = directory / f"guest-{domid}"
        self.socket_path = self.run_dir / SOCKET_NAME
        self.xenstore_socket = xenstore_socket
        self.area_pages = area_pages
        self.batch = batch
        self.interval_s = interval_s
        self.log_level = log_level
        self.process: subprocess.Popen[bytes] | None = None
        self.swap_type: int | None = None
        self.rounds = 0

    def command(self) -> list[str]:
        """The guest daemon, with the balloon loops off: the pages move only by the load."""
        return [sys.executable, "-m", "xentmem.guestd.app", "--backend", "xen",
                "--xenstore-socket", str(self.xenstore_socket),
                "--run-dir", str(self.run_dir), "--state-dir", str(self.run_dir / "state"),
                "--log-level", self.log_level,
                "-o", "selfballooning_at_load=0", "-o", "selfshrinking=0"]

    def start(self) -> None:
        """Start the daemon in its own session: the terminal's Ctrl-C is the demo's to
        handle, which then stops the daemon in order."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(self.command(), start_new_session=True)

    def wait_ready(self, stop: threading.Event, timeout_s: float = START_TIMEOUT_S) -> bool:
        """Until the daemon answers on its socket; False if it exited, or on stop/timeout."""
        assert self.process is not None, "start() first"
        clock = SystemClock()
        deadline = clock.monotonic() + timeout_s
        while not stop.is_set() and clock.monotonic() < deadline:
            if self.process.poll() is not None:
                log.error("load: guest %d: xentmemd exited with status %s before it was "
                          "ready (its messages are above)", self.domid, self.process.returncode)
                return False
            try:
                with ControlClient(self.socket_path, timeout=2.0) as client:
                    client.hello()
                return True
            except ControlError:
                stop.wait(POLL_S)
        return False

    def run(self, stop: threading.Event) -> None:
        """Swap until ``stop``; one log line per round."""
        if not self.wait_ready(stop):
            return
        with ControlClient(self.socket_path, timeout=30.0) as client:
            self.swap_type = client.frontswap.init(self.area_pages)
            log.info("load: guest %d: xentmemd at %s, swap area %d of %d pages", self.domid,
                     self.socket_path, self.swap_type, self.area_pages)
            while not stop.is_set():
                try:
                    self.round(client)
                except ControlError as exc:
                    if not stop.is_set():
                        log.error("load: guest %d: %s; the load stops", self.domid, exc)
                    return
                stop.wait(self.interval_s)

    def round(self, client: ControlClient) -> None:
        """Store a batch, read the batch before back (checked), free a quarter of it."""
        assert self.swap_type is not None
        swap = client.frontswap
        first = (self.rounds * self.batch) % self.area_pages
        offsets = [(first + i) % self.area_pages for i in range(self.batch)]
        in_tmem = sum(swap.store(self.swap_type, offset, page(self.domid, offset, self.rounds))
                      == 0 for offset in offsets)
        intact = 0
        if self.rounds:
            before = ((self.rounds - 1) * self.batch) % self.area_pages
            for i in range(self.batch):
                offset = (before + i) % self.area_pages
                if i % 4 == 0:
                    continue  # freed last round
                if swap.load(self.swap_type, offset) == page(self.domid, offset, self.rounds - 1):
                    intact += 1
        freed = offsets[::4]
        for offset in freed:
            swap.invalidate_page(self.swap_type, offset)
        log.info("load: guest %d round %d: stored %d pages (%d in tmem), read back %d intact, "
                 "freed %d; tmem holds %d swap pages", self.domid, self.rounds, len(offsets),
                 in_tmem, intact, len(freed), swap.curr_pages())
        self.rounds += 1

    def close(self) -> None:
        """Swapoff (the area's pages would otherwise count as lost), then stop the daemon."""
        if self.process is None:
            return
        if self.swap_type is not None and self.process.poll() is None:
            try:
                with ControlClient(self.socket_path, timeout=STOP_TIMEOUT_S) as client:
                    client.frontswap.invalidate_area(self.swap_type)
            except ControlError as exc:
                log.warning("load: guest %d: swapoff failed: %s", self.domid, exc)
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log.warning("load: guest %d: xentmemd did not stop; killing it", self.domid)
            self.process.kill()
            self.process.wait()
