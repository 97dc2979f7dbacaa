"""The pressure guard's verdicts and one whole tick's plan (pure)."""

from __future__ import annotations

from dataclasses import replace

from xentmem_selfballoon.guard import PressureState, judge_pressure
from xentmem_selfballoon.knobs import Knobs
from xentmem_selfballoon.policy import BalloonInputs, LoopState, TickInputs, plan_tick
from xentmem_selfballoon.shrink import ShrinkState


def test_first_reading_only_sets_the_baseline() -> None:
    state, verdict = judge_pressure(PressureState(), some_total_us=5_000_000, now=10.0,
                                    stall_us_per_s=10000)
    assert state == PressureState(5_000_000, 10.0)
    assert not verdict.known and not verdict.stalling


def test_stall_rate_above_the_threshold_is_stalling() -> None:
    base = PressureState(1_000_000, 10.0)
    # 30000 us over 2 s = 15000 us/s > 10000
    _, v = judge_pressure(base, some_total_us=1_030_000, now=12.0, stall_us_per_s=10000)
    assert v.known and v.stalling and v.stall_us_per_s == 15000
    # 20000 us over 2 s = 10000 us/s: not above
    _, v = judge_pressure(base, some_total_us=1_020_000, now=12.0, stall_us_per_s=10000)
    assert v.known and not v.stalling


def test_missing_reading_keeps_the_baseline_and_is_not_a_stall() -> None:
    base = PressureState(1_000_000, 10.0)
    state, v = judge_pressure(base, some_total_us=None, now=12.0, stall_us_per_s=1)
    assert state == base and not v.known and not v.stalling


def test_counter_going_back_or_no_time_is_a_new_baseline() -> None:
    base = PressureState(1_000_000, 10.0)
    state, v = judge_pressure(base, some_total_us=5, now=12.0, stall_us_per_s=1)
    assert state == PressureState(5, 12.0) and not v.known
    state, v = judge_pressure(base, some_total_us=2_000_000, now=10.0, stall_us_per_s=1)
    assert not v.known


BALLOON = BalloonInputs(committed_pages=262144, totalram_pages=507669, totalreserve_pages=4400,
                        max_pfn=524288, balloon_current_pages=524288, frontswap_pages=1000)
KNOBS = Knobs(auto_reserved_mb=198)


def test_plan_tick_kernel_defaults_does_both_jobs() -> None:
    plan = plan_tick(LoopState(), TickInputs(balloon=BALLOON, now=5.0), KNOBS)
    assert plan.balloon is not None
    # goal includes the 1000 frontswap pages while self-shrinking: 317232 + 1000
    assert plan.balloon.goal_pages == 318232
    # 507669 - (507669 - 318232) // 8 = 507669 - 23679
    assert plan.balloon.target_pages == 483990
    assert plan.shrink is not None and plan.shrink.reason == "growing"
    assert plan.state.shrink == ShrinkState(cur_pages=1000, inertia_counter=3)
    assert plan.pressure is None  # guard off: PSI not even looked at


def test_plan_tick_switches() -> None:
    off = replace(KNOBS, selfballooning=False)
    plan = plan_tick(LoopState(), TickInputs(balloon=BALLOON, now=5.0), off)
    assert plan.balloon is None and plan.shrink is not None
    off = replace(KNOBS, frontswap_selfshrinking=False)
    plan = plan_tick(LoopState(), TickInputs(balloon=BALLOON, now=5.0), off)
    assert plan.shrink is None
    assert plan.balloon is not None and plan.balloon.goal_pages == 317232  # no frontswap term


def test_guard_stall_holds_shrinking_and_grows_at_once() -> None:
    knobs = replace(KNOBS, pressure_guard=True, selfballoon_uphysteresis=4)
    state = LoopState(shrink=ShrinkState(1000, 1), pressure=PressureState(0, 0.0))
    # 1 s later, 500000 us of stall: 50 % of the time
    busy = replace(BALLOON, committed_pages=480000)
    plan = plan_tick(state, TickInputs(balloon=busy, now=1.0, psi_some_total_us=500_000), knobs)
    assert plan.pressure is not None and plan.pressure.stalling
    assert plan.balloon is not None and plan.balloon.guarded
    # goal = 480000 + 4400 + 50688 + 1000 = 536088 > cur: straight there despite uphys 4
    assert plan.balloon.target_pages == 536088
    assert plan.shrink is not None and plan.shrink.reason == "pressure"
    assert plan.shrink.target_pages is None
    assert plan.state.shrink == state.shrink  # counters held, not counted down
    assert plan.state.pressure == PressureState(500_000, 1.0)


def test_guard_only_tick_without_stall_does_nothing_and_never_touches_frontswap() -> None:
    knobs = replace(KNOBS, pressure_guard=True)
    state = LoopState(shrink=ShrinkState(1000, 1), pressure=PressureState(0, 0.0))
    plan = plan_tick(state, TickInputs(balloon=BALLOON, now=1.0, psi_some_total_us=10),
                     knobs, guard_only=True)
    assert plan.balloon is None and plan.shrink is None
    assert plan.state.shrink == state.shrink


def test_guard_on_without_psi_is_the_kernel_policy() -> None:
    knobs = replace(KNOBS, pressure_guard=True)
    with_guard = plan_tick(LoopState(), TickInputs(balloon=BALLOON, now=1.0), knobs)
    kernel = plan_tick(LoopState(), TickInputs(balloon=BALLOON, now=1.0), KNOBS)
    assert with_guard.balloon == kernel.balloon
    assert with_guard.shrink == kernel.shrink
