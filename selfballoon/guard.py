"""The pressure guard: beyond the kernel, off by default.

While PSI shows the guest stalling on memory, the balloon never shrinks and grows at once to
the goal, and the self-shrink step is held.  Pure functions; the loop does the reading.
Why and how "stalling" is measured: docs/selfballoon.md.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PressureState:
    """The last PSI reading, to take the next one's difference against."""

    last_total_us: int | None = None
    last_time: float | None = None


@dataclass(frozen=True)
class PressureVerdict:
    """Whether the guest stalled on memory since the previous reading, and how much."""

    stalling: bool
    stall_us_per_s: float
    known: bool  # False: no usable reading (first one, PSI missing, counter went back)

    def as_dict(self) -> dict[str, object]:
        return {
            "stalling": self.stalling,
            "stall_us_per_s": round(self.stall_us_per_s, 1),
            "known": self.known,
        }


UNKNOWN = PressureVerdict(stalling=False, stall_us_per_s=0.0, known=False)


def judge_pressure(
    state: PressureState, *, some_total_us: int | None, now: float, stall_us_per_s: int
) -> tuple[PressureState, PressureVerdict]:
    """Compare a PSI ``some total`` reading with the previous one.

    No reading keeps the old baseline and is not a stall (the guard then does nothing and the
    kernel policy runs unchanged).  A first reading, a counter that went backwards or no time
    passed only sets a new baseline.
    """
    if some_total_us is None:
        return state, UNKNOWN
    fresh = PressureState(last_total_us=some_total_us, last_time=now)
    if state.last_total_us is None or state.last_time is None:
        return fresh, UNKNOWN
    elapsed = now - state.last_time
    delta = some_total_us - state.last_total_us
    if elapsed <= 0 or delta < 0:
        return fresh, UNKNOWN
    rate = delta / elapsed
    return fresh, PressureVerdict(stalling=rate > stall_us_per_s, stall_us_per_s=rate, known=True)


def guarded_target(cur_pages: int, goal_pages: int) -> int:
    """The step while stalling: no shrinking, and straight to the goal if below it."""
    return max(cur_pages, goal_pages)
