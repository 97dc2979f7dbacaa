"""The worker: read the guest, ask the policy, carry the decision out; every interval.

Both of the kernel's jobs in one tick, as ``selfballoon_process`` did, on an injected clock so
tests run hours of ticks at once.  A failed tick is logged and recorded, never fatal, and
writes nothing if its inputs failed.  The tick's shape: docs/selfballoon.md.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

from xentmem.clock import Clock
from xentmem.errors import XentmemError
from xentmem.roots import Roots
from xentmem_selfballoon.actuator import (
    ActuatorError,
    BalloonActuator,
    FrontswapControl,
    Publisher,
    ShrinkActuator,
)
from xentmem_selfballoon.guard import PressureVerdict, judge_pressure
from xentmem_selfballoon.inputs import InputError, read_pressure, read_tick_inputs
from xentmem_selfballoon.knobs import Knobs, KnobStore
from xentmem_selfballoon.policy import BalloonDecision, LoopState, pages2mb, plan_tick
from xentmem_selfballoon.shrink import ShrinkDecision, inertia_written

log = logging.getLogger(__name__)

KIND_TICK = "tick"
KIND_GUARD = "guard"
KIND_IDLE = "idle"

#: How many tick records ``history()`` keeps.
DEFAULT_HISTORY = 64
#: Clock slack when comparing "due" times (floating-point seconds).
_EPSILON = 1e-9


@dataclass(frozen=True)
class TickRecord:
    """What one tick saw, decided and did: the history ``xentmem balloon`` shows."""

    seq: int
    time: float
    kind: str
    balloon: BalloonDecision | None = None
    shrink: ShrinkDecision | None = None
    pressure: PressureVerdict | None = None
    target_kb: int | None = None  # balloon terms; None if no balloon step
    written: bool = False
    report_only: bool = False
    shrunk_pages: int | None = None
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "time": self.time,
            "kind": self.kind,
            "target_kb": self.target_kb,
            "written": self.written,
            "report_only": self.report_only,
            "balloon": self.balloon.as_dict() if self.balloon else None,
            "shrink": self.shrink.as_dict() if self.shrink else None,
            "pressure": self.pressure.as_dict() if self.pressure else None,
            "shrunk_pages": self.shrunk_pages,
            "error": self.error,
        }

    def summary(self) -> str:
        """The one log line of this tick."""
        if self.error is not None:
            return f"selfballoon {self.kind} #{self.seq}: failed: {self.error}"
        parts = [f"selfballoon {self.kind} #{self.seq}:"]
        d = self.balloon
        if d is not None:
            mode = "written" if self.written else "report-only"
            parts.append(
                f"committed={pages2mb(d.committed_pages)}MiB goal={pages2mb(d.goal_pages)}MiB "
                f"cur={pages2mb(d.cur_pages)}MiB floor={pages2mb(d.floor.pages)}MiB"
                f"({d.floor.rule}) target={pages2mb(d.target_pages)}MiB"
                f"{' guarded' if d.guarded else ''} -> target_kb={d.target_kb} ({mode})"
            )
        s = self.shrink
        if s is not None:
            what = f"shrink to {s.target_pages}" if s.target_pages is not None else s.reason
            parts.append(f"frontswap={s.curr_pages} pages: {what}")
        p = self.pressure
        if p is not None and p.known:
            parts.append(f"psi={p.stall_us_per_s:.0f}us/s{' STALL' if p.stalling else ''}")
        if d is None and s is None:
            parts.append("idle")
        return " ".join(parts)


class SelfballoonLoop:
    """The self-balloon and frontswap self-shrink worker for one guest."""

    def __init__(
        self,
        roots: Roots,
        knobs: KnobStore,
        *,
        clock: Clock,
        frontswap: FrontswapControl | None = None,
        publisher: Publisher | None = None,
        actuator: BalloonActuator | None = None,
        history_len: int = DEFAULT_HISTORY,
        logger: logging.Logger | None = None,
    ) -> None:
        self._roots = roots
        self._knobs = knobs
        self._clock = clock
        self._frontswap = frontswap
        self._log = logger or log
        self._actuator = actuator or BalloonActuator(roots, publisher=publisher, logger=self._log)
        self._shrinker = ShrinkActuator(frontswap) if frontswap is not None else None
        self._state = LoopState()
        self._inertia_writes_seen = knobs.snapshot().inertia_writes
        self._history: deque[TickRecord] = deque(maxlen=history_len)
        self._history_lock = threading.Lock()
        self._seq = 0
        self._psi_failing = False
        self.ticks = 0
        self.guard_ticks = 0
        self.errors = 0

    # -- what the daemon reads -------------------------------------------------------------------

    @property
    def knobs(self) -> KnobStore:
        return self._knobs

    @property
    def state(self) -> LoopState:
        return self._state

    @property
    def actuator(self) -> BalloonActuator:
        return self._actuator

    def history(self) -> tuple[TickRecord, ...]:
        """The last ticks, oldest first."""
        with self._history_lock:
            return tuple(self._history)

    def last(self) -> TickRecord | None:
        with self._history_lock:
            return self._history[-1] if self._history else None

    def counters(self) -> dict[str, int]:
        return {
            "ticks": self.ticks,
            "guard_ticks": self.guard_ticks,
            "errors": self.errors,
            "publish_errors": self._actuator.publish_errors,
            "target_drifts": self._actuator.drifts,
        }

    # -- running ---------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Tick every ``selfballoon_interval`` until ``stop`` is set (first tick after one)."""
        due = self._clock.monotonic() + self._knobs.snapshot().selfballoon_interval
        while True:
            knobs = self._knobs.snapshot()
            remaining = max(0.0, due - self._clock.monotonic())
            step = remaining
            if self._guard_polls(knobs):
                step = min(remaining, knobs.pressure_guard_poll_ms / 1000.0)
            if self._clock.wait(stop, step):
                return
            if self._clock.monotonic() >= due - _EPSILON:
                self.tick()
                due = self._clock.monotonic() + self._knobs.snapshot().selfballoon_interval
            else:
                self.poll_pressure()

    @staticmethod
    def _guard_polls(knobs: Knobs) -> bool:
        return knobs.pressure_guard and knobs.selfballooning

    def tick(self) -> TickRecord:
        """One regular tick; never raises for a failure of the guest's files or the write."""
        return self._guarded_run(KIND_TICK, None)

    def poll_pressure(self) -> TickRecord | None:
        """The guard's check between ticks: a guard tick if the guest stalls, else nothing."""
        knobs = self._knobs.snapshot()
        if not self._guard_polls(knobs):
            return None
        now = self._clock.monotonic()
        total = self._read_psi()
        pressure, verdict = judge_pressure(
            self._state.pressure,
            some_total_us=total,
            now=now,
            stall_us_per_s=knobs.pressure_guard_stall_us_per_s,
        )
        if not verdict.stalling:
            self._state = LoopState(shrink=self._state.shrink, pressure=pressure)
            return None
        return self._guarded_run(KIND_GUARD, total)

    # -- one tick ----------------------------------------------------------------------------------

    def _guarded_run(self, kind: str, psi_total: int | None) -> TickRecord:
        self._seq += 1
        seq = self._seq
        now = self._clock.monotonic()
        try:
            record = self._run_once(seq, now, kind, psi_total)
        except InputError as exc:
            record = self._failed(seq, now, kind, f"skipped, nothing written: {exc}")
        except (ActuatorError, XentmemError, OSError) as exc:
            record = self._failed(seq, now, kind, str(exc))
        except Exception as exc:  # keep the worker alive whatever happened, but say it loudly
            self._log.exception("selfballoon: unexpected error in %s #%d", kind, seq)
            record = self._failed(seq, now, kind, f"{type(exc).__name__}: {exc}", logged=True)
        else:
            if record.kind == KIND_IDLE:
                self._log.debug("%s", record.summary())
            else:
                self._log.info("%s", record.summary())
        with self._history_lock:
            self._history.append(record)
        return record

    def _failed(
        self, seq: int, now: float, kind: str, message: str, *, logged: bool = False
    ) -> TickRecord:
        self.errors += 1
        record = TickRecord(seq=seq, time=now, kind=kind, error=message)
        if not logged:
            self._log.error("%s", record.summary())
        return record

    def _run_once(self, seq: int, now: float, kind: str, psi_total: int | None) -> TickRecord:
        knobs = self._knobs.snapshot()
        if knobs.inertia_writes != self._inertia_writes_seen:
            # frontswap_inertia was written since the last tick (the same value included)
            self._inertia_writes_seen = knobs.inertia_writes
            shrink = inertia_written(self._state.shrink, knobs.frontswap_inertia)
            self._state = LoopState(shrink=shrink, pressure=self._state.pressure)
        guard_only = kind == KIND_GUARD
        if not (knobs.selfballooning or knobs.frontswap_selfshrinking):
            # Both switched off at run time: the kernel's worker would not even have run.
            self.ticks += 1
            return TickRecord(seq=seq, time=now, kind=KIND_IDLE)
        if knobs.pressure_guard and psi_total is None:
            psi_total = self._read_psi()
        frontswap_pages = 0
        if knobs.frontswap_selfshrinking and self._frontswap is not None:
            frontswap_pages = self._frontswap.curr_pages()
        inputs = read_tick_inputs(
            self._roots, frontswap_pages=frontswap_pages, now=now, psi_some_total_us=psi_total
        )
        plan = plan_tick(self._state, inputs, knobs, guard_only=guard_only)

        target_kb: int | None = None
        written = False
        report_only = False
        if plan.balloon is not None:
            applied = self._actuator.apply(plan.balloon)
            target_kb, written = applied.target_kb, applied.written
            report_only = not written
        shrunk: int | None = None
        if plan.shrink is not None and self._shrinker is not None:
            shrunk = self._shrinker.apply(plan.shrink)
        self._state = plan.state
        if guard_only:
            self.guard_ticks += 1
        else:
            self.ticks += 1
        return TickRecord(
            seq=seq,
            time=now,
            kind=kind,
            balloon=plan.balloon,
            shrink=plan.shrink,
            pressure=plan.pressure,
            target_kb=target_kb,
            written=written,
            report_only=report_only,
            shrunk_pages=shrunk,
        )

    def _read_psi(self) -> int | None:
        """PSI's ``some`` total, or ``None`` (logged once per failure streak): the guard then
        stands aside and the kernel policy runs unchanged."""
        try:
            total = read_pressure(self._roots).some_total_us
        except InputError as exc:
            if not self._psi_failing:
                self._log.warning("selfballoon: pressure guard inactive, PSI unreadable: %s", exc)
                self._psi_failing = True
            return None
        if self._psi_failing:
            self._log.info("selfballoon: PSI readable again, pressure guard active")
            self._psi_failing = False
        return total
