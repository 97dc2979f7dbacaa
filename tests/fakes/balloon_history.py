"""A daemon's ``balloon`` answers for the CLI's record and plot tests, without a daemon.

The records are real: the simulator runs the real loop over a short trace (a climb the
kernel policy answers late, so the guard acts).  :class:`FakeBalloonDaemon` answers the
``balloon`` op as ``xentmemd`` does, showing only the records made by the time its clock
says, and keeping only the last ``keep`` of them, as the loop's history does.
"""

from __future__ import annotations

import functools
from typing import Any

from xentmem.clock import FakeClock
from xentmem_selfballoon.policy import mb2pages
from xentmem_selfballoon.simulate import Trace, replay

KNOBS = {"selfballooning": "1", "selfballoon_interval": "5",
         "selfballoon_downhysteresis": "8", "selfballoon_uphysteresis": "1",
         "selfballoon_min_usable_mb": "auto", "selfballoon_reserved_mb": "auto (204)",
         "frontswap_selfshrinking": "1", "frontswap_hysteresis": "20",
         "frontswap_inertia": "3", "pressure_guard": "1",
         "pressure_guard_stall_us_per_s": "10000", "pressure_guard_poll_ms": "1000"}


def short_trace() -> Trace:
    mb = mb2pages
    return Trace("short", ((0.0, mb(400)), (120.0, mb(400)), (122.0, mb(1300)),
                           (170.0, mb(1300)), (190.0, mb(500)), (240.0, mb(500))))


@functools.cache
def simulated_records(guard: bool = True) -> tuple[dict[str, Any], ...]:
    """Every tick record of the short trace (guard on: ticks and guard ticks), as dicts."""
    knobs = {"pressure_guard": "1" if guard else "0"}
    result = replay(short_trace(), knobs, keep=True)
    records = tuple(r.as_dict() for r in result.history)
    assert records, "the simulation made no decision"
    return records


class FakeBalloonDaemon:
    """A client whose ``call("balloon")`` answers like xentmemd's, on a fake clock."""

    def __init__(self, clock: FakeClock, records: tuple[dict[str, Any], ...] | None = None,
                 *, keep: int = 64, offset: float = 1000.0) -> None:
        self.clock = clock
        #: Records appear at their time + ``offset`` on the clock (a daemon up for a while).
        self.records = [dict(r, time=r["time"] + offset)
                        for r in (records if records is not None else simulated_records())]
        self.keep = keep
        self.knobs = dict(KNOBS)
        self.calls = 0
        self.closed = False

    def visible(self) -> list[dict[str, Any]]:
        made = [r for r in self.records if r["time"] <= self.clock.monotonic()]
        return made[-self.keep:]

    def call(self, op: str, **args: Any) -> Any:
        assert op == "balloon", op
        self.calls += 1
        # A recorder asked for more than was ever made polls forever: fail instead of hang.
        assert self.clock.monotonic() < self.records[-1]["time"] + 3600, "polled past the end"
        history = self.visible()
        limit = args.get("limit", 20)
        return {"available": True, "running": True, "jobs": ["selfballoon"],
                "not_running_because": None, "report_only": True, "knobs": dict(self.knobs),
                "last": history[-1] if history else None, "counters": {}, "figures": {},
                "history": history[-limit:] if limit else []}

    def close(self) -> None:
        self.closed = True
