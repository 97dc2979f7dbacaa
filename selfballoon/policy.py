"""The self-ballooning policy of ``drivers/xen/xen-selfballoon.c``, as pure functions.

Numbers in, a :class:`BalloonDecision` out.  Nothing here reads a file, looks at the clock or
talks to xenstore, so every branch can be pinned with a table of hand-worked numbers (and a test
checks that this module imports no I/O).  :func:`plan_tick` puts one worker tick together the
way ``selfballoon_process()`` does: the balloon step when ``selfballooning`` is on, then the
frontswap self-shrink step (:mod:`.shrink`) when ``frontswap_selfshrinking`` is on, with the
optional pressure guard (:mod:`.guard`) laid over both.

Units: pages of 4 KiB (Xen x86 only has those), ``MB2PAGES(mb) = mb << 8`` and
``PAGES2MB(p) = p >> 8`` as in the kernel; every division truncates like C's unsigned division.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from xentmem.tmem.abi import PAGE_SIZE  # the ABI module does no I/O
from xentmem_selfballoon.guard import PressureState, PressureVerdict, guarded_target, judge_pressure
from xentmem_selfballoon.shrink import ShrinkDecision, ShrinkState, next_shrink

if TYPE_CHECKING:  # only for annotations: the snapshot type lives with the param declarations
    from xentmem_selfballoon.knobs import Knobs

PAGE_KB = PAGE_SIZE // 1024
_MB_SHIFT = 20 - 12  # 20 - PAGE_SHIFT

FLOOR_MIN_USABLE = "min_usable_mb"
FLOOR_NOT_WORTH = "not_worth_ballooning"  # useful < 16 MiB: the floor is all of max_pfn
FLOOR_UNDER_64MB = "under_64mb"  # 16 MiB + 1/2 of the rest
FLOOR_UNDER_512MB = "under_512mb"  # 40 MiB + 1/8 of the rest
FLOOR_LARGE = "large"  # 99 MiB + 1/32 of the rest ("ending in ~3% slope")


def mb2pages(mb: int) -> int:
    """``MB2PAGES``: MiB to 4 KiB pages."""
    return mb << _MB_SHIFT


def pages2mb(pages: int) -> int:
    """``PAGES2MB``: 4 KiB pages to whole MiB, truncated."""
    return pages >> _MB_SHIFT


def kb2pages(kb: int) -> int:
    """KiB (as /proc/meminfo and the balloon's sysfs show them) to whole pages."""
    return kb // PAGE_KB


def pages2kb(pages: int) -> int:
    return pages * PAGE_KB


def auto_reserved_mb(totalram_pages: int) -> int:
    """``selfballoon_reserved_mb`` when left at 0: ``PAGES2MB(totalram_pages / 10)``.

    Computed once, at the first start, as ``xen_selfballoon_init`` does (bc1b0df59e3f, "deaggressive
    selfballoon driver": room for slab and for a balloon that gives memory back slowly).
    """
    return pages2mb(totalram_pages // 10)


def selfballoon_goal(
    *,
    committed_pages: int,
    totalreserve_pages: int,
    reserved_mb: int,
    frontswap_pages: int = 0,
) -> int:
    """The memory the guest should have: ``Committed_AS + totalreserve + MB2PAGES(reserved)``.

    ``frontswap_pages`` is added only while self-shrinking is on (the caller decides), to leave
    room for the swap pages that shrinking will bring back into RAM.
    """
    return committed_pages + totalreserve_pages + mb2pages(reserved_mb) + frontswap_pages


def hysteresis_target(
    cur_pages: int, goal_pages: int, *, downhysteresis: int, uphysteresis: int
) -> int:
    """One step from ``cur`` toward ``goal``: 1/down of the gap when shrinking, 1/up growing.

    Equal means no change.  With the default ``uphysteresis`` of 1 a rise jumps straight to the
    goal; with ``downhysteresis`` 8 the balloon gives back 1/8 of the excess per tick.
    """
    if downhysteresis < 1 or uphysteresis < 1:
        raise ValueError("hysteresis divisors must be >= 1")
    if cur_pages > goal_pages:
        return cur_pages - (cur_pages - goal_pages) // downhysteresis
    if cur_pages < goal_pages:
        return cur_pages + (goal_pages - cur_pages) // uphysteresis
    return cur_pages


@dataclass(frozen=True)
class Floor:
    """The lowest target the policy allows, and which rule produced it."""

    pages: int
    rule: str


def selfballoon_floor(
    *, max_pfn: int, totalreserve_pages: int, min_usable_mb: int | None
) -> Floor:
    """The kernel's floor: ``totalreserve + min_usable_mb`` if set, else the piecewise rule.

    ``min_usable_mb`` of ``None`` (the kernel's 0, our ``auto``) selects the piecewise linear
    function of the useful memory (``max_pfn - totalreserve``).  The function is not continuous
    (at 512 MiB it jumps from ~99 to ~112 MiB); that is the kernel's, kept as is.
    """
    if min_usable_mb:
        return Floor(totalreserve_pages + mb2pages(min_usable_mb), FLOOR_MIN_USABLE)
    # In C ``max_pfn - totalreserve`` is unsigned; a reserve above max_pfn cannot occur.
    useful = max(0, max_pfn - totalreserve_pages)
    if useful < mb2pages(16):
        return Floor(max_pfn, FLOOR_NOT_WORTH)
    if useful < mb2pages(64):
        pages = totalreserve_pages + mb2pages(16) + ((useful - mb2pages(16)) >> 1)
        return Floor(pages, FLOOR_UNDER_64MB)
    if useful < mb2pages(512):
        pages = totalreserve_pages + mb2pages(40) + ((useful - mb2pages(40)) >> 3)
        return Floor(pages, FLOOR_UNDER_512MB)
    pages = totalreserve_pages + mb2pages(99) + ((useful - mb2pages(99)) >> 5)
    return Floor(pages, FLOOR_LARGE)


def balloon_terms(target_pages: int, *, balloon_current_pages: int, totalram_pages: int) -> int:
    """Convert a target in ``totalram`` terms to the balloon driver's ``current_pages`` terms.

    ``balloon_set_new_target(tgt + balloon_stats.current_pages - totalram_pages)`` (3b87e1b8dbc6):
    the balloon counts pages the kernel never put in totalram (the memmap, boot reservations),
    so the offset between the two is carried over.
    """
    return target_pages + balloon_current_pages - totalram_pages


@dataclass(frozen=True)
class BalloonInputs:
    """What one balloon step needs, all in pages."""

    committed_pages: int
    totalram_pages: int
    totalreserve_pages: int
    max_pfn: int
    #: ``balloon_stats.current_pages``; ``None`` without a balloon driver (report-only mode),
    #: where the target is reported in totalram terms.
    balloon_current_pages: int | None
    frontswap_pages: int = 0


@dataclass(frozen=True)
class BalloonDecision:
    """Everything one balloon step worked out; the actuator turns it into a ``target_kb``."""

    goal_pages: int
    stepped_pages: int  # after hysteresis (or the guard), before the floor
    floor: Floor
    target_pages: int  # totalram terms, floored
    balloon_target_pages: int  # balloon terms: what target_kb is set to
    cur_pages: int
    committed_pages: int
    frontswap_pages: int
    reserved_mb: int
    guarded: bool = False  # the pressure guard overrode the hysteresis step

    @property
    def target_kb(self) -> int:
        return pages2kb(self.balloon_target_pages)

    @property
    def goal_kb(self) -> int:
        return pages2kb(self.goal_pages)

    def as_dict(self) -> dict[str, object]:
        return {
            "cur_pages": self.cur_pages,
            "committed_pages": self.committed_pages,
            "frontswap_pages": self.frontswap_pages,
            "reserved_mb": self.reserved_mb,
            "goal_pages": self.goal_pages,
            "stepped_pages": self.stepped_pages,
            "floor_pages": self.floor.pages,
            "floor_rule": self.floor.rule,
            "target_pages": self.target_pages,
            "balloon_target_pages": self.balloon_target_pages,
            "target_kb": self.target_kb,
            "guarded": self.guarded,
        }


def next_target(
    inputs: BalloonInputs,
    *,
    downhysteresis: int,
    uphysteresis: int,
    min_usable_mb: int | None,
    reserved_mb: int,
    include_frontswap: bool,
    stalling: bool = False,
) -> BalloonDecision:
    """One ``selfballoon_process`` balloon step.

    ``stalling`` (the pressure guard saw the guest stall on memory) replaces the hysteresis
    step by :func:`~xentmem_selfballoon.guard.guarded_target`: never below the current size,
    and at least the goal at once.  The floor applies either way.
    """
    frontswap_pages = inputs.frontswap_pages if include_frontswap else 0
    goal = selfballoon_goal(
        committed_pages=inputs.committed_pages,
        totalreserve_pages=inputs.totalreserve_pages,
        reserved_mb=reserved_mb,
        frontswap_pages=frontswap_pages,
    )
    cur = inputs.totalram_pages
    if stalling:
        stepped = guarded_target(cur, goal)
    else:
        stepped = hysteresis_target(
            cur, goal, downhysteresis=downhysteresis, uphysteresis=uphysteresis
        )
    floor = selfballoon_floor(
        max_pfn=inputs.max_pfn,
        totalreserve_pages=inputs.totalreserve_pages,
        min_usable_mb=min_usable_mb,
    )
    target = max(stepped, floor.pages)
    current = inputs.balloon_current_pages
    balloon_target = balloon_terms(
        target,
        balloon_current_pages=cur if current is None else current,
        totalram_pages=cur,
    )
    return BalloonDecision(
        goal_pages=goal,
        stepped_pages=stepped,
        floor=floor,
        target_pages=target,
        balloon_target_pages=balloon_target,
        cur_pages=cur,
        committed_pages=inputs.committed_pages,
        frontswap_pages=frontswap_pages,
        reserved_mb=reserved_mb,
        guarded=stalling,
    )


# -- one worker tick --------------------------------------------------------------------------


@dataclass(frozen=True)
class LoopState:
    """What the loop carries from tick to tick (the kernel's function-local statics)."""

    shrink: ShrinkState = field(default_factory=ShrinkState)
    pressure: PressureState = field(default_factory=PressureState)


@dataclass(frozen=True)
class TickInputs:
    """One reading of the guest, taken at ``now`` (seconds, monotonic)."""

    balloon: BalloonInputs
    now: float
    #: PSI ``some`` total (µs) from /proc/pressure/memory; ``None`` if not read or unreadable.
    psi_some_total_us: int | None = None


@dataclass(frozen=True)
class TickPlan:
    """The decisions of one tick and the state to carry on; nothing has been done yet."""

    state: LoopState
    balloon: BalloonDecision | None
    shrink: ShrinkDecision | None
    pressure: PressureVerdict | None


def plan_tick(
    state: LoopState, inputs: TickInputs, knobs: Knobs, *, guard_only: bool = False
) -> TickPlan:
    """Decide one tick as ``selfballoon_process`` would, plus the optional pressure guard.

    ``guard_only`` is the guard's extra tick between regular ones: it may only grow the balloon
    (when the guest stalls) and leaves the frontswap counters alone, so the kernel's tick-based
    inertia is unaffected.
    """
    verdict: PressureVerdict | None = None
    pressure = state.pressure
    if knobs.pressure_guard:
        pressure, verdict = judge_pressure(
            state.pressure,
            some_total_us=inputs.psi_some_total_us,
            now=inputs.now,
            stall_us_per_s=knobs.pressure_guard_stall_us_per_s,
        )
    stalling = verdict is not None and verdict.stalling

    balloon: BalloonDecision | None = None
    if knobs.selfballooning and (stalling or not guard_only):
        balloon = next_target(
            inputs.balloon,
            downhysteresis=knobs.selfballoon_downhysteresis,
            uphysteresis=knobs.selfballoon_uphysteresis,
            min_usable_mb=knobs.selfballoon_min_usable_mb,
            reserved_mb=knobs.reserved_mb,
            include_frontswap=knobs.frontswap_selfshrinking,
            stalling=stalling,
        )

    shrink: ShrinkDecision | None = None
    shrink_state = state.shrink
    if knobs.frontswap_selfshrinking and not guard_only:
        if stalling:
            # Bringing swap pages back into RAM while the guest already stalls on memory
            # makes it worse: hold the shrink step and its counters until the stall is over.
            shrink = ShrinkDecision(state=shrink_state, target_pages=None, reason="pressure")
        else:
            shrink = next_shrink(
                shrink_state,
                inputs.balloon.frontswap_pages,
                hysteresis=knobs.frontswap_hysteresis,
                inertia=knobs.frontswap_inertia,
            )
            shrink_state = shrink.state

    return TickPlan(
        state=replace(state, shrink=shrink_state, pressure=pressure),
        balloon=balloon,
        shrink=shrink,
        pressure=verdict,
    )
