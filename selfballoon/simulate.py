"""A guest and its balloon, simulated, so the real loop runs end to end on a fake clock.

:class:`GuestSim` writes the files the loop reads under a temporary root and picks up the
``target_kb`` it wrote, so nothing in the loop is bypassed; :func:`replay` runs a
:class:`Trace` and returns what the bench prints.  The model: docs/selfballoon.md.
"""

from __future__ import annotations

import math
import random
import tempfile
import threading
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from xentmem.clock import FakeClock
from xentmem.roots import Roots
from xentmem_selfballoon.inputs import (
    MEMINFO,
    PSI_MEMORY,
    XEN_CAPABILITIES,
    ZONEINFO,
    balloon_current_path,
    balloon_target_path,
    parse_kb,
    read_meminfo,
)
from xentmem_selfballoon.knobs import KnobStore
from xentmem_selfballoon.loop import DEFAULT_HISTORY, SelfballoonLoop, TickRecord
from xentmem_selfballoon.policy import auto_reserved_mb, kb2pages, mb2pages, pages2kb

# -- traces --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rise:
    """A stretch where committed memory climbs: from ``start_s`` to ``end_s``, up to ``peak``."""

    start_s: float
    end_s: float
    peak_pages: int


@dataclass(frozen=True)
class Trace:
    """Committed memory over time: points ``(seconds, pages)`` joined by straight lines."""

    name: str
    points: tuple[tuple[float, int], ...]

    def __post_init__(self) -> None:
        times = [t for t, _ in self.points]
        if not self.points or times[0] != 0 or any(b <= a for a, b in zip(times, times[1:])):
            raise ValueError("trace points must start at 0 s and strictly increase in time")
        if any(p < 0 for _, p in self.points):
            raise ValueError("committed pages must be >= 0")

    @property
    def duration_s(self) -> float:
        return self.points[-1][0]

    @cached_property
    def _times(self) -> tuple[float, ...]:
        return tuple(t for t, _ in self.points)

    def committed_at(self, t: float) -> int:
        """Committed pages at ``t`` (held flat after the last point)."""
        i = bisect_right(self._times, t) - 1
        if i >= len(self.points) - 1:
            return self.points[-1][1]
        (t0, v0), (t1, v1) = self.points[i], self.points[i + 1]
        return int(v0 + (v1 - v0) * (t - t0) / (t1 - t0))

    def rises(self, min_pages: int) -> tuple[Rise, ...]:
        """Maximal runs of rising segments that climb by at least ``min_pages``."""
        out: list[Rise] = []
        start: tuple[float, int] | None = None
        pts = self.points
        for (t0, v0), (_, v1) in zip(pts, pts[1:]):
            if v1 > v0:
                if start is None:
                    start = (t0, v0)
                continue
            if start is not None:
                if t0 > start[0] and v0 - start[1] >= min_pages:
                    out.append(Rise(start[0], t0, v0))
                start = None
        if start is not None and pts[-1][1] - start[1] >= min_pages:
            out.append(Rise(start[0], pts[-1][0], pts[-1][1]))
        return tuple(out)


def steady_trace(*, mib: int = 700, wiggle_mib: int = 24, duration_s: int = 1800,
                 seed: int = 1) -> Trace:
    """A quiet guest: committed memory wanders a little around ``mib``."""
    rng = random.Random(seed)
    points = [(0.0, mb2pages(mib))]
    for t in range(30, duration_s + 1, 30):
        points.append((float(t), mb2pages(mib + rng.randint(-wiggle_mib, wiggle_mib))))
    return Trace("steady", tuple(points))


def ramp_trace(*, base_mib: int = 400) -> Trace:
    """Three climbs of different steepness (10, 40 and ~140 MiB/s), each held, then undone."""
    mb = mb2pages
    pts = [
        (0.0, mb(base_mib)), (60.0, mb(base_mib)),
        (160.0, mb(1400)), (400.0, mb(1400)), (500.0, mb(base_mib)),       # 10 MiB/s
        (600.0, mb(base_mib)), (620.0, mb(1200)), (800.0, mb(1200)),       # 40 MiB/s
        (900.0, mb(base_mib)), (1000.0, mb(base_mib)),
        (1008.0, mb(1500)), (1200.0, mb(1500)), (1300.0, mb(base_mib)),    # ~137 MiB/s
        (1500.0, mb(base_mib)),
    ]
    return Trace("ramp", tuple(pts))


def burst_trace(*, base_mib: int = 500, duration_s: int = 1800, seed: int = 7) -> Trace:
    """Sudden jobs: +300..900 MiB within a second, held 10..60 s, every 1..3 minutes."""
    rng = random.Random(seed)
    base = mb2pages(base_mib)
    pts: list[tuple[float, int]] = [(0.0, base)]
    t = 0.0
    while True:
        t += rng.uniform(60, 180)
        hold = rng.uniform(10, 60)
        if t + 1 + hold + 2 >= duration_s:
            break
        peak = base + mb2pages(rng.randint(300, 900))
        pts += [(t, base), (t + 1, peak), (t + 1 + hold, peak), (t + 3 + hold, base)]
        t += 3 + hold
    pts.append((float(duration_s), base))
    return Trace("bursts", tuple(pts))


def standard_traces() -> tuple[Trace, ...]:
    return (steady_trace(), ramp_trace(), burst_trace())


# -- the model -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ZoneSpec:
    name: str
    start_pfn: int
    spanned: int
    high: int
    protection: tuple[int, ...]
    managed: int | None = None  # None: whatever totalram leaves after the other zones


@dataclass(frozen=True)
class GuestSpec:
    """A 2 GiB PV guest by default."""

    static_max_pages: int = mb2pages(2048)
    #: Pages the balloon counts but totalram never did (memmap, boot reservations).
    kernel_reserved_pages: int = 16619
    #: Memory in use that Committed_AS does not count (slab, drivers): 64 MiB.
    unaccounted_pages: int = mb2pages(64)
    balloon_rate_pages_per_s: int = mb2pages(128)
    balloon_min_pages: int = mb2pages(128)
    #: A shortfall of this much memory stalls the guest all of the time (PSI ``some`` 100 %).
    stall_ramp_pages: int = mb2pages(16)
    zones: tuple[ZoneSpec, ...] = (
        ZoneSpec("DMA", 1, 4095, 6, (0, 2973, 2973, 2973), managed=3976),
        ZoneSpec("DMA32", 4096, 520192, 1300, (0, 0, 0, 0)),
        ZoneSpec("Normal", 0, 0, 0, (0, 0, 0, 0), managed=0),
        ZoneSpec("Movable", 0, 0, 0, (0, 0, 0, 0), managed=0),
    )

    @property
    def totalreserve_pages(self) -> int:
        """What /proc/zoneinfo will add up to (the zones' managed are large enough)."""
        total = 0
        for zone in self.zones:
            reserve = zone.high + max(zone.protection, default=0)
            total += reserve if zone.managed is None else min(zone.managed, reserve)
        return total


class BalloonSim:
    """The balloon driver: current follows target at a bounded rate, never below a minimum."""

    def __init__(self, *, static_max_pages: int, min_pages: int, rate_pages_per_s: int) -> None:
        self.static_max_pages = static_max_pages
        self.min_pages = min_pages
        self.rate_pages_per_s = rate_pages_per_s
        self.current_pages = static_max_pages
        self.target_pages = static_max_pages

    def request(self, target_pages: int) -> None:
        """A new target (as written to ``target_kb``); kept as asked, even if unreachable."""
        self.target_pages = max(0, target_pages)

    def advance(self, seconds: float) -> None:
        goal = min(self.static_max_pages, max(self.min_pages, self.target_pages))
        step = int(self.rate_pages_per_s * seconds)
        if self.current_pages < goal:
            self.current_pages = min(goal, self.current_pages + step)
        elif self.current_pages > goal:
            self.current_pages = max(goal, self.current_pages - step)


@dataclass
class SimMetrics:
    """What the bench reports; seconds are simulated time."""

    duration_s: float = 0.0
    returned_page_s: float = 0.0  # integral of (static max - current)
    risk_s: float = 0.0  # target (totalram terms) below committed + totalreserve
    stall_s: float = 0.0  # PSI "some" seconds in the model
    #: target below the whole goal without frontswap (committed + totalreserve + reserved_mb):
    #: the stricter reading of "committed + reserve", counting the 10 % headroom too
    below_goal_s: float = 0.0
    reaction_lags_s: list[float] = field(default_factory=list)
    unanswered_rises: int = 0
    balloon_writes: int = 0

    @property
    def returned_avg_mib(self) -> float:
        if not self.duration_s:
            return 0.0
        return self.returned_page_s / self.duration_s / 256.0

    @property
    def mean_reaction_s(self) -> float | None:
        lags = self.reaction_lags_s
        return sum(lags) / len(lags) if lags else None

    @property
    def max_reaction_s(self) -> float | None:
        return max(self.reaction_lags_s) if self.reaction_lags_s else None


class GuestSim:
    """The model guest behind a fake root tree."""

    def __init__(
        self,
        trace: Trace,
        root: Path,
        *,
        spec: GuestSpec | None = None,
        balloon_driver: bool = True,
        step_ms: int = 100,
        rise_min_pages: int = mb2pages(64),
        reserved_mb: int = 0,
    ) -> None:
        self.trace = trace
        self.spec = spec or GuestSpec()
        self.roots = Roots(root=root)
        self.balloon_driver = balloon_driver
        self.step_ms = step_ms
        self.reserved_pages = mb2pages(reserved_mb)
        self.balloon = BalloonSim(
            static_max_pages=self.spec.static_max_pages,
            min_pages=self.spec.balloon_min_pages,
            rate_pages_per_s=self.spec.balloon_rate_pages_per_s,
        )
        self.time_ms = 0
        self.psi_some_us = 0.0
        self.psi_avg10 = 0.0
        self.metrics = SimMetrics()
        self._pending_rises = list(trace.rises(rise_min_pages))
        self._last_target_kb: int | None = None
        self._write_static_files()
        self.publish()

    # -- the model's quantities ------------------------------------------------------------------

    @property
    def time_s(self) -> float:
        return self.time_ms / 1000.0

    @property
    def finished(self) -> bool:
        return self.time_s >= self.trace.duration_s

    @property
    def committed_pages(self) -> int:
        return self.trace.committed_at(self.time_s)

    @property
    def totalram_pages(self) -> int:
        return self.balloon.current_pages - self.spec.kernel_reserved_pages

    @property
    def need_pages(self) -> int:
        return self.committed_pages + self.spec.unaccounted_pages

    @property
    def target_totalram_pages(self) -> int:
        return self.balloon.target_pages - self.spec.kernel_reserved_pages

    def stall_fraction(self) -> float:
        shortfall = self.need_pages - self.totalram_pages
        if shortfall <= 0:
            return 0.0
        return min(1.0, shortfall / self.spec.stall_ramp_pages)

    # -- time ------------------------------------------------------------------------------------

    def advance(self, seconds: float) -> None:
        """Pick up the loop's target, run the model for ``seconds``, publish the files."""
        self.pick_up_target()
        remaining = max(0, round(seconds * 1000))
        while remaining > 0:
            chunk = min(self.step_ms, remaining)
            self._step(chunk)
            remaining -= chunk
        self.publish()

    def _step(self, ms: int) -> None:
        h = ms / 1000.0
        self.time_ms += ms
        self.balloon.advance(h)
        m = self.metrics
        m.duration_s += h
        m.returned_page_s += (self.spec.static_max_pages - self.balloon.current_pages) * h
        committed = self.committed_pages
        reserve = self.spec.totalreserve_pages
        if self.target_totalram_pages < committed + reserve:
            m.risk_s += h
        if self.target_totalram_pages < committed + reserve + self.reserved_pages:
            m.below_goal_s += h
        fraction = self.stall_fraction()
        m.stall_s += fraction * h
        self.psi_some_us += fraction * h * 1e6
        decay = math.exp(-h / 10.0)
        self.psi_avg10 = self.psi_avg10 * decay + fraction * 100.0 * (1 - decay)
        while self._pending_rises and self.time_s >= self._pending_rises[0].end_s:
            rise = self._pending_rises[0]
            if self.target_totalram_pages >= rise.peak_pages + reserve:
                m.reaction_lags_s.append(max(0.0, self.time_s - rise.end_s))
                self._pending_rises.pop(0)
            elif self.committed_pages < rise.peak_pages - mb2pages(64):
                m.unanswered_rises += 1  # the load went away before the target caught up
                self._pending_rises.pop(0)
            else:
                break

    # -- the files -------------------------------------------------------------------------

    def _path(self, absolute: str) -> Path:
        path = self.roots.under(absolute)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def _write_static_files(self) -> None:
        self._path(XEN_CAPABILITIES).write_text("")
        if self.balloon_driver:
            target = balloon_target_path(self.roots)
            target.parent.mkdir(parents=True, exist_ok=True)
            self._last_target_kb = pages2kb(self.balloon.target_pages)
            target.write_text(f"{self._last_target_kb}\n")

    def pick_up_target(self) -> None:
        """Read ``target_kb`` as the balloon driver would after a write."""
        if not self.balloon_driver:
            return
        kb = parse_kb(balloon_target_path(self.roots).read_text(), "target_kb")
        if kb != self._last_target_kb:
            self.metrics.balloon_writes += 1
            self._last_target_kb = kb
        self.balloon.request(kb2pages(kb))

    def publish(self) -> None:
        totalram = self.totalram_pages
        committed = self.committed_pages
        free = max(0, totalram - self.need_pages)
        self._path(MEMINFO).write_text(
            f"MemTotal:       {pages2kb(totalram):>8} kB\n"
            f"MemFree:        {pages2kb(free):>8} kB\n"
            f"MemAvailable:   {pages2kb(free):>8} kB\n"
            f"Buffers:               0 kB\n"
            f"SwapTotal:             0 kB\n"
            f"CommitLimit:    {pages2kb(totalram // 2):>8} kB\n"
            f"Committed_AS:   {pages2kb(committed):>8} kB\n"
        )
        self._path(ZONEINFO).write_text(self.zoneinfo_text(totalram))
        some = int(self.psi_some_us)
        self._path(PSI_MEMORY).write_text(
            f"some avg10={self.psi_avg10:.2f} avg60=0.00 avg300=0.00 total={some}\n"
            f"full avg10=0.00 avg60=0.00 avg300=0.00 total={some // 2}\n"
        )
        if self.balloon_driver:
            current = balloon_current_path(self.roots)
            current.parent.mkdir(parents=True, exist_ok=True)
            current.write_text(f"{pages2kb(self.balloon.current_pages)}\n")

    def zoneinfo_text(self, totalram_pages: int) -> str:
        zones = self.spec.zones
        fixed = sum(z.managed for z in zones if z.managed is not None)
        out = []
        for zone in zones:
            managed = zone.managed if zone.managed is not None else max(0, totalram_pages - fixed)
            prot = ", ".join(str(p) for p in zone.protection)
            out.append(
                f"Node 0, zone {zone.name:>8}\n"
                f"  pages free     {managed // 2}\n"
                f"        boost    0\n"
                f"        min      {zone.high * 2 // 3}\n"
                f"        low      {zone.high * 5 // 6}\n"
                f"        high     {zone.high}\n"
                f"        spanned  {zone.spanned}\n"
                f"        present  {zone.spanned}\n"
                f"        managed  {managed}\n"
                f"        protection: ({prot})\n"
                f"  pagesets\n"
                f"    cpu: 0\n"
                f"              count: 0\n"
                f"              high:  0\n"
                f"              batch: 1\n"
                f"  node_unreclaimable:  0\n"
                f"  start_pfn:           {zone.start_pfn}\n"
            )
        return "".join(out)


@dataclass(frozen=True)
class ModelSample:
    """The model guest after one wait: what the loop cannot see, for a plot beside its record."""

    time_s: float
    committed_pages: int
    need_pages: int  # committed plus what Committed_AS does not count
    totalram_pages: int  # the balloon's current size, in totalram terms
    stall_fraction: float  # PSI ``some`` in the model: 0 (no stall) to 1 (always)


class SimClock(FakeClock):
    """A fake clock whose waits run the model; it stops the loop at the trace's end.

    With ``samples`` given, it appends a :class:`ModelSample` after every wait.
    """

    def __init__(self, guest: GuestSim, samples: list[ModelSample] | None = None) -> None:
        super().__init__(start=guest.time_s)
        self.guest = guest
        self.samples = samples

    def wait(self, stop: threading.Event, timeout: float) -> bool:
        if stop.is_set():
            return True
        self.waits.append(timeout)
        self.guest.advance(timeout)
        self.now = self.guest.time_s
        if self.samples is not None:
            g = self.guest
            self.samples.append(ModelSample(g.time_s, g.committed_pages, g.need_pages,
                                            g.totalram_pages, g.stall_fraction()))
        if self.guest.finished:
            stop.set()
        return stop.is_set()


# -- a whole replay --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplayResult:
    trace: str
    policy: str
    metrics: SimMetrics
    loop_counters: Mapping[str, int]
    #: With ``keep=True``: every tick record of the run and the model after every wait.
    history: tuple[TickRecord, ...] = ()
    samples: tuple[ModelSample, ...] = ()


def replay(
    trace: Trace,
    knob_values: Mapping[str, Any] | None = None,
    *,
    policy: str = "",
    spec: GuestSpec | None = None,
    root: Path | None = None,
    balloon_driver: bool = True,
    keep: bool = False,
) -> ReplayResult:
    """Run the real loop against the model for the whole trace; return what happened.

    ``keep`` also returns every tick record and a model sample per wait (for a plot).
    """
    if root is None:
        with tempfile.TemporaryDirectory(prefix="xentmem-sim-") as tmp:
            return replay(trace, knob_values, policy=policy, spec=spec, root=Path(tmp),
                          balloon_driver=balloon_driver, keep=keep)
    guest = GuestSim(trace, root, spec=spec, balloon_driver=balloon_driver)
    samples: list[ModelSample] | None = [] if keep else None
    clock = SimClock(guest, samples)
    totalram = read_meminfo(guest.roots).totalram_pages
    knobs = KnobStore(knob_values, auto_reserved_mb=auto_reserved_mb(totalram))
    guest.reserved_pages = mb2pages(knobs.snapshot().reserved_mb)
    history_len = DEFAULT_HISTORY
    if keep:  # room for a tick at every wait: the guard's polls are the shortest
        snap = knobs.snapshot()
        shortest_s = min(snap.selfballoon_interval, snap.pressure_guard_poll_ms / 1000.0)
        history_len = int(trace.duration_s / shortest_s) + 2
    loop = SelfballoonLoop(guest.roots, knobs, clock=clock, history_len=history_len)
    loop.run(threading.Event())
    return ReplayResult(
        trace=trace.name,
        policy=policy or ("guard" if knobs.snapshot().pressure_guard else "kernel"),
        metrics=guest.metrics,
        loop_counters=loop.counters(),
        history=loop.history() if keep else (),
        samples=tuple(samples or ()),
    )


def replay_all(
    traces: Sequence[Trace], policies: Mapping[str, Mapping[str, Any]]
) -> list[ReplayResult]:
    return [replay(t, values, policy=name) for t in traces for name, values in policies.items()]
