"""Benchmark: the control socket's page API against the same operations in process, and the
idle daemon's cost.

Three measurements, each against a real ``xentmemd`` subprocess on a fake guest root (no
Xen, so zcache and report-only ballooning, as on a developer's machine) with default
intervals:

1. **Idle**: the daemon's CPU time over ``--idle-seconds`` (default 60) right after READY,
   as a share of one core (target: under 0.5 %), and its resident set size (target: under
   40 MB), both read with psutil on the subprocess.
2. **Page API**: frontswap ``store``/``load`` and cleancache ``put_page``/``get_page`` of
   ``--pages`` pages through :class:`~xentmem.control.ControlClient` (one connection, one
   request per page), in pages per second.
3. **In process**: the same operations on a :class:`~xentmem.guest.shim.Shim` with zcache loaded,
   called directly; the socket's figure is given as a ratio of this one.

Every page read back is checked byte for byte.  The last line is the summary::

    SUMMARY: socket store N/s load N/s (x.xxx of in-process), cleancache put N/s get N/s
    (x.xxx), idle CPU x.xx% of a core (target < 0.5%), RSS x.x MB (target < 40 MB)

Run: ``python bench/bench_control.py [--pages 4000] [--idle-seconds 60]``.
"""

from __future__ import annotations

import argparse
import gc
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import psutil

from xentmem.control import ControlClient
from xentmem.guest.backends.zcache import ZcacheBackend
from xentmem.guest.cmdline import BootParams
from xentmem.guest.frontends import MemoryBacking
from xentmem.guest.shim import Shim
from xentmem.roots import Roots

PAGE_SIZE = 4096
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0
CAPACITY = "256M"
IDLE_CPU_TARGET_PERCENT = 0.5
RSS_TARGET_MB = 40.0

MEMINFO = "MemTotal: 2048000 kB\nMemFree: 1024000 kB\nCommitted_AS: 512000 kB\n"
ZONEINFO = """\
Node 0, zone      DMA
        high     49
        spanned  4095
        managed  3977
        protection: (0, 1928, 1928, 1928)
  start_pfn:           1
Node 0, zone    DMA32
        high     6000
        spanned  520192
        managed  500000
        protection: (0, 0, 0, 0)
  start_pfn:           4096
"""


def make_pages(count: int) -> list[bytes]:
    """Distinct pages: mostly compressible text, one in eight random."""
    pages = []
    for number in range(count):
        if number % 8 == 7:
            pages.append(os.urandom(PAGE_SIZE))
        else:
            pages.append((f"page {number:08d} of the control bench. ".encode() * 120)[:PAGE_SIZE])
    return pages


def make_root(base: Path) -> Path:
    root = base / "root"
    (root / "proc").mkdir(parents=True)
    (root / "proc" / "meminfo").write_text(MEMINFO)
    (root / "proc" / "zoneinfo").write_text(ZONEINFO)
    (root / "proc" / "cmdline").write_text("ro quiet\n")
    return root


def rate(count: int, action: Callable[[int], None]) -> float:
    """Pages per second of ``action(i)`` for i in range(count), GC off while it runs."""
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        for number in range(count):
            action(number)
        elapsed = time.perf_counter() - start
    finally:
        gc.enable()
    return count / elapsed


# -- in process ----------------------------------------------------------------------------

def in_process(pages: list[bytes], root: Path) -> dict[str, float]:
    shim = Shim(roots=Roots(root=root), boot=BootParams())
    shim.load(ZcacheBackend, {"capacity": CAPACITY, "selfballooning_at_load": False,
                              "selfshrinking": False})
    count = len(pages)
    shim.frontswap.init(0, MemoryBacking(count))
    fs = shim.cleancache.init_fs()
    figures = {
        "store": rate(count, lambda i: shim.frontswap.store(0, i, pages[i])),
        "load": rate(count, lambda i: shim.frontswap.load(0, i)),
        "put": rate(count, lambda i: shim.cleancache.put_page(fs, 1 + i // 64, i % 64, pages[i])),
    }
    figures["get"] = rate(count, lambda i: shim.cleancache.get_page(fs, 1 + i // 64, i % 64))
    for number in range(count):
        assert shim.frontswap.load(0, number) == pages[number]
    shim.unload()
    return figures


# -- the daemon ----------------------------------------------------------------------------

class Daemon:
    """xentmemd as a subprocess; READY is awaited on our own NOTIFY_SOCKET."""

    def __init__(self, base: Path, root: Path) -> None:
        self.run_dir = base / "run"
        self.notify_path = base / "notify.sock"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(self.notify_path))
        env = {k: v for k, v in os.environ.items()
               if k not in ("WATCHDOG_USEC", "JOURNAL_STREAM", "INVOCATION_ID")}
        env["NOTIFY_SOCKET"] = str(self.notify_path)
        self.log = open(base / "xentmemd.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "xentmem.guestd.app", "--root", str(root),
             "--run-dir", str(self.run_dir), "-o", f"zcache.capacity={CAPACITY}"],
            stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.process = psutil.Process(self.proc.pid)

    def wait_ready(self) -> None:
        self.notify.settimeout(READY_TIMEOUT_S)
        while True:
            try:
                message = self.notify.recv(65536).decode()
            except socket.timeout:
                raise SystemExit(f"xentmemd not READY within {READY_TIMEOUT_S}s") from None
            if "READY=1" in message.splitlines():
                return

    def cpu_seconds(self) -> float:
        times = self.process.cpu_times()
        return times.user + times.system

    def rss_mb(self) -> float:
        return self.process.memory_info().rss / (1 << 20)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(STOP_TIMEOUT_S)
        finally:
            self.log.close()
            self.notify.close()


def idle(daemon: Daemon, seconds: float) -> tuple[float, float]:
    """CPU share of one core (percent) and peak RSS (MB) over ``seconds`` of idling."""
    peak = daemon.rss_mb()
    before = daemon.cpu_seconds()
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        time.sleep(min(1.0, max(0.0, seconds - (time.perf_counter() - start))))
        peak = max(peak, daemon.rss_mb())
    used = daemon.cpu_seconds() - before
    return 100.0 * used / (time.perf_counter() - start), peak


def over_socket(pages: list[bytes], daemon: Daemon) -> dict[str, float]:
    count = len(pages)
    with ControlClient(daemon.run_dir / "control.sock", timeout=30) as client:
        swap = client.frontswap.init(pages=count)
        fs = client.cleancache.init_fs()
        figures = {
            "store": rate(count, lambda i: client.frontswap.store(swap, i, pages[i])),
            "load": rate(count, lambda i: client.frontswap.load(swap, i)),
            "put": rate(count, lambda i: client.cleancache.put_page(fs, 1 + i // 64, i % 64,
                                                                    pages[i])),
        }
        figures["get"] = rate(count, lambda i: client.cleancache.get_page(fs, 1 + i // 64,
                                                                          i % 64))
        for number in range(count):
            assert client.frontswap.load(swap, number) == pages[number]
        # swapoff: a memory-backed area still holding pages at exit counts as lost pages,
        # which makes the daemon's stop unclean (exit 1)
        client.frontswap.invalidate_area(swap)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pages", type=int, default=4000, help="pages per operation")
    parser.add_argument("--idle-seconds", type=float, default=60.0,
                        help="how long to watch the idle daemon (default 60)")
    args = parser.parse_args(argv)
    if args.pages < 1 or args.idle_seconds <= 0:
        parser.error("--pages and --idle-seconds must be positive")
    pages = make_pages(args.pages)
    with tempfile.TemporaryDirectory(prefix="xentmem-bench-") as tmp:
        base = Path(tmp)
        root = make_root(base)
        local = in_process(pages, root)
        daemon = Daemon(base, root)
        try:
            daemon.wait_ready()
            rss_ready = daemon.rss_mb()
            print(f"daemon pid {daemon.proc.pid} ready, RSS {rss_ready:.1f} MB; "
                  f"idling {args.idle_seconds:g}s with default intervals...", flush=True)
            cpu_percent, rss_idle = idle(daemon, args.idle_seconds)
            remote = over_socket(pages, daemon)
            rss_loaded = daemon.rss_mb()
        finally:
            code = daemon.stop()
    if code != 0:
        print(f"xentmemd exited with {code}", file=sys.stderr)
        return 1

    print(f"{'op':<22}{'in process /s':>16}{'socket /s':>14}{'ratio':>9}")
    names = {"store": "frontswap.store", "load": "frontswap.load",
             "put": "cleancache.put_page", "get": "cleancache.get_page"}
    for key, name in names.items():
        print(f"{name:<22}{local[key]:>16,.0f}{remote[key]:>14,.0f}"
              f"{remote[key] / local[key]:>9.3f}")
    print(f"idle CPU over {args.idle_seconds:g}s: {cpu_percent:.3f}% of a core "
          f"(target < {IDLE_CPU_TARGET_PERCENT}%)")
    print(f"RSS: {rss_ready:.1f} MB at READY, {rss_idle:.1f} MB peak idle "
          f"(target < {RSS_TARGET_MB:.0f} MB), {rss_loaded:.1f} MB holding "
          f"{2 * args.pages} pages")
    swap_ratio = (remote["store"] + remote["load"]) / (local["store"] + local["load"])
    cc_ratio = (remote["put"] + remote["get"]) / (local["put"] + local["get"])
    print(f"SUMMARY: socket store {remote['store']:,.0f}/s load {remote['load']:,.0f}/s "
          f"({swap_ratio:.3f} of in-process), cleancache put {remote['put']:,.0f}/s "
          f"get {remote['get']:,.0f}/s ({cc_ratio:.3f}), idle CPU {cpu_percent:.2f}% of a core "
          f"(target < {IDLE_CPU_TARGET_PERCENT}%), RSS {rss_idle:.1f} MB "
          f"(target < {RSS_TARGET_MB:.0f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
