"""``frontswap_selfshrink()``: bring swap pages back from tmem, slowly, once the swap is calm.

Pure: the kernel's function-local statics (``cur_frontswap_pages`` and the inertia counter)
are a :class:`ShrinkState` passed in and returned, never mutated.  It follows the later
kernel, which resets the counter after each shrink, and whose ``frontswap_inertia`` store
sets the counter on every write (:func:`inertia_written`; docs/selfballoon.md).
"""

from __future__ import annotations

from dataclasses import dataclass

REASON_EMPTY = "empty"  # nothing in frontswap: reset the counter
REASON_GROWING = "growing"  # more than last tick: reset the counter
REASON_INERTIA = "inertia"  # calm, but not for long enough yet
REASON_SHRINK = "shrink"  # calm for ``inertia`` ticks: shrink by 1/hysteresis


@dataclass(frozen=True)
class ShrinkState:
    """The kernel's statics: pages seen last tick and the countdown to the next shrink."""

    cur_pages: int = 0
    inertia_counter: int = 0


@dataclass(frozen=True)
class ShrinkDecision:
    """What one step decided: ``target_pages`` to pass to ``frontswap_shrink``, or ``None``."""

    state: ShrinkState
    target_pages: int | None
    reason: str
    curr_pages: int = 0

    def as_dict(self) -> dict[str, object]:
        return {
            "curr_pages": self.curr_pages,
            "target_pages": self.target_pages,
            "reason": self.reason,
            "inertia_counter": self.state.inertia_counter,
        }


def shrink_target(cur_pages: int, hysteresis: int) -> int:
    """The next frontswap size: 1/hysteresis less, or 0 once at most ``hysteresis`` pages."""
    if hysteresis < 1:
        raise ValueError("frontswap_hysteresis must be >= 1")
    if cur_pages <= hysteresis:
        return 0
    return cur_pages - cur_pages // hysteresis


def inertia_written(state: ShrinkState, inertia: int) -> ShrinkState:
    """``store_frontswap_inertia()``: ``frontswap_inertia_counter = val`` on every write of
    the knob, the same value written again included."""
    return ShrinkState(cur_pages=state.cur_pages, inertia_counter=inertia)


def next_shrink(
    state: ShrinkState, curr_pages: int, *, hysteresis: int, inertia: int
) -> ShrinkDecision:
    """One ``frontswap_selfshrink()`` step given ``frontswap_curr_pages()`` now."""
    if inertia < 1:
        raise ValueError("frontswap_inertia must be >= 1")
    counter = state.inertia_counter
    last = state.cur_pages
    if curr_pages == 0 or curr_pages > last:
        reason = REASON_EMPTY if curr_pages == 0 else REASON_GROWING
        new = ShrinkState(cur_pages=curr_pages, inertia_counter=inertia)
        return ShrinkDecision(new, None, reason, curr_pages)
    if counter:
        counter -= 1
        if counter:
            new = ShrinkState(curr_pages, counter)
            return ShrinkDecision(new, None, REASON_INERTIA, curr_pages)
    target = shrink_target(curr_pages, hysteresis)
    new = ShrinkState(cur_pages=curr_pages, inertia_counter=inertia)
    return ShrinkDecision(new, target, REASON_SHRINK, curr_pages)
