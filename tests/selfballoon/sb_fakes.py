"""Fakes for the selfballoon tests: a guest's file tree, a shim, a frontswap, clocks."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from xentmem.clock import FakeClock
from xentmem.guest.shim import SHIM_PARAMS, loaded_flags
from xentmem.roots import Roots

BALLOON_DIR = "sys/devices/system/xen_memory/xen_memory0"

# A 2 GiB guest's zones, in the 5.x format, with the pagesets' "high:" lines that must not be
# read as watermarks.  By hand:
#   DMA:     min(managed 1500, high 49 + max(0, 1872, 1872, 1872)) = min(1500, 1921) = 1500
#   DMA32:   min(managed 500000, high 2900 + max(0, 0, 0, 0))     = 2900
#   Normal:  managed 0 -> 0;  Movable: managed 0 -> 0
#   totalreserve = 4400 pages;  max_pfn = max(1 + 4095, 4096 + 520192, 0, 0) = 524288
ZONEINFO = """\
Node 0, zone      DMA
  per-node stats
      nr_inactive_anon 1212
      nr_active_anon 8113
  pages free     1400
        boost    0
        min      33
        low      41
        high     49
        spanned  4095
        present  3998
        managed  1500
        cma      0
        protection: (0, 1872, 1872, 1872)
      nr_free_pages 1400
  pagesets
    cpu: 0
              count: 0
              high:  9999
              batch: 1
  vm stats threshold: 4
  node_unreclaimable:  0
  start_pfn:           1
Node 0, zone    DMA32
  pages free     400000
        boost    0
        min      1933
        low      2416
        high     2900
        spanned  520192
        present  520192
        managed  500000
        cma      0
        protection: (0, 0, 0, 0)
      nr_free_pages 400000
  pagesets
    cpu: 0
              count: 12
              high:  378
              batch: 63
  vm stats threshold: 24
  node_unreclaimable:  0
  start_pfn:           4096
Node 0, zone   Normal
  pages free     0
        boost    0
        min      0
        low      0
        high     0
        spanned  0
        present  0
        managed  0
        cma      0
        protection: (0, 0, 0, 0)
  start_pfn:           0
Node 0, zone  Movable
  pages free     0
        boost    0
        min      0
        low      0
        high     0
        spanned  0
        present  0
        managed  0
        cma      0
        protection: (0, 0, 0, 0)
  start_pfn:           0
"""
TOTALRESERVE = 4400
MAX_PFN = 524288


def meminfo_text(mem_total_kb: int, committed_kb: int) -> str:
    return (
        f"MemTotal:       {mem_total_kb} kB\n"
        "MemFree:          812344 kB\n"
        "MemAvailable:    1200000 kB\n"
        "Buffers:           20000 kB\n"
        "Cached:           300000 kB\n"
        "SwapTotal:       2097148 kB\n"
        "CommitLimit:     3112484 kB\n"
        f"Committed_AS:   {committed_kb} kB\n"
        "VmallocTotal:   34359738367 kB\n"
        "HugePages_Total:       0\n"
        "Hugepagesize:       2048 kB\n"
    )


def psi_text(some_total_us: int) -> str:
    return (
        f"some avg10=0.00 avg60=0.00 avg300=0.00 total={some_total_us}\n"
        f"full avg10=0.00 avg60=0.00 avg300=0.00 total={some_total_us // 2}\n"
    )


class GuestTree:
    """A fake guest root: /proc files and, optionally, the balloon driver's sysfs."""

    def __init__(self, root: Path, *, balloon: bool = True, dom0: bool = False) -> None:
        self.root = root
        self.roots = Roots(root=root)
        self.balloon = balloon
        (root / "proc" / "xen").mkdir(parents=True, exist_ok=True)
        (root / "proc" / "pressure").mkdir(parents=True, exist_ok=True)
        (root / "proc" / "xen" / "capabilities").write_text("control_d\n" if dom0 else "")
        (root / "proc" / "zoneinfo").write_text(ZONEINFO)
        if balloon:
            (root / BALLOON_DIR / "info").mkdir(parents=True, exist_ok=True)

    def write(self, *, mem_total_kb: int, committed_kb: int, current_kb: int | None = None,
              psi_total_us: int | None = None) -> None:
        (self.root / "proc" / "meminfo").write_text(meminfo_text(mem_total_kb, committed_kb))
        if current_kb is not None and self.balloon:
            (self.root / BALLOON_DIR / "info" / "current_kb").write_text(f"{current_kb}\n")
        if psi_total_us is not None:
            (self.root / "proc" / "pressure" / "memory").write_text(psi_text(psi_total_us))

    def set_target_kb(self, kb: int) -> None:
        (self.root / BALLOON_DIR / "target_kb").write_text(f"{kb}\n")

    @property
    def target_path(self) -> Path:
        return self.root / BALLOON_DIR / "target_kb"

    def target_kb(self) -> int | None:
        path = self.target_path
        return int(path.read_text()) if path.exists() else None


class FakeFrontswap:
    """``curr_pages`` and ``shrink`` like the shim's frontswap; shrink sets the count."""

    def __init__(self, pages: int = 0) -> None:
        self.pages = pages
        self.shrinks: list[int] = []
        self.fail_with: Exception | None = None

    def curr_pages(self) -> int:
        if self.fail_with is not None:
            raise self.fail_with
        return self.pages

    def shrink(self, target_pages: int) -> int:
        if self.fail_with is not None:
            raise self.fail_with
        self.shrinks.append(target_pages)
        moved = max(0, self.pages - target_pages)
        self.pages = min(self.pages, target_pages)
        return moved


class FakeShim:
    """The shape of ``xentmem.guest.shim.Shim`` the service uses, with load/unload notifications."""

    def __init__(self, roots: Roots, flags: Mapping[str, bool] | None = None) -> None:
        self.roots = roots
        self.frontswap = FakeFrontswap()
        # The real shim's flags as a load sets them (no frontswap: no balloon loops).
        self.flags: Mapping[str, Any] = loaded_flags({**SHIM_PARAMS.defaults(), **(flags or {})})
        self.listeners: list[Any] = []

    def add_listener(self, listener: Any) -> None:
        self.listeners.append(listener)

    def load(self) -> None:
        for listener in self.listeners:
            listener.backend_loaded(self)

    def unload(self) -> None:
        for listener in self.listeners:
            listener.backend_unloading(self)


class RecordingPublisher:
    def __init__(self, fail: bool = False) -> None:
        self.writes: list[tuple[str, str]] = []
        self.fail = fail
        self.closes = 0

    def write(self, path: str, value: str) -> None:
        if self.fail:
            raise OSError("xenstore is gone")
        self.writes.append((path, value))

    def close(self) -> None:
        self.closes += 1

    def latest(self) -> dict[str, str]:
        return dict(self.writes)


class HookClock(FakeClock):
    """A FakeClock that calls ``hook(clock, stop)`` after every wait (to change the world)."""

    def __init__(self, hook: Callable[[HookClock, threading.Event], None]) -> None:
        super().__init__()
        self.hook = hook
        self.calls = 0

    def wait(self, stop: threading.Event, timeout: float) -> bool:
        if super().wait(stop, timeout):
            return True
        self.calls += 1
        self.hook(self, stop)
        return stop.is_set()


class StepClock(FakeClock):
    """A fake clock for threads: each wait blocks until the test calls :meth:`step`.

    Every real wait has a timeout, so a broken test fails instead of hanging.
    """

    def __init__(self) -> None:
        super().__init__()
        self._cond = threading.Condition()
        self._tokens = 0
        self.entered = 0  # how many times the loop has entered wait()

    def wait(self, stop: threading.Event, timeout: float) -> bool:
        with self._cond:
            self.entered += 1
            self._cond.notify_all()
            for _ in range(1000):  # 1000 x 10 ms = 10 s at most
                if stop.is_set():
                    return True
                if self._tokens:
                    self._tokens -= 1
                    break
                self._cond.wait(0.01)
            self.now += timeout
            self.waits.append(timeout)
        return stop.is_set()

    def step(self, *, settle_timeout_s: float = 5.0) -> None:
        """Let one wait return, then wait until the loop is back in wait() (its tick done)."""
        with self._cond:
            target = self.entered + 1
            self._tokens += 1
            self._cond.notify_all()
            ok = self._cond.wait_for(lambda: self.entered >= target, settle_timeout_s)
        assert ok, "the loop did not come back to wait() in time"

    def wait_entered(self, count: int, timeout_s: float = 5.0) -> None:
        with self._cond:
            ok = self._cond.wait_for(lambda: self.entered >= count, timeout_s)
        assert ok, "the loop never reached wait()"
