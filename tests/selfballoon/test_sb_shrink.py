"""frontswap_selfshrink(): hysteresis and inertia, step by step, by hand from [L-SB-FINAL]."""

from __future__ import annotations

import pytest

from xentmem_selfballoon.shrink import (
    REASON_EMPTY,
    REASON_GROWING,
    REASON_INERTIA,
    REASON_SHRINK,
    ShrinkState,
    inertia_written,
    next_shrink,
    shrink_target,
)


@pytest.mark.parametrize(
    ("cur", "hysteresis", "target"),
    [
        (1000, 20, 950),  # 1000 - 1000 // 20
        (950, 20, 903),  # 950 - 47
        (21, 20, 20),  # 21 - 1
        (20, 20, 0),  # at most `hysteresis` pages: all of it
        (5, 20, 0),
        (39, 20, 38),  # 39 - 1
        (100, 1, 0),  # hysteresis 1: 100 - 100
    ],
)
def test_shrink_target(cur: int, hysteresis: int, target: int) -> None:
    assert shrink_target(cur, hysteresis) == target


def run(pages: list[int], *, inertia: int = 3, hysteresis: int = 20,
        state: ShrinkState | None = None) -> list[tuple[str, int | None, int]]:
    """Feed a sequence of curr_pages; return (reason, target, counter) per tick."""
    state = state or ShrinkState()
    out = []
    for p in pages:
        d = next_shrink(state, p, hysteresis=hysteresis, inertia=inertia)
        state = d.state
        out.append((d.reason, d.target_pages, state.inertia_counter))
    return out


def test_empty_then_growth_resets_the_counter_and_calm_ticks_count_down() -> None:
    # statics start at 0: cur 0 -> "empty"; 1000 > 0 -> "growing" (counter = 3);
    # then three calm ticks: 3 -> 2 (wait), 2 -> 1 (wait), 1 -> 0 (shrink, counter = 3 again)
    assert run([0, 1000, 1000, 1000, 1000]) == [
        (REASON_EMPTY, None, 3),
        (REASON_GROWING, None, 3),
        (REASON_INERTIA, None, 2),
        (REASON_INERTIA, None, 1),
        (REASON_SHRINK, 950, 3),
    ]


def test_after_a_shrink_the_next_one_waits_inertia_ticks_again() -> None:
    # The later kernel resets the counter after each shrink: a shrink every third calm tick.
    seq = run([1000, 1000, 1000, 1000, 950, 950, 950])
    assert [r[0] for r in seq] == [REASON_GROWING, REASON_INERTIA, REASON_INERTIA,
                                   REASON_SHRINK, REASON_INERTIA, REASON_INERTIA, REASON_SHRINK]
    assert seq[-1][1] == 903


def test_first_calm_tick_with_counter_zero_shrinks_at_once() -> None:
    # counter starts at 0 (not inertia): a first reading that is not growing (last = 0 means
    # cur > last always, so seed a state that has seen pages) shrinks without waiting
    state = ShrinkState(cur_pages=500, inertia_counter=0)
    assert run([500], state=state) == [(REASON_SHRINK, 475, 3)]


def test_growth_in_the_middle_restarts_the_countdown() -> None:
    seq = run([1000, 1000, 1001, 1001, 1001, 1001])
    assert [r[0] for r in seq] == [REASON_GROWING, REASON_INERTIA, REASON_GROWING,
                                   REASON_INERTIA, REASON_INERTIA, REASON_SHRINK]
    assert seq[-1][1] == 1001 - 50


def test_shrinking_by_itself_is_not_growth() -> None:
    # pages dropping (swapins, or our own shrink) keep counting down
    seq = run([1000, 990, 980, 970])
    assert [r[0] for r in seq] == [REASON_GROWING, REASON_INERTIA, REASON_INERTIA, REASON_SHRINK]
    assert seq[-1][1] == 970 - 48


def test_writing_inertia_restarts_the_countdown_at_the_value_written() -> None:
    # store_frontswap_inertia sets the counter to the value written (changed or not): with
    # inertia 1 the very next calm tick shrinks (1 -> 0), and so does every following one
    state = next_shrink(ShrinkState(), 1000, hysteresis=20, inertia=3).state  # growing, 3
    state = next_shrink(state, 1000, hysteresis=20, inertia=3).state  # 2
    state = inertia_written(state, 1)
    d = next_shrink(state, 1000, hysteresis=20, inertia=1)
    assert (d.reason, d.target_pages, d.state.inertia_counter) == (REASON_SHRINK, 950, 1)
    d = next_shrink(d.state, 950, hysteresis=20, inertia=1)
    assert (d.reason, d.target_pages) == (REASON_SHRINK, 903)
    # raising it again: counter = 5, and 5 -> 4 is a wait
    d = next_shrink(inertia_written(d.state, 5), 903, hysteresis=20, inertia=5)
    assert (d.reason, d.state.inertia_counter) == (REASON_INERTIA, 4)
    # the same value written again: 5 again, not 3
    d = next_shrink(inertia_written(d.state, 5), 903, hysteresis=20, inertia=5)
    assert (d.reason, d.state.inertia_counter) == (REASON_INERTIA, 4)


def test_state_is_returned_not_mutated() -> None:
    state = ShrinkState(cur_pages=10, inertia_counter=2)
    next_shrink(state, 10, hysteresis=20, inertia=3)
    inertia_written(state, 5)
    assert state == ShrinkState(cur_pages=10, inertia_counter=2)


def test_refuses_zero_knobs() -> None:
    with pytest.raises(ValueError):
        next_shrink(ShrinkState(), 1, hysteresis=20, inertia=0)
    with pytest.raises(ValueError):
        shrink_target(1, 0)
