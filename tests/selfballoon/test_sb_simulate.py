"""The simulator: balloon, guest model, files the real parsers accept, whole replays."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from xentmem_selfballoon.inputs import balloon_target_path, read_guest, read_pressure
from xentmem_selfballoon.policy import mb2pages
from xentmem_selfballoon.simulate import (
    BalloonSim,
    GuestSim,
    GuestSpec,
    Rise,
    SimClock,
    Trace,
    burst_trace,
    ramp_trace,
    replay,
    steady_trace,
)


def test_balloon_moves_at_a_bounded_rate_and_not_below_its_minimum() -> None:
    b = BalloonSim(static_max_pages=1000, min_pages=300, rate_pages_per_s=100)
    b.request(100)
    b.advance(2.0)
    assert b.current_pages == 800
    b.advance(10.0)
    assert b.current_pages == 300  # refuses below the minimum
    assert b.target_pages == 100  # the target stays what was asked
    b.request(5000)
    b.advance(3.0)
    assert b.current_pages == 600
    b.advance(100.0)
    assert b.current_pages == 1000  # never above static max


def test_trace_interpolates_and_finds_rises() -> None:
    t = Trace("t", ((0.0, 100), (10.0, 200), (20.0, 200), (21.0, 1000), (30.0, 0), (40.0, 50)))
    assert t.committed_at(5.0) == 150
    assert t.committed_at(20.5) == 600
    assert t.committed_at(99.0) == 50
    assert t.rises(min_pages=100) == (Rise(0.0, 10.0, 200), Rise(20.0, 21.0, 1000))
    assert t.rises(min_pages=101) == (Rise(20.0, 21.0, 1000),)
    with pytest.raises(ValueError):
        Trace("bad", ((1.0, 5),))
    with pytest.raises(ValueError):
        Trace("bad", ((0.0, 5), (0.0, 6)))


def test_standard_traces_have_what_the_bench_needs() -> None:
    assert steady_trace().rises(mb2pages(64)) == ()
    assert len(ramp_trace().rises(mb2pages(64))) == 3
    bursts = burst_trace()
    assert len(bursts.rises(mb2pages(64))) >= 8
    assert bursts.duration_s == 1800


def test_the_files_are_what_the_real_parsers_read(tmp_path: Path) -> None:
    spec = GuestSpec()
    guest = GuestSim(Trace("flat", ((0.0, mb2pages(500)), (60.0, mb2pages(500)))), tmp_path)
    reading = read_guest(guest.roots)
    assert reading.meminfo.committed_pages == mb2pages(500)
    assert reading.meminfo.totalram_pages == spec.static_max_pages - spec.kernel_reserved_pages
    assert reading.zones.totalreserve_pages == spec.totalreserve_pages == 2979 + 1300
    assert reading.zones.max_pfn == spec.static_max_pages
    assert reading.balloon_current_kb == spec.static_max_pages * 4


def test_psi_comes_from_the_model_only(tmp_path: Path) -> None:
    spec = GuestSpec()
    # need = committed + 64 MiB; the guest has 2048 MiB - 16619 pages of totalram
    trace = Trace("t", ((0.0, mb2pages(500)), (100.0, mb2pages(500))))
    guest = GuestSim(trace, tmp_path, spec=spec)
    guest.advance(10)
    assert read_pressure(guest.roots).some_total_us == 0  # plenty of memory: no stall
    # shrink the balloon under the need: the guest stalls in proportion to the shortfall
    pages = mb2pages(500) + spec.kernel_reserved_pages
    balloon_target_path(guest.roots).write_text(f"{pages * 4}\n")  # as the loop would
    guest.balloon.current_pages = pages  # and as if the balloon had got there already
    guest.advance(1)
    # shortfall = 64 MiB >= the 16 MiB ramp: stalled the whole second (rate limits moot:
    # target == current)
    assert read_pressure(guest.roots).some_total_us == 1_000_000
    assert guest.metrics.stall_s == pytest.approx(1.0)


def test_sim_clock_runs_the_model_and_stops_at_the_end(tmp_path: Path) -> None:
    guest = GuestSim(Trace("t", ((0.0, 10), (12.0, 10))), tmp_path)
    clock = SimClock(guest)
    stop = threading.Event()
    assert not clock.wait(stop, 5)
    assert clock.monotonic() == 5.0 == guest.time_s
    assert not clock.wait(stop, 5)
    assert clock.wait(stop, 5) and stop.is_set()


SHORT = Trace("short", ((0.0, mb2pages(500)), (100.0, mb2pages(500)), (101.0, mb2pages(1300)),
                        (160.0, mb2pages(1300)), (162.0, mb2pages(500)), (240.0, mb2pages(500))))


def test_replay_kernel_and_guard_end_to_end() -> None:
    kernel = replay(SHORT, {})
    guard = replay(SHORT, {"pressure_guard": "1"})
    assert kernel.policy == "kernel" and guard.policy == "guard"
    for r in (kernel, guard):
        assert r.loop_counters["errors"] == 0
        assert r.metrics.balloon_writes > 0
        assert r.metrics.returned_avg_mib > 300  # the guest gave memory back
        assert len(r.metrics.reaction_lags_s) == 1
    assert kernel.loop_counters["guard_ticks"] == 0
    assert guard.loop_counters["guard_ticks"] >= 1
    # the guard saw the stall within a poll; the kernel waited for its tick
    assert guard.metrics.risk_s < kernel.metrics.risk_s
    assert guard.metrics.stall_s < kernel.metrics.stall_s


def test_replay_without_a_balloon_driver_writes_nothing(tmp_path: Path) -> None:
    result = replay(SHORT, {}, root=tmp_path, balloon_driver=False)
    assert result.loop_counters["errors"] == 0
    assert result.metrics.balloon_writes == 0
    assert not any("target" in p.name for p in tmp_path.rglob("*"))
    assert result.metrics.returned_avg_mib == 0.0  # nothing moved
